"""Keep bot tokens out of logs, whatever the log level and whoever installed the log handler.

PTB puts the token in every request URL: httpx logs those URLs at INFO and PTB logs its base URL at DEBUG.
``turbobot.logs`` redacts on the handler it installs; this module also applies the same redaction in the
log record factory, so records reaching any other handler (a test's capture, a library's own handler, one
added by an operator) are clean too. The httpx/httpcore loggers are pinned at WARNING.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from typing import Any

from turbobot.logs import RedactingFilter, register_secret

REDACTED = "[redacted]"

_lock = threading.Lock()
_installed = False
_filter = RedactingFilter()


def _install_factory() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _filter.filter(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def protect_secret(secret: str) -> None:
    """Redact ``secret`` (as is and URL-quoted) from every log record from now on, process-wide."""
    if not secret:
        return
    register_secret(secret)
    register_secret(urllib.parse.quote(secret, safe=""))
    _install_factory()
    # Pinned, not inherited, so a DEBUG root level set later does not turn URL logging back on.
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
