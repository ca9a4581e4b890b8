"""MIND (Microsoft News) loader: `news.tsv` texts and click interactions from `behaviors.tsv`.

Item text is `"<title>. <category>, <subcategory>"`. Each behaviors row `impression id, user, time, history,
impressions` gives the user's history clicks and the clicked impressions (`N123-1`; `-0` are skipped). The
history is the same in every row of a user (it predates the logged period), so it is emitted once, at the
user's earliest impression time minus 1 second: it sorts before all of the user's logged clicks and keeps its
own order. A (user, news) pair is kept once, at its earliest time. News ids without a `news.tsv` row are
dropped; `info` counts them (`missing_news_ids` distinct ids, `missing_news_interactions` interactions).
Times (`11/11/2019 9:05:58 AM`) are read as UTC.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from recsys.data.dataset import RecDataset, build_dataset
from recsys.data.registry import require_file
from recsys.errors import RecsysError

TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"


def _fields(path: Path, n: int) -> Iterator[tuple[str, list[str]]]:
    """`("file:line", fields)` for every non-blank line of a UTF-8 TSV file with at least n fields."""
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < n:
                raise RecsysError(f"{path}:{lineno}: expected {n} tab-separated fields, got {len(fields)}")
            yield f"{path}:{lineno}", fields


def load_mind(folder: Path) -> RecDataset:
    """MIND from `news.tsv` and `behaviors.tsv` in `folder` (e.g. the unpacked MINDsmall_train.zip)."""
    folder = Path(folder)
    news_file, behaviors_file = (require_file(folder, n, "mind") for n in ("news.tsv", "behaviors.tsv"))
    texts: dict[str, str] = {}
    for _, (nid, category, subcategory, title, *_rest) in _fields(news_file, 4):
        title = title.strip()
        texts[nid] = f"{title}. {category}, {subcategory}" if title else ""
    texts = {nid: t for nid, t in texts.items() if t}

    parsed: list[tuple[str, int, list[str], list[str]]] = []  # user, time, history, clicks
    first_time: dict[str, int] = {}
    for where, (_, user, time, history, impressions, *_rest) in _fields(behaviors_file, 5):
        try:
            t = int(datetime.strptime(time.strip(), TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp())
        except ValueError:
            raise RecsysError(f"{where}: bad time {time!r}, expected like '11/11/2019 9:05:58 AM'") from None
        clicks = []
        for token in impressions.split():
            nid, _, label = token.rpartition("-")
            if not nid or label not in ("0", "1"):
                raise RecsysError(f"{where}: bad impression {token!r}, expected like 'N123-1' or 'N123-0'")
            if label == "1":
                clicks.append(nid)
        parsed.append((user, t, history.split(), clicks))
        first_time[user] = min(t, first_time.get(user, t))

    raw: list[tuple[str, str, int]] = []
    last_history: dict[str, list[str]] = {}
    for user, t, history, clicks in parsed:
        if last_history.get(user) != history:  # normally only the user's first row
            last_history[user] = history
            raw.extend((user, nid, first_time[user] - 1) for nid in history)
        raw.extend((user, nid, t) for nid in clicks)
    earliest: dict[tuple[str, str], int] = {}
    for k, (user, nid, t) in enumerate(raw):
        j = earliest.get((user, nid))
        if j is None or t < raw[j][2]:
            earliest[(user, nid)] = k
    rows = [raw[k] for k in sorted(earliest.values())]
    missing = [nid for _, nid, _ in rows if nid not in texts]
    info = {
        "repeated_user_item_pairs": len(raw) - len(rows),
        "missing_news_ids": len(set(missing)),
        "missing_news_interactions": len(missing),
    }
    return build_dataset("mind", rows, texts, str(behaviors_file), info)
