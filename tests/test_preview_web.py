"""Live previews on the console: the job's JSON (which the page's event stream carries) points at the newest
preview, served as a GIF by job id, and at nothing once the job ended. Real Scheduler, a worker process with a
fast test engine that hands out preview frames like the real one and waits at a gate after each."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fakes.telegram_engine import GATES_ENV
from web_support import console

ENGINE = str(Path(__file__).parent / "fakes" / "telegram_engine.py") + ":make_engine"


async def until(fetch: Any, check: Any, within: float = 30.0) -> Any:
    """Poll ``fetch()`` until ``check(value)`` holds (deadline, no fixed sleeps in the assertions)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await fetch()
        if check(value):
            return value
        assert asyncio.get_running_loop().time() < deadline, f"condition not met; last value: {value}"
        await asyncio.sleep(0.05)


async def test_job_card_shows_the_newest_preview_while_running(tmp_path: Path) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    async with console(tmp_path, workers=True, engine_factory=ENGINE, worker_env={GATES_ENV: str(gates)}) as c:
        await c.prime()
        resp = await c.submit("a comet over the sea [preview]", steps=3, frames=9)
        assert resp.status == 201, await resp.json()
        job_id = (await resp.json())["job"]["id"]

        async def job() -> dict[str, Any]:
            return (await (await c.client.get(f"/api/jobs/{job_id}")).json())["job"]

        first = await until(job, lambda j: j.get("preview"))
        assert first["state"] == "running" and first["preview"]["version"] == 1
        gif = await c.client.get(first["preview"]["url"])
        assert gif.status == 200 and gif.headers["Content-Type"] == "image/gif"
        one = await gif.read()
        assert one[:6] == b"GIF89a"
        (gates / f"{job_id}-preview1").touch()

        second = await until(job, lambda j: (j.get("preview") or {}).get("version", 0) >= 2)
        assert second["preview"]["url"] != first["preview"]["url"]  # a new URL per preview: no stale cache
        two = await (await c.client.get(second["preview"]["url"])).read()
        assert two[:6] == b"GIF89a" and two != one
        (gates / f"{job_id}-preview2").touch()

        done = await until(job, lambda j: j["terminal"])
        assert done["state"] == "succeeded" and done["preview"] is None
        assert (await c.client.get(f"/media/jobs/{job_id}/preview.gif")).status == 404


async def test_no_preview_on_the_console_when_turned_off(tmp_path: Path) -> None:
    async with console(tmp_path, workers=True, engine_factory=ENGINE, scheduler={"previews": False}) as c:
        await c.prime()
        resp = await c.submit("a comet over the sea", steps=3, frames=9)
        job_id = (await resp.json())["job"]["id"]
        seen: list[Any] = []

        async def job() -> dict[str, Any]:
            j = (await (await c.client.get(f"/api/jobs/{job_id}")).json())["job"]
            seen.append(j.get("preview"))
            return j

        done = await until(job, lambda j: j["terminal"])
        assert done["state"] == "succeeded" and not any(seen)
