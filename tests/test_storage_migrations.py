"""Alembic migrations: upgrade creates the schema, the drift check is empty and does detect drift,
migrations are found from the package (any CWD, and from a built wheel), SQLite upgrades are atomic."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Column, Integer, MetaData, String

from generator.request import GenerationRequest
from storage.migrate import (
    MigrationsNotApplied,
    alembic_config,
    check_migrations,
    current_revisions,
    downgrade_database,
    head_revisions,
    migrations_dir,
    upgrade_database,
)
from storage.models import Base

REPO = Path(__file__).resolve().parents[1]


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def table_names(db_file: Path) -> set[str]:
    with sqlite3.connect(db_file) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    return {r[0] for r in rows}


def index_names(db_file: Path) -> set[str]:
    with sqlite3.connect(db_file) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL").fetchall()
    return {r[0] for r in rows}


def metadata_copy() -> MetaData:
    md = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(md)
    return md


async def test_upgrade_creates_every_table_and_is_idempotent(tmp_path: Path) -> None:
    db_file = tmp_path / "sub" / "app.db"  # parent folder does not exist yet
    url = sqlite_url(db_file)
    assert await current_revisions(url) == ()

    await upgrade_database(url)
    assert table_names(db_file) == set(Base.metadata.tables) | {"alembic_version"}
    assert {"ix_jobs_state_created", "ix_jobs_user_state", "ix_jobs_state_lease"} <= index_names(db_file)
    assert await current_revisions(url) == head_revisions() == ("0006",)

    await upgrade_database(url)  # a second start is a no-op
    assert await current_revisions(url) == head_revisions()
    assert table_names(db_file) == set(Base.metadata.tables) | {"alembic_version"}
    with sqlite3.connect(db_file) as conn:  # the file is WAL from the first migration on
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_models_and_migrations_agree_checked_inside_running_loop(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "app.db")
    await upgrade_database(url)
    assert check_migrations(url) == []  # this is the CI drift check


def test_sync_caller_from_another_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no alembic.ini, no migrations/ here
    url = sqlite_url(tmp_path / "app.db")
    asyncio.run(upgrade_database(url))
    assert check_migrations(url) == []
    assert migrations_dir() == (REPO / "migrations").resolve()


def _add_column(md: MetaData) -> None:
    md.tables["users"].append_column(Column("nickname", String(32), nullable=True))


def _drop_table(md: MetaData) -> None:
    md.remove(md.tables["audit_log"])


def _change_type(md: MetaData) -> None:
    md.tables["jobs"].c.prompt.type = Integer()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_add_column, ("add_column", "users", "nickname")),
        (_drop_table, ("remove_table", "audit_log", None)),
        (_change_type, ("modify_type", "jobs", "prompt")),
    ],
    ids=["added-column", "dropped-table", "changed-type"],
)
async def test_check_detects_drift(tmp_path: Path, mutate: Callable[[MetaData], object], expected: tuple[str, str, str | None]) -> None:
    url = sqlite_url(tmp_path / "app.db")
    await upgrade_database(url)
    md = metadata_copy()
    mutate(md)
    diffs = check_migrations(url, md)
    assert len(diffs) == 1, diffs
    diff = diffs[0]
    op, table, column = expected
    if op == "add_column":
        assert (diff[0], diff[2], diff[3].name) == (op, table, column)
    elif op == "remove_table":
        assert (diff[0], diff[1].name) == (op, table)
    else:  # column modifications come as a list of tuples
        assert (diff[0][0], diff[0][2], diff[0][3]) == (op, table, column)


async def test_check_refuses_a_database_not_at_head(tmp_path: Path) -> None:
    db_file = tmp_path / "app.db"
    url = sqlite_url(db_file)
    with pytest.raises(MigrationsNotApplied, match="does not exist"):
        check_migrations(url)
    assert not db_file.exists()  # checking does not create the database
    sqlite3.connect(db_file).close()  # an empty database file
    with pytest.raises(MigrationsNotApplied, match="no revision"):
        check_migrations(url)


async def test_downgrade_to_base_and_up_again(tmp_path: Path) -> None:
    db_file = tmp_path / "app.db"
    url = sqlite_url(db_file)
    await upgrade_database(url)
    await downgrade_database(url, "base")
    assert table_names(db_file) == {"alembic_version"}
    assert await current_revisions(url) == ()
    await upgrade_database(url)
    assert check_migrations(url) == []


BROKEN_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None

def upgrade():
    op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
    op.add_column("users", sa.Column("half", sa.Integer, nullable=True))
    {failure}

def downgrade():
    pass
"""


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ('raise RuntimeError("boom in the middle of a migration")', "boom"),
        # Migrations run with foreign keys off (table rebuilds); the final foreign_key_check catches this.
        ("op.execute(\"INSERT INTO quota_usage (user_id, day, jobs, gpu_seconds) VALUES (999, 'x', 0, 0)\")",
         "foreign key violations"),
    ],
    ids=["exception", "orphan-row"],
)
def test_failed_upgrade_on_sqlite_rolls_back_entirely(tmp_path: Path, failure: str, message: str) -> None:
    """A revision that fails halfway leaves neither its DDL nor a version bump behind (one transaction)."""
    extra = tmp_path / "extra_versions"
    extra.mkdir()
    (extra / "9999_broken.py").write_text(BROKEN_REVISION.format(failure=failure, head=head_revisions()[0]))
    db_file = tmp_path / "app.db"
    url = sqlite_url(db_file)
    asyncio.run(upgrade_database(url))
    before = table_names(db_file)

    cfg = alembic_config(url)
    cfg.set_main_option("version_locations", os.pathsep.join([str(migrations_dir() / "versions"), str(extra)]))
    with pytest.raises(RuntimeError, match=message):
        command.upgrade(cfg, "heads")

    assert table_names(db_file) == before
    with sqlite3.connect(db_file) as conn:
        assert "half" not in {r[1] for r in conn.execute("PRAGMA table_info(users)")}
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [head_revisions()]
        assert conn.execute("SELECT count(*) FROM quota_usage").fetchone() == (0,)


