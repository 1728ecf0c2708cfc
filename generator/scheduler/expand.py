"""Prompt expansion: a short or non-English prompt rewritten into a detailed English video prompt by an
OpenAI-compatible chat-completions endpoint the operator runs (config ``[expand]``).

Runs in the scheduler's submission path as one async HTTP call (it never blocks the event loop) bounded by
``expand.timeout_seconds``. Anything but a usable answer (timeout, refused connection, HTTP error, malformed
JSON, an empty or absurd answer) falls back to the user's prompt: expansion can delay a job by at most the
timeout and never loses one. May touch: the network (the configured endpoint only).
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from generator.request import clean_prompt
from turbobot.config import ExpandSettings, read_secret

log = logging.getLogger("turbobot.expand")


def needs_expansion(prompt: str, short_words: int) -> bool:
    """Short prompts and prompts with non-English (non-ASCII) letters are worth rewriting."""
    if len(prompt.split()) < short_words:
        return True
    return any(ch.isalpha() and not ch.isascii() for ch in prompt)


def _answer_text(data: Any) -> str | None:
    """The first choice's message content of a chat-completions answer, or None when it has none."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _usable(text: str, max_chars: int) -> str | None:
    """The answer cleaned to one line and fitted to ``max_chars`` (cut at a word), or None when unusable."""
    cleaned = clean_prompt(text).strip().strip('"').strip()
    if cleaned.lower().startswith("prompt:"):
        cleaned = cleaned[len("prompt:"):].strip()
    if len(cleaned.split()) < 3:  # "", "OK", "Sorry." are not video prompts
        return None
    if len(cleaned) > max_chars:
        cut = cleaned[:max_chars]
        cleaned = cut[: cut.rfind(" ")] if " " in cut else cut
        cleaned = cleaned.rstrip(" ,;:")
    return cleaned or None


async def expand_prompt(settings: ExpandSettings, prompt: str, max_chars: int) -> str | None:
    """The rewritten prompt, or None (use the original): off, not needed, or the endpoint gave nothing usable."""
    if not settings.url or not needs_expansion(prompt, settings.short_words):
        return None
    headers = {"Content-Type": "application/json"}
    key = read_secret(settings.api_key_env) if settings.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": settings.system_prompt},
            {"role": "user", "content": prompt},
        ],
        "temperature": 0.7,
        "stream": False,
    }
    if settings.model:
        body["model"] = settings.model
    timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.post(settings.url, json=body, headers=headers) as resp:
            if resp.status != 200:
                log.warning("prompt expansion: the endpoint answered HTTP %s; using the prompt as typed", resp.status)
                return None
            data = await resp.json(content_type=None)
    except TimeoutError:
        log.warning("prompt expansion: no answer within %gs; using the prompt as typed", settings.timeout_seconds)
        return None
    except (aiohttp.ClientError, OSError, ValueError) as exc:  # unreachable, reset, not JSON
        log.warning("prompt expansion failed (%s); using the prompt as typed", exc.__class__.__name__)
        return None
    text = _answer_text(data)
    result = _usable(text, max_chars) if text is not None else None
    if result is None:
        log.warning("prompt expansion: the endpoint's answer was not a usable prompt; using the prompt as typed")
    return result
