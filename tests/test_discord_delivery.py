"""Delivering results when the interaction token cannot be used, and after a restart."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fakes.discord_harness import buttons, discord_env, file_bytes, job_id_of

import bots.discord.respond as respond
from generator.scheduler.api import Requester
from storage.models import Job


def _reply_with_video(srv, status_id: str) -> dict | None:  # type: ignore[no-untyped-def,type-arg]
    for m in srv.messages_in():
        ref = m.get("message_reference") or {}
        if str(ref.get("message_id")) == status_id and m["attachments"]:
            return m
    return None


async def _check_bot_token_delivery(env, alice: dict, iid: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    srv = env.server
    status = await env.answered(iid)
    job_id = job_id_of(status)
    reply = await srv.wait_for(lambda: _reply_with_video(srv, status["id"]), 30)
    job = await env.sched.views.get(job_id)
    assert job is not None and job.output is not None
    assert reply["content"].startswith(f"<@{alice['id']}> ") and f"Job #{job_id}" in reply["content"]
    assert [u["id"] for u in reply["mentions"]] == [alice["id"]]
    assert srv.file_bytes(reply["attachments"][0]) == file_bytes(job.output.path)
    assert buttons(reply) == [f"tb:retry:{job_id}", f"tb:remix:{job_id}", f"tb:extend:{job_id}",
                              f"tb:params:{job_id}", f"tb:delete:{job_id}"]
    # The status message itself is marked done with the bot token and loses its Cancel button.
    await srv.wait_for(lambda: srv.messages[status["id"]]["content"].startswith(f"**Done · job #{job_id}"))
    assert srv.messages[status["id"]]["components"] == []
    return reply


async def test_results_go_to_the_channel_with_the_bot_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with discord_env(tmp_path) as env:
        srv = env.server
        alice = srv.new_user("alice")

        # 1. Discord answers 401/50027 on the interaction webhook (token invalid).
        srv.arm_error("PATCH", r"^/webhooks/", status=401, code=50027, message="Invalid Webhook Token", times=1000)
        # ... and rate-limits the channel route once: discord.py waits retry_after and tries again.
        srv.arm_error("POST", r"^/channels/\d+/messages$", status=429, message="You are being rate limited.",
                      retry_after=0.05)
        first = await srv.slash("t2v", alice, prompt="a paper boat on a river")
        await _check_bot_token_delivery(env, alice, first)
        token_edits = [r for r in srv.requests if r.method == "PATCH" and f"itoken-{first}" in r.path]
        assert len(token_edits) == 1 and token_edits[0].status == 401  # after the first 50027 it is not used
        posts = [r.status for r in srv.requests if r.method == "POST" and r.path.startswith("/channels/")]
        assert posts == [429, 200]
        srv.errors.clear()

        # 2. The 15 minutes are over (here: as soon as the token is issued): it is not even tried.
        monkeypatch.setattr(respond, "TOKEN_LIFETIME_S", respond.TOKEN_MARGIN_S)
        second = await srv.slash("t2v", alice, prompt="a paper plane over a city")
        await _check_bot_token_delivery(env, alice, second)
        assert not [r for r in srv.requests if r.method == "PATCH" and f"itoken-{second}" in r.path]


async def test_job_finishing_after_a_restart_is_still_delivered(tmp_path: Path) -> None:
    # No GPU workers in the first life: the job waits in the queue while the bot "restarts".
    async with discord_env(tmp_path, workers=False) as env:
        srv = env.server
        alice = srv.new_user("alice")
        iid = await srv.slash("t2v", alice, prompt="a slow sunrise")
        status = await env.answered(iid)
        job_id = job_id_of(status)
        assert "Queued" in status["content"]

        env.workers = True
        await env.restart()  # new Scheduler and bot: only the database remembers the status message

        final = await env.delivered(iid)
        assert final["id"] == status["id"]  # the same status message now carries the video
        assert f"Job #{job_id}" in final["content"]
        assert not _reply_with_video(srv, status["id"])  # the token was still valid: no extra message


async def test_bot_restarted_inside_the_process_still_gets_results(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="turbobot.events")
    async with discord_env(tmp_path, workers=False) as env:
        srv = env.server
        alice = srv.new_user("alice")
        status = await env.answered(await srv.slash("t2v", alice, prompt="waiting for a restart"))
        job_id = job_id_of(status)

        await env.stop_bot()
        await env.sched.admin.cancel(job_id, Requester("discord", alice["id"]))  # ends while no client is running

        def waiting_line() -> list[logging.LogRecord]:
            return [r for r in caplog.records
                    if r.name == "turbobot.events" and f"job {job_id} cancelled" in r.getMessage()]

        # The hub has looked at the result while no client ran (on a busy machine it may look only later).
        async def hub_noted_it() -> bool:
            return bool(waiting_line())

        await env.eventually(hub_noted_it)
        await env.start_bot()  # same Scheduler: the old client must not swallow or block the result

        await srv.wait_for(lambda: "Cancelled" in srv.messages[status["id"]]["content"], 30)

        async def marked_delivered() -> bool:  # every Discord sink accepted it: it will not be offered again
            async with env.sched.db.read() as s:
                row = await s.get(Job, job_id)
                return row is not None and row.delivered_at is not None

        await env.eventually(marked_delivered)
    # Ending while no client ran is normal: one line saying it waits, no traceback.
    waited = waiting_line()
    assert waited and "will offer it again" in waited[0].getMessage()
    assert not [r for r in caplog.records if r.name == "turbobot.events" and r.exc_info], caplog.text
