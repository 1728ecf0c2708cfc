"""Time comes from the database (issue 18, item 3): hosts whose clocks are skewed by an hour still agree on
lease expiry, worker freshness and the quota day, on a real PostgreSQL server (skipped without one).

A skewed host is simulated by shifting every clock our code reads in this process (``storage.models.utcnow``
and the names modules imported from it); the server's clock is the truth."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from scheduler_support import make_settings, t2v, where, who
from sqlalchemy import select
from test_storage_postgres import pg_server_url, pg_url  # noqa: F401  (fixtures)

from generator.scheduler import queue
from generator.scheduler.health import readiness
from generator.scheduler.service import Scheduler
from generator.scheduler.worker import Worker
from storage import models
from storage.db import DB_NOW, Database, db_now
from storage.models import Base, Job, QuotaUsage
from storage.repo_workers import register_worker

pytestmark = pytest.mark.postgres

REAL_UTCNOW = models.utcnow


def skew_host(monkeypatch: pytest.MonkeyPatch, hours: float) -> None:
    """This host's clock runs ``hours`` off (0 = back to true time)."""
    def skewed() -> dt.datetime:
        return REAL_UTCNOW() + dt.timedelta(hours=hours)

    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in {"storage", "generator", "bots", "turbobot"} and \
                getattr(mod, "utcnow", None) in (REAL_UTCNOW, *_patched):
            monkeypatch.setattr(mod, "utcnow", skewed)
    _patched.append(skewed)


_patched: list[Callable[[], dt.datetime]] = []


async def _scheduler(tmp_path: Path, url: str, **scheduler: object) -> Scheduler:
    settings = make_settings(tmp_path, database={"url": url}, scheduler=scheduler)
    db = Database(url)
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    return sched


def _worker(sched: Scheduler, name: str) -> Worker:
    w = Worker(sched.settings, name, "cpu", send=lambda _m: None)
    w.db = sched.db
    return w


async def _state(db: Database, job_id: int) -> str:
    async with db.read() as s:
        return (await s.execute(select(Job.state).where(Job.id == job_id))).scalar_one()


async def test_db_now_is_the_servers_clock(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    db = Database(pg_url)
    try:
        skew_host(monkeypatch, 1)
        async with db.write() as s:
            now = await db_now(s)
        assert now.tzinfo is not None
        assert abs((now - REAL_UTCNOW()).total_seconds()) < 60  # the server's time, not this host's
    finally:
        await db.dispose()


@pytest.mark.parametrize("worker_skew", [-1.0, 1.0])
async def test_skewed_hosts_agree_on_leases(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, worker_skew: float  # noqa: F811
) -> None:
    sched = await _scheduler(tmp_path, pg_url, lease_seconds=30.0)
    try:
        sub = await sched.jobs.submit(t2v(), who(1), where(), "k1")
        # A worker host an hour off claims and heartbeats through the worker's own write path.
        skew_host(monkeypatch, worker_skew)
        w = _worker(sched, "gpu-host-b/w0")
        claimed = await w._claim()
        assert claimed is not None and claimed.job_id == sub.job.id
        status = await w._write_each(queue.heartbeat, claimed.job_id, claimed.attempt, now=DB_NOW, lease_seconds=30.0)
        assert status.alive
        # The scheduler's host, an hour off the other way: the healthy lease is not expired.
        skew_host(monkeypatch, -worker_skew)
        await sched.events._requeue_expired()
        assert await _state(sched.db, claimed.job_id) == "running"
        async with sched.db.read() as s:
            lease_until = (await s.execute(select(Job.lease_until).where(Job.id == claimed.job_id))).scalar_one()
        assert lease_until is not None
        assert abs((lease_until - REAL_UTCNOW()).total_seconds() - 30.0) < 20.0  # set by the server's clock
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_an_expired_lease_is_requeued_by_the_databases_time(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    sched = await _scheduler(tmp_path, pg_url, lease_seconds=1.0)
    try:
        sub = await sched.jobs.submit(t2v(), who(1), where(), "k1")
        skew_host(monkeypatch, 1)  # the worker's host runs an hour fast: by its clock the lease lasts an hour
        claimed = await _worker(sched, "gpu-host-b/w0")._claim()
        assert claimed is not None
        skew_host(monkeypatch, -1)  # and the scheduler's an hour slow
        deadline = time.monotonic() + 30
        while await _state(sched.db, sub.job.id) != "queued":
            assert time.monotonic() < deadline, "the lease (1 s by the server's clock) was never expired"
            await sched.events._requeue_expired()
            await asyncio.sleep(0.2)
        async with sched.db.read() as s:
            attempts = (await s.execute(select(Job.attempts).where(Job.id == sub.job.id))).scalar_one()
        assert attempts == 1
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_worker_freshness_and_quota_day_come_from_the_database(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    sched = await _scheduler(tmp_path, pg_url)
    try:
        # A worker host an hour slow stamps its heartbeat; a bot host an hour fast judges readiness.
        skew_host(monkeypatch, -1)
        w = _worker(sched, "gpu-host-b/w0")
        w.state = "idle"
        async with sched.db.write() as s:
            await register_worker(s, w.worker_id, pid=1, device="cpu", info={}, now=await db_now(s), restarts=0)
        await w._save_worker_row()
        skew_host(monkeypatch, 1)
        ready = await readiness(sched.settings, sched.db)
        assert ready.worker_ok, ready.detail
        # A bot host 25 hours fast (another day by its clock) still charges the database's day.
        skew_host(monkeypatch, 25)
        await sched.jobs.submit(t2v(), who(7), where(), "k7")
        async with sched.db.read() as s:
            days = (await s.execute(select(QuotaUsage.day))).scalars().all()
            server_day = (await db_now(s)).date().isoformat()
        assert days == [server_day]
    finally:
        await sched.stop()
        await sched.db.dispose()
