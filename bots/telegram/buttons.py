"""Inline button presses. The callback query is answered first (the button stops spinning), then the work
is done; problems are told in the chat, since the query has been answered already."""

from __future__ import annotations

import contextlib
import html
import logging

from telegram import CallbackQuery, ForceReply, Message, Update, User
from telegram.constants import ParseMode
from telegram.error import TelegramError
from telegram.ext import ContextTypes

from bots.telegram.front import TelegramFront, mention, refusal_html, requester_of
from bots.telegram.keyboards import ButtonData, decode
from bots.texts import params_text
from generator.scheduler.api import Refusal

log = logging.getLogger(__name__)

STALE = "This button is no longer valid."
NOT_YOURS = "This button is for the person who asked."


def remix_prompt_text(job_id: int, seed: int, who_html: str) -> str:
    # handlers.REMIX_ASK_RE recognises replies to this message by "Remix of job #N".
    return (
        f"✏️ {who_html}: Remix of job #{job_id} (same seed {seed}). Reply to this message with the new prompt, "
        "and add --flags to change settings (e.g. <code>--steps 2 --ar 9:16</code>)."
    )


class Buttons:
    def __init__(self, front: TelegramFront) -> None:
        self.front = front

    async def on_press(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        data = decode(query.data if isinstance(query.data, str) else None)
        message = query.message if isinstance(query.message, Message) else None
        if data is None or message is None:
            await self._ack(query, STALE)
            return
        if data.action in ("forget", "keep") and data.id != query.from_user.id:
            await self._ack(query, NOT_YOURS, alert=True)
            return
        await self._ack(query)
        try:
            await getattr(self, f"_{data.action}")(query, message, data)
        except Refusal as refusal:
            await self._tell(message, query.from_user, refusal_html(refusal))

    @staticmethod
    async def _ack(query: CallbackQuery, text: str | None = None, *, alert: bool = False) -> None:
        try:
            await query.answer(text, show_alert=alert)
        except TelegramError as exc:  # too old (e.g. pressed while the bot was down): carry on
            log.info("callback query %s not answered: %s", query.id, exc)

    async def _tell(self, message: Message, user: User, text_html: str) -> None:
        await self.front.reply(message.chat_id, message.message_id, f"{mention(user)}: {text_html}")

    # --- job buttons ----------------------------------------------------------------------------
    async def _retry(self, query: CallbackQuery, message: Message, data: ButtonData) -> None:
        requester = requester_of(query.from_user)
        key = f"telegram:cb:{query.id}"
        scheduler = self.front.scheduler
        await self.front.start_job(
            message.chat_id,
            message.message_id,
            lambda target: scheduler.jobs.remix(data.id, requester, target, key, new_seed=True),
        )

    async def _extend(self, query: CallbackQuery, message: Message, data: ButtonData) -> None:
        requester = requester_of(query.from_user)
        key = f"telegram:cb:{query.id}"
        scheduler = self.front.scheduler
        await self.front.start_job(
            message.chat_id, message.message_id, lambda target: scheduler.jobs.extend(data.id, requester, target, key)
        )

    async def _remix(self, query: CallbackQuery, message: Message, data: ButtonData) -> None:
        job = await self.front.scheduler.views.get(data.id)
        if job is None:
            await self._tell(message, query.from_user, f"job #{data.id} no longer exists.")
            return
        await self.front.reply(
            message.chat_id,
            message.message_id,
            remix_prompt_text(job.id, job.seed, mention(query.from_user)),
            reply_markup=ForceReply(selective=True, input_field_placeholder="new prompt --flags"),
        )

    async def _params(self, query: CallbackQuery, message: Message, data: ButtonData) -> None:
        job = await self.front.scheduler.views.get(data.id)
        if job is None:
            await self._tell(message, query.from_user, f"job #{data.id} no longer exists.")
            return
        await self.front.reply(message.chat_id, message.message_id, params_text(job, "telegram"))

    async def _delete(self, query: CallbackQuery, message: Message, data: ButtonData) -> None:
        await self.front.scheduler.admin.delete(data.id, requester_of(query.from_user))
        try:
            await message.delete()
        except TelegramError:
            # Too old to delete (48 h): at least drop the buttons and say so.
            with contextlib.suppress(TelegramError):
                await message.edit_caption(f"Job #{data.id} was deleted.", parse_mode=ParseMode.HTML)

    async def _cancel(self, query: CallbackQuery, message: Message, data: ButtonData) -> None:
        # The status message itself shows the outcome when the scheduler reports the cancellation.
        await self.front.scheduler.admin.cancel(data.id, requester_of(query.from_user))

    # --- /forget confirmation -------------------------------------------------------------------
    async def _forget(self, query: CallbackQuery, message: Message, data: ButtonData) -> None:
        count = await self.front.scheduler.admin.forget(requester_of(query.from_user))
        await self._edit(message, f"Done: deleted {count} job(s) with their videos and images.")

    async def _keep(self, query: CallbackQuery, message: Message, data: ButtonData) -> None:
        await self._edit(message, "Nothing was deleted.")

    async def _edit(self, message: Message, text: str) -> None:
        try:
            await message.edit_text(html.escape(text), parse_mode=ParseMode.HTML)
        except TelegramError as exc:
            log.info("could not edit message %s: %s", message.message_id, exc)
