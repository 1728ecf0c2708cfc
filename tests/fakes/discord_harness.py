"""Shared set-up of the Discord end-to-end tests: fake Discord + real Scheduler (temp SQLite) + real bot.

``tests/test_discord_*.py`` import it (``tests/`` is on sys.path under pytest).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from bots.discord import run_discord
from fakes.discord_server import FakeDiscord
from generator.scheduler.service import Scheduler
from storage.db import Database
from storage.migrate import upgrade_database
from turbobot.config import Settings, settings_from_dict

ENGINE = str(Path(__file__).with_name("discord_engine.py")) + ":create"
# Looks like a real bot token, so the log redaction patterns and the literal match are both exercised.
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4OQ.GabcDE.abcdefghijklmnopqrstuvwxyz0123456789AB"


def png_bytes(w: int = 64, h: int = 48, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (20, 120, 200)).save(buf, format=fmt)
    return buf.getvalue()


def make_settings(tmp: Path, server: FakeDiscord, **sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {
        "app": {"data_dir": "data", "outputs_dir": "data/outputs", "inputs_dir": "data/inputs"},
        "database": {"url": f"sqlite+aiosqlite:///{tmp / 'turbobot.db'}"},
        "scheduler": {"worker_devices": ["cpu"], "poll_seconds": 0.05, "progress_interval_seconds": 0.0,
                      "heartbeat_seconds": 0.5, "worker_start_timeout_seconds": 60.0},
        "engine": {"device": "cpu"},
        "defaults": {"frames": 9, "steps": 2},
        "discord": {"api_base": server.api_base, "gateway_url": server.gateway_url,
                    "dev_guild_ids": [int(server.guild_id)], "sync_commands": "guild",
                    "status_interval_seconds": 0.0},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return settings_from_dict(data, base_dir=str(tmp))


@dataclass
class Env:
    server: FakeDiscord
    settings: Settings
    workers: bool
    db: Database | None = None
    scheduler: Scheduler | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def sched(self) -> Scheduler:
        assert self.scheduler is not None
        return self.scheduler

    async def start(self) -> None:
        """Like a process start: a new Scheduler on the same database, then the bot."""
        await upgrade_database(self.settings.database_url)
        self.db = Database(self.settings.database_url)
        self.scheduler = Scheduler(self.settings, db=self.db, engine_factory=ENGINE)
        await self.scheduler.start(run_workers=self.workers)
        await self.start_bot()

    async def start_bot(self) -> None:
        self.stop = asyncio.Event()
        identified = self.server.identifies
        self.task = asyncio.create_task(run_discord(self.settings, self.sched, TOKEN, self.stop))
        waiter = asyncio.ensure_future(self.server.wait_identified(identified + 1, within=20))
        done, _ = await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            waiter.cancel()
            self.task.result()  # the bot died while starting: show why
            raise AssertionError("the bot stopped while starting")
        waiter.result()

    async def stop_bot(self) -> None:
        if self.task is not None:
            self.stop.set()
            await asyncio.wait_for(self.task, 20)
            self.task = None

    async def shutdown(self) -> None:
        """Like a process exit: the bot first, then the scheduler and its workers."""
        await self.stop_bot()
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
        if self.db is not None:
            await self.db.dispose()
            self.db = None

    async def restart(self) -> None:
        await self.shutdown()
        await self.start()

    # --- helpers used by the tests ----------------------------------------------------------------
    async def eventually(self, check: Callable[[], Awaitable[Any]], within: float = 20) -> Any:
        """For state only the database shows (no event to wait on): re-check until true, bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            value = await check()
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.02)

    async def answered(self, interaction_id: str, within: float = 20) -> dict[str, Any]:
        """The first answer (message) to an interaction, once it has one."""
        await self.server.wait_for(lambda: self.server.response_of(interaction_id).acked, within)
        rec = self.server.response_of(interaction_id)
        if rec.callback_type == 5:  # deferred: wait for the real content
            await self.server.wait_for(lambda: (self.server.original(interaction_id) or {}).get("content"), within)
        msg = self.server.original(interaction_id)
        if msg is None and rec.followups:
            msg = self.server.messages[rec.followups[-1]]
        assert msg is not None, f"interaction {interaction_id} was answered without a message"
        return msg

    async def private_answer(self, interaction_id: str, within: float = 20) -> str:
        """The text of an ephemeral answer (refusals, info); fails if the answer was public."""
        def find() -> dict[str, Any] | None:
            rec = self.server.response_of(interaction_id)
            ids = ([rec.original_message_id] if rec.original_message_id else []) + rec.followups
            for mid in reversed(ids):
                m = self.server.messages.get(mid)
                if m is not None and m["flags"] & 64 and m["content"]:  # not a "thinking" placeholder
                    return m
            return None

        msg = await self.server.wait_for(find, within)
        return msg["content"]

    async def delivered(self, interaction_id: str, within: float = 30) -> dict[str, Any]:
        """The status message of a job once it carries the result attachment (not a live preview)."""
        return await self.server.delivered(interaction_id, within)


def file_bytes(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def buttons(message: dict[str, Any]) -> list[str]:
    return [c["custom_id"] for row in message.get("components", []) for c in row.get("components", [])]


def job_id_of(message: dict[str, Any]) -> int:
    for cid in buttons(message):
        if cid.startswith("tb:params:"):
            return int(cid.rsplit(":", 1)[1])
    raise AssertionError(f"no Params button on {message['content']!r}")


@contextlib.asynccontextmanager
async def discord_env(tmp_path: Path, *, workers: bool = True, size_limit: int | None = None,
                      owner_is_admin: bool = False, **sections: dict[str, Any]) -> AsyncIterator[Env]:
    """A started fake Discord, Scheduler (``workers``: with the fast test engine) and bot.

    ``owner_is_admin``: the application owner of the fake is in ``admin.owners``.
    """
    server = FakeDiscord(token=TOKEN, **({"attachment_size_limit": size_limit} if size_limit else {}))
    await server.start()
    if owner_is_admin:
        sections.setdefault("admin", {})["owners"] = [f"discord:{server.owner['id']}"]
    env = Env(server=server, settings=make_settings(tmp_path, server, **sections), workers=workers)
    try:
        await env.start()
        yield env
    finally:
        await env.shutdown()
        await server.stop()
