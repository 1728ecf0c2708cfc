"""Shared helpers for the scheduler tests: settings on temp files, a migrated database, the fast engine."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from generator.request import GenerationRequest
from generator.scheduler.api import DeliveryTarget, JobEvent, Requester
from generator.scheduler.service import Scheduler
from storage.db import Database
from storage.models import Base
from turbobot.config import Settings, settings_from_dict

HERE = Path(__file__).resolve().parent
ENGINE_SPEC = f"{HERE / 'scheduler_testengine.py'}:make_engine"


def make_settings(tmp: Path, **sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {
        "app": {"data_dir": str(tmp), "outputs_dir": str(tmp / "outputs"), "inputs_dir": str(tmp / "inputs")},
        "database": {"url": f"sqlite+aiosqlite:///{tmp / 'turbobot.db'}"},
        "scheduler": {
            "lease_seconds": 10.0, "heartbeat_seconds": 0.1, "poll_seconds": 0.05, "progress_interval_seconds": 0.0,
            "max_attempts": 3, "worker_devices": ["cpu"], "watchdog_seconds": 20.0,
            "worker_start_timeout_seconds": 60.0,
        },
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return settings_from_dict(data, base_dir=str(tmp))


async def make_db(settings: Settings) -> Database:
    db = Database(settings.database_url)
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    return db


@contextlib.asynccontextmanager
async def scheduler_with_workers(settings: Settings, engine_factory: str = ENGINE_SPEC,
                                 env: dict[str, str] | None = None) -> AsyncIterator[Scheduler]:
    """A started Scheduler with its worker processes on a fresh database; stopped and disposed on exit."""
    db = await make_db(settings)
    sched = Scheduler(settings, db=db, engine_factory=engine_factory, worker_env=env or {})
    await sched.start(run_workers=True)
    try:
        yield sched
    finally:
        await sched.stop()
        await db.dispose()


def t2v(prompt: str = "a red fox", **fields: Any) -> GenerationRequest:
    fields.setdefault("frames", 5)
    fields.setdefault("steps", 2)
    return GenerationRequest(mode="t2v", prompt=prompt, **fields)


def who(n: int | str = 1, platform: str = "test") -> Requester:
    return Requester(platform, str(n), f"user {n}")


def where(chat: str = "", platform: str = "test") -> DeliveryTarget:
    return DeliveryTarget(platform=platform, chat_id=chat)


def session_mp4(factory: pytest.TempPathFactory) -> Path:
    """The test engine's base clip (made once per test module through a session fixture)."""
    from scheduler_testengine import make_base_mp4

    return make_base_mp4(factory.mktemp("mp4") / "base.mp4")


def read_bytes(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def file_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def worker_env(base_mp4: Path, **extra: str) -> dict[str, str]:
    return {"TURBOBOT_TEST_MP4": str(base_mp4), **extra}


async def until(predicate: Callable[[], Awaitable[bool] | bool], limit: float = 20.0, what: str = "") -> None:
    """Poll ``predicate`` until true; fail after ``limit`` s (no fixed sleeps in tests)."""
    deadline = time.monotonic() + limit
    while True:
        result = predicate()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


class Recorder:
    """A sink that records every event it gets."""

    def __init__(self, fail_times: int = 0) -> None:
        self.events: list[JobEvent] = []
        self.times: list[float] = []  # monotonic arrival time of each recorded event
        self.fail_times = fail_times

    async def __call__(self, event: JobEvent) -> None:
        if event.terminal and self.fail_times > 0:
            self.fail_times -= 1
            raise RuntimeError("front end down (test)")
        self.events.append(event)
        self.times.append(time.monotonic())

    def kinds(self, job_id: int) -> list[str]:
        return [e.kind for e in self.events if e.job.id == job_id]

    def terminal(self, job_id: int) -> list[JobEvent]:
        return [e for e in self.events if e.job.id == job_id and e.terminal]
