"""The downloader against a real HTTP server on 127.0.0.1 serving archives built in tmp_path (no internet)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import stat
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recsys.data.amazon import load_amazon2018
from recsys.data.download import Source, download
from recsys.data.movielens import load_ml100k
from recsys.data.registry import AMAZON
from recsys.errors import RecsysError

ML100K = {
    "ml-100k/u.data": "1\t1\t5\t10\n2\t2\t3\t11\n1\t2\t4\t12\n",
    "ml-100k/u.item": "1|Heat (1995)|01-Jan-1995||http://x|0|1\n2|Odd (1995)|01-Jan-1995||http://y|1|0\n",
    "ml-100k/u.genre": "unknown|0\nAction|1\n",
}


class Server:
    """A loopback HTTP server for the files in `root`; `hits` lists the paths requested."""

    def __init__(self, root: Path) -> None:
        self.root, self.hits = root, []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("no_proxy", "*")  # a proxy set in the environment must not see the loopback requests
    monkeypatch.setenv("NO_PROXY", "*")
    root = tmp_path / "served"
    root.mkdir()
    s = Server(root)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def make_zip(path: Path, members: dict[str, str], symlinks: dict[str, str] | None = None) -> str:
    """Write a zip of `members` (name -> text) plus symlink members; return its md5."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return hashlib.md5(path.read_bytes()).hexdigest()


def entries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_good_archive_is_verified_and_unpacked(server: Server, tmp_path: Path) -> None:
    md5 = make_zip(server.root / "ml-100k.zip", ML100K)
    data = tmp_path / "data"
    folder = download("ml-100k", data_dir=data, urls={"ml-100k": [Source(f"{server.url}/ml-100k.zip", md5)]})
    assert folder == data / "ml-100k"
    assert entries(data) == [
        "ml-100k",
        "ml-100k/u.data",
        "ml-100k/u.genre",
        "ml-100k/u.item",
    ]  # no temp files
    assert (folder / "u.data").read_text() == ML100K["ml-100k/u.data"]
    assert load_ml100k(folder).n_interactions == 3
    assert server.hits == ["/ml-100k.zip"]


