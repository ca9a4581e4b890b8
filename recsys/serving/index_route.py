"""The online request through a retrieval index: user tower at batch 1 (served by its route) + an index search,
the BLAS kernels faiss runs on, and the index latency model calibrated on this machine.

faiss-cpu's wheels bundle their own OpenBLAS, which picks its kernels from the CPU it detects at load time; in a VM
it can detect an older core than the machine has (here: "Zen", AVX2 kernels, on an AVX-512 EPYC). `set_blas_coretype`
sets OPENBLAS_CORETYPE from the CPU's flags before faiss is imported (it has no effect afterwards) and `blas_info`
reports what each loaded BLAS chose (threadpoolctl), so a benchmark records the kernels it was timed with.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from recsys.config import RetrievalConfig, parse_index_spec
from recsys.efficiency.index_cost import IndexLatencyModel, fit, index_work, load_model, save_model
from recsys.efficiency.latency import exclusive, measure, threads
from recsys.efficiency.predictor import device_key
from recsys.retrieval.index import ItemIndex, build_index, set_search_params
from recsys.serving.routes import user_call
from recsys.tracking.records import cpu_flags


def set_blas_coretype() -> str | None:
    """OPENBLAS_CORETYPE for this CPU (SkylakeX with AVX-512, Haswell with AVX2), unless already set; call it
    before faiss (or numpy) is first imported. Returns the value in force."""
    if "OPENBLAS_CORETYPE" not in os.environ:
        flags = set(cpu_flags())
        core = "SkylakeX" if "avx512f" in flags else "Haswell" if "avx2" in flags else None
        if core:
            os.environ["OPENBLAS_CORETYPE"] = core
    return os.environ.get("OPENBLAS_CORETYPE")


def blas_info() -> dict:
    """The BLAS / OpenMP libraries loaded in this process and the kernels they chose (after importing faiss)."""
    try:
        import faiss  # noqa: F401  (loads its OpenBLAS and OpenMP)
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"coretype_env": os.environ.get("OPENBLAS_CORETYPE"), "libraries": []}
    libs = [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
            for lib in threadpool_info()]
    for lib in libs:
        lib["filepath"] = os.path.basename(lib["filepath"] or "")
    return {"coretype_env": os.environ.get("OPENBLAS_CORETYPE"), "libraries": libs}


def set_faiss_threads(n: int | None) -> None:
    """faiss's OpenMP threads (its searches and builds); None leaves them as they are."""
    if n:
        import faiss
        faiss.omp_set_num_threads(n)


def _query(out) -> np.ndarray:
    """A user tower's output (tensor, ONNX Runtime array or a tuple of them) as a [1, d] float32 query."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    x = out.detach().float().cpu().numpy() if torch.is_tensor(out) else np.asarray(out, dtype=np.float32)
    return np.ascontiguousarray(x.reshape(1, -1), dtype=np.float32)


def index_request_calls(tower: torch.nn.Module, seq_len: int, index: ItemIndex, route: str = "fp32",
                        layers=("attention", "ffn")) -> tuple[Callable[[], object], Callable[[], object]]:
    """(user tower at batch 1 served by `route` — a text tower over `seq_len` tokens, a sequence tower over
    `seq_len` history items — and one search of `index` for that user's embedding); the request is
    `search(user())` — see `request_call`."""
    user = user_call(tower, seq_len, index.n_items, route, layers)
    q = _query(user())
    return user, lambda: index.search(q, index.cfg.k)


def request_call(user: Callable[[], object], index: ItemIndex) -> Callable[[], object]:
    """One online request: the user tower's embedding searched in `index` (top `retrieval.k`)."""
    return lambda: index.search(_query(user()), index.cfg.k)


def search_calls(index: ItemIndex, queries: np.ndarray, batch: int = 1) -> Callable[[], object]:
    """Searches of `index` with successive `batch`-row slices of queries [Q, d] (cycling): QPS = batch / time."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    state = {"i": 0}

    def call():
        s = state["i"] % max(1, len(q) - batch + 1)
        state["i"] += batch
        return index.search(q[s:s + batch], index.cfg.k)
    return call


# --- the index latency model: measured on this machine, fitted per index kind ------------------------------

CALIBRATION = {  # index kind -> (spec template, catalog sizes): a few settings spanning the work per query
    "flat": ("flat,k=10", (20_000, 80_000)),
    "sq8": ("sq8,k=10", (20_000, 80_000)),
    "fp16": ("fp16,k=10", (20_000, 80_000)),
    "ivf": ("ivf,nlist=256,nprobe={p},k=10", (80_000,)),
    "ivfpq": ("ivfpq,nlist=256,nprobe={p},m=32,k=10", (80_000,)),
    "hnsw": ("hnsw,M=16,efConstruction=40,efSearch={e},k=10", (20_000,)),
}


def index_key(n_threads: int | None = None) -> dict:
    """What an index latency model holds for: the device key (CPU model and flags, threads, torch) + faiss."""
    import faiss
    return {**device_key("float32", n_threads), "faiss": faiss.__version__, "blas": os.environ.get(
        "OPENBLAS_CORETYPE")}


def calibrate_index_latency(dim: int = 384, kinds=tuple(CALIBRATION), n_threads: int | None = None,
                            seed: int = 0, min_seconds: float = 0.3, scale: float = 1.0,
                            cached: bool = True) -> IndexLatencyModel:
    """Measure a few indexes of each kind over random unit vectors (batch 1) and fit their latency model; cached
    under this device's key. `scale` shrinks the calibration catalogs (tests)."""
    key = index_key(n_threads)
    if cached and (found := load_model(key)) is not None and all(k in found.scale for k in kinds):
        return found
    set_faiss_threads(n_threads or torch.get_num_threads())
    rng = np.random.default_rng(seed)
    model = IndexLatencyModel(key=key)
    with threads(n_threads):
        for kind in kinds:
            template, sizes = CALIBRATION[kind]
            works, times = [], []
            for n in sizes:
                n = max(2_000, int(n * scale))
                items = rng.standard_normal((n, dim), dtype=np.float32)
                items /= np.linalg.norm(items, axis=1, keepdims=True)
                queries = items[rng.choice(n, 64, replace=False)] + 0.1 * rng.standard_normal((64, dim),
                                                                                               dtype=np.float32)
                base = parse_index_spec(template.format(p=1, e=16))
                built = build_index(items, base, seed=seed)
                for p in ((1, 8, 32) if "{" in template else (None,)):
                    cfg = parse_index_spec(template.format(p=p, e=max(16, 4 * (p or 1))))
                    index = set_search_params(built, cfg)
                    with exclusive():
                        t = measure(search_calls(index, queries), min_seconds=min_seconds)
                    works.append(index_work(cfg, n, dim)["madds"])
                    times.append(t.p50)
            fit(model, kind, works, times)
    if cached:
        save_model(model)
    return model


def predicted_search_ms(model: IndexLatencyModel, cfg: RetrievalConfig, n_items: int, dim: int) -> float:
    """Predicted ms of one search (batch 1) of the index `cfg` describes over `n_items` × `dim`."""
    return model.predict(cfg, n_items, dim)
