"""SASRec: self-attentive sequential recommendation over item IDs, trained with full-softmax cross-entropy.

Kang & McAuley 2018, "Self-Attentive Sequential Recommendation" (ICDM): item-ID embeddings + learned positions,
causal self-attention blocks (pre-LayerNorm, point-wise FFN), the hidden state at position t scores the next
item by a dot product with the (shared) item embeddings. Klenitskiy & Vasilev 2023, "Turning Dross Into Gold
Loss: is BERT4Rec really better than SASRec?" (RecSys): trained with cross-entropy over the whole catalog at every
position instead of one sampled negative, SASRec beats BERT4Rec (ML-1M full-ranking NDCG@10 ≈ 0.18).

Same split, masking and full ranking as every other model (`recsys.retrieval.evaluate.evaluate`): the input of
a user at a stage is `split.history(user, stage)` (the last `max_len` items), the scores of the last position
rank the whole catalog. Each grid point is trained with early stopping on validation NDCG@10; the best point on
validation is tested (`run_sasrec`; `recsys baselines --models sasrec`).
"""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import SASRecConfig
from recsys.data.split import Split
from recsys.errors import RecsysError
from recsys.retrieval.evaluate import EvalResult, Scorer, evaluate

SELECT_BY = "ndcg@10"


class Block(nn.Module):
    """Pre-LayerNorm causal self-attention + point-wise FFN (hidden → hidden, as in the paper), residuals."""

    def __init__(self, hidden: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        (B, L, H), n = x.shape, self.n_heads  # x: [B, L, H]; allowed: [B, 1, L, L] bool (query attends key)
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, n, H // n).permute(2, 0, 3, 1, 4)  # each [B, n, L, H/n]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)  # [B, n, L, H/n]
        x = x + self.drop(self.out(y.transpose(1, 2).reshape(B, L, H)))  # [B, L, H]
        return x + self.drop(self.ffn(self.ln2(x)))  # [B, L, H]


class SASRec(nn.Module):
    """Item sequences [B, L] (item index + 1, 0 = left padding, oldest first) → hidden states [B, L, H]."""

    def __init__(self, n_items: int, hidden: int = 64, max_len: int = 50, n_layers: int = 2, n_heads: int = 1,
                 dropout: float = 0.2):
        super().__init__()
        self.n_items, self.hidden, self.max_len = n_items, hidden, max_len
        self.item = nn.Embedding(n_items + 1, hidden, padding_idx=0)  # row 0: padding
        self.position = nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(hidden)
        nn.init.normal_(self.item.weight, std=hidden ** -0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        B, L = seq.shape
        real = seq > 0  # [B, L]
        positions = torch.arange(self.max_len - L, self.max_len, device=seq.device)  # right-aligned: last = newest
        x = self.item(seq) * math.sqrt(self.hidden) + self.position(positions)  # [B, L, H]
        x = self.drop(x) * real[..., None]  # [B, L, H]
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()  # [L, L]
        eye = torch.eye(L, dtype=torch.bool, device=seq.device)  # a padding query attends itself (no empty rows)
        allowed = ((causal & real[:, None, :]) | eye)[:, None]  # [B, 1, L, L]
        for block in self.blocks:
            x = block(x, allowed) * real[..., None]  # [B, L, H]
        return self.ln(x)  # [B, L, H]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item: h [..., H] → [..., n_items] (shared item embeddings, padding row left out)."""
        return h @ self.item.weight[1:].T


def left_padded(seqs: list[np.ndarray], max_len: int) -> torch.Tensor:
    """[B, max_len] of the last `max_len` items of each sequence, + 1, left-padded with 0."""
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for row, s in enumerate(seqs):
        s = np.asarray(s[-max_len:], dtype=np.int64)
        if len(s):
            out[row, max_len - len(s):] = s + 1
    return torch.from_numpy(out)


def training_pairs(split: Split, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both [U, max_len]: each training sequence s of ≥ 2 items read as s[:-1] → s[1:]
    (its last max_len steps); targets are item indices + 1, 0 where there is no target."""
    seqs = [s for s in split.train if len(s) >= 2]
    if not seqs:
        raise RecsysError("sasrec: no user has 2 or more training interactions (nothing to learn a next item from)")
    return left_padded([s[:-1] for s in seqs], max_len), left_padded([s[1:] for s in seqs], max_len)


def sasrec_scorer(model: SASRec, split: Split, stage: str) -> Scorer:
    """Scores [B, n_items] of users' next item after their `stage` history (the last position's state)."""
    def score(users: np.ndarray) -> torch.Tensor:
        seq = left_padded([split.history(int(u), stage) for u in users], model.max_len)
        with torch.inference_mode():
            return model.logits(model(seq)[:, -1])  # [B, N]
    return score


def fit_sasrec(split: Split, cfg: SASRecConfig, hidden: int, dropout: float, max_len: int,
               progress: bool = False, state: Path | None = None) -> tuple[SASRec, dict]:
    """Train one SASRec (full-softmax CE at every position) with early stopping on validation NDCG@10 every
    `cfg.eval_every` epochs; returns the best model on validation and {val metrics, epochs, minutes}.
    With `state`, the whole fit (model, optimizer, both random streams, early-stopping record, minutes so far) is
    saved there at every validation and a fit stopped midway continues from it, ending as an uninterrupted one
    would; the caller removes the file once the result is kept."""
    if split.n_items < 2:
        raise RecsysError(f"sasrec: the catalog has {split.n_items} item; SASRec ranks a next item among at least 2")
    torch.manual_seed(cfg.seed)
    model = SASRec(split.n_items, hidden, max_len, cfg.n_layers, cfg.n_heads, dropout)
    inputs, targets = training_pairs(split, max_len)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, since, t0, start, before = None, None, 0, time.perf_counter(), 1, 0.0
    if state is not None and state.is_file():
        saved = torch.load(state, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        best, best_state, since, before = saved["best"], saved["best_state"], saved["since"], saved["minutes"]
        start = saved["epoch"] + 1
        if progress:
            print(f"sasrec h={hidden} p={dropout} L={max_len}: continuing after epoch {saved['epoch']} ({state})",
                  flush=True)
    epoch = start - 1
    for epoch in range(start, cfg.epochs + 1):
        model.train()
        for idx in torch.randperm(len(inputs), generator=gen).split(cfg.batch_size):
            x, y = inputs[idx], targets[idx]  # [b, L] each
            h = model(x)  # [b, L, H]
            real = y > 0  # [b, L]: logits only where a target exists
            loss = F.cross_entropy(model.logits(h[real]), y[real] - 1)  # over the whole catalog
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out_of_time = cfg.max_minutes is not None and before + (time.perf_counter() - t0) / 60 > cfg.max_minutes
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs or out_of_time:
            model.eval()
            val = evaluate(sasrec_scorer(model, split, "val"), split, "val", progress=False).metrics
            if progress:
                print(f"sasrec h={hidden} p={dropout} L={max_len} epoch {epoch}: loss {loss.item():.3f} "
                      f"val ndcg@10 {val[SELECT_BY]:.4f}", flush=True)
            if best is None or val[SELECT_BY] > best[SELECT_BY]:
                best, best_state, since = val, {k: v.clone() for k, v in model.state_dict().items()}, 0
            else:
                since += 1
            if since >= cfg.patience or out_of_time:
                break
            if state is not None:
                tmp = state.with_name(state.name + ".tmp")
                torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "best": best,
                            "best_state": best_state, "since": since,
                            "minutes": before + (time.perf_counter() - t0) / 60}, tmp)
                tmp.replace(state)  # a kill mid-write leaves the previous state whole
    model.load_state_dict(best_state)
    return model.eval(), {"val": best, "epochs": epoch, "train_minutes": before + (time.perf_counter() - t0) / 60}


def grid_record(hidden: int, dropout: float, max_len: int, info: dict) -> dict:
    """One grid point as benchmarks list it: its hyper-parameters, validation NDCG@10, epochs and minutes
    (`info` as `fit_sasrec` returns it)."""
    return {"hidden": hidden, "dropout": dropout, "max_len": max_len, "val_ndcg@10": info["val"][SELECT_BY],
            "epochs": info["epochs"], "train_minutes": info["train_minutes"]}


def run_sasrec(split: Split, cfg: SASRecConfig, progress: bool = True,
               keep_model: bool = False) -> tuple[EvalResult, dict]:
    """Every point of the grid (hidden × dropout × max_len) trained with early stopping on validation; the point
    with the best validation NDCG@10 is evaluated on test. Returns (test result, {hyper-parameters, val, grid}
    and, with `keep_model`, the chosen "model")."""
    best, grid = None, []
    for hidden, dropout, max_len in itertools.product(cfg.hidden, cfg.dropout, cfg.max_len):
        model, info = fit_sasrec(split, cfg, hidden, dropout, max_len, progress)
        grid.append(grid_record(hidden, dropout, max_len, info))
        if best is None or info["val"][SELECT_BY] > best[1]["val"][SELECT_BY]:
            best = (model, info, grid[-1])
    model, info, point = best
    test = evaluate(sasrec_scorer(model, split, "test"), split, "test", progress=False)
    return test, {"hidden": point["hidden"], "dropout": point["dropout"], "max_len": point["max_len"],
                  "val": info["val"], "train_minutes": sum(g["train_minutes"] for g in grid), "grid": grid,
                  **({"model": model} if keep_model else {})}
