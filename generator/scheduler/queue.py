"""The queue is the jobs table: fair claim, leases, fenced transitions and requeue.

Every function runs inside the caller's write transaction (``Database.write()``). Transitions of a running
job are fenced with ``WHERE id=? AND attempts=? AND state='running'``: zero rows means the lease was lost
and the caller must discard its result. Each accepted terminal transition writes one audit row in the
same transaction (the kill -9 harness counts them to prove there is never a second completion).

Fair order (docs/scheduler.md): next job = min over queued jobs of
    (user's running count, user's GPU-seconds today, created_at, id)
skipping users already at their running cap (owners/unlimited are not capped). Queue positions use the
same key with each user's k-th queued job counted as k more running jobs, which is the order repeated
claims produce.

LoRA affinity: a worker names the LoRA set it last ran (``prefer_loras``, its cached files). The fair rule
picks the user exactly as above; only among that user's own queued jobs (equal standing: the same user and
round) does a job with that set go before an older one with another set. No other user's turn moves.

Quotas (docs/scheduler.md): submit counts one of the user's daily jobs; the terminal transition charges the GPU
time. A job cancelled before it ran, or failed for a reason that is not the user's (worker lost, internal
error, stored input gone, engine or model trouble: anything not in ``USER_FAILURES``), gets its daily job
back and is charged no GPU time, in the transaction of that transition (which is fenced, so exactly once).
Successes, cancels of a running job and the user's own failures count: running out of GPU memory at the
size the user picked, an input image the engine cannot read.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from generator.request import GenerationRequest
from generator.scheduler.estimate import Shape
from storage.db import rows_affected
from storage.models import HeldOutput, InputImage, Job, Output, QuotaUsage, User
from storage.repo_audit import add_audit
from storage.repo_files import add_held_output, add_output, take_held
from storage.repo_quotas import add_usage, refund_job, utc_day
from storage.repo_users import EXEMPT_ROLES

# In a job's delivery extras: the place it goes allowed age-restricted content when it was submitted.
AGE_OK_KEY = "age_restricted_ok"
# A claim tries at most this many users (each a row lock on PostgreSQL), fetched this many per fair-order pass.
CLAIM_TRIES = 32
HEADS_PER_PASS = 8
USER_FAILURES = frozenset({"out_of_memory", "bad_image", "blocked_output"})  # failures that still count against the quota


def users_fault(code: str) -> bool:
    return code in USER_FAILURES


@dataclass(frozen=True)
class Claimed:
    """What a worker needs to run a job it has leased."""

    job_id: int
    attempt: int
    request: GenerationRequest
    input_path: str | None
    created_at: dt.datetime
    lease_until: dt.datetime
    age_restricted_ok: bool = False  # the place it goes allows age-restricted content (output moderation)


@dataclass(frozen=True)
class LeaseStatus:
    alive: bool  # False: the lease is lost (requeued, cancelled-and-released or deleted): stop and discard
    cancel_requested: bool = False


@dataclass(frozen=True)
class OutputInfo:
    path: str
    sha256: str
    bytes: int
    duration_s: float
    width: int
    height: int
    frames: int
    fps: int
    model_label: str
    is_demo: bool


@dataclass(frozen=True)
class Transition:
    job_id: int
    state: str  # the state the job was moved to
    handed_back: bool = False  # requeued by a clean shutdown, the attempt not counted


def _running_counts() -> Any:
    return (
        select(Job.user_id.label("user_id"), func.count().label("n"))
        .where(Job.state == "running")
        .group_by(Job.user_id)
        .subquery("running_counts")
    )


def _fenced(job_id: int, attempt: int) -> Any:
    return and_(Job.id == job_id, Job.attempts == attempt, Job.state == "running")


async def claim(
    session: AsyncSession,
    *,
    worker_id: str,
    now: dt.datetime,
    lease_seconds: float,
    max_running_per_user: int,
    postgres: bool = False,
    prefer_loras: str = "",
) -> Claimed | None:
    """Lease the next job in fair order, or None when nothing is claimable.

    Two cheap steps instead of sorting every queued job: pick the user whose first queued job
    has the smallest fair key (an index-only pass over the queued jobs), then that group's oldest job, or
    its oldest job with the LoRA set ``prefer_loras`` (canonical form; "" = no preference).
    """
    excluded: list[int] = []
    candidates: list[tuple[int, str]] = []
    for _ in range(CLAIM_TRIES):
        if not candidates:
            # Concurrent claimers compute the same fair order: each pass yields the next few heads, so a claimer
            # that finds the first taken by another tries the runner-up instead of recomputing the aggregate.
            candidates = await _pick_heads(session, now, max_running_per_user, excluded, HEADS_PER_PASS)
            if not candidates:
                return None
        user_id, role = candidates.pop(0)
        if postgres and role not in EXEMPT_ROLES:
            # Concurrent claimers on PostgreSQL each see the others' claims only after commit: lock the
            # user row and recount so the running cap holds. (SQLite's BEGIN IMMEDIATE serialises claims.)
            # SKIP LOCKED: another claimer is deciding for this user right now; waiting for it while holding
            # the rows of users tried before would let two claimers deadlock (each holds what the other wants).
            mine = (
                await session.execute(select(User.id).where(User.id == user_id).with_for_update(skip_locked=True))
            ).first()
            if mine is None:
                excluded.append(user_id)
                continue
            running = (
                await session.execute(select(func.count()).where(Job.user_id == user_id, Job.state == "running"))
            ).scalar_one()
            if running >= max_running_per_user:
                excluded.append(user_id)
                continue
        oldest = (
            select(Job.id)
            .where(Job.state == "queued", Job.user_id == user_id)
            .order_by(Job.created_at, Job.id)
            .limit(1)
        )
        if postgres:
            oldest = oldest.with_for_update(skip_locked=True)
        pick: Any = oldest.scalar_subquery()
        if prefer_loras:
            chosen = await _same_loras_job(session, user_id, prefer_loras, postgres)
            if chosen is not None:
                pick = chosen
        lease_until = now + dt.timedelta(seconds=lease_seconds)
        stmt = (
            update(Job)
            .where(Job.id == pick, Job.state == "queued")
            .values(
                state="running",
                attempts=Job.attempts + 1,
                worker_id=worker_id,
                lease_until=lease_until,
                started_at=now,
                progress_step=0,
                progress_total=0,
                progress_phase="",
                preview="",
                preview_version=0,
            )
            .returning(Job.id, Job.attempts, Job.request, Job.created_at, Job.input_id, Job.delivery)
        )
        row = (await session.execute(stmt)).first()
        if row is None:  # PostgreSQL: all of them locked by other claimers right now
            excluded.append(user_id)
            continue
        job_id, attempt, request, created_at, input_id, delivery = row
        input_path = None
        if input_id is not None:
            input_path = (
                await session.execute(select(InputImage.path).where(InputImage.id == input_id))
            ).scalar_one_or_none()
        return Claimed(
            job_id=int(job_id),
            attempt=int(attempt),
            request=request,
            input_path=input_path,
            created_at=created_at,
            lease_until=lease_until,
            age_restricted_ok=bool((delivery or {}).get(AGE_OK_KEY)),
        )
    return None


AFFINITY_LOOKAHEAD = 32  # a user's queued jobs looked at for the worker's LoRA set (the queued cap is smaller)


async def _same_loras_job(session: AsyncSession, user_id: int, loras: str, postgres: bool) -> int | None:
    """The user's oldest queued job whose LoRA set is ``loras`` (None: none of them). The set lives in the
    request's JSON, so the few queued jobs of one user are read and compared here (the same on every database)."""
    q = (
        select(Job.id, Job.request)
        .where(Job.state == "queued", Job.user_id == user_id)
        .order_by(Job.created_at, Job.id)
        .limit(AFFINITY_LOOKAHEAD)
    )
    if postgres:
        q = q.with_for_update(skip_locked=True)
    for job_id, request in (await session.execute(q)).all():
        if request is not None and request.loras == loras:
            return int(job_id)
    return None