def test_existing_folder_is_not_downloaded_again(server: Server, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "data" / "ml-100k"
    folder.mkdir(parents=True)
    for name in ("u.data", "u.item", "u.genre"):
        (folder / name).write_text("already here")
    urls = {"ml-100k": [Source(f"{server.url}/ml-100k.zip")]}
    assert download("ml-100k", data_dir=tmp_path / "data", urls=urls) == folder
    assert server.hits == []
    assert "already" in capsys.readouterr().err
    make_zip(server.root / "ml-100k.zip", ML100K)  # force: fetched again and swapped in
    download("ml-100k", data_dir=tmp_path / "data", urls=urls, force=True)
    assert (folder / "u.data").read_text() == ML100K["ml-100k/u.data"] and server.hits == ["/ml-100k.zip"]
    assert entries(tmp_path / "data") == ["ml-100k", "ml-100k/u.data", "ml-100k/u.genre", "ml-100k/u.item"]


def test_wrong_md5_raises_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    md5 = make_zip(server.root / "ml-100k.zip", ML100K)
    url = f"{server.url}/ml-100k.zip"
    with pytest.raises(RecsysError) as e:
        download("ml-100k", data_dir=tmp_path / "data", urls={"ml-100k": [Source(url, "0" * 32)]})
    message = str(e.value)
    assert url in message and "0" * 32 in message and md5 in message and "\n" not in message
    assert entries(tmp_path / "data") == []


@pytest.mark.parametrize(
    "members, symlinks, bad",
    [
        ({"ml-100k/u.data": "x", "../evil.txt": "gotcha"}, None, "../evil.txt"),
        ({"ml-100k/u.data": "x", "ml-100k/../../evil.txt": "gotcha"}, None, "ml-100k/../../evil.txt"),
        ({"/tmp/evil.txt": "gotcha"}, None, "/tmp/evil.txt"),
        ({"ml-100k/u.data": "x"}, {"ml-100k/u.item": "/etc/passwd"}, "ml-100k/u.item"),
    ],
)
def test_unsafe_archive_members_are_refused(server: Server, tmp_path: Path, members, symlinks, bad) -> None:
    make_zip(server.root / "ml-100k.zip", members, symlinks)
    with pytest.raises(RecsysError) as e:
        download(
            "ml-100k", data_dir=tmp_path / "data", urls={"ml-100k": [Source(f"{server.url}/ml-100k.zip")]}
        )
    assert repr(bad) in str(e.value) and "refusing" in str(e.value)
    assert entries(tmp_path / "data") == []
    assert not (tmp_path / "evil.txt").exists()


def test_archive_without_top_folder_and_missing_files(server: Server, tmp_path: Path) -> None:
    make_zip(server.root / "MINDsmall_train.zip", {"news.tsv": "N1\tnews\tsub\tTitle\n", "behaviors.tsv": ""})
    urls = {"mind": [Source(f"{server.url}/MINDsmall_train.zip")]}
    assert (download("mind", data_dir=tmp_path / "data", urls=urls) / "news.tsv").is_file()
    make_zip(server.root / "ml-1m.zip", {"ml-1m/README": "no ratings here"})
    with pytest.raises(RecsysError, match="archive lacks ratings.dat, movies.dat"):
        download("ml-1m", data_dir=tmp_path / "data", urls={"ml-1m": [Source(f"{server.url}/ml-1m.zip")]})
    assert entries(tmp_path / "data") == ["mind", "mind/behaviors.tsv", "mind/news.tsv"]


def test_amazon_files_are_kept_gzipped(server: Server, tmp_path: Path) -> None:
    review = {"reviewerID": "u1", "asin": "A", "unixReviewTime": 5}
    (server.root / "Toys_5.json.gz").write_bytes(gzip.compress(json.dumps(review).encode()))
    (server.root / "meta_Toys.json.gz").write_bytes(gzip.compress(b'{"asin": "A", "title": "Top"}\n'))
    urls = {
        AMAZON: [
            Source(server.url + "/{category}_5.json.gz"),
            Source(server.url + "/meta_{category}.json.gz"),
        ]
    }
    folder = download("amazon2018:Toys", data_dir=tmp_path / "data", urls=urls)
    assert entries(tmp_path / "data") == [
        "amazon2018",
        "amazon2018/Toys_5.json.gz",
        "amazon2018/meta_Toys.json.gz",
    ]
    assert (folder / "Toys_5.json.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert load_amazon2018(folder, "Toys").item_texts == ["Top"]
    download("amazon2018:Toys", data_dir=tmp_path / "data", urls=urls)
    assert len(server.hits) == 2  # the second call found both files


def test_http_error_is_one_line_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    (server.root / "Toys_5.json.gz").write_bytes(gzip.compress(b"{}"))
    urls = {
        AMAZON: [
            Source(server.url + "/{category}_5.json.gz"),
            Source(server.url + "/meta_{category}.json.gz"),
        ]
    }
    with pytest.raises(RecsysError) as e:
        download("amazon2018:Toys", data_dir=tmp_path / "data", urls=urls)
    assert str(e.value) == f"download failed: {server.url}/meta_Toys.json.gz: HTTP 404 File not found"
    assert entries(tmp_path / "data") == []


def test_incomplete_existing_folder_is_left_alone(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "data" / "ml-100k"
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("mine")
    make_zip(server.root / "ml-100k.zip", ML100K)
    urls = {"ml-100k": [Source(f"{server.url}/ml-100k.zip")]}
    with pytest.raises(RecsysError, match="exists but lacks u.item, u.genre; .* --force"):
        download("ml-100k", data_dir=tmp_path / "data", urls=urls)
    assert entries(tmp_path / "data") == ["ml-100k", "ml-100k/u.data"] and server.hits == []


def test_not_downloadable(tmp_path: Path) -> None:
    with pytest.raises(RecsysError, match="cannot be downloaded"):
        download("custom", data_dir=tmp_path)
