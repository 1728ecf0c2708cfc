"""Submission: validation, quotas (also under 100 concurrent submissions), idempotency, remix, admin verbs.

These run the real ``Scheduler`` on a temp-file SQLite database without worker processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from scheduler_support import Recorder, make_db, make_settings, t2v, until, where, who

from generator.request import MAX_SEED
from generator.scheduler import queue
from generator.scheduler.api import Refusal, Requester
from generator.scheduler.service import Scheduler
from storage.models import AuditLog, Job, utcnow


async def started(tmp_path: Path, **sections: dict[str, Any]) -> Scheduler:
    settings = make_settings(tmp_path, **sections)
    db = await make_db(settings)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    return sched


@pytest.fixture
async def sched(tmp_path: Path) -> AsyncIterator[Scheduler]:
    s = await started(tmp_path, quotas={"max_queued_per_user": 5, "daily_jobs_per_user": 8})
    yield s
    await s.stop()
    await s.db.dispose()


async def refusal(coro: Any) -> Refusal:
    with pytest.raises(Refusal) as info:
        await coro
    return info.value


async def test_seed_is_chosen_at_submit_and_stored(sched: Scheduler) -> None:
    res = await sched.jobs.submit(t2v("a cat", model=None), who(1), where(), "k1")
    assert not res.duplicate and res.job.state == "queued" and res.job.position == 1
    assert 1 <= res.job.seed <= MAX_SEED
    assert res.job.request.model == "tiny-t2v"  # defaults resolved and stored
    fixed = await sched.jobs.submit(t2v("a cat", seed=1234), who(1), where(), "k2")
    assert fixed.job.seed == 1234
    async with sched.db.read() as s:
        row = await s.get(Job, res.job.id)
    assert row is not None and row.request.seed == res.job.seed and row.request == res.job.request


async def test_same_key_is_one_job_even_concurrently(sched: Scheduler) -> None:
    results = await asyncio.gather(*(sched.jobs.submit(t2v(), who(1), where(), "click-42") for _ in range(20)))
    assert len({r.job.id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    again = await sched.jobs.submit(t2v("something else"), who(1), where(), "click-42")
    assert again.duplicate and again.job.request.prompt == "a red fox"


async def test_refusals(tmp_path: Path) -> None:
    sched = await started(
        tmp_path,
        quotas={"max_queued_per_user": 2, "global_queue_cap": 4},
        admin={"blocked_words": ["forbidden thing"], "deny": ["test:evil"], "owners": ["test:boss"]},
    )
    try:
        assert (await refusal(sched.jobs.submit(t2v(frames=6), who(1), where(), "a"))).code == "invalid"
        r = await refusal(sched.jobs.submit(t2v("a Forbidden Thing here"), who(1), where(), "b"))
        assert r.code == "blocked_words"
        assert (await refusal(sched.jobs.submit(t2v(), who("evil"), where(), "c"))).code == "blocked"
        await sched.jobs.submit(t2v(), who(1), where(), "d1")
        await sched.jobs.submit(t2v(), who(1), where(), "d2")
        r = await refusal(sched.jobs.submit(t2v(), who(1), where(), "d3"))
        assert r.code == "queued_cap" and "2" in r.message
        await sched.jobs.submit(t2v(), who(2), where(), "e1")
        await sched.jobs.submit(t2v(), who(2), where(), "e2")
        assert (await refusal(sched.jobs.submit(t2v(), who(3), where(), "f1"))).code == "queue_full"
        # Owners skip quotas and the global cap.
        for i in range(3):
            await sched.jobs.submit(t2v(), who("boss"), where(), f"boss{i}")
        # Blocking cancels queued jobs and refuses new ones; unblocking lifts it.
        boss = Requester("test", "boss")
        await sched.admin.block(boss, "test:2", "spam")
        assert (await refusal(sched.jobs.submit(t2v(), who(2), where(), "g1"))).code == "blocked"
        assert {v.state for v in await sched.views.jobs_for(who(2))} == {"cancelled"}
        await sched.admin.unblock(boss, "test:2")
        assert (await refusal(sched.jobs.submit(t2v(), who(2), where(), "g2"))).code == "queue_full"  # not blocked
        assert (await refusal(sched.admin.block(who(1), "test:2"))).code == "forbidden"
        async with sched.db.read() as s:
            from sqlalchemy import select

            actions = list((await s.execute(select(AuditLog.action))).scalars())
        assert actions.count("refused") >= 5 and "block" in actions
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_allow_list(tmp_path: Path) -> None:
    sched = await started(tmp_path, admin={"allow": ["test:friend"]})
    try:
        assert (await refusal(sched.jobs.submit(t2v(), who("stranger"), where(), "a"))).code == "blocked"
        assert (await sched.jobs.submit(t2v(), who("friend"), where(), "b")).job.state == "queued"
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_hundred_concurrent_submits_cannot_overspend(tmp_path: Path) -> None:
    sched = await started(tmp_path, quotas={"max_queued_per_user": 1000, "daily_jobs_per_user": 10})
    try:
        outcomes = await asyncio.gather(
            *(sched.jobs.submit(t2v(), who(1), where(), f"k{i}") for i in range(100)), return_exceptions=True
        )
        errors = [o for o in outcomes if isinstance(o, Refusal)]
        assert all(isinstance(o, Refusal) for o in outcomes if isinstance(o, BaseException)), outcomes
        assert len(outcomes) - len(errors) == 10
        assert {e.code for e in errors} == {"quota_daily"}
        assert errors[0].retry_at is not None and errors[0].retry_at > utcnow()
        _jobs, quota, total = await sched.views.queue_info(who(1))
        assert quota.jobs_today == 10 and quota.daily_jobs == 10 and total == 10
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_hundred_users_race_for_the_global_cap(tmp_path: Path) -> None:
    sched = await started(tmp_path, quotas={"global_queue_cap": 25})
    try:
        outcomes = await asyncio.gather(
            *(sched.jobs.submit(t2v(), who(i), where(), f"k{i}") for i in range(100)), return_exceptions=True
        )
        ok = [o for o in outcomes if not isinstance(o, BaseException)]
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(ok) == 25 and {getattr(e, "code", repr(e)) for e in errors} == {"queue_full"}
        assert sorted(o.job.position or 0 for o in ok) == list(range(1, 26))
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_gpu_seconds_quota_and_chat_bucket(tmp_path: Path) -> None:
    sched = await started(
        tmp_path,
        quotas={"daily_gpu_seconds_per_user": 10.0, "chat_burst": 3, "chat_refill_per_minute": 1.0,
                "max_queued_per_user": 50},
    )
    try:
        first = await sched.jobs.submit(t2v(), who(1), where(), "a")
        async with sched.db.write() as s:
            c = await queue.claim(s, worker_id="w", now=utcnow(), lease_seconds=30, max_running_per_user=1)
            assert c is not None
            await queue.finish(s, c.job_id, c.attempt, state="failed", code="out_of_memory", message="x",
                               gpu_seconds=11.0, now=utcnow())  # a failure that counts (the user's size)
        assert c.job_id == first.job.id
        r = await refusal(sched.jobs.submit(t2v(), who(1), where(), "b"))
        assert r.code == "quota_gpu" and r.retry_at is not None
        # Chat bucket: three in a burst per chat, then wait about a minute; other chats are separate.
        for i in range(3):
            await sched.jobs.submit(t2v(), who(2), where("room"), f"r{i}")
        r = await refusal(sched.jobs.submit(t2v(), who(3), where("room"), "r3"))
        assert r.code == "chat_rate" and r.retry_at is not None
        assert dt.timedelta(seconds=50) < r.retry_at - utcnow() <= dt.timedelta(seconds=61)
        await sched.jobs.submit(t2v(), who(3), where("other room"), "o1")
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_unlimited_role_and_per_user_limits(tmp_path: Path) -> None:
    sched = await started(
        tmp_path, quotas={"max_queued_per_user": 1}, admin={"unlimited": ["test:vip"], "owners": ["test:boss"]}
    )
    try:
        for i in range(3):
            await sched.jobs.submit(t2v(), who("vip"), where(), f"v{i}")
        _, quota, _ = await sched.views.queue_info(who("vip"))
        assert quota.max_queued is None and quota.queued == 3
        await sched.admin.set_limits(Requester("test", "boss"), "test:7", max_queued=2)
        await sched.jobs.submit(t2v(), who(7), where(), "s1")
        await sched.jobs.submit(t2v(), who(7), where(), "s2")
        assert (await refusal(sched.jobs.submit(t2v(), who(7), where(), "s3"))).code == "queued_cap"
        with pytest.raises(Refusal):
            await sched.admin.set_limits(who(7), "test:7", max_queued=99)
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_remix_inherits_and_retry_changes_only_the_seed(sched: Scheduler) -> None:
    parent = await sched.jobs.submit(t2v("a fox", seed=777, steps=3, aspect="9:16"), who(1), where("room"), "p")
    r = await refusal(sched.jobs.remix(parent.job.id, who(2), where("elsewhere"), "r0"))
    assert r.code == "forbidden"  # not posted where user 2 asks
    remix = await sched.jobs.remix(parent.job.id, who(2), where("room"), "r1", overrides={"prompt": "a wolf", "steps": 1})
    assert remix.job.parent_id == parent.job.id
    assert remix.job.seed == 777 and remix.job.request.aspect == "9:16"
    assert remix.job.request.prompt == "a wolf" and remix.job.request.steps == 1
    retry = await sched.jobs.remix(parent.job.id, who(1), where(), "r2", new_seed=True)
    assert retry.job.seed != 777
    assert retry.job.request.replace(seed=777) == parent.job.request
    assert (await refusal(sched.jobs.remix(parent.job.id, who(1), where(), "r3", overrides={"steps": 9}))).code == "invalid"
    assert (await refusal(sched.jobs.remix(parent.job.id, who(1), where(), "r4", overrides={"mode": "i2v"}))).code == "invalid"
    assert (await refusal(sched.jobs.remix(999, who(1), where(), "r5"))).code == "not_found"
    assert (await sched.jobs.remix(parent.job.id, who(2), where("room"), "r1")).duplicate


async def test_cancel_queued_permissions_and_event(tmp_path: Path) -> None:
    sched = await started(tmp_path, admin={"moderators": ["test:mod"]})
    rec = Recorder()
    sched.subscribe("test", rec)
    try:
        a = await sched.jobs.submit(t2v(), who(1), where(), "a")
        b = await sched.jobs.submit(t2v(), who(1), where(), "b")
        assert (await refusal(sched.admin.cancel(a.job.id, who(2)))).code == "forbidden"
        view = await sched.admin.cancel(a.job.id, who(1))
        assert view.state == "cancelled"
        assert (await refusal(sched.admin.cancel(a.job.id, who(1)))).code == "not_cancellable"
        assert (await sched.admin.cancel(b.job.id, Requester("test", "mod"))).state == "cancelled"
        await until(lambda: len(rec.terminal(a.job.id)) == 1 and len(rec.terminal(b.job.id)) == 1, what="events")
        assert rec.kinds(a.job.id) == ["queued", "cancelled"]
        await until(lambda: _delivered(sched, a.job.id), what="delivered_at")
        # Delete (owner of the job) and forget.
        await sched.admin.delete(a.job.id, who(1))
        assert await sched.views.get(a.job.id) is None
        c = await sched.jobs.submit(t2v(), who(1), where(), "c")
        assert (await refusal(sched.admin.delete(c.job.id, who(1)))).code == "not_finished"
        assert await sched.admin.forget(who(1)) == 2
        assert await sched.views.jobs_for(who(1)) == []
    finally:
        await sched.stop()
        await sched.db.dispose()


async def _delivered(sched: Scheduler, job_id: int) -> bool:
    async with sched.db.read() as s:
        job = await s.get(Job, job_id)
        return job is not None and job.delivered_at is not None


async def test_jobs_for_and_queue_info(sched: Scheduler) -> None:
    ids = [(await sched.jobs.submit(t2v(f"clip number {i}"), who(1), where(), f"k{i}")).job.id for i in range(3)]
    await sched.jobs.submit(t2v("other"), who(2), where(), "x")
    views = await sched.views.jobs_for(who(1))
    assert [v.id for v in views] == ids[::-1]
    assert [v.id for v in await sched.views.jobs_for(who(1), query="number 1")] == [ids[1]]
    assert [v.id for v in await sched.views.jobs_for(who(1), query=f"#{ids[2]}")] == [ids[2]]
    mine, quota, total = await sched.views.queue_info(who(1))
    assert [v.position for v in mine] == [1, 3, 4] and total == 4
    assert quota.queued == 3 and quota.max_queued == 5 and quota.jobs_today == 3 and quota.daily_jobs == 8


async def test_quota_refunds_jobs_that_did_not_run_or_failed_through_no_fault_of_the_user(tmp_path: Path) -> None:
    # Cancelled while queued, internal error, worker kept dying: the daily job comes back and no GPU time
    # is charged, exactly once. Successes, cancels of a running job and the user's own failures (out of
    # memory at the size they picked) still count.
    sched = await started(
        tmp_path, quotas={"max_queued_per_user": 5, "daily_jobs_per_user": 2}, scheduler={"max_attempts": 1}
    )
    db, user = sched.db, who(1)

    async def used() -> tuple[int, float]:
        _jobs, quota, _n = await sched.views.queue_info(user)
        return quota.jobs_today, quota.gpu_seconds_today

    async def run_next(**finish: Any) -> int:
        async with db.write() as s:
            c = await queue.claim(s, worker_id="w", now=utcnow(), lease_seconds=60, max_running_per_user=5)
            assert c is not None
            assert await queue.finish(s, c.job_id, c.attempt, now=utcnow(), **finish)
        return c.job_id

    try:
        a = (await sched.jobs.submit(t2v("a"), user, where(), "a")).job.id
        assert await used() == (1, 0.0)
        await sched.admin.cancel(a, user)
        assert await used() == (0, 0.0)  # never ran
        with pytest.raises(Refusal):
            await sched.admin.cancel(a, user)
        assert await used() == (0, 0.0)  # not twice

        await sched.jobs.submit(t2v("b"), user, where(), "b")
        await sched.jobs.submit(t2v("c"), user, where(), "c")
        assert (await refusal(sched.jobs.submit(t2v("d"), user, where(), "d"))).code == "quota_daily"
        b = await run_next(state="failed", code="internal_error", message="x", gpu_seconds=5.0)
        assert await used() == (1, 0.0)
        async with db.write() as s:  # a second (stale) finish of the same attempt is fenced out
            assert not await queue.finish(s, b, 1, state="failed", code="internal_error", message="x", now=utcnow())
        assert await used() == (1, 0.0)
        await run_next(state="failed", code="out_of_memory", message="oom", gpu_seconds=3.0)  # the user's size
        assert await used() == (1, 3.0)

        await sched.jobs.submit(t2v("d"), user, where(), "d")
        async with db.write() as s:  # the worker dies; lease runs out; max_attempts 1: failed, worker_lost
            await queue.claim(s, worker_id="w", now=utcnow() - dt.timedelta(minutes=5), lease_seconds=60,
                              max_running_per_user=5)
            moved = await queue.requeue_expired(s, now=utcnow(), max_attempts=1)
        assert [t.state for t in moved] == ["failed"]
        assert await used() == (1, 3.0)

        await sched.jobs.submit(t2v("e"), user, where(), "e")
        await run_next(state="cancelled", code="cancelled", message="Cancelled.", gpu_seconds=2.0)  # it ran
        assert await used() == (2, 5.0)
    finally:
        await sched.stop()
        await db.dispose()
