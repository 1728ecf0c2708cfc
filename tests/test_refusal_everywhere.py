"""One crafted out-of-range value, through every front end: refused once (at the scheduler's submit: one
"refused" audit row, no job) and answered with the same sentence from the parameter declaration.

The value skips every client-side check: Discord's client would enforce the registered range, but a crafted
interaction (the fake server sends what it is given) does not; chat flags, form fields and CLI options are
only coerced to the parameter's type before the one validation."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from fakes.discord_harness import discord_env
from fakes.telegram_server import FakeTelegram
from fakes.telegram_stack import replies_to, running_stack, submitted
from web_support import console

from generator.params import PARAM, Limits, RequestError
from storage.db import sqlite_file

REPO = Path(__file__).resolve().parents[1]
TOO_BIG = 0.9  # SLA top-k: the configured limits allow 0.01 to 0.5


def expected_message() -> str:
    try:
        PARAM["sla_topk"].check(TOO_BIG, Limits())
    except RequestError as exc:
        return exc.message
    raise AssertionError("0.9 should be out of range")


def refusals_and_jobs(url: str) -> tuple[int, int]:
    path = sqlite_file(url)
    assert path is not None
    with sqlite3.connect(path) as conn:
        refused = conn.execute("SELECT count(*) FROM audit_log WHERE action = 'refused'").fetchone()[0]
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    return int(refused), int(jobs)


async def test_discord_option(tmp_path: Path) -> None:
    message = expected_message()
    async with discord_env(tmp_path, workers=False) as env:
        alice = env.server.new_user("alice")
        text = await env.private_answer(await env.server.slash("t2v", alice, prompt="a fox", topk=TOO_BIG))
        assert message in text
        assert refusals_and_jobs(env.settings.database_url) == (1, 0)


async def test_telegram_flag(tmp_path: Path) -> None:
    message = expected_message()
    ann = FakeTelegram.user(1001, "Ann")
    async with running_stack(tmp_path) as stack:
        msg = await stack.tg.send_text(stack.tg.private_chat(ann), ann, f"/t2v a fox --topk {TOO_BIG}")
        assert message in (await submitted(stack.tg, msg))["text"]
        assert len(replies_to(stack.tg, msg)) == 1
        assert refusals_and_jobs(stack.settings.database_url) == (1, 0)


async def test_console_form(tmp_path: Path) -> None:
    message = expected_message()
    async with console(tmp_path) as c:
        await c.prime()
        resp = await c.submit("a fox", sla_topk=TOO_BIG)
        body = await resp.json()
        assert resp.status == 400 and body["message"] == message, body
        assert refusals_and_jobs(c.settings.database_url) == (1, 0)


def test_cli_option(tmp_path: Path) -> None:
    message = expected_message()
    (tmp_path / "config.toml").write_bytes((REPO / "config.toml").read_bytes())
    out = subprocess.run([sys.executable, "-m", "turbobot.cli", "generate", "a fox", "--topk", str(TOO_BIG)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert refusals_and_jobs(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'turbobot.db'}") == (1, 0)
