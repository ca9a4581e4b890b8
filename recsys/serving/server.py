"""The HTTP service of `recsys serve`, on LitServe: one model worker holds every run of the front and a load-aware
controller (`recsys.serving.controller`) that picks, per batch, which run answers; the HTTP front validates,
measures and drains.

Processes (LitServe's): this one (the manager; SIGTERM lands here), one uvicorn API server process, one
inference worker. The worker builds the runs (`load` — a picklable callable from `recsys.recipes.serve`, so this
layer never reads run folders), warms each up, and answers batches of up to `max_batch` requests
(LitServe's dynamic batching: `max_batch_size`, `batch_timeout`).

The front (`Front`, an ASGI middleware inside the API server, in front of LitServe's routes):
- `POST /predict`: body at most `max_body_bytes` (413), validated against the catalog (`recsys.serving.requests`:
  400 / 422, one line), stamped with its arrival time (time.monotonic(), one clock for every process of this
  machine) and only then queued: a bad request never reaches — or fails — a batch of good ones. While draining,
  new requests get 503.
- `GET /metrics`: requests by status, in flight, queued for the worker, per model the requests it served and
  their p50 / p99 (end to end, over the latest `LATENCY_WINDOW`), the controller's model and every switch so far.
- `GET /health`: LitServe's (200 once the worker is ready; 503 while draining).
SIGTERM: stop taking requests (503), wait until every request in flight has been answered (at most
`drain_timeout_s`), then shut LitServe down.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from typing import Callable

import litserve as ls
import numpy as np
from starlette.responses import JSONResponse

from recsys.config import ServeConfig
from recsys.errors import RecsysError
from recsys.serving.controller import Controller, ControllerSettings
from recsys.serving.requests import Catalog, RequestError, parse_request

LATENCY_WINDOW = 2048  # latest requests per model whose percentiles /metrics reports
PREDICT = "/predict"
_CTX = mp.get_context("spawn")  # LitServe spawns its worker: shared objects must be made for that


def log(message: str) -> None:
    print(f"recsys serve: {message}", file=sys.stderr, flush=True)


class Shared:
    """What the manager, the API server and the worker share: draining flag, requests in flight, the serving
    model (index), the switch log and a worker's start-up error."""

    def __init__(self):
        self.draining = _CTX.Event()
        self.in_flight = _CTX.Value("i", 0)
        self.model = _CTX.Value("i", 0)
        self.switches = _CTX.Queue()
        self.setup_error = _CTX.Queue()


class RecommendAPI(ls.LitAPI):
    """The model worker: every run of the front (most accurate first) and the controller choosing among them."""

    def __init__(self, load: Callable[[], list], names: list[str], item_ids: list[str], cfg: ServeConfig,
                 shared: Shared, inject_delay_ms: dict[str, float] | None = None):
        super().__init__(max_batch_size=cfg.max_batch, batch_timeout=cfg.batch_timeout_ms / 1000)
        self.load, self.names, self.item_ids, self.cfg, self.shared = load, names, item_ids, cfg, shared
        self.inject_delay_s = [((inject_delay_ms or {}).get(n, 0.0)) / 1000 for n in names]

    def setup(self, device):
        import torch

        from recsys.tracking.quiet import quiet_third_party
        quiet_third_party()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        try:
            self.models = self.load()
        except RecsysError as e:  # one line in the manager, no traceback from LitServe's worker
            self.shared.setup_error.put(str(e))
            logging.getLogger("litserve.loops.loops").setLevel(logging.CRITICAL)
            raise
        if [m.name for m in self.models] != self.names:
            raise RuntimeError(f"the worker loaded {[m.name for m in self.models]}, expected {self.names}")
        for m in self.models:  # first-call costs (allocations, lazy inits) before any request is timed
            m.recommend([np.arange(3)], [10])
        slo = self.cfg.slo_ms or float("inf")
        c = self.cfg
        self.controller = Controller(self.names, ControllerSettings(slo, c.window, c.min_samples, c.down_at,
                                                                    c.up_at, c.max_utilization,
                                                                    c.overload_at))

    def decode_request(self, request):
        return request  # validated and normalised by the front

    def predict(self, x):
        requests = x if isinstance(x, list) else [x]
        start = time.monotonic()
        index = self.controller.current
        model = self.models[index]
        if self.inject_delay_s[index]:  # fault injection (tests, drills): this model is slow
            time.sleep(self.inject_delay_s[index])
        answers = model.recommend([r["history"] for r in requests], [r["k"] for r in requests])
        done = time.monotonic()
        switch = self.controller.observe_batch(index, [r["arrival"] for r in requests], done, (done - start) * 1000)
        if switch is not None:
            log(switch.line())
            self.shared.model.value = self.controller.current
            self.shared.switches.put(switch.to_dict())
        out = [{"user": r["user_id"], "items": [self.item_ids[i] for i in ids.tolist()],
                "scores": [round(float(s), 6) for s in scores], "model": model.name}
               for r, (ids, scores) in zip(requests, answers, strict=True)]
        return out if isinstance(x, list) else out[0]

    def encode_response(self, output):
        return output

    def health(self) -> bool:  # called in the API server: not ready while draining
        return not self.shared.draining.is_set()


