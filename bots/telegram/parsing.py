"""Reading Telegram messages: the raw text after a command (``context.args`` loses newlines and spacing),
job references, user references for admin commands."""

from __future__ import annotations

import re

from telegram import Message, MessageEntity

_COMMAND_RE = re.compile(r"^/(?P<name>[A-Za-z0-9_]+)(?:@(?P<bot>[A-Za-z0-9_]+))?")
_JOB_ARG_RE = re.compile(r"^\s*#?(?P<id>\d{1,19})(?=\s|$)(?P<rest>.*)$", re.S)
_USER_KEY_RE = re.compile(r"^(?:(?P<platform>[a-z]+):)?(?P<id>[A-Za-z0-9_.-]{1,64})$")


def command_args(message: Message) -> str:
    """Everything after the leading ``/command[@bot]`` of a message's text or caption, verbatim."""
    if message.text is not None:
        text, entities = message.text, message.entities
    else:
        text, entities = message.caption or "", message.caption_entities
    for entity in entities or ():
        if entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
            # Commands are ASCII, so the UTF-16 length Telegram reports equals the str length here.
            return text[entity.length:]
    m = _COMMAND_RE.match(text)
    return text[m.end():] if m else text


def addressed_bot(text: str) -> str | None:
    """The ``@bot`` a ``/command@bot`` names, if any."""
    m = _COMMAND_RE.match(text or "")
    return m["bot"] if m else None


def split_job_arg(text: str) -> tuple[int, str] | None:
    """``"#12 new prompt --steps 2"`` -> (12, " new prompt --steps 2"); None when no job id leads."""
    m = _JOB_ARG_RE.match(text)
    if m is None:
        return None
    return int(m["id"]), m["rest"]


def user_key(arg: str) -> str | None:
    """``12345`` -> ``telegram:12345``; ``discord:42`` stays; None for anything else."""
    m = _USER_KEY_RE.match(arg.strip())
    if m is None:
        return None
    return f"{m['platform'] or 'telegram'}:{m['id']}"
