"""storage.db on a migrated temp-file SQLite: PRAGMAs, BEGIN IMMEDIATE under concurrency, foreign keys,
integrity check."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from generator.request import GenerationRequest
from storage.db import Database
from storage.migrate import upgrade_database
from storage.models import AuditLog, InputImage, Job, Output, QuotaUsage, User, WorkerState

BUSY_TIMEOUT_MS = 4321  # an unusual value, so the PRAGMA test sees ours and not a default


@pytest.fixture
async def db_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    await upgrade_database(url)
    return url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url, busy_timeout_ms=BUSY_TIMEOUT_MS)
    try:
        yield database
    finally:
        await database.dispose()


def job_row(user_id: int, key: str, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "idempotency_key": key, "user_id": user_id, "platform": "discord", "mode": "t2v",
        "prompt": "a red fox running through snow",
        "request": GenerationRequest("t2v", "a red fox running through snow", model="tiny-t2v", seed=42, sampler="ode"),
    }
    row.update(extra)
    return row


async def test_pragmas_in_effect(db: Database, db_url: str) -> None:
    async with db.read() as s:
        assert (await s.execute(select(func.count()).select_from(User))).scalar() == 0
        conn = await s.connection()
        pragma = {
            name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
            for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
        }
    assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": BUSY_TIMEOUT_MS, "synchronous": 1}

    full = Database(db_url, synchronous="FULL")
    try:
        async with full.read() as s:
            assert (await (await s.connection()).exec_driver_sql("PRAGMA synchronous")).scalar() == 2
    finally:
        await full.dispose()


async def _add_worker(db: Database) -> None:
    async with db.write() as s:
        s.add(WorkerState(id="w", restarts=0))


async def test_deferred_read_then_write_fails_at_once(db: Database) -> None:
    """Why writers need BEGIN IMMEDIATE: two deferred transactions that read and then write fail at once
    with "database is locked", without waiting for the busy timeout."""
    await _add_worker(db)
    async with db.read() as a:
        await a.scalar(select(WorkerState.restarts))
        with pytest.raises(OperationalError, match="database is locked"):
            async with db.read() as b:
                await b.scalar(select(WorkerState.restarts))
                await a.execute(update(WorkerState).values(restarts=WorkerState.restarts + 1))
                t0 = time.monotonic()
                try:
                    await b.execute(update(WorkerState).values(restarts=WorkerState.restarts + 1))
                finally:
                    elapsed = time.monotonic() - t0
    assert elapsed < BUSY_TIMEOUT_MS / 1000 / 2


async def test_begin_immediate_serialises_50_read_then_write_transactions(db: Database) -> None:
    await _add_worker(db)
    seen: list[int] = []

    async def bump() -> None:
        async with db.write() as s:
            value = await s.scalar(select(WorkerState.restarts).where(WorkerState.id == "w"))
            assert value is not None
            seen.append(value)
            await asyncio.sleep(0)  # let the other tasks run while this transaction holds the lock
            await s.execute(update(WorkerState).where(WorkerState.id == "w").values(restarts=value + 1))

    results = await asyncio.gather(*(bump() for _ in range(50)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    async with db.read() as s:
        assert await s.scalar(select(WorkerState.restarts)) == 50
    assert sorted(seen) == list(range(50))  # every transaction saw the previous one's write: no lost update


async def test_foreign_key_cascades_and_set_null(db: Database) -> None:
    async with db.write() as s:
        alice = User(platform="discord", platform_user_id="1", display_name="alice")
        bob = User(platform="telegram", platform_user_id="1", display_name="bob")
        s.add_all([alice, bob])
        await s.flush()
        image = InputImage(sha256="ab" * 32, path="in/ab.png", bytes=10, width=8, height=8, user_id=alice.id)
        s.add(image)
        await s.flush()
        parent = Job(**job_row(alice.id, "discord:1", input_id=image.id))
        s.add(parent)
        await s.flush()
        bobs_remix = Job(**job_row(bob.id, "telegram:2", parent_id=parent.id))
        s.add(bobs_remix)
        await s.flush()
        s.add(Output(job_id=parent.id, path="out/1.mp4", sha256="cd" * 32, bytes=100, duration_s=5.0,
                     width=832, height=480, frames=81))
        s.add(QuotaUsage(user_id=alice.id, day="2025-01-01", jobs=1, gpu_seconds=3.5))
        s.add(AuditLog(user_id=alice.id, job_id=parent.id, action="enqueue"))
        alice_id, bob_id, remix_id, image_id = alice.id, bob.id, bobs_remix.id, image.id

    async with db.write() as s:  # a Core delete: the database itself must do the cascading
        await s.execute(delete(User).where(User.id == alice_id))

    async with db.read() as s:
        assert await s.scalar(select(func.count()).select_from(Job).where(Job.user_id == alice_id)) == 0
        assert await s.scalar(select(func.count()).select_from(Output)) == 0
        assert await s.scalar(select(func.count()).select_from(QuotaUsage)) == 0
        remix = await s.get(Job, remix_id)
        assert remix is not None and remix.user_id == bob_id and remix.parent_id is None
        image_row = await s.get(InputImage, image_id)
        assert image_row is not None and image_row.user_id is None
        log = (await s.scalars(select(AuditLog))).one()
        assert (log.user_id, log.job_id, log.action) == (None, None, "enqueue")


async def test_foreign_keys_and_unique_keys_enforced(db: Database) -> None:
    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        async with db.write() as s:
            await s.execute(insert(Job).values(**job_row(999, "nobody:1")))
    async with db.write() as s:
        user = User(platform="cli", platform_user_id="me")
        s.add(user)
        await s.flush()
        s.add(Job(**job_row(user.id, "cli:1")))
        user_id = user.id
    with pytest.raises(IntegrityError, match="UNIQUE"):
        async with db.write() as s:
            s.add(Job(**job_row(user_id, "cli:1")))  # a retried interaction must not create a second job


async def test_integrity_ok_and_detects_a_broken_index(db: Database, db_url: str, tmp_path: Path) -> None:
    async with db.write() as s:
        s.add(User(platform="cli", platform_user_id="me"))
    assert await db.integrity_ok() is True
    await db.dispose()

    # Corrupt on purpose: make an index's definition disagree with its content (schema edit, no data edit).
    with sqlite3.connect(tmp_path / "app.db") as conn:
        conn.execute("CREATE TABLE scratch (a INTEGER, b INTEGER)")
        conn.executemany("INSERT INTO scratch VALUES (?, ?)", [(i, -i) for i in range(20)])
        conn.execute("CREATE INDEX scratch_a ON scratch (a)")
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("UPDATE sqlite_master SET sql='CREATE INDEX scratch_a ON scratch (b)' WHERE name='scratch_a'")
    broken = Database(db_url)
    try:
        assert await broken.integrity_ok() is False
    finally:
        await broken.dispose()
