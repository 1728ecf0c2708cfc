"""The scheduler's structure: small classes, one readiness answer for /readyz and the CLI, and a worker
protocol whose messages survive the wire unchanged."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
from pathlib import Path
from typing import Any

import pytest

import generator.scheduler
from generator.scheduler import protocol
from generator.scheduler.health import readiness
from storage.migrate import upgrade_database
from tests.web_support import console, console_settings, set_worker
from turbobot.cli import cmd_ready

MAX_PUBLIC_METHODS = 15


def _public_methods(cls: type) -> list[str]:
    own = [name for name, value in vars(cls).items() if not name.startswith("_")]
    return [name for name in own if callable(getattr(cls, name, None)) or isinstance(vars(cls)[name], property)]


def test_every_scheduler_class_has_at_most_15_public_methods() -> None:
    sizes: dict[str, int] = {}
    for info in pkgutil.iter_modules(generator.scheduler.__path__):
        module = importlib.import_module(f"generator.scheduler.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                sizes[f"{info.name}.{name}"] = len(_public_methods(cls))
    assert "service.Scheduler" in sizes and "submission.Submissions" in sizes
    largest = max(sizes, key=lambda k: sizes[k])
    assert sizes[largest] <= MAX_PUBLIC_METHODS, f"{largest} has {sizes[largest]} public methods"


@pytest.mark.parametrize("msg", [
    protocol.Heartbeat(state="busy", job_id=7, stalled=True, activity_age=1.5),
    protocol.Ready(info={"model": "demo", "ema": {"a": 1.0}}),
    protocol.Fatal(error="no weights at /x"),
    protocol.JobChanged(3, "done", fenced=True),
    protocol.StatsUpdated(),
])
def test_worker_messages_round_trip(msg: protocol.WorkerMessage) -> None:
    line = protocol.encode(msg)
    assert line.endswith("\n") and line.count("\n") == 1
    assert protocol.decode_message(line) == msg
    assert protocol.decode_message(line.encode()) == msg  # the supervisor reads bytes


def test_commands_round_trip_and_garbage_is_a_protocol_error() -> None:
    for cmd in (protocol.Wake(), protocol.CancelJob(12)):
        assert protocol.decode_command(protocol.encode(cmd)) == cmd
    for bad in ("not json", "{}", '{"type": "nope"}', '{"type": "job_changed"}', "[1, 2]"):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_message(bad)


def _stable(detail: dict[str, Any]) -> dict[str, Any]:
    """The readiness body without heartbeat ages (they move between the two reads)."""
    out = json.loads(json.dumps(detail))
    for w in out.get("worker", {}).get("workers", {}).values():
        w.pop("heartbeat_age_s", None)
    return out


@pytest.mark.parametrize("state", ["warming_up", "idle"])
async def test_readyz_and_cli_ready_give_the_same_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str
) -> None:
    await upgrade_database(console_settings(tmp_path).database_url)  # the CLI migrates; so does this fixture DB
    async with console(tmp_path) as c:
        await set_worker(c.db, state=state)
        resp = await c.client.get("/readyz")
        http = await resp.json()
        capsys.readouterr()
        code = await cmd_ready(c.settings, argparse.Namespace(json=True))
        cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        direct = (await readiness(c.settings, c.db)).detail
    assert _stable(http) == _stable(cli) == _stable(direct)
    ready = state == "idle"
    assert http["ready"] is ready and resp.status == (200 if ready else 503) and code == (0 if ready else 1)
    if not ready:
        assert http["worker"]["reason"].startswith("warming up")
