"""Slash commands, the "Animate this image" context menu and the owner-only /admin group.

Choices and ranges come from the settings so Discord's client shows what the server accepts; they are
only a convenience (crafted payloads skip them) and everything is validated again by the command layer.
No ``from __future__ import annotations`` here: discord.py reads the option annotations at runtime and
they use values from the settings.
"""

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bots.commands import parse_remix, submit_text
from bots.community import parse_channels, parse_defaults, settings_text
from bots.discord.attachments import image_of, precheck, submit_image
from bots.discord.buttons import cancel_text, forget_view
from bots.discord.modals import AnimateModal
from bots.discord.respond import idempotency_key, refuse, requester_of, respond_with_job, send_private
from bots.images import ImageRejected
from bots.texts import help_text, jobs_text, loras_text, queue_text
from generator.request import RequestError
from generator.scheduler.api import Refusal
from generator.scheduler.moderation import POLICIES

if TYPE_CHECKING:
    from bots.discord.bot import TurboBot

log = logging.getLogger(__name__)

MAX_DISCORD_INT = 2**53 - 1  # Discord integer options stop here
ACTIVE = ("queued", "running")
DISCORD_HELP = (
    "\nOn Discord: right-click (or long-press) a message with an image → Apps → **Animate this image**. "
    "Buttons under every video: Retry (new seed), Remix (same seed, edit the prompt), Params, Delete."
)


def _choices(values: tuple[str, ...]) -> list[app_commands.Choice[str]]:
    return [app_commands.Choice(name=v, value=v) for v in values[:25]]


def _job_choice(job: Any) -> app_commands.Choice[str]:
    prompt = job.request.prompt
    label = f"#{job.id} · {job.state} · seed {job.seed} · {prompt}"
    return app_commands.Choice(name=label[:100], value=str(job.id))


def parse_job_id(text: str) -> int:
    digits = text.strip().lstrip("#")
    if not digits.isdigit() or len(digits) > 18:
        raise Refusal("not_found", f"'{text}' is not a job number; pick one from the list or see /jobs.")
    return int(digits)


