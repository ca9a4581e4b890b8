"""`recsys serve`: the controller with injected latencies, and real server processes on 127.0.0.1 serving tiny BERT
runs on synthetic data — answers equal to offline evaluation's top-k, bad requests refused with one line while the
server keeps serving, a switch under an injected delay and back, SIGTERM draining the requests in flight.

Nothing asserts a duration: counts, statuses, answers and the switch log only. Injected delays are far from the
thresholds they must cross (a tiny BERT answers in milliseconds; the delay is hundreds)."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.cli import main
from recsys.errors import RecsysError
from recsys.serving.client import ServerProcess
from recsys.serving.controller import Controller, ControllerSettings
from recsys.serving.requests import Catalog, RequestError, parse_request

REPO = Path(__file__).resolve().parents[1]
START_S = 240  # bound on a server's start-up (loading two tiny runs), not a measurement
_SERVERS = itertools.count()  # names this process's server logs


# --- the controller, with injected latencies ------------------------------------------------------------------


def settings(**kw) -> ControllerSettings:
    return ControllerSettings(**{"slo_ms": 100.0, "window": 8, "min_samples": 4, "down_at": 0.8, "up_at": 0.5,
                                 "max_utilization": 0.7, **kw})


def feed(c: Controller, latencies_ms, t0: float, gap_s: float, compute_ms: float = 1.0):
    """Requests arriving every `gap_s` from t0, each answered by the controller's current model after its latency."""
    switches, t = [], t0
    for lat in latencies_ms:
        sw = c.observe(c.current, lat, t, compute_ms, now_s=t + lat / 1000)
        if sw:
            switches.append(sw)
        t += gap_s
    return switches, t


def test_controller_moves_down_when_the_tail_crosses_the_slo_and_not_before():
    c = Controller(["big", "mid", "small"], settings())
    sw, t = feed(c, [90.0] * 3, 0.0, 0.1)  # over 0.8 × SLO, but fewer than min_samples
    assert sw == [] and c.model == "big"
    sw, t = feed(c, [90.0], t, 0.1)
    assert [(s.src, s.dst) for s in sw] == [("big", "mid")] and "p99" in sw[0].reason
    assert len(c.window) == 0  # the window restarts on the new model
    sw, t = feed(c, [50.0] * 20, t, 0.1)  # between up_at and down_at: stays
    assert sw == [] and c.model == "mid"


def test_controller_moves_down_at_once_when_the_arrivals_overload_the_model():
    # "big" costs 30 ms per request; at 50 arrivals/s its utilisation is 1.5: the queue grows without bound, so
    # the controller moves before the tail (here still below down_at × SLO) shows it
    c = Controller(["big", "mid", "small"], settings(window=64, min_samples=8))
    sw, t = feed(c, [40.0] * 7, 0.0, 0.02, compute_ms=30.0)
    assert sw == [] and c.model == "big"  # fewer than min_samples arrivals: the rate is not known yet
    sw, t = feed(c, [40.0], t, 0.02, compute_ms=30.0)
    assert [(s.src, s.dst) for s in sw] == [("big", "mid")] and "utilisation 1.50 > 1" in sw[0].reason
    # "mid" at 15 ms per request: utilisation 0.75, between max_utilization and overload_at — it stays
    sw, t = feed(c, [40.0] * 30, t, 0.02, compute_ms=15.0)
    assert sw == [] and c.model == "mid"
    # without an SLO nothing is held: an overloaded model is not replaced
    none = Controller(["big", "small"], settings(slo_ms=float("inf")))
    assert feed(none, [40.0] * 30, 0.0, 0.02, compute_ms=30.0)[0] == [] and none.model == "big"


def test_controller_never_moves_past_either_end():
    c = Controller(["big", "small"], settings())
    feed(c, [500.0] * 30, 0.0, 0.01)
    assert c.model == "small" and len(c.switches) == 1
    one = Controller(["only"], settings())
    assert feed(one, [500.0] * 30, 0.0, 0.01)[0] == [] and one.model == "only"


