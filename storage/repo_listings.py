"""Read-only listings for the web console and the CLI: jobs across every user and platform (gallery, admin
queue, lineage), files by job id, users with their usage, worker rows and the inputs of the console's metrics.

Every function takes an open session (the caller's ``Database.read()``) and never writes. Jobs come back as
(job, user, output) rows; the scheduler turns them into the views front ends see.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    JOB_STATES,
    TERMINAL_STATES,
    AuditLog,
    InputImage,
    Job,
    Output,
    QuotaUsage,
    User,
    WorkerState,
)
from storage.repo_users import EXEMPT_ROLES

MAX_PAGE = 200

JobRow = tuple[Job, User, Output | None]



@dataclass(frozen=True)
class JobFilters:
    user: str = ""  # "platform:id" exactly, or part of a display name / user id
    state: str = ""
    mode: str = ""
    platform: str = ""
    query: str = ""  # part of the prompt, or "#123" / "123" for a job id


@dataclass(frozen=True)
class UserSummary:
    key: str
    platform: str
    user_id: str
    display_name: str
    role: str
    blocked: bool
    blocked_reason: str
    max_queued: int | None  # per-user overrides (None = configured default)
    daily_jobs: int | None
    daily_gpu_seconds: float | None
    running: int
    queued: int
    jobs_today: int
    gpu_seconds_today: float
    total_jobs: int
    exempt: bool  # owners and unlimited users skip quotas and the running cap


@dataclass(frozen=True)
class WorkerRow:
    id: str
    pid: int
    device: str
    state: str
    heartbeat_at: dt.datetime
    restarts: int
    info: dict[str, Any]


@dataclass(frozen=True)
class FinishedRow:
    id: int
    state: str
    mode: str
    platform: str
    error_code: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime
    gpu_seconds: float


def _jobs_select() -> Select[Job, User, Output]:
    return select(Job, User, Output).join(User, Job.user_id == User.id).outerjoin(Output, Output.job_id == Job.id)


def _user_clause(text: str) -> Any:
    platform, sep, uid = text.partition(":")
    if sep and platform and uid:
        return (User.platform == platform) & (User.platform_user_id == uid)
    pattern = f"%{_escape_like(text)}%"
    return or_(
        User.display_name.ilike(pattern, escape="\\"), User.platform_user_id.ilike(pattern, escape="\\")
    )


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def list_jobs(
    session: AsyncSession, filters: JobFilters = JobFilters(), *, limit: int = 30, before_id: int | None = None
) -> list[JobRow]:
    """Newest first, across every platform and user."""
    stmt = _jobs_select()
    if filters.state in JOB_STATES:
        stmt = stmt.where(Job.state == filters.state)
    if filters.mode:
        stmt = stmt.where(Job.mode == filters.mode)
    if filters.platform:
        stmt = stmt.where(User.platform == filters.platform)
    if filters.user.strip():
        stmt = stmt.where(_user_clause(filters.user.strip()))
    q = filters.query.strip()
    if q:
        digits = q.lstrip("#")
        clause = Job.prompt.ilike(f"%{_escape_like(q)}%", escape="\\")
        stmt = stmt.where(or_(clause, Job.id == int(digits)) if digits.isdigit() else clause)
    if before_id is not None:
        stmt = stmt.where(Job.id < before_id)
    stmt = stmt.order_by(Job.id.desc()).limit(max(1, min(limit, MAX_PAGE)))
    rows = (await session.execute(stmt)).all()
    return [(j, u, o) for j, u, o in rows]


async def get_job_row(session: AsyncSession, job_id: int) -> JobRow | None:
    row = (await session.execute(_jobs_select().where(Job.id == job_id))).first()
    return None if row is None else (row[0], row[1], row[2])


async def children_of(session: AsyncSession, job_id: int, *, limit: int = 50) -> list[JobRow]:
    stmt = _jobs_select().where(Job.parent_id == job_id).order_by(Job.id).limit(limit)
    rows = (await session.execute(stmt)).all()
    return [(j, u, o) for j, u, o in rows]


async def media_paths(session: AsyncSession, job_id: int) -> tuple[str | None, str | None]:
    """(output video path, input image path) of a job, as stored by the scheduler; None when absent."""
    stmt = (
        select(Output.path, InputImage.path)
        .select_from(Job)
        .outerjoin(Output, Output.job_id == Job.id)
        .outerjoin(InputImage, InputImage.id == Job.input_id)
        .where(Job.id == job_id)
    )
    row = (await session.execute(stmt)).first()
    return (None, None) if row is None else (row[0], row[1])


async def active_jobs(session: AsyncSession, *, limit: int = MAX_PAGE) -> list[JobRow]:
    """Every running and queued job, running first, then oldest first (the scheduler orders fairly)."""
    stmt = (
        _jobs_select()
        .where(Job.state.in_(("queued", "running")))
        .order_by((Job.state == "queued").asc(), Job.created_at, Job.id)
        .limit(limit)
    )
    rows = (await session.execute(stmt)).all()
    return [(j, u, o) for j, u, o in rows]


async def user_summaries(
    session: AsyncSession, *, query: str = "", day: str | None = None, limit: int = 100
) -> list[UserSummary]:
    """Users with their queue counts, today's quota usage and overrides; most recently active first."""
    day = day or dt.datetime.now(dt.UTC).date().isoformat()
    active = (
        select(
            Job.user_id.label("uid"),
            func.sum(case((Job.state == "running", 1), else_=0)).label("running"),
            func.sum(case((Job.state == "queued", 1), else_=0)).label("queued"),
            func.count(Job.id).label("total"),
            func.max(Job.id).label("last_job"),
        )
        .group_by(Job.user_id)
        .subquery()
    )
    usage = select(QuotaUsage).where(QuotaUsage.day == day).subquery()
    stmt = (
        select(User, active.c.running, active.c.queued, active.c.total, usage.c.jobs, usage.c.gpu_seconds)
        .outerjoin(active, active.c.uid == User.id)
        .outerjoin(usage, usage.c.user_id == User.id)
    )
    if query.strip():
        stmt = stmt.where(_user_clause(query.strip()))
    stmt = stmt.order_by(func.coalesce(active.c.last_job, 0).desc(), User.id.desc()).limit(max(1, min(limit, 500)))
    rows = (await session.execute(stmt)).all()
    return [
        UserSummary(
            key=f"{u.platform}:{u.platform_user_id}", platform=u.platform, user_id=u.platform_user_id,
            display_name=u.display_name, role=u.role, blocked=u.blocked, blocked_reason=u.blocked_reason,
            max_queued=u.max_queued, daily_jobs=u.daily_jobs, daily_gpu_seconds=u.daily_gpu_seconds,
            running=int(running or 0), queued=int(queued or 0), jobs_today=int(jobs_today or 0),
            gpu_seconds_today=float(gpu or 0.0), total_jobs=int(total or 0), exempt=u.role in EXEMPT_ROLES,
        )
        for u, running, queued, total, jobs_today, gpu in rows
    ]


