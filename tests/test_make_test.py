"""`make test` runs what `.ci/run` runs: the local PostgreSQL server of the sweep tests is started the same way
(.ci/postgres.sh), and where it cannot be, one line says so and the rest of the suite runs."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _wrapper(ci: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "RECSYS_TEST_POSTGRES"}
    return subprocess.run(["bash", str(ci / "postgres-or-skip.sh")], capture_output=True, text=True, env=env,
                          timeout=600)  # it may install PostgreSQL (apt-get) on a fresh machine


def test_make_test_passes_the_postgres_url_to_the_suite():
    dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", "test"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "RECSYS_TEST_POSTGRES=$(.ci/postgres-or-skip.sh)" in dry.stdout and "pytest" in dry.stdout


def test_where_no_server_can_start_one_line_says_so_and_why(tmp_path):
    ci = tmp_path / ".ci"
    ci.mkdir()
    shutil.copy(REPO / ".ci" / "postgres-or-skip.sh", ci)
    (ci / "postgres.sh").write_text("#!/usr/bin/env bash\necho 'some progress' >&2\n"
                                    "echo 'pg_ctlcluster: command not found' >&2\nexit 127\n")
    (ci / "postgres.sh").chmod(0o755)
    done = _wrapper(ci)
    assert done.returncode == 0 and done.stdout == ""  # an empty URL: the two PostgreSQL tests skip
    assert done.stderr.count("\n") == 1, done.stderr
    assert "no local PostgreSQL" in done.stderr and "pg_ctlcluster: command not found" in done.stderr
    assert "RECSYS_TEST_POSTGRES" in done.stderr


def test_a_given_url_is_used_as_is(tmp_path):
    ci = tmp_path / ".ci"
    ci.mkdir()
    shutil.copy(REPO / ".ci" / "postgres-or-skip.sh", ci)
    (ci / "postgres.sh").write_text("#!/usr/bin/env bash\nexit 1\n")
    done = subprocess.run(["bash", str(ci / "postgres-or-skip.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RECSYS_TEST_POSTGRES": "postgresql://u:p@127.0.0.1:1/db"})
    assert done.stdout.strip() == "postgresql://u:p@127.0.0.1:1/db" and done.stderr == ""


def test_where_a_server_can_start_the_url_reaches_it():
    done = _wrapper(REPO / ".ci")
    if not done.stdout.strip():
        pytest.skip(f"no local PostgreSQL here: {done.stderr.strip()}")
    import sqlalchemy

    engine = sqlalchemy.create_engine(done.stdout.strip())
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
    engine.dispose()


def test_the_hang_guard_is_sized_for_a_slow_machine(request):
    """pytest-timeout stops a test only when it has plainly hung (conftest.HANG_S), never because the machine is
    busy: the issue's 600 s guard fired on a loaded 2-core machine while a benchmark test trained."""
    from conftest import HANG_S

    assert float(request.config.getini("timeout")) == HANG_S >= 3600