def test_controller_moves_back_only_when_the_slower_model_fits_the_load():
    # "big" costs 60 ms of compute per request: at 20 arrivals/s it would be busy 120% of the time
    c = Controller(["big", "small"], settings())
    _, t = feed(c, [200.0] * 4, 0.0, 0.05, compute_ms=60.0)
    assert c.model == "small"
    sw, t = feed(c, [5.0] * 40, t, 0.05, compute_ms=2.0)  # fast, but the load is too much for "big"
    assert sw == [] and c.model == "small"
    sw, t = feed(c, [5.0] * 8, t + 5, 1.0, compute_ms=2.0)  # 1 arrival/s: big's utilisation 0.06
    assert [(s.src, s.dst) for s in sw] == [("small", "big")] and "utilisation" in sw[0].reason
    assert [s.dst for s in c.switches] == ["small", "big"]


def test_controller_ignores_requests_that_arrived_before_a_switch():
    c = Controller(["big", "small"], settings())
    feed(c, [300.0] * 4, 0.0, 0.01)
    assert c.model == "small"
    switch_at = c.since_s
    # the backlog queued behind "big", answered by "small" after the switch: not the new model's doing
    for i in range(10):
        c.observe(1, 400.0, switch_at - 0.2 + i * 0.01, 1.0, now_s=switch_at + 0.2)
    assert len(c.window) == 0 and c.model == "small"


def test_controller_batch_observation_counts_every_request():
    c = Controller(["big", "small"], settings(min_samples=4))
    assert c.observe_batch(0, [0.0, 0.001, 0.002], 0.01, 3.0) is None and len(c.window) == 3
    assert c.service_ms[0] == pytest.approx(1.0)
    assert c.observe_batch(0, [0.003], 0.5, 1.0).dst == "small"  # its p99 (497 ms) crosses the SLO


# --- request validation (what the front refuses before anything is queued) ----------------------------------


CATALOG = Catalog(["i0", "i1", "i2", "i3"], ["u0", "u1"], [np.array([0, 1]), np.array([2])])


@pytest.mark.parametrize("body, status, needle", [
    (b"{", 400, "malformed JSON at line 1"),
    (b"\xff", 400, "not UTF-8"),
    (b"[]", 400, "expected a JSON object"),
    (b'{"k": 3}', 422, "user: missing"),
    (b'{"user": "u9"}', 422, "unknown user id 'u9'"),
    (b'{"user": "u0", "k": 0}', 422, "k: 0 is out of range"),
    (b'{"user": "u0", "k": 5}', 422, "k: 5 is out of range (1 ≤ k ≤ 4"),
    (b'{"user": "u0", "k": "3"}', 422, "k: expected an integer"),
    (b'{"user": "u0", "k": true}', 422, "k: expected an integer"),
    (b'{"user": "u0", "history": []}', 422, "history: empty"),
    (b'{"user": "u0", "history": "i1"}', 422, "history: expected a list"),
    (b'{"user": "u0", "history": ["i1", "zz"]}', 422, "history[1]: unknown item id 'zz'"),
    (b'{"user": "u0", "history": [{"id": 1}]}', 422, "history[0]: expected an id"),
    (b'{"user": "u0", "items": 3}', 422, "unknown field 'items'"),
])
def test_bad_requests_are_refused_with_one_line(body, status, needle):
    with pytest.raises(RequestError) as e:
        parse_request(body, CATALOG)
    assert e.value.status == status and needle in e.value.message and "\n" not in e.value.message


def test_a_request_without_history_reads_the_users_known_history():
    assert parse_request(b'{"user": "u0"}', CATALOG) == {"user": 0, "user_id": "u0", "history": [0, 1], "k": 4}
    assert parse_request(b'{"user": "u1", "history": ["i3", "i0"], "k": 2}', CATALOG)["history"] == [3, 0]
    numeric = Catalog(["10", "20"], ["7"], [np.array([0])])  # MovieLens ids are numbers: JSON numbers are accepted
    assert parse_request(b'{"user": 7, "history": [20]}', numeric)["history"] == [1]


# --- bad input through the CLI (nothing starts) ---------------------------------------------------------------


