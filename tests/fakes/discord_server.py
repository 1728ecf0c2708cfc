"""A small fake Discord (REST + gateway + CDN) on 127.0.0.1 that the real discord.py client talks to.

It speaks just enough of the wire protocol for our bot: login and application info, command sync, the
gateway handshake (HELLO, IDENTIFY -> READY, heartbeat ACK, RESUME -> replay + RESUMED), interaction
callbacks, the interaction webhook (original response edit/delete, followups), channel messages with
multipart files, and attachment downloads. Tests inject interactions (slash commands, context menus,
button clicks, modal submits, autocomplete) and read what the bot sent; errors such as 50027 (invalid
webhook token), 401 and 429 can be armed per route. Waiting is event driven (``wait_for``), never sleeps.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1420070400000
GATEWAY_PATH = "/gateway"

# Option type numbers of application commands.
OPT_SUBCOMMAND, OPT_GROUP, OPT_STRING, OPT_INTEGER, OPT_BOOLEAN, OPT_USER = 1, 2, 3, 4, 5, 6
OPT_NUMBER, OPT_ATTACHMENT = 10, 11


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py parses JSON only when Content-Type is exactly "application/json" (no charset).
    return web.Response(body=json.dumps(data).encode(), status=status, headers=headers,
                        content_type="application/json")


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


# Resolved member permissions in interaction payloads: an ordinary member (no Manage Server) and a server admin.
MEMBER_PERMISSIONS = str(2248473465835073 & ~0x20 & ~0x8)
ADMIN_PERMISSIONS = str(2248473465835073 | 0x20)


@dataclass
class SentFile:
    filename: str
    content_type: str
    data: bytes


@dataclass
class Request:
    """One REST call the bot made (for assertions)."""

    method: str
    path: str
    auth: str | None
    payload: dict[str, Any] | None
    files: list[SentFile]
    status: int = 200


@dataclass
class InteractionRecord:
    id: str
    token: str
    type: int
    channel_id: str
    user_id: str
    size_limit: int
    acked: bool = False
    callback_type: int | None = None
    callback_data: dict[str, Any] | None = None
    original_message_id: str | None = None
    ephemeral: bool = False
    expired: bool = False
    followups: list[str] = field(default_factory=list)
    loading: bool = False  # deferred "thinking" placeholder not yet replaced
    dispatched_at: float = 0.0
    acked_at: float | None = None


@dataclass
class ArmedError:
    method: str
    pattern: re.Pattern[str]
    status: int
    code: int
    message: str
    times: int
    retry_after: float | None = None


class FakeDiscord:
    """Run with ``await server.start()``; point discord.py at ``server.api_base`` and ``server.gateway_url``."""

    def __init__(self, *, token: str = "fake-bot-token", attachment_size_limit: int = 10 * 1024 * 1024) -> None:
        self.token = token
        self.attachment_size_limit = attachment_size_limit
        self.upload_cap: int | None = None  # when set, uploads above it are refused whatever was announced
        self._counter = itertools.count(1)
        self.app_id = self.new_id()
        self.bot_user = self.user_payload(self.app_id, "turbobot", bot=True)
        self.owner = self.user_payload(self.new_id(), "owner")
        self.guild_id = self.new_id()
        self.channel_id = self.new_id()
        self.messages: dict[str, dict[str, Any]] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}  # message id -> every version (create, edits)
        self.media_edits: list[tuple[str, str, bytes]] = []  # (message id, file name, bytes) uploaded by edits
        self.files: dict[str, SentFile] = {}  # CDN path -> file
        self.interactions: dict[str, InteractionRecord] = {}
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[Request] = []
        self.cdn_downloads: list[str] = []  # paths of attachment downloads
        self.identifies = 0
        self.resumes = 0
        self.heartbeats = 0
        self.errors: list[ArmedError] = []
        self._events: list[tuple[int, dict[str, Any]]] = []  # (seq, dispatch frame) for RESUME replay
        self._seq = 0
        self._session_id = "fake-session"
        self._ws: web.WebSocketResponse | None = None
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.app = self._build_app()

    # --- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{GATEWAY_PATH}"

    # --- helpers for tests --------------------------------------------------------------------
    def new_id(self) -> str:
        """A snowflake: creation time in ms since the Discord epoch, shifted, plus a counter."""
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((ms << 22) | (next(self._counter) & 0x3FFFFF))

    def user_payload(self, user_id: str, name: str, *, bot: bool = False) -> dict[str, Any]:
        return {
            "id": user_id,
            "username": name,
            "global_name": name,
            "discriminator": "0",
            "avatar": None,
            "bot": bot,
            "public_flags": 0,
        }

    def new_user(self, name: str = "alice") -> dict[str, Any]:
        return self.user_payload(self.new_id(), name)

    def arm_error(
        self,
        method: str,
        path_regex: str,
        *,
        status: int,
        code: int = 0,
        message: str = "error",
        times: int = 1,
        retry_after: float | None = None,
    ) -> None:
        """Make the next ``times`` matching REST calls fail (e.g. 401/50027 or 429 with retry_after)."""
        self.errors.append(ArmedError(method, re.compile(path_regex), status, code, message, times, retry_after))

    def expire_token(self, interaction_id: str) -> None:
        """The interaction's 15-minute token is over: its webhook routes now answer 401/50027."""
        self.interactions[interaction_id].expired = True

    def add_file(self, filename: str, data: bytes, content_type: str) -> str:
        """Put a file on the fake CDN; returns its URL."""
        path = f"/attachments/{self.channel_id}/{self.new_id()}/{filename}"
        self.files[path] = SentFile(filename, content_type, data)
        return self.base_url + path

    def attachment(
        self,
        filename: str,
        data: bytes,
        content_type: str | None,
        *,
        width: int | None = None,
        height: int | None = None,
        size: int | None = None,
    ) -> dict[str, Any]:
        """An attachment payload (as Discord reports it) whose file is served by the fake CDN."""
        url = self.add_file(filename, data, content_type or "application/octet-stream")
        att: dict[str, Any] = {
            "id": self.new_id(),
            "filename": filename,
            "size": len(data) if size is None else size,
            "url": url,
            "proxy_url": url,
        }
        if content_type is not None:
            att["content_type"] = content_type
        if width is not None and height is not None:
            att["width"], att["height"] = width, height
        return att

    def user_message(self, author: dict[str, Any], content: str = "", attachments: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A message some user posted in the test channel (target of context-menu commands)."""
        msg = self._message(author, content, attachments=attachments or [])
        self.messages[msg["id"]] = msg
        return msg

    def messages_in(self, channel_id: str | None = None) -> list[dict[str, Any]]:
        cid = channel_id or self.channel_id
        return [m for m in self.messages.values() if m["channel_id"] == cid]

    def file_bytes(self, attachment: dict[str, Any]) -> bytes:
        path = attachment["url"][len(self.base_url):]
        return self.files[path].data

    async def wait_for(self, predicate: Callable[[], Any], within: float = 30.0) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked after every change the bot makes)."""

        async def waiter() -> Any:
            async with self._changed:
                while True:
                    value = predicate()
                    if value:
                        return value
                    await self._changed.wait()

        return await asyncio.wait_for(waiter(), within)

    async def wait_identified(self, count: int = 1, within: float = 30.0) -> None:
        await self.wait_for(lambda: self.identifies >= count and self._ws is not None, within)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def drop_gateway(self, code: int = 4000) -> None:
        """Close the gateway socket as Discord does on trouble; the client should RESUME."""
        assert self._ws is not None
        ws, self._ws = self._ws, None
        await ws.close(code=code)

    # --- interactions -------------------------------------------------------------------------
    def _find_command(self, name: str, guild_id: str | None) -> dict[str, Any] | None:
        pools = ([self.guild_commands.get(guild_id, [])] if guild_id else []) + [self.global_commands]
        for pool in pools:
            for cmd in pool:
                if cmd["name"] == name:
                    return cmd
        return None

    def _interaction(
        self,
        itype: int,
        data: dict[str, Any],
        user: dict[str, Any],
        *,
        dm: bool = False,
        message: dict[str, Any] | None = None,
        size_limit: int | None = None,
        permissions: str = MEMBER_PERMISSIONS,
        nsfw: bool = False,
    ) -> dict[str, Any]:
        iid = self.new_id()
        token = f"itoken-{iid}"
        limit = self.attachment_size_limit if size_limit is None else size_limit
        payload: dict[str, Any] = {
            "id": iid,
            "application_id": self.app_id,
            "type": itype,
            "data": data,
            "token": token,
            "version": 1,
            "locale": "en-US",
            "app_permissions": "2248473465835073",
            "attachment_size_limit": limit,
            "entitlements": [],
        }
        if dm:
            channel = {"id": self.channel_id, "type": 1, "recipients": [user], "flags": 0}
            payload.update(channel_id=self.channel_id, channel=channel, user=user, context=1,
                           authorizing_integration_owners={"1": user["id"]})
        else:
            channel = {
                "id": self.channel_id,
                "type": 0,
                "guild_id": self.guild_id,
                "name": "general",
                "position": 0,
                "permission_overwrites": [],
                "nsfw": nsfw,
                "parent_id": None,
                "flags": 0,
                "rate_limit_per_user": 0,
                "topic": None,
                "last_message_id": None,
            }
            member = {
                "user": user,
                "roles": [],
                "joined_at": _now_iso(),
                "deaf": False,
                "mute": False,
                "flags": 0,
                "pending": False,
                "nick": None,
                "avatar": None,
                "premium_since": None,
                "permissions": permissions,
            }
            payload.update(guild_id=self.guild_id, guild_locale="en-US", channel_id=self.channel_id,
                           channel=channel, member=member, context=0,
                           authorizing_integration_owners={"0": self.guild_id})
        if message is not None:
            payload["message"] = message
        self.interactions[iid] = InteractionRecord(
            id=iid, token=token, type=itype, channel_id=self.channel_id, user_id=user["id"], size_limit=limit,
            dispatched_at=asyncio.get_running_loop().time(),
        )
        return payload

    def _typed_options(self, spec: list[dict[str, Any]], given: dict[str, Any], focused: str | None,
                       resolved: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        by_name = {o["name"]: o for o in spec}
        for name, value in given.items():
            opt = by_name.get(name)
            if opt is None:
                raise AssertionError(f"option {name!r} is not registered (have {sorted(by_name)})")
            entry: dict[str, Any] = {"name": name, "type": opt["type"]}
            if opt["type"] == OPT_ATTACHMENT:
                entry["value"] = value["id"]
                resolved.setdefault("attachments", {})[value["id"]] = value
            elif opt["type"] == OPT_USER:
                entry["value"] = value["id"]
                resolved.setdefault("users", {})[value["id"]] = value
            else:
                entry["value"] = value
            if name == focused:
                entry["focused"] = True
            out.append(entry)
        return out

    def _command_data(self, command: str, options: dict[str, Any], focused: str | None) -> dict[str, Any]:
        parts = command.split()
        cmd = self._find_command(parts[0], self.guild_id)
        if cmd is None:
            raise AssertionError(f"/{parts[0]} was never registered with Discord (synced: "
                                 f"{[c['name'] for c in self.global_commands + self.guild_commands.get(self.guild_id, [])]})")
        resolved: dict[str, Any] = {}
        data: dict[str, Any] = {"id": cmd["id"], "name": cmd["name"], "type": 1}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        if len(parts) == 1:
            data["options"] = self._typed_options(cmd.get("options", []), options, focused, resolved)
        else:
            sub = next(o for o in cmd.get("options", []) if o["name"] == parts[1])
            data["options"] = [{"name": sub["name"], "type": sub["type"],
                                "options": self._typed_options(sub.get("options", []), options, focused, resolved)}]
        if resolved:
            data["resolved"] = resolved
        return data

    async def slash(self, command: str, user: dict[str, Any], /, *, dm: bool = False,
                    size_limit: int | None = None, permissions: str = "", nsfw: bool = False,
                    **options: Any) -> str:
        """Dispatch a slash command ("t2v" or "admin block"); returns the interaction id. ``permissions``:
        the member's resolved permissions (default: an ordinary member; ADMIN_PERMISSIONS for a server admin);
        ``nsfw``: the channel is flagged age-restricted."""
        data = self._command_data(command, options, None)
        payload = self._interaction(2, data, user, dm=dm, size_limit=size_limit,
                                    permissions=permissions or MEMBER_PERMISSIONS, nsfw=nsfw)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload["id"]

    async def autocomplete(self, command: str, user: dict[str, Any], focused: str, /, **options: Any) -> str:
        data = self._command_data(command, options, focused)
        payload = self._interaction(4, data, user)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload["id"]

    async def context_menu(self, name: str, user: dict[str, Any], target: dict[str, Any],
                           size_limit: int | None = None) -> str:
        cmd = self._find_command(name, self.guild_id)
        if cmd is None:
            raise AssertionError(f"context menu {name!r} was never registered")
        data = {"id": cmd["id"], "name": name, "type": cmd["type"], "target_id": target["id"],
                "resolved": {"messages": {target["id"]: target}}}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        payload = self._interaction(2, data, user, size_limit=size_limit)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload["id"]

    async def click(self, message_id: str, custom_id: str, user: dict[str, Any]) -> str:
        """Click the button ``custom_id`` on a stored message (it must be there, as on Discord)."""
        message = self.messages[message_id]
        ids = [c.get("custom_id") for row in message.get("components", []) for c in row.get("components", [])]
        if custom_id not in ids:
            raise AssertionError(f"message {message_id} has no button {custom_id!r} (has {ids})")
        data = {"custom_id": custom_id, "component_type": 2}
        payload = self._interaction(3, data, user, message=message)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload["id"]

    async def submit_modal(self, interaction_id: str, user: dict[str, Any], values: dict[str, str]) -> str:
        """Submit the modal the bot opened in answer to ``interaction_id`` with text values by custom_id."""
        rec = self.interactions[interaction_id]
        assert rec.callback_type == 9 and rec.callback_data is not None, "the bot did not open a modal"
        modal = rec.callback_data

        def fill(components: list[dict[str, Any]]) -> list[dict[str, Any]]:
            out = []
            for comp in components:
                if comp["type"] == 1:
                    out.append({"type": 1, "components": fill(comp["components"])})
                elif comp["type"] == 18:
                    out.append({"type": 18, "component": fill([comp["component"]])[0]})
                elif comp["type"] == 4:
                    value = values.get(comp["custom_id"], comp.get("value", ""))
                    out.append({"type": 4, "custom_id": comp["custom_id"], "value": value})
            return out

        data = {"custom_id": modal["custom_id"], "components": fill(modal["components"])}
        payload = self._interaction(5, data, user)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload["id"]

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        self._seq += 1
        frame = {"op": 0, "t": event, "s": self._seq, "d": data}
        self._events.append((self._seq, frame))
        if self._ws is not None:  # otherwise it is replayed when the client RESUMEs
            await self._ws.send_str(json.dumps(frame))

    async def redispatch(self, interaction_id: str) -> None:
        """Send an interaction again, as a gateway replay would (same id and token)."""
        frame = next(f for _seq, f in self._events if f["t"] == "INTERACTION_CREATE" and f["d"]["id"] == interaction_id)
        await self.dispatch("INTERACTION_CREATE", frame["d"])

    def response_of(self, interaction_id: str) -> InteractionRecord:
        return self.interactions[interaction_id]

    def original(self, interaction_id: str) -> dict[str, Any] | None:
        mid = self.interactions[interaction_id].original_message_id
        return self.messages.get(mid) if mid else None

    async def delivered(self, interaction_id: str, within: float = 30) -> dict[str, Any]:
        """The status message of a job once it carries the result attachment (not a live preview)."""

        def done() -> dict[str, Any] | None:
            msg = self.original(interaction_id)
            results = [a for a in (msg or {}).get("attachments", []) if a["filename"] != "preview.gif"]
            return msg if msg is not None and results else None

        return await self.wait_for(done, within)

    # --- app ----------------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        p = API_PREFIX
        r = app.router
        r.add_get(GATEWAY_PATH, self._gateway)
        r.add_get("/attachments/{rest:.+}", self._cdn)
        r.add_route("*", p + "/{path:.*}", self._rest)
        return app

    async def _cdn(self, request: web.Request) -> web.Response:
        self.cdn_downloads.append(request.path)
        f = self.files.get(request.path)
        if f is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=f.data, content_type=f.content_type)

    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any] | None, list[SentFile]]:
        if request.content_type.startswith("multipart/"):
            payload: dict[str, Any] | None = None
            files: list[SentFile] = []
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    data = await part.read(decode=False)
                    files.append(SentFile(part.filename or "file", part.headers.get("Content-Type", ""), bytes(data)))
            return payload, files
        raw = await request.read()
        if not raw:
            return None, []
        return json.loads(raw), []

    def _error(self, status: int, code: int, message: str, retry_after: float | None = None) -> web.Response:
        body: dict[str, Any] = {"message": message, "code": code}
        headers = {}
        if status == 429:
            body["retry_after"] = retry_after or 0.0
            body["global"] = False
            headers = {"Via": "1.1 google", "Retry-After": str(retry_after or 0), "X-RateLimit-Scope": "user"}
        return _json(body, status=status, headers=headers)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        method = request.method
        payload, files = await self._read_body(request)
        rec = Request(method, path, request.headers.get("Authorization"), payload, files)
        self.requests.append(rec)
        for armed in self.errors:
            if armed.times > 0 and armed.method == method and armed.pattern.search(path):
                armed.times -= 1
                rec.status = armed.status
                await self._notify()
                return self._error(armed.status, armed.code, armed.message, armed.retry_after)
        try:
            response = await self._route(method, path, request, payload, files)
        finally:
            await self._notify()
        rec.status = response.status
        return response

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bot {self.token}"

    async def _route(self, method: str, path: str, request: web.Request, payload: dict[str, Any] | None,
                     files: list[SentFile]) -> web.Response:
        seg = path.strip("/").split("/")
        # Interaction callback and webhook routes are authorised by the interaction token in the URL.
        if seg[0] == "interactions" and len(seg) == 4 and seg[3] == "callback" and method == "POST":
            return self._callback(seg[1], seg[2], payload or {}, files, request)
        if seg[0] == "webhooks" and len(seg) >= 3:
            return self._webhook(method, seg, payload, files, request)
        if not self._authorized(request):
            return self._error(401, 0, "401: Unauthorized")
        if path == "/users/@me" and method == "GET":
            return _json(self.bot_user)
        if path == "/oauth2/applications/@me" and method == "GET":
            return _json(self._app_info())
        if path in ("/gateway/bot", "/gateway") and method == "GET":
            return _json({"url": self.gateway_url, "shards": 1, "session_start_limit": {
                "total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}})
        if seg[0] == "applications" and seg[-1] == "commands":
            return self._commands(method, seg, payload)
        if seg[0] == "channels" and len(seg) >= 3 and seg[2] == "messages":
            return self._channel_messages(method, seg, payload, files, request)
        return self._error(404, 0, f"404: Not Found ({method} {path})")

    def _app_info(self) -> dict[str, Any]:
        return {
            "id": self.app_id,
            "name": "turbobot",
            "icon": None,
            "description": "",
            "rpc_origins": [],
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner,
            "summary": "",
            "verify_key": "0" * 64,
            "flags": 0,
            "team": None,
        }

    def _commands(self, method: str, seg: list[str], payload: Any) -> web.Response:
        guild_id = seg[3] if len(seg) == 5 and seg[2] == "guilds" else None
        if method == "PUT":
            cmds = []
            for c in payload or []:
                cmd = dict(c)
                cmd["id"] = self.new_id()
                cmd["application_id"] = self.app_id
                cmd["version"] = self.new_id()
                cmd.setdefault("type", 1)
                cmd.setdefault("description", "")  # Discord answers "" for context menus
                cmd.setdefault("dm_permission", True)
                cmd.setdefault("default_member_permissions", None)
                if guild_id:
                    cmd["guild_id"] = guild_id
                cmds.append(cmd)
            if guild_id:
                self.guild_commands[guild_id] = cmds
            else:
                self.global_commands = cmds
            return _json(cmds)
        if method == "GET":
            return _json(self.guild_commands.get(guild_id, []) if guild_id else self.global_commands)
        return self._error(405, 0, "method not allowed")

    # --- messages ----------------------------------------------------------------------------
    def _message(self, author: dict[str, Any], content: str, *, attachments: list[dict[str, Any]],
                 components: list[dict[str, Any]] | None = None, flags: int = 0,
                 reference: dict[str, Any] | None = None, webhook_id: str | None = None,
                 channel_id: str | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "id": self.new_id(),
            "channel_id": channel_id or self.channel_id,
            "author": author,
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": attachments,
            "embeds": [],
            "pinned": False,
            "type": 19 if reference else 0,
            "flags": flags,
            "components": components or [],
        }
        if reference:
            msg["message_reference"] = reference
        if webhook_id:
            msg["webhook_id"] = webhook_id
            msg["application_id"] = self.app_id
        return msg

    def _store_files(self, files: list[SentFile], payload: dict[str, Any] | None, keep: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Attachments of a sent/edited message: kept old ones (by id) plus the uploaded files."""
        atts = list(keep)
        for i, f in enumerate(files):
            url = self.add_file(f.filename, f.data, f.content_type or "application/octet-stream")
            desc = {}
            for a in (payload or {}).get("attachments", []) or []:
                if str(a.get("id")) == str(i):
                    desc = a
            atts.append({"id": self.new_id(), "filename": desc.get("filename", f.filename), "size": len(f.data),
                         "url": url, "proxy_url": url, "content_type": f.content_type})
        return atts

    def _too_large(self, files: list[SentFile], limit: int) -> web.Response | None:
        if self.upload_cap is not None:
            limit = min(limit, self.upload_cap)
        if sum(len(f.data) for f in files) > limit:
            return self._error(413, 40005, "Request entity too large")
        return None

    def _apply_edit(self, msg: dict[str, Any], payload: dict[str, Any] | None, files: list[SentFile]) -> None:
        payload = payload or {}
        if "content" in payload:
            msg["content"] = payload["content"] or ""
        if "components" in payload:
            msg["components"] = payload["components"] or []
        if "embeds" in payload:
            msg["embeds"] = payload["embeds"] or []
        if "attachments" in payload or files:
            # Kept attachments are listed by their snowflake id; new uploads by their index ("0", "1", ...).
            kept_ids = {str(a["id"]) for a in payload.get("attachments", []) or []}
            keep = [a for a in msg["attachments"] if str(a["id"]) in kept_ids]
            msg["attachments"] = self._store_files(files, payload, keep)
            # Media edits, recorded: (message id, file name, bytes) of each file uploaded with an edit.
            self.media_edits.extend((msg["id"], f.filename, f.data) for f in files)
        msg["edited_timestamp"] = _now_iso()
        self._snapshot(msg)

    def _new_message_from(self, payload: dict[str, Any] | None, files: list[SentFile], *,
                          channel_id: str, webhook: bool, ephemeral_ok: bool) -> dict[str, Any]:
        payload = payload or {}
        flags = int(payload.get("flags", 0) or 0)
        if not ephemeral_ok:
            flags &= ~64
        ref = payload.get("message_reference")
        msg = self._message(self.bot_user, payload.get("content") or "",
                            attachments=self._store_files(files, payload, []),
                            components=payload.get("components") or [], flags=flags,
                            reference=ref, webhook_id=self.app_id if webhook else None, channel_id=channel_id)
        allowed = payload.get("allowed_mentions")
        users = re.findall(r"<@!?(\d+)>", msg["content"])
        if allowed is not None and "users" not in (allowed.get("parse") or []):
            users = [u for u in users if u in {str(x) for x in allowed.get("users", [])}]
        msg["mentions"] = [self.user_payload(u, f"user{u}") for u in users]
        self.messages[msg["id"]] = msg
        self._snapshot(msg)
        return msg

    def _snapshot(self, msg: dict[str, Any]) -> None:
        self.history.setdefault(msg["id"], []).append(copy.deepcopy(msg))

    def _channel_messages(self, method: str, seg: list[str], payload: dict[str, Any] | None,
                          files: list[SentFile], request: web.Request) -> web.Response:
        channel_id = seg[1]
        if len(seg) == 3 and method == "POST":
            if (resp := self._too_large(files, self.attachment_size_limit)) is not None:
                return resp
            ref = (payload or {}).get("message_reference")
            if ref and ref.get("message_id") not in self.messages and ref.get("fail_if_not_exists", True):
                return self._error(400, 50035, "Invalid Form Body: Unknown message")
            msg = self._new_message_from(payload, files, channel_id=channel_id, webhook=False, ephemeral_ok=False)
            return _json(msg)
        if len(seg) == 4:
            msg = self.messages.get(seg[3])
            if msg is None or msg["channel_id"] != channel_id:
                return self._error(404, 10008, "Unknown Message")
            if method == "GET":
                return _json(msg)
            if method == "PATCH":
                if msg["author"]["id"] != self.bot_user["id"]:
                    return self._error(403, 50005, "Cannot edit a message authored by another user")
                self._apply_edit(msg, payload, files)
                return _json(msg)
            if method == "DELETE":
                del self.messages[seg[3]]
                return web.Response(status=204)
        return self._error(405, 0, "method not allowed")

    # --- interaction callback and webhook -----------------------------------------------------
    def _callback(self, iid: str, token: str, payload: dict[str, Any], files: list[SentFile],
                  request: web.Request) -> web.Response:
        rec = self.interactions.get(iid)
        if rec is None or rec.token != token:
            return self._error(404, 10062, "Unknown interaction")
        if rec.acked:
            return self._error(400, 40060, "Interaction has already been acknowledged.")
        ctype = int(payload.get("type", 0))
        data = payload.get("data") or {}
        rec.acked = True
        rec.acked_at = asyncio.get_running_loop().time()
        rec.callback_type = ctype
        rec.callback_data = data
        resource: dict[str, Any] | None = None
        flags = int(data.get("flags", 0) or 0)
        rec.ephemeral = bool(flags & 64)
        if ctype in (4, 5):  # message now, or "thinking" placeholder
            if (resp := self._too_large(files, rec.size_limit)) is not None:
                rec.acked = False
                return resp
            body = dict(data)
            if ctype == 5:
                body.setdefault("content", "")
            msg = self._new_message_from(body, files, channel_id=rec.channel_id, webhook=True, ephemeral_ok=True)
            msg["interaction_metadata"] = {"id": iid, "type": rec.type, "user": self.user_payload(rec.user_id, "u"),
                                           "authorizing_integration_owners": {}}
            rec.original_message_id = msg["id"]
            rec.loading = ctype == 5
            resource = {"type": ctype, "message": msg}
        elif ctype in (6, 7):  # component: deferred update / update the message the button is on
            msg_id = self._component_message_id(iid)
            rec.original_message_id = msg_id
            if ctype == 7 and msg_id in self.messages:
                self._apply_edit(self.messages[msg_id], data, files)
                resource = {"type": ctype, "message": self.messages[msg_id]}
        elif ctype in (8, 9):
            resource = None
        else:
            return self._error(400, 50035, f"Invalid callback type {ctype}")
        body: dict[str, Any] = {"interaction": {
            "id": iid, "type": rec.type, "response_message_id": rec.original_message_id,
            "response_message_loading": ctype == 5, "response_message_ephemeral": rec.ephemeral}}
        if resource is not None:
            body["resource"] = resource
        if request.query.get("with_response") in ("1", "true", "True"):
            return _json(body)
        return web.Response(status=204)

    def _component_message_id(self, iid: str) -> str | None:
        # The clicked message is in the interaction payload we dispatched.
        for _seq, frame in reversed(self._events):
            d = frame["d"]
            if frame["t"] == "INTERACTION_CREATE" and d.get("id") == iid and "message" in d:
                return d["message"]["id"]
        return None

    def _webhook(self, method: str, seg: list[str], payload: dict[str, Any] | None, files: list[SentFile],
                 request: web.Request) -> web.Response:
        app_id, token = seg[1], seg[2]
        rec = next((r for r in self.interactions.values() if r.token == token), None)
        if rec is None or app_id != self.app_id:
            return self._error(404, 10015, "Unknown Webhook")
        if rec.expired:
            return self._error(401, 50027, "Invalid Webhook Token")
        if len(seg) == 3 and method == "POST":  # followup
            if not rec.acked:
                return self._error(404, 10015, "Unknown Webhook")
            if (resp := self._too_large(files, rec.size_limit)) is not None:
                return resp
            original = self.messages.get(rec.original_message_id or "")
            if rec.loading and original is not None:
                # As on Discord: the first followup after a deferral replaces the "thinking" placeholder.
                rec.loading = False
                self._apply_edit(original, payload, files)
                return _json(original)
            msg = self._new_message_from(payload, files, channel_id=rec.channel_id, webhook=True, ephemeral_ok=True)
            rec.followups.append(msg["id"])
            return _json(msg)
        if len(seg) == 5 and seg[3] == "messages":
            mid = rec.original_message_id if seg[4] == "@original" else seg[4]
            if mid is None or mid not in self.messages:
                return self._error(404, 10008, "Unknown Message")
            if mid != rec.original_message_id and mid not in rec.followups:
                return self._error(404, 10008, "Unknown Message")
            msg = self.messages[mid]
            if method == "GET":
                return _json(msg)
            if method == "PATCH":
                if (resp := self._too_large(files, rec.size_limit)) is not None:
                    return resp
                if mid == rec.original_message_id:
                    rec.loading = False
                self._apply_edit(msg, payload, files)
                return _json(msg)
            if method == "DELETE":
                del self.messages[mid]
                return web.Response(status=204)
        return self._error(405, 0, "method not allowed")

    # --- gateway ------------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op = frame.get("op")
                if op == 1:
                    self.heartbeats += 1
                    await ws.send_str(json.dumps({"op": 11}))
                elif op == 2:
                    if frame["d"].get("token") != self.token:
                        await ws.close(code=4004, message=b"Authentication failed.")
                        break
                    self.identifies += 1
                    self._ws = ws
                    self._seq += 1
                    ready = {"v": 10, "user": self.bot_user, "guilds": [], "session_id": self._session_id,
                             "resume_gateway_url": self.gateway_url, "shard": [0, 1],
                             "application": {"id": self.app_id, "flags": 0}}
                    await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": self._seq, "d": ready}))
                    await self._notify()
                elif op == 6:
                    d = frame["d"]
                    if d.get("token") != self.token or d.get("session_id") != self._session_id:
                        await ws.send_str(json.dumps({"op": 9, "d": False}))
                        continue
                    self.resumes += 1
                    self._ws = ws
                    for seq, ev in self._events:
                        if seq > (d.get("seq") or 0):
                            await ws.send_str(json.dumps(ev))
                    self._seq += 1
                    await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": self._seq, "d": {}}))
                    await self._notify()
        finally:
            if self._ws is ws:
                self._ws = None
        return ws
