"""The scheduler's one cache: the queue snapshot (positions, shapes) and the workers' step-time averages,
each reused for a short time, and the row -> ``JobView`` conversion that needs them (position, ETA).

Writers call ``invalidate_queue`` / ``invalidate_stats`` when they know the cached data moved. May touch:
the database (reads only). See docs/scheduler.md.
"""

from __future__ import annotations

import time

from generator.scheduler import queue
from generator.scheduler.api import JobView
from generator.scheduler.estimate import Shape, StepStats
from generator.scheduler.health import fresh_window
from generator.scheduler.views import job_view
from storage import repo_workers
from storage.db import Database, db_now
from storage.models import Job, utcnow
from turbobot.config import SchedulerSettings

SNAPSHOT_TTL = 0.25  # seconds a queue snapshot may be reused for positions
STATS_TTL = 2.0


class ViewCache:
    def __init__(self, db: Database, cfg: SchedulerSettings) -> None:
        self._db = db
        self._cfg = cfg
        self._snap: tuple[float, queue.QueueSnapshot] | None = None
        self._stats: tuple[float, StepStats, int] | None = None

    def invalidate_queue(self) -> None:
        self._snap = None

    def invalidate_stats(self) -> None:
        self._stats = None

    async def snapshot(self) -> queue.QueueSnapshot:
        now_m = time.monotonic()
        if self._snap is not None and now_m - self._snap[0] < SNAPSHOT_TTL:
            return self._snap[1]
        async with self._db.read() as s:
            snap = await queue.snapshot(s, now=await db_now(s))
        self._snap = (now_m, snap)
        return snap

    async def step_stats(self) -> tuple[StepStats, int]:
        """(merged step-time averages of every worker, how many workers are live, at least 1)."""
        now_m = time.monotonic()
        if self._stats is not None and now_m - self._stats[0] < STATS_TTL:
            return self._stats[1], self._stats[2]
        async with self._db.read() as s:
            now = await db_now(s)  # heartbeats are stamped by the database's clock
            rows = await repo_workers.list_workers(s)
        fresh = fresh_window(self._cfg)
        live = [w for w in rows if w.state in ("idle", "busy") and now - w.heartbeat_at < fresh]
        stats = StepStats.merge([StepStats.from_dict((w.info or {}).get("ema")) for w in rows])
        n = max(1, len(live))
        self._stats = (now_m, stats, n)
        return stats, n

    async def view_of(self, job: Job) -> JobView:
        return (await self.views_of([job]))[0]

    async def views_of(self, jobs: list[Job]) -> list[JobView]:
        if not any(j.state in ("queued", "running") for j in jobs):
            return [job_view(j) for j in jobs]
        if any(j.state == "queued" for j in jobs):
            snap = await self.snapshot()
        else:
            # Running jobs need only their own shape and progress for an ETA: skip the queue scan.
            running = [j for j in jobs if j.state == "running"]
            snap = queue.QueueSnapshot(
                running=[j.id for j in running],
                shapes={j.id: Shape.from_request(j.request) for j in running},
                steps_done={j.id: j.progress_step for j in running},
            )
        stats, n_workers = await self.step_stats()
        now = utcnow()
        return [job_view(j, snap=snap, stats=stats, n_workers=n_workers, now=now) for j in jobs]
