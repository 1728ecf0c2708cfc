"""State shared by the Telegram handlers: settings, scheduler, bot, status board, and the event sink.

A new job always gets its status message first (a reply to the command), then is submitted with that
message id in its delivery target: events of a fast job can then never race ahead of the message they
edit, and a job finishing after a restart still finds its status message and the command to reply to.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import logging
from collections.abc import Awaitable, Callable

from telegram import Bot, Message, ReplyParameters, User
from telegram.constants import ParseMode
from telegram.error import TelegramError

from bots.previews import read_preview
from bots.telegram.delivery import deliver_result
from bots.telegram.status import StatusBoard
from bots.texts import refusal_text
from generator.scheduler.api import (
    DeliverLater,
    DeliveryTarget,
    JobEvent,
    JobView,
    Refusal,
    Requester,
    SchedulerAPI,
    SubmitResult,
)
from turbobot.config import Settings

log = logging.getLogger(__name__)

PLATFORM = "telegram"
SUBMITTING = "⏳ Submitting…"
INTERNAL_ERROR = "Sorry, something went wrong on my side. Please try again in a moment."

Submit = Callable[[DeliveryTarget], Awaitable[SubmitResult]]


def requester_of(user: User) -> Requester:
    return Requester(PLATFORM, str(user.id), user.full_name or user.username or "")


def mention(user: User) -> str:
    return f'<a href="tg://user?id={user.id}">{html.escape(user.first_name or "you")}</a>'


def refusal_html(refusal: Refusal) -> str:
    return "⚠️ " + html.escape(refusal_text(refusal))


class TelegramFront:
    def __init__(self, settings: Settings, scheduler: SchedulerAPI) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self._bot: Bot | None = None
        self._board: StatusBoard | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    # --- lifecycle ------------------------------------------------------------------------------
    def attach(self, bot: Bot) -> None:
        self._bot = bot
        reader = functools.partial(read_preview, self.settings) if self.settings.scheduler.previews else None
        self._board = StatusBoard(bot, self.settings.telegram, read_preview=reader)

    @property
    def bot(self) -> Bot:
        assert self._bot is not None, "attach() first"
        return self._bot

    @property
    def board(self) -> StatusBoard:
        assert self._board is not None, "attach() first"
        return self._board

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._board is not None:
            await self._board.close()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- replies --------------------------------------------------------------------------------
    async def reply(self, chat_id: int, reply_to: int | None, text_html: str, **kwargs: object) -> Message:
        params = ReplyParameters(reply_to, allow_sending_without_reply=True) if reply_to else None
        return await self.bot.send_message(
            chat_id, text_html, parse_mode=ParseMode.HTML, reply_parameters=params, **kwargs  # type: ignore[arg-type]
        )

    async def _set_status(self, status: Message, text_html: str) -> None:
        try:
            await self.bot.edit_message_text(
                text_html, chat_id=status.chat_id, message_id=status.message_id, parse_mode=ParseMode.HTML
            )
        except TelegramError as exc:  # never answered with a new message
            log.info("could not edit status message %s: %s", status.message_id, exc)

    # --- submitting -----------------------------------------------------------------------------
    async def start_job(self, chat_id: int, reply_to: int, submit: Submit) -> JobView | None:
        """Send the status message, submit, and show the job's state (or the refusal) in that message."""
        status = await self.reply(chat_id, reply_to, SUBMITTING)
        target = DeliveryTarget(
            platform=PLATFORM,
            chat_id=str(chat_id),
            status_message_id=str(status.message_id),
            reply_to_message_id=str(reply_to),
        )
        try:
            result = await submit(target)
        except Refusal as refusal:
            await self._set_status(status, refusal_html(refusal))
            return None
        except Exception:
            log.exception("submitting a job from chat %s failed", chat_id)
            await self._set_status(status, INTERNAL_ERROR)
            return None
        if result.duplicate:
            # The same command (same message id) was handled before and has its own status message.
            with contextlib.suppress(TelegramError):
                await self.bot.delete_message(chat_id, status.message_id)
            return result.job
        await self.board.show(result.job)
        return result.job

    # --- scheduler events -----------------------------------------------------------------------
    async def on_event(self, event: JobEvent) -> None:
        """The scheduler's sink for Telegram jobs. Returning = delivered; raising = offer again later."""
        job = event.job
        if self.closed:
            if not event.terminal:
                return  # a status update nobody will see: nothing to retry
            raise DeliverLater("the Telegram front end is stopped")
        if not event.terminal:
            # Status edits may wait on flood limits: never hold the scheduler up for them.
            self._spawn(self.board.show(job))
            return
        if event.kind == "succeeded":
            await deliver_result(self.bot, self.settings, job)
        await self.board.finish(job)
