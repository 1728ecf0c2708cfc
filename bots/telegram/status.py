"""The one status message per job, edited in place within Telegram's flood limits.

Edits of one message are spaced by the configured interval (longer in groups); events that arrive in
between are coalesced so only the latest state is shown. A failed edit is never answered with a new message
and never retried in a loop: "message is not modified" is ignored, a 429 pushes the next edit back, a
vanished message stops further edits.

Live previews: Telegram cannot turn a text message into a media one, so a job's preview is its own message,
an animation (the GIF as ``sendAnimation``, which Telegram plays as a silent loop) sent as a reply to the status
message at the first preview and then swapped in place with ``editMessageMedia``; it is deleted when the job
ends (the video follows). It is updated in the same throttled flush as the status text, so a flush makes at
most two calls: within ~1 message/s per chat in private chats (3 s interval) and 20/min in groups (12 s).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from telegram import Bot, InlineKeyboardMarkup, InputFile, InputMediaAnimation, ReplyParameters
from telegram.constants import ParseMode
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError

from bots.previews import PREVIEW_FILENAME
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
    preview_version: int = 0  # the job's preview version last shown (or given up on)
    preview_message_id: int | None = None  # the animation message showing it
    preview_dead: bool = False  # the preview message cannot be sent or edited: no more previews


class StatusBoard:
    MAX_ENTRIES = 4096

    def __init__(
        self,
        bot: Bot,
        settings: TelegramSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        read_preview: Callable[[str], Awaitable[bytes | None]] | None = None,
    ) -> None:
        self.bot = bot
        self.settings = settings
        self.clock = clock
        self.read_preview = read_preview  # None: previews are not shown
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
        await self._drop_preview(entry)
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
            new_preview = (not final and self.read_preview is not None and bool(job.preview)
                           and job.preview_version > entry.preview_version and not entry.preview_dead)
            if text == entry.last_text and not new_preview:
                return
            entry.last_at = self.clock()
            if text != entry.last_text:
                await self._edit(entry, text, markup)
            if new_preview and not entry.dead:
                await self._show_preview(entry, job)

    async def _show_preview(self, entry: _Entry, job: JobView) -> None:
        assert self.read_preview is not None
        entry.preview_version = job.preview_version  # shown or given up on: never retried in a loop
        data = await self.read_preview(job.preview)
        if data is None:
            return  # replaced or gone meanwhile; the next one will do
        try:
            if entry.preview_message_id is None:
                msg = await self.bot.send_animation(
                    entry.chat_id, InputFile(data, filename=PREVIEW_FILENAME), caption=f"Preview of job #{job.id} (rough, updates while it renders)",
                    disable_notification=True,
                    reply_parameters=ReplyParameters(entry.message_id, allow_sending_without_reply=True),
                )
                entry.preview_message_id = msg.message_id
            else:
                # Raw bytes (not the InputFile above): PTB then uploads them as an attach:// part, as the API wants.
                await self.bot.edit_message_media(
                    InputMediaAnimation(data, filename=PREVIEW_FILENAME,
                                        caption=f"Preview of job #{job.id} (rough, updates while it renders)"),
                    chat_id=entry.chat_id, message_id=entry.preview_message_id,
                )
        except BadRequest as exc:
            if "not modified" in exc.message.lower():
                return
            log.info("preview of job %s in chat %s stopped (%s)", job.id, entry.chat_id, exc.message)
            entry.preview_dead = True
        except Forbidden as exc:
            log.warning("no longer allowed in chat %s (%s)", entry.chat_id, exc.message)
            entry.dead = entry.preview_dead = True
        except RetryAfter as exc:
            entry.last_at = self.clock() + retry_after_seconds(exc)
            log.info("preview in chat %s throttled by Telegram", entry.chat_id)
        except (NetworkError, TelegramError) as exc:
            log.info("preview in chat %s failed (%s); the next one will try again", entry.chat_id, exc)

    async def _drop_preview(self, entry: _Entry) -> None:
        """The job ended: its preview message goes (the result, or the reason it failed, is what stays)."""
        mid, entry.preview_message_id = entry.preview_message_id, None
        entry.preview_dead = True
        if mid is None:
            return
        try:
            await self.bot.delete_message(entry.chat_id, mid)
        except TelegramError as exc:  # e.g. already deleted by a user: nothing to do
            log.info("preview message %s in chat %s not deleted (%s)", mid, entry.chat_id, exc)

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
