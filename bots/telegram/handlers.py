"""Command and message handlers. Each one parses, calls the shared command layer or the scheduler, replies
once and returns; rendering happens elsewhere (handlers run concurrently, ``concurrent_updates``)."""

from __future__ import annotations

import html
import logging
import re
from typing import Any

from telegram import Message, Update
from telegram.error import TelegramError
from telegram.ext import ContextTypes

from bots.commands import build_request, parse_remix, submit_text
from bots.community import parse_text as parse_settings_text
from bots.community import settings_text
from bots.flags import parse_flags
from bots.images import ImageRejected
from bots.telegram import media
from bots.telegram.front import INTERNAL_ERROR, TelegramFront, mention, refusal_html, requester_of
from bots.telegram.keyboards import forget_keyboard, job_id_of
from bots.telegram.parsing import addressed_bot, command_args, split_job_arg, user_key
from bots.texts import help_text, jobs_text, loras_text, queue_text
from generator.request import RequestError
from generator.scheduler.api import Refusal
from turbobot.config import Settings

log = logging.getLogger(__name__)

Context = ContextTypes.DEFAULT_TYPE

I2V_CAPTION_RE = re.compile(r"^/i2v(?:@\w+)?(?:\s|$)", re.I)
REMIX_ASK_RE = re.compile(r"Remix of job #(\d{1,19})")

USAGE_T2V = "Describe the video after the command, e.g. <code>/t2v a red fox running through snow at dusk</code>"
USAGE_I2V = (
    "Send a photo (or an image file) with <code>/i2v your prompt</code> as its caption, "
    "or reply to an image with <code>/i2v your prompt</code>."
)
USAGE_REMIX = (
    "Use <code>/remix &lt;job&gt; [new prompt] [--flags]</code>, or reply to one of my videos with "
    "<code>/remix [new prompt] [--flags]</code>."
)
USAGE_EXTEND = (
    "Use <code>/extend &lt;job&gt; [prompt]</code>, or reply to one of my videos with <code>/extend [prompt]</code>: "
    "the video continues from its last frame."
)
USAGE_CANCEL = "Use <code>/cancel</code> (your latest job), <code>/cancel &lt;job&gt;</code>, or reply to a status message."
OWNER_ONLY = "Only the bot owner can use this command."
LIMIT_FIELDS: dict[str, type] = {"max_queued": int, "daily_jobs": int, "daily_gpu_seconds": float}


