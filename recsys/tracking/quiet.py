"""Known third-party noise, silenced in one place (`recsys --verbose` shows everything).

Every command used to start with torchao's "Failed to load …_C_cutlass_90a / _C_mxfp8" (GPU kernels a CPU wheel
cannot load), "Detected no triton", torch's `register_constant` deprecation notes from torchao's enums,
Lightning's litlogger tip and GPU/TPU lines, and Lightning's pytree deprecation warning. None of it is actionable
for a user of this framework; real warnings (ours, Optuna's, a budget missed) still print.
"""
from __future__ import annotations

import logging
import warnings

QUIET_LOGGERS = {
    "torchao": logging.ERROR,  # "Failed to load ..." CUDA-only kernels, "Detected no triton"
    "torch.utils._pytree": logging.ERROR,  # "register_constant() on Enum subclasses is deprecated"
    "pytorch_lightning.utilities.rank_zero": logging.WARNING,  # the litlogger tip, "GPU available: False"
    "lightning.pytorch.utilities.rank_zero": logging.WARNING,
    "lightning_fabric.utilities.rank_zero": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,  # "torchvision is not installed. Skipping …"
}
QUIET_LOG_MESSAGES = (
    "Please consider to run pre-processing before quantization",  # ONNX Runtime's quantize_dynamic, on root
)
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's use of torch's pytree
    r".*is smaller than the logging interval.*",  # short sweeps trials log less often than every 10 steps
    r".*your dataloader is not resumable.*",  # --resume rebuilds the epoch's order itself (RecDataModule.resume_from)
    # DDP: validation metrics are computed from every rank's users, gathered before they are logged
    # (TwoTowerModule.on_validation_epoch_end): each rank logs the same global value, nothing is left to reduce
    r".*self\.log\('val/[^']*', \.\.\., sync_dist=True\).*",
)


def quiet_third_party() -> None:
    """Silence the known third-party noise (before the libraries are imported, so their import-time messages
    are caught too)."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    root = logging.getLogger()
    if not any(getattr(f, "quiet_third_party", False) for f in root.filters):
        root.addFilter(_RootFilter())


class _RootFilter(logging.Filter):
    quiet_third_party = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(m in record.getMessage() for m in QUIET_LOG_MESSAGES)
