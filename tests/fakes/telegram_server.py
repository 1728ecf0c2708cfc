"""A small fake Telegram Bot API on 127.0.0.1 for end-to-end tests through the real PTB client.

It speaks the wire protocol PTB uses (form-encoded or multipart POSTs to ``/bot<token>/<method>``, JSON
replies ``{"ok": ..., "result": ...}``, file downloads from ``/file/bot<token>/<path>``) and keeps the
state a bot can observe: messages per chat (so edits, replies and "message is not modified" behave like
Telegram), uploaded files, and the update queue served by long-polling ``getUpdates``.

Tests act as users through ``send_text`` / ``send_photo`` / ``send_document`` / ``edit_text`` / ``click``
and read what the bot did through ``calls`` and ``wait_for``. Faults are injected with ``fail_next``
(e.g. a 429 with ``retry_after``).
"""

from __future__ import annotations

import asyncio
import html
import html.parser
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# Parameters PTB sends JSON-encoded inside form fields.
_JSON_FIELDS = {
    "reply_markup",
    "reply_parameters",
    "entities",
    "caption_entities",
    "allowed_updates",
    "commands",
    "scope",
    "link_preview_options",
    "media",
}
_INT_FIELDS = {"message_id", "offset", "limit", "timeout", "duration", "width", "height", "cache_time"}
_MEDIA_METHODS = {
    "sendVideo": "video",
    "sendPhoto": "photo",
    "sendDocument": "document",
    "sendAnimation": "animation",
}
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are exactly "
    "the same as a current content and reply markup of the message"
)


@dataclass
class Call:
    """One Bot API request the bot made."""

    method: str
    params: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    status: int = 200
    result: Any = None
    at: float = 0.0


@dataclass
class _Fault:
    method: str
    status: int
    description: str
    retry_after: int | None
    remaining: int


