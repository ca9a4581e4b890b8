"""A multi-process (DDP) run's ranks as its user sees them: when one dies, one line names it, and the others'
communication tracebacks (gloo's "Connection closed by peer", 100+ lines) stay out of view.

Rank 0 is the process the user started; Lightning starts ranks 1… as its children with `LOCAL_RANK` in their
environment. Rank 0 watches its children (`watch_ranks`): a child that ends before the run does is reported at
once — before Lightning's own observer stops every process, a few seconds later. A child whose collective fails
reports rank 0 when its parent is gone (`rank_failure`). Linux (/proc); elsewhere the line says less.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

_reported = threading.Event()  # the line was printed: the failure that follows in this process stays quiet
# {pid: rank} of the child ranks rank 0's watch has seen alive: a child that died is a zombie whose /proc environ
# reads empty, so its rank can no longer be read there (rank_failure looks it up here)
_known: dict[int, int] = {}


def this_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def _child_ranks(parent: int) -> dict[int, int]:
    """{pid: rank} of `parent`'s child processes that are ranks of a run (LOCAL_RANK in their environment)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:  # fields: state, ppid, …
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"LOCAL_RANK=")), None)
        if rank is not None and rank.isdigit():
            out[int(stat.parent.name)] = int(rank)
    return out


def _how_it_ended(pid: int) -> str:
    """A dead child not yet reaped (a zombie) keeps its exit status in /proc/<pid>/stat (field 52)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            return ""
        status = int(fields[49])
    except (OSError, IndexError, ValueError):
        return ""
    if status & 0x7F:
        sig = status & 0x7F
        return f" (killed by {_signal_name(sig)})"
    return f" (exit code {status >> 8})"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def report(line: str) -> None:
    """Print the one line of a rank's failure (once per process)."""
    if not _reported.is_set():
        _reported.set()
        print(f"error: {line}", file=sys.stderr, flush=True)


def reported() -> bool:
    return _reported.is_set()


def watch_ranks(interval: float = 0.5) -> threading.Event:
    """Rank 0: report the first child rank that ends badly while the run goes on. Each child found (a /proc scan
    every `interval` s) gets a thread blocked in waitid(WNOWAIT) — woken the moment the child ends, leaving it to be
    reaped by Lightning as before — so the line comes before Lightning's observer (which polls every 5 s) stops
    every process. A child that exits 0 has finished; one Lightning stops itself after Ctrl-C (SIGINT ignored from
    then on) is not reported. Returns an event that ends the watch."""
    stop = threading.Event()
    me = os.getpid()

    def wait(pid: int, rank: int) -> None:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except (ChildProcessError, OSError):
            return  # already reaped
        if info is None or stop.is_set() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return
        if info.si_code == os.CLD_EXITED and info.si_status == 0:
            return
        how = (f"exit code {info.si_status}" if info.si_code == os.CLD_EXITED else
               f"killed by {_signal_name(info.si_status)}")
        report(f"DDP rank {rank} (pid {pid}) died ({how}); the run stops (Lightning ends the other ranks), its "
               f"last checkpoint kept for --resume")

    def scan() -> None:
        waiting: set[int] = set()
        while not stop.is_set():
            for pid, rank in _child_ranks(me).items():
                _known[pid] = rank
                if pid not in waiting:
                    waiting.add(pid)
                    threading.Thread(target=wait, args=(pid, rank), name=f"recsys-rank-{rank}", daemon=True).start()
            stop.wait(interval)

    threading.Thread(target=scan, name="recsys-rank-watch", daemon=True).start()
    return stop


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def is_rank_failure(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a collective that failed because a peer rank is gone."""
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistBackendError", None), getattr(dist, "DistNetworkError", None),
                              getattr(dist, "DistError", None)) if k is not None)
    needles = ("gloo", "nccl", "connection closed by peer", "connection reset by peer", "broken pipe")
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (kinds and isinstance(e, kinds)) or (isinstance(e, RuntimeError)
                                                 and any(n in str(e).lower() for n in needles)):
            return True
        e = e.__cause__ or e.__context__
    return False


def rank_failure(e: BaseException) -> str | None:
    """The one line for a rank whose collective failed (None when `e` is no such failure)."""
    if not is_rank_failure(e):
        return None
    me = this_rank()
    if me != 0:
        parent = os.getppid()
        if parent == 1 or not _alive(parent):
            return f"DDP rank 0 died; rank {me} (pid {os.getpid()}) stops too"
        return f"DDP: a peer rank died or stopped answering; rank {me} (pid {os.getpid()}) stops too"
    deadline = time.monotonic() + 1.0  # rank 0: a dying child may take a moment to be seen gone
    while True:
        ranks = {**_known, **_child_ranks(os.getpid())}  # a dead child's rank: from the watch (see _known)
        dead = {pid: rank for pid, rank in ranks.items() if not _alive(pid)}
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if dead:
        pid, rank = min(dead.items(), key=lambda kv: kv[1])
        return f"DDP rank {rank} (pid {pid}) died{_how_it_ended(pid)}; the run stops"
    return "DDP: a rank died or stopped answering (its collective failed); the run stops"
