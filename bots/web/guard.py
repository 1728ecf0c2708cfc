"""Slow-client protection for the console's server: a connection must deliver each request's headers within
``[web] header_timeout_seconds`` (counted from connecting, or from the first byte of a later request on a
kept-alive connection), or it is closed. aiohttp has no such limit itself: a client trickling header bytes,
or connecting and sending nothing, would hold its connection forever.

Idle kept-alive connections are aiohttp's ``keepalive_timeout``; stalled bodies are timed where they are read
(``bots.web.forms``). The guard wraps the server's protocol factory, and a middleware tells it when a
request's head is complete (the handler runs) and when the response is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger(__name__)


class GuardedProtocol(asyncio.Protocol):
    """Passes everything to aiohttp's protocol; closes the transport when a request head is late."""

    def __init__(self, inner: Any, header_timeout: float, registry: GuardRegistry) -> None:
        self.inner = inner
        self.header_timeout = header_timeout
        self.registry = registry
        self.transport: asyncio.BaseTransport | None = None
        self.busy = 0  # requests being handled
        self.head_since: float | None = None  # when the head now awaited began (None: idle between requests)
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.registry.add(transport, self)
        self.inner.connection_made(transport)
        self._start_head()  # a client that connects and sends nothing is cut too

    def data_received(self, data: bytes) -> None:
        if not self.busy and self.head_since is None:
            self._start_head()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.registry.remove(self.transport)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # --- request boundaries (from the middleware) ------------------------------------------------
    def request_started(self) -> None:
        self.busy += 1
        self.head_since = None
        self._cancel_timer()

    def request_finished(self) -> None:
        self.busy = max(0, self.busy - 1)
        # Waiting for the next request now: idle time is aiohttp's keep-alive timeout, not ours.

    # --- the deadline ----------------------------------------------------------------------------
    def _start_head(self) -> None:
        loop = asyncio.get_running_loop()
        self.head_since = loop.time()
        self._cancel_timer()
        self._timer = loop.call_later(self.header_timeout, self._check)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.busy or self.head_since is None or self.transport is None or self.transport.is_closing():
            return
        if getattr(self.inner, "_request_in_progress", False):
            # The previous response (e.g. a long video download) is still being sent after its handler
            # returned; bytes of a next, pipelined request wait for it. Give them a fresh window after it.
            self._start_head()
            return
        peer = self.transport.get_extra_info("peername")
        log.info("web: closing a connection from %s: no complete request headers within %.1f s",
                 peer[0] if isinstance(peer, tuple) else "?", self.header_timeout)
        self.transport.close()


class GuardRegistry:
    """Transport -> its guard, so the middleware can find the guard of a request's connection."""

    def __init__(self) -> None:
        self._by_transport: dict[asyncio.BaseTransport, GuardedProtocol] = {}  # entries leave on connection_lost

    def add(self, transport: asyncio.BaseTransport, guard: GuardedProtocol) -> None:
        self._by_transport[transport] = guard

    def remove(self, transport: asyncio.BaseTransport) -> None:
        self._by_transport.pop(transport, None)

    def get(self, transport: asyncio.BaseTransport | None) -> GuardedProtocol | None:
        return None if transport is None else self._by_transport.get(transport)

    def wrap(self, factory: Callable[[], Any], header_timeout: float) -> Callable[[], GuardedProtocol]:
        """A protocol factory for ``loop.create_server`` that guards each connection of ``factory``."""
        return lambda: GuardedProtocol(factory(), header_timeout, self)


REGISTRY = web.AppKey("turbobot_guard_registry", GuardRegistry)


def make_guard_middleware(registry: GuardRegistry) -> Middleware:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = registry.get(request.transport)
        if conn is None:  # served without the guard (e.g. aiohttp's test server)
            return await handler(request)
        conn.request_started()
        try:
            return await handler(request)
        finally:
            conn.request_finished()

    return guard
