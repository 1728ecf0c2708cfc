"""Tokens never reach the logs, at any level, in messages, arguments or tracebacks."""

from __future__ import annotations

import io
import logging

from turbobot.logs import redact, register_secret, setup_logging

TG_TOKEN = "123456789:AAH3kq9rT0pZxY_wv-8bQ1mN2oP3qR4sT5u"
DC_TOKEN = "MTA5ODc2NTQzMjEwOTg3NjU0MzI.GhJkLm.abcdefghijklmnopqrstuvwxyz012345"


def test_redacts_registered_and_token_shaped_strings() -> None:
    register_secret("my-very-own-secret")
    assert "my-very-own-secret" not in redact("x my-very-own-secret y")
    assert TG_TOKEN not in redact(f"POST https://api.telegram.org/bot{TG_TOKEN}/getUpdates")
    assert DC_TOKEN not in redact(f"Authorization: Bot {DC_TOKEN}")
    assert redact("job 42 seed 1234567890 done") == "job 42 seed 1234567890 done"


def test_handler_redacts_args_and_tracebacks_at_debug() -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", "text", stream=buf)
    log = logging.getLogger("telegram.ext.test")
    log.debug("calling %s", f"https://api.telegram.org/bot{TG_TOKEN}/sendMessage")
    try:
        raise RuntimeError(f"boom {DC_TOKEN}")
    except RuntimeError:
        log.exception("failed")
    logging.getLogger("httpx").info("HTTP Request: GET https://x/bot%s/getMe", TG_TOKEN)
    out = buf.getvalue()
    assert "calling https://api.telegram.org/bot[redacted]/sendMessage" in out
    assert "failed" in out and "boom [redacted]" in out
    assert TG_TOKEN not in out and DC_TOKEN not in out
    assert "HTTP Request" not in out  # httpx kept at WARNING


def test_json_format() -> None:
    buf = io.StringIO()
    setup_logging("INFO", "json", stream=buf)
    logging.getLogger("turbobot.x").info("job done", extra={"job_id": 7})
    line = buf.getvalue().strip().splitlines()[-1]
    assert '"job_id": 7' in line and '"message": "job done"' in line
