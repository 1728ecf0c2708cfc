"""The same migrations and storage code on a real PostgreSQL server (asyncpg).

The suite starts a throwaway server itself (initdb + pg_ctl in a temp dir, a free port on 127.0.0.1) when the
binaries exist (Debian: ``apt-get install -y postgresql``, binaries in /usr/lib/postgresql/*/bin); as root it
runs them as the ``postgres`` user (or ``nobody``). ``TURBOBOT_TEST_POSTGRES_URL`` (a superuser URL, e.g. a CI
service) is used instead when set. Otherwise every test here is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, MetaData, String, delete, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from generator.request import GenerationRequest
from storage.db import Database
from storage.migrate import (
    PG_MIGRATION_LOCK_ID,
    check_migrations,
    current_revisions,
    downgrade_database,
    head_revisions,
    migration_engine,
    upgrade_database,
)
from storage.models import Base, Job, Output, User

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install -e '.[postgres]')")

pytestmark = pytest.mark.postgres


def _pg_bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    candidates = [*glob.glob("/usr/lib/postgresql/*/bin"), "/usr/local/pgsql/bin"]
    for d in sorted(candidates, key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts], reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as_prefix() -> tuple[list[str], str | None]:
    """PostgreSQL refuses to run as root: drop to an unprivileged user. Returns (argv prefix, user)."""
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root and `runuser` is missing, so PostgreSQL cannot be started")
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return [runuser, "-u", user, "--"], user
    pytest.skip("running as root and there is no postgres/nobody user to run PostgreSQL as")


@pytest.fixture(scope="module")
def pg_server_url() -> Iterator[str]:
    """A superuser URL (database ``postgres``) of a server that lives for this module."""
    external = os.environ.get("TURBOBOT_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb/pg_ctl); on Debian: apt-get install -y postgresql")
    prefix, user = _run_as_prefix()
    # The unprivileged user must reach the folder: /tmp, not a possibly private $TMPDIR of root.
    base = Path(tempfile.mkdtemp(prefix="turbobot-pg-", dir="/tmp" if user is not None else None))
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data, log = base / "data", base / "server.log"
    port = _free_port()

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120)

    try:
        done = run(str(bin_dir / "initdb"), "-D", str(data), "-U", "turbobot", "-A", "trust", "-E", "UTF8",
                   "--locale=C", "--no-sync")
        assert done.returncode == 0, f"initdb failed: {done.stdout}\n{done.stderr}"
        # A throwaway server: TCP on loopback only, no Unix socket, durability off for speed.
        with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                f"\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        done = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
        log_text = log.read_text(errors="replace") if log.exists() else ""
        assert done.returncode == 0, f"pg_ctl start failed: {done.stdout}\n{done.stderr}\n{log_text}"
        try:
            yield f"postgresql+asyncpg://turbobot@127.0.0.1:{port}/postgres"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _admin(server_url: str, sql: str) -> None:
    u = make_url(server_url)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username, password=u.password,
                                 database=u.database)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def pg_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh, empty database per test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await _admin(pg_server_url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await _admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


LIGHTHOUSE = GenerationRequest("t2v", "a lighthouse in a storm", model="tiny-t2v", resolution="720p",
                               aspect="9:16", steps=2, seed=2**40 + 7, sigma_max=120.5)


def job_row(user_id: int, key: str, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "idempotency_key": key, "user_id": user_id, "platform": "telegram", "mode": "t2v",
        "prompt": "a lighthouse in a storm", "request": LIGHTHOUSE,
    }
    row.update(extra)
    return row


async def test_pg_migrations_upgrade_check_and_downgrade(pg_url: str) -> None:
    await upgrade_database(pg_url)
    assert await current_revisions(pg_url) == head_revisions()
    await upgrade_database(pg_url)  # idempotent

    engine = migration_engine(pg_url, write=False)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    assert tables == set(Base.metadata.tables) | {"alembic_version"}

    assert check_migrations(pg_url) == []  # the drift check holds on PostgreSQL too (types differ there)
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["outputs"].append_column(Column("codec", String(16), nullable=True))
    assert [(d[0], d[2], d[3].name) for d in check_migrations(pg_url, drifted)] == [
        ("add_column", "outputs", "codec")
    ]
    await downgrade_database(pg_url, "base")
    assert await current_revisions(pg_url) == ()
    await upgrade_database(pg_url)
    assert check_migrations(pg_url) == []


async def test_pg_concurrent_upgrades_queue_on_the_advisory_lock(pg_url: str) -> None:
    """Workers starting together on one PostgreSQL: an upgrade waits while another one holds the lock."""
    u = make_url(pg_url)
    holder = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", PG_MIGRATION_LOCK_ID)
        task = asyncio.create_task(upgrade_database(pg_url))
        done, _ = await asyncio.wait({task}, timeout=0.5)
        assert not done, "the upgrade ran while another migrator held the lock"
        assert await current_revisions(pg_url) == ()
        await holder.execute("SELECT pg_advisory_unlock($1)", PG_MIGRATION_LOCK_ID)
        await task
    finally:
        await holder.close()
    assert await current_revisions(pg_url) == head_revisions()


async def test_pg_orm_round_trips(pg_url: str) -> None:
    await upgrade_database(pg_url)
    db = Database(pg_url)
    try:
        async with db.write() as s:
            alice = User(platform="telegram", platform_user_id="123", display_name="alice")
            s.add(alice)
            await s.flush()
            parent = Job(**job_row(alice.id, "telegram:cb:1"))
            s.add(parent)
            await s.flush()
            remix = Job(**job_row(alice.id, "telegram:cb:2", parent_id=parent.id))
            s.add(remix)
            await s.flush()
            s.add(Output(job_id=parent.id, path="out/1.mp4", sha256="ef" * 32, bytes=5_000_000_000,
                         duration_s=5.06, width=720, height=1280, frames=81))
            alice_id, parent_id, remix_id = alice.id, parent.id, remix.id

        async with db.read() as s:
            job = await s.get(Job, parent_id)
            assert job is not None
            assert job.request == LIGHTHOUSE  # the typed JSON column reads back the request it was given
            assert job.request.seed == 2**40 + 7 and job.delivery == {}
            assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == dt.timedelta(0)
            out = (await s.scalars(select(Output).where(Output.job_id == parent_id))).one()
            assert out.bytes == 5_000_000_000

        lease = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
        async with db.write() as s:
            job = await s.get(Job, remix_id)
            assert job is not None
            job.lease_until = lease
        async with db.read() as s:
            job = await s.get(Job, remix_id)
            assert job is not None and job.lease_until == lease  # same instant, aware

        with pytest.raises(IntegrityError):
            async with db.write() as s:
                s.add(Job(**job_row(alice_id, "telegram:cb:1")))  # duplicate idempotency key
        with pytest.raises(IntegrityError):
            async with db.write() as s:
                s.add(Job(**job_row(424242, "telegram:cb:9")))  # no such user

        async with db.write() as s:
            await s.execute(delete(Job).where(Job.id == parent_id))
        async with db.read() as s:
            remix_row = await s.get(Job, remix_id)
            assert remix_row is not None and remix_row.parent_id is None  # ON DELETE SET NULL
            assert await s.scalar(select(func.count()).select_from(Output)) == 0  # ON DELETE CASCADE
        async with db.write() as s:
            await s.execute(delete(User).where(User.id == alice_id))
        async with db.read() as s:
            assert await s.scalar(select(func.count()).select_from(Job)) == 0
        assert await db.integrity_ok()
    finally:
        await db.dispose()


async def test_pg_0003_moves_a_partial_request_into_the_json_column(pg_url: str) -> None:
    """The data step of 0003 on PostgreSQL: a 0002 row whose JSON lacks keys is filled from its copies."""
    await upgrade_database(pg_url, "0002")
    u = make_url(pg_url)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
    try:
        await conn.execute("INSERT INTO users (id, platform, platform_user_id, display_name, role, blocked, "
                           "blocked_reason, created_at) VALUES (1, 'telegram', '5', 'a', 'user', false, '', now())")
        await conn.execute(
            "INSERT INTO jobs (id, idempotency_key, user_id, platform, chat_id, guild_id, status_message_id, "
            "reply_to_message_id, delivery, mode, prompt, model, resolution, aspect, frames, steps, seed, sla_topk, "
            "sigma_max, sampler, adaptive_resolution, boundary, attention, request, state, priority, attempts, "
            "worker_id, cancel_requested, progress_step, progress_total, created_at, gpu_seconds, timings, "
            "error_code, error_message) VALUES (1, 'k1', 1, 'telegram', '', '', '', '', '{}', 't2v', "
            "'a lighthouse in a storm', 'tiny-t2v', '720p', '9:16', 81, 2, $1, 0.1, 120.5, 'sde', false, 0.9, "
            "'auto', '{\"mode\": \"t2v\", \"prompt\": \"a lighthouse in a storm\"}', 'queued', 0, 0, '', false, "
            "0, 0, now(), 0, '{}', '', '')",
            2**40 + 7,
        )
    finally:
        await conn.close()
    await upgrade_database(pg_url)
    assert check_migrations(pg_url) == []
    db = Database(pg_url)
    try:
        async with db.read() as s:
            job = await s.get(Job, 1)
            assert job is not None and job.request == LIGHTHOUSE
    finally:
        await db.dispose()
