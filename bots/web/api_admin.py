"""Admin endpoints: the whole queue with cancel, users with quota usage, limits and blocking, engine status.

Actions go through the scheduler in the operator's name (it checks the operator is an owner or moderator);
listings across users come from ``scheduler.listings``. May touch: nothing but the scheduler (no database,
no files of its own).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

from bots.web.api_jobs import job_id_of, json_body, parse_job_id, serve_stored
from bots.web.context import console_of
from bots.web.forms import coerce_number
from bots.web.security import json_error
from bots.web.serialize import iso, job_json
from generator.scheduler.api import JobView, Refusal
from generator.scheduler.health import storage_status, worker_live
from generator.scheduler.reads import WorkerRow
from turbobot.config import Settings

_LIMIT_FIELDS = {"max_queued": int, "daily_jobs": int, "daily_gpu_seconds": float}


async def _with_positions(request: web.Request, jobs: list[JobView]) -> list[JobView]:
    """Queue positions and ETAs are the scheduler's to compute; ask it for each queued job."""
    c = console_of(request)
    out: list[JobView] = []
    for job in jobs:
        fresh = await c.scheduler.views.get(job.id) if job.state == "queued" else None
        out.append(fresh or job)
    return out


_ENGINE_KEYS = ("engine", "device", "gpu", "gpu_memory_gb", "gpu_allocated_gb", "attention", "offload", "models",
                "default_t2v", "default_i2v", "demo", "host", "pid", "error", "ema", "step_times")


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def engine_status(info: dict[str, Any] | None) -> list[str]:
    """A worker's engine info as sentences for the admin page (the raw dict stays in ``info`` for tools)."""
    info = dict(info or {})
    lines: list[str] = []
    if info.get("error"):
        lines.append(f"Could not load the engine: {info['error']}")
    if "engine" in info or "device" in info:
        line = " ".join(p for p in ("Engine", str(info.get("engine", "")), "on", str(info.get("device", "?"))) if p)
        if info.get("gpu"):
            line += f" · {info['gpu']}"
            if info.get("gpu_memory_gb") is not None:
                line += f", {info['gpu_memory_gb']} GB"
                if info.get("gpu_allocated_gb") is not None:
                    line += f" ({info['gpu_allocated_gb']} GB in use)"
        lines.append(line)
    setup = " · ".join(f"{k} {info[k]}" for k in ("attention", "offload") if info.get(k) is not None)
    if setup:
        lines.append(setup[0].upper() + setup[1:])
    for name, model in (info.get("models") or {}).items():
        if not isinstance(model, dict):
            continue
        label = str(model.get("label") or name)
        notes = [str(model["kind"])] if model.get("kind") and model.get("kind") != name else []
        if model.get("demo") and "demo" not in label:
            notes.append("untrained demo model")
        notes.append("loaded" if model.get("loaded") else "not loaded yet")
        defaults = [m for m, key in (("text-to-video", "default_t2v"), ("image-to-video", "default_i2v"))
                    if info.get(key) == name]
        if defaults:
            notes.append("default for " + " and ".join(defaults))
        lines.append(f"Model {label}: {', '.join(notes)}")
    if info.get("demo") and not info.get("models"):
        lines.append("Untrained demo model (random weights)")
    for key, value in info.items():
        if key not in _ENGINE_KEYS:
            lines.append(f"{key}: {_plain(value)}")
    if info.get("host") or info.get("pid"):
        lines.append(f"Process {info.get('pid', '?')} on {info.get('host', '?')}")
    return lines


def _worker_json(w: WorkerRow, now: dt.datetime, settings: Settings) -> dict[str, Any]:
    age = (now - w.heartbeat_at).total_seconds()
    return {
        "id": w.id,
        "pid": w.pid,
        "device": w.device,
        "state": w.state,
        "heartbeat_at": iso(w.heartbeat_at),
        "heartbeat_age_s": round(age, 1),
        "fresh": worker_live(w.state, age, settings.scheduler),
        "restarts": w.restarts,
        "info": w.info,
        "engine": engine_status(w.info),
    }


async def overview(request: web.Request) -> web.Response:
    c = console_of(request)
    now = dt.datetime.now(dt.UTC)
    active = await _with_positions(request, await c.scheduler.listings.active_jobs())
    return web.json_response(
        {
            "workers": [_worker_json(w, now, c.settings) for w in await c.scheduler.listings.workers()],
            "storage": await storage_status(c.settings),
            "queue": [job_json(j) for j in active],
            "counts": await c.scheduler.listings.state_counts(),
            "step_history": [
                {"job_id": job_id, "step_mean": t.get("step_mean"), "total": t.get("total")}
                for job_id, t in await c.scheduler.listings.recent_timings()
            ],
            "global_queue_cap": c.settings.quotas.global_queue_cap,
            "live_streams": c.hub.watcher_count(),
        }
    )


