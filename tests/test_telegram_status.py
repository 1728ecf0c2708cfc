"""The status message is edited within flood limits through the real PTB Bot against the fake server:
coalesced updates, "message is not modified" ignored, 429 backs off, a vanished message is left alone."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakes.telegram_server import FakeTelegram
from fakes.telegram_stack import TOKEN
from telegram import Bot

from bots.telegram.status import StatusBoard
from bots.texts import status_text
from generator.request import GenerationRequest
from generator.scheduler.api import DeliveryTarget, JobView, Requester
from turbobot.config import TelegramSettings

PRIVATE, GROUP = 501, -100501


def view(chat_id: int, status_id: int, *, state: str = "running", step: int = 0, job_id: int = 9) -> JobView:
    now = dt.datetime.now(dt.UTC)
    return JobView(
        id=job_id, state=state, request=GenerationRequest("t2v", "a kite", seed=3, steps=4),
        requester=Requester("telegram", "1"),
        target=DeliveryTarget("telegram", chat_id=str(chat_id), status_message_id=str(status_id)),
        parent_id=None, created_at=now, started_at=now, finished_at=None, attempts=1, progress_step=step,
        progress_total=4, position=None, queue_length=None, eta=None, output=None, error_code="",
        error_message="", timings={},
    )


@pytest.fixture
async def env() -> AsyncIterator[tuple[FakeTelegram, Bot]]:
    async with FakeTelegram(TOKEN) as tg:
        bot = Bot(TOKEN, base_url=tg.base_url, base_file_url=tg.base_file_url)
        async with bot:
            yield tg, bot


async def status_message(tg: FakeTelegram, bot: Bot, chat_id: int) -> int:
    msg = await bot.send_message(chat_id, "⏳ Submitting…")
    return msg.message_id


def edits(tg: FakeTelegram, message_id: int) -> list[Any]:
    return [c for c in tg.calls_of("editMessageText") if c.params["message_id"] == message_id]


async def test_updates_inside_the_interval_are_coalesced_into_one_later_edit(env: tuple[FakeTelegram, Bot]) -> None:
    tg, bot = env
    board = StatusBoard(bot, TelegramSettings(status_interval_private_seconds=0.6, status_interval_group_seconds=60))
    assert board.interval_for(GROUP) == 60 and board.interval_for(PRIVATE) == 0.6
    sid = await status_message(tg, bot, PRIVATE)
    for step in range(0, 4):
        await board.show(view(PRIVATE, sid, step=step))
    assert len(edits(tg, sid)) == 1  # the first at once, the rest waiting for the interval
    await tg.wait_for(lambda: len(edits(tg, sid)) == 2)
    first, second = edits(tg, sid)
    assert second.at - first.at >= 0.55
    assert second.params["text"] == status_text(view(PRIVATE, sid, step=3), "telegram")  # the latest state
    assert second.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "cancel:9"
    await board.show(view(PRIVATE, sid, step=3))  # nothing new: no call at all
    await board.finish(view(PRIVATE, sid, state="succeeded", step=4))  # terminal: immediately, no buttons
    final = edits(tg, sid)[-1]
    assert len(edits(tg, sid)) == 3 and "reply_markup" not in final.params
    # A stale snapshot arriving after the end cannot bring the old state back.
    await board.show(view(PRIVATE, sid, step=2))
    await asyncio.sleep(0)
    assert len(edits(tg, sid)) == 3
    await board.close()


async def test_not_modified_is_ignored_and_429_pushes_the_next_edit_back(env: tuple[FakeTelegram, Bot]) -> None:
    tg, bot = env
    board = StatusBoard(bot, TelegramSettings(status_interval_private_seconds=0.0))
    sid = await status_message(tg, bot, PRIVATE)
    # The message already shows this state (e.g. edited before a restart): Telegram answers 400.
    same = view(PRIVATE, sid, step=1)
    tg.raw[(PRIVATE, sid)] = status_text(same, "telegram")
    tg.messages[(PRIVATE, sid)]["reply_markup"] = {"inline_keyboard": [[{"text": "✖️ Cancel",
                                                                          "callback_data": "cancel:9"}]]}
    await board.show(same)
    assert [c.status for c in edits(tg, sid)] == [400]
    await board.show(view(PRIVATE, sid, step=2))  # and the next change goes through
    assert [c.status for c in edits(tg, sid)] == [400, 200]

    tg.fail_next("editMessageText", retry_after=1)
    await board.show(view(PRIVATE, sid, step=3))  # 429: dropped, not retried in a loop
    t429 = edits(tg, sid)[-1].at
    await board.show(view(PRIVATE, sid, step=4))  # waits out retry_after before editing again
    assert [c.status for c in edits(tg, sid)] == [400, 200, 429]
    await tg.wait_for(lambda: len(edits(tg, sid)) == 4)
    assert edits(tg, sid)[-1].at - t429 >= 0.95 and edits(tg, sid)[-1].status == 200
    assert len(tg.calls_of("sendMessage")) == 1  # only the status message itself, ever
    await board.close()


async def test_a_vanished_status_message_is_left_alone(env: tuple[FakeTelegram, Bot]) -> None:
    tg, bot = env
    board = StatusBoard(bot, TelegramSettings(status_interval_group_seconds=0.0))
    sid = await status_message(tg, bot, GROUP)
    del tg.messages[(GROUP, sid)]  # deleted by a group admin
    await board.show(view(GROUP, sid, step=1))
    await board.show(view(GROUP, sid, step=2))
    await board.finish(view(GROUP, sid, state="failed", step=2))
    assert [c.status for c in edits(tg, sid)] == [400]  # tried once, then never again
    assert len(tg.calls_of("sendMessage")) == 1
    await board.close()
