"""The load-aware controller of `recsys serve`: which model of an accuracy-ordered front serves the next batch.

Models are ordered most accurate first. Each answered request reports what it cost (`observe`): its latency in
the server (arrival at the HTTP front → answer ready: queueing, batching wait and compute), its queue delay and
its share of the batch's compute time. The controller keeps a sliding window of the latencies of the model now
serving and, once the window holds `min_samples` requests,

- moves to the next *faster* model when the window's p99 exceeds `down_at` × SLO (the SLO is at risk), or at
  once — before the tail shows it — when the serving model's measured service time at the measured arrival rate
  puts its utilisation above `overload_at` (ρ ≥ 1: its queue grows without bound, so every request from now on
  waits longer than the last; waiting for `min_samples` of them to cross the SLO only deepens the backlog the
  faster model inherits), and
- moves back to the next *more accurate* model when the window's p99 is below `up_at` × SLO **and** that model's
  measured service time at the measured arrival rate would keep its utilisation below `max_utilization` (so a
  load the more accurate model cannot carry never tempts the controller back: no probing, no flapping).

Hysteresis comes from the gap between `down_at` and `up_at`, the utilisation test, and the window restarting at
every switch (each decision is made on requests that arrived after it and were served by the new model). Every
switch is returned as a `Switch` with the numbers that caused it, for the server to log.

This is the per-query model-variant selection of INFaaS (Romero et al., ATC'21) and the accuracy scaling of
Proteus (Ahmad et al., ASPLOS'24), reduced to one replica and a feedback rule on the measured tail.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ControllerSettings:
    """Thresholds of the controller (`recsys.config.ServeConfig` carries and validates them)."""

    slo_ms: float  # the p99 latency target
    window: int = 64  # latest requests of the serving model whose p99 is watched
    min_samples: int = 16  # requests on a model before the controller decides again (the window restarts at a switch)
    down_at: float = 0.8  # p99 > down_at × SLO: the SLO is at risk → the next faster model
    up_at: float = 0.5  # p99 < up_at × SLO (and the slower model fits the load) → the next more accurate model
    max_utilization: float = 0.7  # the more accurate model's predicted utilisation (rate × service time) must be below
    overload_at: float = 1.0  # the serving model's predicted utilisation above which it moves down at once


@dataclass(frozen=True)
class Switch:
    """One move along the front, with the numbers that decided it."""

    at_s: float  # time.monotonic() of the decision
    src: str
    dst: str
    reason: str  # one line, e.g. "p99 312.0 ms > 0.8 × SLO 250 ms over 64 requests"
    p99_ms: float
    rate_per_s: float
    requests: int  # requests in the window it was decided on

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"switch {self.src} → {self.dst}: {self.reason} (arrivals {self.rate_per_s:.1f}/s)"


class Controller:
    """Chooses the serving model among `models` (names, most accurate first) to hold `settings.slo_ms` at p99."""

    EWMA = 0.2  # weight of the newest batch in a model's service-time estimate

    def __init__(self, models: list[str], settings: ControllerSettings):
        if not models:
            raise ValueError("a controller needs at least one model")
        self.models, self.s = list(models), settings
        self.current = 0
        self.window: deque[float] = deque(maxlen=settings.window)  # latencies [ms] of the current model
        self.arrivals: deque[float] = deque(maxlen=settings.window)  # arrival times [s] of all recent requests
        self.service_ms: list[float | None] = [None] * len(models)  # per-request compute [ms], per model
        self.switches: list[Switch] = []
        self.since_s = float("-inf")  # the last switch: requests that arrived before it waited behind the old model

    @property
    def model(self) -> str:
        return self.models[self.current]

    def p99(self) -> float:
        return float(np.percentile(np.fromiter(self.window, float), 99)) if self.window else 0.0

    def rate(self) -> float:
        """Arrivals per second over the latest `window` requests (0 until two have arrived)."""
        if len(self.arrivals) < 2:
            return 0.0
        span = self.arrivals[-1] - self.arrivals[0]
        return (len(self.arrivals) - 1) / span if span > 0 else float("inf")

    def observe_batch(self, model: int, arrivals_s: list[float], done_s: float, compute_ms: float) -> Switch | None:
        """A batch of requests (arrival times, time.monotonic()) answered by `model` at `done_s` after
        `compute_ms` of compute: record each request's latency and decide. Returns the switch, if any."""
        n = len(arrivals_s)
        if not n:
            return None
        per_request = compute_ms / n
        old = self.service_ms[model]
        self.service_ms[model] = per_request if old is None else (1 - self.EWMA) * old + self.EWMA * per_request
        self.arrivals.extend(sorted(arrivals_s))
        if model == self.current:  # a batch that started before a switch says nothing about the new model
            self.window.extend((done_s - a) * 1000 for a in arrivals_s if a >= self.since_s)
        return self.decide(done_s)

    def observe(self, model: int, latency_ms: float, arrival_s: float, compute_ms: float,
                now_s: float | None = None) -> Switch | None:
        """One request (latency, arrival time, its compute) answered by `model` — `observe_batch` of one."""
        return self.observe_batch(model, [arrival_s], arrival_s + latency_ms / 1000 if now_s is None else now_s,
                                  compute_ms)

    def decide(self, now_s: float) -> Switch | None:
        s, n = self.s, len(self.window)
        rate, service = self.rate(), self.service_ms[self.current]
        faster = self.current < len(self.models) - 1 and s.slo_ms != float("inf")  # no SLO: nothing to hold
        util = None if service is None else rate * service / 1000
        if faster and util is not None and len(self.arrivals) >= s.min_samples and util > s.overload_at:
            reason = (f"{self.model}'s utilisation {util:.2f} > {s.overload_at:g} "
                      f"({rate:.1f} arrivals/s × {service:.1f} ms per request)")
            return self._switch(self.current + 1, now_s, reason, self.p99(), rate)
        if n < s.min_samples:
            return None
        p99 = self.p99()
        if p99 > s.down_at * s.slo_ms and faster:
            reason = f"p99 {p99:.1f} ms > {s.down_at:g} × SLO {s.slo_ms:g} ms over {n} requests"
            return self._switch(self.current + 1, now_s, reason, p99, rate)
        if p99 < s.up_at * s.slo_ms and self.current > 0:
            up = self.current - 1
            service = self.service_ms[up]
            util = None if service is None else rate * service / 1000
            if util is None or util < s.max_utilization:
                fits = "not measured yet" if util is None else f"{util:.2f} < {s.max_utilization:g}"
                reason = (f"p99 {p99:.1f} ms < {s.up_at:g} × SLO {s.slo_ms:g} ms over {n} requests, "
                          f"{self.models[up]}'s predicted utilisation {fits}")
                return self._switch(up, now_s, reason, p99, rate)
        return None

    def _switch(self, dst: int, now_s: float, reason: str, p99: float, rate: float) -> Switch:
        sw = Switch(now_s, self.models[self.current], self.models[dst], reason, p99, rate, len(self.window))
        self.current, self.since_s = dst, now_s
        self.window.clear()
        self.switches.append(sw)
        return sw

    def state(self) -> dict:
        """What /metrics reports of the controller."""
        return {"model": self.model, "slo_ms": self.s.slo_ms, "window_p99_ms": self.p99(),
                "window_requests": len(self.window), "arrival_rate_per_s": self.rate(),
                "service_ms": dict(zip(self.models, self.service_ms, strict=True)), "switches": len(self.switches)}
