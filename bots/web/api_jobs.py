"""Playground, gallery and job endpoints: thin over bots.commands and the scheduler."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from pathlib import Path
from typing import Any

from aiohttp import web

from bots.commands import build_request, parse_remix, submit_text
from bots.previews import read_preview
from bots.web.context import console_of
from bots.web.errors import body_deadline
from bots.web.events import stream_job
from bots.web.forms import FormRejected, coerce_options, read_job_form
from bots.web.security import json_error
from bots.web.serialize import job_json, quota_json
from generator.params import MODES, PARAMS
from generator.request import SIZES, RequestError
from generator.scheduler.api import Refusal, RefusalCode
from generator.scheduler.disk import STORAGE_MESSAGE
from generator.scheduler.filestore import is_remote, local_copy
from generator.scheduler.reads import JOB_STATES, MAX_PAGE, JobFilters
from turbobot.config import Settings

log = logging.getLogger(__name__)

_CLIENT_KEY = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_PLACEHOLDER_IMAGE = "0" * 64  # lets us validate an i2v request before the upload is stored
MAX_JOB_ID = 2**63 - 1  # ids are signed 64-bit in the database; a larger number names no job


def _idempotency_key(raw: Any) -> str:
    """The browser sends a random key per form submission, so a double click makes one job."""
    text = str(raw or "")
    return f"web:{text}" if _CLIENT_KEY.match(text) else f"web:{secrets.token_hex(16)}"


def parse_job_id(text: str) -> int | None:
    """A job id from text, or None when it is not one (malformed, or beyond what the database can hold)."""
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if 0 < value <= MAX_JOB_ID else None


def job_id_of(request: web.Request) -> int:
    job_id = parse_job_id(request.match_info.get("job_id", ""))
    if job_id is None:
        raise web.HTTPNotFound(text="There is no such job.")
    return job_id


async def json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="Send JSON.")
    try:
        async with body_deadline(console_of(request).settings.web.body_timeout_seconds):
            data = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="The body must be a JSON object.")
    return data


def options_payload(settings: Settings) -> dict[str, Any]:
    """Every request parameter with its allowed values and configured default, for the playground form."""
    lim = settings.request_limits
    d = settings.defaults
    return {
        # The form's fields, from the declaration (generator.params); the script renders them in this order.
        "params": [{**p.as_json(lim), "default": getattr(d, p.name) if p.configurable else p.default} for p in PARAMS],
        "modes": list(MODES),
        "sizes": {f"{res} {asp}": list(SIZES[(res, asp)]) for res in lim.resolutions for asp in lim.aspects},
        # Optional fields whose default depends on the mode.
        "mode_defaults": {p.name: dict(p.mode_default) for p in PARAMS if p.mode_default},
        "i2v_prompt": d.i2v_prompt,
        # The console's /loras: each style on offer with its description, and the per-job bounds.
        "loras": {
            "styles": [{"name": n, "description": desc} for n, desc in settings.lora_catalog()],
            "max_per_job": lim.max_loras,
            "max_scale": lim.max_lora_scale,
        },
        "max_prompt_chars": lim.max_prompt_chars,
        "image": {
            "max_bytes": settings.limits.max_image_bytes,
            "max_pixels": settings.limits.max_image_pixels,
            "max_side": settings.limits.max_image_side,
            "types": ["image/png", "image/jpeg", "image/webp"],
        },
    }


async def get_options(request: web.Request) -> web.Response:
    c = console_of(request)
    payload = options_payload(c.settings)
    payload["operator"] = c.operator.key
    payload["auth"] = c.auth.enabled
    return web.json_response(payload)


async def submit_job(request: web.Request) -> web.Response:
    c = console_of(request)
    # Refuse before reading an upload that could not be stored anyway.
    if await c.scheduler.views.storage_problem():
        return c.refusal_response(Refusal(RefusalCode.STORAGE_UNAVAILABLE, STORAGE_MESSAGE))
    try:
        form = await read_job_form(request, c.settings.limits, body_timeout=c.settings.web.body_timeout_seconds)
    except FormRejected as exc:
        c.metrics.web_refusals[exc.code] += 1
        return json_error(exc.status, exc.code, exc.message)
    fields = dict(form.fields)
    mode = fields.pop("mode", "t2v").strip().lower()
    prompt = fields.pop("prompt", "")
    key = _idempotency_key(fields.pop("client_key", ""))
    try:
        options = coerce_options(fields)
        # Parse the flags before storing an upload (ranges are checked once, by the scheduler's submit).
        image_ref = _PLACEHOLDER_IMAGE if form.image is not None else None
        build_request(c.settings, mode, prompt, image=image_ref, options=options)
        image = None
        if form.image is not None:
            image = await c.scheduler.jobs.save_input(c.operator, form.image.png_bytes, form.image.width, form.image.height)
        result = await submit_text(
            c.scheduler, c.settings, c.operator, c.target, key, mode, prompt, image=image, options=options
        )
    except RequestError as exc:
        return c.refusal_response(Refusal("invalid", exc.message))
    except Refusal as exc:
        return c.refusal_response(exc)
    log.info("web: job %s submitted (duplicate=%s)", result.job.id, result.duplicate)
    return web.json_response(
        {"job": job_json(result.job), "duplicate": result.duplicate}, status=200 if result.duplicate else 201
    )


async def list_jobs(request: web.Request) -> web.Response:
    c = console_of(request)
    q = request.query
    state = q.get("state", "")
    mode = q.get("mode", "")
    if state and state not in JOB_STATES:
        return json_error(400, "invalid", f"state must be one of {', '.join(JOB_STATES)}.")
    if mode and mode not in MODES:
        return json_error(400, "invalid", f"mode must be one of {', '.join(MODES)}.")
    try:
        limit = max(1, min(int(q.get("limit", "30")), MAX_PAGE))
    except ValueError:
        return json_error(400, "invalid", "limit and before must be whole numbers.")
    before = parse_job_id(q["before"]) if q.get("before") else None
    if q.get("before") and before is None:
        return json_error(400, "invalid", "before must be a job id.")
    filters = JobFilters(
        user=q.get("user", ""), state=state, mode=mode, platform=q.get("platform", ""), query=q.get("q", "")
    )
    jobs = await c.scheduler.listings.jobs(filters, limit=limit, before_id=before)
    return web.json_response(
        {"jobs": [job_json(j) for j in jobs], "next_before": jobs[-1].id if len(jobs) >= limit else None}
    )


async def get_job(request: web.Request) -> web.Response:
    c = console_of(request)
    job_id = job_id_of(request)
    job = await c.scheduler.views.get(job_id)
    if job is None:
        return json_error(404, "not_found", f"There is no job #{job_id}.")
    parent = await c.scheduler.listings.job(job.parent_id) if job.parent_id else None
    children = await c.scheduler.listings.children_of(job_id)
    return web.json_response(
        {
            "job": job_json(job),
            "parent": job_json(parent) if parent else None,
            "children": [job_json(ch) for ch in children],
        }
    )


async def job_events(request: web.Request) -> web.StreamResponse:
    c = console_of(request)
    return await stream_job(request, c.scheduler, c.hub, job_id_of(request), poll_seconds=c.poll_seconds)


async def retry_job(request: web.Request) -> web.Response:
    c = console_of(request)
    body = await json_body(request)
    try:
        result = await c.scheduler.jobs.remix(
            job_id_of(request), c.operator, c.target, _idempotency_key(body.get("client_key")), new_seed=True
        )
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response({"job": job_json(result.job), "duplicate": result.duplicate}, status=201)


async def extend_job(request: web.Request) -> web.Response:
    """Continue a job's video from its last frame (body: optional "prompt", "client_key")."""
    c = console_of(request)
    body = await json_body(request)
    prompt = str(body.get("prompt") or "").strip() or None
    try:
        result = await c.scheduler.jobs.extend(
            job_id_of(request), c.operator, c.target, _idempotency_key(body.get("client_key")), prompt=prompt
        )
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response({"job": job_json(result.job), "duplicate": result.duplicate}, status=201)


