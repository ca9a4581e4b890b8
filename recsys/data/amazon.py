"""Amazon Reviews 2018 loader: one category's 5-core reviews plus its metadata.

Reads `<Category>_5.json.gz` (one review per line: reviewerID, asin, unixReviewTime) and
`meta_<Category>.json.gz` (asin, title, category, brand, ...), gzipped or not. Lines are JSON; the
python-dict-literal lines of some Amazon dumps are accepted too. Item text is
`"<title>. categories: c1, c2. brand: B"` with HTML tags and entities removed; the top-level category (the
first entry, the same for the whole file) is left out, as are leaked sentences, and a brand already in the
title. Only reviewed items form the item universe (the metadata file lists the whole category catalogue);
reviewed items without a metadata row or with an empty title are dropped and counted.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path

from recsys.data.dataset import RecDataset, build_dataset
from recsys.data.registry import require_file
from recsys.errors import RecsysError

_TAGS = re.compile(
    r"<(script|style)\b.*?</\1\s*>|<!--.*?-->|<\s*/?\s*[A-Za-z][^<>]*>", re.DOTALL | re.IGNORECASE
)
_MAX_CATEGORY_CHARS = 60  # longer "categories" are feature sentences leaked into the list


def clean_html(text: str) -> str:
    """`text` with HTML entities decoded, tags (and script/style blocks) removed, whitespace collapsed."""
    return " ".join(_TAGS.sub(" ", html.unescape(text)).split())


def _parse(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        try:
            obj = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise RecsysError(f"{where}: not a JSON object ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise RecsysError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """`(line number, object)` for every non-blank line of a JSON-lines file, gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, _parse(line, f"{path}:{lineno}")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise RecsysError(f"{path}: cannot read ({' '.join(str(e).split())})") from None


def _find(folder: Path, filename: str, dataset: str) -> Path:
    """`folder/filename` (a .gz name), or its decompressed twin if only that exists."""
    plain = folder / filename.removesuffix(".gz")
    if plain.is_file() and not (folder / filename).is_file():
        return plain
    return require_file(folder, filename, dataset)


def item_text(meta: dict) -> str:
    """The text of one metadata record ('' when it has no title)."""
    title = clean_html(str(meta.get("title") or ""))
    if not title:
        return ""
    raw = meta.get("category") or []
    categories = [clean_html(str(c)) for c in ([raw] if isinstance(raw, str) else raw)]
    labels: list[str] = []
    for c in categories[1:]:
        if (
            c
            and c != categories[0]
            and c not in labels
            and len(c) <= _MAX_CATEGORY_CHARS
            and not c.endswith(".")
        ):
            labels.append(c)
    brand = clean_html(str(meta.get("brand") or ""))
    parts = [title]
    if labels:
        parts.append(f"categories: {', '.join(labels)}")
    if brand and brand.lower() not in title.lower():
        parts.append(f"brand: {brand}")
    return ". ".join(parts)


def load_amazon2018(folder: Path, category: str) -> RecDataset:
    """Amazon Reviews 2018 category `category` (file prefix, e.g. `Gift_Cards`) from `folder`."""
    folder = Path(folder)
    name = f"amazon2018:{category}"
    reviews = _find(folder, f"{category}_5.json.gz", name)
    meta = _find(folder, f"meta_{category}.json.gz", name)
    rows: list[tuple[str, str, int]] = []
    for lineno, r in _records(reviews):
        try:
            rows.append((str(r["reviewerID"]), str(r["asin"]), int(r["unixReviewTime"])))
        except KeyError as e:
            raise RecsysError(f"{reviews}:{lineno}: missing key {e}") from None
        except (TypeError, ValueError):
            raise RecsysError(
                f"{reviews}:{lineno}: unixReviewTime must be an integer, got {r['unixReviewTime']!r}"
            ) from None
    reviewed = dict.fromkeys(asin for _, asin, _ in rows)
    texts: dict[str, str] = {}
    unreviewed: set[str] = set()
    for _, m in _records(meta):
        asin = str(m.get("asin", ""))
        if asin not in reviewed:
            unreviewed.add(asin)
        elif asin not in texts:  # the first row wins: some dumps repeat an asin
            texts[asin] = item_text(m)
    texts = {asin: t for asin, t in texts.items() if t}
    info = {
        "items_without_metadata": sum(1 for asin in reviewed if asin not in texts),
        "meta_items_not_reviewed": len(unreviewed),
        "repeated_user_item_pairs": len(rows) - len({(u, i) for u, i, _ in rows}),
    }
    return build_dataset(name, rows, texts, str(reviews), info)
