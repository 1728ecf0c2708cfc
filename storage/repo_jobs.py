"""Jobs as records: insert, look up, list, delivery bookkeeping, deletion.

State transitions of the queue (claim, lease, fenced completion, cancel, requeue) live in
``generator.scheduler.queue`` so the state machine is in one place; this module is the plain data access.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload

from generator.request import GenerationRequest
from storage.db import rows_affected
from storage.models import TERMINAL_STATES, Job, User


def _with_relations(stmt: Any) -> Any:
    return stmt.options(joinedload(Job.user), joinedload(Job.output))




async def id_for_key(session: AsyncSession, idempotency_key: str) -> int | None:
    return (await session.execute(select(Job.id).where(Job.idempotency_key == idempotency_key))).scalar_one_or_none()


async def get_job(session: AsyncSession, job_id: int) -> Job | None:
    stmt = _with_relations(select(Job).where(Job.id == job_id))
    return (await session.execute(stmt)).unique().scalar_one_or_none()




async def insert_job(
    session: AsyncSession,
    *,
    user: User,
    idempotency_key: str,
    request: GenerationRequest,
    platform: str,
    chat_id: str = "",
    guild_id: str = "",
    status_message_id: str = "",
    reply_to_message_id: str = "",
    delivery: dict[str, Any] | None = None,
    parent_id: int | None = None,
    lineage: str = "",
    input_id: int | None = None,
    now: dt.datetime,
) -> int:
    """Insert a queued job; returns its id. (A Core insert: every submission runs it.)"""
    stmt = (
        insert(Job)
        .values(
            idempotency_key=idempotency_key,
            user_id=user.id,
            parent_id=parent_id,
            lineage=lineage if parent_id is not None else "",
            input_id=input_id,
            platform=platform,
            chat_id=chat_id,
            guild_id=guild_id,
            status_message_id=status_message_id,
            reply_to_message_id=reply_to_message_id,
            delivery=dict(delivery or {}),
            request=request,  # RequestJSON: serialised once, by the column type
            mode=request.mode,  # the queryable copies (see Job)
            prompt=request.prompt,
            state="queued",
            attempts=0,
            cancel_requested=False,
            progress_step=0,
            progress_total=0,
            progress_phase="",
            worker_id="",
            gpu_seconds=0.0,
            error_code="",
            error_message="",
            created_at=now,
            timings={},
        )
        .returning(Job.id)
    )
    return int((await session.execute(stmt)).scalar_one())


async def user_counts(session: AsyncSession, user_id: int) -> tuple[int, int]:
    """(queued, running) jobs of one user."""
    stmt = (
        select(Job.state, func.count())
        .where(Job.user_id == user_id, Job.state.in_(("queued", "running")))
        .group_by(Job.state)
    )
    counts = dict((await session.execute(stmt)).tuples().all())
    return int(counts.get("queued", 0)), int(counts.get("running", 0))


async def queue_counts(session: AsyncSession, user_id: int) -> tuple[int, int, int]:
    """(the user's queued, the user's running, everybody's queued) in one pass over the active jobs."""
    mine = Job.user_id == user_id
    stmt = select(
        func.coalesce(func.sum(case((and_(mine, Job.state == "queued"), 1), else_=0)), 0),
        func.coalesce(func.sum(case((and_(mine, Job.state == "running"), 1), else_=0)), 0),
        func.coalesce(func.sum(case((Job.state == "queued", 1), else_=0)), 0),
    ).where(Job.state.in_(("queued", "running")))
    row = (await session.execute(stmt)).one()
    return int(row[0]), int(row[1]), int(row[2])




async def list_user_jobs(
    session: AsyncSession,
    user_id: int,
    *,
    limit: int = 10,
    states: Sequence[str] | None = None,
    query: str = "",
) -> list[Job]:
    """Newest first; ``query`` matches a job id exactly or a prompt substring (case-insensitive)."""
    stmt = select(Job).where(Job.user_id == user_id)
    if states:
        stmt = stmt.where(Job.state.in_(list(states)))
    q = query.strip().lstrip("#")
    if q:
        cond = func.lower(Job.prompt).contains(q.lower(), autoescape=True)
        if q.isdigit():
            cond = or_(cond, Job.id == int(q))
        stmt = stmt.where(cond)
    stmt = _with_relations(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit))
    return list((await session.execute(stmt)).unique().scalars())


async def user_job_ids(session: AsyncSession, user_id: int) -> list[int]:
    return list((await session.execute(select(Job.id).where(Job.user_id == user_id))).scalars())


async def set_status_message(
    session: AsyncSession, job_id: int, message_id: str, extra: dict[str, Any] | None = None
) -> bool:
    job = await session.get(Job, job_id)
    if job is None:
        return False
    job.status_message_id = message_id
    if extra:
        job.delivery = {**(job.delivery or {}), **extra}  # new dict: JSON columns track reassignment only
    return True


async def mark_delivered(session: AsyncSession, job_id: int, now: dt.datetime) -> bool:
    """Record that the terminal event reached the front end; False if already recorded (or gone)."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.delivered_at.is_(None), Job.state.in_(TERMINAL_STATES))
        .values(delivered_at=now)
    )
    return await rows_affected(session, stmt) == 1


async def undelivered_terminal(session: AsyncSession, platforms: Sequence[str], *, limit: int = 100) -> list[int]:
    """Ids of terminal jobs whose event has not reached a front end yet, oldest first."""
    if not platforms:
        return []
    stmt = (
        select(Job.id)
        .where(Job.delivered_at.is_(None), Job.state.in_(TERMINAL_STATES), Job.platform.in_(list(platforms)))
        .order_by(Job.finished_at, Job.id)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def active_job_ids(session: AsyncSession) -> list[int]:
    """Running jobs (small set: one per worker)."""
    return list((await session.execute(select(Job.id).where(Job.state == "running"))).scalars())


async def job_states(session: AsyncSession, job_ids: Sequence[int]) -> dict[int, tuple[str, int]]:
    """id -> (state, attempts) for the given ids (missing ids are absent)."""
    if not job_ids:
        return {}
    stmt = select(Job.id, Job.state, Job.attempts).where(Job.id.in_(list(job_ids)))
    return {row[0]: (row[1], row[2]) for row in (await session.execute(stmt)).tuples()}


async def delete_jobs(session: AsyncSession, job_ids: Sequence[int]) -> int:
    if not job_ids:
        return 0
    # Children keep existing (parent_id SET NULL); outputs go with the job (ON DELETE CASCADE).
    return await rows_affected(session, delete(Job).where(Job.id.in_(list(job_ids))))
