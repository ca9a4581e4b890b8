"""A `recsys serve` process and a small HTTP client for it, on 127.0.0.1 only: what the serving tests and the load
benchmark (experiments/serve_load.py) start, ask and stop.

`ServerProcess(argv, log_path)` starts `python -m recsys.cli serve ARGV --port P` on a free loopback port, its
stdout and stderr to `log_path`. `wait_healthy(timeout_s)` waits for `GET /health` to answer 200 (a one-line
`RecsysError` naming the log when the process dies first or the bound passes; the process is stopped then).
`get(path)` / `post(path, body)` answer (status, JSON body); a body that is not JSON comes back as
`{"text": …}`; an HTTP error status is returned with its body, a connection that fails raises `OSError`.
`stop()` sends SIGTERM (the server drains the requests in flight), waits at most `stop_timeout_s`, then kills,
and returns the exit code. As a context manager it stops the process on exit.

The server is launched by module name (`-m recsys.cli`), not imported: this layer stays below the CLI.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Mapping, Sequence

from recsys.errors import RecsysError

HOST = "127.0.0.1"  # loopback only


def free_port(host: str = HOST) -> int:
    """A TCP port nothing on `host` listens on right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`recsys serve ARGV` in its own process on 127.0.0.1:`port`, its output in `log_path`."""

    def __init__(self, argv: Sequence[str], log_path: Path | str, *, name: str = "recsys serve",
                 cwd: Path | str | None = None, env: Mapping[str, str] | None = None,
                 request_timeout_s: float = 60.0, stop_timeout_s: float = 120.0):
        self.name = name
        self.port = free_port()
        self.log_path = Path(log_path)
        self.request_timeout_s = request_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.command = [sys.executable, "-m", "recsys.cli", "serve", *argv, "--port", str(self.port)]
        with open(self.log_path, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command, cwd=cwd, env=None if env is None else dict(env),
                                         stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.25) -> None:
        """Until `GET /health` answers 200; a RecsysError (and the process stopped) if it dies or `timeout_s` passes."""
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RecsysError(f"{self.name}: the server exited ({self.proc.returncode}) before answering "
                                      f"/health; see {self.log_path}")
                try:
                    if self.get("/health")[0] == 200:
                        return
                except OSError:
                    pass  # not listening yet
                time.sleep(poll_s)
            raise RecsysError(f"{self.name}: the server did not answer /health within {timeout_s:g} s; "
                              f"see {self.log_path}")
        except BaseException:
            self.stop()
            raise

    def get(self, path: str) -> tuple[int, dict]:
        return self._call(urllib.request.Request(self.url + path))

    def post(self, path: str, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._call(urllib.request.Request(self.url + path, data=data, headers={"Content-Type": content_type}))

    def _call(self, req: urllib.request.Request) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout_s) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:  # an answer, with an error status
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:  # /health answers plain text
            return status, {"text": raw.decode(errors="replace")}

    def output(self) -> str:
        """The server's log so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (drains the requests in flight), at most `stop_timeout_s`, then kill; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
