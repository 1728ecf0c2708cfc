"""The queue verbs on a real temp-file SQLite database: fair claim, leases, fencing, requeue, positions."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from scheduler_support import make_db, make_settings, t2v, where, who

from generator.scheduler import queue
from generator.scheduler.service import Scheduler
from storage.db import Database
from storage.models import Job, utcnow


@pytest.fixture
async def env(tmp_path: Path):
    settings = make_settings(tmp_path, quotas={"max_queued_per_user": 100, "global_queue_cap": 1000})
    db = await make_db(settings)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    yield sched, db
    await sched.stop()
    await db.dispose()


def _output(job_id: int) -> queue.OutputInfo:
    return queue.OutputInfo(
        path=f"/nowhere/job-{job_id}.mp4", sha256="0" * 64, bytes=1, duration_s=0.3, width=64, height=64,
        frames=5, fps=16, model_label="t", is_demo=True,
    )


async def claim(db: Database, worker: str = "w", cap: int = 1, lease: float = 30.0, now: dt.datetime | None = None):
    async with db.write() as s:
        return await queue.claim(
            s, worker_id=worker, now=now or utcnow(), lease_seconds=lease, max_running_per_user=cap
        )


async def complete(db: Database, c: queue.Claimed, gpu: float = 1.0) -> str:
    async with db.write() as s:
        return await queue.complete(s, c.job_id, c.attempt, _output(c.job_id), gpu_seconds=gpu, timings={}, now=utcnow())


async def test_user_with_one_job_is_not_starved_by_user_with_fifty(env) -> None:
    sched, db = env
    a_jobs = [(await sched.jobs.submit(t2v(f"a {i}"), who("a"), where(), f"a{i}")).job.id for i in range(50)]
    b = await sched.jobs.submit(t2v("b"), who("b"), where(), "b0")
    assert b.job.position == 2 and b.job.queue_length == 51  # right behind A's first job

    order = []
    while (c := await claim(db)) is not None:
        order.append(c.job_id)
        assert await complete(db, c) == "succeeded"
    assert order[:2] == [a_jobs[0], b.job.id]
    assert sorted(order) == sorted([*a_jobs, b.job.id])


async def test_positions_predict_claim_order_on_several_gpus(env) -> None:
    sched, db = env
    for i in range(6):
        await sched.jobs.submit(t2v(f"a {i}"), who("a"), where(), f"a{i}")
    for i in range(3):
        await sched.jobs.submit(t2v(f"b {i}"), who("b"), where(), f"b{i}")
    await sched.jobs.submit(t2v("c"), who("c"), where(), "c0")
    async with db.read() as s:
        predicted = (await queue.snapshot(s, now=utcnow())).order
    # Ten workers and a running cap of 10: nothing completes, every claim follows the fair key.
    claimed = []
    while (c := await claim(db, cap=10)) is not None:
        claimed.append(c.job_id)
    assert claimed == predicted
    async with db.read() as s:
        prompts = [(await s.get(Job, job_id)).prompt for job_id in claimed]
    assert prompts == ["a 0", "b 0", "c", "a 1", "b 1", "a 2", "b 2", "a 3", "a 4", "a 5"]


async def test_running_cap_and_gpu_seconds_order(env) -> None:
    sched, db = env
    a1 = (await sched.jobs.submit(t2v("a1"), who("a"), where(), "a1")).job.id
    a2 = (await sched.jobs.submit(t2v("a2"), who("a"), where(), "a2")).job.id
    c = await claim(db)
    assert c is not None and c.job_id == a1
    assert await claim(db) is None  # a is at its running cap of 1 and nobody else waits
    await complete(db, c, gpu=100.0)
    b1 = (await sched.jobs.submit(t2v("b1"), who("b"), where(), "b1")).job.id
    # a used 100 GPU-seconds today, b none: b goes first although a2 is older.
    nxt = await claim(db)
    assert nxt is not None and nxt.job_id == b1
    nxt2 = await claim(db)
    assert nxt2 is not None and nxt2.job_id == a2


async def test_fencing_and_lease_expiry(env) -> None:
    sched, db = env
    job_id = (await sched.jobs.submit(t2v(), who(1), where(), "k")).job.id
    t0 = utcnow()
    first = await claim(db, lease=5.0, now=t0)
    assert first is not None and first.attempt == 1
    async with db.write() as s:
        assert not (await queue.heartbeat(s, job_id, 99, now=t0, lease_seconds=5.0)).alive
        assert (await queue.heartbeat(s, job_id, 1, now=t0, lease_seconds=5.0)).alive
    # The lease runs out: the job goes back to the queue, keeping its attempt count.
    async with db.write() as s:
        moved = await queue.requeue_expired(s, now=t0 + dt.timedelta(seconds=6), max_attempts=3)
    assert [(m.job_id, m.state) for m in moved] == [(job_id, "queued")]
    second = await claim(db)
    assert second is not None and second.attempt == 2
    # The first worker wakes up and reports: every verb of attempt 1 is refused.
    async with db.write() as s:
        assert not (await queue.progress(s, job_id, 1, 1, 2, now=utcnow(), lease_seconds=5.0)).alive
        assert not await queue.finish(s, job_id, 1, state="failed", code="x", message="x", now=utcnow())
    assert await complete(db, first) == "lost"
    assert await complete(db, second) == "succeeded"
    assert await complete(db, second) == "lost"  # no second accepted completion
    async with db.read() as s:
        job = await s.get(Job, job_id)
        assert job.state == "succeeded" and job.attempts == 2
        from storage.repo_audit import count_actions

        assert (await count_actions(s, ["succeeded", "failed", "cancelled"]))[job_id] == 1


async def test_bounded_attempts_then_failed(env) -> None:
    sched, db = env
    job_id = (await sched.jobs.submit(t2v(), who(1), where(), "k")).job.id
    now = utcnow()
    for attempt in (1, 2):
        c = await claim(db, lease=1.0, now=now)
        assert c is not None and c.attempt == attempt
        now += dt.timedelta(seconds=2)
        async with db.write() as s:
            moved = await queue.requeue_expired(s, now=now, max_attempts=2)
    assert moved[0].state == "failed"
    async with db.read() as s:
        job = await s.get(Job, job_id)
    assert job.state == "failed" and job.error_code == "worker_lost" and job.attempts == 2
    assert "stopped" in job.error_message


async def test_release_dead_worker_and_cancel_requests(env) -> None:
    sched, db = env
    j1 = (await sched.jobs.submit(t2v("one"), who(1), where(), "k1")).job.id
    j2 = (await sched.jobs.submit(t2v("two"), who(2), where(), "k2")).job.id
    c1 = await claim(db, worker="host:0")
    c2 = await claim(db, worker="host:1")
    assert {c1.job_id, c2.job_id} == {j1, j2}
    async with db.write() as s:
        assert await queue.cancel(s, c2.job_id, now=utcnow()) == "requested"
    async with db.write() as s:
        moved = await queue.release_worker(s, ["host:0", "host:1"], now=utcnow(), max_attempts=3)
    assert {(m.job_id, m.state) for m in moved} == {(c1.job_id, "queued"), (c2.job_id, "cancelled")}


async def test_cancel_request_wins_over_late_completion(env) -> None:
    sched, db = env
    job_id = (await sched.jobs.submit(t2v(), who(1), where(), "k")).job.id
    c = await claim(db)
    async with db.write() as s:
        assert (await queue.heartbeat(s, job_id, c.attempt, now=utcnow(), lease_seconds=None)).cancel_requested is False
        assert await queue.cancel(s, job_id, now=utcnow()) == "requested"
        assert (await queue.heartbeat(s, job_id, c.attempt, now=utcnow(), lease_seconds=None)).cancel_requested
    assert await complete(db, c) == "cancelled"
    async with db.read() as s:
        assert (await s.get(Job, job_id)).state == "cancelled"


async def lora_affinity_scenario(sched: Scheduler, db: Database, postgres: bool = False) -> None:
    """Shared by the SQLite test below and tests/test_scheduler_postgres.py: a worker whose resident LoRA set
    is ``ink:1`` takes, in each user's fair turn, that user's oldest job with the set, and the users' turns
    are exactly those of the plain fair order (c's ink job never goes before a's or b's turn)."""
    plan = [("a", "a plain 0", ""), ("a", "a ink 1", "ink"), ("a", "a plain 2", ""), ("b", "b plain 0", ""),
            ("b", "b ink 1", "ink:1"), ("c", "c ink 0", "ink")]
    for i, (user, prompt, loras) in enumerate(plan):
        await sched.jobs.submit(t2v(prompt, loras=loras), who(user), where(), f"aff{i}")
    async with db.read() as s:
        fair = [(await s.get(Job, j)).prompt for j in (await queue.snapshot(s, now=utcnow())).order]
    assert fair == ["a plain 0", "b plain 0", "c ink 0", "a ink 1", "b ink 1", "a plain 2"]

    claimed = []
    while True:
        async with db.write() as s:
            c = await queue.claim(s, worker_id="w", now=utcnow(), lease_seconds=30.0, max_running_per_user=10,
                                  postgres=postgres, prefer_loras="ink:1")
        if c is None:
            break
        claimed.append(c.request.prompt)
    assert claimed == ["a ink 1", "b ink 1", "c ink 0", "a plain 0", "b plain 0", "a plain 2"]
    assert [p[0] for p in claimed] == [p[0] for p in fair]  # every user's turn where the fair order puts it


@pytest.fixture
async def lora_env(tmp_path: Path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "ink.safetensors").write_bytes(b"")  # the name is what a submission checks
    settings = make_settings(tmp_path, quotas={"max_queued_per_user": 100}, loras={"folder": str(tmp_path / "loras")})
    db = await make_db(settings)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    yield sched, db
    await sched.stop()
    await db.dispose()


async def test_claim_prefers_the_resident_lora_set_only_within_a_users_turn(lora_env) -> None:
    sched, db = lora_env
    await lora_affinity_scenario(sched, db)


async def test_claim_without_a_resident_set_is_plain_fifo_per_user(lora_env) -> None:
    sched, db = lora_env
    for i, loras in enumerate(["", "ink", ""]):
        await sched.jobs.submit(t2v(f"a {i}", loras=loras), who("a"), where(), f"f{i}")
    order = []
    while (c := await claim(db, cap=10)) is not None:
        order.append(c.request.prompt)
    assert order == ["a 0", "a 1", "a 2"]
