"""JSON shapes the console's scripts read. Never includes server paths or platform delivery extras
(a Discord interaction token lives there)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from bots import texts
from generator.params import PARAMS
from generator.scheduler.api import TERMINAL_KINDS, JobView, QuotaView


def iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def video_url(job_id: int) -> str:
    return f"/media/jobs/{job_id}/video.mp4"


def preview_url(job_id: int, version: int) -> str:
    # The version makes each preview its own URL: browsers and caches never show a stale one.
    return f"/media/jobs/{job_id}/preview.gif?v={version}"


def input_url(job_id: int) -> str:
    return f"/media/jobs/{job_id}/input.png"


def job_json(job: JobView) -> dict[str, Any]:
    r = job.request
    params = r.params()
    params["mode"], params["prompt"], params["seed"] = r.mode, r.prompt, r.seed
    params["width"], params["height"] = r.size
    out = job.output
    return {
        "id": job.id,
        "state": job.state,
        "terminal": job.state in TERMINAL_KINDS,
        "mode": r.mode,
        "prompt": r.prompt,
        "original_prompt": r.original_prompt,  # what the user typed, when prompt expansion rewrote it
        "seed": job.seed,
        "params": params,
        # The parameters of this mode, from the declaration: the scripts take names, labels and which ones
        # make the video what it is (``identity``: the summary line and the remix form) from here.
        "fields": [
            {
                "name": p.name, "label": p.label, "kind": p.kind.__name__, "identity": p.identity,
                "value": params[p.name],
                "shown": p.shown(r.effective(p.name)),
            }
            for p in PARAMS if r.mode in p.modes
        ],
        "platform": job.requester.platform,
        "user": {
            "key": job.requester.key,
            "platform": job.requester.platform,
            "id": job.requester.user_id,
            "name": job.requester.display_name,
        },
        "parent_id": job.parent_id,
        "lineage": job.lineage,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "attempts": job.attempts,
        "progress": {"step": job.progress_step, "total": job.progress_total, "phase": job.progress_phase},
        "preview": {"url": preview_url(job.id, job.preview_version), "version": job.preview_version}
        if job.preview and job.state == "running" else None,
        "position": job.position,
        "queue_length": job.queue_length,
        "eta": iso(job.eta),
        "output": None
        if out is None
        else {
            "url": video_url(job.id),
            "width": out.width,
            "height": out.height,
            "frames": out.frames,
            "fps": out.fps,
            "duration_s": out.duration_s,
            "bytes": out.bytes,
            "sha256": out.sha256,
            "model_label": out.model_label,
            "is_demo": out.is_demo,
        },
        "input_url": input_url(job.id) if r.image else None,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "timings": job.timings,
        "cancel_requested": job.cancel_requested,
        "status_text": texts.status_text(job, "plain"),
        "caption": texts.result_caption(job, "plain") if job.state == "succeeded" else "",
        "demo_note": texts.DEMO_NOTE if out is not None and out.is_demo else "",
    }


def quota_json(quota: QuotaView) -> dict[str, Any]:
    return {
        "running": quota.running,
        "queued": quota.queued,
        "max_running": quota.max_running,
        "max_queued": quota.max_queued,
        "jobs_today": quota.jobs_today,
        "daily_jobs": quota.daily_jobs,
        "gpu_seconds_today": quota.gpu_seconds_today,
        "daily_gpu_seconds": quota.daily_gpu_seconds,
        "resets_at": iso(quota.resets_at),
    }
