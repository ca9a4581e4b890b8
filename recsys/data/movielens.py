"""MovieLens 100K and 1M loaders (official file layouts, Latin-1).

Every rating row is one implicit interaction unless `min_rating` is given (then rows rated below it are
dropped and counted). Item text is `"<title>. genres: g1, g2"`: ML-100K genres in `u.genre` index order,
ML-1M genres in the order `movies.dat` lists them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from recsys.data.dataset import RecDataset, build_dataset
from recsys.data.registry import require_file
from recsys.errors import RecsysError

ENCODING = "latin-1"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """`(line number, line)` for every non-blank line of a Latin-1 file."""
    for lineno, line in enumerate(path.read_text(encoding=ENCODING).splitlines(), 1):
        if line.strip():
            yield lineno, line


def _movie_id(value: str, where: str) -> str:
    if not value.isdigit():
        raise RecsysError(f"{where}: expected an integer movie id, got {value!r}")
    return value


def _text(title: str, genres: list[str]) -> str:
    return f"{title}. genres: {', '.join(genres)}" if genres else title


def _ratings(path: Path, sep: str, sep_name: str, min_rating: float | None) -> tuple[list, dict]:
    """Rows `(user, item, timestamp)` of a `user item rating timestamp` file, and what was filtered."""
    rows: list[tuple[str, str, int]] = []
    below = 0
    for lineno, line in _lines(path):
        fields = line.split(sep)
        if len(fields) != 4:
            raise RecsysError(f"{path}:{lineno}: expected 4 {sep_name}-separated fields, got {len(fields)}")
        user, item, rating, ts = fields
        try:
            if not (user.isdigit() and item.isdigit()):
                raise ValueError
            stars, seconds = int(rating), int(ts)
        except ValueError:
            raise RecsysError(
                f"{path}:{lineno}: expected integer user, item, rating, timestamp, got {line!r}"
            ) from None
        if min_rating is not None and stars < min_rating:
            below += 1
            continue
        rows.append((user, item, seconds))
    info = {} if min_rating is None else {"min_rating": min_rating, "dropped_below_min_rating": below}
    return rows, info


def load_ml100k(folder: Path, min_rating: float | None = None) -> RecDataset:
    """MovieLens 100K from `u.data`, `u.item` and `u.genre` in `folder`."""
    folder = Path(folder)
    data, item_file, genre_file = (
        require_file(folder, n, "ml-100k") for n in ("u.data", "u.item", "u.genre")
    )
    genres: dict[int, str] = {}
    for lineno, line in _lines(genre_file):
        name, _, index = line.rpartition("|")
        if not name or not index.strip().isdigit():
            raise RecsysError(f"{genre_file}:{lineno}: expected 'name|index', got {line!r}")
        genres[int(index)] = name
    genre_names = [genres[i] for i in sorted(genres)]
    n_fields = 5 + len(genre_names)
    texts: dict[str, str] = {}
    for lineno, line in _lines(item_file):
        fields = line.split("|")
        where = f"{item_file}:{lineno}"
        if len(fields) != n_fields:
            raise RecsysError(f"{where}: expected {n_fields} '|'-separated fields, got {len(fields)}")
        flags = fields[5:]
        if any(f not in ("0", "1") for f in flags):
            raise RecsysError(f"{where}: genre flags must be 0 or 1, got {'|'.join(flags)!r}")
        texts[_movie_id(fields[0], where)] = _text(
            fields[1].strip(), [g for g, f in zip(genre_names, flags, strict=True) if f == "1"]
        )
    rows, info = _ratings(data, "\t", "tab", min_rating)
    return build_dataset("ml-100k", rows, texts, str(data), info)


def load_ml1m(folder: Path, min_rating: float | None = None) -> RecDataset:
    """MovieLens 1M from `ratings.dat` and `movies.dat` in `folder` (any subset of the ratings is fine)."""
    folder = Path(folder)
    ratings, movies = (require_file(folder, n, "ml-1m") for n in ("ratings.dat", "movies.dat"))
    texts: dict[str, str] = {}
    for lineno, line in _lines(movies):
        fields = line.split("::")
        where = f"{movies}:{lineno}"
        if len(fields) != 3:
            raise RecsysError(f"{where}: expected 3 '::'-separated fields, got {len(fields)}")
        genres = [g for g in fields[2].split("|") if g and g != "(no genres listed)"]
        texts[_movie_id(fields[0], where)] = _text(fields[1].strip(), genres)
    rows, info = _ratings(ratings, "::", "'::'", min_rating)
    return build_dataset("ml-1m", rows, texts, str(ratings), info)