def test_serve_bad_input_is_one_line(runs, capsys, tmp_path):
    a, b = (str(r) for r in runs)
    cases = [([], "give at least one RUN"),
             ([str(tmp_path / "nope")], "run not found"),
             ([a, b], "give --slo-ms"),
             ([a, "--slo-ms", "-5"], "--slo-ms must be > 0"),
             ([a, "--port", "80"], "--port: 80 is not a port"),
             ([a, "--index", "hnws"], "unknown index 'hnws'"),
             ([a, "--up-at", "0.9"], "must be below down_at"),
             ([a, "--inject-delay-ms", "x=5"], "no served run is named 'x'"),
             ([a, "--inject-delay-ms", "a"], "expected RUN_NAME=MILLISECONDS"),
             ([a, a, "--slo-ms", "50"], "two runs are named 'a'"),
             ([f"{a}:data.user_max_tokens", "--slo-ms", "50"], None),  # a colon without '=' is part of the path
             ([str(tmp_path / "study"), "--from-study", str(tmp_path)], "pareto.csv not found")]
    for argv, needle in cases:
        assert main(["serve", *argv]) == 2, argv
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        if needle:
            assert needle in lines[0], (argv, lines[0])


# --- real servers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """Two tiny BERT runs on the synthetic data; `b` reads shorter user texts (another model, same catalog)."""
    from conftest import tiny_run_args, train_run
    root = tmp_path_factory.mktemp("serve_runs")
    args = tiny_run_args(tiny_model, root)
    return train_run(args, root, "a"), train_run(args, root, "b", "data.user_max_tokens=16", "train.seed=1")


