"""User-facing text, the same wording on every front end.

``flavor`` picks the markup: "discord" (Markdown, live ``<t:EPOCH:R>`` countdowns), "telegram" (HTML parse
mode, escaped) or "plain" (CLI, logs, web).
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from typing import Any

from generator.params import PARAM, PARAMS, Limits, parse_loras
from generator.scheduler.api import JobView, QuotaView, Refusal, RefusalCode
from generator.scheduler.disk import STORAGE_MESSAGE

DEMO_NOTE = "Made by the untrained demo model (random weights): expect noise, not a real video."

_STATE_WORDS = {
    "queued": "Queued",
    "running": "Rendering",
    "succeeded": "Done",
    "failed": "Failed",
    "cancelled": "Cancelled",
}


def _bold(text: str, flavor: str) -> str:
    if flavor == "discord":
        return f"**{text}**"
    if flavor == "telegram":
        return f"<b>{html.escape(text)}</b>"
    return text


def _code(text: str, flavor: str) -> str:
    if flavor == "discord":
        safe = text.replace("`", "'")
        return f"`{safe}`"
    if flavor == "telegram":
        return f"<code>{html.escape(text)}</code>"
    return text


def _esc(text: str, flavor: str) -> str:
    if flavor == "telegram":
        return html.escape(text)
    if flavor == "discord":
        # Keep user text from pinging people or breaking formatting.
        return text.replace("@", "@\u200b").replace("`", "'").replace("*", "\\*").replace("_", "\\_")
    return text


def _when(moment: dt.datetime, flavor: str, now: dt.datetime | None = None) -> str:
    if flavor == "discord":
        return f"<t:{int(moment.timestamp())}:R>"
    now = now or dt.datetime.now(dt.UTC)
    seconds = max(0, round((moment - now).total_seconds()))
    return f"in about {seconds} s" if seconds < 120 else f"in about {round(seconds / 60)} min"


def _short_prompt(prompt: str, limit: int = 120) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"


def progress_bar(step: int, total: int, width: int = 12) -> str:
    total = max(total, 1)
    step = min(max(step, 0), total)
    filled = round(width * step / total)
    return "█" * filled + "░" * (width - filled) + f" {round(100 * step / total)}%"


def lineage_word(job: JobView) -> str:
    """What a child job is of its parent: "Retry" (same request, new seed) or "Remix"."""
    return {"retry": "Retry", "extend": "Extension"}.get(job.lineage, "Remix")


def running_line(job: JobView) -> str:
    """What a running job is doing now: its phase, with the sampler's steps (no markup; same on every front end).
    Decoding and the mp4 encode take seconds after the last step: they are said, not left at "100%"."""
    if not job.progress_total:
        return "Starting…"
    steps = f"{job.progress_step}/{job.progress_total}"
    if job.progress_phase == "text":
        return "Encoding the prompt…"
    if job.progress_phase == "decoding":
        return f"Decoding the video… (sampled {steps} steps)"
    if job.progress_phase == "encoding":
        return f"Encoding the mp4… (sampled {steps} steps)"
    return f"Sampling {progress_bar(job.progress_step, job.progress_total)} (step {steps})"


def model_name(job: JobView) -> str:
    if job.output is not None and job.output.model_label:
        return job.output.model_label
    return job.request.model or "default"


def params_line(job: JobView) -> str:
    """The mode, the declared identity settings (model and seed are shown apart) and any other changed one."""
    r = job.request
    parts = [r.mode]
    for p in PARAMS:
        value = getattr(r, p.name)
        if p.name in ("model", "seed") or r.mode not in p.modes or value is None:
            continue
        if p.identity or value != p.default:
            parts.append(p.summary(value) if p.kind is not bool else p.option_name)
    return " · ".join(parts)


def status_text(job: JobView, flavor: str = "plain", *, now: dt.datetime | None = None) -> str:
    """The one status message of a job, edited in place while it waits and runs."""
    head = f"{_STATE_WORDS.get(job.state, job.state)} · job #{job.id} · seed {job.seed}"
    lines = [_bold(head, flavor), _esc(_short_prompt(job.request.prompt), flavor), params_line(job)]
    if job.state == "queued":
        if job.position is not None:
            of = f" of {job.queue_length}" if job.queue_length else ""
            lines.append(f"Position in queue: #{job.position}{of}")
        if job.eta is not None:
            lines.append(f"Expected done {_when(job.eta, flavor, now)}")
    elif job.state == "running":
        lines.append(running_line(job))
        if job.eta is not None:
            lines.append(f"Expected done {_when(job.eta, flavor, now)}")
    elif job.state == "failed":
        lines.append(_esc(job.error_message or "Something went wrong while rendering.", flavor))
    elif job.state == "cancelled":
        lines.append("This job was cancelled.")
    return "\n".join(lines)


def loras_line(loras: str) -> str:
    """A job's LoRA set for people: "LoRA styles: ink 0.8, neon 1" ("" for none)."""
    chosen = parse_loras(loras) if loras else []
    return "LoRA styles: " + ", ".join(f"{n} {s:g}" for n, s in chosen) if chosen else ""


