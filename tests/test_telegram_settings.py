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


async def test_settings_expand_default_applies_to_requests_without_the_switch(tmp_path: Path) -> None:
    from test_expand import RICH, FakeLLM

    llm = FakeLLM()
    await llm.start()
    try:
        async with running_stack(tmp_path, expand={"url": llm.url, "timeout_seconds": 5.0},
                                 quotas={"max_queued_per_user": 10}) as stack:
            tg = stack.tg
            group = tg.group_chat(-100556)
            tg.chat_admins[-100556] = {ADMIN["id"]}
            assert "administrator" in await reply_text(stack, group, ANN, "/settings expand on")
            shown = await reply_text(stack, group, ADMIN, "/settings")
            assert "prompt expansion: off (the bot’s own default" in shown

            answer = await reply_text(stack, group, ADMIN, "/settings expand on")
            assert "prompt expansion: on (this community’s default" in answer
            await final_status(stack, group, ANN, "/t2v ein Fuchs")
            await final_status(stack, group, ANN, "/t2v ein Hund --no-expand")
            await final_status(stack, tg.private_chat(ANN), ANN, "/t2v eine Katze")  # not in the group
            assert "expand must be on or off" in await reply_text(stack, group, ADMIN, "/settings expand maybe")
            answer = await reply_text(stack, group, ADMIN, "/settings expand default")
            assert "prompt expansion: off (the bot’s own default" in answer
            last = await final_status(stack, group, ANN, "/t2v eine Maus")
            assert "eine Maus" in last, last

            by_typed = {j.request.original_prompt or j.request.prompt: j.request for j in await stack.jobs_of(ANN["id"])}
            assert by_typed["ein Fuchs"].prompt == RICH and by_typed["ein Fuchs"].expand
            assert by_typed["ein Hund"].prompt == "ein Hund" and not by_typed["ein Hund"].expand
            assert by_typed["eine Katze"].prompt == "eine Katze" and not by_typed["eine Katze"].expand
            assert by_typed["eine Maus"].prompt == "eine Maus"
            assert len(llm.calls) == 1
    finally:
        await llm.stop()


async def test_settings_expand_is_refused_without_an_endpoint(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        group = stack.tg.group_chat(-100557)
        stack.tg.chat_admins[-100557] = {ADMIN["id"]}
        answer = await reply_text(stack, group, ADMIN, "/settings expand on")
        assert "not offered by this bot" in answer
        assert "expand" not in (await stack.sched.communities.get("telegram", "-100557")).defaults
        assert "prompt expansion: not offered" in await reply_text(stack, group, ADMIN, "/settings")