class Handlers:
    def __init__(self, front: TelegramFront) -> None:
        self.front = front

    @property
    def settings(self) -> Settings:
        return self.front.settings

    # --- helpers --------------------------------------------------------------------------------
    async def _answer(self, message: Message, text_html: str, **kwargs: Any) -> None:
        await self.front.reply(message.chat_id, message.message_id, text_html, **kwargs)

    @staticmethod
    def _key(message: Message) -> str:
        # One job per command message, however often Telegram (or a restart) delivers it.
        return f"telegram:{message.chat_id}:{message.message_id}"

    def _is_bot_message(self, message: Message | None) -> bool:
        return bool(message and message.from_user and message.from_user.id == self.front.bot.id)

    # --- /t2v -----------------------------------------------------------------------------------
    async def t2v(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or update.effective_user is None:
            return
        text = command_args(message)
        if not text.strip():
            await self._answer(message, USAGE_T2V)
            return
        try:
            build_request(self.settings, "t2v", text)  # refuse bad flags before any status message
        except RequestError as exc:
            await self._answer(message, "⚠️ " + html.escape(exc.message))
            return
        requester = requester_of(update.effective_user)
        key = self._key(message)
        await self.front.start_job(
            message.chat_id,
            message.message_id,
            lambda target: submit_text(
                self.front.scheduler, self.settings, requester, target, key, "t2v", text
            ),
        )

    # --- /i2v (command replying to an image, or the caption of one) -----------------------------
    async def i2v_caption(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or not I2V_CAPTION_RE.match(message.caption or ""):
            return
        bot_name = addressed_bot(message.caption or "")
        if bot_name and bot_name.lower() != (context.bot.username or "").lower():
            return  # /i2v@another_bot
        await self._i2v(update, message)

    async def i2v(self, update: Update, context: Context) -> None:
        if update.message is not None:
            await self._i2v(update, update.message)

    async def _i2v(self, update: Update, message: Message) -> None:
        user = update.effective_user
        if user is None:
            return
        ref = media.find_image(message) or media.find_image(message.reply_to_message)
        if ref is None:
            await self._answer(message, USAGE_I2V)
            return
        text = command_args(message)
        try:
            parse_flags(text)  # a typo in a flag is reported before the download
            media.precheck(ref, self.settings)
        except RequestError as exc:
            await self._answer(message, "⚠️ " + html.escape(exc.message))
            return
        except ImageRejected as exc:
            await self._answer(message, "⚠️ " + html.escape(exc.message))
            return
        requester = requester_of(user)
        try:
            image = await media.download(self.front.bot, ref, self.settings)
            build_request(self.settings, "i2v", text, image=image.sha256)
        except ImageRejected as exc:
            await self._answer(message, "⚠️ " + html.escape(exc.message))
            return
        except RequestError as exc:
            await self._answer(message, "⚠️ " + html.escape(exc.message))
            return
        try:
            sha = await self.front.scheduler.jobs.save_input(requester, image.png_bytes, image.width, image.height)
        except Refusal as refusal:
            await self._answer(message, refusal_html(refusal))
            return
        key = self._key(message)
        await self.front.start_job(
            message.chat_id,
            message.message_id,
            lambda target: submit_text(
                self.front.scheduler, self.settings, requester, target, key, "i2v", text, image=sha
            ),
        )

    # --- /remix, and replies to the Remix button's question ------------------------------------
    async def remix(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or update.effective_user is None:
            return
        text = command_args(message)
        replied = message.reply_to_message
        parent = job_id_of(replied) if self._is_bot_message(replied) else None
        if parent is None:
            split = split_job_arg(text)
            if split is None:
                await self._answer(message, USAGE_REMIX)
                return
            parent, text = split
        await self._remix(update, message, parent, text)

    async def remix_reply(self, update: Update, context: Context) -> None:
        """A text reply to the bot's "Remix of job #N" question (asked by the Remix button)."""
        message = update.message
        if message is None or not self._is_bot_message(message.reply_to_message):
            return
        assert message.reply_to_message is not None
        m = REMIX_ASK_RE.search(message.reply_to_message.text or "")
        if m is None:
            return  # a reply to some other message of ours: not a request
        await self._remix(update, message, int(m.group(1)), message.text or "")

    async def _remix(self, update: Update, message: Message, parent: int, text: str) -> None:
        assert update.effective_user is not None
        try:
            overrides = parse_remix(text)
        except RequestError as exc:
            await self._answer(message, "⚠️ " + html.escape(exc.message))
            return
        requester = requester_of(update.effective_user)
        key = self._key(message)
        scheduler = self.front.scheduler
        await self.front.start_job(
            message.chat_id,
            message.message_id,
            lambda target: scheduler.jobs.remix(parent, requester, target, key, overrides=overrides),
        )

    # --- /extend JOB [prompt], or as a reply to one of the bot's videos ------------------------------
    async def extend(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or update.effective_user is None:
            return
        text = command_args(message)
        replied = message.reply_to_message
        parent = job_id_of(replied) if self._is_bot_message(replied) else None
        if parent is None:
            split = split_job_arg(text)
            if split is None:
                await self._answer(message, USAGE_EXTEND)
                return
            parent, text = split
        requester = requester_of(update.effective_user)
        key = self._key(message)
        scheduler = self.front.scheduler
        prompt = text.strip() or None
        await self.front.start_job(
            message.chat_id,
            message.message_id,
            lambda target: scheduler.jobs.extend(parent, requester, target, key, prompt=prompt),
        )

    # --- information ----------------------------------------------------------------------------
    async def help(self, update: Update, context: Context) -> None:
        if update.message is not None:
            await self._answer(update.message, help_text("telegram"))

    async def loras(self, update: Update, context: Context) -> None:
        if update.message is not None:
            settings = self.front.settings
            await self._answer(update.message, loras_text(settings.lora_catalog(), settings.request_limits, "telegram"))

    async def queue(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or update.effective_user is None:
            return
        jobs, quota, total = await self.front.scheduler.views.queue_info(requester_of(update.effective_user))
        await self._answer(message, queue_text(jobs, quota, total, "telegram"))

    async def jobs(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or update.effective_user is None:
            return
        jobs = await self.front.scheduler.views.jobs_for(requester_of(update.effective_user), limit=10)
        await self._answer(message, jobs_text(jobs, "telegram"))

    # --- /cancel, /forget -----------------------------------------------------------------------
    async def cancel(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or update.effective_user is None:
            return
        requester = requester_of(update.effective_user)
        scheduler = self.front.scheduler
        arg = command_args(message).strip()
        job_id: int | None = None
        if arg:
            split = split_job_arg(arg)
            if split is None or split[1].strip():
                await self._answer(message, USAGE_CANCEL)
                return
            job_id = split[0]
        elif self._is_bot_message(message.reply_to_message):
            job_id = job_id_of(message.reply_to_message)
        if job_id is None:
            active = await scheduler.views.jobs_for(requester, limit=1, states=("running", "queued"))
            if not active:
                await self._answer(message, "You have no queued or running jobs.")
                return
            job_id = active[0].id
        try:
            job = await scheduler.admin.cancel(job_id, requester)
        except Refusal as refusal:
            await self._answer(message, refusal_html(refusal))
            return
        if job.state == "cancelled":
            await self._answer(message, f"Cancelled job #{job.id}.")
        else:
            await self._answer(message, f"Cancelling job #{job.id}: it stops after the current step.")

    async def forget(self, update: Update, context: Context) -> None:
        message = update.message
        user = update.effective_user
        if message is None or user is None:
            return
        await self._answer(
            message,
            f"{mention(user)}, this deletes all your jobs, videos and images from this bot, for good. Sure?",
            reply_markup=forget_keyboard(user.id),
        )

    # --- owner commands -------------------------------------------------------------------------
    async def _owner_target(self, update: Update, message: Message) -> tuple[str | None, list[str]] | None:
        """(user key, remaining words) for an admin command; None after replying with why not."""
        assert update.effective_user is not None
        if not self.front.scheduler.admin.is_owner(requester_of(update.effective_user)):
            await self._answer(message, OWNER_ONLY)
            return None
        words = command_args(message).split()
        key = user_key(words[0]) if words and "=" not in words[0] else None
        if key is not None:
            return key, words[1:]
        replied = message.reply_to_message
        if replied is not None and replied.from_user is not None and not self._is_bot_message(replied):
            return f"telegram:{replied.from_user.id}", words
        return None, words

    async def limits(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or update.effective_user is None:
            return
        found = await self._owner_target(update, message)
        if found is None:
            return
        key, words = found
        usage = (
            "Use <code>/limits &lt;user id&gt; max_queued=N daily_jobs=N daily_gpu_seconds=S</code> "
            "(or reply to the user's message)."
        )
        values: dict[str, Any] = {}
        for word in words:
            name, _, raw = word.partition("=")
            kind = LIMIT_FIELDS.get(name)
            if kind is None or not raw:
                await self._answer(message, usage)
                return
            try:
                values[name] = kind(raw)
            except ValueError:
                await self._answer(message, f"⚠️ {html.escape(name)} needs a number (got {html.escape(raw)}).")
                return
        if key is None or not values:
            await self._answer(message, usage)
            return
        try:
            await self.front.scheduler.admin.set_limits(requester_of(update.effective_user), key, **values)
        except Refusal as refusal:
            await self._answer(message, refusal_html(refusal))
            return
        shown = ", ".join(f"{k}={v:g}" for k, v in values.items())
        await self._answer(message, f"Limits for <code>{html.escape(key)}</code> set: {html.escape(shown)}.")

    async def block(self, update: Update, context: Context) -> None:
        await self._block(update, block=True)

    async def unblock(self, update: Update, context: Context) -> None:
        await self._block(update, block=False)

    async def _block(self, update: Update, *, block: bool) -> None:
        message = update.message
        if message is None or update.effective_user is None:
            return
        found = await self._owner_target(update, message)
        if found is None:
            return
        key, words = found
        name = "block" if block else "unblock"
        if key is None:
            await self._answer(message, f"Use <code>/{name} &lt;user id&gt;</code> or reply to the user's message.")
            return
        actor = requester_of(update.effective_user)
        try:
            if block:
                await self.front.scheduler.admin.block(actor, key, " ".join(words))
            else:
                await self.front.scheduler.admin.unblock(actor, key)
        except Refusal as refusal:
            await self._answer(message, refusal_html(refusal))
            return
        await self._answer(message, f"<code>{html.escape(key)}</code> {'blocked' if block else 'unblocked'}.")

    # --- errors ---------------------------------------------------------------------------------
    # --- /settings for the group's administrators ----------------------------------------------------
    async def community_settings(self, update: Update, context: Context) -> None:
        message, user = update.message, update.effective_user
        if message is None or user is None:
            return
        if message.chat.type == "private":
            await self._answer(message, "Settings belong to a group: use /settings there (as an administrator).")
            return
        member = await message.chat.get_member(user.id)  # getChatMember: the chat's own word, not a cache
        if member.status not in ("administrator", "creator"):
            await self._answer(message, "Only this group's administrators can change its settings.")
            return
        text = command_args(message)
        community = str(message.chat.id)
        try:
            if text:
                changes = parse_settings_text(text, platform="telegram")
                view = await self.front.scheduler.communities.update(requester_of(user), "telegram", community, changes)
            else:
                view = await self.front.scheduler.communities.get("telegram", community)
        except Refusal as refusal:
            await self._answer(message, html.escape(refusal.message))
            return
        await self._answer(message, html.escape(settings_text(view, "telegram")))

    async def on_error(self, update: object, context: Context) -> None:
        log.error("Telegram update failed", exc_info=context.error)
        if isinstance(context.error, TelegramError):
            return  # replying would likely fail the same way (and must not loop on flood limits)
        if isinstance(update, Update) and update.message is not None:
            try:
                await self._answer(update.message, INTERNAL_ERROR)
            except TelegramError:
                pass
