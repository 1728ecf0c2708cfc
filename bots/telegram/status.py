"""The one status message per job, edited in place within Telegram's flood limits.

Edits of one message are spaced by the configured interval (longer in groups); events that arrive in
between are coalesced so only the latest state is shown. A failed edit is never answered with a new message
and never retried in a loop: "message is not modified" is ignored, a 429 pushes the next edit back, a
vanished message stops further edits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from telegram import Bot, InlineKeyboardMarkup
from telegram.constants import ParseMode
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError

from bots.telegram.keyboards import status_keyboard
from bots.texts import status_text
from generator.scheduler.api import JobView
from turbobot.config import TelegramSettings

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")


def is_group(chat_id: int) -> bool:
    # Bot API ids: users (private chats) are positive, groups and channels negative.
    return chat_id < 0


def retry_after_seconds(exc: RetryAfter) -> float:
    value = exc.retry_after
    return value.total_seconds() if hasattr(value, "total_seconds") else float(value)


@dataclass
class _Entry:
    chat_id: int
    message_id: int
    interval: float
    last_text: str = ""
    last_at: float = float("-inf")
    latest: JobView | None = None
    pending: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dead: bool = False  # the message is gone or not editable: stop touching it
    finished: bool = False


class StatusBoard:
    MAX_ENTRIES = 4096

    def __init__(
        self,
        bot: Bot,
        settings: TelegramSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bot = bot
        self.settings = settings
        self.clock = clock
        self._entries: dict[int, _Entry] = {}

    def interval_for(self, chat_id: int) -> float:
        s = self.settings
        return s.status_interval_group_seconds if is_group(chat_id) else s.status_interval_private_seconds

    def _entry(self, job: JobView) -> _Entry | None:
        entry = self._entries.get(job.id)
        if entry is not None:
            return entry
        t = job.target
        if not (t.chat_id and t.status_message_id):
            return None
        try:
            chat_id, message_id = int(t.chat_id), int(t.status_message_id)
        except ValueError:
            return None
        entry = _Entry(chat_id, message_id, self.interval_for(chat_id))
        self._entries[job.id] = entry
        return entry

    async def show(self, job: JobView) -> None:
        """Show a queued/running job's state: now if the interval has passed, else once it has."""
        entry = self._entry(job)
        if entry is None or entry.dead or entry.finished:
            return
        entry.latest = job
        if entry.pending is not None:
            return  # the scheduled edit will show the latest state
        wait = entry.last_at + entry.interval - self.clock()
        if wait <= 0:
            await self._flush(entry, final=False)
        else:
            entry.pending = asyncio.create_task(self._later(entry, wait))

    async def _later(self, entry: _Entry, wait: float) -> None:
        try:
            await asyncio.sleep(wait)
        finally:
            entry.pending = None
        await self._flush(entry, final=False)

    async def finish(self, job: JobView) -> None:
        """Show a terminal state (no buttons) right away and forget the job."""
        entry = self._entry(job)
        if entry is None:
            return
        entry.finished = True
        entry.latest = job
        if entry.pending is not None:
            entry.pending.cancel()
            entry.pending = None
        await self._flush(entry, final=True)
        self._prune()

    def _prune(self) -> None:
        # Finished entries stay as tombstones so a late, stale snapshot cannot revive the message;
        # drop the oldest once there are many.
        if len(self._entries) <= self.MAX_ENTRIES:
            return
        for job_id in [j for j, e in self._entries.items() if e.finished][: len(self._entries) // 2]:
            del self._entries[job_id]

    async def _flush(self, entry: _Entry, *, final: bool) -> None:
        async with entry.lock:  # edits of one message never overlap or reorder
            job = entry.latest
            if job is None or entry.dead or (entry.finished and not final):
                return
            text = status_text(job, "telegram")
            markup = status_keyboard(job.id) if job.state in ACTIVE_STATES else None
            if text == entry.last_text:
                return
            entry.last_at = self.clock()
            await self._edit(entry, text, markup)

    async def _edit(self, entry: _Entry, text: str, markup: InlineKeyboardMarkup | None) -> None:
        try:
            await self.bot.edit_message_text(
                text,
                chat_id=entry.chat_id,
                message_id=entry.message_id,
                parse_mode=ParseMode.HTML,
                reply_markup=markup,
            )
            entry.last_text = text
        except BadRequest as exc:
            if "not modified" in exc.message.lower():
                entry.last_text = text
                return
            log.warning("status message %s in chat %s cannot be edited (%s); leaving it",
                        entry.message_id, entry.chat_id, exc.message)
            entry.dead = True
        except Forbidden as exc:
            log.warning("no longer allowed in chat %s (%s)", entry.chat_id, exc.message)
            entry.dead = True
        except RetryAfter as exc:
            # The rate limiter already waited and retried; show nothing more until the ban is over.
            entry.last_at = self.clock() + retry_after_seconds(exc)
            log.info("status edit in chat %s throttled by Telegram", entry.chat_id)
        except (NetworkError, TelegramError) as exc:
            log.info("status edit in chat %s failed (%s); the next update will try again", entry.chat_id, exc)

    async def close(self) -> None:
        for entry in self._entries.values():
            if entry.pending is not None:
                entry.pending.cancel()
        self._entries.clear()