async def test_upgrade_waits_for_a_running_writer_instead_of_failing(tmp_path: Path) -> None:
    """An app transaction holding the SQLite write lock delays the upgrade; it does not break it."""
    db_file = tmp_path / "app.db"
    url = sqlite_url(db_file)
    holder = sqlite3.connect(db_file, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(upgrade_database(url))
        done, _ = await asyncio.wait({task}, timeout=0.5)
        assert not done, "the upgrade ran while another connection held the write lock"
        assert table_names(db_file) == set()
        holder.execute("COMMIT")
        await task
    finally:
        holder.close()
    assert check_migrations(url) == []


def test_wheel_ships_migrations_and_they_run_from_the_install(tmp_path: Path) -> None:
    """Build the wheel, unpack it, run upgrade + check from it in a fresh interpreter outside the checkout."""
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "data", "*.egg-info", "build", "dist", ".whl", "__pycache__", ".*_cache", ".hypothesis",
            ".device_out", "tests", "bench",
        ),
    )
    if not (src / "README.md").exists():  # pyproject names it; another part of the project writes it
        (src / "README.md").write_text("turbobot\n")
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-c", f"import setuptools.build_meta as b; print(b.build_wheel({str(out)!r}))"],
        cwd=src, capture_output=True, text=True, timeout=120,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = out / build.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("migrations/env.py", "migrations/script.py.mako", "migrations/versions/0001_initial.py",
                   "storage/migrate.py", "storage/models.py"):
        assert needed in names, f"{needed} missing from the wheel"

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    url = sqlite_url(tmp_path / "installed.db")
    script = (
        "import asyncio, storage.migrate as m\n"
        f"asyncio.run(m.upgrade_database({url!r}))\n"
        f"assert m.check_migrations({url!r}) == []\n"
        "print(m.migrations_dir())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", script], cwd=run_dir, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == (site / "migrations").resolve()


