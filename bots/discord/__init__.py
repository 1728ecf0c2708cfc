"""The Discord front end (discord.py 2.7): slash commands, context menu, persistent buttons, live status.

``run_discord`` is what ``turbobot run`` starts. The REST base and gateway URLs come from config.toml so
the whole product can be driven against a local fake Discord (discord.py has no documented hook for this:
we set ``discord.http.Route.BASE`` and the gateway's default URL, which is why discord.py is pinned 2.7.*).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import discord
import yarl
from discord.gateway import DiscordWebSocket

from generator.scheduler.api import SchedulerAPI
from turbobot.config import Settings
from turbobot.logs import protect_secret

from .bot import TurboBot

__all__ = ["TurboBot", "configure_endpoints", "run_discord"]

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 10.0  # on stop, let interactions being answered store their status message first


def configure_endpoints(settings: Settings) -> None:
    """Point discord.py at the configured REST base and (when set) gateway URL. Process-wide."""
    discord.http.Route.BASE = settings.discord.api_base.rstrip("/")
    if settings.discord.gateway_url:
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord.gateway_url)


async def _discover_gateway(bot: TurboBot) -> None:
    """gateway_url empty: ask the REST API (GET /gateway/bot), as its docs recommend."""
    try:
        _shards, url, _limits = await bot.http.get_bot_gateway()
    except discord.DiscordException as exc:
        log.warning("could not ask for the gateway URL (%s); using %s", exc, DiscordWebSocket.DEFAULT_GATEWAY)
        return
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)


async def run_discord(settings: Settings, scheduler: SchedulerAPI, token: str, stop: asyncio.Event) -> None:
    """Run the bot until ``stop`` is set. Raises on a bad token (``discord.LoginFailure``) or fatal close."""
    protect_secret(token)
    configure_endpoints(settings)
    bot = TurboBot(settings, scheduler)
    async with bot:
        await bot.login(token)
        if not settings.discord.gateway_url:
            await _discover_gateway(bot)
        connection = asyncio.create_task(bot.connect(reconnect=True), name="discord-gateway")
        stopper = asyncio.create_task(stop.wait(), name="discord-stop")
        done, _ = await asyncio.wait({connection, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if connection in done:
            connection.result()  # re-raise what ended the connection
            return
        await bot.delivery.drain(within=DRAIN_TIMEOUT_S)
        await bot.close()
        with contextlib.suppress(asyncio.CancelledError, discord.DiscordException):
            await asyncio.wait_for(connection, timeout=10)
