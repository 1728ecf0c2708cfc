"""The discord.py client: command tree, persistent buttons and the scheduler subscription."""

from __future__ import annotations

import logging
import weakref
from typing import Any

import discord
from discord import app_commands

from bots.discord.buttons import ForgetButton, JobButton
from bots.discord.delivery import Delivery
from bots.discord.slash import build_commands, on_tree_error
from generator.scheduler.api import DeliverLater, JobEvent, SchedulerAPI
from turbobot.config import Settings

log = logging.getLogger(__name__)


class _Relay:
    """The one sink subscribed per scheduler; it forwards to whichever bot is running now.

    The scheduler has no unsubscribe and marks a result delivered only when every sink of the platform
    accepted it, so a bot restarted inside one process must not leave a dead sink behind.
    """

    def __init__(self) -> None:
        self.delivery: Delivery | None = None

    async def __call__(self, event: JobEvent) -> None:
        if self.delivery is None:
            raise DeliverLater("no Discord client is running")
        await self.delivery(event)


_relays: weakref.WeakKeyDictionary[Any, _Relay] = weakref.WeakKeyDictionary()


def _attach(scheduler: SchedulerAPI, delivery: Delivery) -> None:
    relay = _relays.get(scheduler)
    if relay is None:
        relay = _relays[scheduler] = _Relay()
        relay.delivery = delivery
        # Undelivered results (e.g. from before a restart) are offered right away; REST works before READY.
        scheduler.subscribe("discord", relay)
    else:
        relay.delivery = delivery  # the scheduler's own poll offers what is still undelivered


def _detach(scheduler: SchedulerAPI, delivery: Delivery) -> None:
    relay = _relays.get(scheduler)
    if relay is not None and relay.delivery is delivery:
        relay.delivery = None


class TurboBot(discord.Client):
    """Default intents only: slash commands, context menus, buttons and modals need nothing privileged."""

    def __init__(self, settings: Settings, scheduler: SchedulerAPI, **options: object) -> None:
        # A video bot never joins voice: without PyNaCl/davey discord.py would warn about it on every start.
        # These class flags are exactly what its Client checks before those two warnings (discord.py 2.7).
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        intents = discord.Intents.default()
        intents.message_content = False
        super().__init__(intents=intents, **options)  # type: ignore[arg-type]
        self.settings = settings
        self.scheduler = scheduler
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = on_tree_error  # type: ignore[method-assign]
        self.delivery = Delivery(self)
        for command in build_commands(self):
            self.tree.add_command(command)

    async def setup_hook(self) -> None:
        # Buttons on messages from before a restart are parsed from their custom_id.
        self.add_dynamic_items(JobButton, ForgetButton)
        await self.sync_commands()
        _attach(self.scheduler, self.delivery)

    async def sync_commands(self) -> None:
        """Per dev guild in development (instant), globally on deploy; never both by accident."""
        mode = self.settings.discord.sync_commands
        targets: list[discord.Object | None] = []
        if mode == "global":
            targets = [None]
        elif mode == "guild":
            targets = [discord.Object(g) for g in self.settings.discord.dev_guild_ids]
            if not targets and await self._global_commands_differ():
                # A fresh deploy with no dev guild would otherwise register nothing, not even /admin sync:
                # register globally when the set of commands changed (not on every start).
                log.info("discord: no dev_guild_ids; the global command set differs, syncing globally")
                targets = [None]
        for guild in targets:
            try:
                if guild is not None:
                    self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
            except discord.HTTPException as exc:
                # A missing guild or permission must not keep the bot from serving what is registered.
                log.warning("command sync to %s failed (%s %s): %s", guild.id if guild else "global",
                            exc.status, exc.code, exc.text)
            else:
                log.info("synced %d command(s) %s", len(synced), f"to guild {guild.id}" if guild else "globally")

    async def _global_commands_differ(self) -> bool:
        try:
            remote = await self.tree.fetch_commands()
        except discord.HTTPException as exc:
            log.warning("could not list the registered commands (%s %s): %s", exc.status, exc.code, exc.text)
            return False
        return {c.name for c in remote} != {c.name for c in self.tree.get_commands()}

    async def close(self) -> None:
        _detach(self.scheduler, self.delivery)
        await self.delivery.close()
        await super().close()
