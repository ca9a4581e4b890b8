"""Run directories that appear whole or not at all, and the record every run keeps of where it ran."""
from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from recsys.errors import RecsysError

PACKAGES = ("torch", "transformers", "pytorch-lightning", "torchmetrics", "wandb", "numpy", "scipy", "tokenizers",
            "optuna", "faiss-cpu", "deepspeed", "torchao")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> list[str]:
    """The CPU's vector-instruction flags that decide kernel speed (int8 needs VNNI/AMX, bf16 AVX512-BF16/AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    return []


def hardware() -> dict:
    """CPU model and flags, logical CPUs, torch threads and the accelerator (if any)."""
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    out = {}
    for p in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[p] = importlib.metadata.version(p)
    return out


def git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment_record() -> dict:
    return {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "hardware": hardware(),
            "versions": versions(), "git": git_commit()}


def write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


@contextlib.contextmanager
def staged_dir(final: Path, keep: tuple[str, ...] = (), resume: bool = False):
    """Yield a staging folder `<final>.partial` renamed to `final` on success and removed on any failure.

    So a run folder under results/ is either complete or absent: nothing half-written survives an error — except
    the files named in `keep` (a training run's last full-state checkpoint and its config), which a failure leaves
    alone in `<final>.partial/` so that `resume=True` continues in the same staging folder. The name is locked
    while it is written (`<final>.lock`): a second writer of the same name is refused at once, and never removes
    the first one's staging folder.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final.with_name(final.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RecsysError(f"{final} is being written by another process (locked); choose another name") from None
    try:
        staging = final.with_name(final.name + ".partial")
        if not resume:
            shutil.rmtree(staging, ignore_errors=True)  # left by a process that died (we hold the name's lock)
        staging.mkdir(parents=True, exist_ok=True)
        try:
            yield staging
        except BaseException:
            kept = [staging / k for k in keep if (staging / k).is_file()]
            if kept and keep and (staging / keep[0]).is_file():  # what a resume needs; the rest goes
                for p in sorted(staging.rglob("*"), reverse=True):
                    if p.is_file() and p not in kept:
                        p.unlink()
                    elif p.is_dir() and not any(p.iterdir()):
                        p.rmdir()
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if final.exists():  # swap: the old folder goes aside first, so an interruption loses neither
            old = final.with_name(f"{final.name}.replaced-{os.getpid()}")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        lock.release()
        Path(lock.lock_file).unlink(missing_ok=True)  # no lock file left in results/


def markdown_table(rows: list[dict], columns: list[str], floatfmt: str = ".4f") -> str:
    """A GitHub-Markdown table of `rows` restricted to `columns`."""
    def fmt(v):
        return format(v, floatfmt) if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
