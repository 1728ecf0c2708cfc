"""Alembic migrations run in-process: upgrade to head (app start, `turbobot db upgrade`) and the drift check.

The script location is resolved from the installed ``migrations`` package, never from the CWD or an ini
file, so this works from a wheel install as well as from a checkout. ``migrations/env.py`` takes its
engine and its autogenerate options from here, so `alembic check` from the command line and
:func:`check_migrations` compare the same way.

SQLite migration connections differ from the app's (storage/db.py) on purpose:
- foreign_keys stays OFF: batch migrations rebuild tables (copy, DROP, rename), and with foreign keys on,
  dropping a parent table would run its ON DELETE CASCADE actions and silently empty the child tables.
  Violations are checked with ``PRAGMA foreign_key_check`` before the migration commits instead.
- the driver runs in autocommit mode and we emit BEGIN IMMEDIATE, so the whole upgrade (DDL included) is
  one transaction that takes the write lock up front: a failed migration leaves nothing half-done, and two
  processes upgrading at once run one after the other.

Usage from a shell (CI drift check on a throwaway SQLite file): ``python -m storage.migrate check``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.autogenerate.api import AutogenContext
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, event, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.types import TypeDecorator

from storage.db import is_sqlite, sqlite_file

T = TypeVar("T")

# Alembic keeps per-command state in module globals (alembic.context / alembic.op): one command at a time.
_COMMAND_LOCK = threading.Lock()

# A migration waits this long for the SQLite write lock held by a running app before giving up.
MIGRATION_BUSY_TIMEOUT_S = 30.0
# PostgreSQL: concurrent upgrades (several workers starting together) queue on this advisory lock.
PG_MIGRATION_LOCK_ID = 0x7475726230  # "turb0"


class MigrationsNotApplied(RuntimeError):
    """The database is not at the head revision, so comparing it with the models would be meaningless."""


def migrations_dir() -> Path:
    """The folder of the ``migrations`` package (env.py, script.py.mako, versions/)."""
    import migrations

    # __path__ rather than __file__: an editable install made before migrations/ had an __init__.py maps
    # it as a namespace package (no __file__).
    for entry in migrations.__path__:
        if (Path(entry) / "env.py").is_file():
            return Path(entry).resolve()
    raise RuntimeError(f"no env.py in the migrations package at {list(migrations.__path__)}")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config for in-process commands; ``url`` overrides every other source of the URL."""
    cfg = Config()
    # ConfigParser interpolates '%', so escape it in the path (URLs travel in attributes, untouched).
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


def head_revisions() -> tuple[str, ...]:
    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def target_metadata() -> MetaData:
    from storage.models import Base

    return Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    # Migrations must not import storage.models (it changes over time): write a TypeDecorator such as
    # UTCDateTime as its plain SQLAlchemy implementation type, e.g. sa.DateTime(timezone=True).
    if type_ == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl!r}"
    return False


def context_options(url: str, metadata: MetaData | None = None) -> dict[str, Any]:
    """MigrationContext options shared by env.py (upgrade, autogenerate, `alembic check`) and the check."""
    return {
        "target_metadata": metadata if metadata is not None else target_metadata(),
        "compare_type": True,
        # SQLite cannot ALTER most things: emit batch (copy-and-move) operations there; elsewhere the
        # same batch blocks run as plain ALTER statements.
        "render_as_batch": is_sqlite(url),
        "render_item": _render_item,
        # Alembic assumes SQLite DDL is not transactional, but it is once we issue BEGIN ourselves: run the
        # whole upgrade as one transaction there too (PostgreSQL already does).
        "transactional_ddl": True,
    }


