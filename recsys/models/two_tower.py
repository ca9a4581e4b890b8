"""The two-tower recommender as a LightningModule.

User text and item text are encoded by BERT-family towers (shared or separate), mean-pooled, optionally
projected, L2-normalised; score = dot product / temperature. Trained with in-batch softmax over item
embeddings with false-negative masking; validated by full ranking of the validation targets over the whole
catalog (item embeddings recomputed once per validation).
"""
from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch
from torchmetrics.aggregation import CatMetric

from recsys.config import ModelConfig, TrainConfig, from_dict
from recsys.errors import RecsysError
from recsys.losses.contrastive import InBatchSoftmaxLoss
from recsys.models.encoder import BertEncoder, resolve_model_path
from recsys.models.tower import Tower, encode_texts
from recsys.retrieval.evaluate import ranks_for_users
from recsys.retrieval.metrics import per_user_metrics, summarize

MONITOR = "val/ndcg@10"


def build_tower(name: str, cfg: ModelConfig) -> Tower:
    enc = BertEncoder.from_pretrained(resolve_model_path(name), attn_implementation=cfg.attn_implementation,
                                      dropout=cfg.dropout)
    return Tower(enc, enc.shape.hidden, cfg.projection_dim)


class TwoTowerModule(pl.LightningModule):
    def __init__(self, model: dict, train: dict):
        super().__init__()
        self.save_hyperparameters()  # plain dicts: checkpoints load with weights_only=True
        self.model_cfg: ModelConfig = from_dict(ModelConfig, model, "model")
        self.train_cfg: TrainConfig = from_dict(TrainConfig, train, "train")
        self.user_tower = build_tower(self.model_cfg.encoder, self.model_cfg)
        separate = self.model_cfg.item_encoder is not None or not self.model_cfg.shared_towers
        self.item_tower = (build_tower(self.model_cfg.item_encoder or self.model_cfg.encoder, self.model_cfg)
                           if separate else self.user_tower)
        if self.user_tower.dim != self.item_tower.dim:
            raise RecsysError(f"model: user tower dim {self.user_tower.dim} != item tower dim {self.item_tower.dim}; "
                              "set model.projection_dim")
        log_t = torch.tensor(math.log(self.model_cfg.temperature))
        if self.model_cfg.learn_temperature:
            self.log_temperature = torch.nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.loss = InBatchSoftmaxLoss()
        self.val_ranks, self.val_users = CatMetric(), CatMetric()
        self._item_emb: torch.Tensor | None = None

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    # --- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        u = self.user_tower(**batch["user"])  # [B, d]
        i = self.item_tower(**batch["item"])  # [B + M, d]
        loss = self.loss(u, i, self.temperature, batch["false_negatives"])
        self.log("train/loss", loss, prog_bar=True, batch_size=u.shape[0])
        self.log("train/temperature", self.temperature, batch_size=u.shape[0])
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.train_cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.train_cfg.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(self.train_cfg.warmup_ratio * total)

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0
            return (step + 1) / max(1, warm) if step < warm else max(0.0, (total - step) / max(1, total - warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- validation: full ranking, same code path as `recsys evaluate` ----------------------------------
    def on_validation_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        self._item_emb = encode_texts(self.item_tower, dm.tokenizer, dm.item_texts, dm.data_cfg.item_max_tokens,
                                      self.train_cfg.eval_batch_size, desc="encode items",
                                      progress=False).to(self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        u = self.user_tower(**batch["user"])  # [B, d]
        scores = u.float() @ self._item_emb.T  # [B, N]
        users = batch["users"].cpu().numpy()
        ranks = ranks_for_users(scores, self.trainer.datamodule.split, users, "val")
        self.val_ranks.update(ranks)
        self.val_users.update(batch["users"].float())

    def on_validation_epoch_end(self) -> None:
        ranks = self.val_ranks.compute().cpu().numpy()
        users = self.val_users.compute().cpu().numpy()
        self.val_ranks.reset()
        self.val_users.reset()
        _, first = np.unique(users, return_index=True)  # distributed samplers may repeat users to even out ranks
        metrics = summarize(per_user_metrics(ranks[first]))
        for k, v in metrics.items():
            self.log(f"val/{k}", v, prog_bar=k == "ndcg@10", sync_dist=False)
        self._item_emb = None
