"""Daily quota counters per user and the per-chat token buckets.

Counters are rows keyed by (user, UTC day) and are incremented with ``col = col + n`` in the caller's write
transaction, so concurrent submissions cannot lose an update.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import rows_affected
from storage.models import ChatBucket, QuotaUsage


def utc_day(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).date().isoformat()


def next_utc_midnight(now: dt.datetime) -> dt.datetime:
    day = now.astimezone(dt.UTC).date() + dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


async def usage(session: AsyncSession, user_id: int, day: str) -> tuple[int, float]:
    """(jobs accepted, GPU-seconds used) by one user on one UTC day."""
    stmt = select(QuotaUsage.jobs, QuotaUsage.gpu_seconds).where(QuotaUsage.user_id == user_id, QuotaUsage.day == day)
    row = (await session.execute(stmt)).first()
    return (int(row[0]), float(row[1])) if row else (0, 0.0)


async def add_usage(session: AsyncSession, user_id: int, day: str, *, jobs: int = 0, gpu_seconds: float = 0.0) -> None:
    stmt = (
        update(QuotaUsage)
        .where(QuotaUsage.user_id == user_id, QuotaUsage.day == day)
        .values(jobs=QuotaUsage.jobs + jobs, gpu_seconds=QuotaUsage.gpu_seconds + gpu_seconds)
    )
    if await rows_affected(session, stmt):
        return
    try:
        async with session.begin_nested():
            session.add(QuotaUsage(user_id=user_id, day=day, jobs=jobs, gpu_seconds=gpu_seconds))
    except IntegrityError:
        # Inserted concurrently (PostgreSQL): the row exists now, so the increment applies.
        await session.execute(stmt)


async def refund_job(session: AsyncSession, user_id: int, day: str) -> None:
    """Give back one of the day's jobs (a job that did not run, or failed through no fault of the user).
    Never below zero; the row exists (``add_usage`` made it at submit)."""
    stmt = (
        update(QuotaUsage)
        .where(QuotaUsage.user_id == user_id, QuotaUsage.day == day, QuotaUsage.jobs > 0)
        .values(jobs=QuotaUsage.jobs - 1)
    )
    await session.execute(stmt)


async def take_chat_token(
    session: AsyncSession,
    platform: str,
    scope_id: str,
    *,
    capacity: float,
    refill_per_minute: float,
    now: dt.datetime,
) -> dt.datetime | None:
    """Take one token from the chat's bucket. Returns None on success, else when a token will be there."""
    stmt = select(ChatBucket).where(ChatBucket.platform == platform, ChatBucket.scope_id == scope_id)
    bucket = (await session.execute(stmt.with_for_update())).scalar_one_or_none()
    if bucket is None:
        bucket = ChatBucket(platform=platform, scope_id=scope_id, tokens=float(capacity), updated_at=now)
        try:
            async with session.begin_nested():
                session.add(bucket)
        except IntegrityError:
            bucket = (await session.execute(stmt.with_for_update())).scalar_one()
    elapsed = max(0.0, (now - bucket.updated_at).total_seconds())
    tokens = min(float(capacity), bucket.tokens + elapsed * refill_per_minute / 60.0)
    if tokens < 1.0:
        if refill_per_minute <= 0:
            return now + dt.timedelta(days=1)
        return now + dt.timedelta(seconds=(1.0 - tokens) * 60.0 / refill_per_minute)
    bucket.tokens = tokens - 1.0
    bucket.updated_at = now
    return None
