"""Restart recovery: expired leases requeued, this host's dead workers released, undelivered results
delivered after (re)subscribing, failing sinks retried, orphaned files swept."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from scheduler_support import (
    ENGINE_SPEC,
    Recorder,
    file_names,
    make_db,
    make_settings,
    session_mp4,
    t2v,
    until,
    where,
    who,
)

from generator.scheduler import queue
from generator.scheduler.service import Scheduler
from storage.models import Job, utcnow
from turbobot.config import Settings


@pytest.fixture(scope="session")
def base_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_mp4(tmp_path_factory)


def _out(path: Path) -> queue.OutputInfo:
    return queue.OutputInfo(
        path=str(path), sha256="0" * 64, bytes=3, duration_s=0.3, width=64, height=64, frames=5, fps=16,
        model_label="t", is_demo=True,
    )


def _touch(path: Path) -> None:
    path.write_bytes(b"mp4")


async def _prepare(settings: Settings) -> dict[str, int]:
    """A first life of the service: leaves one expired lease, one live lease of a local worker, two
    undelivered results and some orphan files."""
    db = await make_db(settings)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    ids = {}
    for name in ("expired", "local", "ok", "bad"):
        ids[name] = (await sched.jobs.submit(t2v(name), who(name), where(), name)).job.id
    past = utcnow() - dt.timedelta(minutes=5)
    outputs = sched.outputs_dir
    async with db.write() as s:
        claims = {}
        for name, worker, now in (
            ("expired", "otherhost:0", past), ("local", f"{socket.gethostname()}:0", utcnow()),
            ("ok", "otherhost:1", utcnow()), ("bad", "otherhost:2", utcnow()),
        ):
            c = await queue.claim(s, worker_id=worker, now=now, lease_seconds=60, max_running_per_user=1)
            claims[name] = c
        assert {n: c.job_id for n, c in claims.items()} == ids
        ok = claims["ok"]
        assert await queue.complete(
            s, ok.job_id, ok.attempt, _out(outputs / f"t2v_{ok.job_id}_1_m.a1.mp4"), gpu_seconds=1.0, timings={},
            now=utcnow(),
        ) == "succeeded"
        bad = claims["bad"]
        assert await queue.finish(s, bad.job_id, bad.attempt, state="failed", code="x", message="no", now=utcnow())
    await sched.stop()
    await asyncio.to_thread(_touch, outputs / f"t2v_{ids['ok']}_1_m.a1.mp4")  # the accepted output
    await asyncio.to_thread(_touch, outputs / f"t2v_{ids['bad']}_1_m.a1.mp4")  # published, never accepted
    await asyncio.to_thread(_touch, outputs / f".partial-job{ids['expired']}-1-abcd.mp4")  # died mid-render
    await db.dispose()
    return ids


async def test_restart_requeues_delivers_and_sweeps(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    ids = await _prepare(settings)
    db = await make_db(settings)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    try:
        async with db.read() as s:
            assert (await s.get(Job, ids["expired"])).state == "queued"
            assert (await s.get(Job, ids["local"])).state == "running"  # no local workers: not ours to release
        assert file_names(sched.outputs_dir) == [f"t2v_{ids['ok']}_1_m.a1.mp4"]
        flaky = Recorder(fail_times=1)
        sched.subscribe("test", flaky)
        await until(lambda: len(flaky.terminal(ids["ok"])) == 1 and len(flaky.terminal(ids["bad"])) == 1,
                    what="redelivery after a failing sink")

        async def delivered() -> bool:
            async with db.read() as s:
                rows = [await s.get(Job, ids[n]) for n in ("ok", "bad")]
            return all(r.delivered_at is not None for r in rows)

        await until(delivered, what="delivered_at recorded")
        assert [e.kind for e in flaky.terminal(ids["ok"])] == ["succeeded"]
        assert [e.kind for e in flaky.terminal(ids["bad"])] == ["failed"]
        assert flaky.terminal(ids["bad"])[0].job.error_message == "no"
    finally:
        await sched.stop()
        await db.dispose()
    # A third life: nothing is delivered twice.
    db = await make_db(settings)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    try:
        again = Recorder()
        sched.subscribe("test", again)
        other = await sched.jobs.submit(t2v("probe"), who("probe"), where(), "probe")
        await sched.admin.cancel(other.job.id, who("probe"))
        await until(lambda: len(again.terminal(other.job.id)) == 1, what="probe delivered")
        assert not again.terminal(ids["ok"]) and not again.terminal(ids["bad"])
    finally:
        await sched.stop()
        await db.dispose()


async def test_start_with_workers_releases_this_hosts_jobs(tmp_path: Path, base_mp4: Path) -> None:
    settings = make_settings(tmp_path)
    ids = await _prepare(settings)
    db = await make_db(settings)
    sched = Scheduler(settings, db=db, engine_factory=ENGINE_SPEC, worker_env={"TURBOBOT_TEST_MP4": str(base_mp4)})
    rec = Recorder()
    sched.subscribe("test", rec)
    await sched.start(run_workers=True)
    try:
        for name in ("local", "expired"):
            async with asyncio.timeout(30):
                view = await sched.views.wait(ids[name])
            assert view.state == "succeeded" and view.attempts == 2, view
        await until(lambda: all(len(rec.terminal(ids[n])) == 1 for n in ("local", "expired", "ok", "bad")),
                    what="all delivered")
    finally:
        await sched.stop()
        await db.dispose()


async def test_a_second_scheduler_does_not_take_a_running_job_away(tmp_path: Path, base_mp4: Path) -> None:
    # `turbobot generate` beside `turbobot run`: both used to call their worker HOST:0, and the second one
    # to start released "its" predecessor's job, i.e. the first one's running job (lease lost, attempt burned).
    settings = make_settings(tmp_path)
    db = await make_db(settings)
    env = {"TURBOBOT_TEST_MP4": str(base_mp4)}
    first = Scheduler(settings, db=db, engine_factory=ENGINE_SPEC, worker_env=env)
    rec = Recorder()
    first.subscribe("test", rec)
    await first.start(run_workers=True)
    second: Scheduler | None = None
    try:
        job = (await first.jobs.submit(t2v("hold it"), who(1), where(), "k1")).job
        await until(lambda: "progress" in rec.kinds(job.id), what="job running")
        async with db.read() as s:
            before = await s.get(Job, job.id)
        for _ in range(2):  # two generate runs one after the other, as in the report
            second = Scheduler(settings, engine_factory=ENGINE_SPEC, worker_env=env)
            await second.start(run_workers=True)
            assert second.supervisor is not None and first.supervisor is not None
            assert {h.worker_id for h in second.supervisor.handles}.isdisjoint(
                h.worker_id for h in first.supervisor.handles
            )
            await second.stop()
            second = None
        async with db.read() as s:
            after = await s.get(Job, job.id)
        assert (after.state, after.attempts, after.worker_id) == ("running", 1, before.worker_id)
        assert rec.kinds(job.id).count("started") == 1
        await first.admin.cancel(job.id, who(1))
        async with asyncio.timeout(30):
            done = await first.views.wait(job.id)
        assert (done.state, done.attempts) == ("cancelled", 1)
    finally:
        if second is not None:
            await second.stop()
        await first.stop()
        await db.dispose()


def test_gone_worker_rule() -> None:
    from generator.scheduler.supervision import worker_gone
    from storage.models import WorkerState

    fresh = dt.timedelta(seconds=20)
    now = utcnow()
    here = socket.gethostname()

    def row(pid: int, host: str = here, age: float = 0.0) -> WorkerState:
        return WorkerState(id="w", pid=pid, heartbeat_at=now - dt.timedelta(seconds=age), info={"host": host})

    assert worker_gone(None, now=now, fresh=fresh)
    assert not worker_gone(row(os.getpid()), now=now, fresh=fresh)  # alive, heartbeat fresh
    assert worker_gone(row(os.getpid(), age=60), now=now, fresh=fresh)  # heartbeat stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert worker_gone(row(int(dead.stdout)), now=now, fresh=fresh)  # this host, process gone
    assert not worker_gone(row(int(dead.stdout), host="elsewhere"), now=now, fresh=fresh)  # cannot tell: wait


async def test_stop_lets_a_maintenance_pass_in_a_transaction_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() used to cancel the maintenance loop wherever it was; a cancel landing in a transaction's
    rollback left the pool logging a traceback (seen in `turbobot generate` refusing a request)."""
    settings = make_settings(tmp_path)
    db = await make_db(settings)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    entered, gate = asyncio.Event(), asyncio.Event()
    finished: list[bool] = []
    real = queue.has_expired

    async def slow_has_expired(*args: object, **kwargs: object) -> bool:
        entered.set()
        await gate.wait()  # inside the pass's read transaction
        result = await real(*args, **kwargs)  # type: ignore[arg-type]
        finished.append(True)
        return result

    monkeypatch.setattr(queue, "has_expired", slow_has_expired)
    try:
        await asyncio.wait_for(entered.wait(), timeout=20)
        stopping = asyncio.create_task(sched.stop())
        await until(lambda: not sched._core.started, what="stop() began")
        gate.set()
        await asyncio.wait_for(stopping, timeout=20)
        assert finished == [True]  # the pass ran to its end instead of being cancelled inside the transaction
    finally:
        gate.set()
        await sched.stop()
        await db.dispose()
