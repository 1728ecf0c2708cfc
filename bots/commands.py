"""The shared command layer: chat text, typed options and attachments -> one validated request.

Front ends call these and stay thin: ``build_request`` for a new job, ``parse_remix`` for the changes a
user asks for on a remix, ``submit_text`` to do both and hand the result to the scheduler.
"""

from __future__ import annotations

from typing import Any

from bots.flags import parse_flags
from generator.request import USER_FIELDS, GenerationRequest, RequestError, validate
from generator.scheduler.api import DeliveryTarget, Refusal, Requester, SchedulerAPI, SubmitResult
from turbobot.config import Settings

# Option names front ends may pass from typed inputs (slash-command options, web forms): the request's
# user fields plus a few spellings people use.
OPTION_ALIASES = {"ar": "aspect", "res": "resolution", "topk": "sla_topk", "ode": "sampler", "adaptive": "adaptive_resolution"}


def _normalise_options(options: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if value is None:
            continue  # an option the user left empty
        name = OPTION_ALIASES.get(key, key)
        if name == "sampler" and isinstance(value, bool):
            value = "ode" if value else "sde"
        if name not in USER_FIELDS or name == "prompt":
            raise RequestError(name, f"Unknown option '{key}'.")
        out[name] = value
    return out


def _merge(text_options: dict[str, Any], typed: dict[str, Any]) -> dict[str, Any]:
    for name, value in typed.items():
        if name in text_options and text_options[name] != value:
            raise RequestError(
                name, f"'{name}' is set twice with different values ({text_options[name]} and {value}); keep one."
            )
    return {**text_options, **typed}


def build_request(
    settings: Settings,
    mode: str,
    text: str,
    *,
    image: str | None = None,
    options: dict[str, Any] | None = None,
    base: GenerationRequest | None = None,
) -> GenerationRequest:
    """Chat text (prompt with inline ``--flags``) + typed options -> validated request.

    ``base`` (a stored request) is the starting point for remixes; otherwise the configured defaults.
    For i2v with no prompt text the configured default motion prompt is used. Raises ``RequestError``.
    """
    parsed = parse_flags(text or "")
    merged = _merge(parsed.options, _normalise_options(options))
    prompt = parsed.prompt
    if base is not None:
        req = base
        if prompt:
            req = req.replace(prompt=prompt)
        if image is not None:
            req = req.replace(image=image)
    else:  # for i2v with no prompt text, the configured default motion prompt
        req = settings.default_request(mode, prompt, image)
    if merged:
        req = req.replace(**merged)
    return validate(req, settings.request_limits)


def parse_remix(text: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The overrides a user asks for on a remix: a new prompt (if any text) and changed settings."""
    parsed = parse_flags(text or "")
    overrides = _merge(parsed.options, _normalise_options(options))
    if parsed.prompt:
        overrides["prompt"] = parsed.prompt
    return overrides


async def submit_text(
    scheduler: SchedulerAPI,
    settings: Settings,
    requester: Requester,
    target: DeliveryTarget,
    key: str,
    mode: str,
    text: str,
    *,
    image: str | None = None,
    options: dict[str, Any] | None = None,
) -> SubmitResult:
    """Build and submit in one go; every problem comes back as a ``Refusal`` with a friendly message."""
    try:
        request = build_request(settings, mode, text, image=image, options=options)
    except RequestError as exc:
        raise Refusal("invalid", exc.message) from None
    return await scheduler.jobs.submit(request, requester, target, key)
