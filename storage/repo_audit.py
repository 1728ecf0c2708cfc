"""The abuse/audit log: submissions, refusals, moderator actions and every accepted terminal transition."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import rows_affected
from storage.models import AuditLog, utcnow


async def add_audit(
    session: AsyncSession,
    action: str,
    *,
    user_id: int | None = None,
    job_id: int | None = None,
    detail: str = "",
    now: dt.datetime | None = None,
) -> None:
    await session.execute(
        insert(AuditLog).values(action=action[:32], user_id=user_id, job_id=job_id, detail=detail, at=now or utcnow())
    )


async def count_actions(session: AsyncSession, actions: Sequence[str]) -> dict[int, int]:
    """job id -> number of audit rows with one of ``actions`` (the kill harness counts completions)."""
    stmt = (
        select(AuditLog.job_id, func.count())
        .where(AuditLog.action.in_(list(actions)), AuditLog.job_id.is_not(None))
        .group_by(AuditLog.job_id)
    )
    return {int(j): int(n) for j, n in (await session.execute(stmt)).tuples() if j is not None}


async def recent(session: AsyncSession, *, limit: int = 50) -> list[AuditLog]:
    return list((await session.execute(select(AuditLog).order_by(AuditLog.id.desc()).limit(limit))).scalars())


async def delete_for_user(session: AsyncSession, user_id: int) -> int:
    return await rows_affected(session, delete(AuditLog).where(AuditLog.user_id == user_id))


async def with_actions(session: AsyncSession, actions: Sequence[str], *, limit: int = 100) -> list[AuditLog]:
    """The newest audit rows of ``actions`` first (the console's moderation queue)."""
    stmt = select(AuditLog).where(AuditLog.action.in_(list(actions))).order_by(AuditLog.id.desc()).limit(limit)
    return list((await session.execute(stmt)).scalars())
