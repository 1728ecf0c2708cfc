"""The "scheduler process" of the kill -9 harness (``test_scheduler_killharness.py``).

``python tests/scheduler_harness_app.py DIR N MP4 [test|embedded]``: starts a Scheduler with one worker (the
fast test engine, or the real embedded tiny engine) on the database in
DIR, submits jobs ``h0..h{N-1}`` (idempotent: a restarted process re-submits the same keys and gets the same
jobs), appends every terminal event it receives to DIR/deliveries.log, and exits 0 once every job is
terminal and delivered. The harness SIGKILLs this process and its worker at random moments.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TextIO

from scheduler_support import ENGINE_SPEC, make_db, make_settings, t2v
from sqlalchemy import func, select

from generator.scheduler.api import DeliveryTarget, JobEvent, Requester
from generator.scheduler.service import Scheduler
from storage.models import TERMINAL_STATES, Job
from turbobot.config import Settings

USERS = 7


def harness_settings(directory: Path) -> Settings:
    return make_settings(
        directory,
        scheduler={"lease_seconds": 3.0, "heartbeat_seconds": 0.1, "poll_seconds": 0.05, "max_attempts": 4,
                   "progress_interval_seconds": 0.0},
        quotas={"max_queued_per_user": 100_000, "global_queue_cap": 100_000, "daily_jobs_per_user": 0,
                "daily_gpu_seconds_per_user": 0.0},
    )


def open_log(path: Path) -> TextIO:
    return open(path, "a", buffering=1, encoding="utf-8")  # line-buffered: a kill loses no whole line


async def main(directory: Path, n_jobs: int, mp4: str, engine: str = "test") -> int:
    settings = harness_settings(directory)
    db = await make_db(settings)
    sched = Scheduler(
        settings, db=db, engine_factory=ENGINE_SPEC if engine == "test" else None,
        worker_env={"TURBOBOT_TEST_MP4": mp4, "TURBOBOT_TEST_STEP_SECONDS": "0.005"},
    )
    steps = 2 if engine == "test" else 1
    log = open_log(directory / "deliveries.log")

    async def sink(event: JobEvent) -> None:
        if event.terminal:
            log.write(f"{event.job.id} {event.kind}\n")

    sched.subscribe("harness", sink)
    await sched.start(run_workers=True)
    for i in range(n_jobs):
        await sched.jobs.submit(
            t2v(f"harness job {i}", steps=steps), Requester("harness", f"u{i % USERS}"),
            DeliveryTarget("harness"), f"h{i}",
        )
    while True:
        async with db.read() as s:
            total = (await s.execute(select(func.count()).select_from(Job))).scalar_one()
            done = (
                await s.execute(
                    select(func.count()).where(Job.state.in_(TERMINAL_STATES), Job.delivered_at.is_not(None))
                )
            ).scalar_one()
        if total == n_jobs and done == n_jobs:
            break
        await asyncio.sleep(0.05)
    await sched.stop()
    await db.dispose()
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])))
