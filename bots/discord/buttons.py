"""Persistent buttons: the custom_id carries only ``tb:action:job_id``; everything else is in the database.

They are ``DynamicItem``s registered in ``setup_hook``, so a click on a message posted before a restart is
parsed from its custom_id and handled like any other (the AIYA "this button no longer works" anti-example).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import TYPE_CHECKING, Any

import discord

from bots.discord.respond import guarded, idempotency_key, requester_of, respond_with_job, send_private
from bots.texts import params_text, refusal_text
from generator.scheduler.api import JobView, Refusal

if TYPE_CHECKING:
    from bots.discord.bot import TurboBot

log = logging.getLogger(__name__)

ACTIONS = ("retry", "remix", "extend", "params", "cancel", "delete")
_LABELS = {
    "retry": ("Retry", "🔁", discord.ButtonStyle.primary),
    "remix": ("Remix", "🎛️", discord.ButtonStyle.secondary),
    "extend": ("Extend", "⏩", discord.ButtonStyle.secondary),
    "params": ("Params", "ℹ️", discord.ButtonStyle.secondary),
    "cancel": ("Cancel", "✖️", discord.ButtonStyle.danger),
    "delete": ("Delete", "🗑️", discord.ButtonStyle.danger),
}


def buttons_for(job: JobView) -> tuple[str, ...]:
    if job.state in ("queued", "running"):
        return ("params", "cancel")
    if job.state == "succeeded":
        return ("retry", "remix", "extend", "params", "delete")
    return ("retry", "params", "delete")  # failed or cancelled


def job_buttons(job: JobView) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in buttons_for(job):
        view.add_item(JobButton(action, job.id))
    return view


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"tb:(?P<action>[a-z]+):(?P<job_id>\d{1,18})"):
    def __init__(self, action: str, job_id: int) -> None:
        label, emoji, style = _LABELS[action]
        super().__init__(discord.ui.Button(label=label, emoji=emoji, style=style, custom_id=f"tb:{action}:{job_id}"))
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> JobButton:
        action = match["action"]
        if action not in ACTIONS:
            raise ValueError(f"unknown button action {action!r}")
        return cls(action, int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        bot: TurboBot = interaction.client
        handler = {
            "retry": on_retry,
            "remix": on_remix,
            "extend": on_extend,
            "params": on_params,
            "cancel": on_cancel,
            "delete": on_delete,
        }[self.action]
        await guarded(interaction, handler(bot, interaction, self.job_id))


async def on_retry(bot: TurboBot, interaction: discord.Interaction[Any], job_id: int) -> None:
    requester = requester_of(interaction)
    key = idempotency_key(interaction)
    await respond_with_job(
        bot, interaction, lambda target: bot.scheduler.jobs.remix(job_id, requester, target, key, new_seed=True)
    )


async def on_extend(bot: TurboBot, interaction: discord.Interaction[Any], job_id: int) -> None:
    requester = requester_of(interaction)
    key = idempotency_key(interaction)
    await respond_with_job(bot, interaction, lambda target: bot.scheduler.jobs.extend(job_id, requester, target, key))


async def on_remix(bot: TurboBot, interaction: discord.Interaction[Any], job_id: int) -> None:
    from bots.discord.modals import RemixModal

    job = await bot.scheduler.views.get(job_id)
    if job is None:
        raise Refusal("not_found", f"Job #{job_id} no longer exists.")
    await interaction.response.send_modal(RemixModal(job))


async def on_params(bot: TurboBot, interaction: discord.Interaction[Any], job_id: int) -> None:
    job = await bot.scheduler.views.get(job_id)
    if job is None:
        raise Refusal("not_found", f"Job #{job_id} no longer exists.")
    await send_private(interaction, params_text(job, "discord"))


async def on_cancel(bot: TurboBot, interaction: discord.Interaction[Any], job_id: int) -> None:
    job = await bot.scheduler.admin.cancel(job_id, requester_of(interaction))
    await send_private(interaction, cancel_text(job))


async def on_delete(bot: TurboBot, interaction: discord.Interaction[Any], job_id: int) -> None:
    await bot.scheduler.admin.delete(job_id, requester_of(interaction))
    await interaction.response.defer()  # for a button: "I will update the message it is on"
    with contextlib.suppress(discord.HTTPException):
        await interaction.delete_original_response()
    await interaction.followup.send(f"Deleted job #{job_id} and its video.", ephemeral=True)


def cancel_text(job: JobView) -> str:
    if job.state == "cancelled":
        return f"Cancelled job #{job.id}."
    if job.state == "running":
        return f"Stopping job #{job.id}; it ends after the current step."
    return f"Job #{job.id} is already {job.state}."


class ForgetButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"tb:forget:(?P<answer>yes|no):(?P<user_id>\d{1,20})"):
    """The confirmation of /forget; only the user who asked can press it."""

    def __init__(self, answer: str, user_id: int) -> None:
        label, style = ("Yes, delete everything", discord.ButtonStyle.danger) if answer == "yes" else (
            "Keep my data", discord.ButtonStyle.secondary)
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=f"tb:forget:{answer}:{user_id}"))
        self.answer = answer
        self.user_id = user_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ForgetButton:
        return cls(match["answer"], int(match["user_id"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await guarded(interaction, self._answer(interaction))

    async def _answer(self, interaction: discord.Interaction[Any]) -> None:
        bot: TurboBot = interaction.client
        if interaction.user.id != self.user_id:
            await send_private(interaction, "This confirmation belongs to someone else.")
            return
        if self.answer == "no":
            await interaction.response.edit_message(content="Nothing was deleted.", view=None)
            return
        try:
            count = await bot.scheduler.admin.forget(requester_of(interaction))
        except Refusal as exc:
            await interaction.response.edit_message(content=refusal_text(exc), view=None)
            return
        await interaction.response.edit_message(
            content=f"Done: deleted {count} job(s) with their videos and input images.", view=None
        )


def forget_view(user_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(ForgetButton("yes", user_id))
    view.add_item(ForgetButton("no", user_id))
    return view
