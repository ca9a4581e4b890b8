"""Which device a job runs on, and waiting for it: `--device` names resolved once, CUDA work synchronised before a
clock is read (kernels run asynchronously: without it a GPU timing measures the launch, not the work).

    resolve_device("auto")   # cuda:0 where a GPU is, else cpu
    resolve_device("cuda")   # a RecsysError naming the alternative where there is none
"""
from __future__ import annotations

import torch

from recsys.errors import RecsysError


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (a GPU if there is one) as a torch device; a missing GPU is one line."""
    name = str(name or "cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RecsysError(f"--device {name}: unknown device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RecsysError(f"--device {name}: no CUDA device here (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RecsysError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise RecsysError(f"--device {name}: only cpu and cuda are supported")
    return device


def synchronize() -> None:
    """Wait for every queued CUDA kernel (nothing to wait for on a CPU, or before CUDA was used)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
