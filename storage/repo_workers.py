"""GPU worker rows: liveness for /readyz and the supervisor, engine info and step-time averages for ETAs.
Every function takes the caller's session; nothing else is touched."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import WorkerState


async def register_worker(
    session: AsyncSession,
    worker_id: str,
    *,
    pid: int,
    device: str,
    info: dict[str, Any],
    now: dt.datetime,
    restarts: int = 0,
) -> WorkerState:
    """Record a worker process that just started.

    ``restarts`` is how many times its supervisor has restarted this slot since the service started (0 on a
    fresh start): an existing row only means an earlier run used the same worker id, not a restart.
    """
    row = await session.get(WorkerState, worker_id)
    if row is None:
        row = WorkerState(id=worker_id)
        session.add(row)
    else:
        # Keep learned step times across restarts; replace the rest.
        info = {**{k: v for k, v in (row.info or {}).items() if k == "ema"}, **info}
    row.restarts = restarts
    row.pid = pid
    row.device = device
    row.state = "starting"
    row.heartbeat_at = now
    row.info = info
    await session.flush()
    return row


async def update_worker(
    session: AsyncSession,
    worker_id: str,
    *,
    now: dt.datetime,
    state: str | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    values: dict[str, Any] = {"heartbeat_at": now}
    if state is not None:
        values["state"] = state
    if info is not None:
        values["info"] = info
    await session.execute(update(WorkerState).where(WorkerState.id == worker_id).values(**values))


async def mark_stopped(session: AsyncSession, worker_id: str) -> None:
    """The worker's process has exited: its row says so (its last heartbeat stays as it was)."""
    await session.execute(update(WorkerState).where(WorkerState.id == worker_id).values(state="stopped"))


async def list_workers(session: AsyncSession) -> list[WorkerState]:
    return list((await session.execute(select(WorkerState).order_by(WorkerState.id))).scalars())


async def get_worker(session: AsyncSession, worker_id: str) -> WorkerState | None:
    return await session.get(WorkerState, worker_id)


async def rewrite_one_unchanged(session: AsyncSession) -> None:
    """Rewrite one worker row's value unchanged: inside a write transaction, this fails on a read-only or
    locked database (the readiness probe)."""
    wid = (await session.execute(select(WorkerState.id).limit(1))).scalar()
    if wid is not None:
        await session.execute(update(WorkerState).where(WorkerState.id == wid).values(pid=WorkerState.pid))