def test_ci_check_command_passes() -> None:
    done = subprocess.run([sys.executable, "-m", "storage.migrate", "check"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "match the models" in done.stdout


async def test_0002_keeps_existing_jobs_and_gives_them_empty_lineage_and_phase(tmp_path: Path) -> None:
    """A database made by 0001 with a parent and a child job upgrades in place (SQLite batch copy)."""
    db_file = tmp_path / "app.db"
    url = sqlite_url(db_file)
    await upgrade_database(url, "0001")
    cols = ("id, idempotency_key, user_id, parent_id, platform, chat_id, guild_id, status_message_id, "
            "reply_to_message_id, delivery, mode, prompt, model, resolution, aspect, frames, steps, seed, sla_topk, "
            "sampler, adaptive_resolution, boundary, attention, request, state, priority, attempts, worker_id, "
            "cancel_requested, progress_step, progress_total, created_at, gpu_seconds, timings, error_code, "
            "error_message")
    row = ("'telegram', '', '', '', '', '{}', 't2v', 'p', '', '480p', '16:9', 9, 2, 7, 0.1, 'sde', 0, "
           "0.9, 'auto', '{}', 'running', 0, 1, 'w', 0, 1, 2, '2026-01-01 00:00:00', 0, '{}', '', ''")
    with sqlite3.connect(db_file) as conn:
        conn.execute("INSERT INTO users (id, platform, platform_user_id, display_name, role, blocked, blocked_reason,"
                     " created_at) VALUES (1, 'telegram', '5', 'a', 'user', 0, '', '2026-01-01 00:00:00')")
        conn.execute(f"INSERT INTO jobs ({cols}) VALUES (1, 'k1', 1, NULL, {row})")
        conn.execute(f"INSERT INTO jobs ({cols}) VALUES (2, 'k2', 1, 1, {row})")

    await upgrade_database(url)
    with sqlite3.connect(db_file) as conn:
        rows = conn.execute("SELECT id, parent_id, lineage, progress_phase, progress_step FROM jobs ORDER BY id")
        assert rows.fetchall() == [(1, None, "", "", 1), (2, 1, "", "", 1)]
    assert check_migrations(url) == []
    await downgrade_database(url, "0001")
    with sqlite3.connect(db_file) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (2,)
        assert "lineage" not in {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}


async def test_0003_moves_the_request_into_its_json_column_and_drops_the_copies(tmp_path: Path) -> None:
    """A 0002 database with jobs upgrades to 0003: the request reads back equal, the copies and priority go.

    Job 1's JSON is the whole request (as 0002 wrote it); job 2's JSON is partial (an older writer), so the
    migration must fill it from the copied columns."""
    from storage.db import Database
    from storage.models import Job

    db_file = tmp_path / "app.db"
    url = sqlite_url(db_file)
    await upgrade_database(url, "0002")
    full = GenerationRequest("t2v", "a fox", model="tiny-t2v", resolution="720p", aspect="9:16", frames=33, steps=2,
                             seed=2**40 + 7, sla_topk=0.25, sigma_max=120.5, sampler="ode", boundary=0.75,
                             attention="sla", decoder="tiny")
    partial = full.replace(prompt="a wolf", decoder="vae")
    partial_json = {"mode": "t2v", "prompt": "a wolf", "image": None}
    cols = ("id, idempotency_key, user_id, platform, chat_id, guild_id, status_message_id, reply_to_message_id, "
            "delivery, mode, prompt, model, resolution, aspect, frames, steps, seed, sla_topk, sigma_max, sampler, "
            "adaptive_resolution, boundary, attention, request, state, priority, attempts, worker_id, "
            "cancel_requested, progress_step, progress_total, created_at, gpu_seconds, timings, error_code, "
            "error_message, lineage, progress_phase")
    with sqlite3.connect(db_file) as conn:
        conn.execute("INSERT INTO users (id, platform, platform_user_id, display_name, role, blocked, blocked_reason,"
                     " created_at) VALUES (1, 'telegram', '5', 'a', 'user', 0, '', '2026-01-01 00:00:00')")
        for job_id, req, stored in ((1, full, full.to_dict()), (2, partial, partial_json)):
            conn.execute(
                f"INSERT INTO jobs ({cols}) VALUES (?, ?, 1, 'telegram', '', '', '', '', '{{}}', ?, ?, ?, ?, ?, ?, ?,"
                " ?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0, 0, '', 0, 0, 0, '2026-01-01 00:00:00', 0, '{}', '', '', '', '')",
                (job_id, f"k{job_id}", req.mode, req.prompt, req.model, req.resolution, req.aspect, req.frames,
                 req.steps, req.seed, req.sla_topk, req.sigma_max, req.sampler, req.adaptive_resolution, req.boundary,
                 req.attention, json.dumps(stored)),
            )

    await upgrade_database(url, "0003")
    assert await current_revisions(url) == ("0003",)
    with sqlite3.connect(db_file) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    assert {"mode", "prompt", "request"} <= columns
    assert not columns & {"priority", "sla_topk", "steps", "seed", "model", "boundary", "sigma_max"}
    assert "ix_jobs_queue_heads" in index_names(db_file)
    await upgrade_database(url)  # the later revisions apply on top, and the models then match
    assert check_migrations(url) == []

    db = Database(url)
    try:
        async with db.read() as s:
            assert (await s.get(Job, 1)).request == full  # type: ignore[union-attr]
            assert (await s.get(Job, 2)).request == partial  # type: ignore[union-attr]
    finally:
        await db.dispose()

    await downgrade_database(url, "0002")  # and back: the copies are refilled from the JSON
    with sqlite3.connect(db_file) as conn:
        rows = conn.execute("SELECT id, steps, seed, sla_topk, sigma_max, priority FROM jobs ORDER BY id").fetchall()
    assert rows == [(1, 2, 2**40 + 7, 0.25, 120.5, 0), (2, 2, 2**40 + 7, 0.25, 120.5, 0)]
