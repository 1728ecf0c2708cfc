"""Who may submit what: roles, allow/deny lists, and the quota checks of ``submit``.

``admit`` runs inside the submit's write transaction, right before the insert, so the checks and the
enqueue are one atomic step (docs/scheduler.md: no double spend under concurrent requests).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from generator.scheduler.api import DeliveryTarget, QuotaView, Refusal, RefusalCode, Requester
from storage.models import User
from storage.repo_communities import member_jobs_since
from storage.repo_jobs import queue_counts, user_counts
from storage.repo_quotas import next_utc_midnight, take_chat_token, usage, utc_day
from storage.repo_users import EXEMPT_ROLES
from turbobot.config import Settings


def is_local_operator(key: str) -> bool:
    """The machine's own operator: the CLI, and the web console (loopback-only or behind the admin token)."""
    return key.startswith("cli:") or key == "web:operator"


def role_of(settings: Settings, key: str) -> str:
    admin = settings.admin
    if key in admin.owners or is_local_operator(key):
        return "owner"
    if key in admin.unlimited:
        return "unlimited"
    if key in admin.moderators:
        return "moderator"
    return "user"


def check_access(settings: Settings, requester: Requester) -> None:
    admin = settings.admin
    key = requester.key
    if key in admin.owners:
        return
    if key in admin.deny or (admin.allow and key not in admin.allow):
        raise Refusal(RefusalCode.BLOCKED, "Sorry, you are not allowed to make videos with this bot.")


@dataclass(frozen=True)
class UserLimits:
    max_running: int | None
    max_queued: int | None
    daily_jobs: int | None
    daily_gpu_seconds: float | None


def _positive(value: float | None) -> float | None:
    """0 or less in a daily quota means "no limit"."""
    return value if value is not None and value > 0 else None


def limits_for(settings: Settings, user: User | None, role: str) -> UserLimits:
    if role in EXEMPT_ROLES:
        return UserLimits(None, None, None, None)
    q = settings.quotas
    max_queued = user.max_queued if user is not None and user.max_queued is not None else q.max_queued_per_user
    daily_jobs = user.daily_jobs if user is not None and user.daily_jobs is not None else q.daily_jobs_per_user
    gpu = (
        user.daily_gpu_seconds
        if user is not None and user.daily_gpu_seconds is not None
        else q.daily_gpu_seconds_per_user
    )
    jobs_cap = _positive(daily_jobs)
    return UserLimits(q.max_running_per_user, max_queued, int(jobs_cap) if jobs_cap else None, _positive(gpu))


async def quota_view(session: AsyncSession, settings: Settings, user: User | None, role: str, now: dt.datetime) -> QuotaView:
    lim = limits_for(settings, user, role)
    queued, running = await user_counts(session, user.id) if user is not None else (0, 0)
    jobs, gpu = await usage(session, user.id, utc_day(now)) if user is not None else (0, 0.0)
    return QuotaView(
        running=running, queued=queued, max_running=lim.max_running, max_queued=lim.max_queued,
        jobs_today=jobs, daily_jobs=lim.daily_jobs, gpu_seconds_today=gpu, daily_gpu_seconds=lim.daily_gpu_seconds,
        resets_at=next_utc_midnight(now),
    )


def _chat_scope(target: DeliveryTarget) -> str:
    return target.guild_id or target.chat_id


async def admit(
    session: AsyncSession, settings: Settings, user: User, role: str, target: DeliveryTarget, now: dt.datetime,
    *, community: tuple[str, int] = ("", 0),
) -> None:
    """Raise ``Refusal`` unless ``user`` may enqueue one more job now. Takes a chat token on success.
    ``community`` is (community id, its daily limit per member; 0 = none) from the community's settings."""
    if user.blocked:
        raise Refusal(RefusalCode.BLOCKED, "Sorry, you are not allowed to make videos with this bot.")
    if role in EXEMPT_ROLES:
        return
    lim = limits_for(settings, user, role)
    reset = next_utc_midnight(now)
    queued, _running, total_queued = await queue_counts(session, user.id)
    if lim.max_queued is not None and queued >= lim.max_queued:
        raise Refusal(
            RefusalCode.QUEUED_CAP,
            f"You already have {queued} video{'s' if queued != 1 else ''} waiting (the limit is {lim.max_queued}). "
            "Wait for one to start or cancel one.",
        )
    jobs, gpu = (0, 0.0)
    if lim.daily_jobs is not None or lim.daily_gpu_seconds is not None:
        jobs, gpu = await usage(session, user.id, utc_day(now))
    if lim.daily_jobs is not None and jobs >= lim.daily_jobs:
        raise Refusal(RefusalCode.QUOTA_DAILY, f"You have used today's {lim.daily_jobs} videos.", retry_at=reset)
    if lim.daily_gpu_seconds is not None and gpu >= lim.daily_gpu_seconds:
        raise Refusal(
            RefusalCode.QUOTA_GPU, f"You have used today's {lim.daily_gpu_seconds / 60:g} GPU minutes.", retry_at=reset
        )
    community_id, member_limit = community
    if community_id and member_limit > 0:
        since = dt.datetime.combine(now.astimezone(dt.UTC).date(), dt.time(), tzinfo=dt.UTC)
        done = await member_jobs_since(session, user.id, target.platform, community_id, since)
        if done >= member_limit:
            raise Refusal(
                RefusalCode.QUOTA_DAILY, f"You have used today's {member_limit} videos in this community.",
                retry_at=reset,
            )
    if total_queued >= settings.quotas.global_queue_cap:
        raise Refusal(RefusalCode.QUEUE_FULL, "The queue is full right now; please try again in a few minutes.")
    scope = _chat_scope(target)
    if scope:
        q = settings.quotas
        retry_at = await take_chat_token(
            session, target.platform, scope, capacity=q.chat_burst, refill_per_minute=q.chat_refill_per_minute, now=now
        )
        if retry_at is not None:
            raise Refusal(RefusalCode.CHAT_RATE, "This chat is making videos too fast; slow down a little.", retry_at=retry_at)
