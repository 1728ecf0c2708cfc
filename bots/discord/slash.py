"""Slash commands, the "Animate this image" context menu and the owner-only /admin group.

The generation options (names, types, choices, ranges from the configured ``Limits``, descriptions) are
derived from the parameter declaration (generator.params.PARAMS): ``_with_params`` gives each command's
callback a signature discord.py reads. Ranges and choices are only a convenience for Discord's client
(crafted payloads skip them): the scheduler validates every request once, at submit.
No ``from __future__ import annotations`` here: discord.py reads the option annotations at runtime and
they use values from the settings.
"""

import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import discord
from discord import app_commands

from bots.commands import parse_remix, submit_text
from bots.community import parse_channels, parse_defaults, parse_expand, settings_text
from bots.discord.attachments import image_of, precheck, submit_image
from bots.discord.buttons import cancel_text, forget_view
from bots.discord.modals import AnimateModal
from bots.discord.respond import idempotency_key, refuse, requester_of, respond_with_job, send_private
from bots.images import ImageRejected
from bots.texts import help_text, jobs_text, loras_text, queue_text
from generator.params import MODES, PARAMS, Limits, Param
from generator.request import RequestError
from generator.scheduler.api import Refusal
from generator.scheduler.moderation import POLICIES

if TYPE_CHECKING:
    from bots.discord.bot import TurboBot

log = logging.getLogger(__name__)

MAX_DISCORD_INT = 2**53 - 1  # Discord integer options stop here
MAX_OPTIONS = 25  # per command (discord.py 2.7 / the Discord API)
MAX_DESCRIPTION = 100
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


def _annotation(p: Param, limits: Limits) -> Any:
    """The option type discord.py registers for a parameter: its kind, and its range where it has one."""
    if p.kind is bool:
        return bool | None
    if p.kind is str:
        return str | None
    bounds = p.bounds(limits)
    assert bounds is not None, p.name
    lo, hi = bounds
    if p.kind is int:
        return app_commands.Range[int, int(lo), int(min(hi, MAX_DISCORD_INT))] | None
    return app_commands.Range[float, float(lo), float(hi)] | None


def _description(p: Param) -> str:
    text = p.help
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 1] + "…"


def params_for(mode: str | None) -> tuple[Param, ...]:
    """The parameters a command offers: those its mode uses (a remix, of either mode: all of them)."""
    return tuple(p for p in PARAMS if mode is None or mode in p.modes)


Callback = TypeVar("Callback", bound=Callable[..., Coroutine[Any, Any, None]])


def _with_params(callback: Callback, leading: list[inspect.Parameter], described: dict[str, str],
                 params: tuple[Param, ...], limits: Limits, mode: str | None) -> Callback:
    """Give ``callback`` (which takes ``interaction``, the ``leading`` options and ``**options``) the
    signature discord.py reads: ``leading`` then one optional option per parameter, with its description
    and choices. Option values reach ``**options`` under the parameter's option name."""
    first = inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction)
    options = [inspect.Parameter(p.option_name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=_annotation(p, limits)) for p in params]
    assert len(leading) + len(options) <= MAX_OPTIONS, f"{callback.__name__}: too many options for Discord"
    choices: dict[str, list[app_commands.Choice[str]]] = {}
    for p in params:
        if p.kind is str:
            allowed = p.allowed(limits, mode) if mode is not None else tuple(
                dict.fromkeys(v for m in MODES for v in p.allowed(limits, m)))
            choices[p.option_name] = _choices(allowed)
    callback.__signature__ = inspect.Signature([first, *leading, *options])  # type: ignore[attr-defined]
    callback.__discord_app_commands_param_description__ = {  # type: ignore[attr-defined]
        **described, **{p.option_name: _description(p) for p in params}}
    callback.__discord_app_commands_param_choices__ = {k: v for k, v in choices.items() if v}  # type: ignore[attr-defined]
    return callback


