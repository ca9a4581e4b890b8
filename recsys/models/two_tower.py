"""The two-tower recommender as a LightningModule.

User text and item text are encoded by BERT-family towers (shared or separate), mean-pooled, optionally
projected, L2-normalised; score = dot product / temperature. Trained with in-batch softmax over item
embeddings with false-negative masking; validated by full ranking of the validation targets over the whole
catalog (item embeddings recomputed once per validation).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pytorch_lightning as pl
import torch
from torchmetrics.aggregation import CatMetric

from recsys.config import CompressConfig, DistillConfig, ModelConfig, TrainConfig, from_dict
from recsys.efficiency.cost import SoftShape
from recsys.errors import RecsysError
from recsys.losses.catalog import CatalogSoftmaxLoss
from recsys.losses.contrastive import InBatchSoftmaxLoss
from recsys.losses.gather import false_negatives, gather_items, world
from recsys.losses.penalties import BudgetLoss, CostNormaliser, PenaltyLoss
from recsys.models.encoder import BertEncoder, resolve_model_path
from recsys.models.gates import gates_for, project_expected_cost, project_hard_cost
from recsys.models.item_encoder import item_encoder_dim
from recsys.models.sequence_tower import build_sequence_tower, lookup
from recsys.models.teacher import Distiller, capture_hidden
from recsys.models.tower import Tower, encode_texts
from recsys.retrieval.evaluate import ranks_for_users
from recsys.retrieval.metrics import per_user_metrics, summarize

MONITOR = "val/ndcg@10"


def build_tower(name: str, cfg: ModelConfig, compress: CompressConfig | None = None) -> Tower:
    """A tower from a checkpoint, with gates when `compress.gates` is set. Output-dim gates without a
    projection get an identity-initialised projection (the same embeddings, with dims that can be cut)."""
    enc = BertEncoder.from_pretrained(resolve_model_path(name), attn_implementation=cfg.attn_implementation,
                                      dropout=cfg.dropout)
    if cfg.layers is not None:  # a fewer-layer student: the checkpoint's chosen layers, in order
        if cfg.layers[-1] >= enc.shape.n_layers:
            raise RecsysError(f"model.layers: {cfg.layers} — {name} has {enc.shape.n_layers} layers (0-based indices)")
        enc.layers = torch.nn.ModuleList(enc.layers[i] for i in cfg.layers)
        enc.shape = enc.shape.replace(layers=tuple(enc.shape.layers[i] for i in cfg.layers))
    gates = compress.gates if compress is not None else []
    dim = cfg.projection_dim or (enc.shape.hidden if "output" in gates else None)
    tower = Tower(enc, enc.shape.hidden, dim)
    if cfg.projection_dim is None and tower.projection is not None:
        with torch.no_grad():
            tower.projection.weight.copy_(torch.eye(dim))
            tower.projection.bias.zero_()
    tower.gates = gates_for(tower.shape, compress)
    return tower


class TwoTowerModule(pl.LightningModule):
    """Trains, and nothing else. What it needs from outside is prepared and handed in (`recsys.runs.build_module`,
    `recsys.recipes.train.prepare_module`): int8 fake-quantisation for QAT, a distiller holding its teacher
    (`attach_distiller`), a frozen item tower's catalog embeddings (`set_item_cache`), the cost model of its
    gated towers with their latency tables (`set_costs`), importance-initialised or pruned gates."""

    def __init__(self, model: dict, train: dict, compress: dict | None = None, distill: dict | None = None,
                 n_catalog: int = 0):
        super().__init__()
        self.save_hyperparameters()  # plain dicts: checkpoints load with weights_only=True
        self.model_cfg: ModelConfig = from_dict(ModelConfig, model, "model")
        self.train_cfg: TrainConfig = from_dict(TrainConfig, train, "train")
        self.compress_cfg: CompressConfig = from_dict(CompressConfig, compress or {}, "compress")
        self.distill_cfg: DistillConfig = from_dict(DistillConfig, distill or {}, "distill")
        c = self.compress_cfg
        m = self.model_cfg
        self.sequence = m.user_tower == "sequence"  # a user tower over item embeddings (models/sequence_tower.py)
        if self.sequence:  # the item tower encodes texts; the small transformer (gated, if any) reads its output
            # a Hugging Face item encoder (item_encoder_backend=auto) is not part of the module: frozen, its catalog
            # embeddings are computed offline and handed in (`set_item_cache`), its weights are the named model's
            auto = m.item_encoder_backend == "auto"
            self.item_tower = None if auto else build_tower(m.item_encoder or m.encoder, m, None)
            item_dim = item_encoder_dim(m.item_encoder or m.encoder) if auto else self.item_tower.dim
            self.user_tower = build_sequence_tower(m, item_dim, m.sequence_items, c, n_catalog)
            self.separate = True
        else:
            self.user_tower = build_tower(m.encoder, m, c)
            self.separate = m.item_encoder is not None or not m.shared_towers or m.freeze_item_tower
            self.item_tower = (build_tower(m.item_encoder or m.encoder, m, None if m.freeze_item_tower else c)
                               if self.separate else self.user_tower)
        if m.freeze_item_tower and self.item_tower is not None:  # fixed catalog embeddings: not trained
            self.item_tower.requires_grad_(False)
        # [n_items, d] embeddings of a frozen item tower's catalog, handed in by the recipe (not saved: the
        # frozen tower's weights are, and reproduce them)
        self.item_cache: torch.Tensor | None = None
        self.excluded: torch.Tensor | None = None  # [n_items] bool: cold-start items no training step may see
        self.penalty = PenaltyLoss(c.lambda_params, c.lambda_flops, c.lambda_latency)
        # the target's ramp: held from step 0 when the gates start pruned to it, over half of target_by under the
        # fair schedule, else over budget_warmup
        warmup = 0.0 if c.prune_init else c.target_by / 2 if c.target_by else c.budget_warmup
        self.budget = (BudgetLoss(c.budget_metric, c.budget_target, warmup, from_start=c.target_by is not None)
                       if c.budget_metric else None)
        self.fixed_at_step: int | None = None  # the step from which the structure was fixed (in-run recovery)
        self.fixed_ratios: dict[str, float] | None = None  # fair schedule: expected and hard cost ratio when fixed
        self.unreachable_warned = False
        if c.freeze_gates:
            for tower in self.towers:
                if tower.gates is not None:
                    tower.gates.freeze()
        self.user_costs: CostNormaliser | None = None  # handed in by the recipe (`set_costs`)
        self.item_costs: CostNormaliser | None = None
        # what a user vector is scored against: a sequence tower's item representations, else the item tower's
        item_dim = self.user_tower.key_dim if self.sequence else self.item_tower.dim
        if self.user_tower.dim != item_dim:
            raise RecsysError(f"model: user tower dim {self.user_tower.dim} != item tower dim {item_dim}; "
                              "set model.projection_dim")
        log_t = torch.tensor(math.log(self.model_cfg.temperature))
        if self.model_cfg.learn_temperature:
            self.log_temperature = torch.nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.loss = InBatchSoftmaxLoss()
        self.catalog_loss = CatalogSoftmaxLoss()  # train.objective=causal
        self.distiller: Distiller | None = None  # attached by recsys.runs.build_module when distilling
        self.val_ranks, self.val_users = CatMetric(), CatMetric()
        self._item_emb: torch.Tensor | None = None
        self._item_keys: torch.Tensor | None = None

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    # --- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.train_cfg.objective == "causal":
            return self.causal_step(batch)
        hidden = self.distiller is not None and self.distiller.hidden is not None
        with capture_hidden(self.user_tower.encoder) if hidden else nullcontext() as student_hidden:
            u = self.user_embeddings(batch)  # [B, d]
        i = self.item_embeddings(batch)  # [B + M, d]
        i, batch, share = self.gather_negatives(i, batch, u.shape[0])  # [N, d]: every rank's items, its own first
        task = share * self.loss(u, i, self.temperature, batch["false_negatives"], batch.get("log_q"))
        terms = {"train/task_loss": task, "train/temperature": self.temperature}
        loss = task
        if self.distiller is not None:
            distill, distill_terms = self.distiller(u, i, self.temperature, batch, student_hidden)
            loss = loss + share * distill
            terms.update(distill_terms)
        return self.with_structure(loss, terms, u.shape[0])

    def with_structure(self, loss: torch.Tensor, terms: dict, batch_size: int) -> torch.Tensor:
        """A step's loss + the structure loss of gated towers under penalties or a budget, logged with its terms."""
        if self.user_costs is not None and not self.user_tower.gates.frozen:
            structure, cost_terms = self.structure_loss()
            loss = loss + structure
            terms.update(cost_terms)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({k: v.float() for k, v in terms.items()}, batch_size=batch_size)
        return loss

    def causal_step(self, batch: dict) -> torch.Tensor:
        """`train.objective=causal`: each training sequence's every position predicts its next item, scored
        against the whole (adapted) cached catalog (recsys/losses/catalog.py); + the structure loss if gated."""
        keys = self.user_tower.represent_catalog(self.item_cache)  # [n_items, d] adaptor / ID embeddings trained
        emb, mask = lookup(batch["user_items"], keys)  # [B, N, d], [B, N]
        h = self.user_tower.encode(emb, mask, positions="all")  # [B, N, d] one prediction per position
        targets = batch["targets"].to(self.device)  # [B, N] next item ids, -1 = none
        task = self.catalog_loss(h, keys, targets, self.temperature, self.excluded)
        return self.with_structure(task, {"train/task_loss": task, "train/temperature": self.temperature},
                                   mask.shape[0])

    def user_embeddings(self, batch: dict, catalog: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d] user embeddings of a batch: the text tower over its user texts, or the sequence tower over the
        embeddings of its users' last N items (`batch["user_items"]` [B, N], -1 padded), looked up in `catalog`
        [n_items, d] (validation) or a frozen item tower's cache, else encoded in the batch (end to end)."""
        if not self.sequence:
            return self.user_tower(**batch["user"])
        table = catalog if catalog is not None else self.item_cache
        if table is None:  # end to end: the item tower encodes the batch's history items (gradients reach it)
            ids = batch["user_item_ids"].to(self.device)  # [U] sorted distinct history items
            table_ids = torch.searchsorted(ids, batch["user_items"].clamp(min=0).to(self.device))  # [B, N]
            emb = self.item_tower(**batch["user_item_text"])[table_ids]  # [B, N, d]
            mask = batch["user_items"].to(self.device) >= 0  # [B, N]
            return self.user_tower(emb * mask[..., None], mask)
        return self.user_tower(*lookup(batch["user_items"], table), ids=batch["user_items"].to(table.device))

    def item_embeddings(self, batch: dict, gates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[B + M, d] embeddings of a batch's items: looked up in a frozen item tower's cached catalog, else
        encoded. `gates` (importance scoring) reaches the item side only where the towers share gates."""
        if self.item_cache is not None:
            items = self.item_cache[batch["items"].to(self.item_cache.device)]
        else:
            items = self.item_tower(**batch["item"], gates=None if self.separate else gates)
        if self.sequence:  # a sequence tower's adaptor and ID embeddings
            return self.user_tower.represent(items, batch["items"].to(items.device))
        return items

    def gather_negatives(self, items: torch.Tensor, batch: dict, n_users: int) -> tuple[torch.Tensor, dict, float]:
        """Under data parallelism (train.gather_negatives, several ranks): every rank's items [N, d] gathered with
        gradient, this rank's first, with their ids, log q and false-negative mask rebuilt for the gathered
        columns, and the weight of this rank's mean (recsys/losses/gather.py). One process: as they are."""
        if not self.train_cfg.gather_negatives or world()[1] == 1:
            return items, batch, 1.0
        g = gather_items(items, batch["items"].to(items.device), batch.get("log_q"), n_users)
        fn = false_negatives(batch["history"].to(items.device), g.ids[:n_users], g.ids)  # [B, N]
        return g.items, {**batch, "items": g.ids, "false_negatives": fn, "log_q": g.log_q}, g.share

    @property
    def towers(self) -> list[Tower]:
        """The distinct towers (one when they are shared)."""
        return list({id(t): t for t in (self.user_tower, self.item_tower) if t is not None}.values())

    def attach_distiller(self, distiller: Distiller) -> None:
        """Distil from a teacher (`distill:`): its terms join the loss, its projections the checkpoint."""
        self.distiller = distiller

    def set_item_cache(self, item_emb: torch.Tensor, excluded: torch.Tensor | None = None) -> None:
        """Hand in the frozen item tower's catalog embeddings [n_items, d] (computed once by the recipe) and, under
        the cold-start protocol, the items [n_items] bool no training step may see (not even as a negative)."""
        if not self.model_cfg.freeze_item_tower:
            raise RecsysError("item embeddings are cached only for a frozen item tower (model.freeze_item_tower)")
        self.item_cache = item_emb.clone()  # a normal tensor (encoders run in inference mode): autograd reads it
        self.excluded = excluded if excluded is not None and bool(excluded.any()) else None
        ids = getattr(self.user_tower, "item_ids", None)
        if self.excluded is not None and ids is not None:  # never trained (no gradient reaches them): text alone
            with torch.no_grad():
                ids.weight[self.excluded.to(ids.weight.device)] = 0.0

    # --- learnable structure: gates, penalties, budget ------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.user_tower.gates is not None

    @property
    def costed(self) -> bool:
        """Gated and under penalties or a budget: its structure loss needs the cost model (`set_costs`)."""
        return self.gated and (self.penalty.active or self.budget is not None)

    def set_costs(self, user: CostNormaliser, item: CostNormaliser | None = None) -> None:
        """Hand in the cost model of the gated towers (the user tower's online cost at the run's token budget,
        with latency tables when a latency term needs them; a separate gated item tower's offline cost)."""
        self.user_costs, self.item_costs = user, item

    def on_fit_start(self) -> None:  # what the recipe handed in, onto the device fitting runs on
        if self.costed and self.user_costs is None:
            raise RecsysError("a gated module under penalties or a budget needs its cost model (set_costs)")
        if self.item_cache is not None:
            self.item_cache = self.item_cache.to(self.device)
        if self.excluded is not None:
            self.excluded = self.excluded.to(self.device)
        if self.distiller is not None:
            self.distiller.to_device(self.device)

    @property
    def structure_fixed_from(self) -> float | None:
        """The fraction of training from which the structure is fixed: `compress.target_by` (the fair schedule),
        else 1 − `compress.recovery`; None when it learns to the end."""
        c = self.compress_cfg
        return c.target_by if c.target_by else (1 - c.recovery) if c.recovery else None

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """In-run recovery: from `structure_fixed_from` on the structure is fixed (deterministic gates, no gate
        gradients, no structure loss) and the encoder adapts to it."""
        fixed_from = self.structure_fixed_from
        if fixed_from is not None and self.gated and not self.user_tower.gates.frozen:
            if self.global_step >= fixed_from * int(self.trainer.estimated_stepping_batches):
                if self.compress_cfg.target_by and self.user_costs is not None:
                    self.fix_at_target()
                for tower in self.towers:
                    if tower.gates is not None:
                        tower.gates.freeze()
                self.fixed_at_step = int(self.global_step)
                print(f"recovery: structure fixed at step {self.global_step}", flush=True)

    @torch.no_grad()
    def fix_at_target(self) -> None:
        """The fair schedule's last move before the structure is fixed: the hard shape brought to the budget
        target by one common log α shift (`project_hard_cost`), so the fixed structure is what the schedule
        reached, sublayers rounded as they will be served."""
        costs, metric, target = self.user_costs, self.budget.metric, self.budget.target

        def cost(shape) -> float:
            run = shape.replace(seq_len=costs.base.seq_len, batch=costs.base.batch)
            return float(costs(SoftShape.from_shape(run))[metric])

        gates = self.user_tower.gates
        expected = float(costs(gates.soft_shape(costs.base))[metric])
        if project_hard_cost(gates, cost, target) is None:
            print(f"warning: fair schedule: no hard shape reaches {metric} {target}", flush=True)
        self.fixed_ratios = {"expected": expected, "hard": cost(gates.hard_shape())}

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """The fair schedule (`compress.target_by`): after each optimizer step until the structure is fixed, all
        gates' log α are shifted by one common offset so that the expected cost is the ramped target t' of the next
        step. The task and the Lagrangian decide which units close (their relative log α); the shift makes the
        expected cost follow the schedule whatever the model's gradient scale, so it is at the target by target_by."""
        c = self.compress_cfg
        if not c.target_by or self.user_costs is None or self.user_tower.gates.frozen:
            return
        progress = self.global_step / max(1, int(self.trainer.estimated_stepping_batches))
        target = self.budget.current_target(progress)
        costs, metric = self.user_costs, self.budget.metric
        shift = project_expected_cost(self.user_tower.gates, lambda s: float(costs(s)[metric]), target, costs.base)
        if shift is None and not self.unreachable_warned:
            self.unreachable_warned = True
            print(f"warning: fair schedule: {metric} ratio {target:.3f} is below what closing every gate reaches; "
                  "the budget Lagrangian alone drives it", flush=True)

    def structure_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Penalties (or the budget Lagrangian) on the towers' soft shapes; returns (loss, terms to log)."""
        ratios = self.user_costs(self.user_tower.gates.soft_shape(self.user_costs.base))
        terms = {f"cost/user_{k}": v for k, v in ratios.items()}
        if self.budget is not None:
            progress = self.global_step / max(1, int(self.trainer.estimated_stepping_batches))
            loss = self.budget(ratios[self.budget.metric], progress)
            terms.update({"budget/target": torch.tensor(self.budget.current_target(progress)),
                          "budget/lambda1": self.budget.lambda1, "budget/lambda2": self.budget.lambda2})
        else:
            loss = self.penalty(ratios)
        if self.item_costs is not None:  # offline tower: size and FLOPs only, weighted apart
            item = self.item_costs(self.item_tower.gates.soft_shape(self.item_costs.base))
            terms.update({f"cost/item_{k}": v for k, v in item.items()})
            lam = self.penalty.lambdas
            loss = loss + self.compress_cfg.item_weight * (lam["params"] * item["params"]
                                                           + lam["flops"] * item["flops"])
        terms["train/structure_loss"] = loss
        return loss, terms

    @torch.no_grad()
    def structure_report(self) -> dict:
        """Hard shapes of the gated towers, their cost ratios to dense (the training-time cost model, exact
        at hard shapes) and, in budget mode, whether the final ratio met the target within the tolerance."""
        costs = self.user_costs or CostNormaliser(self.user_tower.shape)
        user = self.user_tower.gates.hard_shape().replace(seq_len=costs.base.seq_len, batch=costs.base.batch)
        out = {"user_shape": user.to_dict(),
               "user_ratios": {k: float(v) for k, v in costs(SoftShape.from_shape(user)).items()}}
        if self.separate and self.item_tower is not None and self.item_tower.gates is not None:
            item_costs = self.item_costs or CostNormaliser(self.item_tower.shape)
            item = self.item_tower.gates.hard_shape().replace(seq_len=item_costs.base.seq_len)
            out["item_shape"] = item.to_dict()
            out["item_ratios"] = {k: float(v) for k, v in item_costs(SoftShape.from_shape(item)).items()}
        if self.fixed_at_step is not None:
            out["fixed_at_step"] = self.fixed_at_step
        if self.fixed_ratios is not None:
            out["fixed_ratios"] = self.fixed_ratios
        if self.budget is not None:
            c = self.compress_cfg
            achieved = out["user_ratios"][c.budget_metric]
            out["budget"] = {"metric": c.budget_metric, "target": c.budget_target, "tolerance": c.budget_tolerance,
                             "achieved": achieved, "met": achieved <= c.budget_target + c.budget_tolerance}
        return out

    def configure_optimizers(self):
        # parameter groups by module: the gates' log α, the budget multipliers, then weights with and without decay
        gate_modules = [t.gates for t in self.towers if t.gates is not None]
        gates = list({id(p): p for g in gate_modules for p in g.parameters() if p.requires_grad}.values())
        multipliers = [p for p in (self.budget.parameters() if self.budget is not None else []) if p.requires_grad]
        special = {id(p) for p in gates + multipliers}
        decay, no_decay = [], []
        for module in self.modules():
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in special:  # biases and LayerNorm weights: no decay
                    (no_decay if p.ndim < 2 else decay).append(p)
                    special.add(id(p))
        c = self.compress_cfg
        groups = [{"params": decay, "weight_decay": self.train_cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0},
                  {"params": gates, "weight_decay": 0.0, "lr": c.gate_lr},
                  {"params": multipliers, "weight_decay": 0.0, "lr": c.lagrangian_lr}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.train_cfg.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if c.target_by and gates:
            print(f"fair schedule: expected {c.budget_metric} at {c.budget_target} by step {int(c.target_by * total)} "
                  f"of {total}, then fixed", flush=True)
        warm = int(self.train_cfg.warmup_ratio * total)

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0
            return (step + 1) / max(1, warm) if step < warm else max(0.0, (total - step) / max(1, total - warm))

        fixed_lr = [g is not groups[0] and g is not groups[1] for g in groups if g["params"]]  # gates, multipliers
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [(lambda _: 1.0) if f else schedule for f in fixed_lr])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- validation: full ranking, same code path as `recsys evaluate` ----------------------------------
    def on_validation_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        if self.item_cache is not None:
            self._item_emb = self.item_cache
        else:
            self._item_emb = encode_texts(self.item_tower, dm.tokenizer, dm.item_texts, dm.data_cfg.item_max_tokens,
                                          self.train_cfg.eval_batch_size, desc="encode items",
                                          progress=False).to(self.device)
        # what users are scored against: a sequence tower's item representations (its adaptor), else the same
        self._item_keys = self.user_tower.represent_catalog(self._item_emb) if self.sequence else self._item_emb

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        u = self.user_embeddings(batch, self._item_emb)  # [B, d]
        scores = u.float() @ self._item_keys.T  # [B, N]
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
        self._item_emb = self._item_keys = None
