"""Your own dataset: `interactions.csv` and `items.csv` in one folder.

`interactions.csv` has the header `user_id,item_id,timestamp`; `items.csv` has `item_id,text` (UTF-8, any
quoting the csv module reads, extra columns ignored). Ids are arbitrary strings. A timestamp is an integer, a
float (floored) or an ISO-8601 date or date/time (no zone means UTC), stored as unix seconds. Interactions
whose item has no row or an empty text in `items.csv` are dropped and counted.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from recsys.data.dataset import RecDataset, build_dataset
from recsys.data.registry import require_file
from recsys.errors import RecsysError, read_utf8

INTERACTIONS = "interactions.csv"
ITEMS = "items.csv"


def parse_timestamp(value: str) -> int:
    """Unix seconds from `"1700000000"`, `"1700000000.5"` or `"2023-11-14T22:13:20"` (ValueError if none)."""
    value = value.strip()
    try:
        return int(value)
    except ValueError:
        pass
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return math.floor(seconds)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return math.floor(moment.timestamp())


def _rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, dict[str, str]]]:
    """`("file:line", row)` for every data row of a CSV file whose header has `columns`."""
    with io.StringIO(read_utf8(path), newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in columns if c not in header]
            if missing:
                raise RecsysError(
                    f"{path}:1: header must be {','.join(columns)}, got {','.join(header) or 'nothing'} "
                    f"(missing {', '.join(missing)})"
                )
            reader.fieldnames = header
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or any(row[c] is None for c in columns):
                    raise RecsysError(f"{where}: expected {len(header)} comma-separated fields")
                yield where, row
        except (csv.Error, UnicodeDecodeError) as e:
            raise RecsysError(f"{path}:{reader.line_num}: {' '.join(str(e).split())}") from None


def _id(row: dict[str, str], column: str, where: str) -> str:
    value = row[column].strip()
    if not value:
        raise RecsysError(f"{where}: empty {column}")
    return value


def load_custom(folder: Path) -> RecDataset:
    """The dataset in `folder/interactions.csv` and `folder/items.csv`."""
    folder = Path(folder)
    interactions, items = (require_file(folder, n, "custom") for n in (INTERACTIONS, ITEMS))
    texts: dict[str, str] = {}
    first_line: dict[str, str] = {}
    for where, row in _rows(items, ("item_id", "text")):
        item = _id(row, "item_id", where)
        if item in texts:
            raise RecsysError(f"{where}: duplicate item_id {item!r} (first at {first_line[item]})")
        texts[item], first_line[item] = row["text"], where
    rows: list[tuple[str, str, int]] = []
    for where, row in _rows(interactions, ("user_id", "item_id", "timestamp")):
        try:
            ts = parse_timestamp(row["timestamp"])
        except (ValueError, OverflowError):
            raise RecsysError(
                f"{where}: bad timestamp {row['timestamp']!r}, expected unix seconds or ISO-8601 like "
                "2024-01-31T12:00:00"
            ) from None
        rows.append((_id(row, "user_id", where), _id(row, "item_id", where), ts))
    if not rows:
        raise RecsysError(f"{interactions}: no interactions (only a header, or an empty file)")
    return build_dataset("custom", rows, texts, str(interactions), {"path": str(folder)})
