"""Errors of the console's API answered as JSON, whatever raised them.

Handlers raise aiohttp's HTTP exceptions for malformed requests (no such route, bad JSON, a job id out of
range): under /api/ and /media/ these become ``{"error": code, "message": text}`` like every other refusal.
An unexpected exception is logged with its traceback and answered as a JSON 500, never aiohttp's plain text.
A client that goes away mid-request is logged in one line; one that stalls its body gets a 408 and is cut.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from bots.web.security import json_error

log = logging.getLogger(__name__)

JSON_PREFIXES = ("/api/", "/media/")
_CODES = {
    400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    408: "timeout", 409: "conflict", 413: "too_large", 415: "unsupported", 429: "rate_limited",
}
_MESSAGES = {
    404: "There is nothing here.", 405: "That method is not allowed here.", 413: "The request is too large.",
}
INTERNAL_MESSAGE = "Something went wrong on the server. The operator can find the details in its log."
TIMEOUT_MESSAGE = "The upload stalled, so the server stopped waiting for it. Please try again."


class BodyTimeout(Exception):
    """The client stopped sending the request body for longer than ``[web] body_timeout_seconds``."""


@asynccontextmanager
async def body_deadline(seconds: float) -> AsyncIterator[None]:
    """Bound one read of the request body (each chunk gets a fresh deadline: a slow but steady upload passes)."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise BodyTimeout() from None


def _is_disconnect(exc: BaseException) -> bool:
    # aiohttp sets ConnectionResetError("Connection lost") on the body stream when the peer goes away.
    return isinstance(exc, (ConnectionResetError, asyncio.IncompleteReadError))


def make_error_middleware() -> Middleware:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400 or not request.path.startswith(JSON_PREFIXES):
                raise
            text = exc.text or ""
            if not text or text.startswith(f"{exc.status}:"):  # aiohttp's default body, e.g. "404: Not Found"
                text = _MESSAGES.get(exc.status, exc.reason)
            return json_error(exc.status, _CODES.get(exc.status, "error"), text)
        except BodyTimeout:
            log.info("web: %s %s: the client stalled sending the body; connection closed",
                     request.method, request.path)
            response = json_error(408, "timeout", TIMEOUT_MESSAGE)
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            if request.transport is not None:
                request.transport.close()  # do not linger waiting for the rest of a stalled body
            return response
        except Exception as exc:
            if _is_disconnect(exc):
                log.info("web: %s %s: the client disconnected before the request was complete",
                         request.method, request.path)
                return web.Response(status=400)  # nobody is listening; aiohttp drops it
            log.exception("web: %s %s failed", request.method, request.path)
            return json_error(500, "internal", INTERNAL_MESSAGE)

    return errors
