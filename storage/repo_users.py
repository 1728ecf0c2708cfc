"""Users: find or create by (platform, platform user id), roles, blocks and per-user quota overrides.

Every function takes the caller's ``AsyncSession`` so the scheduler can compose several of them in one
transaction (quota check + enqueue must be atomic).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import User

# Roles that skip quotas and the per-user running cap.
EXEMPT_ROLES = ("owner", "unlimited")


async def find_user(session: AsyncSession, platform: str, platform_user_id: str, *, lock: bool = False) -> User | None:
    stmt = select(User).where(User.platform == platform, User.platform_user_id == platform_user_id)
    if lock:
        # PostgreSQL: serialise concurrent submissions of one user (SQLite's BEGIN IMMEDIATE already does).
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def upsert_user(
    session: AsyncSession, platform: str, platform_user_id: str, *, display_name: str = "", role: str | None = None
) -> User:
    """The user row, created when missing; display name and role refreshed; row locked on PostgreSQL."""
    user = await find_user(session, platform, platform_user_id, lock=True)
    if user is None:
        candidate = User(
            platform=platform, platform_user_id=platform_user_id, display_name=display_name[:128], role=role or "user"
        )
        try:
            async with session.begin_nested():
                session.add(candidate)
                await session.flush()
            user = candidate
        except IntegrityError:
            # Another transaction created it first (PostgreSQL); use theirs.
            user = await find_user(session, platform, platform_user_id, lock=True)
            assert user is not None
    if display_name and user.display_name != display_name[:128]:
        user.display_name = display_name[:128]
    if role is not None and user.role != role:
        user.role = role
    return user


async def set_blocked(session: AsyncSession, user: User, blocked: bool, reason: str = "") -> None:
    user.blocked = blocked
    user.blocked_reason = reason[:256] if blocked else ""


async def set_limits(
    session: AsyncSession,
    user: User,
    *,
    max_queued: int | None,
    daily_jobs: int | None,
    daily_gpu_seconds: float | None,
) -> None:
    """Per-user overrides; None clears an override (back to the configured value)."""
    user.max_queued = max_queued
    user.daily_jobs = daily_jobs
    user.daily_gpu_seconds = daily_gpu_seconds