async def workers(session: AsyncSession) -> list[WorkerRow]:
    rows = (await session.execute(select(WorkerState).order_by(WorkerState.id))).scalars().all()
    return [
        WorkerRow(
            id=w.id, pid=w.pid, device=w.device, state=w.state, heartbeat_at=w.heartbeat_at,
            restarts=w.restarts, info=dict(w.info or {}),
        )
        for w in rows
    ]


async def state_counts(session: AsyncSession) -> dict[str, int]:
    rows = (await session.execute(select(Job.state, func.count()).group_by(Job.state))).all()
    counts = dict.fromkeys(JOB_STATES, 0)
    counts.update({state: int(n) for state, n in rows})
    return counts


async def finished_since(session: AsyncSession, since: dt.datetime | None, *, limit: int = 5000) -> list[FinishedRow]:
    """Terminal jobs with ``finished_at >= since`` (all when None), oldest finish first."""
    stmt = (
        select(
            Job.id, Job.state, Job.mode, Job.platform, Job.error_code, Job.created_at, Job.started_at,
            Job.finished_at, Job.gpu_seconds,
        )
        .where(Job.state.in_(TERMINAL_STATES), Job.finished_at.is_not(None))
        .order_by(Job.finished_at, Job.id)
        .limit(limit)
    )
    if since is not None:
        stmt = stmt.where(Job.finished_at >= since)
    rows = (await session.execute(stmt)).all()
    return [
        FinishedRow(id=i, state=st, mode=m, platform=p, error_code=e, created_at=c, started_at=s, finished_at=f,
                    gpu_seconds=g)
        for i, st, m, p, e, c, s, f, g in rows
        if f is not None  # excluded by the query; says so to the type checker
    ]


async def refusals_after(session: AsyncSession, after_id: int, *, limit: int = 5000) -> list[tuple[int, str]]:
    """(audit id, detail) of refusals logged by the scheduler after ``after_id``, oldest first."""
    stmt = (
        select(AuditLog.id, AuditLog.detail)
        .where(AuditLog.action == "refused", AuditLog.id > after_id)
        .order_by(AuditLog.id)
        .limit(limit)
    )
    rows = (await session.execute(stmt)).all()
    return [(int(i), str(d or "")) for i, d in rows]


async def recent_timings(session: AsyncSession, *, limit: int = 30) -> list[tuple[int, dict[str, Any]]]:
    """(job id, timings) of the latest succeeded jobs, oldest first: the console's step-time history."""
    stmt = (
        select(Job.id, Job.timings)
        .where(Job.state == "succeeded")
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(limit)
    )
    rows = (await session.execute(stmt)).all()
    return [(int(i), dict(t or {})) for i, t in reversed(rows)]
