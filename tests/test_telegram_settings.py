"""/settings and moderation through the real PTB client against the fake Bot API: a non-administrator is
refused (checked with getChatMember), an administrator's default applies, bot off refuses, a blocked prompt
is refused without echo, and age-restricted prompts pass only in a chat its admins opted in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fakes.telegram_server import FakeTelegram
from fakes.telegram_stack import Stack, one_reply, running_stack, submitted

ANN = FakeTelegram.user(1001, "Ann")
ADMIN = FakeTelegram.user(1002, "Boss")


async def reply_text(stack: Stack, chat: dict[str, Any], user: dict[str, Any], text: str) -> str:
    msg = await stack.tg.send_text(chat, user, text)
    call = await one_reply(stack.tg, msg)
    return str(call.params.get("text", ""))


async def final_status(stack: Stack, chat: dict[str, Any], user: dict[str, Any], text: str) -> str:
    """The text of the status message answering a generation command, once submitted or refused."""
    return str((await submitted(stack.tg, await stack.tg.send_text(chat, user, text)))["text"])


async def test_settings_for_group_admins_and_moderation(tmp_path: Path) -> None:
    block = tmp_path / "block.txt"
    block.write_text("dragon\n", encoding="utf-8")
    nsfw = tmp_path / "nsfw.txt"
    nsfw.write_text("lewd\n", encoding="utf-8")
    async with running_stack(tmp_path, moderation={"blocklist_file": str(block),
                                                   "nsfw_words_file": str(nsfw)}) as stack:
        tg = stack.tg
        group = tg.group_chat(-100555)
        tg.chat_admins[-100555] = {ADMIN["id"]}
        community = "-100555"

        answer = await reply_text(stack, group, ANN, "/settings defaults --steps 1")
        assert "administrators" in answer and tg.calls_of("getChatMember")
        assert (await stack.sched.communities.get("telegram", community)).defaults == {}
        assert "administrator" in await reply_text(stack, tg.private_chat(ANN), ANN, "/settings")

        answer = await reply_text(stack, group, ADMIN, "/settings defaults --steps 1")
        assert "defaults:" in answer and "=1" in answer, answer
        status = await final_status(stack, group, ANN, "/t2v a red fox")
        assert "#" in status, status
        jobs = await stack.jobs_of(ANN["id"])
        assert jobs[0].request.steps == 1

        status = await final_status(stack, group, ANN, "/t2v a DRAG0N at sea")
        assert "blocked" in status and "DRAG0N" not in status and "sea" not in status

        status = await final_status(stack, group, ANN, "/t2v a lewd scene")
        assert "Age-restricted" in status
        await reply_text(stack, group, ADMIN, "/settings policy nsfw_channels")
        assert "Age-restricted" in await final_status(stack, group, ANN, "/t2v a lewd scene")
        answer = await reply_text(stack, group, ADMIN, "/settings nsfw on")
        assert "nsfw): on" in answer
        assert "Age-restricted" not in await final_status(stack, group, ANN, "/t2v a lewd scene")

        await reply_text(stack, group, ADMIN, "/settings bot off")
        assert "switched off" in await final_status(stack, group, ANN, "/t2v a cat")