def result_caption(job: JobView, flavor: str = "plain") -> str:
    """Caption of a delivered video: job id, seed, model, steps, time taken, the LoRA styles (and the demo
    note)."""
    took = job.timings.get("total")
    if took is None and job.started_at and job.finished_at:
        took = (job.finished_at - job.started_at).total_seconds()
    head = f"Job #{job.id} · seed {job.seed} · {model_name(job)} · {PARAM['steps'].summary(job.request.steps)}"
    if took is not None:
        head += f" · {took:.1f} s"
    lines = [_bold(head, flavor), _esc(_short_prompt(job.request.prompt, 300), flavor)]
    if job.request.loras:  # the style is part of what the video is: shown with it, reproduced by Retry/Remix
        lines.append(_esc(loras_line(job.request.loras), flavor))
    if job.request.original_prompt:
        lines.append(_esc(f"Expanded from: {_short_prompt(job.request.original_prompt, 120)}", flavor))
    if job.parent_id:
        lines.append(f"{lineage_word(job)} of job #{job.parent_id}")
    if job.output is not None and job.output.is_demo:
        lines.append(_esc(DEMO_NOTE, flavor))
    return "\n".join(lines)


def params_text(job: JobView, flavor: str = "plain") -> str:
    """Every parameter of a job, enough to reproduce it."""
    r = job.request
    rows = [
        ("job", f"#{job.id}" + (f" ({lineage_word(job).lower()} of #{job.parent_id})" if job.parent_id else "")),
        ("state", job.state),
        ("mode", r.mode),
        ("model", model_name(job)),
        ("seed", str(job.seed)),
        ("resolution", f"{r.resolution} {r.aspect} ({r.size[0]}x{r.size[1]})"),
        ("frames", f"{r.frames} ({r.duration_s:.1f} s at 16 fps)"),
    ]
    shown = {"model", "seed", "resolution", "aspect", "frames"}  # already in the rows above
    for p in PARAMS:
        if p.name in shown or r.mode not in p.modes:
            continue
        value = r.effective(p.name)
        rows.append((p.option_name if p.kind is bool else p.name, p.shown(value)))
    body = "\n".join(f"{k}: {v}" for k, v in rows)
    values = {**r.params(), "seed": job.seed}
    # The parameters that shape the video's identity, as flags (the others are shown above).
    flags = " ".join(f"--{p.flags[0]} {p.shown(values[p.name])}" for p in PARAMS if p.identity and p.name != "model")
    if r.loras:  # not an identity parameter (empty for most jobs), but the set shapes the video when given
        flags += f" --{PARAM['loras'].flags[0]} {r.loras}"
    return "\n".join(
        [_bold(f"Parameters of job #{job.id}", flavor), _esc(r.prompt, flavor)]
        + ([_esc(f"Expanded from: {r.original_prompt}", flavor)] if r.original_prompt else [])
        + [_code(body, flavor) if flavor != "discord" else f"```\n{body}\n```", f"Same again: {_code(flags, flavor)}"]
    )


def queue_text(jobs: Sequence[JobView], quota: QuotaView, total: int, flavor: str = "plain") -> str:
    lines = [_bold(f"Queue: {total} job(s) waiting or running", flavor)]
    if not jobs:
        lines.append("You have no jobs queued or running.")
    for job in jobs:
        where = f"#{job.position} in queue" if job.state == "queued" and job.position else _STATE_WORDS[job.state].lower()
        lines.append(f"• job #{job.id} ({where}): {_esc(_short_prompt(job.request.prompt, 60), flavor)}")

    def cap(used: float, limit: float | None, unit: str = "") -> str:
        return f"{used:g}{unit} (no limit)" if limit is None else f"{used:g}{unit} of {limit:g}{unit}"

    lines.append(f"Jobs today: {cap(quota.jobs_today, quota.daily_jobs)}")
    lines.append(f"GPU time today: {cap(round(quota.gpu_seconds_today, 1), quota.daily_gpu_seconds, ' s')}")
    lines.append(f"Quota resets {_when(quota.resets_at, flavor)}")
    return "\n".join(lines)


def jobs_text(jobs: Sequence[JobView], flavor: str = "plain") -> str:
    if not jobs:
        return "You have no jobs yet. Try /t2v a fox running through snow at dusk"
    lines = [_bold("Your recent jobs", flavor)]
    for job in jobs:
        lines.append(
            f"• #{job.id} {job.state} · seed {job.seed} · {job.request.mode}: "
            f"{_esc(_short_prompt(job.request.prompt, 60), flavor)}"
        )
    lines.append(_esc("Remix one with /remix <job> [new prompt] [--flags].", flavor))
    return "\n".join(lines)


