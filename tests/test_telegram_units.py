"""Telegram adapter pieces that need no server: callback data, raw-text parsing, token redaction."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from telegram import Chat, InlineKeyboardMarkup, Message, MessageEntity, User

from bots.telegram.keyboards import (
    decode,
    encode,
    forget_keyboard,
    job_id_of,
    result_keyboard,
    status_keyboard,
)
from bots.telegram.parsing import addressed_bot, command_args, split_job_arg, user_key
from turbobot import logs as redact


def _msg(text: str | None = None, caption: str | None = None, markup: InlineKeyboardMarkup | None = None) -> Message:
    import datetime as dt

    body = text if text is not None else caption
    entities = None
    if body and body.startswith("/"):
        entities = (MessageEntity(MessageEntity.BOT_COMMAND, 0, len(body.split(maxsplit=1)[0])),)
    return Message(
        message_id=1,
        date=dt.datetime.now(dt.UTC),
        chat=Chat(5, Chat.PRIVATE),
        from_user=User(5, "Ann", False),
        text=text,
        caption=caption,
        entities=entities if text is not None else None,
        caption_entities=entities if caption is not None else None,
        reply_markup=markup,
    )


def test_callback_data_round_trips_and_fits_64_bytes() -> None:
    biggest = 2**63 - 1
    for markup in (result_keyboard(biggest), status_keyboard(biggest), forget_keyboard(biggest)):
        for row in markup.inline_keyboard:
            for button in row:
                assert isinstance(button.callback_data, str)
                assert len(button.callback_data.encode()) <= 64
                parsed = decode(button.callback_data)
                assert parsed is not None and parsed.id == biggest
    assert decode(encode("retry", 12)) == decode("retry:12")
    assert decode("retry:12").action == "retry"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["", "retry", "retry:", "retry:abc", "drop:1", "retry:1:2", "remix:-1", "x" * 70])
def test_crafted_callback_data_is_refused(bad: str) -> None:
    assert decode(bad) is None


def test_job_id_of_reads_buttons_then_text() -> None:
    assert job_id_of(_msg(caption="whatever", markup=result_keyboard(77))) == 77
    assert job_id_of(_msg(text="Queued · job #31 · seed 4")) == 31
    assert job_id_of(_msg(text="Job #9 · seed 1\nRemix of job #3")) == 9
    assert job_id_of(_msg(text="no reference here")) is None
    assert job_id_of(None) is None


def test_command_args_keeps_newlines_and_spacing() -> None:
    assert command_args(_msg("/t2v a fox\n  in snow --seed 3")) == " a fox\n  in snow --seed 3"
    assert command_args(_msg("/t2v@turbo_bot two  spaces")) == " two  spaces"
    assert command_args(_msg(caption="/i2v make it move")) == " make it move"
    assert command_args(_msg("/t2v")) == ""
    assert addressed_bot("/i2v@Other_bot hi") == "Other_bot"
    assert addressed_bot("/i2v hi") is None


def test_split_job_arg_and_user_keys() -> None:
    assert split_job_arg("#12 a new prompt --steps 2") == (12, " a new prompt --steps 2")
    assert split_job_arg(" 7") == (7, "")
    assert split_job_arg("3cats") is None
    assert split_job_arg("a cat") is None
    assert user_key("12345") == "telegram:12345"
    assert user_key("discord:42") == "discord:42"
    assert user_key("two words") is None


def test_redaction_covers_messages_args_exceptions_and_quoted_forms(caplog: pytest.LogCaptureFixture) -> None:
    token = "987654:unit-test-SECRET_token"
    redact.protect_secret(token)
    log = logging.getLogger("some.library")
    caplog.set_level(logging.DEBUG)
    log.debug("GET https://api.example/bot%s/getMe", token)
    log.info("quoted form %s", "bot987654%3Aunit-test-SECRET_token")
    try:
        raise RuntimeError(f"failed calling https://x/bot{token}/sendVideo")
    except RuntimeError:
        log.exception("upload failed")
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert token not in text and "987654%3Aunit-test-SECRET_token" not in text
    assert text.count(redact.REDACTED) >= 3
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING


async def test_rejected_token_is_not_echoed_and_unreachable_api_waits_for_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, unused_tcp_port: int
) -> None:
    from fakes.telegram_server import FakeTelegram
    from telegram.error import InvalidToken

    from bots.telegram import run_telegram
    from turbobot.config import settings_from_dict

    wrong = "1234567:WRONG_token_that_must_not_be_printed_0000"
    caplog.set_level(logging.DEBUG)
    async with FakeTelegram("7654321:the-right-token_xxxxxxxxxxxxxxxxxxxxxxxx") as tg:
        settings = settings_from_dict({"telegram": {"base_url": tg.base_url, "base_file_url": tg.base_file_url}})
        with pytest.raises(InvalidToken) as err:
            await run_telegram(settings, None, wrong, asyncio.Event())  # type: ignore[arg-type]  # fails first
    assert wrong not in str(err.value) and "TELEGRAM_TOKEN" in str(err.value)
    assert wrong not in caplog.text

    # Nothing listens here: start-up keeps retrying (no crash) until told to stop.
    down = f"http://127.0.0.1:{unused_tcp_port}/bot"
    settings = settings_from_dict({"telegram": {"base_url": down, "base_file_url": down}})
    stop, retrying = asyncio.Event(), asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "not reachable" in record.getMessage():
                retrying.set()

    seen = Seen()
    logging.getLogger("bots.telegram").addHandler(seen)
    try:
        task = asyncio.create_task(run_telegram(settings, None, wrong, stop))  # type: ignore[arg-type]
        await asyncio.wait_for(retrying.wait(), 10)
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        logging.getLogger("bots.telegram").removeHandler(seen)
    assert wrong not in caplog.text