async def _pick_heads(
    session: AsyncSession, now: dt.datetime, cap: int, excluded: list[int], limit: int
) -> list[tuple[int, str]]:
    """(user_id, role) of the users whose queued jobs go next, in fair order, at most ``limit``."""
    heads_q = select(Job.user_id.label("user_id"), func.min(Job.created_at).label("first_at")).where(
        Job.state == "queued"
    )
    if excluded:
        heads_q = heads_q.where(Job.user_id.not_in(excluded))
    heads = heads_q.group_by(Job.user_id).subquery("heads")
    running = _running_counts()
    usage = (
        select(QuotaUsage.user_id.label("user_id"), QuotaUsage.gpu_seconds.label("gpu"))
        .where(QuotaUsage.day == utc_day(now))
        .subquery("usage_today")
    )
    n_running = func.coalesce(running.c.n, 0)
    stmt = (
        select(heads.c.user_id, User.role)
        .join(User, User.id == heads.c.user_id)
        .outerjoin(running, running.c.user_id == heads.c.user_id)
        .outerjoin(usage, usage.c.user_id == heads.c.user_id)
        .where(or_(n_running < cap, User.role.in_(EXEMPT_ROLES)))
        .order_by(n_running, func.coalesce(usage.c.gpu, 0.0), heads.c.first_at, heads.c.user_id)
        .limit(limit)
    )
    return [(int(u), str(r)) for u, r in (await session.execute(stmt)).tuples()]