async def remix_job(request: web.Request) -> web.Response:
    c = console_of(request)
    body = await json_body(request)
    raw_options = body.get("options") or {}
    if not isinstance(raw_options, dict):
        return json_error(400, "invalid", "options must be an object.")
    try:
        overrides = parse_remix(str(body.get("prompt") or ""), coerce_options(raw_options))
        result = await c.scheduler.jobs.remix(
            job_id_of(request), c.operator, c.target, _idempotency_key(body.get("client_key")), overrides=overrides
        )
    except RequestError as exc:
        return c.refusal_response(Refusal("invalid", exc.message))
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response({"job": job_json(result.job), "duplicate": result.duplicate}, status=201)


async def cancel_job(request: web.Request) -> web.Response:
    c = console_of(request)
    try:
        job = await c.scheduler.admin.cancel(job_id_of(request), c.operator)
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response({"job": job_json(job)})


async def delete_job(request: web.Request) -> web.Response:
    c = console_of(request)
    try:
        await c.scheduler.admin.delete(job_id_of(request), c.operator)
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response({"deleted": True})


async def my_queue(request: web.Request) -> web.Response:
    c = console_of(request)
    jobs, quota, total = await c.scheduler.views.queue_info(c.operator)
    return web.json_response({"jobs": [job_json(j) for j in jobs], "quota": quota_json(quota), "total": total})


