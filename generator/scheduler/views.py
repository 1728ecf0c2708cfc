"""Rows -> ``JobView`` snapshots for front ends, with queue position and ETA (``job_view``: the one
conversion). Pure functions over loaded rows: touches neither the database nor files."""

from __future__ import annotations

import datetime as dt

from generator.scheduler.api import PHASES, DeliveryTarget, JobView, OutputView, Requester
from generator.scheduler.estimate import StepStats
from generator.scheduler.queue import QueueSnapshot
from storage.models import Job, Output, User

_LOADED = object()  # "take it from the job's loaded relationship"


def eta_for(
    job_id: int, state: str, snap: QueueSnapshot, stats: StepStats, n_workers: int, now: dt.datetime
) -> dt.datetime | None:
    """Finish time estimate: remaining steps of running jobs plus the jobs ahead, spread over workers."""
    if state == "running":
        shape = snap.shapes.get(job_id)
        left = stats.remaining(shape, snap.steps_done.get(job_id, 0)) if shape else None
        return None if left is None else now + dt.timedelta(seconds=left)
    pos = snap.position(job_id) if state == "queued" else None
    if pos is None:
        return None
    total = 0.0
    for rid in snap.running:
        left = stats.remaining(snap.shapes[rid], snap.steps_done.get(rid, 0))
        if left is None:
            return None
        total += left
    for qid in snap.order[:pos]:
        left = stats.remaining(snap.shapes[qid], 0)
        if left is None:
            return None
        total += left
    return now + dt.timedelta(seconds=total / max(1, n_workers))


def job_view(
    job: Job,
    *,
    user: User | None = None,
    output: Output | object | None = _LOADED,
    snap: QueueSnapshot | None = None,
    stats: StepStats | None = None,
    n_workers: int = 1,
    now: dt.datetime | None = None,
) -> JobView:
    """``user``/``output`` may be passed from a joined query instead of the job's loaded relationships."""
    user = user if user is not None else job.user
    out = job.output if output is _LOADED else output
    assert out is None or isinstance(out, Output)
    position = snap.position(job.id) if snap is not None and job.state == "queued" else None
    eta = None
    if snap is not None and stats is not None and now is not None and job.state in ("queued", "running"):
        eta = eta_for(job.id, job.state, snap, stats, n_workers, now)
    return JobView(
        id=job.id,
        state=job.state,
        request=job.request,
        requester=Requester(platform=user.platform, user_id=user.platform_user_id, display_name=user.display_name),
        target=DeliveryTarget(
            platform=job.platform,
            chat_id=job.chat_id,
            guild_id=job.guild_id,
            status_message_id=job.status_message_id,
            reply_to_message_id=job.reply_to_message_id,
            extra=dict(job.delivery or {}),
        ),
        parent_id=job.parent_id,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempts,
        progress_step=job.progress_step,
        progress_total=job.progress_total,
        position=position,
        queue_length=snap.length if snap is not None and job.state == "queued" else None,
        eta=eta,
        output=None
        if out is None
        else OutputView(
            path=out.path, bytes=out.bytes, width=out.width, height=out.height, frames=out.frames, fps=out.fps,
            duration_s=out.duration_s, sha256=out.sha256, model_label=out.model_label, is_demo=out.is_demo,
        ),
        error_code=job.error_code,
        error_message=job.error_message,
        timings=_timings(job),
        cancel_requested=bool(job.cancel_requested) and job.state == "running",
        progress_phase=job.progress_phase if job.progress_phase in PHASES else "",
        lineage=job.lineage if job.lineage in ("remix", "retry", "extend") else "",  # type: ignore[arg-type]
        preview=(job.preview or "") if job.state == "running" else "",
        preview_version=int(job.preview_version or 0) if job.state == "running" else 0,
    )


def _timings(job: Job) -> dict[str, float]:
    out = {k: float(v) for k, v in (job.timings or {}).items() if isinstance(v, (int, float))}
    if job.started_at is not None:
        out.setdefault("queue_wait", (job.started_at - job.created_at).total_seconds())
    if job.finished_at is not None:
        out.setdefault("end_to_end", (job.finished_at - job.created_at).total_seconds())
    return out