async def lease_status(session: AsyncSession, job_id: int, attempt: int) -> LeaseStatus:
    flag = (
        await session.execute(select(Job.cancel_requested).where(_fenced(job_id, attempt)))
    ).scalar_one_or_none()
    return LeaseStatus(alive=flag is not None, cancel_requested=bool(flag))


async def heartbeat(
    session: AsyncSession, job_id: int, attempt: int, *, now: dt.datetime, lease_seconds: float | None
) -> LeaseStatus:
    """Extend the lease (``lease_seconds`` None: only check it) and report a pending cancel request."""
    if lease_seconds is not None:
        stmt = (
            update(Job)
            .where(_fenced(job_id, attempt))
            .values(lease_until=now + dt.timedelta(seconds=lease_seconds))
        )
        if await rows_affected(session, stmt) != 1:
            return LeaseStatus(alive=False)
    return await lease_status(session, job_id, attempt)


async def progress(
    session: AsyncSession,
    job_id: int,
    attempt: int,
    step: int,
    total: int,
    *,
    now: dt.datetime,
    lease_seconds: float,
    phase: str | None = None,
) -> LeaseStatus:
    """``step``/``total``: sampler steps done; ``phase`` (text, sampling, decoding, encoding) when known."""
    values: dict[str, Any] = {
        "progress_step": step, "progress_total": total, "lease_until": now + dt.timedelta(seconds=lease_seconds)
    }
    if phase is not None:
        values["progress_phase"] = phase
    stmt = update(Job).where(_fenced(job_id, attempt)).values(**values)
    if await rows_affected(session, stmt) != 1:
        return LeaseStatus(alive=False)
    return await lease_status(session, job_id, attempt)


async def set_preview(session: AsyncSession, job_id: int, attempt: int, ref: str, version: int) -> bool:
    """Point the running attempt at its latest preview (fenced); False when the attempt no longer runs."""
    stmt = update(Job).where(_fenced(job_id, attempt)).values(preview=ref, preview_version=version)
    return await rows_affected(session, stmt) == 1


async def complete(
    session: AsyncSession,
    job_id: int,
    attempt: int,
    output: OutputInfo,
    *,
    gpu_seconds: float,
    timings: dict[str, float],
    now: dt.datetime,
) -> str:
    """Accept a finished render: "succeeded"; "cancelled" if a cancel was requested meanwhile (the caller
    deletes the file); "lost" if the lease is gone (the caller deletes the file)."""
    values: dict[str, Any] = {
        "state": "succeeded",
        "finished_at": now,
        "lease_until": None,
        "gpu_seconds": gpu_seconds,
        "timings": timings,
        "error_code": "",
        "error_message": "",
        "progress_step": Job.progress_total,
    }
    stmt = (
        update(Job)
        .where(_fenced(job_id, attempt), Job.cancel_requested.is_(False))
        .values(**values)
        .returning(Job.user_id)
    )
    user_id = (await session.execute(stmt)).scalar_one_or_none()
    if user_id is None:
        cancelled = await finish(
            session, job_id, attempt, state="cancelled", code="cancelled", message="Cancelled.",
            gpu_seconds=gpu_seconds, timings=timings, now=now,
        )
        return "cancelled" if cancelled else "lost"
    await add_output(
        session, job_id=job_id, path=output.path, sha256=output.sha256, size=output.bytes,
        duration_s=output.duration_s, width=output.width, height=output.height, frames=output.frames,
        fps=output.fps, model_label=output.model_label, is_demo=output.is_demo, now=now,
    )
    await _charge(session, user_id, gpu_seconds, now)
    await add_audit(session, "succeeded", job_id=job_id, detail=f"attempt {attempt}", now=now)
    return "succeeded"


