"""`synthetic`: the embedded default dataset, generated in memory from a seed.

Items belong to latent topics; an item's text is made of words drawn mostly from its topic's vocabulary, so
text genuinely predicts preference. Users prefer a few topics and move between them in sessions, so the most
recent history predicts the next item — a text model reading the history beats popularity (tested). Words are
pronounceable pseudo-words (no vocabulary to ship): a pretrained tokenizer splits them into sub-words.
"""
from __future__ import annotations

import numpy as np

from recsys.data.dataset import RecDataset, build_dataset

_ONSETS = "b br c d dr f g gr k l m n p pl r s st t tr v z".split()
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "n", "r", "l", "s", "m", "x", "nd"]


def _words(rng: np.random.Generator, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        syl = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.integers(2, 4))]
        out.add("".join(syl))
    return sorted(out)


def generate(
    seed: int = 0,
    n_users: int = 1000,
    n_items: int = 2000,
    n_topics: int = 40,
    mean_length: int = 20,
    p_stay: float = 0.7,
    p_random: float = 0.1,
) -> RecDataset:
    """Deterministic synthetic interactions and item texts.

    Each user has a Dirichlet preference over topics; a sequence starts in a preferred topic and at each step
    stays in the current topic with probability `p_stay`, jumps to another preferred topic otherwise, and with
    probability `p_random` clicks a globally popular item instead. Items inside a topic follow a Zipf law.
    """
    rng = np.random.default_rng(seed)
    n_topics = min(n_topics, n_items)
    vocab = _words(rng, n_topics * 10 + 100)
    rng.shuffle(vocab)
    topic_words = [vocab[t * 10:(t + 1) * 10] for t in range(n_topics)]
    filler = vocab[n_topics * 10:]

    item_topic = rng.permutation(np.arange(n_items) % n_topics)  # every topic has items
    texts = {}
    for i in range(n_items):
        words = list(rng.choice(topic_words[item_topic[i]], size=3, replace=False)) + [str(rng.choice(filler))]
        rng.shuffle(words)
        texts[f"i{i}"] = " ".join(words).capitalize()
    by_topic = [np.flatnonzero(item_topic == t) for t in range(n_topics)]
    zipf = [1.0 / np.arange(1, len(ix) + 1) ** 0.8 for ix in by_topic]
    zipf = [w / w.sum() for w in zipf]
    global_pop = rng.permutation(n_items)[: min(n_items, max(20, n_items // 50))]

    rows: list[tuple[str, str, int]] = []
    for u in range(n_users):
        pref = rng.dirichlet(np.full(n_topics, 0.1))
        length = max(3, int(rng.poisson(mean_length)))
        topic = rng.choice(n_topics, p=pref)
        seen: set[int] = set()
        t0 = int(rng.integers(1_000_000, 2_000_000))
        for step in range(length):
            if rng.random() < p_random:
                item = int(rng.choice(global_pop))
            else:
                if rng.random() > p_stay:
                    topic = rng.choice(n_topics, p=pref)
                item = int(by_topic[topic][rng.choice(len(by_topic[topic]), p=zipf[topic])])
            if item in seen:
                continue
            seen.add(item)
            rows.append((f"u{u}", f"i{item}", t0 + 60 * step))
    return build_dataset(f"synthetic(seed={seed})", rows, texts, source="synthetic",
                         info={"seed": seed, "topics": n_topics})
