"""The local web console: application factory and server runner.

``create_web_app(settings, scheduler)`` builds the aiohttp application (refusing unsafe settings);
``run_web(settings, scheduler, stop)`` serves it on ``[web] host:port`` until ``stop`` is set.
Pages are static HTML shells with vanilla JS (package data under templates/ and static/) that talk to the
JSON API; all text from users is inserted with textContent, never as HTML. The console reads and writes
only through the scheduler (``SchedulerAPI``); it opens no database of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bots.web import api_admin, api_jobs
from bots.web.context import CONSOLE, Console, console_of
from bots.web.errors import make_error_middleware
from bots.web.events import StreamHub
from bots.web.guard import REGISTRY, GuardRegistry, make_guard_middleware
from bots.web.metrics import ConsoleMetrics
from bots.web.security import (
    SESSION_COOKIE,
    Auth,
    add_security_headers,
    ensure_csrf_cookie,
    load_admin_token,
    make_security_middleware,
)
from generator.scheduler.api import SchedulerAPI
from generator.scheduler.health import fresh_seconds
from turbobot.config import Settings, WebSettings

log = logging.getLogger(__name__)

PAGES = {"/": "playground.html", "/gallery": "gallery.html", "/admin": "admin.html",
         "/admin/moderation": "moderation.html", "/login": "login.html"}
LOGIN_FAILURE_DELAY_S = 0.25  # slows guessing a little; the token itself must be long


def _package_dir(name: str) -> Path:
    return Path(str(resources.files("bots.web").joinpath(name)))


def _page(template: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    path = _package_dir("templates") / template

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(
            body=path.read_bytes(), content_type="text/html", charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )
        ensure_csrf_cookie(request, response)
        return response

    return handler


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    c = console_of(request)
    result = await c.scheduler.views.readiness()
    return web.json_response(result.detail, status=200 if result.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    c = console_of(request)
    await c.metrics.refresh()
    return web.Response(body=c.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def login(request: web.Request) -> web.Response:
    c = console_of(request)
    body = await api_jobs.json_body(request)
    if not c.auth.token_matches(str(body.get("token") or "")):
        await asyncio.sleep(LOGIN_FAILURE_DELAY_S)
        return web.json_response({"error": "unauthorized", "message": "That token is not right."}, status=401)
    response = web.json_response({"ok": True})
    if c.auth.enabled:
        response.set_cookie(
            SESSION_COOKIE, c.auth.session_value, path="/", httponly=True, samesite="Strict", secure=request.secure
        )
    return response


async def logout(request: web.Request) -> web.Response:
    response = web.json_response({"ok": True})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def whoami(request: web.Request) -> web.Response:
    c = console_of(request)
    return web.json_response({"operator": c.operator.key, "auth": c.auth.enabled})


def create_web_app(settings: Settings, scheduler: SchedulerAPI) -> web.Application:
    """Build the console. Raises ``WebConfigError`` when the bind address needs a token that is not set."""
    auth = Auth(load_admin_token(settings))
    hub = StreamHub()
    console = Console(
        settings=settings,
        scheduler=scheduler,
        auth=auth,
        hub=hub,
        metrics=ConsoleMetrics(scheduler, fresh_seconds(settings.scheduler)),
        poll_seconds=max(0.2, min(settings.scheduler.progress_interval_seconds, 2.0)),
    )
    guards = GuardRegistry()
    app = web.Application(
        middlewares=[make_guard_middleware(guards), make_security_middleware(auth), make_error_middleware()]
    )
    app[CONSOLE] = console
    app[REGISTRY] = guards
    app.on_response_prepare.append(add_security_headers)

    async def on_startup(app: web.Application) -> None:
        # Results of console jobs that finished while the console was down are offered again here.
        scheduler.subscribe("web", hub.sink)
        # "*" observes every platform's events without affecting their delivery: pages showing chat jobs
        # update at once instead of at the next poll.
        scheduler.subscribe("*", hub.sink)

    async def on_shutdown(app: web.Application) -> None:
        hub.closing.set()  # lets open event streams end instead of waiting for the shutdown timeout

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)

    for path, template in PAGES.items():
        app.router.add_get(path, _page(template))
    app.router.add_get(r"/jobs/{job_id:\d+}", _page("job.html"))
    app.router.add_static("/static", _package_dir("static"), show_index=False, follow_symlinks=False)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/api/whoami", whoami)
    api_jobs.add_routes(app)
    api_admin.add_routes(app)
    return app


class GuardedSite(web.TCPSite):
    """A TCP site whose connections must send each request's headers in time (``bots.web.guard``)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, header_timeout: float) -> None:
        super().__init__(runner, host, port)
        self._header_timeout = header_timeout
        self._registry = runner.app[REGISTRY]

    async def start(self) -> None:
        server = self._runner.server
        assert server is not None
        # BaseSite.start registers the site; the listening socket is ours to create.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._registry.wrap(server, self._header_timeout), self._host, self._port, reuse_address=self._reuse_address,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


async def start_web(
    app: web.Application, host: str, port: int, web_settings: WebSettings | None = None
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on host:port (0 = any free port); returns the runner and the base URL."""
    ws = web_settings or WebSettings()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0, keepalive_timeout=ws.keepalive_timeout_seconds)
    await runner.setup()
    site = GuardedSite(runner, host, port, header_timeout=ws.header_timeout_seconds)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound}"


async def run_web(settings: Settings, scheduler: SchedulerAPI, stop: asyncio.Event) -> None:
    """Serve the console until ``stop`` is set. Raises ``WebConfigError`` (clear message) on unsafe settings."""
    app = create_web_app(settings, scheduler)
    runner, url = await start_web(app, settings.web.host, settings.web.port, settings.web)
    log.info("web console listening on %s", url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
