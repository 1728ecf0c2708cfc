"""Live previews on Telegram, end to end: the real PTB client, the real Scheduler with a worker process (the
fast test engine hands out preview frames like the real one) and the fake Bot API, which records media edits.
The engine waits after each preview until the test opens that step's gate, so nothing depends on timing."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.telegram_engine import GATES_ENV
from fakes.telegram_server import FakeTelegram
from fakes.telegram_stack import one_reply, replies_to, running_stack, submitted
from scheduler_support import until

ANN = FakeTelegram.user(1001, "Ann")


def previews_left(outputs: Path) -> list[Path]:
    return sorted(outputs.glob(".preview-*")) if outputs.exists() else []


async def test_preview_animation_is_sent_edited_in_place_and_removed_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv(GATES_ENV, str(gates))
    async with running_stack(tmp_path) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cmd = await tg.send_text(chat, ANN, "/t2v a comet over the sea [preview] --steps 3")
        status = await submitted(tg, cmd)
        (job,) = await stack.jobs_of(ANN["id"])

        # Step 1's preview: an animation (GIF bytes) replying to the status message.
        anim = await one_reply(tg, status, "sendAnimation")
        assert anim.files["animation"][:6] == b"GIF89a"
        assert f"job #{job.id}" in anim.params["caption"]
        assert anim.params.get("disable_notification") in (True, "true", "True")
        preview_id = anim.result["message_id"]
        (gates / f"{job.id}-preview1").touch()

        # Step 2's preview replaces it in place (editMessageMedia, an animation), no new message.
        await tg.wait_for(lambda: tg.media_edits)
        chat_id, message_id, kind, data = tg.media_edits[0]
        assert (chat_id, message_id, kind) == (chat["id"], preview_id, "animation")
        assert data[:6] == b"GIF89a" and data != anim.files["animation"]
        (gates / f"{job.id}-preview2").touch()

        # Step 3 is the last: no preview; the video arrives and the preview message is deleted.
        await one_reply(tg, cmd, "sendVideo")
        await tg.wait_for(lambda: tg.message(chat["id"], preview_id) is None)
        assert len(tg.calls_of("sendAnimation")) == 1 and len(tg.media_edits) == 1
        outputs = tmp_path / "outputs"
        # Polled: the worker deletes them after the result is written, possibly after the bot's last request,
        # and tg.wait_for only re-checks when the bot makes one (that wait once timed out on a loaded machine).
        await until(lambda: not previews_left(outputs), 45, "the worker to remove its preview files")
        assert (await stack.wait_job(job.id)).preview == ""


async def test_no_preview_when_turned_off(tmp_path: Path) -> None:
    async with running_stack(tmp_path, scheduler={"previews": False}) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cmd = await tg.send_text(chat, ANN, "/t2v a comet over the sea --steps 3")
        await one_reply(tg, cmd, "sendVideo")
        assert not tg.calls_of("sendAnimation") and not tg.media_edits
        status_id = replies_to(tg, cmd)[0].result["message_id"]
        assert not replies_to(tg, {"chat": chat, "message_id": status_id}, "sendAnimation")
        assert not previews_left(tmp_path / "outputs")
