"""The service's health: the one freshness rule for workers and the one readiness answer.

``fresh_seconds`` is the rule everything uses (the scheduler releasing jobs of gone workers, the supervisor's
watchdog, the worker's own row heartbeat, /readyz, the admin page, the metrics): a worker is fresh while its
last heartbeat is at most ``max(watchdog_seconds, 3 x heartbeat_seconds)`` old. ``readiness`` is the one
readiness check (``/readyz``, ``turbobot ready`` and the tests call it).

May touch: the database through ``storage`` repositories, the outputs and inputs folders (read-only checks).
See docs/scheduler.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

from generator.scheduler.disk import storage_problem
from storage import repo_workers
from storage.db import Database, db_now
from turbobot.config import SchedulerSettings, Settings

DB_CHECK_TIMEOUT_S = 3.0

# A worker serves jobs only in these states ("starting" is still loading its model, "warming_up" compiling it).
LIVE_STATES = ("idle", "busy")


def fresh_seconds(cfg: SchedulerSettings) -> float:
    """How old a worker's heartbeat may be while it still counts as alive (the watchdog kills one silent longer)."""
    return max(cfg.watchdog_seconds, 3 * cfg.heartbeat_seconds)


def fresh_window(cfg: SchedulerSettings) -> dt.timedelta:
    return dt.timedelta(seconds=fresh_seconds(cfg))


def worker_live(state: str, age_s: float, cfg: SchedulerSettings) -> bool:
    """Serving jobs: a live state and a fresh heartbeat."""
    return state in LIVE_STATES and age_s <= fresh_seconds(cfg)


@dataclass(frozen=True)
class Readiness:
    ready: bool
    worker_ok: bool
    database_ok: bool
    detail: dict[str, Any]  # the /readyz body
    storage_ok: bool = True


def _not_live_reason(rows: list[Any], ages: dict[str, float], cfg: SchedulerSettings) -> str:
    if not rows:
        return "no worker has started"
    fresh = [w for w in rows if ages[w.id] <= fresh_seconds(cfg)]
    if any(w.state == "warming_up" for w in fresh):
        return "warming up: the GPU worker is compiling the model for the configured shapes"
    if any(w.state == "starting" for w in fresh):
        return "starting: the GPU worker is loading the model"
    return "no worker is serving with a recent heartbeat"


async def database_writable(db: Database) -> tuple[bool, str]:
    """Take the write lock and rewrite one value unchanged, so a read-only or locked database fails."""

    async def probe() -> None:
        async with db.write() as session:
            await repo_workers.rewrite_one_unchanged(session)

    # Not wait_for: cancelling a transaction stuck in the driver waits for the busy timeout anyway.
    # Answer after our own limit and let the probe finish in the background.
    task = asyncio.ensure_future(probe())
    done, _ = await asyncio.wait({task}, timeout=DB_CHECK_TIMEOUT_S)
    if not done:
        _PENDING.add(task)
        task.add_done_callback(_forget)
        return False, "timed out waiting for the write lock"
    exc = task.exception()
    if exc is not None:  # any driver error means "not ready"; the text helps the operator
        return False, f"{type(exc).__name__}: {exc}"[:300]
    return True, "ok"


_PENDING: set[asyncio.Future[None]] = set()


def _forget(task: asyncio.Future[None]) -> None:
    _PENDING.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so it is not reported as never retrieved


async def storage_status(settings: Settings) -> dict[str, Any]:
    """{"ok", "reason"}: can new videos and inputs be stored (folders writable, app.min_free_bytes free)?"""
    if settings.store.backend != "local":  # the shared object store (generator.scheduler.filestore)
        from generator.scheduler.filestore import store_for

        problem = await asyncio.to_thread(store_for(settings).problem)
        return {"ok": not problem, "reason": problem}
    folders = (settings.path(settings.app.outputs_dir), settings.path(settings.app.inputs_dir))
    problem = await asyncio.to_thread(storage_problem, folders, settings.app.min_free_bytes)
    return {"ok": not problem, "reason": problem}


async def readiness(settings: Settings, db: Database) -> Readiness:
    """Ready = the database takes a write, some worker is live (fresh and serving) and storage is usable;
    when no worker is live, ``detail["worker"]["reason"]`` says why (starting, warming up, none)."""
    cfg = settings.scheduler
    try:
        async with db.read() as session:
            now = await db_now(session)  # heartbeats are stamped by the database's clock (hosts may be skewed)
            rows = await repo_workers.list_workers(session)
    except Exception as exc:
        worker_detail: dict[str, Any] = {"ok": False, "reason": f"cannot read workers: {type(exc).__name__}"}
    else:
        ages = {w.id: (now - w.heartbeat_at).total_seconds() for w in rows}
        # With a shared object store, a worker that cannot reach it takes no jobs: not live (on one machine
        # the storage check below already says so, and the worker itself is fine).
        remote = settings.store.backend != "local"
        live = [w for w in rows if worker_live(w.state, ages[w.id], cfg)
                and not (remote and (w.info or {}).get("storage_error"))]
        worker_detail = {
            "ok": bool(live),
            "fresh_within_s": fresh_seconds(cfg),
            "workers": {
                w.id: {"state": w.state, "heartbeat_age_s": round(ages[w.id], 1),
                       **({"storage_error": w.info["storage_error"]} if (w.info or {}).get("storage_error") else {})}
                for w in rows
            },
            "reason": "" if live else _not_live_reason(list(rows), ages, cfg),
        }
    db_ok, db_reason = await database_writable(db)
    storage = await storage_status(settings)
    ready = bool(worker_detail["ok"]) and db_ok and storage["ok"]
    return Readiness(
        ready=ready,
        worker_ok=bool(worker_detail["ok"]),
        database_ok=db_ok,
        storage_ok=storage["ok"],
        detail={
            "ready": ready, "worker": worker_detail, "database": {"ok": db_ok, "reason": db_reason},
            "storage": storage,
        },
    )