async def users(request: web.Request) -> web.Response:
    c = console_of(request)
    q = c.settings.quotas
    a = c.settings.admin
    rows = await c.scheduler.listings.users(query=request.query.get("q", ""))
    return web.json_response(
        {
            "users": [row.__dict__ for row in rows],
            "defaults": {
                "max_running": q.max_running_per_user,
                "max_queued": q.max_queued_per_user,
                "daily_jobs": q.daily_jobs_per_user,
                "daily_gpu_seconds": q.daily_gpu_seconds_per_user,
            },
            "config_roles": {
                "owners": list(a.owners), "moderators": list(a.moderators), "unlimited": list(a.unlimited),
                "deny": list(a.deny), "allow": list(a.allow),
            },
        }
    )


def _user_key(body: dict[str, Any]) -> str:
    key = str(body.get("user_key") or "").strip()
    platform, sep, uid = key.partition(":")
    if not (sep and platform and uid) or len(key) > 100:
        raise web.HTTPBadRequest(text="user_key must look like platform:id, e.g. telegram:12345.")
    return key


async def set_limits(request: web.Request) -> web.Response:
    c = console_of(request)
    body = await json_body(request)
    key = _user_key(body)
    values: dict[str, Any] = {}
    for name, kind in _LIMIT_FIELDS.items():
        raw = body.get(name)
        if raw is None or raw == "":
            values[name] = None
            continue
        number = coerce_number(raw, kind)
        if number is None or number < 0:
            return json_error(400, "invalid", f"{name} must be a number of at least 0, or empty for the default.")
        values[name] = number
    try:
        await c.scheduler.admin.set_limits(c.operator, key, **values)
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response({"ok": True, "user_key": key, **values})


async def block(request: web.Request) -> web.Response:
    c = console_of(request)
    body = await json_body(request)
    key = _user_key(body)
    reason = str(body.get("reason") or "")[:256]
    try:
        await c.scheduler.admin.block(c.operator, key, reason)
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response({"ok": True, "user_key": key, "blocked": True})


async def unblock(request: web.Request) -> web.Response:
    c = console_of(request)
    body = await json_body(request)
    key = _user_key(body)
    try:
        await c.scheduler.admin.unblock(c.operator, key)
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response({"ok": True, "user_key": key, "blocked": False})


async def moderation(request: web.Request) -> web.Response:
    """The moderation queue: blocked prompts, input images and held videos (with who, where and the prompt) and
    community settings changes."""
    c = console_of(request)
    return web.json_response({"events": await c.scheduler.listings.moderation_events()})


def _held_job(body: dict[str, Any]) -> int:
    job_id = parse_job_id(str(body.get("job", "")))
    if job_id is None:
        raise web.HTTPBadRequest(text="Give the job whose held video this is (job: its number).")
    return job_id


async def release_held(request: web.Request) -> web.Response:
    """Release a video the moderation model held: the scheduler delivers it to the original chat."""
    c = console_of(request)
    job_id = _held_job(await json_body(request))
    try:
        view = await c.scheduler.admin.release_held(job_id, c.operator)
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response({"ok": True, "released": job_id, "job": job_json(view)})


async def delete_held(request: web.Request) -> web.Response:
    c = console_of(request)
    job_id = _held_job(await json_body(request))
    try:
        await c.scheduler.admin.delete_held(job_id, c.operator)
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response({"ok": True, "deleted": job_id})


async def held_video(request: web.Request) -> web.StreamResponse:
    """A held video, for the operator to look at before deciding (the console is the operator's alone)."""
    c = console_of(request)
    job_id = job_id_of(request)
    path = await c.scheduler.listings.held_path(job_id)
    return await serve_stored(request, path, c.settings.app.outputs_dir, job_id=job_id, video=True)


async def communities(request: web.Request) -> web.Response:
    c = console_of(request)
    return web.json_response({"communities": [v.as_json() for v in await c.scheduler.communities.list()]})


async def set_community(request: web.Request) -> web.Response:
    """Operator override of a community's settings (the same checks as /settings in chat)."""
    c = console_of(request)
    body = await json_body(request)
    platform, community = str(body.get("platform") or ""), str(body.get("community") or "")
    changes = body.get("changes")
    if platform not in ("discord", "telegram") or not community or not isinstance(changes, dict):
        return json_error(400, "invalid", "Give platform (discord or telegram), community and changes.")
    try:
        view = await c.scheduler.communities.update(c.operator, platform, community, changes)
    except Refusal as exc:
        return c.refusal_response(exc)
    return web.json_response(view.as_json())


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/admin/overview", overview)
    r.add_get("/api/admin/users", users)
    r.add_post("/api/admin/users/limits", set_limits)
    r.add_post("/api/admin/users/block", block)
    r.add_post("/api/admin/users/unblock", unblock)
    r.add_get("/api/admin/moderation", moderation)
    r.add_post("/api/admin/moderation/release", release_held)
    r.add_post("/api/admin/moderation/delete", delete_held)
    r.add_get(r"/api/admin/moderation/held/{job_id:\d+}/video.mp4", held_video)
    r.add_get("/api/admin/communities", communities)
    r.add_post("/api/admin/communities", set_community)