class FakeTelegram:
    """The fake server. ``async with FakeTelegram(token) as tg:`` starts it on a free local port."""

    def __init__(
        self,
        token: str,
        *,
        bot_id: int = 7000001,
        username: str = "turbo_test_bot",
        max_upload_bytes: int = 50 * 1024 * 1024,
        max_download_bytes: int = 20 * 1024 * 1024,
    ) -> None:
        self.token = token
        self.bot_user = {"id": bot_id, "is_bot": True, "first_name": "Turbo", "username": username}
        self.max_upload_bytes = max_upload_bytes
        self.max_download_bytes = max_download_bytes
        self.calls: list[Call] = []
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}
        self.raw: dict[tuple[int, int], str] = {}  # text/caption of bot messages as sent (HTML before parsing)
        self.uploads: list[tuple[str, bytes]] = []  # (kind, bytes) of every media upload accepted
        # editMessageMedia calls that succeeded: (chat id, message id, media type, bytes), in order.
        self.media_edits: list[tuple[int, int, str, bytes]] = []
        self.files: dict[str, bytes] = {}  # file_id -> bytes actually stored
        self.file_sizes: dict[str, int] = {}  # file_id -> size Telegram reports (may exceed the bytes)
        self.file_paths: dict[str, str] = {}  # file_path -> file_id
        self.callback_answers: dict[str, dict[str, Any]] = {}
        self.commands: list[dict[str, Any]] = []
        self.chat_admins: dict[int, set[int]] = {}  # chat id -> user ids getChatMember reports as administrators
        self.webhook_url = ""
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._file_ids = itertools.count(1)
        self._callback_ids = itertools.count(1)
        self._msg_ids: dict[int, itertools.count[int]] = {}
        self._faults: list[_Fault] = []
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> FakeTelegram:
        self._closing = False
        app = web.Application(client_max_size=self.max_upload_bytes + 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._handle_file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        # Long polls left behind by a client that went away end now, not at their timeout.
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # --- test side: users act -------------------------------------------------------------------
    @staticmethod
    def user(user_id: int, first_name: str = "Ann", username: str | None = None) -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": first_name, "username": username or f"u{user_id}"}

    @staticmethod
    def private_chat(user: dict[str, Any]) -> dict[str, Any]:
        return {"id": user["id"], "type": "private", "first_name": user["first_name"]}

    @staticmethod
    def group_chat(chat_id: int = -100123, title: str = "Test group") -> dict[str, Any]:
        return {"id": chat_id, "type": "supergroup", "title": title}

    def _next_message_id(self, chat_id: int) -> int:
        counter = self._msg_ids.setdefault(chat_id, itertools.count(1))
        return next(counter)

    def _new_message(
        self,
        chat: dict[str, Any],
        sender: dict[str, Any],
        *,
        reply_to: dict[str, Any] | None = None,
        **content: Any,
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "message_id": self._next_message_id(chat["id"]),
            "date": int(time.time()),
            "chat": chat,
            "from": sender,
            **{k: v for k, v in content.items() if v is not None},
        }
        if reply_to is not None:
            msg["reply_to_message"] = self._shallow(reply_to)
        self.messages[(chat["id"], msg["message_id"])] = msg
        return msg

    @staticmethod
    def _shallow(msg: dict[str, Any]) -> dict[str, Any]:
        # Telegram does not nest reply_to_message more than one level.
        return {k: v for k, v in msg.items() if k != "reply_to_message"}

    @staticmethod
    def _command_entities(text: str | None) -> list[dict[str, Any]] | None:
        if not text or not text.startswith("/"):
            return None
        end = len(text.split(maxsplit=1)[0])
        return [{"type": "bot_command", "offset": 0, "length": end}]

    async def _push(self, update: dict[str, Any]) -> dict[str, Any]:
        update["update_id"] = next(self._update_ids)
        async with self._changed:
            self._updates.append(update)
            self._changed.notify_all()
        return update

    async def send_text(
        self, chat: dict[str, Any], user: dict[str, Any], text: str, *, reply_to: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A user writes ``text`` (a command gets its bot_command entity, as Telegram does)."""
        msg = self._new_message(chat, user, text=text, entities=self._command_entities(text), reply_to=reply_to)
        await self._push({"message": msg})
        return msg

    def add_file(self, data: bytes, *, reported_size: int | None = None, ext: str = "jpg") -> tuple[str, str]:
        """Store a file as Telegram would; returns (file_id, file_unique_id)."""
        n = next(self._file_ids)
        file_id = f"FILE{n:04d}"
        self.files[file_id] = data
        self.file_sizes[file_id] = len(data) if reported_size is None else reported_size
        self.file_paths[f"files/file_{n}.{ext}"] = file_id
        return file_id, f"U{n:04d}"

    async def send_photo(
        self,
        chat: dict[str, Any],
        user: dict[str, Any],
        data: bytes,
        *,
        width: int,
        height: int,
        caption: str | None = None,
        reported_size: int | None = None,
        reply_to: dict[str, Any] | None = None,
        post: bool = True,
    ) -> dict[str, Any]:
        """A user sends a (compressed) photo, optionally with a caption. Two sizes, like Telegram."""
        thumb_id, thumb_uid = self.add_file(data[:100] or b"x")
        file_id, uid = self.add_file(data, reported_size=reported_size)
        photo = [
            {"file_id": thumb_id, "file_unique_id": thumb_uid, "width": 90, "height": 90, "file_size": 100},
            {
                "file_id": file_id,
                "file_unique_id": uid,
                "width": width,
                "height": height,
                "file_size": self.file_sizes[file_id],
            },
        ]
        msg = self._new_message(
            chat, user, photo=photo, caption=caption, caption_entities=self._command_entities(caption),
            reply_to=reply_to,
        )
        if post:
            await self._push({"message": msg})
        return msg

    async def send_document(
        self,
        chat: dict[str, Any],
        user: dict[str, Any],
        data: bytes,
        *,
        mime_type: str,
        file_name: str,
        caption: str | None = None,
        reported_size: int | None = None,
        reply_to: dict[str, Any] | None = None,
        post: bool = True,
    ) -> dict[str, Any]:
        """A user sends a file as a document (original bytes, any type)."""
        file_id, uid = self.add_file(data, reported_size=reported_size, ext=file_name.rsplit(".", 1)[-1])
        document = {
            "file_id": file_id,
            "file_unique_id": uid,
            "file_name": file_name,
            "mime_type": mime_type,
            "file_size": self.file_sizes[file_id],
        }
        msg = self._new_message(
            chat, user, document=document, caption=caption, caption_entities=self._command_entities(caption),
            reply_to=reply_to,
        )
        if post:
            await self._push({"message": msg})
        return msg

    async def edit_text(self, msg: dict[str, Any], new_text: str) -> dict[str, Any]:
        """A user edits their message: Telegram sends an ``edited_message`` update."""
        msg["text"] = new_text
        msg["entities"] = self._command_entities(new_text)
        msg["edit_date"] = int(time.time())
        await self._push({"edited_message": dict(msg)})
        return msg

    async def click(self, user: dict[str, Any], msg: dict[str, Any], data: str) -> str:
        """A user presses an inline button with ``data`` on ``msg``; returns the callback query id."""
        current = self.messages.get((msg["chat"]["id"], msg["message_id"]), msg)
        qid = f"CB{next(self._callback_ids)}"
        await self._push(
            {
                "callback_query": {
                    "id": qid,
                    "from": user,
                    "message": self._shallow(current),
                    "chat_instance": f"ci{msg['chat']['id']}",
                    "data": data,
                }
            }
        )
        return qid

    # --- test side: faults and observation ------------------------------------------------------
    def fail_next(
        self,
        method: str,
        *,
        status: int = 429,
        description: str = "Too Many Requests: retry after 1",
        retry_after: int | None = 1,
        times: int = 1,
    ) -> None:
        """Make the next ``times`` calls of ``method`` fail (default: a flood-control 429)."""
        self._faults.append(_Fault(method, status, description, retry_after if status == 429 else None, times))

    def calls_of(self, method: str, chat_id: int | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.method == method and (chat_id is None or str(c.params.get("chat_id")) == str(chat_id))
        ]

    def sent_to(self, chat_id: int) -> list[dict[str, Any]]:
        """Messages the bot has in ``chat_id`` now (after edits and deletions), oldest first."""
        out = [m for (cid, _), m in sorted(self.messages.items()) if cid == chat_id]
        return [m for m in out if m["from"].get("id") == self.bot_user["id"]]

    def message(self, chat_id: int, message_id: int) -> dict[str, Any] | None:
        return self.messages.get((chat_id, message_id))

    async def wait_for(self, predicate: Callable[[], Any], within: float = 45.0) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked after every request the bot makes)."""
        async def _wait() -> Any:
            async with self._changed:
                while True:
                    value = predicate()
                    if value:
                        return value
                    await self._changed.wait()

        return await asyncio.wait_for(_wait(), within)

    async def wait_call(
        self, method: str, where: Callable[[Call], bool] = lambda c: True, *, count: int = 1, within: float = 30.0
    ) -> list[Call]:
        """Wait until the bot has made ``count`` successful calls of ``method`` matching ``where``."""
        def found() -> list[Call] | None:
            hits = [c for c in self.calls if c.method == method and c.status == 200 and where(c)]
            return hits if len(hits) >= count else None

        return await self.wait_for(found, within)

    def pending_updates(self) -> int:
        return len(self._updates)

    # --- server side ----------------------------------------------------------------------------
    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})

    @staticmethod
    def _error(status: int, description: str, retry_after: int | None = None) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        return web.json_response(body, status=status)

    async def _read_params(self, request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        if request.content_type == "application/json":
            params = await request.json()
        elif request.can_read_body:
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    files[key] = value.file.read()
                else:
                    params[key] = value
        for key, value in list(params.items()):
            if isinstance(value, str) and key in _JSON_FIELDS:
                params[key] = json.loads(value)
            elif isinstance(value, str) and (key in _INT_FIELDS or key == "chat_id"):
                try:
                    params[key] = int(value)
                except ValueError:
                    pass
        # attach://name references point at another multipart part; plain parts use the field name.
        for key, value in list(params.items()):
            if isinstance(value, str) and value.startswith("attach://"):
                part = value[len("attach://"):]
                if part in files:
                    files[key] = files.pop(part)
                    params[key] = f"<upload {len(files[key])} bytes>"
        return params, files

    async def _record(self, call: Call) -> None:
        call.at = time.monotonic()
        async with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    async def _handle_method(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            return self._error(401, "Unauthorized")
        params, files = await self._read_params(request)
        call = Call(method, params, files)
        fault = next((f for f in self._faults if f.method == method and f.remaining > 0), None)
        if fault is not None:
            fault.remaining -= 1
            call.status = fault.status
            await self._record(call)
            return self._error(fault.status, fault.description, fault.retry_after)
        if method == "getUpdates":
            # Long polls are not recorded as calls: there would be one every few milliseconds.
            return await self._get_updates(params)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            call.status = 404
            await self._record(call)
            return self._error(404, "Not Found: method not found")
        try:
            result = handler(params, files)
        except _ApiError as err:
            call.status = err.status
            await self._record(call)
            return self._error(err.status, err.description)
        call.result = result
        await self._record(call)
        return self._ok(result)

    async def _get_updates(self, params: dict[str, Any]) -> web.Response:
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        limit = int(params.get("limit") or 100)
        deadline = time.monotonic() + timeout
        async with self._changed:
            if offset:
                # Confirms everything before ``offset`` (Telegram forgets confirmed updates).
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
            while not self._updates and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    break
            batch = self._updates[:limit]
        return self._ok(batch)

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        file_id = self.file_paths.get(request.match_info["path"])
        if file_id is None:
            return web.Response(status=404)
        await self._record(Call("download", {"path": request.match_info["path"], "file_id": file_id}))
        return web.Response(body=self.files[file_id], content_type="application/octet-stream")

    # --- Bot API methods (sync: they only touch in-memory state) --------------------------------
    def _m_getMe(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return {**self.bot_user, "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}

    def _m_deleteWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        self.webhook_url = ""
        if str(params.get("drop_pending_updates", "")).lower() == "true":
            self._updates.clear()
        return True

    def _m_setWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        self.webhook_url = str(params.get("url", ""))
        return True

    def _m_getWebhookInfo(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return {"url": self.webhook_url, "has_custom_certificate": False, "pending_update_count": len(self._updates)}

    def _m_setMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        self.commands = list(params.get("commands") or [])
        return True

    def _m_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        qid = str(params.get("callback_query_id", ""))
        if qid in self.callback_answers:
            raise _ApiError(400, "Bad Request: query is too old and response timeout expired or query ID is invalid")
        self.callback_answers[qid] = params
        return True

    def _chat(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = params.get("chat_id")
        if not isinstance(chat_id, int):
            raise _ApiError(400, "Bad Request: chat not found")
        if chat_id < 0:
            return self.group_chat(chat_id)
        return {"id": chat_id, "type": "private", "first_name": "User"}

    def _m_getChatMember(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        chat = self._chat(params)
        user_id = int(params.get("user_id", 0))
        user = {"id": user_id, "is_bot": False, "first_name": f"U{user_id}"}
        if chat["type"] == "private" and user_id == chat["id"]:
            return {"status": "member", "user": user}
        if user_id not in self.chat_admins.get(chat["id"], set()):
            return {"status": "member", "user": user}
        rights = ("can_manage_chat", "can_delete_messages", "can_manage_video_chats", "can_restrict_members",
                  "can_promote_members", "can_change_info", "can_invite_users", "can_post_stories",
                  "can_edit_stories", "can_delete_stories")
        return {"status": "administrator", "user": user, "can_be_edited": False, "is_anonymous": False,
                **dict.fromkeys(rights, True)}

    def _reply_target(self, chat_id: int, params: dict[str, Any]) -> dict[str, Any] | None:
        rp = params.get("reply_parameters") or {}
        reply_id = rp.get("message_id") or params.get("reply_to_message_id")
        if not reply_id:
            return None
        target = self.messages.get((chat_id, int(reply_id)))
        if target is None and not rp.get("allow_sending_without_reply"):
            raise _ApiError(400, "Bad Request: message to be replied not found")
        return target

    def _bot_message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        chat = self._chat(params)
        reply_to = self._reply_target(chat["id"], params)
        markup = params.get("reply_markup")
        if markup and "inline_keyboard" in markup:
            for row in markup["inline_keyboard"]:
                for button in row:
                    data = button.get("callback_data")
                    if data is not None and len(data.encode()) > 64:
                        raise _ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
            content["reply_markup"] = markup
        return self._new_message(chat, self.bot_user, reply_to=reply_to, **content)

    def _m_sendMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        text = str(params.get("text", ""))
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            raise _ApiError(400, "Bad Request: message is too long")
        _check_html(params, text)
        msg = self._bot_message(params, text=_plain(params, text))
        self.raw[(msg["chat"]["id"], msg["message_id"])] = text
        return msg

    def _m_sendVideo(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return self._send_media("sendVideo", params, files)

    def _m_sendPhoto(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return self._send_media("sendPhoto", params, files)

    def _m_sendDocument(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return self._send_media("sendDocument", params, files)

    def _m_sendAnimation(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return self._send_media("sendAnimation", params, files)

    def _send_media(self, method: str, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        kind = _MEDIA_METHODS[method]
        data = files.get(kind)
        if data is None:
            raise _ApiError(400, f"Bad Request: there is no {kind} in the request")
        if len(data) > self.max_upload_bytes:
            raise _ApiError(413, "Request Entity Too Large")
        caption = params.get("caption")
        if caption is not None:
            if len(caption) > 1024:
                raise _ApiError(400, "Bad Request: message caption is too long")
            _check_html(params, caption)
        file_id, uid = self.add_file(data)
        self.uploads.append((kind, data))
        meta: dict[str, Any] = {"file_id": file_id, "file_unique_id": uid, "file_size": len(data)}
        content: Any
        if kind == "photo":
            content = [{**meta, "width": int(params.get("width") or 320), "height": int(params.get("height") or 180)}]
        else:
            content = {**meta}
            if kind in ("video", "animation"):
                content.update(
                    width=int(params.get("width") or 0),
                    height=int(params.get("height") or 0),
                    duration=int(params.get("duration") or 0),
                    mime_type="video/mp4",
                )
        msg = self._bot_message(params, caption=None if caption is None else _plain(params, caption),
                                **{kind: content})
        if caption is not None:
            self.raw[(msg["chat"]["id"], msg["message_id"])] = caption
        return msg

    def _existing(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = params.get("chat_id")
        msg = self.messages.get((chat_id, params.get("message_id")))  # type: ignore[arg-type]
        if msg is None:
            raise _ApiError(400, "Bad Request: message to edit not found")
        return msg

    def _edit(self, params: dict[str, Any], field_name: str) -> dict[str, Any]:
        msg = self._existing(params)
        new_value = params.get(field_name)
        new_markup = params.get("reply_markup")
        if field_name == "text":
            if not str(new_value or "").strip():
                raise _ApiError(400, "Bad Request: message text is empty")
            if "text" not in msg:
                raise _ApiError(400, "Bad Request: there is no text in the message to edit")
        elif field_name == "caption" and not any(k in msg for k in ("video", "photo", "document", "animation")):
            raise _ApiError(400, "Bad Request: there is no caption in the message to edit")
        if isinstance(new_value, str):
            _check_html(params, new_value)
        key = (msg["chat"]["id"], msg["message_id"])
        old_markup = msg.get("reply_markup")
        same_markup = (new_markup or None) == (old_markup or None) or (
            not new_markup and not (old_markup or {}).get("inline_keyboard")
        )
        # Telegram compares the rendered content (text and entities): the raw HTML stands for both here.
        if field_name != "reply_markup" and self.raw.get(key, msg.get(field_name)) == new_value and same_markup:
            raise _ApiError(400, NOT_MODIFIED)
        if field_name == "reply_markup" and same_markup:
            raise _ApiError(400, NOT_MODIFIED)
        if field_name != "reply_markup":
            msg[field_name] = _plain(params, str(new_value))
            self.raw[key] = new_value
        if new_markup:
            msg["reply_markup"] = new_markup
        else:
            msg.pop("reply_markup", None)
        msg["edit_date"] = int(time.time())
        return msg

    def _m_editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return self._edit(params, "text")

    def _m_editMessageCaption(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return self._edit(params, "caption")

    def _m_editMessageReplyMarkup(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return self._edit(params, "reply_markup")

    def _m_editMessageMedia(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        """Swap a media message's file (as Telegram: a text message has no media to edit)."""
        msg = self._existing(params)
        media = params.get("media")
        if not isinstance(media, dict) or media.get("type") not in ("animation", "video", "photo", "document"):
            raise _ApiError(400, "Bad Request: can't parse InputMedia")
        kind = str(media["type"])
        if not any(k in msg for k in ("video", "photo", "document", "animation")):
            raise _ApiError(400, "Bad Request: there is no media in the message to edit")
        ref = str(media.get("media", ""))
        data = files.get(ref[len("attach://"):]) if ref.startswith("attach://") else None
        if data is None:
            raise _ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")
        for k in ("video", "photo", "document", "animation"):
            msg.pop(k, None)
        file_id, uid = self.add_file(data)
        msg[kind] = {"file_id": file_id, "file_unique_id": uid, "file_size": len(data), "width": 0, "height": 0,
                     "duration": 0, "mime_type": "video/mp4"}
        if "caption" in media:
            msg["caption"] = _plain(media, str(media["caption"]))
        msg["edit_date"] = int(time.time())
        self.media_edits.append((msg["chat"]["id"], msg["message_id"], kind, data))
        return msg

    def _m_deleteMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        key = (params.get("chat_id"), params.get("message_id"))
        if key not in self.messages:
            raise _ApiError(400, "Bad Request: message to delete not found")
        del self.messages[key]  # type: ignore[arg-type]
        return True

    def _m_getFile(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        file_id = str(params.get("file_id", ""))
        if file_id not in self.files:
            raise _ApiError(400, "Bad Request: invalid file_id")
        size = self.file_sizes[file_id]
        if size > self.max_download_bytes:
            raise _ApiError(400, "Bad Request: file is too big")
        path = next(p for p, fid in self.file_paths.items() if fid == file_id)
        return {"file_id": file_id, "file_unique_id": f"U{file_id[4:]}", "file_size": size, "file_path": path}

    def _m_sendChatAction(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        return True

    def _m_close(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        return True


class _ApiError(Exception):
    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


_ALLOWED_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre",
                 "tg-spoiler", "span", "blockquote", "tg-emoji"}


def _check_html(params: dict[str, Any], text: str) -> None:
    """Telegram refuses HTML with unknown tags or unbalanced markup; so does the fake (catches escaping bugs)."""
    if str(params.get("parse_mode", "")).upper() != "HTML":
        return
    class _Checker(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.stack: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag not in _ALLOWED_TAGS:
                raise _ApiError(400, f"Bad Request: can't parse entities: unsupported start tag \"{tag}\"")
            self.stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            if not self.stack or self.stack.pop() != tag:
                raise _ApiError(400, f"Bad Request: can't parse entities: unexpected end tag \"{tag}\"")

    checker = _Checker()
    checker.feed(text)
    checker.close()
    if checker.stack:
        raise _ApiError(400, "Bad Request: can't parse entities: unclosed start tag")
    # A bare '<' that is not a tag is an error on Telegram; HTMLParser keeps it as data, so check here.
    if "<" in _TAG_RE.sub("", text):
        raise _ApiError(400, "Bad Request: can't parse entities: unsupported start tag")


def _plain(params: dict[str, Any], text: str) -> str:
    """What Telegram stores for the message: markup parsed away (entities are not modelled)."""
    if str(params.get("parse_mode", "")).upper() != "HTML":
        return text
    return html.unescape(_TAG_RE.sub("", text))


_TAG_RE = re.compile(r"</?(?:" + "|".join(re.escape(t) for t in _ALLOWED_TAGS) + r")(?:\s[^<>]*)?>")
