"""Building the PTB application and running it inside the caller's event loop (no ``run_polling``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import urllib.parse

from telegram import BotCommand, Update
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    MessageHandler,
    filters,
)

from bots.telegram.buttons import Buttons
from bots.telegram.front import TelegramFront
from bots.telegram.handlers import I2V_CAPTION_RE, Handlers
from generator.scheduler.api import SchedulerAPI
from turbobot.config import Settings
from turbobot.logs import protect_secret

log = logging.getLogger(__name__)

ALLOWED_UPDATES = [Update.MESSAGE, Update.CALLBACK_QUERY]
COMMANDS = [
    BotCommand("t2v", "text to video: /t2v a fox running through snow"),
    BotCommand("i2v", "animate an image (caption or reply)"),
    BotCommand("remix", "same seed, new prompt or settings"),
    BotCommand("extend", "continue a video from its last frame"),
    BotCommand("loras", "the style LoRAs on offer"),
    BotCommand("queue", "your place in the queue and your quota"),
    BotCommand("jobs", "your recent jobs"),
    BotCommand("cancel", "cancel your job"),
    BotCommand("forget", "delete all your data"),
    BotCommand("help", "how to use this bot"),
]
# Only new messages: CommandHandler also fires on edited messages, which would enqueue a job twice.
NEW = filters.UpdateType.MESSAGE


def build_application(settings: Settings, token: str) -> Application:
    tg = settings.telegram
    return (
        ApplicationBuilder()
        .token(token)
        .base_url(tg.base_url)
        .base_file_url(tg.base_file_url)
        # Flood limits: ~30 msg/s overall, 20/min per group; a 429 waits retry_after, then retries twice.
        .rate_limiter(AIORateLimiter(max_retries=2))
        .concurrent_updates(True)
        .job_queue(None)
        .media_write_timeout(300.0)
        .build()
    )


def register(app: Application, front: TelegramFront) -> None:
    h = Handlers(front)
    commands = {
        "t2v": h.t2v,
        "i2v": h.i2v,
        "remix": h.remix,
        "extend": h.extend,
        "loras": h.loras,
        "queue": h.queue,
        "jobs": h.jobs,
        "cancel": h.cancel,
        "forget": h.forget,
        "help": h.help,
        "start": h.help,
        "limits": h.limits,
        "block": h.block,
        "unblock": h.unblock,
        "settings": h.community_settings,
    }
    for name, callback in commands.items():
        app.add_handler(CommandHandler(name, callback, filters=NEW))
    # A command in a caption is not a command to CommandHandler: photos and files with "/i2v ..." captions.
    app.add_handler(
        MessageHandler(
            NEW & (filters.PHOTO | filters.Document.ALL) & filters.CaptionRegex(I2V_CAPTION_RE), h.i2v_caption
        )
    )
    app.add_handler(MessageHandler(NEW & filters.REPLY & filters.TEXT & ~filters.COMMAND, h.remix_reply))
    app.add_handler(CallbackQueryHandler(Buttons(front).on_press))
    app.add_error_handler(h.on_error)


async def _initialize(app: Application, settings: Settings, stop: asyncio.Event) -> bool:
    """``initialize`` (getMe), retried with backoff while Telegram is unreachable; False if stopped first."""
    delay = 1.0
    while not stop.is_set():
        try:
            await app.initialize()
            return True
        except InvalidToken:
            # PTB's own message quotes the token; whoever prints this error must not see it.
            raise InvalidToken(
                f"Telegram rejected the bot token (check ${settings.telegram.token_env} and telegram.base_url)."
            ) from None
        except NetworkError as exc:
            log.warning("Telegram is not reachable (%s); retrying in %.0f s", exc, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 60.0)
    return False


async def _start_updates(app: Application, settings: Settings) -> None:
    tg = settings.telegram
    assert app.updater is not None
    if tg.mode == "webhook":
        if not tg.webhook_url:
            raise ValueError("telegram.mode = 'webhook' needs telegram.webhook_url (the public HTTPS URL).")
        secret = secrets.token_urlsafe(32)  # Telegram echoes it in a header; PTB rejects requests without it
        protect_secret(secret)
        await app.updater.start_webhook(
            listen=tg.webhook_listen,
            port=tg.webhook_port,
            url_path=urllib.parse.urlsplit(tg.webhook_url).path.lstrip("/"),
            webhook_url=tg.webhook_url,
            secret_token=secret,
            allowed_updates=ALLOWED_UPDATES,
        )
    else:
        await app.updater.start_polling(poll_interval=0.0, timeout=10, allowed_updates=ALLOWED_UPDATES)


async def run_telegram(settings: Settings, scheduler: SchedulerAPI, token: str, stop: asyncio.Event) -> None:
    """Run the Telegram bot until ``stop`` is set, in the caller's event loop."""
    protect_secret(token)
    app = build_application(settings, token)
    front = TelegramFront(settings, scheduler)
    register(app, front)
    if not await _initialize(app, settings, stop):
        return
    try:
        front.attach(app.bot)
        try:
            await app.bot.set_my_commands(COMMANDS)
        except TelegramError as exc:
            log.warning("could not set the command list: %s", exc)
        scheduler.subscribe("telegram", front.on_event)
        await app.start()
        await _start_updates(app, settings)
        log.info("Telegram bot @%s is running (%s)", app.bot.username, settings.telegram.mode)
        await stop.wait()
    finally:
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()
        await front.close()
        await app.shutdown()
