"""Who may use the console and how state-changing requests are protected.

- Binding: loopback by default; any other address needs the admin token (``[web] admin_token_env``).
- Auth: when a token is configured every page and API needs it, either as ``Authorization: Bearer`` or as
  the session cookie set by ``POST /login``. The cookie holds an HMAC derived from the token (no server
  state; changing the token logs everyone out). Without a token (loopback only) the console is open to
  local users, and the Host header must be a loopback name so a DNS-rebinding page cannot reach it.
- CSRF: unsafe methods need the double-submit token (cookie ``turbobot_csrf`` echoed in the
  ``X-CSRF-Token`` header, which a cross-site page cannot read or set without CORS) and, when the browser
  sends one, an Origin equal to this host. Bearer-authenticated requests are exempt: browsers never attach
  that header on their own.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from turbobot.config import Settings, read_secret

SESSION_COOKIE = "turbobot_session"
CSRF_COOKIE = "turbobot_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MIN_TOKEN_CHARS = 16

# Reachable without logging in: probes, the login page itself and the assets it needs.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/login", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebConfigError(RuntimeError):
    """The console cannot start with these settings; the message says what to change."""


def is_loopback_host(host: str) -> bool:
    """True for localhost names and loopback addresses (IPv4 127/8, IPv6 ::1), with or without [ ]."""
    h = host.strip().lower()
    if h.startswith("[") and "]" in h:
        h = h[1 : h.index("]")]
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def load_admin_token(settings: Settings) -> str | None:
    """The admin token from the environment, checked against the bind address; raises WebConfigError."""
    env = settings.web.admin_token_env
    try:
        token = read_secret(env)
    except ValueError as exc:  # ConfigError: an unreadable *_FILE
        raise WebConfigError(str(exc)) from None
    host = settings.web.host
    if token is None and not is_loopback_host(host):
        raise WebConfigError(
            f"The web console is set to listen on {host!r}, which other machines can reach, but no admin "
            f"token is set. Put a long random secret in the environment variable {env} (or a file named by "
            f"{env}_FILE), or set [web] host = \"127.0.0.1\" in config.toml."
        )
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise WebConfigError(
            f"The admin token in {env} is too short ({len(token)} characters); use at least "
            f"{MIN_TOKEN_CHARS}, e.g. the output of: python -c \"import secrets; print(secrets.token_urlsafe(32))\""
        )
    return token


class Auth:
    def __init__(self, token: str | None) -> None:
        self._token = token
        self._session = (
            hmac.new(token.encode(), b"turbobot-web-session-v1", hashlib.sha256).hexdigest() if token else ""
        )

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def token_matches(self, candidate: str) -> bool:
        if self._token is None:
            return True
        return hmac.compare_digest(candidate.encode(), self._token.encode())

    @property
    def session_value(self) -> str:
        return self._session

    def bearer_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return self._token is not None and scheme.lower() == "bearer" and self.token_matches(value.strip())

    def authenticated(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        if self.bearer_ok(request):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self._session.encode())


def host_without_port(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def wants_html(request: web.Request) -> bool:
    return not request.path.startswith(("/api/", "/media/")) and request.method in SAFE_METHODS


def json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def make_security_middleware(auth: Auth) -> Middleware:
    @web.middleware
    async def security(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Without a token the console trusts local users only; refuse foreign Host names (DNS rebinding).
        if not auth.enabled and not is_loopback_host(host_without_port(request.host)):
            return json_error(421, "bad_host", "This console only answers on localhost.")
        if not is_public(request.path) and not auth.authenticated(request):
            if wants_html(request):
                raise web.HTTPFound("/login?" + urlencode({"next": request.path_qs}))
            return json_error(401, "unauthorized", "Log in with the admin token first.")
        if request.method not in SAFE_METHODS and not auth.bearer_ok(request):
            problem = csrf_problem(request)
            if problem:
                return json_error(403, "csrf", problem)
        return await handler(request)

    return security


def csrf_problem(request: web.Request) -> str:
    """Why an unsafe browser request fails the CSRF rules ("" when it passes)."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
        return "Cross-site request refused (Origin does not match this console)."
    if request.headers.get("Sec-Fetch-Site", "") == "cross-site":
        return "Cross-site request refused."
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = request.headers.get(CSRF_HEADER, "")
    if not cookie or not sent or not hmac.compare_digest(cookie.encode(), sent.encode()):
        return "Security token missing or stale: reload the page and try again."
    return ""


def ensure_csrf_cookie(request: web.Request, response: web.StreamResponse) -> None:
    """Give the browser a CSRF token (readable by our scripts, never sent cross-site)."""
    if not request.cookies.get(CSRF_COOKIE):
        response.set_cookie(
            CSRF_COOKIE, secrets.token_urlsafe(32), path="/", samesite="Strict", secure=request.secure
        )


# Same-origin scripts, styles and media only; no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: applies to every response, errors and files included."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Content-Security-Policy", CSP)
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")
