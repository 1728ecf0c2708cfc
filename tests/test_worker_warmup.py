"""A worker that is loaded but still compiling ("warming_up") is not ready and claims nothing; the reason is
readable by /readyz. Real worker process, the fast test engine with a gated warm-up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from scheduler_support import ENGINE_SPEC, make_db, make_settings, session_mp4, t2v, until, where, who

from generator.scheduler.health import readiness
from generator.scheduler.service import Scheduler
from storage import repo_workers
from storage.models import Job


@pytest.fixture(scope="module")
def mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_mp4(tmp_path_factory)


async def test_warming_up_worker_is_not_ready_and_claims_nothing(tmp_path: Path, mp4: Path) -> None:
    gate = tmp_path / "warm-up-done"
    settings = make_settings(tmp_path)
    db = await make_db(settings)
    sched = Scheduler(settings, db=db, engine_factory=ENGINE_SPEC,
                      worker_env={"TURBOBOT_TEST_MP4": str(mp4), "TURBOBOT_TEST_WARMUP_FILE": str(gate)})
    await sched.start(run_workers=True)
    try:
        async def warming() -> bool:
            async with db.read() as s:
                return any(w.state == "warming_up" for w in await repo_workers.list_workers(s))

        await until(warming, limit=60, what="the worker to report warming_up")
        r = await readiness(settings, db)
        assert not r.ready and "warming up" in r.detail["worker"]["reason"]

        sub = await sched.jobs.submit(t2v("a lighthouse at dawn"), who(1), where(), "warm-1")
        assert sub.job is not None
        async with db.read() as s:
            assert (await s.get(Job, sub.job.id)).state == "queued"  # type: ignore[union-attr]

        gate.touch()
        async with asyncio.timeout(60):
            view = await sched.views.wait(sub.job.id)
        assert view.state == "succeeded"
        assert (await readiness(settings, db)).ready
    finally:
        await sched.stop()
        await db.dispose()