def migration_engine(url: str, *, write: bool = True) -> AsyncEngine:
    """An engine for running migrations (no pool: one connection, closed afterwards).

    ``write=False`` (inspection only) starts SQLite transactions deferred, so it never waits for a writer.
    """
    if not is_sqlite(url):
        return create_async_engine(url, poolclass=pool.NullPool)
    db_file = sqlite_file(url)
    if write and db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(
        url, poolclass=pool.NullPool, connect_args={"timeout": MIGRATION_BUSY_TIMEOUT_S}
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (module doc)
        cur = dbapi_conn.cursor()
        # WAL is a property of the file: set it before the app's first connection ever sees it.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=OFF")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def before_migrations(connection: Connection) -> None:
    """Called by env.py inside the migration transaction, before any revision runs."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK_ID})")


def after_migrations(connection: Connection) -> None:
    """Called by env.py inside the migration transaction; raising here rolls the whole upgrade back."""
    if connection.dialect.name == "sqlite":
        bad = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if bad:
            raise RuntimeError(f"migration left foreign key violations (table, rowid, parent, fk): {bad[:10]}")


def _run_coroutine_blocking(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as ex:
        return ex.submit(lambda: asyncio.run(make())).result()


def _upgrade_blocking(url: str, revision: str) -> None:
    with _COMMAND_LOCK:
        command.upgrade(alembic_config(url), revision)


def _downgrade_blocking(url: str, revision: str) -> None:
    with _COMMAND_LOCK:
        command.downgrade(alembic_config(url), revision)


async def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (default: head). Safe to call at every start (no-op when current).

    Alembic's command API is synchronous and env.py runs its own event loop, so the command runs in a worker
    thread: the caller's event loop keeps serving meanwhile. From sync code: ``asyncio.run(upgrade_database(url))``.
    """
    await asyncio.to_thread(_upgrade_blocking, url, revision)


async def downgrade_database(url: str, revision: str) -> None:
    """Revert migrations down to ``revision`` ("base" drops every table). For tests and operators."""
    await asyncio.to_thread(_downgrade_blocking, url, revision)


async def current_revisions(url: str) -> tuple[str, ...]:
    """The revision(s) the database is at; empty for a database never migrated (or a missing SQLite file)."""
    db_file = sqlite_file(url)
    if db_file is not None and not db_file.exists():
        return ()
    engine = migration_engine(url, write=False)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: tuple(MigrationContext.configure(c).get_current_heads()))
    finally:
        await engine.dispose()


def check_migrations(url: str, metadata: MetaData | None = None) -> list[Any]:
    """Like `alembic check`: the autogenerate diff between the models and the migrated database at ``url``.

    Empty means models and migrations agree. Each item is an Alembic diff tuple such as
    ``("add_column", None, "users", Column(...))`` (or a list of them for column modifications).
    ``metadata`` defaults to storage.models' metadata. Raises MigrationsNotApplied when the database is not
    at head (upgrade it first). Blocking; may be called from inside a running event loop.
    """
    md = metadata if metadata is not None else target_metadata()
    heads = set(head_revisions())
    db_file = sqlite_file(url)
    if db_file is not None and not db_file.exists():
        raise MigrationsNotApplied(f"database file {db_file} does not exist; run `turbobot db upgrade` first")

    def compare(conn: Connection) -> list[Any]:
        ctx = MigrationContext.configure(conn, opts=context_options(url, md))
        current = set(ctx.get_current_heads())
        if current != heads:
            raise MigrationsNotApplied(
                f"database is at {sorted(current) or 'no revision'}, migrations head is {sorted(heads)}; "
                "run `turbobot db upgrade` first"
            )
        return list(compare_metadata(ctx, md))

    async def run() -> list[Any]:
        engine = migration_engine(url, write=False)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(compare)
        finally:
            await engine.dispose()

    return _run_coroutine_blocking(run)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage.migrate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    chk = sub.add_parser("check", help="migrate a database and fail when the models differ from migrations")
    chk.add_argument("url", nargs="?", help="database URL (default: a throwaway SQLite file)")
    up = sub.add_parser("upgrade", help="apply migrations up to head")
    up.add_argument("url")
    args = parser.parse_args(argv)

    if args.cmd == "upgrade":
        asyncio.run(upgrade_database(args.url))
        print(f"database at {', '.join(asyncio.run(current_revisions(args.url)))}")
        return 0
    with tempfile.TemporaryDirectory(prefix="turbobot-migcheck-") as tmp:
        url = args.url or f"sqlite+aiosqlite:///{Path(tmp) / 'check.db'}"
        asyncio.run(upgrade_database(url))
        diffs = check_migrations(url)
    if diffs:
        print("Models and migrations differ (regenerate or add a revision, see migrations/README.md):")
        for diff in diffs:
            print(f"  {diff}")
        return 1
    print(f"Migrations match the models (head {', '.join(head_revisions())}).")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
