"""An IVF index that knows its queries: the lists a query searches picked by probe vectors learned from sampled
user queries, not by the k-means centroids of the items (`retrieval.probe=queries`).

Why: a two-tower model's user vectors are not distributed like its item vectors (on ML-100K a sequence tower's
users have a median best cosine of 0.36 to any item, items 0.88 to their nearest item), so the centroid closest
to a user is a poor guide to the lists that hold its nearest items — IVF needs many more probes for user queries
than for item-like ones (the out-of-distribution query problem: Jaiswal et al. 2022, OOD-DiskANN; Chen et al.
2024, RoarGraph).

How: the items stay in the lists k-means gave them; only the routing changes. For each training query q (a
validation user's vector) the target is the share of its exact top-k items in each list; one probe vector per
list, initialised at its centroid, is fitted by softmax cross-entropy over lists, s·(q · p_j) (s a learned
scale) — the learning-to-rank formulation of IVF routing of Vecchiato, Lucchese, Nardini & Bruch (SIGIR 2024),
with a linear scorer per list. The probe vectors then replace the coarse quantizer's vectors: an IndexIVFFlat
stores raw item vectors (no residuals), so its scores are untouched, a search costs what it did (nlist·d to rank
the lists), and the index saves, loads and serves as a plain faiss index. Only IVF-Flat: IVF-PQ encodes residuals
against the centroids, which the probe vectors would no longer be.
"""
from __future__ import annotations

import numpy as np
import torch

ROUTER_STEPS = 300  # Adam steps
ROUTER_LR = 0.01
ROUTER_BATCH = 1024  # queries per step beyond this many (a 1M-item catalog's 4,000 lists: 1024 × 4000 logits)
SCORES_PER_CHUNK = 1 << 26  # exact top-k in chunks of at most this many scores (256 MB)


def list_of_items(ivf, n_items: int) -> np.ndarray:
    """[N] the inverted list each item id was added to (read from the index's lists)."""
    import faiss
    out = np.full(n_items, -1, dtype=np.int64)
    inv = ivf.invlists
    for j in range(ivf.nlist):
        size = inv.list_size(j)
        if size:
            out[faiss.rev_swig_ptr(inv.get_ids(j), size).copy()] = j
    return out


def route_targets(queries: torch.Tensor, keys: torch.Tensor, lists: np.ndarray, nlist: int, k: int = 10
                  ) -> torch.Tensor:
    """[Q, nlist] per query the share of its exact top-k items (inner product over keys [N, d]) in each list."""
    out = torch.zeros(len(queries), nlist)
    owner = torch.from_numpy(lists)
    k = min(k, len(keys))
    chunk = max(1, SCORES_PER_CHUNK // len(keys))
    for s in range(0, len(queries), chunk):
        top = torch.topk(queries[s:s + chunk] @ keys.T, k, dim=1).indices  # [q, k]
        rows = torch.arange(len(top)).unsqueeze(1).expand_as(top)  # [q, k]
        out[s:s + len(top)].index_put_((rows.reshape(-1), owner[top].reshape(-1)),
                                       torch.full((top.numel(),), 1.0 / k), accumulate=True)
    return out


def fit_probe_vectors(centroids: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor,
                      steps: int = ROUTER_STEPS, lr: float = ROUTER_LR, batch: int = ROUTER_BATCH,
                      seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Probe vectors [nlist, d] from centroids [nlist, d], queries [Q, d] and their list targets [Q, nlist]:
    softmax cross-entropy of s·(q · p_j) against the targets, Adam on the whole set (Q <= batch) or on seeded
    mini-batches of `batch` queries (deterministic for fixed inputs)."""
    probes = torch.nn.Parameter(centroids.clone().float())
    scale = torch.nn.Parameter(torch.tensor(10.0))
    opt = torch.optim.Adam([probes, scale], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(len(queries), (batch,), generator=gen) if len(queries) > batch else slice(None)
            logits = scale * (queries[rows] @ probes.T)  # [B, nlist]
            loss = -(targets[rows] * torch.log_softmax(logits, dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return probes.detach(), {"loss_first": losses[0], "loss_last": losses[-1], "steps": steps, "scale": scale.item()}


def fit_router(ivf, keys: np.ndarray, queries: np.ndarray, k: int = 10) -> dict:
    """Replace the coarse quantizer's vectors of the IndexIVFFlat `ivf` (built over keys [N, d]) by probe vectors
    fitted to queries [Q, d] (see the module docstring); returns what the fit did."""
    import faiss
    nlist = ivf.nlist
    quantizer = faiss.downcast_index(ivf.quantizer)
    centroids = torch.from_numpy(quantizer.reconstruct_n(0, nlist))  # [nlist, d]
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    targets = route_targets(q, torch.from_numpy(keys), list_of_items(ivf, len(keys)), nlist, k)
    probes, info = fit_probe_vectors(centroids, q, targets)
    quantizer.reset()
    quantizer.add(np.ascontiguousarray(probes.numpy(), dtype=np.float32))
    return {**info, "queries": len(queries), "k": k}