class Metrics:
    """Request counts and per-model latencies, kept by the API server process."""

    def __init__(self, names: list[str]):
        self.status: dict[int, int] = {}
        self.served = {n: 0 for n in names}
        self.latency = {n: deque(maxlen=LATENCY_WINDOW) for n in names}
        self.switches: list[dict] = []

    def record(self, status: int, model: str | None, latency_ms: float) -> None:
        self.status[status] = self.status.get(status, 0) + 1
        if model in self.served:
            self.served[model] += 1
            self.latency[model].append(latency_ms)

    def report(self, names: list[str], shared: Shared, queued: int | None, cfg: ServeConfig) -> dict:
        while True:
            try:
                self.switches.append(shared.switches.get_nowait())
            except (queue.Empty, OSError, ValueError):
                break
        models = {}
        for n in names:
            lat = np.fromiter(self.latency[n], float)
            models[n] = {"served": self.served[n],
                         **{f"p{q}_ms": float(np.percentile(lat, q)) if len(lat) else None for q in (50, 99)}}
        total = sum(self.status.values())
        return {"requests": {"total": total, "by_status": {str(k): v for k, v in sorted(self.status.items())}},
                "in_flight": shared.in_flight.value, "queued": queued, "draining": shared.draining.is_set(),
                "models": models, "order": names,
                "controller": {"model": names[shared.model.value], "slo_ms": cfg.slo_ms, "switches": self.switches},
                "batching": {"max_batch": cfg.max_batch, "batch_timeout_ms": cfg.batch_timeout_ms},
                "latency_window": LATENCY_WINDOW}