class Server(ServerProcess):
    """`recsys serve …` as a real process on 127.0.0.1 (one torch thread, offline), up once /health answers."""

    def __init__(self, *argv: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
        log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
        super().__init__([*argv, "--threads", "1"], log_dir / f"recsys-serve-{os.getpid()}-{next(_SERVERS)}.log",
                         cwd=REPO, env=env)
        try:
            self.wait_healthy(START_S)
        except RecsysError as e:
            raise AssertionError(f"{e}\n{self.output()}") from None


@pytest.fixture(scope="module")
def server(runs):
    s = Server(*(str(r) for r in runs), "--slo-ms", "60000", "--max-batch", "4", "--batch-timeout-ms", "5")
    yield s
    s.stop()


def test_server_process_that_dies_is_one_line_naming_its_log(tmp_path):
    """A server that exits before /health (a run folder that does not exist): one RecsysError line naming the log."""
    log = tmp_path / "serve.log"
    with ServerProcess([str(tmp_path / "missing-run")], log, name="bad", cwd=REPO) as s:
        with pytest.raises(RecsysError) as e:
            s.wait_healthy(START_S)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("bad: the server exited (2)") and str(log) in msg, msg
        assert s.proc.poll() == 2 and "error: " in s.output()


def offline_topk(run: Path, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The offline evaluation's top-k on the test stage (its scorer, its history mask): ids [U, k], scores."""
    from recsys.data.registry import load_data
    from recsys.models.encoder import load_tokenizer, resolve_model_path
    from recsys.models.tower import tower_scorers
    from recsys.retrieval.evaluate import history_mask
    from recsys.runs import load_run

    cfg, module = load_run(run)
    ds, split = load_data(cfg.data)
    scorer = tower_scorers(module.user_tower, module.item_tower, load_tokenizer(resolve_model_path(cfg.model.encoder)),
                           ds.item_texts, split, cfg.data, ("test",), progress=False)["test"]
    with torch.inference_mode():
        scores = scorer(users).masked_fill(history_mask(split, users, "test"), float("-inf"))
    top = torch.topk(scores, k, dim=1)
    return top.indices.numpy(), top.values.numpy(), ds, split


def test_answers_equal_the_offline_evaluations_top_k(server, runs):
    status, metrics = server.get("/metrics")
    first = metrics["order"][0]  # the most accurate on validation serves (the SLO is never at risk here)
    run = next(r for r in runs if r.name == first)
    from recsys.data.registry import load_data
    from recsys.runs import run_config
    users = load_data(run_config(run).data)[1].eval_users[:12]
    ids, scores, ds, split = offline_topk(run, users, 10)
    answers = {}

    def ask(u):
        answers[u] = server.post("/predict", {"user": ds.user_ids[u], "k": 10})

    threads = [threading.Thread(target=ask, args=(int(u),)) for u in users]  # concurrent: batches form
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for row, u in enumerate(users):
        status, body = answers[int(u)]
        assert status == 200 and body["model"] == first and body["user"] == ds.user_ids[u], body
        assert body["items"] == [ds.item_ids[i] for i in ids[row]]
        np.testing.assert_allclose(body["scores"], scores[row], atol=1e-5)
    # the same user with the history given explicitly (item ids): the same answer
    u = int(users[0])
    history = [ds.item_ids[i] for i in split.history(u, "test")]
    status, body = server.post("/predict", {"user": ds.user_ids[u], "history": history, "k": 3})
    assert status == 200 and body["items"] == [ds.item_ids[i] for i in ids[0][:3]]
    status, metrics = server.get("/metrics")
    assert metrics["models"][first]["served"] >= len(users) + 1 and metrics["models"][first]["p99_ms"] > 0
    assert metrics["in_flight"] == 0 and metrics["batching"] == {"max_batch": 4, "batch_timeout_ms": 5.0}


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    user = "u1"
    bad = [(b"{not json", 400), (b"[1, 2]", 400), (json.dumps({"user": "nobody"}).encode(), 422),
           (json.dumps({"user": user, "k": 0}).encode(), 422), (json.dumps({"user": user, "k": 10**6}).encode(), 422),
           (json.dumps({"user": user, "history": ["no-such-item"]}).encode(), 422),
           (b'{"user": "' + b"x" * 70000 + b'"}', 413)]
    for body, expected in bad:
        status, answer = server.post("/predict", body)
        assert status == expected, (body[:40], status, answer)
        assert isinstance(answer.get("detail"), str) and "\n" not in answer["detail"]
    assert server.post("/predict", b'{"user": "u1"}', content_type="application/x-www-form-urlencoded")[0] == 200
    assert server.get("/predict")[0] == 405
    status, body = server.post("/predict", {"user": user, "k": 2})
    assert status == 200 and len(body["items"]) == 2
    status, metrics = server.get("/metrics")
    by = metrics["requests"]["by_status"]
    assert by["400"] >= 2 and by["422"] >= 4 and by["413"] >= 1 and server.proc.poll() is None


def test_controller_switches_under_an_injected_delay_and_back(runs, server):
    # the most accurate run is slowed by 800 ms a batch: over 0.8 × the 400 ms SLO → the faster run; the faster
    # run's answers (milliseconds) are far below 0.5 × SLO → back (the utilisation test is all but off here: the
    # unit tests above exercise it)
    order = server.get("/metrics")[1]["order"]
    slow, fast = order
    s = Server(*(str(r) for r in runs), "--slo-ms", "400", "--window", "8", "--min-samples", "3",
               "--max-utilization", "100", "--overload-at", "1000", "--inject-delay-ms", f"{slow}=800",
               "--index", "flat")
    try:
        served = []
        for _ in range(3):
            status, body = s.post("/predict", {"user": "u1", "k": 5})
            assert status == 200
            served.append(body["model"])
        assert served == [slow] * 3
        for _ in range(12):
            status, body = s.post("/predict", {"user": "u1", "k": 5})
            served.append(body["model"])
            if len(served) > 4 and body["model"] == slow:
                break
            time.sleep(0.3)  # the offered load, not a measurement
        assert served[3] == fast and served[-1] == slow, served
        switches = s.get("/metrics")[1]["controller"]["switches"]
        assert [(w["src"], w["dst"]) for w in switches[:2]] == [(slow, fast), (fast, slow)], switches
        assert "> 0.8 × SLO 400 ms" in switches[0]["reason"] and "utilisation" in switches[1]["reason"]
        log = s.output()
        assert f"switch {slow} → {fast}" in log and f"switch {fast} → {slow}" in log
        # through faiss (flat) the run answers as the exact server does
        query = {"user": "u3", "k": 4}
        assert s.post("/predict", query)[1] == server.post("/predict", query)[1]
    finally:
        assert s.stop() == 0, s.output()


def test_sigterm_drains_requests_in_flight(runs):
    s = Server(str(runs[0]), "--inject-delay-ms", "a=1500")
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(s.post("/predict", {"user": "u1", "k": 3})))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for _ in range(2000):  # until all three are in the server (a bounded count, not a timing)
            if s.get("/metrics")[1]["in_flight"] == 3:
                break
            time.sleep(0.01)
        assert s.get("/metrics")[1]["in_flight"] == 3
        s.proc.send_signal(signal.SIGTERM)
        for _ in range(2000):
            if s.get("/health")[0] == 503:
                break
            time.sleep(0.01)
        # the first request takes 1.5 s, the last 4.5 s: still draining
        status, body = s.post("/predict", {"user": "u1", "k": 3})
        assert status == 503 and "shutting down" in body["detail"]
        for t in threads:
            t.join(timeout=120)
        assert [r[0] for r in results] == [200, 200, 200] and all(len(r[1]["items"]) == 3 for r in results)
        assert s.proc.wait(timeout=120) == 0
        assert "draining 3 request(s) in flight" in s.output() and "drained; stopping" in s.output()
    finally:
        s.stop()


@pytest.mark.slow
def test_serve_load_benchmark_end_to_end(runs, tmp_path):
    """experiments/serve_load.py at toy size: three servers, two rates, every answer scored, the JSON its schema."""
    from recsys.tracking.schemas import problems
    a, b = (str(r) for r in runs)
    out = tmp_path / "serve_load.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "experiments/serve_load.py", "--dense", a, "--runs", b,
                           f"{a}:data.user_max_tokens=8", "--smoke", "--rates", "0.5,2", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert problems("serve_load.json", data) == []
    assert set(data["servers"]) == {"dense", "fast", "switching"} and len(data["rows"]) == 6
    names = {c["name"] for c in data["candidates"]}
    assert data["dense"] == "a" and data["fast"] in names and set(data["front"]) <= names
    for row in data["rows"]:
        assert row["requests"] > 0 and 0 <= row["over_slo_share"] <= 1
        assert 0 <= row["effective_ndcg@10"] <= (row["ndcg@10_answered"] or 0) <= 1
        assert set(row["model_share"]) <= names
        assert not row["answered"] or abs(sum(row["model_share"].values()) - 1) < 1e-9
    assert set(data["bar"]) == {"bar"} and data["hardware"]["cpu"]


def _serve_load_fixture() -> dict:
    def row(server, x, p99, over, eff, share):
        return {"server": server, "rate_x": x, "offered_per_s": 30.0 * x, "achieved_per_s": 29.0 * x, "p50_ms": p99 / 2,
                "p95_ms": 0.8 * p99, "p99_ms": p99, "over_slo_share": over, "effective_ndcg@10": eff,
                "ndcg@10_answered": 0.075, "model_share": share, "requests": 100}
    rows = [row("dense", x, 40 * x * x, min(1.0, 0.3 * x), 0.075 * (1 - min(1.0, 0.3 * x)), {"dense": 1.0})
            for x in (0.5, 1, 2)]
    rows += [row("switching", x, 50.0, 0.01, 0.073, {"dense": 1 - x / 3, "fast": x / 3}) for x in (0.5, 1, 2)]
    servers = {s: {"rates": [r for r in rows if r["server"] == s], "switches": []} for s in ("dense", "switching")}
    return {"slo_ms": 60.0, "capacity_per_s": 30.0, "unloaded": {"p50_ms": 25.0, "p99_ms": 30.0, "ndcg@10": 0.075},
            "dense": "dense", "fast": "fast", "front": ["dense", "fast"], "servers": servers, "rows": rows,
            "bar": {"bar": {"met": True}}, "hardware": {"cpu": "fixture", "logical_cpus": 2}}


def test_serve_load_notebook_draws_its_figure(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    from recsys.tracking.schemas import problems
    data = _serve_load_fixture()
    assert problems("serve_load.json", data) == []
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "serve_load.json").write_text(json.dumps(data))
    nb = nbformat.read(REPO / "notebooks" / "serve_load.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(REPO / "notebooks")}}).execute(
        env={**os.environ, "RECSYS_RESULTS": str(tmp_path)})
    png = tmp_path / "figures" / "serve_load.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "text/html" in o.get("data", {})]
    assert html and "switching" in html[0] and "dense" in html[0]
