"""Shared helpers for the web console tests: a real Scheduler on a temp-file SQLite database, the console
app on a real local port, and CSRF-aware request helpers."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from scheduler_support import ENGINE_SPEC, make_settings, until
from scheduler_testengine import MP4_ENV, make_base_mp4

from bots.web import create_web_app
from bots.web.security import CSRF_COOKIE, CSRF_HEADER
from generator.scheduler.service import Scheduler
from storage.db import Database
from storage.models import Base
from storage.repo_workers import register_worker, update_worker
from turbobot.config import Settings

TOKEN_ENV = "TURBOBOT_WEB_TEST_TOKEN"
TOKEN = "web-test-token-0123456789abcdef"
OPERATOR = "web:operator"

@dataclass
class Console:
    settings: Settings
    db: Database
    scheduler: Scheduler
    app: web.Application
    client: TestClient

    @property
    def base(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    def csrf(self) -> str:
        for cookie in self.client.session.cookie_jar:
            if cookie.key == CSRF_COOKIE:
                return cookie.value
        return ""

    async def prime(self) -> str:
        """Load a page so the browser-like client holds a CSRF cookie; returns it."""
        resp = await self.client.get("/")
        assert resp.status == 200, await resp.text()
        token = self.csrf()
        assert token
        return token

    def headers(self, **extra: str) -> dict[str, str]:
        return {CSRF_HEADER: self.csrf(), **extra}

    async def post_json(self, path: str, body: dict[str, Any] | None = None, **extra: str) -> aiohttp.ClientResponse:
        return await self.client.post(path, json=body or {}, headers=self.headers(**extra))

    async def submit(self, prompt: str, mode: str = "t2v", image: bytes | None = None, **fields: Any) -> aiohttp.ClientResponse:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("mode", mode)
        form.add_field("prompt", prompt)
        for name, value in fields.items():
            form.add_field(name, str(value))
        if image is not None:
            form.add_field("image", image, filename="in.png", content_type="image/png")
        return await self.client.post("/api/jobs", data=form, headers=self.headers())

    async def job(self, job_id: int) -> dict[str, Any]:
        resp = await self.client.get(f"/api/jobs/{job_id}")
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def wait_state(self, job_id: int, states: tuple[str, ...], limit: float = 20.0) -> dict[str, Any]:
        box: dict[str, Any] = {}

        async def reached() -> bool:
            box.update((await self.job(job_id))["job"])
            return box.get("state") in states

        await until(reached, limit, f"job {job_id} to reach {states}")
        return box


async def make_db(settings: Settings) -> Database:
    """A temp-file SQLite database with every table, configured as the app configures it."""
    db = Database(settings.database_url, busy_timeout_ms=settings.database.busy_timeout_ms)
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    return db


def console_settings(tmp: Path, **sections: dict[str, Any]) -> Settings:
    """Scheduler test settings plus the console's: the operator is an owner, the token env is ours."""
    sections.setdefault("admin", {}).setdefault("owners", [OPERATOR])
    sections.setdefault("web", {}).setdefault("admin_token_env", TOKEN_ENV)
    return make_settings(tmp, **sections)


@contextlib.asynccontextmanager
async def console(
    tmp: Path, *, workers: bool = False, worker_env: dict[str, str] | None = None, engine_factory: str = ENGINE_SPEC,
    **sections: dict[str, Any],
) -> AsyncIterator[Console]:
    """The real Scheduler (with worker processes running the fast test engine when ``workers``) and the
    console served on a free 127.0.0.1 port."""
    settings = console_settings(tmp, **sections)
    db = await make_db(settings)
    scheduler = Scheduler(settings, db=db, engine_factory=engine_factory, worker_env=worker_env)
    await scheduler.start(run_workers=workers)
    app = create_web_app(settings, scheduler)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Console(settings, db, scheduler, app, client)
    finally:
        await client.close()
        await scheduler.stop()
        await db.dispose()


async def set_worker(db: Database, worker_id: str = "w:0", *, state: str = "idle", age_s: float = 0.0,
                     info: dict[str, Any] | None = None) -> None:
    """A worker row as a worker process writes it (register, then heartbeat with a state)."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    async with db.write() as s:
        await register_worker(s, worker_id, pid=1234, device="cpu", info=info or {}, now=now)
        await update_worker(s, worker_id, now=now, state=state, info=info)


def png_bytes(w: int = 64, h: int = 48, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 200)).save(buf, format=fmt)
    return buf.getvalue()


_BASE_MP4: dict[str, Path] = {}


def mp4_env(tmp_root: Path, **extra: str) -> dict[str, str]:
    """Worker env for the fast test engine: its base clip (made once per session by ffmpeg)."""
    if "path" not in _BASE_MP4:
        tmp_root.mkdir(parents=True, exist_ok=True)
        _BASE_MP4["path"] = make_base_mp4(tmp_root / "base.mp4")
    return {MP4_ENV: str(_BASE_MP4["path"]), **extra}