async def finish(
    session: AsyncSession,
    job_id: int,
    attempt: int,
    *,
    state: str,
    code: str,
    message: str,
    gpu_seconds: float = 0.0,
    timings: dict[str, float] | None = None,
    now: dt.datetime,
) -> bool:
    """Fenced failure or cancellation of a running job. False: the lease was lost (ignore)."""
    assert state in ("failed", "cancelled")
    stmt = (
        update(Job)
        .where(_fenced(job_id, attempt))
        .values(
            state=state, finished_at=now, lease_until=None, gpu_seconds=gpu_seconds, timings=timings or {},
            error_code=code[:32], error_message=message,
        )
        .returning(Job.user_id, Job.created_at)
    )
    row = (await session.execute(stmt)).first()
    if row is None:
        return False
    user_id, created_at = row
    if state == "failed" and not users_fault(code):
        await refund_job(session, user_id, utc_day(created_at))
    else:
        await _charge(session, user_id, gpu_seconds, now)
    await add_audit(session, state, job_id=job_id, detail=f"attempt {attempt}: {code}", now=now)
    return True


async def block_output(
    session: AsyncSession, job_id: int, attempt: int, *, labels: list[str], message: str, gpu_seconds: float,
    now: dt.datetime, held: OutputInfo | None = None,
) -> bool:
    """Fail a job whose output the moderation model held, with an audit row for the console's queue (who,
    where, which labels). ``held``: the stored video, kept apart from outputs until an admin releases or
    deletes it. Fenced like ``finish``; False when the lease was lost (the caller removes the file)."""
    ok = await finish(session, job_id, attempt, state="failed", code="blocked_output", message=message,
                      gpu_seconds=gpu_seconds, timings={"total": gpu_seconds}, now=now)
    if not ok:
        return False
    if held is not None:
        await add_held_output(
            session, job_id=job_id, path=held.path, sha256=held.sha256, size=held.bytes, duration_s=held.duration_s,
            width=held.width, height=held.height, frames=held.frames, fps=held.fps, model_label=held.model_label,
            is_demo=held.is_demo, labels=",".join(labels), now=now,
        )
    job = await session.get(Job, job_id)
    if job is not None:
        user = await session.get(User, job.user_id)
        where = f"{job.platform}:{job.guild_id}/{job.chat_id}" if job.guild_id else f"{job.platform}:{job.chat_id}"
        detail = {
            "who": f"{user.platform}:{user.platform_user_id}" if user else "", "name": user.display_name if user else "",
            "where": where, "platform": job.platform, "guild": job.guild_id, "chat": job.chat_id,
            "entry": ",".join(labels), "prompt": job.prompt, "job": job_id, "held": held is not None,
        }
        await add_audit(session, "blocked_output", user_id=job.user_id, job_id=job_id, detail=json.dumps(detail),
                        now=now)
    return True


async def release_held(session: AsyncSession, job_id: int, *, now: dt.datetime) -> HeldOutput | None:
    """An admin's release of a held video: it becomes the job's output and the job succeeded, undelivered, so
    the event hub delivers it once through the normal path. None when nothing is held (released or deleted
    already, or the job is gone)."""
    held = await take_held(session, job_id)
    if held is None:
        return None
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.state == "failed", Job.error_code == "blocked_output")
        .values(state="succeeded", error_code="", error_message="", delivered_at=None)
    )
    if await rows_affected(session, stmt) != 1:
        raise RuntimeError(f"job {job_id} holds a video but is not a held failure")  # rolls the take back
    await add_output(
        session, job_id=job_id, path=held.path, sha256=held.sha256, size=held.bytes, duration_s=held.duration_s,
        width=held.width, height=held.height, frames=held.frames, fps=held.fps, model_label=held.model_label,
        is_demo=held.is_demo, now=now,
    )
    return held


async def accepted_output(session: AsyncSession, job_id: int) -> str | None:
    """The output path of a succeeded job (to recognise our own completion after a retried commit)."""
    stmt = select(Output.path).join(Job, Job.id == Output.job_id).where(Job.id == job_id, Job.state == "succeeded")
    return (await session.execute(stmt)).scalar_one_or_none()


async def _charge(session: AsyncSession, user_id: int, gpu_seconds: float, now: dt.datetime) -> None:
    if gpu_seconds > 0:
        await add_usage(session, user_id, utc_day(now), gpu_seconds=gpu_seconds)


