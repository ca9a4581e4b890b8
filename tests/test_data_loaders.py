"""Dataset loaders and the registry: real shared data, small hand-written folders, and bad input."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from recsys.data.amazon import load_amazon2018
from recsys.data.custom import load_custom, parse_timestamp
from recsys.data.dataset import RecDataset
from recsys.data.mind import load_mind
from recsys.data.movielens import load_ml1m, load_ml100k
from recsys.data.registry import list_datasets, load_dataset, resolve_folder
from recsys.errors import RecsysError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared(name: str) -> Path:
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"real test data not found at {folder} (see ../shared/datasets/README.md)")
    return folder


def text_of(ds: RecDataset, item_id: str) -> str:
    return ds.item_texts[ds.item_ids.index(item_id)]


def interactions(ds: RecDataset) -> list[tuple[str, str, int]]:
    return [
        (ds.user_ids[u], ds.item_ids[i], int(t))
        for u, i, t in zip(ds.users, ds.items, ds.timestamps, strict=True)
    ]


def error(fn, *args, **kwargs) -> str:
    """The RecsysError message `fn(*args, **kwargs)` raises, checked to be one line."""
    with pytest.raises(RecsysError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def write_gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# --- real shared data --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k() -> RecDataset:
    return load_ml100k(shared("ml-100k"))


@pytest.fixture(scope="module")
def ml1m() -> RecDataset:
    return load_ml1m(shared("ml-1m-subset"))


@pytest.fixture(scope="module")
def amazon() -> RecDataset:
    return load_amazon2018(shared("amazon-gift-cards"), "Gift_Cards")


@pytest.fixture(scope="module")
def mind() -> RecDataset:
    return load_mind(shared("mind-sample"))


def test_ml100k_counts_texts_and_order(ml100k: RecDataset) -> None:
    assert (ml100k.n_interactions, ml100k.n_users, ml100k.n_items) == (100_000, 943, 1682)
    assert text_of(ml100k, "1") == "Toy Story (1995). genres: Animation, Children's, Comedy"
    assert text_of(ml100k, "2") == "GoldenEye (1995). genres: Action, Adventure, Thriller"
    assert text_of(ml100k, "543") == "Misérables, Les (1995). genres: Drama, Musical"  # Latin-1
    assert text_of(ml100k, "1373") == "Good Morning (1971). genres: unknown"
    assert interactions(ml100k)[:2] == [("196", "242", 881250949), ("186", "302", 891717742)]  # file order
    assert ml100k.timestamps.dtype == np.int64
    assert ml100k.info["dropped_no_text"] == 0


def test_ml100k_min_rating_keeps_only_high_ratings() -> None:
    folder = shared("ml-100k")
    ratings = [int(line.split("\t")[2]) for line in (folder / "u.data").read_text().splitlines()]
    ds = load_dataset("ml-100k", path=folder, min_rating=4)
    assert ds.n_interactions == sum(r >= 4 for r in ratings) == 55_375
    assert ds.info["dropped_below_min_rating"] == 100_000 - 55_375
    assert ds.n_items == 1682  # the item universe is every movie, rated highly or not


def test_ml1m_subset(ml1m: RecDataset) -> None:
    assert ml1m.n_interactions == 487_650
    assert ml1m.n_users == 2999 and max(int(u) for u in ml1m.user_ids) <= 2999
    assert ml1m.n_items == 3883
    assert text_of(ml1m, "1") == "Toy Story (1995). genres: Animation, Children's, Comedy"
    assert text_of(ml1m, "73") == "Misérables, Les (1995). genres: Drama, Musical"
    assert interactions(ml1m)[0] == ("1", "1193", 978300760)


def test_ml1m_keeps_genre_order_of_movies_dat_and_filters(tmp_path: Path) -> None:
    (tmp_path / "movies.dat").write_bytes(
        "1::Amélie (2001)::Romance|Comedy\n2::Heat (1995)::Action\n".encode("latin-1")
    )
    (tmp_path / "ratings.dat").write_text("1::1::5::10\n1::2::2::11\n2::1::3::12\n")
    ds = load_ml1m(tmp_path, min_rating=3)
    assert text_of(ds, "1") == "Amélie (2001). genres: Romance, Comedy"
    assert interactions(ds) == [("1", "1", 10), ("2", "1", 12)]
    assert ds.info["dropped_below_min_rating"] == 1


def test_amazon_gift_cards(amazon: RecDataset) -> None:
    assert (amazon.n_interactions, amazon.n_users, amazon.n_items) == (2972, 458, 148)
    assert amazon.info["items_without_metadata"] == 0  # every reviewed gift card has a titled meta row
    assert amazon.info["meta_items_not_reviewed"] == 1547 - 148
    for text in amazon.item_texts:
        assert not re.search(r"<[A-Za-z/!]|&(#\d+|#x[0-9a-f]+|[a-z]+);", text, re.IGNORECASE), text
        assert text == " ".join(text.split())
    # a title with HTML entities in the raw metadata comes out decoded
    with gzip.open(shared("amazon-gift-cards") / "meta_Gift_Cards.json.gz", "rt", encoding="utf-8") as f:
        raw = {m["asin"]: m["title"] for m in map(json.loads, f)}
    escaped = [asin for asin in amazon.item_ids if "&#39;" in raw[asin] or "&amp;" in raw[asin]]
    assert escaped
    assert text_of(amazon, escaped[0]).startswith(
        raw[escaped[0]].replace("&#39;", "'").replace("&amp;", "&").strip()
    )


def test_amazon_drops_items_without_metadata_and_reads_dict_literals(tmp_path: Path) -> None:
    review = '{{"reviewerID": "{}", "asin": "{}", "unixReviewTime": {}, "overall": 5.0}}'
    write_gz(
        tmp_path / "Toys_5.json.gz",
        [review.format("u1", "A", 100), review.format("u1", "B", 101), review.format("u2", "C", 102)]
        + [review.format("u2", "A", 103)],
    )
    meta_a = {
        "asin": "A",
        "title": "Fancy &amp; Co <b>Card</b>",
        "category": ["Toys", "Toys", "Puzzles", "No expiration, no fees."],
        "brand": "Acme",
    }
    write_gz(
        tmp_path / "meta_Toys.json.gz",
        [
            repr(meta_a),
            json.dumps({"asin": "B", "title": "  "}),
            json.dumps({"asin": "Z", "title": "Unreviewed"}),
        ],
    )
    ds = load_amazon2018(tmp_path, "Toys")
    assert ds.item_ids == ["A"]
    assert ds.item_texts == ["Fancy & Co Card. categories: Puzzles. brand: Acme"]
    assert interactions(ds) == [("u1", "A", 100), ("u2", "A", 103)]
    assert ds.info["items_without_metadata"] == 2  # B (empty title) and C (no row)
    assert ds.info["dropped_no_text"] == 2
    assert ds.info["meta_items_not_reviewed"] == 1


def test_mind_sample(mind: RecDataset) -> None:
    folder = shared("mind-sample")
    news = {line.split("\t")[0] for line in (folder / "news.tsv").read_text(encoding="utf-8").splitlines()}
    seen = set()
    for line in (folder / "behaviors.tsv").read_text(encoding="utf-8").splitlines():
        _, _, _, history, impressions = line.split("\t")
        seen.update(history.split())
        seen.update(t[:-2] for t in impressions.split() if t.endswith("-1"))
    assert mind.info["missing_news_ids"] == len(seen - news) > 0
    assert mind.info["missing_news_interactions"] == mind.info["dropped_no_text"] > 0
    assert set(mind.item_ids) == news and all(mind.item_texts)  # every interaction item has a text
    pairs = list(zip(mind.users.tolist(), mind.items.tolist(), strict=True))
    assert len(pairs) == len(set(pairs)) == mind.n_interactions
    assert (
        text_of(mind, "N16278")
        == "Silver Spring Man Nabs Title At Soggy Marine Corps Marathon. sports, more_sports"
    )


def test_mind_history_before_clicks_dedup_and_missing(tmp_path: Path) -> None:
    (tmp_path / "news.tsv").write_text(
        "".join(f"N{i}\tnews\tsub{i}\tTitle {i}\tabstract\turl\t[]\t[]\n" for i in range(1, 6)),
        encoding="utf-8",
    )
    (tmp_path / "behaviors.tsv").write_text(
        "1\tU1\t11/11/2019 9:05:58 AM\tN1 N2 N1\tN3-1 N4-0 N9-1\n"
        "2\tU2\t11/11/2019 9:00:00 AM\t\tN5-1\n"
        "3\tU1\t11/10/2019 11:00:00 PM\tN1 N2 N1\tN3-1 N5-1\n",
        encoding="utf-8",
    )
    ds = load_mind(tmp_path)
    t1, t3 = 1573463158, 1573426800  # 2019-11-11 09:05:58 and 2019-11-10 23:00:00 UTC
    assert interactions(ds) == [
        ("U1", "N1", t3 - 1),  # history at U1's earliest impression time minus 1 s, in history order
        ("U1", "N2", t3 - 1),
        ("U2", "N5", t1 - 358),
        ("U1", "N3", t3),  # N3 was clicked at both t1 and t3: kept once, at the earlier time
        ("U1", "N5", t3),
    ]
    assert text_of(ds, "N2") == "Title 2. news, sub2"
    assert ds.info["missing_news_ids"] == 1 and ds.info["missing_news_interactions"] == 1  # N9
    assert ds.n_items == 5  # N4 (not clicked) still belongs to the item universe


# --- custom ------------------------------------------------------------------------------------------------


def write_custom(folder: Path, interactions_csv: str, items_csv: str = "item_id,text\n") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "interactions.csv").write_text(interactions_csv, encoding="utf-8")
    (folder / "items.csv").write_text(items_csv, encoding="utf-8")
    return folder


def test_custom_string_ids_and_timestamps(tmp_path: Path) -> None:
    folder = write_custom(
        tmp_path,
        "user_id,item_id,timestamp\n"
        "alice,book:42,2024-01-31T12:00:00\n"
        "bob,book:42,1700000000\n"
        'alice,"pen, blue",1700000000.9\n'
        "bob,book:7,2024-01-31\n"
        "carol,ghost,2024-01-31T12:00:00+01:00\n",
        'item_id,text\nbook:42,"A book, with a comma"\n"pen, blue",  A  blue pen \nbook:7,\n',
    )
    ds = load_dataset("custom", path=folder)
    assert interactions(ds) == [
        ("alice", "book:42", 1706702400),
        ("bob", "book:42", 1700000000),
        ("alice", "pen, blue", 1700000000),
    ]
    assert ds.item_texts == ["A book, with a comma", "A blue pen"]
    assert ds.info["items_empty_text"] == 1  # book:7
    assert ds.info["dropped_no_text"] == 2  # book:7 and ghost (no items.csv row)


def test_parse_timestamp() -> None:
    assert parse_timestamp("0") == 0
    assert parse_timestamp("1.5") == 1
    assert parse_timestamp("1970-01-02") == 86400
    assert parse_timestamp("1970-01-01T01:00:00+01:00") == 0
    for bad in ("", "yesterday", "nan", "2024-13-01"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


# --- bad input ---------------------------------------------------------------------------------------------


def fake_ml100k(folder: Path, u_data: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "u.genre").write_text("unknown|0\nAction|1\n\n")
    (folder / "u.item").write_text(
        "1|Heat (1995)|01-Jan-1995||http://x|0|1\n2|Odd (1995)|01-Jan-1995||http://y|1|0\n"
    )
    (folder / "u.data").write_text(u_data)
    return folder


def test_tiny_fake_ml100k_loads(tmp_path: Path) -> None:
    ds = load_ml100k(fake_ml100k(tmp_path, "1\t1\t5\t10\n2\t2\t3\t11\n1\t2\t4\t12\n"))
    assert interactions(ds) == [("1", "1", 10), ("2", "2", 11), ("1", "2", 12)]
    assert ds.item_texts == ["Heat (1995). genres: Action", "Odd (1995). genres: unknown"]


def test_missing_folder_names_file_and_hints(tmp_path: Path) -> None:
    message = error(load_ml100k, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "u.data") in message and "does not exist" in message
    assert "recsys data download ml-100k" in message and "--data-dir" in message
    message = error(load_dataset, "ml-1m", data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "ml-1m" / "ratings.dat") in message


def test_missing_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t1\t5\t10\n")
    message = error(load_ml100k, tmp_path)
    assert str(tmp_path / "u.item") in message and "recsys data download ml-100k" in message
    assert str(tmp_path / "news.tsv") in error(load_mind, tmp_path)
    assert str(tmp_path / "Toys_5.json.gz") in error(load_amazon2018, tmp_path, "Toys")
    assert str(tmp_path / "interactions.csv") in error(load_custom, tmp_path)


def test_malformed_u_data_row(tmp_path: Path) -> None:
    folder = fake_ml100k(tmp_path, "1\t1\t5\t10\n2\t2\t3\n1\t2\t4\t12\n")
    assert error(load_ml100k, folder) == f"{folder / 'u.data'}:2: expected 4 tab-separated fields, got 3"
    (folder / "u.data").write_text("1\t1\t5\t10\n2\t2\t3\t11\n1\t2\tfour\t12\n")
    assert f"{folder / 'u.data'}:3: expected integer" in error(load_ml100k, folder)


def test_malformed_u_item_and_movies_dat(tmp_path: Path) -> None:
    folder = fake_ml100k(tmp_path, "1\t1\t5\t10\n")
    (folder / "u.item").write_text("1|Heat (1995)|01-Jan-1995||http://x|0|1\n2|Odd (1995)|x\n")
    assert f"{folder / 'u.item'}:2: expected 7 '|'-separated fields, got 3" in error(load_ml100k, folder)
    (tmp_path / "movies.dat").write_text("1::Heat (1995)::Action\n2::Odd\n")
    (tmp_path / "ratings.dat").write_text("1::1::5::10\n")
    assert f"{tmp_path / 'movies.dat'}:2:" in error(load_ml1m, tmp_path)


def test_malformed_amazon_json_line(tmp_path: Path) -> None:
    write_gz(
        tmp_path / "Toys_5.json.gz",
        ['{"reviewerID": "u1", "asin": "A", "unixReviewTime": 1}', '{"reviewerID": "u2", "asin": '],
    )
    write_gz(tmp_path / "meta_Toys.json.gz", ['{"asin": "A", "title": "Toy"}'])
    message = error(load_amazon2018, tmp_path, "Toys")
    assert message.startswith(f"{tmp_path / 'Toys_5.json.gz'}:2: not a JSON object")
    write_gz(tmp_path / "Toys_5.json.gz", ['{"reviewerID": "u1", "unixReviewTime": 1}'])
    assert error(load_amazon2018, tmp_path, "Toys") == f"{tmp_path / 'Toys_5.json.gz'}:1: missing key 'asin'"
    (tmp_path / "Toys_5.json.gz").write_text("not gzip")
    assert str(tmp_path / "Toys_5.json.gz") in error(load_amazon2018, tmp_path, "Toys")


def test_malformed_mind_rows(tmp_path: Path) -> None:
    (tmp_path / "news.tsv").write_text("N1\tnews\tsub\tTitle\n")
    (tmp_path / "behaviors.tsv").write_text(
        "1\tU1\t11/11/2019 9:05:58 AM\t\tN1-1\n2\tU1\tyesterday\t\tN1-1\n"
    )
    assert error(load_mind, tmp_path).startswith(f"{tmp_path / 'behaviors.tsv'}:2: bad time 'yesterday'")
    (tmp_path / "behaviors.tsv").write_text("1\tU1\t11/11/2019 9:05:58 AM\t\tN1-2\n")
    assert error(load_mind, tmp_path).startswith(f"{tmp_path / 'behaviors.tsv'}:1: bad impression 'N1-2'")


def test_custom_wrong_header(tmp_path: Path) -> None:
    write_custom(tmp_path, "user,item,time\nu,i,1\n", "item_id,text\ni,x\n")
    message = error(load_custom, tmp_path)
    assert message.startswith(f"{tmp_path / 'interactions.csv'}:1: header must be user_id,item_id,timestamp")
    assert "missing user_id, item_id, timestamp" in message
    write_custom(tmp_path, "user_id,item_id,timestamp\nu,i,1\n", "item_id\ni\n")
    assert error(load_custom, tmp_path).startswith(f"{tmp_path / 'items.csv'}:1: header must be item_id,text")


def test_custom_bad_rows(tmp_path: Path) -> None:
    write_custom(tmp_path, "user_id,item_id,timestamp\nu,i,1\nu,i,last tuesday\n", "item_id,text\ni,x\n")
    assert error(load_custom, tmp_path).startswith(
        f"{tmp_path / 'interactions.csv'}:3: bad timestamp 'last tuesday'"
    )
    write_custom(tmp_path, "user_id,item_id,timestamp\nu,i\n", "item_id,text\ni,x\n")
    assert error(load_custom, tmp_path).startswith(f"{tmp_path / 'interactions.csv'}:2: expected 3")
    write_custom(tmp_path, "user_id,item_id,timestamp\nu,i,1\n", "item_id,text\ni,x\ni,y\n")
    assert error(load_custom, tmp_path).startswith(f"{tmp_path / 'items.csv'}:3: duplicate item_id 'i'")


def test_custom_empty_interactions(tmp_path: Path) -> None:
    write_custom(tmp_path, "user_id,item_id,timestamp\n", "item_id,text\ni,x\n")
    assert error(load_custom, tmp_path).startswith(f"{tmp_path / 'interactions.csv'}: no interactions")
    write_custom(tmp_path, "user_id,item_id,timestamp\nu,ghost,1\n", "item_id,text\ni,x\n")
    assert str(tmp_path / "interactions.csv") in error(load_custom, tmp_path)  # nothing left after dropping


# --- registry ----------------------------------------------------------------------------------------------


def test_unknown_dataset_suggests_a_name() -> None:
    message = error(load_dataset, "ml100k")
    assert message.startswith("unknown dataset 'ml100k' (did you mean 'ml-100k'?); known: synthetic, ml-100k")
    assert "(did you mean 'amazon2018:<Category>'?)" in error(load_dataset, "amazon:Books")
    assert "did you mean" not in error(load_dataset, "qwertyuiop")
    assert "category" in error(load_dataset, "amazon2018:../etc")


def test_list_datasets() -> None:
    assert list_datasets() == ["synthetic", "ml-100k", "ml-1m", "amazon2018:<Category>", "mind", "custom"]


def test_resolve_folder_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECSYS_DATA_DIR", raising=False)
    assert resolve_folder("ml-100k") == Path("data") / "ml-100k"
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path / "env"))
    assert resolve_folder("ml-1m") == tmp_path / "env" / "ml-1m"
    assert resolve_folder("mind", data_dir=tmp_path / "arg") == tmp_path / "arg" / "mind"
    assert resolve_folder("amazon2018:Books", data_dir=tmp_path) == tmp_path / "amazon2018"
    assert resolve_folder("ml-100k", path=tmp_path / "x", data_dir=tmp_path / "arg") == tmp_path / "x"
    assert "explicit path" in error(resolve_folder, "custom", data_dir=tmp_path)


def test_load_dataset_options_are_checked(tmp_path: Path) -> None:
    assert "min_rating" in error(load_dataset, "mind", path=tmp_path, min_rating=4)
    assert "synthetic" in error(load_dataset, "ml-100k", path=tmp_path, n_users=3)


def test_load_dataset_amazon_by_category() -> None:
    ds = load_dataset("amazon2018:Gift_Cards", path=shared("amazon-gift-cards"))
    assert ds.name == "amazon2018:Gift_Cards" and ds.n_items == 148


def test_synthetic_through_registry() -> None:
    pytest.importorskip("recsys.data.synthetic", reason="recsys/data/synthetic.py not written yet")
    ds = load_dataset("synthetic", seed=1, n_users=40, n_items=50, n_topics=5)
    assert isinstance(ds, RecDataset) and 0 < ds.n_users <= 40 and 0 < ds.n_items <= 50
    assert "bad option" in error(load_dataset, "synthetic", no_such_option=1)
