"""The shared command layer: chat text, typed options and attachments -> one request.

Front ends call these and stay thin: ``build_request`` for a new job, ``parse_remix`` for the changes a
user asks for on a remix, ``submit_text`` to do both and hand the result to the scheduler, whose submit
validates it (once, where every request enters the queue).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bots.flags import parse_flags
from generator.params import by_option
from generator.request import GenerationRequest, RequestError
from generator.scheduler.api import DeliveryTarget, Refusal, Requester, SchedulerAPI, SubmitResult
from turbobot.config import Settings


def _normalise_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Typed options (slash-command options, web forms) by any declared spelling -> request fields."""
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if value is None:
            continue  # an option the user left empty
        found = by_option(key)
        if found is None:
            raise RequestError(key, f"Unknown option '{key}'.")
        param, switch_value = found
        if switch_value is not dataclasses.MISSING and isinstance(value, bool):
            # A switch given as a yes/no option: yes sets its value, no the opposite (or the default).
            value = switch_value if value else (not switch_value if param.kind is bool else param.default)
        out[param.name] = value
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
    defaults: dict[str, Any] | None = None,
) -> GenerationRequest:
    """Chat text (prompt with inline ``--flags``) + typed options -> the request to submit.

    Flags are parsed and typed here (a bad flag raises ``RequestError`` naming it); ranges and choices are
    checked once, by the scheduler's submit, where every request enters the queue. ``base`` (a stored request) is the starting point for remixes; otherwise the configured defaults, with ``defaults`` (the
    community's own) over them.
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
        if defaults:
            req = req.replace(**defaults)
    if merged:
        req = req.replace(**merged)
    return req


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
    defaults = await scheduler.communities.defaults_for(target)
    try:
        request = build_request(settings, mode, text, image=image, options=options, defaults=defaults)
    except RequestError as exc:
        raise Refusal("invalid", exc.message) from None
    return await scheduler.jobs.submit(request, requester, target, key)
