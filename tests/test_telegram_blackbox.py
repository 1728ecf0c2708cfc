"""The whole product, started as ``turbobot run`` in its own process with the real embedded engine, driven
through the fake Bot API: a /t2v command comes back as a real mp4, and the token never reaches the logs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from fakes.telegram_server import FakeTelegram
from fakes.telegram_stack import TOKEN, replies_to

ROOT = Path(__file__).resolve().parent.parent


async def test_turbobot_run_serves_telegram_with_the_embedded_engine(tmp_path: Path) -> None:
    async with FakeTelegram(TOKEN) as tg:
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            f"""
[database]
url = "sqlite+aiosqlite:///{tmp_path / 'turbobot.db'}"
[app]
outputs_dir = "{tmp_path / 'outputs'}"
inputs_dir = "{tmp_path / 'inputs'}"
[scheduler]
worker_devices = ["cpu"]
poll_seconds = 0.05
[engine]
device = "cpu"
[telegram]
base_url = "{tg.base_url}"
base_file_url = "{tg.base_file_url}"
status_interval_private_seconds = 0.5
[web]
enabled = false
""",
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "TURBOBOT_ENGINE_FACTORY")}
        env["TELEGRAM_TOKEN"] = TOKEN
        log_path = tmp_path / "turbobot.log"
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "turbobot.cli", "--config", str(cfg), "-v", "run",
                cwd=str(ROOT), env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
            )
            try:
                # setMyCommands is sent at start, before polling; updates queued meanwhile are served then.
                await tg.wait_for(lambda: tg.calls_of("setMyCommands") or proc.returncode is not None, 60)
                assert proc.returncode is None, log_path.read_text(errors="replace")[-3000:]
                ann = FakeTelegram.user(4242, "Ann")
                cmd = await tg.send_text(FakeTelegram.private_chat(ann), ann,
                                         "/t2v a lighthouse in a storm --frames 9 --steps 2 --seed 5")
                await tg.wait_for(lambda: replies_to(tg, cmd, "sendVideo"), 120)
                (video,) = replies_to(tg, cmd, "sendVideo")
                caption = tg.message(ann["id"], video.result["message_id"])["caption"]
                assert "seed 5" in caption and "untrained demo model" in caption
                _kind, data = tg.uploads[-1]
                assert data[4:8] == b"ftyp"  # a real mp4 from the real engine
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(proc.wait(), 30)
    logs = log_path.read_text(errors="replace")
    assert code == 0, logs[-3000:]
    assert TOKEN not in logs and TOKEN.split(":")[1] not in logs  # -v (debug) logging on, token never printed