def resolve_media(settings: Settings, stored: str, root_setting: str) -> Path | None:
    """The file a stored path names, only if it lies inside the configured folder (defence in depth:
    paths are server-generated, but a file outside the folder is never served)."""
    root = settings.path(root_setting).resolve()
    candidate = Path(stored)
    options = [candidate] if candidate.is_absolute() else [settings.path(stored), root / candidate]
    for path in options:
        resolved = path.resolve()
        if resolved.is_relative_to(root) and resolved.is_file():
            return resolved
    return None


async def _serve_job_file(request: web.Request, *, video: bool) -> web.StreamResponse:
    """A job's output video or input image, found by job id only (never a user-supplied path)."""
    c = console_of(request)
    job_id = job_id_of(request)
    output, stored = await c.scheduler.listings.media_paths(job_id)
    name, folder = (output, c.settings.app.outputs_dir) if video else (stored, c.settings.app.inputs_dir)
    return await serve_stored(request, name, folder, job_id=job_id, video=video)


async def serve_stored(
    request: web.Request, name: str | None, folder: str, *, job_id: int, video: bool
) -> web.StreamResponse:
    """A stored file (a path under ``folder`` or an object-store reference) as the response; 404 when absent."""
    c = console_of(request)
    if name and is_remote(name):  # in the object store: served from a local copy
        try:
            path = await asyncio.to_thread(local_copy, c.settings, name)
        except Exception as exc:
            log.warning("cannot fetch %s from the object store: %s", name, exc)
            raise web.HTTPServiceUnavailable(text="The file store cannot be reached right now.") from None
    else:
        path = resolve_media(c.settings, name, folder) if name else None
    if path is None:
        raise web.HTTPNotFound(text="No video for this job." if video else "No input image for this job.")
    # FileResponse answers Range requests, which <video> needs to seek and to read the duration.
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "video/mp4" if video else "image/png",
            "Content-Disposition": f'inline; filename="turbobot-job-{job_id}{".mp4" if video else "-input.png"}"',
            "Cache-Control": "private, max-age=3600",
        },
    )


async def job_video(request: web.Request) -> web.StreamResponse:
    return await _serve_job_file(request, video=True)


async def job_input(request: web.Request) -> web.StreamResponse:
    return await _serve_job_file(request, video=False)


async def job_preview(request: web.Request) -> web.Response:
    """A running job's latest live preview (an animated GIF), found by job id only; 404 when it has none."""
    c = console_of(request)
    job = await c.scheduler.views.get(job_id_of(request))
    data = await read_preview(c.settings, job.preview) if job is not None and job.state == "running" else None
    if data is None:
        raise web.HTTPNotFound(text="No preview for this job right now.")
    return web.Response(body=data, headers={"Content-Type": "image/gif", "Cache-Control": "private, max-age=60"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/options", get_options)
    r.add_get("/api/queue", my_queue)
    r.add_post("/api/jobs", submit_job)
    r.add_get("/api/jobs", list_jobs)
    r.add_get(r"/api/jobs/{job_id:\d+}", get_job)
    r.add_get(r"/api/jobs/{job_id:\d+}/events", job_events)
    r.add_post(r"/api/jobs/{job_id:\d+}/retry", retry_job)
    r.add_post(r"/api/jobs/{job_id:\d+}/remix", remix_job)
    r.add_post(r"/api/jobs/{job_id:\d+}/extend", extend_job)
    r.add_post(r"/api/jobs/{job_id:\d+}/cancel", cancel_job)
    r.add_post(r"/api/jobs/{job_id:\d+}/delete", delete_job)
    r.add_get(r"/media/jobs/{job_id:\d+}/video.mp4", job_video)
    r.add_get(r"/media/jobs/{job_id:\d+}/input.png", job_input)
    r.add_get(r"/media/jobs/{job_id:\d+}/preview.gif", job_preview)
