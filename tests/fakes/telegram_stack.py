"""Test harness: the real Telegram adapter (PTB client) + the real Scheduler (temp-file SQLite, a worker
process with the fast test engine) + the fake Bot API server. Used by tests/test_telegram_*.py."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from bots.telegram import run_telegram
from generator.scheduler.api import JobView, Requester
from generator.scheduler.service import Scheduler
from storage.migrate import upgrade_database
from turbobot.config import Settings, settings_from_dict

from .telegram_server import Call, FakeTelegram

TOKEN = "5550001234:AAF_fake-token-for-tests_0123456789abcdef"
ENGINE = str(Path(__file__).parent / "telegram_engine.py") + ":make_engine"


def make_settings(tmp: Path, tg: FakeTelegram, **sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {
        "app": {"data_dir": str(tmp), "outputs_dir": str(tmp / "outputs"), "inputs_dir": str(tmp / "inputs")},
        "database": {"url": f"sqlite+aiosqlite:///{tmp}/turbobot.db"},
        "scheduler": {
            "worker_devices": ["cpu"],
            "poll_seconds": 0.05,
            "heartbeat_seconds": 0.5,
            "progress_interval_seconds": 0.05,
        },
        "defaults": {"frames": 9, "steps": 2},
        "telegram": {
            "base_url": tg.base_url,
            "base_file_url": tg.base_file_url,
            "status_interval_private_seconds": 0.05,
            "status_interval_group_seconds": 0.05,
        },
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return settings_from_dict(data, base_dir=str(tmp))


class Stack:
    """One "process": a scheduler and the bot. ``restart`` stops both and starts fresh ones on the same DB."""

    def __init__(self, tg: FakeTelegram, settings: Settings) -> None:
        self.tg = tg
        self.settings = settings
        self.scheduler: Scheduler | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Stack:
        await upgrade_database(self.settings.database_url)
        self.scheduler = Scheduler(self.settings, engine_factory=ENGINE)
        await self.scheduler.start()
        self._stop = asyncio.Event()
        # Polling bootstraps with deleteWebhook before it polls; webhook mode ends with setWebhook.
        ready = "setWebhook" if self.settings.telegram.mode == "webhook" else "deleteWebhook"
        before = len(self.tg.calls_of(ready))
        task = self._task = asyncio.create_task(run_telegram(self.settings, self.scheduler, TOKEN, self._stop))
        await self.tg.wait_for(lambda: len(self.tg.calls_of(ready)) > before or task.done())
        if task.done():
            task.result()
        return self

    async def stop(self) -> None:
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, 15)
        if self.scheduler is not None:
            await self.scheduler.stop()
        self._task = self._stop = None
        self.scheduler = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @property
    def sched(self) -> Scheduler:
        assert self.scheduler is not None
        return self.scheduler

    async def jobs_of(self, user_id: int) -> list[JobView]:
        return await self.sched.views.jobs_for(Requester("telegram", str(user_id)), limit=100)

    async def wait_job(self, job_id: int, within: float = 45.0) -> JobView:
        return await asyncio.wait_for(self.sched.views.wait(job_id), within)


def replies_to(tg: FakeTelegram, msg: dict[str, Any], method: str = "sendMessage") -> list[Call]:
    """Successful ``method`` calls that reply to ``msg``."""
    return [
        c
        for c in tg.calls_of(method, msg["chat"]["id"])
        if c.status == 200 and (c.params.get("reply_parameters") or {}).get("message_id") == msg["message_id"]
    ]


async def one_reply(tg: FakeTelegram, msg: dict[str, Any], method: str = "sendMessage") -> Call:
    await tg.wait_for(lambda: replies_to(tg, msg, method))
    return replies_to(tg, msg, method)[0]


async def submitted(tg: FakeTelegram, command: dict[str, Any]) -> dict[str, Any]:
    """The status message answering ``command``, once the job behind it is submitted (or refused)."""
    status = await one_reply(tg, command)
    key = (command["chat"]["id"], status.result["message_id"])
    await tg.wait_for(lambda: key not in tg.messages or not tg.messages[key]["text"].startswith("⏳"))
    return tg.messages.get(key) or status.result


@contextlib.asynccontextmanager
async def running_stack(tmp: Path, **sections: dict[str, Any]) -> Any:
    async with FakeTelegram(TOKEN) as tg:
        stack = Stack(tg, make_settings(tmp, tg, **sections))
        await stack.start()
        try:
            yield stack
        finally:
            await stack.stop()
