"""LightningDataModule: (history prefix → next item) training examples and validation users, tokenized.

Training examples come from the training sequences only: for user u with train sequence s, example (u, t) reads
the history s[:t] and targets s[t] (t ≥ 1). Each epoch draws at most `examples_per_user` of a user's examples
(a fresh draw per epoch, seeded), so an epoch's cost is controlled on datasets with long histories.
"""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from recsys.config import DataConfig, TrainConfig
from recsys.data.dataset import RecDataset
from recsys.data.split import Split
from recsys.data.text import user_text
from recsys.models.sequence_tower import recent_items
from recsys.models.tower import tokenize


class _Remaining(torch.utils.data.Sampler):
    """Batches of an epoch from `skip` on; its length stays the epoch's, so Lightning counts batch indices as if
    the epoch had never stopped."""

    def __init__(self, batches: list[list[int]], skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self):
        return iter(self.batches[self.skip:])

    def __len__(self) -> int:
        return len(self.batches)


class RecDataModule(pl.LightningDataModule):
    def __init__(self, dataset: RecDataset, split: Split, tokenizer, data: DataConfig, train: TrainConfig,
                 tokenize_items: bool = True, sequence_items: int | None = None, user_text: bool = True):
        super().__init__()
        self.dataset, self.split, self.tokenizer = dataset, split, tokenizer
        self.data_cfg, self.train_cfg = data, train
        self.tokenize_items = tokenize_items  # False: the model looks its (frozen) item embeddings up by id
        # a sequence user tower: batches carry each user's last `sequence_items` item ids ("user_items" [B, N]);
        # user texts only where something reads them (`user_text`: a distillation teacher)
        self.sequence_items, self.with_user_text = sequence_items, user_text
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches of it already trained): see resume_from
        self.item_texts = dataset.item_texts
        self.train_sets = [set(s.tolist()) for s in split.train]
        targets = np.concatenate([s[1:] for s in split.train] + [np.zeros(0, dtype=np.int64)])
        counts = np.bincount(targets.astype(np.int64), minlength=split.n_items) + 1.0  # add-one smoothing
        self.log_q = torch.from_numpy(np.log(counts / counts.sum())).float()  # [N] log P(item is a target)

    # --- training ---------------------------------------------------------------------------------------
    def examples(self, epoch: int) -> list[tuple[int, int]]:
        """This epoch's (user, position) pairs: position t targets train[u][t] from history train[u][:t]."""
        if self.train_cfg.objective == "causal":  # one example per user: its whole sequence, every position
            return [(u, len(seq)) for u, seq in enumerate(self.split.train) if len(seq) >= 2]
        rng = np.random.default_rng([self.train_cfg.seed, epoch])
        cap = self.train_cfg.examples_per_user
        out = []
        for u, seq in enumerate(self.split.train):
            positions = np.arange(1, len(seq))
            if cap is not None and len(positions) > cap:
                positions = rng.choice(positions, size=cap, replace=False)
            out.extend((u, int(t)) for t in positions)
        return out

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        seed, bs, examples = self.train_cfg.seed * 1000 + epoch, self.train_cfg.batch_size, self.examples(epoch)
        skip = self.resume_at[1] if self.resume_at and self.resume_at[0] == epoch else 0
        if not skip:
            return DataLoader(examples, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed),
                              collate_fn=self.collate_train, num_workers=self.train_cfg.num_workers, drop_last=False)
        # a fit resumed mid-epoch: the epoch's batches in the order a fresh loader draws them, minus those trained
        order = list(DataLoader(range(len(examples)), batch_size=bs, shuffle=True,
                                generator=torch.Generator().manual_seed(seed), collate_fn=list))
        return DataLoader(examples, batch_sampler=_Remaining(order, skip), collate_fn=self.collate_train,
                          num_workers=self.train_cfg.num_workers)

    def resume_from(self, epoch: int, global_step: int) -> None:
        """A fit resumed from a checkpoint taken at `global_step` in `epoch`: that epoch's loader leaves out the
        batches already trained (set by the recipe from the checkpoint, before Lightning builds any loader)."""
        per_epoch = -(-len(self.examples(epoch)) // self.train_cfg.batch_size)
        self.resume_at = (epoch, max(0, global_step - epoch * per_epoch))

    def collate_causal(self, pairs: list[tuple[int, int]]) -> dict:
        """`train.objective=causal`: "user_items" [B, N] the last N items of each training sequence but its last,
        "targets" [B, N] the item that follows each of them (-1 where there is none), both left-padded."""
        seqs = [self.split.train[u] for u, _ in pairs]
        n = self.sequence_items
        return {"users": torch.tensor([u for u, _ in pairs]), "user_items": recent_items([s[:-1] for s in seqs], n),
                "targets": recent_items([s[1:] for s in seqs], n)}

    def collate_train(self, pairs: list[tuple[int, int]]) -> dict:
        if self.train_cfg.objective == "causal":
            return self.collate_causal(pairs)
        users = [u for u, _ in pairs]
        targets = [int(self.split.train[u][t]) for u, t in pairs]
        n = self.data_cfg.history_items
        utexts = [user_text(self.item_texts, self.split.train[u][:t], n) for u, t in pairs]
        negatives = []
        if self.train_cfg.extra_negatives:
            negatives = np.random.randint(0, self.split.n_items, size=self.train_cfg.extra_negatives).tolist()
        items = targets + negatives
        # false_negatives [B, B + M]: item j is in user b's training items, or is a copy of b's positive
        fn = torch.tensor([[j in self.train_sets[u] or j == tgt for j in items]
                           for u, tgt in zip(users, targets, strict=True)])
        max_user = self.data_cfg.train_user_max_tokens or self.data_cfg.user_max_tokens
        return {
            "users": torch.tensor(users),
            **(self.sequence_batch([self.split.train[u][:t] for u, t in pairs]) if self.sequence_items else {}),
            "user": tokenize(self.tokenizer, utexts, max_user) if self.with_user_text else None,
            "item": (tokenize(self.tokenizer, [self.item_texts[i] for i in items], self.data_cfg.item_max_tokens)
                     if self.tokenize_items else None),
            "items": torch.tensor(items),  # [B + M] item ids (a teacher's cached item embeddings are looked up)
            "false_negatives": fn,
            "log_q": self.log_q[items] if self.train_cfg.logq_correction else None,
            # [B, H] each user's training items (-1 padded): false negatives among other ranks' items
            # (cross-rank negatives, recsys/losses/gather.py)
            "history": self.histories(users) if self.train_cfg.gather_negatives else None,
        }

    def sequence_batch(self, histories: list[np.ndarray], stage_items: bool = True) -> dict:
        """A sequence tower's inputs: "user_items" [B, N] the last N item ids (oldest first, -1 padded); end to
        end (items tokenized) also the batch's distinct history items ("user_item_ids" [U], sorted) and their
        tokenized texts ("user_item_text"), which the item tower encodes in the step."""
        recent = recent_items(histories, self.sequence_items)  # [B, N]
        out = {"user_items": recent}
        if self.tokenize_items and stage_items:
            ids = torch.unique(recent[recent >= 0])  # [U] sorted
            out["user_item_ids"] = ids
            out["user_item_text"] = tokenize(self.tokenizer, [self.item_texts[int(i)] for i in ids],
                                             self.data_cfg.item_max_tokens)
        return out

    def histories(self, users: list[int]) -> torch.Tensor:
        """[B, H] the training items of each user (H: the longest of them), padded with -1."""
        rows = [self.split.train[u] for u in users]
        out = torch.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            out[b, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        return out

    # --- validation: full ranking of the validation targets ---------------------------------------------
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.split.eval_users.tolist(), batch_size=self.train_cfg.eval_batch_size,
                          collate_fn=lambda users: self.collate_users(users, "val"))

    def user_text(self, user: int, stage: str) -> str:
        """The text a model reads for `user` at `stage` (history up to that stage's target)."""
        return user_text(self.item_texts, self.split.history(user, stage), self.data_cfg.history_items)

    def collate_users(self, users: list[int], stage: str) -> dict:
        if self.sequence_items:  # validation reads the catalog embeddings computed for it
            return {"users": torch.tensor(users),
                    **self.sequence_batch([self.split.history(u, stage) for u in users], stage_items=False)}
        texts = [self.user_text(u, stage) for u in users]
        return {"users": torch.tensor(users), "user": tokenize(self.tokenizer, texts, self.data_cfg.user_max_tokens)}
