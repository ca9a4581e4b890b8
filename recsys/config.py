"""Typed run configuration: dataclasses validated on load, YAML files, dotted command-line overrides.

A config file has up to four sections (`data`, `model`, `train`, `tracking`); any key may be overridden on the
command line as `section.key=value` (the value is parsed as YAML). Unknown keys are rejected with the closest
valid name, types and ranges are checked, and every error is one line naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from recsys.errors import RecsysError, read_utf8

# --- the choices a config can make: one definition each, used by validation, the CLI and the code that acts -------
# Two precisions, two settings: how a run trains (Lightning's names) and how its towers are served and measured.
TrainPrecision = Literal["32", "bf16-mixed", "16-mixed", "bf16-true"]  # train.precision (bf16: AVX512-BF16/AMX, GPU)
ServingPrecision = Literal["fp32", "bf16", "int8"]  # compress.precision: the route that serves the towers
Int8Backend = Literal["torchao", "onnxruntime"]  # int8 kernels: torchao (VNNI/AMX CPUs, GPUs), ONNX Runtime (any x86)
QuantizableLayer = Literal["attention", "ffn", "projection"]  # Linear layers int8 may replace (quantize_layers)
GateKind = Literal["heads", "ffn", "blocks", "output"]  # what can be gated (compress.gates)
CostMetric = Literal["params", "flops", "latency"]  # a budget's metric
DistillLoss = Literal["kl", "margin_mse", "embedding_mse"]  # distill.loss
AttnImplementation = Literal["sdpa", "eager"]
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
WandbMode = Literal["offline", "online", "disabled"]
ColdOffset = Literal["val", "none"]  # train.cold_offset: never-trained items' score offset, chosen on val | none
UserTower = Literal["text", "sequence"]  # model.user_tower: the user-tower family (recsys/models/sequence_tower.py)
ItemRepresentation = Literal["text", "text+id"]  # model.item_representation: inductive text, or text + a learned ID
SequenceReadout = Literal["last", "mean_residual"]  # model.sequence_readout: the newest state, or mean + residual
ItemSpace = Literal["item", "hidden"]  # model.item_space: items in the item encoder's dim, or the transformer's
SequenceScore = Literal["cosine", "dot"]  # model.sequence_score: unit vectors (cosine / τ), or raw dot products
ItemBackend = Literal["bert", "auto"]  # model.item_encoder_backend: our BERT module, or any HF model, frozen
Pooling = Literal["mean", "cls", "last"]  # model.item_pooling (auto backend): token states → one item vector
ItemDtype = Literal["fp32", "bf16"]  # model.item_dtype (auto backend): the precision items are encoded in
Objective = Literal["in_batch", "causal"]  # train.objective: how a step's loss is formed (recsys/losses/)
# retrieval.index: how the catalog is searched (recsys/retrieval/index.py): exact (torch matmul + top-k) or a faiss
# index: flat inner product, IVF (k-means), IVF-PQ, HNSW, scalar-quantized flat (sq8, fp16)
IndexKind = Literal["exact", "flat", "ivf", "ivfpq", "hnsw", "sq8", "fp16"]
IndexDevice = Literal["cpu", "gpu"]  # retrieval.device: faiss-cpu, or faiss's GPU indexes (the GPU build)
ProbeKind = Literal["centroids", "queries"]  # retrieval.probe: how IVF picks the lists a query searches


def choices(tp) -> tuple:
    """The values a Literal choice type allows, e.g. choices(ServingPrecision) == ("fp32", "bf16", "int8")."""
    return typing.get_args(tp)


def check_quantize_layers(layers, backend: str = "torchao") -> None:
    """Layer names int8 can quantize, for `backend` (ValueError otherwise)."""
    for name in layers:
        if name not in choices(QuantizableLayer):
            raise ValueError(f"quantize_layers: {name!r} cannot be quantized to int8 (supported: "
                             f"{', '.join(choices(QuantizableLayer))}; embeddings and LayerNorms stay float)")
    if backend == "onnxruntime" and "projection" in layers:
        # the exporter writes the projection (a 2-D input) as Gemm, which quantize_dynamic leaves in float
        raise ValueError("quantize_layers: 'projection' stays float with int8_backend=onnxruntime (its dynamic "
                         "quantization has no integer Gemm); quantize attention and ffn")


ZERO_STAGES = (1, 2, 3)  # DeepSpeed ZeRO stages train.zero_stage may name (configs/deepspeed/zero<stage>.json)
MIN_TOKENS = 8  # the shortest user text (in tokens) a run may be trained or served at


@dataclass
class DataConfig:
    """Which dataset, and how user/item texts are built from it."""

    name: str = "synthetic"  # a registered dataset: synthetic, ml-100k, ml-1m, amazon2018:<Category>, mind, custom
    path: str | None = None  # folder holding the dataset's files (default: <data_dir>/<dataset folder>)
    data_dir: str | None = None  # root of downloaded datasets (default: $RECSYS_DATA_DIR or ./data)
    min_rating: float | None = None  # keep only interactions rated >= this (implicit feedback: None keeps all)
    seed: int = 0  # synthetic data seed
    synthetic_users: int = 1000  # synthetic data size
    synthetic_items: int = 2000  # synthetic catalog size
    history_items: int = 10  # N most recent history items in the user text, most recent first
    user_max_tokens: int = 128  # user-text length at evaluation
    train_user_max_tokens: int | None = None  # user-text length while training (None = user_max_tokens)
    item_max_tokens: int = 64  # item-text length (training and evaluation)
    # cold start: the items held out are removed from training sequences, never a training target or negative, so
    # they appear only as validation/test targets; metrics on warm and cold targets apart (recsys/data/split.py)
    cold_items: float = 0.0  # cold start: this share of the catalog's items is held out of training entirely
    cold_seed: int = 0  # seeds which items are cold
    label: str | None = None  # names this dataset's result folders (default: its name; custom: custom-<folder>)

    def __post_init__(self):
        _check_positive(self, "history_items", "item_max_tokens", "synthetic_users", "synthetic_items")
        if self.label is not None:
            check_folder_name(self.label, "label")
        # a token budget is structure (searched like heads and FFN width); below 8 tokens a title does not fit
        # (the encoder's own maximum is checked when the tower is built)
        _check_range(self, "user_max_tokens", MIN_TOKENS, None)
        if self.train_user_max_tokens is not None:
            _check_range(self, "train_user_max_tokens", MIN_TOKENS, None)


@dataclass
class ModelConfig:
    """The two-tower model: encoder(s), pooling, projection and score temperature."""

    encoder: str = "minilm"  # "minilm" (packaged all-MiniLM-L6-v2), a local HF BERT directory, or a hub id
    item_encoder: str | None = None  # separate item tower from another checkpoint (implies shared_towers=False)
    shared_towers: bool = True  # one encoder for users and items
    projection_dim: int | None = None  # optional linear projection of pooled embeddings to this many dims
    temperature: float = 0.05  # score = dot(u, i) / temperature on L2-normalised embeddings
    learn_temperature: bool = False  # train the score temperature too
    attn_implementation: AttnImplementation = "sdpa"  # sdpa (fused) | eager
    dropout: float | None = None  # hidden + attention dropout while training (None = the checkpoint's)
    init_from: str | None = None  # a run folder (or .ckpt) whose tower weights initialise this model's
    layers: list[int] | None = None  # keep only these encoder layers (0-based, e.g. [1, 3, 5]: a 3-layer student)
    # the item tower is fixed (separate from the user tower, no gates): its catalog embeddings are computed once
    # per fit and looked up, so a step trains the user tower only (1.3-1.4x the examples/s at 64-token users)
    freeze_item_tower: bool = False  # item tower fixed as loaded; its catalog embeddings cached
    # e.g. a sequence user tower over the text two-tower's fine-tuned item vectors (with freeze_item_tower: fixed);
    # the encoder and data.item_max_tokens must be the run's; not with a shared tower (it would replace the user's)
    item_tower_from: str | None = None  # a finished run whose item tower initialises this model's item tower
    # the user tower's family: text (the encoder over the titles of the last data.history_items items) | sequence
    # (UniSRec-style: a small transformer over the item tower's embeddings of those items + positions)
    user_tower: UserTower = "text"  # text | sequence (the sequence_* keys below shape a sequence tower)
    sequence_items: int = 50  # sequence tower: N, the most recent history items it reads (its positions)
    sequence_layers: int = 2  # sequence tower: transformer layers (1-2)
    sequence_heads: int = 2  # sequence tower: attention heads
    sequence_hidden: int | None = None  # sequence tower: width (None = the item embedding dim)
    sequence_ffn: int | None = None  # sequence tower: FFN neurons per layer (None = 2 x width)
    sequence_dropout: float = 0.1  # sequence tower: hidden and attention dropout while training
    sequence_adaptor: bool = False  # sequence tower: a trainable residual MLP over the item embeddings it reads
    sequence_moe: int = 0  # sequence tower: UniSRec's whitening mixture of this many experts instead (0 = off)
    # last: the transformer's state at the newest item | mean_residual: the mean of the history's item vectors +
    # the transformer's state through a zero-initialised projection (step 0 = the zero-shot mean of item vectors)
    sequence_readout: SequenceReadout = "last"  # sequence tower: last | mean_residual (starts at the zero-shot mean)
    sequence_causal: bool = False  # sequence tower: causal attention (every position predicts its next item)
    # cosine: user and item representations are unit vectors, score = cos / temperature | dot: neither is
    # normalised, score = dot / temperature (SASRec's score: a vector's norm can carry an item's popularity)
    sequence_score: SequenceScore = "cosine"  # sequence tower: cosine | dot (temperature then sets the start scale)
    # text: an item is its text vector (inductive: items unseen in training are scored) | text+id: + a learned ID
    # embedding per catalog item (transductive; UniSRec's fine-tuning setting), dropped with id_dropout in training
    item_representation: ItemRepresentation = "text"  # sequence tower: text (inductive) | text+id (transductive)
    id_dropout: float = 0.0  # text+id: probability that an item's ID embedding is dropped in a training step
    # item: item representations live in the item encoder's dim (the adaptor's output; a zero-initialised ID
    # embedding added to the text vector; a width change into and out of the transformer) | hidden: SASRec's layout
    # (Kang & McAuley 2018) with a PLM item side: an item is a linear map of its frozen text vector into the
    # transformer's width (+ an ID embedding initialised as SASRec's), scaled by sqrt(width) on input and scored
    # against the same table (tied input and output embeddings); sequence_readout=last
    item_space: ItemSpace = "item"  # sequence tower: item (the item encoder's dim) | hidden (SASRec's, tied)
    # bert: the item tower is our BERT module (trainable, gateable) | auto: item_encoder is any Hugging Face model
    # (or mpnet / smollm2, fetched by `recsys encoders fetch`) loaded with AutoModel, frozen, the catalog embedded
    # once offline and cached (recsys/models/item_encoder.py); sequence user towers only
    item_encoder_backend: ItemBackend = "bert"  # bert (our module) | auto (any HF model, frozen, cached catalog)
    item_pooling: Pooling = "mean"  # auto backend: mean | cls | last (last token: decoder LLMs)
    item_dtype: ItemDtype = "fp32"  # auto backend: fp32 | bf16 item encoding

    def __post_init__(self):
        _check_positive(self, "temperature")
        if self.layers is not None and (not self.layers or sorted(set(self.layers)) != self.layers
                                        or self.layers[0] < 0):
            raise ValueError(f"layers must be increasing, distinct, non-negative layer indices; got {self.layers}")
        if self.dropout is not None:
            _check_range(self, "dropout", 0.0, 1.0)
        if self.projection_dim is not None:
            _check_positive(self, "projection_dim")
        _check_positive(self, "sequence_items", "sequence_layers", "sequence_heads", "sequence_hidden",
                        "sequence_ffn")
        _check_range(self, "sequence_dropout", 0.0, 0.99)
        _check_range(self, "id_dropout", 0.0, 0.99)
        if self.sequence_moe < 0:
            raise ValueError(f"sequence_moe must be >= 0 experts, got {self.sequence_moe}")
        if self.sequence_moe and self.sequence_adaptor:
            raise ValueError("sequence_adaptor and sequence_moe: choose one item adaptor (MLP or whitening experts)")
        if self.user_tower == "text" and (self.item_representation != "text" or self.sequence_readout != "last"
                                          or self.sequence_causal or self.sequence_score != "cosine"):
            raise ValueError("item_representation / sequence_readout / sequence_causal / sequence_score shape a "
                             "sequence user tower; "
                             "set model.user_tower=sequence")
        if self.item_space == "hidden" and (self.user_tower != "sequence" or self.sequence_readout != "last"):
            raise ValueError("item_space=hidden puts items in a sequence tower's width: set model.user_tower=sequence "
                             "and model.sequence_readout=last (mean_residual reads out in the item encoder's dim)")
        if self.item_encoder_backend == "auto" and not (self.user_tower == "sequence" and self.freeze_item_tower):
            raise ValueError("item_encoder_backend=auto: a Hugging Face item encoder is frozen under a sequence "
                             "user tower; set model.user_tower=sequence model.freeze_item_tower=true")
        if self.item_encoder_backend == "auto" and self.item_tower_from:
            raise ValueError("item_tower_from copies a BERT item tower; not with item_encoder_backend=auto")
        if (self.item_tower_from and self.user_tower == "text" and self.shared_towers and self.item_encoder is None
                and not self.freeze_item_tower):
            raise ValueError("item_tower_from: the user and item towers are one shared encoder here; set "
                             "model.shared_towers=false or model.freeze_item_tower=true (or use model.init_from)")
        _check_literals(self)


@dataclass
class TrainConfig:
    """Optimisation, validation and early stopping."""

    seed: int = 0  # seeds weights, example draws and batches
    epochs: int = 3  # passes over the (capped) training examples
    batch_size: int = 64  # users per batch; their target items are the in-batch negatives
    lr: float = 1e-4  # peak learning rate of the encoder (AdamW)
    weight_decay: float = 0.01  # AdamW weight decay of matrices (not biases or LayerNorms)
    warmup_ratio: float = 0.1  # fraction of steps with linear warm-up, then linear decay to 0
    grad_clip: float = 1.0  # gradient-norm clipping (0 = off)
    precision: TrainPrecision = "32"  # Lightning's training precision (bf16 needs AVX512-BF16/AMX or a GPU)
    examples_per_user: int | None = 20  # per-epoch cap on (history prefix -> next item) examples per user
    extra_negatives: int = 0  # random catalog items added as negatives to every batch
    logq_correction: bool = True  # subtract log(item's share of training targets) from logits (Yi et al. 2019)
    val_check_interval: float = 1.0  # fraction of an epoch (<=1) or a number of steps (>1) between validations
    early_stopping_patience: int = 3  # validations without improvement of val NDCG@10 before stopping
    max_minutes: float | None = None  # wall-clock safety cap (budgets are epochs/steps); metrics record if it fired
    # in_batch: each example's target against the batch's targets (sampled softmax, log-q corrected) | causal
    # (sequence towers with a frozen item tower): every position of each training sequence predicts its next item,
    # cross-entropy over the whole cached catalog (SASRec's recipe, Klenitskiy & Vasilev 2023); one pass = one
    # example per user
    objective: Objective = "in_batch"  # in_batch (sampled softmax, log-q) | causal (every position, whole catalog)
    check_val_every_n_epoch: int = 1  # epochs between validations (with val_check_interval 1.0)
    checkpoint_every_steps: int | None = 50  # full-state last.ckpt for `recsys train --resume` (None = none)
    max_steps: int | None = None  # stop after this many optimisation steps (a budget in steps; None: the epochs)
    eval_batch_size: int = 128  # users / items per batch when encoding for evaluation
    # cold start (data.cold_items > 0): `val` adds one offset to the scores of the items no training step saw, the
    # value with the best validation NDCG@10 (recsys/retrieval/cold.py; metrics.json keeps the uncalibrated
    # numbers beside it) | none: the scores as trained
    cold_offset: ColdOffset = "val"  # cold start: never-trained items' score offset, chosen on val | none
    cold_offset_tolerance: float = 0.0  # share of that best val NDCG@10 the offset may spend to lift cold targets
    num_workers: int = 0  # DataLoader worker processes
    # 1 is the safe default: with another job on the cores, a small tower ran 16-60x slower with 2 threads than 1
    threads: int | None = 1  # torch intra-op threads while a run trains and is evaluated (None: one per core)
    accelerator: Accelerator = "auto"  # Lightning accelerator: auto | cpu | gpu | cuda | mps | tpu
    devices: int | str = 1  # Lightning devices: a count, -1 (all), "auto" or ids like "0,1"
    strategy: str = "auto"  # auto | ddp (multi-process) | deepspeed (GPU; ZeRO stage: zero_stage)
    zero_stage: int = 2  # strategy=deepspeed: ZeRO stage 1 | 2 | 3 (configs/deepspeed/zero<stage>.json)
    # several processes (ddp, deepspeed): every rank's users score every rank's items (recsys/losses/gather.py)
    gather_negatives: bool = True  # cross-rank in-batch negatives under data parallelism

    def __post_init__(self):
        _check_positive(self, "epochs", "batch_size", "lr", "eval_batch_size", "check_val_every_n_epoch")
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage must be one of {', '.join(map(str, ZERO_STAGES))} (DeepSpeed ZeRO); "
                             f"got {self.zero_stage}")
        _check_range(self, "warmup_ratio", 0.0, 1.0)
        _check_range(self, "weight_decay", 0.0, None)
        _check_range(self, "grad_clip", 0.0, None)
        _check_range(self, "cold_offset_tolerance", 0.0, 1.0)
        _check_range(self, "extra_negatives", 0, None)
        _check_range(self, "num_workers", 0, None)
        _check_range(self, "early_stopping_patience", 0, None)
        _check_positive(self, "val_check_interval")
        for k in ("examples_per_user", "max_minutes", "checkpoint_every_steps", "threads", "max_steps"):
            if getattr(self, k) is not None:
                _check_positive(self, k)
        _check_literals(self)
        d = self.devices
        if not ((isinstance(d, int) and (d > 0 or d == -1)) or d == "auto"
                or (isinstance(d, str) and all(p.strip().isdigit() for p in d.split(",")))):
            raise ValueError(f"devices must be a count > 0, -1 (all), 'auto' or device ids like '0,1'; got {d!r}")


@dataclass
class TrackingConfig:
    """Where runs go and how they are tracked."""

    results_dir: str = "results"  # runs go to <results_dir>/runs/<run_name>/
    run_name: str | None = None  # default: <dataset>-<timestamp>
    wandb: WandbMode = "offline"  # offline (no key, no network) | online | disabled; $WANDB_MODE wins
    wandb_project: str = "recsys"  # W&B project of runs and sweep summaries
    wandb_group: str | None = None  # W&B run group (a sweep puts its trials in the study's group)
    progress_bar: bool = True  # Lightning's progress bar
    overwrite: bool = False  # replace a finished run of the same name (never one that is being written)
    log_every_steps: int = 10  # training steps between logged training metrics (log/metrics.csv, W&B)

    def __post_init__(self):
        _check_literals(self)
        _check_positive(self, "log_every_steps")
        if self.run_name is not None:
            check_folder_name(self.run_name, "run_name")


@dataclass
class CompressConfig:
    """Learnable structure and its cost: hard-concrete gates, λ penalties or a budget (`recsys train`).

    Penalty mode adds λp·P + λf·F + λl·T (costs normalised by the dense model's; online cost of the user tower:
    batch 1 + retrieval over the catalog). Budget mode (budget_metric + budget_target) drives one cost ratio
    to the target with a Lagrangian instead. See recsys/losses/penalties.py.
    """

    gates: list[GateKind] = field(default_factory=list)  # any of heads, ffn, blocks, output ([] = no gates)
    ffn_group: int = 1  # FFN neurons per gate
    gate_init: float = 3.0  # initial log α (3.0: every deterministic gate is 1, the model starts dense)
    # log α starts from the dense model's importance scores (model.init_from; recsys/models/importance.py): per
    # gate kind, ranked as post-hoc pruning ranks them, spread evenly over gate_init ± importance_spread / 2
    importance_init: bool = False  # gates' log α start from the dense model's importance ranks
    importance_spread: float = 3.0  # range of those initial log α around gate_init
    gate_lr: float = 0.05  # learning rate of the gates (constant; the encoder's follows its schedule)
    lambda_params: float = 0.0  # penalty weight on parameters / dense
    lambda_flops: float = 0.0  # penalty weight on online FLOPs / dense
    lambda_latency: float = 0.0  # penalty weight on predicted online latency / dense
    budget_metric: CostMetric | None = None  # budget mode: params | flops | latency
    budget_target: float | None = None  # target cost as a fraction of dense, in (0, 1]
    budget_warmup: float = 0.5  # fraction of training over which the target ramps from 1 to budget_target
    budget_tolerance: float = 0.05  # the run meets its budget if the final ratio <= target + tolerance
    lagrangian_lr: float = 0.05  # learning rate of the budget multipliers (gradient ascent)
    # the fair schedule (budget mode): the target ramps from the starting cost over the first half of target_by
    # (budget_warmup unused) and is held for the second; after every step the gates are shifted together onto it
    # (the Lagrangian and the task decide which units close), at target_by the hard shape is brought to the target
    # and fixed, and the rest of training recovers (with distillation, if distill: is set)
    target_by: float | None = None  # fair schedule: expected cost at the target by this fraction of steps, then fixed
    # prune-then-learn (budget mode): heads and FFN groups closed by importance as post-hoc pruning closes them, at
    # the ratio whose cost meets budget_target; the gates then learn from that pattern, the target held from step 0
    prune_init: bool = False  # gates start from post-hoc pruning at the budget target's cost, then learn
    item_weight: float = 1.0  # separate towers: weight of the item tower's params/FLOPs penalties (offline)
    freeze_gates: bool = False  # fixed structure (recovery fine-tuning of a gated run given as model.init_from)
    recovery: float = 0.0  # final fraction of training with the structure fixed: in-run recovery fine-tuning
    prune_ratio: float | None = None  # post-hoc pruning: close this fraction of heads and FFN groups by importance
    prune_batches: int = 8  # training batches whose gradients score the units (Michel et al. 2019)
    precision: ServingPrecision = "fp32"  # how the towers are served and measured (recsys/serving/quantize.py)
    qat: bool = False  # int8 quantization-aware training: Linear layers fake-quantised as int8_backend serves them
    int8_backend: Int8Backend = "torchao"  # int8 kernels: torchao (VNNI/AMX CPUs, GPUs) | onnxruntime (any x86)
    quantize_layers: list[QuantizableLayer] = field(default_factory=lambda: ["attention", "ffn"])  # int8 Linears

    def __post_init__(self):
        for g in self.gates:
            if g not in choices(GateKind):
                raise ValueError(f"gates: unknown gate kind {g!r}{_suggest(g, choices(GateKind))}")
        for k in ("lambda_params", "lambda_flops", "lambda_latency", "item_weight"):
            _check_range(self, k, 0, None)
        _check_positive(self, "prune_batches")
        _check_range(self, "importance_spread", 0.0, None)
        if self.importance_init and not self.gates:
            raise ValueError("importance_init initialises gates: set compress.gates (e.g. [heads, ffn])")
        if self.importance_init and (self.freeze_gates or self.prune_ratio is not None):
            raise ValueError("importance_init starts gates that learn; a fixed structure (freeze_gates / "
                             "prune_ratio) has none")
        if self.prune_ratio is not None:
            if not 0 <= self.prune_ratio < 1:
                raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
            if not set(self.gates) & {"heads", "ffn"}:
                raise ValueError("prune_ratio needs head or FFN gates (compress.gates=[heads, ffn])")
        if (self.freeze_gates or self.prune_ratio is not None) and (self.penalised or self.budget_metric):
            raise ValueError("a fixed structure (freeze_gates / prune_ratio) takes no penalties or budget")
        _check_literals(self)
        check_quantize_layers(self.quantize_layers, self.int8_backend if self.precision == "int8" else "torchao")
        if self.qat and self.precision != "int8":
            raise ValueError(f"qat trains for int8 serving: set compress.precision=int8 (got {self.precision!r})")
        _check_positive(self, "ffn_group", "gate_lr", "lagrangian_lr")
        _check_range(self, "budget_warmup", 0.0, 1.0)
        if self.target_by is not None:
            if not 0 < self.target_by < 1:
                raise ValueError(f"target_by must be in (0, 1) (a fraction of training steps), got {self.target_by}")
            if self.budget_metric is None:
                raise ValueError("target_by schedules the budget: set compress.budget_metric and budget_target")
            if self.recovery:
                raise ValueError(f"target_by fixes the structure from then on (recovery 1 - target_by); drop "
                                 f"compress.recovery={self.recovery}")
        if self.prune_init:
            if self.prune_ratio is not None or self.freeze_gates:
                raise ValueError("prune_init starts gates that learn from a pruned pattern; prune_ratio / "
                                 "freeze_gates fix the structure instead")
            if self.budget_metric is None:
                raise ValueError("prune_init prunes to the budget target's cost: set compress.budget_metric and "
                                 "budget_target")
            if not set(self.gates) & {"heads", "ffn"}:
                raise ValueError("prune_init needs head or FFN gates (compress.gates=[heads, ffn])")
            if self.gate_init < 2.4:  # ẑ = clamp(1.2·σ(±gate_init) − 0.1, 0, 1) is exactly 1 / 0 from 2.4 on
                raise ValueError(f"prune_init opens kept units at log α = gate_init and closes the rest at -gate_init:"
                                 f" gate_init must be >= 2.4 for an exact pattern, got {self.gate_init}")
        if not 0 <= self.recovery < 1:
            raise ValueError(f"recovery must be in [0, 1) (a fraction of training), got {self.recovery}")
        if self.recovery and not self.gates:
            raise ValueError("recovery fixes a learned structure: it needs gates (compress.gates)")
        _check_range(self, "budget_tolerance", 0.0, None)
        if (self.budget_metric is None) != (self.budget_target is None):
            raise ValueError("budget_metric and budget_target go together (set both or neither)")
        if self.budget_metric is not None:
            if not 0 < self.budget_target <= 1:
                raise ValueError(f"budget_target must be in (0, 1] (a fraction of dense), got {self.budget_target}")
            if self.penalised:
                raise ValueError("choose penalty mode (lambda_*) or budget mode (budget_*), not both")
        if (self.penalised or self.budget_metric) and not self.gates:
            raise ValueError("cost penalties need gates to act on (set compress.gates, e.g. [heads, ffn])")

    @property
    def penalised(self) -> bool:
        return any(v > 0 for v in (self.lambda_params, self.lambda_flops, self.lambda_latency))


@dataclass
class DistillConfig:
    """Distillation from a finished run (`recsys train`): loss = task + alpha·distill + hidden_weight·hidden
    (+ structure penalties). See recsys/losses/distill.py and recsys/models/teacher.py."""

    teacher: str | None = None  # a finished run directory (e.g. the dense fine-tuned two-tower); None = off
    alpha: float = 1.0  # weight of the score/embedding distillation term
    loss: DistillLoss = "kl"  # kl (in-batch score distributions) | margin_mse | embedding_mse
    temperature: float = 1.0  # softening temperature of the kl loss (applied to the logits)
    hidden_weight: float = 0.0  # weight of layer-wise hidden-state distillation of the user tower (0 = off)
    layer_map: list[int] | None = None  # student layer i → teacher layer (0 = none); default uniform

    def __post_init__(self):
        _check_literals(self)
        _check_range(self, "alpha", 0, None)
        _check_range(self, "hidden_weight", 0, None)
        _check_positive(self, "temperature")


@dataclass
class RetrievalConfig:
    """How the catalog is searched online and in `recsys evaluate --index` (recsys/retrieval/index.py)."""

    index: IndexKind = "exact"  # exact (matmul + top-k) | flat | ivf | ivfpq | hnsw | sq8 | fp16 (faiss)
    nlist: int = 1024  # ivf/ivfpq: k-means lists (at most the catalog size)
    nprobe: int = 16  # ivf/ivfpq: lists searched per query
    pq_m: int = 48  # ivfpq: sub-quantizers (must divide the embedding dim)
    pq_nbits: int = 8  # ivfpq: bits per sub-quantizer code
    refine: int = 0  # ivfpq: re-rank refine × k candidates with the exact vectors (0 = off)
    hnsw_m: int = 32  # hnsw: neighbours per node (faiss M)
    ef_construction: int = 80  # hnsw: candidate list while building
    ef_search: int = 128  # hnsw: candidate list while searching (>= k)
    k: int = 100  # items a request retrieves (evaluation ranks items not retrieved after all retrieved ones)
    device: IndexDevice = "cpu"  # cpu | gpu (faiss GPU build and a CUDA device)
    cache: bool = True  # keep item embeddings and built indexes per run and spec (results/cache/index/)
    recall: float = 0.0  # ivf/ivfpq/hnsw: tune nprobe / efSearch to this recall@10 on validation users (0 = off)
    probe: ProbeKind = "centroids"  # ivf: pick lists by their k-means centroids, or by probe vectors fitted to
    #                                 validation user queries (recsys/retrieval/query_aware.py)

    def __post_init__(self):
        _check_literals(self)
        _check_positive(self, "nlist", "nprobe", "pq_m", "hnsw_m", "ef_construction", "ef_search", "k")
        _check_range(self, "pq_nbits", 1, 16)
        _check_range(self, "refine", 0, None)
        _check_range(self, "recall", 0, 1)
        if self.index in ("ivf", "ivfpq") and self.nprobe > self.nlist and not self.recall:  # recall: tuned
            raise ValueError(f"nprobe ({self.nprobe}) must be <= nlist ({self.nlist})")
        if self.index == "hnsw" and self.ef_search < self.k:
            raise ValueError(f"ef_search ({self.ef_search}) must be >= k ({self.k}): HNSW returns at most "
                             f"ef_search candidates")
        if self.refine and self.index != "ivfpq":
            raise ValueError(f"refine re-ranks compressed codes: it applies to index=ivfpq, not {self.index!r}")
        if self.probe != "centroids" and self.index != "ivf":
            raise ValueError(f"probe={self.probe} replaces IVF-Flat's coarse centroids: it applies to index=ivf, "
                             f"not {self.index!r}")
        if self.recall and self.index not in ("ivf", "ivfpq", "hnsw"):
            raise ValueError(f"recall={self.recall} tunes nprobe / efSearch: it applies to ivf, ivfpq and hnsw, "
                             f"not {self.index!r}")


# the keys an index spec string may use (faiss's names beside ours), and which keys each index kind reads
SPEC_ALIASES = {"M": "hnsw_m", "efConstruction": "ef_construction", "efSearch": "ef_search", "m": "pq_m",
                "nbits": "pq_nbits"}
INDEX_KEYS = {"exact": ("k",), "flat": ("k", "device"), "sq8": ("k", "device"), "fp16": ("k", "device"),
              "ivf": ("nlist", "nprobe", "probe", "recall", "k", "device"),
              "ivfpq": ("nlist", "nprobe", "pq_m", "pq_nbits", "refine", "recall", "k", "device"),
              "hnsw": ("hnsw_m", "ef_construction", "ef_search", "recall", "k")}
SPEC_DEFAULTS = {"device": "cpu", "recall": 0.0, "probe": "centroids"}  # left out of a spec string when at them


def parse_index_spec(spec: str, base: RetrievalConfig | None = None) -> RetrievalConfig:
    """An index from a compact spec string, e.g. "hnsw,M=32,efSearch=64", "ivf,nlist=4096,nprobe=32",
    "ivfpq,nlist=1024,m=48,refine=4", "sq8", "exact" (faiss's key names or ours; other keys from `base`)."""
    kind, *pairs = [p.strip() for p in str(spec).split(",")]
    if kind not in choices(IndexKind):
        raise RecsysError(f"index spec {spec!r}: unknown index {kind!r}{_suggest(kind, choices(IndexKind))}")
    data = {**dataclasses.asdict(base or RetrievalConfig()), "index": kind}
    given = set()
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        name = SPEC_ALIASES.get(key.strip(), key.strip())
        if not sep or name not in INDEX_KEYS[kind]:
            valid = sorted({*INDEX_KEYS[kind], *(a for a, n in SPEC_ALIASES.items() if n in INDEX_KEYS[kind])})
            raise RecsysError(f"index spec {spec!r}: {pair!r} is not a setting of {kind} (key=value with key one of "
                              f"{', '.join(valid)})")
        data[name] = load_yaml(raw)
        given.add(name)
    if "nlist" in given and "nprobe" not in given and isinstance(data["nlist"], int):
        data["nprobe"] = min(data["nprobe"], data["nlist"])  # the default nprobe, within a small nlist
    return from_dict(RetrievalConfig, data, f"index spec {spec!r}")


def index_spec(cfg: RetrievalConfig) -> str:
    """The compact spec string of an index (its own settings only): parse_index_spec(index_spec(c)) == c's index."""
    keys = [k for k in INDEX_KEYS[cfg.index] if k not in SPEC_DEFAULTS or getattr(cfg, k) != SPEC_DEFAULTS[k]]
    short = {v: k for k, v in SPEC_ALIASES.items()}
    return ",".join([cfg.index, *(f"{short.get(k, k)}={getattr(cfg, k)}" for k in keys)])


@dataclass
class SASRecConfig:
    """SASRec (`recsys baselines --models sasrec`; recsys/models/sasrec.py): every point of the grid hidden x
    dropout x max_len trained with early stopping on validation NDCG@10, the best point on validation tested."""

    hidden: list[int] = field(default_factory=lambda: [64, 128])  # grid: embedding / hidden size
    dropout: list[float] = field(default_factory=lambda: [0.2, 0.5])  # grid: dropout
    max_len: list[int] = field(default_factory=lambda: [50, 200])  # grid: most recent items read
    n_layers: int = 2  # self-attention blocks
    n_heads: int = 1  # attention heads (must divide every hidden size)
    epochs: int = 200  # most epochs per grid point
    batch_size: int = 128  # users per batch
    lr: float = 1.0e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    eval_every: int = 5  # epochs between validations (early stopping)
    patience: int = 4  # validations without improvement of val NDCG@10 before stopping
    max_minutes: float | None = 3.0  # wall-clock budget per grid point
    seed: int = 0  # seeds weights and batches

    def __post_init__(self):
        for k in ("hidden", "dropout", "max_len"):
            if not getattr(self, k):
                raise ValueError(f"{k}: the grid needs at least one value")
        for h in self.hidden:
            if h <= 0 or h % max(1, self.n_heads):
                raise ValueError(f"hidden: {h} must be > 0 and divisible by n_heads ({self.n_heads})")
        for p in self.dropout:
            if not 0 <= p < 1:
                raise ValueError(f"dropout: {p} must be in [0, 1)")
        for n in self.max_len:
            if n <= 0:
                raise ValueError(f"max_len: the sequence length must be > 0, got {n}")
        _check_positive(self, "n_layers", "n_heads", "epochs", "batch_size", "lr", "eval_every", "patience",
                        "max_minutes")
        _check_range(self, "weight_decay", 0.0, None)


EASE_GRID = (1.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)  # baselines.ease_lambdas default


@dataclass
class BaselinesConfig:
    """The matrix baselines (`recsys baselines`; recsys/retrieval/baselines.py)."""

    ease_max_items: int = 20000  # EASE^R refuses larger catalogs (N² memory, N³ time); ItemKNN stays sparse
    # one EASE^R fit per value: minutes each at ~17k items
    ease_lambdas: list[float] = field(default_factory=lambda: list(EASE_GRID))  # grid: EASE^R's λ, chosen on val
    itemknn_k: list[int] = field(default_factory=lambda: [50, 100, 200, 0])  # grid: ItemKNN neighbours (0 = all)

    def __post_init__(self):
        _check_positive(self, "ease_max_items")
        if not self.ease_lambdas or not self.itemknn_k:
            raise ValueError("ease_lambdas / itemknn_k: a grid needs at least one value")
        if any(v <= 0 for v in self.ease_lambdas):
            raise ValueError(f"ease_lambdas: every λ must be > 0, got {self.ease_lambdas}")
        if any(k < 0 for k in self.itemknn_k):
            raise ValueError(f"itemknn_k: neighbour counts must be >= 0 (0 = all), got {self.itemknn_k}")


@dataclass
class RunConfig:
    """Everything `recsys train` needs; saved resolved with every run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)

    def __post_init__(self):  # checks across sections
        if self.model.user_tower == "sequence":
            if self.distill.hidden_weight > 0:
                raise ValueError("distill.hidden_weight: layer-wise hidden-state distillation maps text-encoder "
                                 "layers; a sequence user tower reads item embeddings (use distill.alpha)")
            c = self.compress
            if c.precision != "fp32":
                raise ValueError(f"compress.precision: a sequence user tower is served in fp32 (eager); got "
                                 f"{c.precision!r}")
            if c.importance_init or c.prune_ratio is not None or c.prune_init:
                raise ValueError("compress.importance_init / prune_ratio / prune_init score text-tower units; with "
                                 "model.user_tower=sequence learn the structure with gates and a penalty")
        if self.compress.importance_init and not self.model.init_from:
            raise ValueError("compress.importance_init scores the dense model's units: set model.init_from to a "
                             "finished dense run")
        if self.compress.prune_init and not self.model.init_from:
            raise ValueError("compress.prune_init prunes the dense model by importance: set model.init_from to a "
                             "finished dense run")
        if self.train.objective == "causal":
            m = self.model
            if m.user_tower != "sequence" or not m.freeze_item_tower or not m.sequence_causal:
                raise ValueError("train.objective=causal: every position predicts its next item over the cached "
                                 "catalog; it needs model.user_tower=sequence model.freeze_item_tower=true "
                                 "model.sequence_causal=true")
            if self.distill.teacher:
                raise ValueError("train.objective=causal: distillation reads in-batch scores "
                                 "(use train.objective=in_batch)")
        if not 0.0 <= self.data.cold_items < 1.0:
            raise ValueError(f"data.cold_items must be in [0, 1), got {self.data.cold_items}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ServeConfig:
    """`recsys serve` (recsys/serving/server.py, controller.py): batching, limits, the latency SLO and the
    controller that moves along the front to hold it."""

    slo_ms: float | None = None  # p99 latency target; with several runs the controller switches models to hold it
    window: int = 64  # latest requests of the serving model whose p99 the controller watches
    min_samples: int = 16  # requests on a model (after a switch) before the controller decides again
    down_at: float = 0.8  # p99 above down_at × SLO: the next faster model
    up_at: float = 0.5  # p99 below up_at × SLO and the slower model fits the load: the next more accurate model
    max_utilization: float = 0.7  # a more accurate model is taken back only below this predicted utilisation
    overload_at: float = 1.0  # the serving model's predicted utilisation above which it moves down at once
    max_batch: int = 1  # dynamic batching: most requests one forward serves (LitServe max_batch_size)
    batch_timeout_ms: float = 0.0  # dynamic batching: longest wait for a batch to fill (LitServe batch_timeout)
    queue_timeout_s: float = 30.0  # a request queued longer is answered 504 without being computed
    max_body_bytes: int = 65536  # larger request bodies get 413
    drain_timeout_s: float = 30.0  # on SIGTERM: longest wait for in-flight requests before stopping
    threads: int | None = None  # torch (and faiss) threads of the model worker (None: torch's default)

    def __post_init__(self):
        _check_positive(self, "slo_ms", "window", "min_samples", "max_batch", "queue_timeout_s", "max_body_bytes",
                        "drain_timeout_s", "threads", "max_utilization", "overload_at")
        _check_range(self, "batch_timeout_ms", 0, None)
        _check_range(self, "down_at", 0, None)
        _check_range(self, "up_at", 0, None)
        if self.min_samples > self.window:
            raise ValueError(f"min_samples ({self.min_samples}) must be <= window ({self.window})")
        if self.overload_at <= self.max_utilization:
            raise ValueError(f"overload_at ({self.overload_at}) must be above max_utilization "
                             f"({self.max_utilization}): a model taken back must not be overloaded at once")
        if self.up_at >= self.down_at:
            raise ValueError(f"up_at ({self.up_at}) must be below down_at ({self.down_at}): the gap is the "
                             "controller's hysteresis")


# --- validation helpers (used by __post_init__; raise ValueError, turned into one-line RecsysErrors) ---------


def _check_positive(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if v is not None and v <= 0:
            raise ValueError(f"{n} must be > 0, got {v}")


MAX_NAME_BYTES = 120  # a run or study name is a folder name (255 bytes at most) with room for .partial / .lock


def check_folder_name(name: str, what: str) -> None:
    """A run or study name becomes one folder: a short, single path component a filesystem accepts."""
    if not name.strip():
        raise ValueError(f"{what} must not be empty")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"{what} is {size} bytes long ({short_repr(name, 40)}); at most {MAX_NAME_BYTES} (it "
                         f"names a folder)")
    bad = sorted({c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ValueError(f"{what} {short_repr(name, 40)} contains {', '.join(repr(c) for c in bad)}; it names one "
                         f"folder (letters, digits, - _ . and the like)")
    if name.startswith(".") or name.startswith("-"):
        raise ValueError(f"{what} {short_repr(name, 40)} must not start with '{name[0]}' (a hidden folder or an "
                         f"option)")


def _check_range(obj, name, lo, hi):
    v = getattr(obj, name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {'inf' if hi is None else hi}], got {v}")


def _check_choice(obj, name, allowed):
    v = getattr(obj, name)
    if v not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {short_repr(v)}")


def _check_literals(obj) -> None:
    """Every field typed with a Literal choice (or an optional one) holds one of its values."""
    for f in dataclasses.fields(obj):
        tp = typing.get_type_hints(type(obj))[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
            typing.Union, types.UnionType) else [tp]
        for a in args:
            if typing.get_origin(a) is Literal and getattr(obj, f.name) is not None:
                _check_choice(obj, f.name, choices(a))


def _suggest(key: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (int/float/str/bool, Optional and unions of those)."""
    origin = typing.get_origin(tp)
    if origin is Literal:  # checked against its values by the dataclass; YAML may read "32" as a number
        allowed = typing.get_args(tp)
        if all(isinstance(a, str) for a in allowed) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except RecsysError as e:
                errors.append(e)
        names = " or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(tp))
        raise RecsysError(f"{where}: expected {names}, got {type(value).__name__} {short_repr(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise RecsysError(f"{where}: expected a list, got {type(value).__name__} {short_repr(value)}")
        return [_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise RecsysError(f"{where}: must be a finite number, got {short_repr(value)}")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise RecsysError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} "
                      f"{short_repr(value)}")


def from_dict(cls, data: dict, where: str = "config", prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise RecsysError(f"{where}: section '{prefix.rstrip('.') or 'top level'}' must be a mapping, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise RecsysError(f"{where}: unknown key '{prefix}{key}'{_suggest(str(key), fields, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            # an empty section (`train:`) is the defaults; `train: 0` is not a section (checked by from_dict)
            kwargs[key] = from_dict(tp, {} if value is None else value, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}: {prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise RecsysError(f"{where}: {prefix}{e}") from None


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.lr=3e-5", "data.name=ml-100k"]` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecsysError(f"override '{item}': expected section.key=value")
        try:
            value = load_yaml(raw) if raw else None
        except yaml.YAMLError as e:
            if "alias" in str(e) or "twice" in str(e):
                raise RecsysError(f"override '{item[:80]}': {getattr(e, 'problem', e)}") from None
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecsysError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


MAX_YAML_VALUES = 100_000  # values one YAML document may expand to, aliases counted at every use


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing two things it accepts silently: a key given twice in one mapping (the last
    would win: almost always an editing mistake) and aliases that expand past MAX_YAML_VALUES values (an alias
    bomb: a few hundred bytes that expand to gigabytes once anything walks or prints them)."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # `<<:` merges are meant to be overridden by the keys beside them
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {str(key)[:60]!r} is given twice (lines {seen[key]} and {line}); "
                        f"keep one", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, sizes: dict, open_: set) -> int:
    """The number of values `node` stands for with every alias expanded (memoised per node: linear in the
    document's size however deep the aliases nest); past MAX_YAML_VALUES, or recursive, a YAML error."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.composer.ComposerError(None, None, "a recursive alias (a value that contains itself)",
                                          node.start_mark)
    open_.add(key)
    children = ([v for kv in node.value for v in kv] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_)
        if size > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand this value to more than {MAX_YAML_VALUES} values (an alias bomb?)",
                node.start_mark)
    open_.discard(key)
    sizes[key] = size
    return size


def load_yaml(text: str):
    """`yaml.safe_load` with the checks of `_Loader` (duplicated keys, bounded alias expansion)."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def short_repr(value: Any, limit: int = 60) -> str:
    """A value for an error message: its repr cut short (never built whole: a value may be huge), and for a
    container its type and size."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    text = r.repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if isinstance(value, (list, tuple, dict, set)):
        text += f" ({type(value).__name__} of {len(value)})"
    return text


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file, a syntax error, a duplicated key or an alias bomb is one line naming
    file:line."""
    p = Path(path)
    if not p.is_file():
        raise RecsysError(f"config file not found: {p}")
    try:
        data = load_yaml(read_utf8(p))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecsysError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        raise RecsysError(f"{p}: the file is empty (expected a mapping of sections: data, model, train, ...)")
    if not isinstance(data, dict):
        raise RecsysError(f"{p}: expected a mapping of sections (data, model, train, ...), got a "
                          f"{type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- dotted overrides, validated."""
    data = read_yaml(path) if path else {}
    where = str(path) if path else "config"
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    for item in overrides or []:
        key, sep, _ = item.partition("=")
        if sep and key in sections:  # `train=` or `train=0` would replace the whole section (and the file's block)
            raise RecsysError(f"override '{item}': '{key}' is a section: set its keys ({key}.<key>=value)")
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        where = f"{where} (with overrides)" if path else "overrides"
    return from_dict(RunConfig, data, where)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe(cfg: RunConfig) -> str:
    """The resolved config as YAML, every key with a one-line comment: what it does (`recsys train
    --print-config`), read from the comments beside the fields above."""
    import inspect
    import re

    lines = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        docs = dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.+)$", inspect.getsource(type(obj)), re.M))
        lines.append(f"{section.name}:  # {(type(obj).__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(obj):
            value = yaml.safe_dump(getattr(obj, f.name), default_flow_style=True, width=1000).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {f.name}: {value}" + (f"  # {docs[f.name]}" if f.name in docs else ""))
    return "\n".join(lines)
