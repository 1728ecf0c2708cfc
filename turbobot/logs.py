"""Logging for the whole process: one format, secrets redacted at every level.

PTB puts the bot token in request URLs and httpx logs every URL at INFO, so the httpx logger
stays at WARNING and a filter on every handler replaces any registered secret, and anything shaped like a
Telegram or Discord token, with "[redacted]" — verbose logging stays safe.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import urllib.parse
from typing import Any

REDACTED = "[redacted]"
_secrets: set[str] = set()
_lock = threading.Lock()
_factory_installed = False

# Telegram: <digits>:<35 url-safe chars>; Discord: three dot-separated base64url parts.
_TOKEN_PATTERNS = (
    re.compile(r"(?<!\d)\d{6,12}:[A-Za-z0-9_-]{30,}"),
    re.compile(r"\b[A-Za-z0-9_-]{23,28}\.[A-Za-z0-9_-]{6,7}\.[A-Za-z0-9_-]{27,}\b"),
)


def register_secret(value: str | None) -> None:
    """Every later log record has ``value`` replaced (no-op for empty or very short values)."""
    if value and len(value) >= 6:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


def _install_record_factory() -> None:
    """Redact in the log record factory too, so records reaching any handler (a test's capture, a library's
    own handler, one an operator adds) are clean, not only those through our handler."""
    global _factory_installed
    with _lock:
        if _factory_installed:
            return
        previous = logging.getLogRecordFactory()
        record_filter = RedactingFilter()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            record_filter.filter(record)
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed = True


def protect_secret(secret: str | None) -> None:
    """Redact ``secret`` (as is and URL-quoted) from every log record from now on, process-wide, and keep the
    URL-logging HTTP libraries quiet (PTB puts the Telegram token in request URLs)."""
    if not secret:
        return
    register_secret(secret)
    register_secret(urllib.parse.quote(secret, safe=""))
    _install_record_factory()
    # Pinned, not inherited, so a DEBUG root level set later does not turn URL logging back on.
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.process:
            data["process"] = self.process
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            data["job_id"] = job_id
        if record.exc_text:
            data["exc"] = record.exc_text
        return json.dumps(data, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text", stream: object = None, process: str = "") -> None:
    """One format for every process; ``process`` names a child (e.g. "worker[vm:0]") in each line."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_turbobot", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler._turbobot = True  # type: ignore[attr-defined]
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        tag = f"{process} " if process else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    # Never let URL-logging libraries print request URLs (they contain the Telegram token).
    for noisy in ("httpx", "httpcore", "telegram.request", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("discord.gateway").setLevel(max(logging.INFO, logging.getLevelName(level)))
    # Alembic narrates every migration step at INFO (plugins, context, "Will assume transactional DDL"):
    # debugging detail, shown only when debugging.
    debug = logging.getLevelName(level) <= logging.DEBUG
    logging.getLogger("alembic").setLevel(logging.NOTSET if debug else logging.WARNING)
