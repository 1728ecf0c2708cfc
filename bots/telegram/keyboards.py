"""Inline buttons. A button carries only ``action:id`` (well under Telegram's 64-byte callback_data limit);
everything else is read from the database when it is pressed, so buttons keep working after a restart."""

from __future__ import annotations

import re
from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Message

# Actions on a job, and the /forget confirmation (whose id is the Telegram user id it belongs to).
JOB_ACTIONS = ("retry", "remix", "extend", "params", "delete", "cancel")
FORGET_ACTIONS = ("forget", "keep")
_DATA_RE = re.compile(r"^(?P<action>[a-z]+):(?P<id>\d{1,19})$")
MAX_CALLBACK_BYTES = 64


@dataclass(frozen=True)
class ButtonData:
    action: str
    id: int


def encode(action: str, ident: int) -> str:
    data = f"{action}:{ident}"
    assert len(data.encode()) <= MAX_CALLBACK_BYTES
    return data


def decode(data: str | None) -> ButtonData | None:
    """Parse callback data; None for anything we did not make (crafted or stale payloads)."""
    if not data:
        return None
    m = _DATA_RE.match(data)
    if m is None or m["action"] not in JOB_ACTIONS + FORGET_ACTIONS:
        return None
    return ButtonData(m["action"], int(m["id"]))


def result_keyboard(job_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton("🔁 Retry", callback_data=encode("retry", job_id)),
                InlineKeyboardButton("✏️ Remix", callback_data=encode("remix", job_id)),
                InlineKeyboardButton("⏩ Extend", callback_data=encode("extend", job_id)),
            ],
            [
                InlineKeyboardButton("ℹ️ Params", callback_data=encode("params", job_id)),
                InlineKeyboardButton("🗑 Delete", callback_data=encode("delete", job_id)),
            ],
        ]
    )


def status_keyboard(job_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton("✖️ Cancel", callback_data=encode("cancel", job_id))]])


def forget_keyboard(user_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton("Yes, delete all my data", callback_data=encode("forget", user_id)),
                InlineKeyboardButton("Keep it", callback_data=encode("keep", user_id)),
            ]
        ]
    )


_JOB_REF_RE = re.compile(r"[Jj]ob #(\d{1,19})")


def job_id_of(message: Message | None) -> int | None:
    """The job a bot message (result, status, params) is about: from its buttons, else its text."""
    if message is None:
        return None
    markup = message.reply_markup
    if markup is not None:
        for row in markup.inline_keyboard:
            for button in row:
                data = decode(button.callback_data if isinstance(button.callback_data, str) else None)
                if data is not None and data.action in JOB_ACTIONS:
                    return data.id
    m = _JOB_REF_RE.search(message.text or message.caption or "")
    return int(m.group(1)) if m else None