class Front:
    """ASGI middleware in the API server: limits, validation, arrival stamps, metrics and draining."""

    def __init__(self, app, *, catalog: Catalog, names: list[str], cfg: ServeConfig, shared: Shared,
                 server_ref: dict):
        self.app, self.catalog, self.names, self.cfg, self.shared = app, catalog, names, cfg, shared
        self.server_ref = server_ref
        self.metrics = Metrics(names)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path == "/metrics" and method == "GET":
            return await JSONResponse(self.metrics.report(self.names, self.shared, self._queued(), self.cfg))(
                scope, receive, send)
        if path != PREDICT or method != "POST":
            return await self.app(scope, receive, send)
        with self.shared.in_flight.get_lock():
            self.shared.in_flight.value += 1
        try:
            await self._predict(scope, receive, send)
        finally:
            with self.shared.in_flight.get_lock():
                self.shared.in_flight.value -= 1

    async def _predict(self, scope, receive, send):
        arrival = time.monotonic()
        if self.shared.draining.is_set():
            return await self._refuse(scope, receive, send, 503, "the server is shutting down (SIGTERM): not taking "
                                                                 "new requests")
        body = await self._body(scope, receive, send)
        if body is None:
            return
        try:
            request = parse_request(body, self.catalog)
        except RequestError as e:
            return await self._refuse(scope, receive, send, e.status, e.message)
        payload = json.dumps({**request, "arrival": arrival}).encode()
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()

        status, chunks = 500, []

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self._record(status, b"".join(chunks), arrival)
            await send(message)

        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")]
        await self.app({**scope, "headers": headers}, replay, capture)

    async def _body(self, scope, receive, send) -> bytes | None:
        limit = self.cfg.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"request body over {limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, 413, too_big)
            return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, 413, too_big)
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _refuse(self, scope, receive, send, status: int, message: str):
        self.metrics.record(status, None, 0.0)
        await JSONResponse({"detail": message}, status_code=status)(scope, receive, send)

    def _record(self, status: int, body: bytes, arrival: float) -> None:
        model = None
        if status == 200:
            try:
                model = json.loads(body).get("model")
            except (ValueError, AttributeError):
                model = None
        self.metrics.record(status, model, (time.monotonic() - arrival) * 1000)

    def _queued(self) -> int | None:
        server = self.server_ref.get("server")
        try:
            return int(server.litapi_request_queues[PREDICT].qsize())
        except Exception:  # before LitServe made its queues, or a platform without qsize
            return None


def drain_on_sigterm(server: ls.LitServer, shared: Shared, timeout_s: float) -> None:
    """On SIGTERM: refuse new requests, wait (≤ timeout_s) for those in flight to be answered, stop LitServe."""
    started, manager = threading.Event(), os.getpid()

    def drain():
        shared.draining.set()
        n0 = shared.in_flight.value
        log(f"SIGTERM: draining {n0} request(s) in flight, refusing new ones")
        deadline = time.monotonic() + timeout_s
        while shared.in_flight.value > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        left = shared.in_flight.value
        log("drained; stopping" if left == 0 else f"drain timed out after {timeout_s:g} s with {left} in flight; "
                                                  "stopping")
        server._shutdown_event.set()  # what LitServe's own /shutdown does

    def on_sigterm(signum, frame):
        if os.getpid() != manager:  # LitServe's forked API server inherits this handler; uvicorn handles its own
            return
        if not started.is_set():
            started.set()
            threading.Thread(target=drain, name="recsys-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)


def run_server(load: Callable[[], list], names: list[str], catalog: Catalog, cfg: ServeConfig, port: int,
               inject_delay_ms: dict[str, float] | None = None) -> None:
    """Serve the runs `load` builds (named `names`, most accurate first) on 127.0.0.1:`port` until SIGTERM
    (drained) or Ctrl-C."""
    shared = Shared()
    server_ref: dict = {}
    api = RecommendAPI(load, names, catalog.item_ids, cfg, shared, inject_delay_ms)
    front = (Front, {"catalog": catalog, "names": names, "cfg": cfg, "shared": shared, "server_ref": server_ref})
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=cfg.queue_timeout_s,
                          middlewares=[front], disable_openapi_url=True)
    server_ref["server"] = server
    drain_on_sigterm(server, shared, cfg.drain_timeout_s)
    log(f"loading {len(names)} run(s) ({', '.join(names)}); http://127.0.0.1:{port}/health answers 200 once "
        "they are ready")
    try:
        server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False,
                   num_api_servers=1)
    except RuntimeError as e:
        if "failed to start" not in str(e):
            raise
        try:
            reason = shared.setup_error.get(timeout=1)
        except queue.Empty:
            reason = "see the worker's error above"
        raise RecsysError(f"the model worker failed to start: {reason}") from None
