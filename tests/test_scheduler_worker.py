"""End to end with real worker processes and the fast test engine: events, files, cancel, OOM, crashes.

Every wait polls with a deadline (``until`` / ``asyncio.timeout``); nothing depends on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from scheduler_support import (
    ENGINE_SPEC,
    Recorder,
    file_names,
    make_db,
    make_settings,
    read_bytes,
    session_mp4,
    t2v,
    until,
    where,
    who,
)
from sqlalchemy import text

from generator.scheduler.api import PHASES, Refusal
from generator.scheduler.service import Scheduler
from storage import repo_workers
from storage.db import Database
from storage.models import Job


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, mp4: Path, env: dict[str, str] | None = None, **sections: dict[str, Any]
) -> AsyncIterator[tuple[Scheduler, Recorder]]:
    settings = make_settings(tmp_path, **sections)
    db = await make_db(settings)
    sched = Scheduler(
        settings, db=db, engine_factory=ENGINE_SPEC, worker_env={"TURBOBOT_TEST_MP4": str(mp4), **(env or {})}
    )
    rec = Recorder()
    sched.subscribe("test", rec)
    await sched.start(run_workers=True)
    try:
        yield sched, rec
    finally:
        await sched.stop()
        await db.dispose()


async def finished(sched: Scheduler, job_id: int, limit: float = 30.0):
    async with asyncio.timeout(limit):
        return await sched.views.wait(job_id)


@pytest.fixture(scope="session")
def base_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_mp4(tmp_path_factory)


def worker_pid(sched: Scheduler) -> int | None:
    assert sched.supervisor is not None
    return sched.supervisor.handles[0].pid


async def test_success_file_events_and_eta(tmp_path: Path, base_mp4: Path) -> None:
    async with running(tmp_path, base_mp4) as (sched, rec):
        first = await sched.jobs.submit(t2v("a red fox", steps=4), who(1), where(), "k1")
        done = await finished(sched, first.job.id)
        assert done.state == "succeeded" and done.output is not None and done.attempts == 1
        data = read_bytes(done.output.path)
        assert hashlib.sha256(data).hexdigest() == done.output.sha256
        assert Path(done.output.path).parent == sched.outputs_dir
        assert Path(done.output.path).name == f"t2v_{done.id}_{done.seed}_{done.request.model}.a1.mp4"
        assert f"seed={done.seed}".encode() in data and data[4:8] == b"ftyp"
        assert done.timings["total"] > 0 and done.progress_step == done.progress_total == 4
        await until(lambda: len(rec.terminal(done.id)) == 1, what="terminal event")
        kinds = rec.kinds(done.id)
        assert kinds[0] in ("queued", "started") and kinds[-1] == "succeeded" and "started" in kinds
        # (phase, step) only moves forward: decoding is news at the same step as the last sampling step.
        keys = [(PHASES.index(e.job.progress_phase), e.job.progress_step)
                for e in rec.events if e.job.id == done.id and e.kind == "progress"]
        assert keys == sorted(set(keys)) and keys and keys[-1][1] <= 4
        # The worker learned step times (stored just after the job): running and queued jobs get ETAs.
        async def learned() -> bool:
            async with sched.db.read() as s:
                (row,) = await repo_workers.list_workers(s)
            return bool(row.info.get("ema", {}).get("step"))

        await until(learned, what="step times stored")
        held = await sched.jobs.submit(t2v("hold on", steps=4), who(2), where(), "k2")
        await until(lambda: "progress" in rec.kinds(held.job.id), what="held job running")
        view = await sched.views.get(held.job.id)
        assert view is not None and view.state == "running" and view.eta is not None
        queued = await sched.jobs.submit(t2v("behind", steps=4), who(3), where(), "k3")
        assert queued.job.position == 1 and queued.job.eta is not None and queued.job.eta >= view.eta
        await sched.admin.cancel(held.job.id, who(2))
        assert (await finished(sched, queued.job.id)).state == "succeeded"


async def test_progress_events_are_ordered_and_throttled(tmp_path: Path, base_mp4: Path) -> None:
    interval = 0.1
    async with running(
        tmp_path, base_mp4, env={"TURBOBOT_TEST_STEP_SECONDS": "0.08"},
        scheduler={"progress_interval_seconds": interval},
    ) as (sched, rec):
        ids = [(await sched.jobs.submit(t2v(f"clip {i}", steps=4), who(i), where(), f"k{i}")).job.id for i in range(3)]
        for job_id in ids:
            assert (await finished(sched, job_id)).state == "succeeded"
        await until(lambda: all(len(rec.terminal(j)) == 1 for j in ids), what="terminal events")
        stamps: dict[int, list[float]] = {}
        seen_progress = 0
        for job_id in ids:
            kinds = rec.kinds(job_id)
            assert kinds.index("succeeded") == len(kinds) - 1
            # Events report the state the hub reads: on a busy machine a job can finish before the hub looks
            # at it, and then it has no "started" or progress events, only its result (never a wrong order).
            if "started" in kinds:
                assert "queued" not in kinds[kinds.index("started"):]
            keys = [(PHASES.index(e.job.progress_phase), e.job.progress_step)
                    for e in rec.events if e.job.id == job_id and e.kind == "progress"]
            assert keys == sorted(set(keys)), keys
            assert not keys or kinds.index("started") < kinds.index("progress")
            seen_progress += bool(keys)
        assert seen_progress, "no job reported progress: the throttle below was not exercised"
        # Throttle: progress events of one job are at least an interval apart (timestamps from the sink).
        for e, t in zip(rec.events, rec.times, strict=True):
            if e.kind == "progress":
                stamps.setdefault(e.job.id, []).append(t)
        for times in stamps.values():
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(g >= interval * 0.9 for g in gaps), gaps


async def test_cancel_running_between_steps(tmp_path: Path, base_mp4: Path) -> None:
    # Heartbeats (and their database check for cancel requests) every 5 s: a fast cancel proves the
    # request was pushed to the worker.
    async with running(tmp_path, base_mp4, scheduler={"heartbeat_seconds": 5.0}) as (sched, rec):
        job = (await sched.jobs.submit(t2v("hold this", steps=4), who(1), where(), "k")).job
        await until(lambda: "progress" in rec.kinds(job.id), what="first step")
        view = await sched.admin.cancel(job.id, who(1))
        # The answer is read after the request was pushed: a quick worker may have stopped the job already.
        assert (view.state == "running" and view.cancel_requested) or view.state == "cancelled", view
        done = await finished(sched, job.id, limit=3.0)
        assert done.state == "cancelled" and done.output is None and done.progress_step < 4
        await until(lambda: rec.kinds(job.id)[-1:] == ["cancelled"], what="cancelled event")
        assert not [n for n in file_names(sched.outputs_dir) if n.endswith(".mp4")]
        # The worker keeps serving.
        nxt = await sched.jobs.submit(t2v("after"), who(1), where(), "k2")
        assert (await finished(sched, nxt.job.id)).state == "succeeded"


async def test_oom_fails_one_job_and_the_worker_keeps_serving(tmp_path: Path, base_mp4: Path) -> None:
    async with running(tmp_path, base_mp4) as (sched, _rec):
        bad = await sched.jobs.submit(t2v("oom please"), who(1), where(), "k1")
        done = await finished(sched, bad.job.id)
        assert done.state == "failed" and done.error_code == "out_of_memory"
        assert "memory" in done.error_message and "Traceback" not in done.error_message
        pid = worker_pid(sched)
        good = await sched.jobs.submit(t2v("fine"), who(1), where(), "k2")
        assert (await finished(sched, good.job.id)).state == "succeeded"
        assert worker_pid(sched) == pid and sched.supervisor.handles[0].restarts == 0
        # Engine errors and unexpected bugs also fail just their job, with a safe message.
        e1 = await sched.jobs.submit(t2v("enginefail"), who(1), where(), "k3")
        e2 = await sched.jobs.submit(t2v("a bug"), who(2), where(), "k4")
        v1, v2 = await finished(sched, e1.job.id), await finished(sched, e2.job.id)
        assert (v1.state, v1.error_code, v1.error_message) == ("failed", "test_refused", "The test engine refuses this prompt.")
        assert (v2.state, v2.error_code) == ("failed", "internal_error") and "ValueError" not in v2.error_message
        assert worker_pid(sched) == pid


async def test_render_thread_hogging_the_interpreter_does_not_hold_the_write_lock(
    tmp_path: Path, base_mp4: Path
) -> None:
    # A render thread that keeps the interpreter lock for long C calls (importing torch, a gc pass) used
    # to stall the worker's lease/progress transactions between statements while they held SQLite's write
    # lock: every other writer (submits, the scheduler's maintenance pass) waited seconds and, on a loaded
    # machine, hit its busy timeout again and again. Now those writes commit statement by statement.
    hog = 4.0
    async with running(tmp_path, base_mp4, env={"TURBOBOT_TEST_GIL_SECONDS": str(hog)}) as (sched, rec):
        other = Database(sched.settings.database_url, busy_timeout_ms=30_000)
        try:
            job = (await sched.jobs.submit(t2v("gil"), who(1), where(), "k1")).job
            await until(lambda: "started" in rec.kinds(job.id), what="started")
            waits: list[float] = []
            end = time.monotonic() + hog * 0.75  # inside the hog window, which began before "started"
            while time.monotonic() < end:
                t0 = time.monotonic()
                async with other.write() as s:  # BEGIN IMMEDIATE: waits for the write lock
                    await s.execute(text("SELECT 1"))
                waits.append(time.monotonic() - t0)
                await asyncio.sleep(0.02)
            # Before the fix: up to ~3 s (a transaction stuck across several 0.3 s hog calls).
            assert max(waits) < 1.0, f"write lock waits {sorted(waits)[-5:]}"
            assert (await finished(sched, job.id)).state == "succeeded"
        finally:
            await other.dispose()


async def test_cuda_error_restarts_worker_and_bounds_attempts(tmp_path: Path, base_mp4: Path) -> None:
    async with running(tmp_path, base_mp4, scheduler={"max_attempts": 2}) as (sched, _rec):
        job = (await sched.jobs.submit(t2v("cudafail"), who(1), where(), "k1")).job
        done = await finished(sched, job.id)
        assert done.state == "failed" and done.error_code == "worker_lost" and done.attempts == 2
        assert sched.supervisor.handles[0].restarts >= 2
        after = await sched.jobs.submit(t2v("fine"), who(1), where(), "k2")
        assert (await finished(sched, after.job.id)).state == "succeeded"


async def test_killed_worker_job_is_requeued_and_finished(tmp_path: Path, base_mp4: Path) -> None:
    async with running(tmp_path, base_mp4, env={"TURBOBOT_TEST_STEP_SECONDS": "0.15"}) as (sched, rec):
        job = await sched.jobs.submit(t2v("slow", steps=4), who(1), where(), "k1")
        await until(lambda: "started" in rec.kinds(job.job.id), what="started")
        pid = worker_pid(sched)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        done = await finished(sched, job.job.id)
        assert done.state == "succeeded" and done.attempts == 2
        kinds = rec.kinds(job.job.id)
        assert kinds.count("started") == 2 and kinds[-1] == "succeeded"
        assert kinds[kinds.index("started") + 1:].count("queued") == 1  # told it went back in line
        assert worker_pid(sched) not in (None, pid)
        assert file_names(sched.outputs_dir) == [f"t2v_{done.id}_{done.seed}_{done.request.model}.a2.mp4"]  # the killed attempt's partial file was swept


async def test_watchdog_kills_a_stalled_render(tmp_path: Path, base_mp4: Path) -> None:
    async with running(
        tmp_path, base_mp4, env={"TURBOBOT_TEST_STALL_SECONDS": "60"},
        scheduler={"watchdog_seconds": 1.0, "max_attempts": 1},
    ) as (sched, _rec):
        job = await sched.jobs.submit(t2v("stall"), who(1), where(), "k1")
        done = await finished(sched, job.job.id, limit=30)
        assert done.state == "failed" and done.error_code == "worker_lost"
        assert sched.supervisor.handles[0].kills >= 1
        async with sched.db.read() as s:
            assert (await s.get(Job, job.job.id)).attempts == 1


async def test_engine_that_cannot_load_is_reported_not_hung(tmp_path: Path, base_mp4: Path) -> None:
    settings = make_settings(tmp_path)
    db = await make_db(settings)
    sched = Scheduler(settings, db=db, engine_factory=ENGINE_SPEC.replace(":make_engine", ":broken_engine"))
    await sched.start()
    try:
        job = await sched.jobs.submit(t2v(), who(1), where(), "k")
        with pytest.raises(Refusal) as info:
            async with asyncio.timeout(30):
                await sched.views.wait(job.job.id, stop_on_worker_error=True)
        assert info.value.code == "engine_unavailable" and "/nowhere/model.pth" in info.value.message
        assert sched.views.worker_errors() and (await sched.views.get(job.job.id)).state == "queued"
        readiness = await sched.views.readiness()
        assert not readiness.ready and readiness.database_ok
        with pytest.raises(Refusal) as later:  # new work is refused clearly instead of queueing forever
            await sched.jobs.submit(t2v(), who(2), where(), "k2")
        assert later.value.code == "engine_unavailable" and "/nowhere" not in later.value.message
    finally:
        await sched.stop()
        await db.dispose()


async def test_stop_right_after_start_does_not_wait_for_the_worker(tmp_path: Path, base_mp4: Path) -> None:
    # stop() used to miss a worker whose spawn was still in flight and then wait on it forever.
    settings = make_settings(tmp_path)
    db = await make_db(settings)
    sched = Scheduler(settings, db=db, engine_factory=ENGINE_SPEC, worker_env={"TURBOBOT_TEST_MP4": str(base_mp4)})
    await sched.start(run_workers=True)
    try:
        async with asyncio.timeout(15):
            await sched.stop()
    finally:
        await db.dispose()


async def test_clean_stop_hands_the_running_job_back_without_using_an_attempt(
    tmp_path: Path, base_mp4: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Ctrl+C / SIGTERM end in Scheduler.stop(): that used to requeue the job as "worker lost" with its
    # attempt used up (a few restarts and it failed with "the GPU worker stopped during it N times").
    caplog.set_level("INFO", logger="turbobot.scheduler")
    slow = {"TURBOBOT_TEST_STEP_SECONDS": "1.0"}  # 3 s left after the first step: stop lands mid-job
    async with running(tmp_path, base_mp4, env=slow) as (sched, rec):
        job = (await sched.jobs.submit(t2v("slow one", steps=4), who(1), where(), "k1")).job
        await until(lambda: "progress" in rec.kinds(job.id), what="job running")
        async with sched.db.read() as s:
            assert (await s.get(Job, job.id)).attempts == 1
        await sched.stop()  # the context's own stop() is then a no-op
        async with sched.db.read() as s:
            row = await s.get(Job, job.id)
        assert (row.state, row.attempts, row.worker_id, row.lease_until) == ("queued", 0, "", None)
    lines = [r.getMessage() for r in caplog.records if "handed back" in r.getMessage()]
    assert lines == [f"job {job.id} handed back to the queue (shutdown; the attempt does not count)"]
    assert not [r for r in caplog.records if "worker lost" in r.getMessage()]
    async with running(tmp_path, base_mp4) as (sched, _rec):  # the next start finishes it
        done = await finished(sched, job.id)
        assert (done.state, done.attempts) == ("succeeded", 1)


async def test_restarts_count_real_restarts_only_not_fresh_starts(tmp_path: Path, base_mp4: Path) -> None:
    async def row(sched: Scheduler) -> tuple[int | None, int | None]:
        async with sched.db.read() as s:
            w = await repo_workers.get_worker(s, sched.supervisor.handles[0].worker_id)  # type: ignore[union-attr]
            return (w.pid, w.restarts) if w is not None else (None, None)

    async def registered(sched: Scheduler, pid: int | None, restarts: int) -> bool:
        return pid is not None and await row(sched) == (pid, restarts)

    for _ in range(2):  # the second run finds the first run's worker row: still a fresh start, not a restart
        async with running(tmp_path, base_mp4) as (sched, _rec):
            await until(lambda s=sched: registered(s, worker_pid(s), 0), limit=60, what="worker registered")
            assert sched.supervisor.handles[0].restarts == 0  # type: ignore[union-attr]
    async with running(tmp_path, base_mp4) as (sched, _rec):
        await until(lambda: registered(sched, worker_pid(sched), 0), limit=60, what="worker registered")
        first = worker_pid(sched)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await until(lambda: worker_pid(sched) not in (None, first), limit=60, what="worker respawned")
        await until(lambda: registered(sched, worker_pid(sched), 1), limit=60, what="restart recorded")


async def test_a_worker_that_exited_is_not_counted_as_ready(tmp_path: Path, base_mp4: Path) -> None:
    # A `turbobot generate` ends with a clean stop: its worker row used to read "idle" with a fresh heartbeat,
    # so /readyz and `turbobot ready` said "ready" for minutes with no worker running.
    from generator.scheduler.health import readiness

    async with running(tmp_path, base_mp4) as (sched, _rec):
        async def ready() -> bool:
            return (await sched.views.readiness()).ready

        await until(ready, limit=60, what="ready")
        settings, db = sched.settings, sched.db
        await sched.stop()
        async with db.read() as s:
            states = {w.state for w in await repo_workers.list_workers(s)}
        assert states == {"stopped"}
        r = await readiness(settings, db)
        assert not r.ready and not r.worker_ok


async def test_worker_claims_its_resident_lora_set_first_within_a_users_turn(tmp_path: Path, base_mp4: Path) -> None:
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "ink.safetensors").write_bytes(b"")  # the test engine does not read it
    async with running(tmp_path, base_mp4, loras={"folder": str(tmp_path / "loras")},
                       quotas={"max_queued_per_user": 10}) as (sched, rec):
        held = (await sched.jobs.submit(t2v("hold in ink", steps=4, loras="ink"), who(1), where(), "h")).job
        await until(lambda: "progress" in rec.kinds(held.id), what="held job running")
        plain = (await sched.jobs.submit(t2v("plain"), who(1), where(), "p")).job
        inked = (await sched.jobs.submit(t2v("inked", loras="ink:1"), who(1), where(), "i")).job
        await sched.admin.cancel(held.id, who(1))
        done = [await finished(sched, j.id) for j in (plain, inked)]
        assert all(j.state == "succeeded" and j.started_at is not None for j in done)
        # The worker had just run ink:1, so the younger job with that set went first.
        assert done[1].started_at < done[0].started_at  # type: ignore[operator]