def option_help(p: Any, code: Any = str, limits: Limits | None = None) -> str:
    """One parameter in the help: its flag spellings and what it takes (from the declaration)."""
    lim = limits or Limits()
    words = [code(f"--{p.flags[0]}") + f" {p.describe(lim)}"] if p.flags else []
    words += [code(f"--{spelling}") for spelling, _ in p.switches if spelling not in ("sde", "no-adaptive")]
    return " ".join(words)


def help_text(flavor: str = "plain") -> str:
    def c(s: str) -> str:
        return _code(s, flavor)

    return "\n".join(
        [
            _bold("turbobot makes 5-second videos from text or images", flavor),
            f"{c('/t2v a fox running through snow at dusk')}: text to video",
            f"{c('/i2v [prompt]')}: animate an image ("
            + ("attach it, or use Apps > Animate this image on any message with one" if flavor == "discord"
               else "attach it, or reply to one")
            + ")",
            f"{c('/remix <job> [new prompt] [--flags]')}: same seed, changed prompt or settings",
            f"{c('/extend <job> [prompt]')}: continue a video from its last frame (or press Extend under it)",
            f"{c('/loras')}: the style LoRAs this server offers (use them with {c('--lora NAME[:SCALE]')})",
            f"{c('--expand')}: have a short or non-English prompt rewritten into a detailed English one (where the "
            f"server offers it; the result shows both) · {c('--no-expand')} keeps yours as typed",
            f"{c('/queue')} your place and quota · {c('/jobs')} your results · {c('/cancel [job]')} · {c('/forget')} delete your data",
            "",
            _bold("Options (add them to the prompt)", flavor),
            " · ".join(option_help(p, c) for p in PARAMS),
            "",
            "Tip: describe subject + action + setting + light/mood + style, with concrete motion verbs.",
        ]
    )


def loras_text(catalog: Sequence[tuple[str, str]], limits: Limits, flavor: str = "plain") -> str:
    """The /loras answer: each style's name and description, and how to use them."""
    if not catalog:
        return "This server offers no LoRA styles."
    lines = [_bold("LoRA styles", flavor)]
    for name, description in catalog:
        lines.append(f"{_code(name, flavor)}" + (f": {_esc(description, flavor)}" if description else ""))
    lines.append("")
    lines.append(f"Add {_code('--lora NAME[:SCALE]', flavor)} to a prompt (up to {limits.max_loras}, scale "
                 f"-{limits.max_lora_scale:g} to {limits.max_lora_scale:g}, default 1).")
    return "\n".join(lines)


# The wording for each refusal code when the refusal carries no message of its own (every code has one).
REFUSAL_TEXTS: dict[RefusalCode, str] = {
    RefusalCode.INVALID: "That request is not valid.",
    RefusalCode.BLOCKED: "Sorry, you are not allowed to make videos with this bot.",
    RefusalCode.BLOCKED_WORDS: "Your prompt was blocked by this bot's content rules. Please rephrase it.",
    RefusalCode.NSFW_BLOCKED: "Age-restricted prompts are not allowed here.",
    RefusalCode.BLOCKED_IMAGE: "This image can't be used here: it was held by the moderation filter.",
    RefusalCode.COMMUNITY_OFF: "The video bot is switched off here by this community's admins.",
    RefusalCode.CHANNEL_NOT_ALLOWED: "Videos cannot be made in this channel.",
    RefusalCode.MODEL_NOT_CONFIGURED: "That model is not configured on this server.",
    RefusalCode.FORBIDDEN: "You are not allowed to do that.",
    RefusalCode.NOT_FOUND: "That job does not exist (any more).",
    RefusalCode.NOT_CANCELLABLE: "That job has already finished.",
    RefusalCode.NOT_FINISHED: "That job is still queued or running; cancel it first.",
    RefusalCode.QUOTA_DAILY: "You have used today's videos.",
    RefusalCode.QUOTA_GPU: "You have used today's GPU time.",
    RefusalCode.QUEUED_CAP: "You already have the most videos waiting that you may; wait for one to start.",
    RefusalCode.RUNNING_CAP: "You already have the most videos rendering that you may.",
    RefusalCode.CHAT_RATE: "This chat is making videos too fast; slow down a little.",
    RefusalCode.QUEUE_FULL: "The queue is full right now; please try again in a few minutes.",
    RefusalCode.ENGINE_UNAVAILABLE: "The video engine is not available right now; please try again later.",
    RefusalCode.STORAGE_UNAVAILABLE: STORAGE_MESSAGE,
    RefusalCode.INTERNAL: "Something went wrong on our side; please try again.",
}


def refusal_text(refusal: Refusal, flavor: str = "plain") -> str:
    """The refusal's message (or its code's default wording), plus when to try again (a live countdown on
    Discord). Not escaped."""
    text = refusal.message or REFUSAL_TEXTS[refusal.code]
    if refusal.retry_at is not None:
        now = dt.datetime.now(dt.UTC)
        text += f" Try again {_when(refusal.retry_at, 'discord' if flavor == 'discord' else 'plain', now)}."
    return text
