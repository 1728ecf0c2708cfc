"""Per-community settings (a Discord server, a Telegram group), as chosen by that community's admins."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import CommunitySettings, Job, utcnow


async def get_values(session: AsyncSession, platform: str, community_id: str) -> dict[str, Any] | None:
    row = await get_row(session, platform, community_id)
    return dict(row.values) if row is not None else None


async def get_row(session: AsyncSession, platform: str, community_id: str) -> CommunitySettings | None:
    stmt = select(CommunitySettings).where(
        CommunitySettings.platform == platform, CommunitySettings.community_id == community_id
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def put_values(
    session: AsyncSession, platform: str, community_id: str, values: dict[str, Any], *, by: str,
    now: dt.datetime | None = None,
) -> None:
    row = await get_row(session, platform, community_id)
    if row is None:
        row = CommunitySettings(platform=platform, community_id=community_id)
        session.add(row)
    row.values = dict(values)
    row.updated_by = by[:80]
    row.updated_at = now or utcnow()
    await session.flush()


async def list_all(session: AsyncSession) -> list[CommunitySettings]:
    stmt = select(CommunitySettings).order_by(CommunitySettings.platform, CommunitySettings.community_id)
    return list((await session.execute(stmt)).scalars())


async def member_jobs_since(
    session: AsyncSession, user_id: int, platform: str, community_id: str, since: dt.datetime
) -> int:
    """Jobs ``user_id`` asked for in this community since ``since`` (its daily limit per member)."""
    scope = Job.guild_id if platform == "discord" else Job.chat_id
    stmt = select(func.count()).select_from(Job).where(
        Job.user_id == user_id, Job.platform == platform, scope == community_id, Job.created_at >= since
    )
    return int((await session.execute(stmt)).scalar_one())
