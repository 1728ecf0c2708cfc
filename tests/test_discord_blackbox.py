"""The whole product, started as ``turbobot run`` in its own process, driven through the fake Discord."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from fakes.discord_harness import ENGINE, TOKEN, job_id_of
from fakes.discord_server import FakeDiscord

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp: Path, srv: FakeDiscord) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(
        f"""
[database]
url = "sqlite+aiosqlite:///{tmp / 'turbobot.db'}"
[scheduler]
worker_devices = ["cpu"]
poll_seconds = 0.05
[engine]
device = "cpu"
[defaults]
frames = 9
steps = 2
[discord]
api_base = "{srv.api_base}"
gateway_url = "{srv.gateway_url}"
dev_guild_ids = [{srv.guild_id}]
status_interval_seconds = 0.0
[web]
enabled = false
""",
        encoding="utf-8",
    )
    return cfg


async def test_turbobot_run_serves_discord_from_config_and_environment(tmp_path: Path) -> None:
    srv = FakeDiscord(token=TOKEN)
    await srv.start()
    cfg = write_config(tmp_path, srv)
    env = {**os.environ, "DISCORD_TOKEN": TOKEN, "TURBOBOT_ENGINE_FACTORY": ENGINE, "TELEGRAM_TOKEN": ""}
    log_path = tmp_path / "turbobot.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "turbobot.cli", "--config", str(cfg), "-v", "run",
            cwd=str(ROOT), env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            exited = asyncio.ensure_future(proc.wait())
            ready = asyncio.ensure_future(srv.wait_identified(within=60))
            await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
            assert not exited.done(), "turbobot run exited:\n" + log_path.read_text(errors="replace")[-3000:]
            ready.result()

            alice = srv.new_user("alice")
            iid = await srv.slash("t2v", alice, prompt="a black box that opens")
            final = await srv.delivered(iid, within=60)  # a live preview.gif may come first
            assert f"Job #{job_id_of(final)}" in final["content"]
            assert final["attachments"][0]["filename"].endswith(".mp4")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
            await srv.stop()
    logs = log_path.read_text(errors="replace")
    assert code == 0, logs[-3000:]
    assert TOKEN not in logs  # debug logging (-v) is on, the token is never printed


async def test_sigterm_while_a_job_renders_waits_for_the_next_start_quietly(tmp_path: Path) -> None:
    """Stopping with a Discord job still rendering is normal: its result waits for the next start, and the
    log says so in one line, with no traceback. The voice-support warnings of discord.py stay out too."""
    srv = FakeDiscord(token=TOKEN)
    await srv.start()
    cfg = write_config(tmp_path, srv)
    env = {**os.environ, "DISCORD_TOKEN": TOKEN, "TURBOBOT_ENGINE_FACTORY": ENGINE, "TELEGRAM_TOKEN": ""}
    log_path = tmp_path / "turbobot.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "turbobot.cli", "--config", str(cfg), "run",
            cwd=str(ROOT), env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            exited = asyncio.ensure_future(proc.wait())
            ready = asyncio.ensure_future(srv.wait_identified(within=60))
            await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
            assert not exited.done(), "turbobot run exited:\n" + log_path.read_text(errors="replace")[-3000:]
            ready.result()

            alice = srv.new_user("alice")
            iid = await srv.slash("t2v", alice, prompt="a long one [hold]")  # renders until cancelled
            await srv.wait_for(lambda: "Rendering" in ((srv.original(iid) or {}).get("content") or ""), 60)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
            await srv.stop()
    logs = log_path.read_text(errors="replace")
    assert code == 0, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    assert "voice will NOT be supported" not in logs, logs[-3000:]
    # The job went back to the queue (its worker stopped with the process): said in one line. Whether its
    # "queued" event still reached the stopping Discord sink (then one more line: delivery waits for the next
    # start) depends on the order of shutdown; either way nothing is an error.
    assert any("job 1 handed back to the queue" in line for line in logs.splitlines()), logs[-3000:]
    assert not [line for line in logs.splitlines() if " ERROR " in line], logs[-3000:]
    later = [line for line in logs.splitlines() if "job 1 " in line and "Discord client" in line]
    assert len(later) <= 1, later
