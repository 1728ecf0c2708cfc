"""Database access: an async engine configured as docs/scheduler.md describes, with read and write transactions.

SQLite (aiosqlite): WAL, busy_timeout, foreign keys, synchronous NORMAL/FULL; the DB-API connection runs in
autocommit mode (isolation_level None) and we emit BEGIN / BEGIN IMMEDIATE ourselves, because a deferred
read-then-write upgrade fails at once with "database is locked" whatever the busy timeout.
PostgreSQL: plain transactions; claims use FOR UPDATE SKIP LOCKED (see the repositories).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, Executable, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from storage import models
from turbobot.config import Settings

# Pass as ``now=`` to a write helper that resolves it with ``db_now`` inside its transaction (the worker's).
DB_NOW: Any = object()


async def rows_affected(session: AsyncSession, stmt: Executable) -> int:
    """Run an UPDATE/DELETE and return how many rows it changed (0 when the driver cannot tell)."""
    result: CursorResult[Any] = await session.execute(stmt)  # type: ignore[assignment]  # DML gives a cursor result
    return result.rowcount or 0


async def db_now(session: AsyncSession) -> dt.datetime:
    """"Now" by the database's clock, as an aware UTC datetime, so that hosts with skewed clocks agree on
    lease expiry, worker freshness and the quota day. On PostgreSQL the time the transaction began (call
    it first thing in a write transaction); on SQLite the database lives on this host, so its clock is ours
    and no query is needed."""
    if session.get_bind().dialect.name == "sqlite":
        return models.utcnow()
    value = (await session.execute(text("SELECT CURRENT_TIMESTAMP"))).scalar_one()
    assert isinstance(value, dt.datetime) and value.tzinfo is not None  # timestamptz from the driver
    return value.astimezone(dt.UTC)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for memory databases and other backends."""
    if not is_sqlite(url) or ":memory:" in url:
        return None
    path = url.split("///", 1)[1] if "///" in url else ""
    return Path(path.split("?", 1)[0]) if path else None


class Database:
    def __init__(
        self, url: str, *, busy_timeout_ms: int = 5000, synchronous: str = "NORMAL", echo: bool = False
    ) -> None:
        self.url = url
        self.sqlite = is_sqlite(url)
        kwargs: dict[str, Any] = {"echo": echo}
        if self.sqlite:
            db_file = sqlite_file(url)
            if db_file is not None:
                db_file.parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": busy_timeout_ms / 1000.0}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.sqlite:
            self._configure_sqlite(busy_timeout_ms, synchronous)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # Same pool, but connections carry begin_mode so the "begin" hook takes the write lock up front.
        self.write_sessions = async_sessionmaker(
            self.engine.execution_options(begin_mode="BEGIN IMMEDIATE"), expire_on_commit=False
        )
        # No BEGIN at all: every statement is its own transaction (see ``write_each``).
        self.each_sessions = async_sessionmaker(self.engine.execution_options(begin_mode=""), expire_on_commit=False)

    def _configure_sqlite(self, busy_timeout_ms: int, synchronous: str) -> None:
        sync_engine = self.engine.sync_engine

        @event.listens_for(sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Autocommit at the driver level: we issue BEGIN ourselves (see module doc).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
            cur.close()

        @event.listens_for(sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            mode = conn.get_execution_options().get("begin_mode", "BEGIN")
            if mode:
                conn.exec_driver_sql(mode)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A transaction that may write: BEGIN IMMEDIATE on SQLite, so it takes the write lock up front.

        Keep it short: never await network or GPU work inside it.
        """
        async with self.write_sessions() as session, session.begin():
            yield session

    @contextlib.asynccontextmanager
    async def write_each(self) -> AsyncIterator[AsyncSession]:
        """Writes where each statement commits on its own (no atomicity across statements).

        On SQLite the write lock is then taken and released inside one C call of the driver. In a
        transaction it is held across every hop between the driver's thread and the event loop, and in a
        process where another thread holds the interpreter lock for long stretches (a GPU worker's render
        thread importing torch, collecting garbage, loading weights) each hop can wait seconds: every
        other writer on the database hits its busy timeout meanwhile. For single-statement updates
        (heartbeats, progress); PostgreSQL (row locks only) gets an ordinary transaction. Avoid RETURNING
        here: its rows are fetched in a second hop while the statement still holds the lock.
        """
        maker = self.each_sessions if self.sqlite else self.write_sessions
        async with maker() as session, session.begin():
            yield session

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only transaction (deferred BEGIN; in WAL mode readers never block the writer)."""
        async with self.sessions() as session, session.begin():
            yield session

    async def integrity_ok(self) -> bool:
        if not self.sqlite:
            return True
        async with self.engine.connect() as conn:
            result = await conn.exec_driver_sql("PRAGMA integrity_check")
            return result.scalar() == "ok"

    async def dispose(self) -> None:
        await self.engine.dispose()


def open_database(settings: Settings) -> Database:
    """The service's database as configured (``[database]``); the caller disposes of it."""
    return Database(
        settings.database_url,
        busy_timeout_ms=settings.database.busy_timeout_ms,
        synchronous=settings.database.synchronous,
        echo=settings.database.echo,
    )
