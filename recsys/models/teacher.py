"""Distillation from a finished run: the frozen teacher, its cached item embeddings, and the distillation term
`α·distill + β·hidden` a student adds to its loss (`distill:` section; losses in `recsys.losses.distill`).
The teacher arrives as a module: the train recipe loads the run `distill.teacher` names.

The teacher's item embeddings are computed once per fit over the whole catalog and looked up by item id; its
user embeddings (and hidden states, for layer-wise distillation) are computed per batch without gradients.
Teacher and student read the same tokens, so their tokenizers must have the same vocabulary.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from recsys.config import DistillConfig
from recsys.errors import RecsysError
from recsys.losses.distill import EmbeddingMSELoss, HiddenStateLoss, MarginMSELoss, ScoreKLLoss, uniform_layer_map
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.models.tower import encode_texts


@contextmanager
def capture_hidden(encoder: nn.Module):
    """Collect the embedding output and every layer's output of a `BertEncoder` forward (forward hooks):
    yields a list that holds [B, L, H] tensors, index 0 the embeddings, index l layer l."""
    states: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _in, out: states.append(out))
             for m in (encoder.embed, *encoder.layers)]
    try:
        yield states
    finally:
        for h in hooks:
            h.remove()


def _vocab(encoder: str) -> dict:
    return load_tokenizer(resolve_model_path(encoder)).get_vocab()


class Distiller(nn.Module):
    """The distillation terms of a student. Holds the loss modules (with their learned projections, saved with
    the student's checkpoint) and the teacher (not a submodule: it is neither trained nor saved)."""

    def __init__(self, cfg: DistillConfig, teacher: nn.Module, teacher_encoder: str, student_encoder: str,
                 student_dim: int, student_shape, student_layers: list[int] | None = None):
        """`teacher`: a finished run's two-tower module (`recsys.runs.load_teacher`), read with the tokenizer of
        `teacher_encoder`, which must be the student's."""
        super().__init__()
        self.cfg = cfg
        if _vocab(teacher_encoder) != _vocab(student_encoder):
            raise RecsysError(f"distill.teacher: {cfg.teacher} uses encoder {teacher_encoder!r}, whose "
                              f"tokenizer differs from the student's ({student_encoder!r}); "
                              "they must read the same tokens")
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._teacher = [teacher]  # a list: not registered as a submodule (not trained, not saved)
        if cfg.loss == "kl":
            self.loss = ScoreKLLoss(cfg.temperature)
        elif cfg.loss == "margin_mse":
            self.loss = MarginMSELoss()
        else:
            self.loss = EmbeddingMSELoss(student_dim, teacher.user_tower.dim)
        self.hidden = None
        if cfg.hidden_weight > 0:
            t_shape, n_s = teacher.user_tower.encoder.shape, student_shape.n_layers
            layer_map = cfg.layer_map or uniform_layer_map(n_s, t_shape.n_layers)
            if cfg.layer_map is None and student_layers is not None and student_layers[-1] < t_shape.n_layers:
                layer_map = [i + 1 for i in student_layers]  # a student cut from the teacher's layers learns those
            if len(layer_map) != n_s or not all(0 <= t <= t_shape.n_layers for t in layer_map):
                raise RecsysError(f"distill.layer_map: {layer_map} needs {n_s} entries in [0, {t_shape.n_layers}] "
                                  f"(student layers → teacher layers, 0 = none)")
            self.hidden = HiddenStateLoss(layer_map, student_shape.hidden, t_shape.hidden)
        self.item_emb: torch.Tensor | None = None  # [n_items, d_t], set by cache_items

    @property
    def teacher(self):
        return self._teacher[0]

    def cache_items(self, item_texts: list[str], tokenizer, max_tokens: int) -> None:
        """Teacher embeddings of the whole catalog, once per fit (the recipe calls this before fitting)."""
        self.item_emb = encode_texts(self.teacher.eval().item_tower, tokenizer, item_texts, max_tokens,
                                     desc="teacher items", progress=False)

    def to_device(self, device) -> None:
        """The teacher and its cached item embeddings onto the student's device."""
        self.teacher.to(device)
        if self.item_emb is not None:
            self.item_emb = self.item_emb.to(device)

    def forward(self, users: torch.Tensor, items: torch.Tensor, temperature: torch.Tensor, batch: dict,
                student_hidden: list[torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """α·distill (+ β·hidden) for one batch: users [B, d], items [B + M, d] are the student's embeddings."""
        t = self.teacher.eval()
        with torch.no_grad():
            if self.hidden is not None:
                with capture_hidden(t.user_tower.encoder) as t_hidden:
                    t_users = t.user_tower(**batch["user"])  # [B, d_t]
            else:
                t_users, t_hidden = t.user_tower(**batch["user"]), None
            if self.cfg.loss != "embedding_mse":
                t_items = self.item_emb[batch["items"]]  # [B + M, d_t]
                t_logits = t_users @ t_items.T / t.temperature  # [B, B + M]
        if self.cfg.loss == "embedding_mse":
            distill = self.loss(users, t_users)
        else:
            distill = self.loss(users @ items.T / temperature, t_logits, batch["false_negatives"])
        terms = {"train/distill_loss": distill}
        total = self.cfg.alpha * distill
        if self.hidden is not None:
            hidden = self.hidden(student_hidden, t_hidden, batch["user"]["attention_mask"])
            terms["train/hidden_loss"] = hidden
            total = total + self.cfg.hidden_weight * hidden
        return total, terms
