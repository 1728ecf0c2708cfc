"""kill -9 harness (docs/scheduler.md, job contract): SIGKILL the GPU worker and, separately, the scheduler process at random
moments over hundreds of short jobs, then check the job contract's invariants:

- every job reaches exactly one terminal state (one accepted terminal transition in the audit log);
- a succeeded job has exactly one output row and its file, with the recorded sha256;
- attempts <= max_attempts; a failed job failed only because its workers kept dying;
- ``PRAGMA integrity_check`` is ok; no orphaned output files remain;
- every terminal event reached the front end (delivered_at set, the sink saw the right kind).

The kill moments are random (seeded) but the checks do not depend on timing.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from scheduler_support import HERE, session_mp4

# Larger runs: TURBOBOT_HARNESS_JOBS=300 TURBOBOT_HARNESS_WORKER_KILLS=45 TURBOBOT_HARNESS_SCHEDULER_KILLS=15
N_JOBS = int(os.environ.get("TURBOBOT_HARNESS_JOBS", "200"))
WORKER_KILLS = int(os.environ.get("TURBOBOT_HARNESS_WORKER_KILLS", "16"))
SCHEDULER_KILLS = int(os.environ.get("TURBOBOT_HARNESS_SCHEDULER_KILLS", "6"))
MAX_ATTEMPTS = 4  # as in scheduler_harness_app
DEADLINE_S = float(os.environ.get("TURBOBOT_HARNESS_DEADLINE", "240"))


@pytest.fixture(scope="session")
def base_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_mp4(tmp_path_factory)


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, timeout=10)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _worker_pid(db: Path, parent: int) -> int | None:
    """The pid of the worker process of ``parent`` once it has loaded and is serving, else None."""
    if not db.exists():
        return None
    try:
        with _connect(db) as conn:
            rows = conn.execute("SELECT pid FROM workers WHERE state IN ('idle', 'busy')").fetchall()
    except sqlite3.OperationalError:
        return None
    for (pid,) in rows:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:  # our child, not a recycled pid
            return int(pid)
    return None


def _start(directory: Path, mp4: Path, n_jobs: int, engine: str) -> subprocess.Popen[bytes]:
    log = open(directory / "app.log", "ab")  # handed to the child
    return subprocess.Popen(
        [sys.executable, str(HERE / "scheduler_harness_app.py"), str(directory), str(n_jobs), str(mp4), engine],
        stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent,
    )


def _wait_serving(db: Path, app: subprocess.Popen[bytes], deadline: float) -> int | None:
    while time.monotonic() < deadline and app.poll() is None:
        pid = _worker_pid(db, app.pid)
        if pid is not None:
            return pid
        time.sleep(0.02)
    return None


def test_kill_minus_nine_harness(tmp_path: Path, base_mp4: Path) -> None:
    run_harness(tmp_path, base_mp4, N_JOBS, WORKER_KILLS, SCHEDULER_KILLS, "test")


def test_kill_minus_nine_harness_on_the_embedded_engine(tmp_path: Path, base_mp4: Path) -> None:
    # Fewer jobs: every worker restart re-imports torch/diffusers and rebuilds the tiny models.
    run_harness(tmp_path, base_mp4, 30, 4, 2, "embedded")


def run_harness(
    tmp_path: Path, base_mp4: Path, n_jobs: int, worker_kills: int, scheduler_kills: int, engine: str
) -> None:
    rng = random.Random(20251127)
    db = tmp_path / "turbobot.db"
    deadline = time.monotonic() + DEADLINE_S
    plan = ["worker"] * worker_kills + ["scheduler"] * scheduler_kills
    rng.shuffle(plan)
    done = Counter()
    app = _start(tmp_path, base_mp4, n_jobs, engine)
    try:
        for action in plan:
            pid = _wait_serving(db, app, deadline)
            if pid is None:
                break  # finished all jobs already (or deadline)
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment while jobs run
            if action == "worker":
                try:
                    os.kill(pid, signal.SIGKILL)
                    done["worker"] += 1
                except ProcessLookupError:
                    pass
            elif app.poll() is None:
                app.kill()
                app.wait()
                done["scheduler"] += 1
                app = _start(tmp_path, base_mp4, n_jobs, engine)
        rc = app.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert rc == 0, (tmp_path / "app.log").read_text()[-3000:]
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    assert done["worker"] >= worker_kills // 2 and done["scheduler"] >= scheduler_kills // 2, done

    conn = _connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        jobs = conn.execute(
            "SELECT id, state, attempts, error_code, delivered_at FROM jobs ORDER BY id"
        ).fetchall()
        assert len(jobs) == n_jobs
        keys = conn.execute("SELECT COUNT(DISTINCT idempotency_key) FROM jobs").fetchone()[0]
        assert keys == n_jobs
        terminal_rows = Counter(
            job_id for (job_id,) in conn.execute(
                "SELECT job_id FROM audit_log WHERE action IN ('succeeded', 'failed', 'cancelled')"
            )
        )
        outputs = {
            job_id: (path, sha) for job_id, path, sha in conn.execute("SELECT job_id, path, sha256 FROM outputs")
        }
    finally:
        conn.close()
    states = Counter(state for _, state, *_ in jobs)
    for job_id, state, attempts, error_code, delivered_at in jobs:
        assert state in ("succeeded", "failed"), (job_id, state)
        assert terminal_rows[job_id] == 1, (job_id, terminal_rows[job_id])
        assert 1 <= attempts <= MAX_ATTEMPTS, (job_id, attempts)
        assert delivered_at is not None, job_id
        if state == "succeeded":
            path, sha = outputs[job_id]
            assert Path(path).name.startswith(f"t2v_{job_id}_") and Path(path).name.endswith(f".a{attempts}.mp4")
            assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha
        else:
            assert error_code == "worker_lost" and attempts == MAX_ATTEMPTS and job_id not in outputs
    assert states["succeeded"] >= n_jobs * 0.9, states
    files = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert files == sorted(Path(p).name for p, _ in outputs.values())  # nothing orphaned
    seen: dict[int, set[str]] = {}
    lines = (tmp_path / "deliveries.log").read_text().split()
    for job_id, kind in zip(lines[::2], lines[1::2], strict=True):
        seen.setdefault(int(job_id), set()).add(kind)
    assert {j: {s} for j, s, *_ in jobs} == seen
    print(f"harness: {done['worker']} worker kills, {done['scheduler']} scheduler kills, {dict(states)}")
