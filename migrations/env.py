"""Alembic environment (async): runs revisions on an async engine, for SQLite and PostgreSQL alike.

The database URL comes from, in order: the in-process caller (storage.migrate puts it in
``config.attributes["url"]``), ``alembic -x url=...``, ``sqlalchemy.url`` in alembic.ini, and finally the
turbobot configuration ($TURBOBOT_CONFIG or ./config.toml, else the built-in default).
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from storage.migrate import after_migrations, before_migrations, context_options, migration_engine

config = context.config

# Only the `alembic` command line has an ini file with logging sections; in-process runs keep the app's logging.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        url = config.get_main_option("sqlalchemy.url")
    if not url:
        from turbobot.config import load_settings

        url = load_settings().database_url
    return str(url)


def run_migrations_offline(url: str) -> None:
    """`alembic upgrade head --sql`: print the SQL instead of running it."""
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **context_options(url))
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection, url: str) -> None:
    context.configure(connection=connection, **context_options(url))
    # One transaction for the whole upgrade (SQLite: BEGIN IMMEDIATE, see storage/migrate.py).
    with context.begin_transaction():
        before_migrations(connection)
        context.run_migrations()
        after_migrations(connection)


async def run_async_migrations(url: str) -> None:
    engine = migration_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations, url)
    finally:
        await engine.dispose()


def run_migrations_online(url: str) -> None:
    asyncio.run(run_async_migrations(url))


if context.is_offline_mode():
    run_migrations_offline(database_url())
else:
    run_migrations_online(database_url())
