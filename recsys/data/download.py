"""Fetch a dataset's official files into the data dir (`recsys data download NAME`).

`ml-100k` and `ml-1m` (zip, md5-checked, top folder stripped: `<data dir>/ml-100k/u.data`), `mind`
(MINDsmall_train.zip) and `amazon2018:<Category>` (two .json.gz, kept gzipped, in `<data dir>/amazon2018`).
Nothing half-written is ever left behind: everything is downloaded and unpacked inside a temporary folder in
the data dir and moved into place with `os.replace` only once complete and verified. Zip members that are
absolute, symlinks or would land outside the target folder are refused. `URLS` (or the `urls=` argument) maps
names to sources; tests point it at a loopback server.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import stat
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

from tqdm import tqdm

from recsys.data.registry import AMAZON, get_spec, resolve_folder
from recsys.errors import RecsysError


class Source(NamedTuple):
    """One file to fetch: a `.zip` is unpacked, anything else is kept under its URL's file name."""

    url: str  # "{category}" is replaced by the Amazon category
    md5: str | None = None


_AMAZON_BASE = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2"
URLS: dict[str, list[Source]] = {
    "ml-100k": [
        Source(
            "https://files.grouplens.org/datasets/movielens/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"
        )
    ],
    "ml-1m": [
        Source("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906")
    ],
    "mind": [Source("https://mind201910small.blob.core.windows.net/release/MINDsmall_train.zip")],
    AMAZON: [
        Source(f"{_AMAZON_BASE}/categoryFilesSmall/{{category}}_5.json.gz"),
        Source(f"{_AMAZON_BASE}/metaFiles2/meta_{{category}}.json.gz"),
    ],
}
# Files whose presence means an archive's dataset is already there (kept files are checked by name).
ARCHIVE_FILES: dict[str, tuple[str, ...]] = {
    "ml-100k": ("u.data", "u.item", "u.genre"),
    "ml-1m": ("ratings.dat", "movies.dat"),
    "mind": ("news.tsv", "behaviors.tsv"),
}


def _one_line(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    return " ".join(str(reason).split()) or type(e).__name__


def _file_name(url: str) -> str:
    return PurePosixPath(urllib.parse.urlparse(url).path).name


def _fetch(source: Source, dest: Path) -> None:
    """Download `source` to `dest` (via `dest.part`, replaced at the end), checking its md5 if known."""
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, leave=False,
                      disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        part.unlink(missing_ok=True)
        raise RecsysError(f"download failed: {source.url}: {_one_line(e)}") from None
    if source.md5 and digest.hexdigest() != source.md5.lower():
        part.unlink()
        raise RecsysError(
            f"checksum mismatch for {source.url}: expected md5 {source.md5}, got {digest.hexdigest()} "
            "(download deleted)"
        )
    os.replace(part, dest)


def safe_extract(archive: Path, dest: Path, label: str) -> None:
    """Unpack zip `archive` into the new folder `dest`, refusing absolute, symlink or escaping members."""
    dest.mkdir()
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:
                name = m.filename
                if stat.S_ISLNK(m.external_attr >> 16):
                    raise RecsysError(f"{label}: refusing archive member {name!r}: it is a symlink")
                if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
                    raise RecsysError(f"{label}: refusing archive member {name!r}: absolute path")
                if not (root / name).resolve().is_relative_to(root):
                    raise RecsysError(
                        f"{label}: refusing archive member {name!r}: it escapes the target folder"
                    )
            for m in members:
                path = (root / m.filename).resolve()
                if m.is_dir():
                    path.mkdir(parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(path, "xb") as out:
                    shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise RecsysError(f"{label}: cannot unpack ({_one_line(e)})") from None


def _content_root(folder: Path) -> Path:
    """`folder`, or its only subfolder when the archive wraps everything in one top folder (`ml-100k/`)."""
    entries = [p for p in folder.iterdir() if p.name != "__MACOSX"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


def download(
    name: str,
    data_dir: str | Path | None = None,
    force: bool = False,
    urls: Mapping[str, Sequence[Source | tuple[str, str | None]]] | None = None,
) -> Path:
    """Fetch dataset `name` into its folder under `data_dir` (see registry) and return that folder.

    If the folder already holds the dataset's files nothing is fetched, unless `force`. `urls` overrides
    entries of `URLS` for this call.
    """
    _, options = get_spec(name)
    key = AMAZON if options else name
    table = {**URLS, **(urls or {})}
    if key not in table:
        raise RecsysError(f"dataset {name!r} cannot be downloaded; downloadable: {', '.join(table)}")
    sources = [Source(s[0].replace("{category}", options.get("category", "")), *s[1:]) for s in table[key]]
    archive = next((s for s in sources if _file_name(s.url).endswith(".zip")), None)
    kept = [s for s in sources if s is not archive]
    expected = [_file_name(s.url) for s in kept] + list(ARCHIVE_FILES.get(key, ()) if archive else ())
    target = resolve_folder(name, data_dir=data_dir)
    if not force and expected and all((target / f).is_file() for f in expected):
        print(f"{name}: already in {target}; nothing to download (force to fetch again)", file=sys.stderr)
        return target

    if archive is not None and target.exists() and not force:
        missing = ", ".join(f for f in expected if not (target / f).is_file())
        raise RecsysError(
            f"{target} exists but lacks {missing}; move it away or download with --force to replace it"
        )
    created = [d for d in (target.parent, *target.parent.parents) if not d.exists()]  # removed again on failure
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-download-", dir=target.parent))
    except OSError as e:
        _remove_empty(created)
        raise RecsysError(f"{name}: cannot write into {target.parent}: {_one_line(e)}") from None
    ok = False
    try:
        for source in kept:
            _fetch(source, work / _file_name(source.url))
        if archive is not None:
            _fetch(archive, work / "archive.zip")
            safe_extract(work / "archive.zip", work / "unpacked", archive.url)
            content = _content_root(work / "unpacked")
            missing = [f for f in ARCHIVE_FILES.get(key, ()) if not (content / f).is_file()]
            if missing:
                raise RecsysError(f"{archive.url}: archive lacks {', '.join(missing)}")
            if target.exists():  # force: swap the old copy out, and back if the swap fails
                os.replace(target, work / "previous")
            try:
                os.replace(content, target)
            except OSError:
                if (work / "previous").exists():
                    os.replace(work / "previous", target)
                raise
        if kept:
            target.mkdir(exist_ok=True)
            for source in kept:
                os.replace(work / _file_name(source.url), target / _file_name(source.url))
        ok = True
    except OSError as e:
        raise RecsysError(f"{name}: cannot write into {target.parent}: {_one_line(e)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not ok:  # a failed download leaves no folder it made (the data dir included)
            _remove_empty(created)
    print(f"{name}: downloaded into {target}", file=sys.stderr)
    return target


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a download created (innermost first) that are still empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return  # not empty (or gone): nor are its parents ours to remove