async def cancel(session: AsyncSession, job_id: int, *, now: dt.datetime) -> str:
    """"cancelled" (was queued), "requested" (running: the worker stops between steps),
    "already_<state>" for a finished job, "missing" when there is no such job."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.state == "queued")
        .values(state="cancelled", finished_at=now, error_code="cancelled", error_message="Cancelled.")
        .returning(Job.user_id, Job.created_at)
    )
    row = (await session.execute(stmt)).first()
    if row is not None:
        await refund_job(session, row[0], utc_day(row[1]))  # it never ran
        await add_audit(session, "cancelled", job_id=job_id, detail="while queued", now=now)
        return "cancelled"
    flag = update(Job).where(Job.id == job_id, Job.state == "running").values(cancel_requested=True)
    if await rows_affected(session, flag) == 1:
        return "requested"
    state = (await session.execute(select(Job.state).where(Job.id == job_id))).scalar_one_or_none()
    return f"already_{state}" if state else "missing"


async def _requeue_rows(
    session: AsyncSession, rows: list[tuple[int, int, bool]], *, now: dt.datetime, max_attempts: int, why: str
) -> list[Transition]:
    out: list[Transition] = []
    for job_id, attempt, cancel_requested in rows:
        if cancel_requested:
            state, values = "cancelled", {"error_code": "cancelled", "error_message": "Cancelled."}
        elif attempt >= max_attempts:
            state = "failed"
            values = {
                "error_code": "worker_lost",
                "error_message": (
                    f"The video could not be made: the GPU worker stopped during it {attempt} times. "
                    "Please try again later or with smaller settings."
                ),
            }
        else:
            state, values = "queued", {}
        base: dict[str, Any] = {"state": state, "lease_until": None}
        if state == "queued":
            base.update(worker_id="", started_at=None, progress_step=0, progress_total=0, progress_phase="")
        else:
            base.update(finished_at=now)
        stmt = (
            update(Job).where(_fenced(job_id, attempt)).values(**base, **values)
            .returning(Job.user_id, Job.created_at)
        )
        row = (await session.execute(stmt)).first()
        if row is None:
            continue
        if state == "failed":  # the worker kept dying: not the user's doing
            await refund_job(session, row[0], utc_day(row[1]))
        if state != "queued":
            await add_audit(session, state, job_id=job_id, detail=f"attempt {attempt}: {why}", now=now)
        out.append(Transition(job_id, state))
    return out


async def hand_back(session: AsyncSession, job_id: int, attempt: int, *, now: dt.datetime) -> bool:
    """The claiming worker gives a job back before rendering it (e.g. its input cannot be fetched from the
    object store right now): queued again, the attempt not counted. Fenced; safe because the caller is the
    only holder of this attempt and does nothing more with it."""
    stmt = update(Job).where(_fenced(job_id, attempt)).values(
        state="queued", attempts=attempt - 1, lease_until=None, worker_id="", started_at=None,
        progress_step=0, progress_total=0, progress_phase="",
    )
    return await rows_affected(session, stmt) == 1


async def has_expired(session: AsyncSession, *, now: dt.datetime) -> bool:
    """Cheap read before taking the write lock for ``requeue_expired``."""
    stmt = select(Job.id).where(Job.state == "running", Job.lease_until < now).limit(1)
    return (await session.execute(stmt)).first() is not None


async def requeue_expired(session: AsyncSession, *, now: dt.datetime, max_attempts: int) -> list[Transition]:
    """Running jobs whose lease has expired go back to the queue (or fail after ``max_attempts``)."""
    stmt = select(Job.id, Job.attempts, Job.cancel_requested).where(Job.state == "running", Job.lease_until < now)
    rows = [(int(a), int(b), bool(c)) for a, b, c in (await session.execute(stmt)).tuples()]
    return await _requeue_rows(session, rows, now=now, max_attempts=max_attempts, why="lease expired")


async def running_worker_ids(session: AsyncSession) -> list[str]:
    """The workers holding running jobs."""
    stmt = select(Job.worker_id).where(Job.state == "running").distinct()
    return [str(w) for w in (await session.execute(stmt)).scalars()]


async def release_worker(
    session: AsyncSession, worker_ids: list[str], *, now: dt.datetime, max_attempts: int, hand_back: bool = False
) -> list[Transition]:
    """Requeue the running jobs of workers known to be dead (their process has exited).

    ``hand_back``: we stopped them on purpose (a clean shutdown), so the interrupted attempt is not counted:
    ``attempts`` goes back down by one. Safe for the fence because the worker process has already exited
    (no straggler of that attempt can commit); the next claim reuses the number."""
    if not worker_ids:
        return []
    stmt = select(Job.id, Job.attempts, Job.cancel_requested).where(
        Job.state == "running", Job.worker_id.in_(worker_ids)
    )
    rows = [(int(a), int(b), bool(c)) for a, b, c in (await session.execute(stmt)).tuples()]
    if not hand_back:
        return await _requeue_rows(session, rows, now=now, max_attempts=max_attempts, why="worker exited")
    out: list[Transition] = []
    for job_id, attempt, cancel_requested in rows:
        if cancel_requested:  # it was being cancelled anyway
            out += await _requeue_rows(session, [(job_id, attempt, True)], now=now, max_attempts=max_attempts,
                                       why="stopped")
            continue
        back = update(Job).where(_fenced(job_id, attempt)).values(
            state="queued", attempts=attempt - 1, lease_until=None, worker_id="", started_at=None,
            progress_step=0, progress_total=0,
        )
        if await rows_affected(session, back) == 1:
            out.append(Transition(job_id, "queued", handed_back=True))
    return out


# --- queue positions ------------------------------------------------------------------------------


@dataclass
class QueueSnapshot:
    """Queued jobs in fair order and the running jobs with their shapes, read in one transaction."""

    order: list[int] = field(default_factory=list)  # queued job ids, next first
    running: list[int] = field(default_factory=list)
    shapes: dict[int, Shape] = field(default_factory=dict)  # queued and running jobs
    steps_done: dict[int, int] = field(default_factory=dict)  # running jobs
    _index: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {job_id: i for i, job_id in enumerate(self.order)}

    def position(self, job_id: int) -> int | None:
        i = self._index.get(job_id)
        return None if i is None else i + 1

    @property
    def length(self) -> int:
        return len(self.order)


async def snapshot(session: AsyncSession, *, now: dt.datetime) -> QueueSnapshot:
    queued = (
        await session.execute(
            select(Job.id, Job.user_id, Job.created_at, Job.request).where(Job.state == "queued")
        )
    ).tuples().all()
    running_rows = (
        await session.execute(
            select(Job.id, Job.user_id, Job.progress_step, Job.request)
            .where(Job.state == "running")
            .order_by(Job.started_at)
        )
    ).tuples().all()
    running_per_user: dict[int, int] = defaultdict(int)
    shapes: dict[int, Shape] = {}
    steps_done: dict[int, int] = {}
    for job_id, uid, step, request in running_rows:
        running_per_user[uid] += 1
        shapes[job_id] = Shape.from_request(request)
        steps_done[job_id] = int(step)
    for job_id, _uid, _created, request in queued:
        shapes[job_id] = Shape.from_request(request)
    users = {row[1] for row in queued}
    gpu: dict[int, float] = {}
    if users:
        stmt = select(QuotaUsage.user_id, QuotaUsage.gpu_seconds).where(
            QuotaUsage.day == utc_day(now), QuotaUsage.user_id.in_(list(users))
        )
        gpu = {int(u): float(g) for u, g in (await session.execute(stmt)).tuples()}
    order = fair_order([row[:3] for row in queued], running_per_user, gpu)
    return QueueSnapshot(order=order, running=[r[0] for r in running_rows], shapes=shapes, steps_done=steps_done)


def fair_order(
    queued: list[tuple[int, int, dt.datetime]] | Any,
    running_per_user: dict[int, int],
    gpu_today: dict[int, float],
) -> list[int]:
    """Queued (id, user_id, created_at) rows -> ids in the order repeated claims take them."""
    per_user: dict[int, list[tuple[dt.datetime, int]]] = defaultdict(list)
    for job_id, user_id, created_at in queued:
        per_user[user_id].append((created_at, job_id))
    keyed = []
    for user_id, jobs in per_user.items():
        jobs.sort()
        base = running_per_user.get(user_id, 0)
        g = gpu_today.get(user_id, 0.0)
        for rank, (created_at, job_id) in enumerate(jobs):
            keyed.append(((base + rank, g, created_at, job_id), job_id))
    keyed.sort()
    return [job_id for _, job_id in keyed]