def _options(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def build_commands(bot: "TurboBot") -> list[app_commands.Command[Any, ..., Any] | app_commands.ContextMenu | app_commands.Group]:
    settings = bot.settings
    lim = settings.limits
    aspects = _choices(lim.aspects)
    resolutions = _choices(lim.resolutions)
    t2v_models = _choices(settings.model_names("t2v"))
    i2v_models = _choices(settings.model_names("i2v"))
    Steps = app_commands.Range[int, 1, lim.max_steps]
    Frames = app_commands.Range[int, lim.min_frames, lim.max_frames]
    Seed = app_commands.Range[int, 0, MAX_DISCORD_INT]

    async def recent_jobs(interaction: discord.Interaction[Any], current: str) -> list[app_commands.Choice[str]]:
        jobs = await bot.scheduler.views.jobs_for(requester_of(interaction), limit=25, query=current.strip().lstrip("#"))
        return [_job_choice(j) for j in jobs]

    async def active_jobs(interaction: discord.Interaction[Any], current: str) -> list[app_commands.Choice[str]]:
        jobs = await bot.scheduler.views.jobs_for(requester_of(interaction), limit=25, states=ACTIVE,
                                            query=current.strip().lstrip("#"))
        return [_job_choice(j) for j in jobs]

    # --- generation ---------------------------------------------------------------------------
    @app_commands.command(name="t2v", description="Make a short video from a text prompt")
    @app_commands.describe(
        prompt="What should happen? Inline --flags (--ar 9:16 --seed 42 ...) work too",
        aspect="Aspect ratio", resolution="Resolution", steps="Sampling steps (more = better, slower)",
        seed="Seed (0 or empty = random)", frames="Number of frames (1 more than a multiple of 4)",
        model="Model",
    )
    @app_commands.choices(aspect=aspects, resolution=resolutions, model=t2v_models)
    async def t2v(interaction: discord.Interaction[Any], prompt: str, aspect: str | None = None,
                  resolution: str | None = None, steps: Steps | None = None, seed: Seed | None = None,
                  frames: Frames | None = None, model: str | None = None) -> None:
        requester, key = requester_of(interaction), idempotency_key(interaction)
        opts = _options(aspect=aspect, resolution=resolution, steps=steps, seed=seed, frames=frames, model=model)
        await respond_with_job(bot, interaction, lambda target: submit_text(
            bot.scheduler, settings, requester, target, key, "t2v", prompt, options=opts))

    @app_commands.command(name="i2v", description="Animate an image")
    @app_commands.describe(
        image="The image to animate (PNG, JPEG or WebP)",
        prompt="How should it move? Empty = a gentle default motion. Inline --flags work too",
        aspect="Aspect ratio", resolution="Resolution", steps="Sampling steps", seed="Seed (0 = random)",
        frames="Number of frames", model="Model", adaptive="Keep the image's own aspect ratio",
    )
    @app_commands.choices(aspect=aspects, resolution=resolutions, model=i2v_models)
    async def i2v(interaction: discord.Interaction[Any], image: discord.Attachment, prompt: str | None = None,
                  aspect: str | None = None, resolution: str | None = None, steps: Steps | None = None,
                  seed: Seed | None = None, frames: Frames | None = None, model: str | None = None,
                  adaptive: bool | None = None) -> None:
        try:
            precheck(image, bot)
        except ImageRejected as exc:
            await send_private(interaction, exc.message)
            return
        requester, key = requester_of(interaction), idempotency_key(interaction)
        opts = _options(aspect=aspect, resolution=resolution, steps=steps, seed=seed, frames=frames, model=model,
                        adaptive_resolution=adaptive)
        await respond_with_job(bot, interaction, lambda target: submit_image(
            bot, requester, target, key, image, prompt or "", opts))

    @app_commands.context_menu(name="Animate this image")
    async def animate(interaction: discord.Interaction[Any], message: discord.Message) -> None:
        att = image_of(message)
        if att is None:
            await send_private(interaction, "That message has no image to animate. Pick a message with a "
                                            "PNG, JPEG or WebP attachment, or use /i2v.")
            return
        try:
            precheck(att, bot)
        except ImageRejected as exc:
            await send_private(interaction, exc.message)
            return
        await interaction.response.send_modal(AnimateModal(att, settings.defaults.i2v_prompt))

    @app_commands.command(name="remix", description="Run one of your jobs again: same seed, changed prompt or settings")
    @app_commands.describe(
        job="The job to remix", prompt="New prompt (empty = keep it); inline --flags work too",
        aspect="Aspect ratio", resolution="Resolution", steps="Sampling steps", seed="A different seed",
        frames="Number of frames",
    )
    @app_commands.choices(aspect=aspects, resolution=resolutions)
    @app_commands.autocomplete(job=recent_jobs)
    async def remix(interaction: discord.Interaction[Any], job: str, prompt: str | None = None,
                    aspect: str | None = None, resolution: str | None = None, steps: Steps | None = None,
                    seed: Seed | None = None, frames: Frames | None = None) -> None:
        requester, key = requester_of(interaction), idempotency_key(interaction)
        parent = parse_job_id(job)
        try:
            overrides = parse_remix(prompt or "", _options(aspect=aspect, resolution=resolution, steps=steps,
                                                            seed=seed, frames=frames))
        except RequestError as exc:
            raise Refusal("invalid", exc.message) from None
        await respond_with_job(bot, interaction, lambda target: bot.scheduler.jobs.remix(
            parent, requester, target, key, overrides=overrides))

    @app_commands.command(name="extend", description="Continue a video from its last frame (one video of both)")
    @app_commands.describe(job="The job whose video to continue", prompt="Prompt for the continuation (empty = the same)")
    @app_commands.autocomplete(job=recent_jobs)
    async def extend(interaction: discord.Interaction[Any], job: str, prompt: str | None = None) -> None:
        requester, key = requester_of(interaction), idempotency_key(interaction)
        parent = parse_job_id(job)
        await respond_with_job(bot, interaction, lambda target: bot.scheduler.jobs.extend(
            parent, requester, target, key, prompt=(prompt or "").strip() or None))

    # --- information and housekeeping -----------------------------------------------------------
    @app_commands.command(name="queue", description="Your place in the queue, your jobs and quota")
    async def queue(interaction: discord.Interaction[Any]) -> None:
        jobs, quota, total = await bot.scheduler.views.queue_info(requester_of(interaction))
        await send_private(interaction, queue_text(jobs, quota, total, "discord"))

    @app_commands.command(name="jobs", description="Your recent jobs with their seeds")
    async def jobs(interaction: discord.Interaction[Any]) -> None:
        found = await bot.scheduler.views.jobs_for(requester_of(interaction), limit=10)
        await send_private(interaction, jobs_text(found, "discord"))

    @app_commands.command(name="cancel", description="Cancel a queued or running job (default: your latest)")
    @app_commands.describe(job="The job to cancel")
    @app_commands.autocomplete(job=active_jobs)
    async def cancel(interaction: discord.Interaction[Any], job: str | None = None) -> None:
        requester = requester_of(interaction)
        if job is None:
            active = await bot.scheduler.views.jobs_for(requester, limit=1, states=ACTIVE)
            if not active:
                await send_private(interaction, "You have no queued or running job.")
                return
            job_id = active[0].id
        else:
            job_id = parse_job_id(job)
        view = await bot.scheduler.admin.cancel(job_id, requester)
        await send_private(interaction, cancel_text(view))

    @app_commands.command(name="forget", description="Delete all your jobs, videos and images")
    async def forget(interaction: discord.Interaction[Any]) -> None:
        await send_private(
            interaction,
            "This deletes **all** your jobs, their videos and your input images, and cannot be undone. Sure?",
            view=forget_view(interaction.user.id),
        )

    @app_commands.command(name="help", description="How to use turbobot")
    async def help_(interaction: discord.Interaction[Any]) -> None:
        await send_private(interaction, help_text("discord") + DISCORD_HELP)

    @app_commands.command(name="loras", description="The style LoRAs this server offers")
    async def loras_(interaction: discord.Interaction[Any]) -> None:
        await send_private(interaction, loras_text(bot.settings.lora_catalog(), bot.settings.request_limits,
                                                   "discord"))

    return [t2v, i2v, animate, remix, extend, queue, jobs, cancel, forget, help_, loras_, build_settings(bot), build_admin(bot)]


def build_settings(bot: "TurboBot") -> app_commands.Command[Any, ..., Any]:
    """``/settings``: this server's settings, changed by members with Manage Server (hidden from others by
    default_member_permissions, and checked again here from the interaction's resolved permissions)."""

    @app_commands.command(name="settings", description="This server's video bot settings (Manage Server)")
    @app_commands.describe(
        bot_on="Switch the bot on or off in this server", channels="Channels where it works (#a #b, or 'all')",
        daily_limit="Videos per member and day (0 = the bot's own limit)",
        policy="Age-restricted content", defaults="Default settings as flags, e.g. --steps 2 --ar 9:16 (or 'clear')",
    )
    @app_commands.choices(policy=_choices(POLICIES))
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def settings_(interaction: discord.Interaction[Any], bot_on: bool | None = None,
                        channels: str | None = None, daily_limit: app_commands.Range[int, 0, 100000] | None = None,
                        policy: str | None = None, defaults: str | None = None) -> None:
        if interaction.guild_id is None:
            await send_private(interaction, "Settings belong to a server; use /settings there.")
            return
        if not interaction.permissions.manage_guild:
            await send_private(interaction, "Only members with the Manage Server permission can change settings.")
            return
        changes: dict[str, Any] = {}
        if bot_on is not None:
            changes["enabled"] = bot_on
        if channels is not None:
            changes["channels"] = parse_channels(channels)
        if daily_limit is not None:
            changes["daily_limit"] = daily_limit
        if policy is not None:
            changes["policy"] = policy
        if defaults is not None:
            changes.update(parse_defaults(defaults))
        community = str(interaction.guild_id)
        if changes:
            view = await bot.scheduler.communities.update(requester_of(interaction), "discord", community, changes)
        else:
            view = await bot.scheduler.communities.get("discord", community)
        await send_private(interaction, settings_text(view, "discord"),
                           allowed_mentions=discord.AllowedMentions.none())

    return settings_


def build_admin(bot: "TurboBot") -> app_commands.Group:
    admin = app_commands.Group(name="admin", description="Owner-only administration",
                               default_permissions=discord.Permissions(administrator=True))

    async def owner_or_refuse(interaction: discord.Interaction[Any]) -> bool:
        if bot.scheduler.admin.is_owner(requester_of(interaction)):
            return True
        await send_private(interaction, "Only the bot's owners can use admin commands.")
        return False

    @admin.command(name="sync", description="Publish the commands (here: this server at once; global: everywhere)")
    @app_commands.choices(scope=[app_commands.Choice(name="here", value="here"),
                                 app_commands.Choice(name="global", value="global")])
    async def sync(interaction: discord.Interaction[Any], scope: str = "here") -> None:
        if not await owner_or_refuse(interaction):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        if scope == "global" or interaction.guild_id is None:
            synced = await bot.tree.sync()
            where = "globally (Discord may take a while to show them)"
        else:
            guild = discord.Object(interaction.guild_id)
            bot.tree.copy_global_to(guild=guild)
            synced = await bot.tree.sync(guild=guild)
            where = "to this server"
        await interaction.followup.send(f"Synced {len(synced)} command(s) {where}.", ephemeral=True)

    @admin.command(name="limits", description="Set a user's quota overrides")
    @app_commands.describe(user="Whose limits", max_queued="Jobs waiting at once", daily_jobs="Jobs per day",
                           daily_gpu_seconds="GPU seconds per day")
    async def limits(interaction: discord.Interaction[Any], user: discord.User,
                     max_queued: app_commands.Range[int, 0, 1000] | None = None,
                     daily_jobs: app_commands.Range[int, 0, 100000] | None = None,
                     daily_gpu_seconds: app_commands.Range[float, 0.0, 1e7] | None = None) -> None:
        if not await owner_or_refuse(interaction):
            return
        await bot.scheduler.admin.set_limits(requester_of(interaction), f"discord:{user.id}", max_queued=max_queued,
                                       daily_jobs=daily_jobs, daily_gpu_seconds=daily_gpu_seconds)
        await send_private(interaction, f"Limits of {user.mention} updated.",
                           allowed_mentions=discord.AllowedMentions.none())

    @admin.command(name="block", description="Stop a user from making videos")
    async def block(interaction: discord.Interaction[Any], user: discord.User, reason: str | None = None) -> None:
        if not await owner_or_refuse(interaction):
            return
        await bot.scheduler.admin.block(requester_of(interaction), f"discord:{user.id}", reason or "")
        await send_private(interaction, f"Blocked {user.mention}.", allowed_mentions=discord.AllowedMentions.none())

    @admin.command(name="unblock", description="Allow a blocked user again")
    async def unblock(interaction: discord.Interaction[Any], user: discord.User) -> None:
        if not await owner_or_refuse(interaction):
            return
        await bot.scheduler.admin.unblock(requester_of(interaction), f"discord:{user.id}")
        await send_private(interaction, f"Unblocked {user.mention}.", allowed_mentions=discord.AllowedMentions.none())

    return admin


async def on_tree_error(interaction: discord.Interaction[Any], error: app_commands.AppCommandError) -> None:
    """Refusals raised inside commands become private, friendly answers; anything else is logged."""
    original = getattr(error, "original", error)
    if isinstance(original, Refusal):
        await refuse(interaction, original)
        return
    if isinstance(original, (RequestError, ImageRejected)):
        await refuse(interaction, Refusal("invalid", original.message))
        return
    if isinstance(error, app_commands.TransformerError | app_commands.CommandSignatureMismatch):
        text = "Discord sent an option I could not read; please try the command again."
    else:
        log.exception("command %s failed", getattr(interaction.command, "name", "?"), exc_info=original)
        text = "Something went wrong on my side; please try again in a moment."
    try:
        await send_private(interaction, text)
    except discord.HTTPException:
        pass
