"""Modals: the prompt for "Animate this image", and the prefilled Remix form."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord

from bots.commands import parse_remix
from bots.discord.attachments import submit_image
from bots.discord.respond import guarded, idempotency_key, requester_of, respond_with_job
from generator.params import PARAMS
from generator.request import RequestError
from generator.scheduler.api import JobView, Refusal

if TYPE_CHECKING:
    from bots.discord.bot import TurboBot

MODAL_TIMEOUT_S = 15 * 60  # an abandoned form is forgotten after the interaction token's lifetime


def settings_flags(job: JobView) -> str:
    """The job's settings as the same --flags users type: the parameters that make the video what it is, and
    any other one changed from its default (the seed is kept by a remix unless --seed is added)."""
    r = job.request
    parts = []
    for p in PARAMS:
        value = getattr(r, p.name)
        if p.name == "seed" or r.mode not in p.modes or value is None:
            continue
        if not p.identity and value == p.default:
            continue
        if p.flags:
            parts.append(f"--{p.flags[0]} {p.shown(value)}")
        else:  # a switch-only parameter: the spelling that sets this value
            spelling = next((sp for sp, v in p.switches if v == value), None)
            if spelling:
                parts.append(f"--{spelling}")
    return " ".join(parts)


class AnimateModal(discord.ui.Modal, title="Animate this image"):
    def __init__(self, source: discord.Attachment, default_prompt: str) -> None:
        super().__init__(timeout=MODAL_TIMEOUT_S)  # random custom_id: two users may animate one image
        self.source = source
        self.prompt: discord.ui.TextInput[AnimateModal] = discord.ui.TextInput(
            label="How should it move? (optional)",
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=1000,
            placeholder=default_prompt[:100],
            custom_id="prompt",
        )
        self.add_item(self.prompt)

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        bot: TurboBot = interaction.client
        text = self.prompt.value or ""
        await guarded(interaction, respond_with_job(bot, interaction, lambda target: submit_image(
            bot, requester_of(interaction), target, idempotency_key(interaction), self.source, text, None)))


class RemixModal(discord.ui.Modal, title="Remix"):
    """Prefilled with the job's prompt and settings; the seed stays the same unless --seed is added."""

    def __init__(self, job: JobView) -> None:
        super().__init__(timeout=MODAL_TIMEOUT_S)
        self.job_id = job.id
        self.prompt: discord.ui.TextInput[RemixModal] = discord.ui.TextInput(
            label=f"Prompt (job #{job.id}, seed {job.seed})"[:45],
            style=discord.TextStyle.paragraph,
            default=job.request.prompt[:4000],
            required=True,
            max_length=4000,
            custom_id="prompt",
        )
        self.flags: discord.ui.TextInput[RemixModal] = discord.ui.TextInput(
            label="Settings (--flags)",
            style=discord.TextStyle.short,
            default=settings_flags(job),
            required=False,
            max_length=400,
            custom_id="flags",
        )
        self.add_item(self.prompt)
        self.add_item(self.flags)

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        bot: TurboBot = interaction.client
        text = f"{self.prompt.value or ''} {self.flags.value or ''}"

        async def make(target: Any) -> Any:
            try:
                overrides = parse_remix(text)
            except RequestError as exc:
                raise Refusal("invalid", exc.message) from None
            return await bot.scheduler.jobs.remix(self.job_id, requester_of(interaction), target,
                                             idempotency_key(interaction), overrides=overrides)

        await guarded(interaction, respond_with_job(bot, interaction, make))
