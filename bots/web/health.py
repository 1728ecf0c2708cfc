"""Liveness and readiness: /healthz answers while the process serves; /readyz only when a worker has
heartbeated recently, the database accepts a write transaction and the outputs and inputs folders take new
files with enough free disk space."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from bots.web import queries
from generator.scheduler.disk import storage_problem
from storage.db import Database
from storage.models import WorkerState
from turbobot.config import Settings

DB_CHECK_TIMEOUT_S = 3.0


# A worker serves jobs only in these states ("starting" is still loading its model, "warming_up" compiling it).
LIVE_STATES = ("idle", "busy")


def worker_fresh_seconds(settings: Settings) -> float:
    """How old a heartbeat may be: the scheduler's own rule (its watchdog restarts a worker silent longer)."""
    return max(settings.scheduler.watchdog_seconds, 3 * settings.scheduler.heartbeat_seconds)


def worker_live(state: str, age_s: float, settings: Settings) -> bool:
    return state in LIVE_STATES and age_s <= worker_fresh_seconds(settings)


def _not_live_reason(rows: list[Any], ages: dict[str, float], settings: Settings) -> str:
    if not rows:
        return "no worker has started"
    fresh = [w for w in rows if ages[w.id] <= worker_fresh_seconds(settings)]
    if any(w.state == "warming_up" for w in fresh):
        return "warming up: the GPU worker is compiling the model for the configured shapes"
    if any(w.state == "starting" for w in fresh):
        return "starting: the GPU worker is loading the model"
    return "no worker is serving with a recent heartbeat"


@dataclass(frozen=True)
class Readiness:
    ready: bool
    worker_ok: bool
    database_ok: bool
    detail: dict[str, Any]
    storage_ok: bool = True


async def database_writable(db: Database) -> tuple[bool, str]:
    """Take the write lock and rewrite one value unchanged, so a read-only or locked database fails."""

    async def probe() -> None:
        async with db.write() as session:
            wid = (await session.execute(select(WorkerState.id).limit(1))).scalar()
            if wid is not None:
                await session.execute(
                    update(WorkerState).where(WorkerState.id == wid).values(pid=WorkerState.pid)
                )

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


async def readiness(settings: Settings, db: Database) -> Readiness:
    now = dt.datetime.now(dt.UTC)
    limit = worker_fresh_seconds(settings)
    try:
        rows = await queries.workers(db)
    except Exception as exc:
        rows = []
        worker_detail: dict[str, Any] = {"ok": False, "reason": f"cannot read workers: {type(exc).__name__}"}
    else:
        ages = {w.id: (now - w.heartbeat_at).total_seconds() for w in rows}
        live = [w for w in rows if worker_live(w.state, ages[w.id], settings)]
        worker_detail = {
            "ok": bool(live),
            "fresh_within_s": limit,
            "workers": {w.id: {"state": w.state, "heartbeat_age_s": round(ages[w.id], 1)} for w in rows},
            "reason": "" if live else _not_live_reason(rows, ages, settings),
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


async def storage_status(settings: Settings) -> dict[str, Any]:
    """{"ok", "reason"}: can new videos and inputs be stored (folders writable, app.min_free_bytes free)?"""
    folders = (settings.path(settings.app.outputs_dir), settings.path(settings.app.inputs_dir))
    problem = await asyncio.to_thread(storage_problem, folders, settings.app.min_free_bytes)
    return {"ok": not problem, "reason": problem}