def _option(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def build_commands(bot: "TurboBot") -> list[app_commands.Command[Any, ..., Any] | app_commands.ContextMenu | app_commands.Group]:
    settings = bot.settings
    limits = settings.request_limits

    async def recent_jobs(interaction: discord.Interaction[Any], current: str) -> list[app_commands.Choice[str]]:
        jobs = await bot.scheduler.views.jobs_for(requester_of(interaction), limit=25, query=current.strip().lstrip("#"))
        return [_job_choice(j) for j in jobs]

    async def active_jobs(interaction: discord.Interaction[Any], current: str) -> list[app_commands.Choice[str]]:
        jobs = await bot.scheduler.views.jobs_for(requester_of(interaction), limit=25, states=ACTIVE,
                                            query=current.strip().lstrip("#"))
        return [_job_choice(j) for j in jobs]

    # --- generation: options derived from the parameter declaration ---------------------------
    async def t2v_callback(interaction: discord.Interaction[Any], prompt: str, **options: Any) -> None:
        requester, key = requester_of(interaction), idempotency_key(interaction)
        opts = _options(**options)
        await respond_with_job(bot, interaction, lambda target: submit_text(
            bot.scheduler, settings, requester, target, key, "t2v", prompt, options=opts))

    t2v: app_commands.Command[Any, ..., None] = app_commands.command(name="t2v", description="Make a short video from a text prompt")(_with_params(
        t2v_callback, [_option("prompt", str)],
        {"prompt": "What should happen? Inline --flags (--ar 9:16 --seed 42 ...) work too"},
        params_for("t2v"), limits, "t2v"))

    async def i2v_callback(interaction: discord.Interaction[Any], image: discord.Attachment,
                           prompt: str | None = None, **options: Any) -> None:
        try:
            precheck(image, bot)
        except ImageRejected as exc:
            await send_private(interaction, exc.message)
            return
        requester, key = requester_of(interaction), idempotency_key(interaction)
        opts = _options(**options)
        await respond_with_job(bot, interaction, lambda target: submit_image(
            bot, requester, target, key, image, prompt or "", opts))

    i2v: app_commands.Command[Any, ..., None] = app_commands.command(name="i2v", description="Animate an image")(_with_params(
        i2v_callback, [_option("image", discord.Attachment), _option("prompt", str | None, None)],
        {"image": "The image to animate (PNG, JPEG or WebP)",
         "prompt": "How should it move? Empty = a gentle default motion. Inline --flags work too"},
        params_for("i2v"), limits, "i2v"))

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

    async def remix_callback(interaction: discord.Interaction[Any], job: str, prompt: str | None = None,
                             **options: Any) -> None:
        requester, key = requester_of(interaction), idempotency_key(interaction)
        parent = parse_job_id(job)
        try:
            overrides = parse_remix(prompt or "", _options(**options))
        except RequestError as exc:
            raise Refusal("invalid", exc.message) from None
        await respond_with_job(bot, interaction, lambda target: bot.scheduler.jobs.remix(
            parent, requester, target, key, overrides=overrides))

    remix: app_commands.Command[Any, ..., None] = app_commands.command(
        name="remix", description="Run one of your jobs again: same seed, changed prompt or settings",
    )(_with_params(
        remix_callback, [_option("job", str), _option("prompt", str | None, None)],
        {"job": "The job to remix", "prompt": "New prompt (empty = keep it); inline --flags work too"},
        params_for(None), limits, None))
    remix.autocomplete("job")(recent_jobs)

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
        expand="Prompt expansion for requests without --expand/--no-expand",
    )
    @app_commands.choices(policy=_choices(POLICIES), expand=_choices(("on", "off", "default")))
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def settings_(interaction: discord.Interaction[Any], bot_on: bool | None = None,
                        channels: str | None = None, daily_limit: app_commands.Range[int, 0, 100000] | None = None,
                        policy: str | None = None, defaults: str | None = None, expand: str | None = None) -> None:
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
        if expand is not None:  # after a "clear" of the defaults, so it is applied on top of it
            changes.setdefault("defaults", {}).update(parse_expand(expand)["defaults"])
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
