"""A fake Telegram Bot API server for end-to-end tests of the real python-telegram-bot client.

aiohttp on 127.0.0.1 (port 0); point the client at `base_url` (`KOBOT_TELEGRAM_BASE_URL`).
Facts it honours, as python-telegram-bot 22 expects them:

* Every call is `POST {base}{token}/{method}`, form-encoded (multipart with files) with every
  non-string value JSON-encoded; a JSON body is accepted too.
* Answers are `{"ok": true, "result": ...}`; errors carry `error_code` and `description`, and PTB
  maps them by HTTP status: 401 → InvalidToken, 429 with `parameters.retry_after` → RetryAfter.
* `getUpdates` long-polls: `offset` confirms every update below it (confirmed ones are never
  returned again, unless a test `rewind`s to simulate a confirmation Telegram never got), and a
  parked poll returns as soon as an update arrives, its timeout passes, or the server stops.
  Unconfirmed updates stay and are returned again to the next `getUpdates` (a restarted bot's
  too), as Telegram keeps them for 24 hours.
* `CommandHandler` fires only with a `bot_command` entity at offset 0, so `text_message` adds
  entities (commands, @mentions) the way Telegram does, with offsets in UTF-16 units.
* `accepting_sends` cleared holds every `sendMessage` unanswered (and unrecorded) until it is
  set again; one whose sender died meanwhile is dropped, as a request Telegram never got.
* `editMessageText` changes a message the bot sent (`shown` keeps each one's current text);
  an unknown message or an unchanged text is a 400, as on Telegram ("message is not modified").

Every call is recorded (`calls`); `wait_for` waits on a condition re-checked after every call.
The bot confirms an update once it is stored, before it is handled: `wait_handled` also asks
`busy` (set by a test to the running bot's `dispatcher.is_running`) whether it is finished.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import ClientSession, web

JSON = dict[str, Any]
BOT_ID = 7_000_000_001
BOT_USERNAME = "kobot_test_bot"
TOKEN = f"{BOT_ID}:AAFakeTokenForTests-never-in-logs_0123456789"
_COMMAND = re.compile(r"^/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?")
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{3,32}")


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def utf16_offset(text: str, index: int) -> int:
    return utf16_len(text[:index])


def entities_for(text: str) -> list[JSON]:
    """`bot_command` at offset 0 and `mention` entities, as Telegram adds them."""
    found: list[JSON] = []
    command = _COMMAND.match(text)
    if command:
        found.append({"type": "bot_command", "offset": 0, "length": utf16_len(command.group())})
    for mention in _MENTION.finditer(text):
        offset = utf16_offset(text, mention.start())
        found.append({"type": "mention", "offset": offset, "length": utf16_len(mention.group())})
    return found


def user(user_id: int, name: str = "사용자", is_bot: bool = False) -> JSON:
    return {"id": user_id, "is_bot": is_bot, "first_name": name, "username": f"user{user_id}"}


def bot_user() -> JSON:
    return {"id": BOT_ID, "is_bot": True, "first_name": "kobot", "username": BOT_USERNAME}


def private_chat(user_id: int) -> JSON:
    return {"id": user_id, "type": "private", "first_name": "사용자"}


def group_chat(chat_id: int, title: str = "테스트 그룹") -> JSON:
    return {"id": chat_id, "type": "supergroup", "title": title}


@dataclass(frozen=True, slots=True)
class Upload:
    filename: str
    data: bytes
    content_type: str


@dataclass(slots=True)
class Call:
    """One recorded API call: raw form values (strings), uploads, and when it arrived."""

    method: str
    params: dict[str, str]
    files: dict[str, Upload] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)
    status: int = 200
    result: Any = None

    def value(self, name: str, default: Any = None) -> Any:
        """A parameter JSON-decoded where it is JSON (non-string values are sent that way)."""
        raw = self.params.get(name)
        if raw is None:
            return default
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    @property
    def chat_id(self) -> int:
        return int(self.params["chat_id"])

    @property
    def text(self) -> str:
        return self.params.get("text", "")

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True, slots=True)
class Failure:
    status: int
    description: str
    retry_after: int | None = None

    def body(self) -> JSON:
        body: JSON = {"ok": False, "error_code": self.status, "description": self.description}
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


class FakeTelegram:
    """The Bot API as the bot sees it, plus what a test needs: injecting updates, failures."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.calls: list[Call] = []
        self.updates: list[JSON] = []
        self.confirmed = 0
        self.webhook: JSON = {}
        self._update_ids = itertools.count(1000)
        self._message_ids: defaultdict[int, itertools.count[int]] = defaultdict(
            lambda: itertools.count(1)
        )
        self._chats: dict[int, JSON] = {}
        self.shown: dict[tuple[int, int], str] = {}
        self._failures: defaultdict[str, deque[Failure]] = defaultdict(deque)
        self._changed = asyncio.Condition()
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self._client: ClientSession | None = None
        self.port = 0
        self.busy: Callable[[int], bool] = lambda _update_id: False
        self.accepting_sends = asyncio.Event()  # cleared: sendMessage waits, not yet accepted
        self.accepting_sends.set()
        self.dropped_sends = 0
        FakeTelegram.running[self.base_url] = self

    running: ClassVar[weakref.WeakValueDictionary[str, FakeTelegram]] = (
        weakref.WeakValueDictionary()
    )

    @classmethod
    def at(cls, base_url: str) -> FakeTelegram | None:
        """The fake serving `base_url` (a bot's settings), if any."""
        return cls.running.get(base_url)

    # Lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    async def start(self) -> FakeTelegram:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        FakeTelegram.running[self.base_url] = self
        self._client = ClientSession()
        return self

    async def stop(self) -> None:
        """Release every parked long poll, then close."""
        self._stopping = True
        await self._notify()
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # What tests do

    def add_update(self, update: JSON) -> JSON:
        """Queue an update (an `update_id` is assigned) for `getUpdates`."""
        update = self.new_update(update)
        self.publish(update)
        return update

    def new_update(self, update: JSON) -> JSON:
        """The update with the next `update_id`, not queued (for a webhook, or `publish`)."""
        return {"update_id": next(self._update_ids), **update}

    def publish(self, update: JSON) -> None:
        """Queue an update for `getUpdates`; kept until an `offset` above it confirms it."""
        self.updates.append(update)
        self._schedule_notify()

    def message(
        self,
        chat: JSON,
        sender: JSON,
        text: str | None = None,
        reply_to: JSON | None = None,
        caption: str | None = None,
        **extra: Any,
    ) -> JSON:
        """A message as Telegram builds it (message id per chat, entities for `text`)."""
        self._chats[chat["id"]] = chat
        message: JSON = {
            "message_id": next(self._message_ids[chat["id"]]),
            "date": int(time.time()),
            "chat": chat,
            "from": sender,
            **extra,
        }
        if text is not None:
            message["text"] = text
            message["entities"] = entities_for(text)
        if caption is not None:
            message["caption"] = caption
            message["caption_entities"] = entities_for(caption)
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        return message

    def send(self, chat: JSON, sender: JSON, text: str | None = None, **extra: Any) -> JSON:
        """Inject a new message from `sender` in `chat`; returns the update."""
        return self.add_update({"message": self.message(chat, sender, text, **extra)})

    def sent_messages(self, chat_id: int) -> list[JSON]:
        """The messages the bot sent to a chat, as Telegram returned them (for reply_to)."""
        return [call.result for call in self.calls_to("sendMessage", chat_id)]

    def rewind(self, offset: int) -> None:
        """Forget confirmations from `offset` on (a restart that never confirmed them)."""
        self.confirmed = min(self.confirmed, offset)
        self._schedule_notify()

    def fail_next(
        self, method: str, status: int = 429, retry_after: int | None = 1, times: int = 1
    ) -> None:
        """Make the next `times` calls of `method` fail (429 with `retry_after` by default)."""
        description = f"Too Many Requests: retry after {retry_after}" if status == 429 else "Error"
        for _ in range(times):
            self._failures[method].append(Failure(status, description, retry_after))

    def calls_to(self, method: str, chat_id: int | None = None, ok: bool = True) -> list[Call]:
        return [
            call
            for call in self.calls
            if call.method == method
            and (chat_id is None or call.params.get("chat_id") == str(chat_id))
            and (not ok or call.ok)
        ]

    def replies_to(self, chat_id: int) -> list[str]:
        return [call.text for call in self.calls_to("sendMessage", chat_id)]

    def shown_in(self, chat_id: int) -> list[str]:
        """The current text of each message the bot sent to a chat (after edits), in order."""
        return [text for (chat, _), text in sorted(self.shown.items()) if chat == chat_id]

    def edits_of(self, chat_id: int) -> list[Call]:
        """Accepted edits in a chat, in order."""
        return self.calls_to("editMessageText", chat_id)

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
        """Wait until `condition()` holds; it is re-checked after every call and update."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(condition)

    async def wait_handled(self, update: JSON, timeout_s: float = 20.0) -> None:
        """Wait until the bot confirmed `update` (stored it) and finished handling it."""
        async with asyncio.timeout(timeout_s):
            await self.wait_for(lambda: self.confirmed > update["update_id"], timeout_s)
            while self.busy(update["update_id"]):  # noqa: ASYNC110 - the bot's side has no event
                await asyncio.sleep(0.01)

    async def post_webhook(self, url: str, update: JSON, secret: str | None) -> int:
        """Deliver an update to the bot's webhook as Telegram does; returns the HTTP status."""
        assert self._client is not None
        headers = {} if secret is None else {"X-Telegram-Bot-Api-Secret-Token": secret}
        async with self._client.post(url, json=update, headers=headers) as response:
            return response.status

    # The server

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        call = Call(method, *await self._parse(request))
        if method == "sendMessage" and not self.accepting_sends.is_set():
            await self.accepting_sends.wait()
            if request.transport is None or request.transport.is_closing():
                self.dropped_sends += 1  # its sender died first: never accepted, not recorded
                return web.Response(status=503)
        if request.match_info["token"] != self.token:
            return await self._record(call, Failure(401, "Unauthorized"))
        if self._failures[method]:
            return await self._record(call, self._failures[method].popleft())
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            return await self._record(call, Failure(404, "Not Found: method not found"))
        result = await handler(call)
        if isinstance(result, Failure):
            return await self._record(call, result)
        call.result = result
        await self._record(call)
        return web.json_response({"ok": True, "result": call.result})

    async def _record(self, call: Call, failure: Failure | None = None) -> web.Response:
        call.status = 200 if failure is None else failure.status
        self.calls.append(call)
        await self._notify()
        if failure is None:
            return web.Response()
        return web.json_response(failure.body(), status=failure.status)

    async def _parse(self, request: web.Request) -> tuple[dict[str, str], dict[str, Upload]]:
        if request.content_type == "application/json":
            body = await request.json()
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}, {}
        params: dict[str, str] = {}
        files: dict[str, Upload] = {}
        for name, value in (await request.post()).items():
            if isinstance(value, web.FileField):
                files[name] = Upload(value.filename, value.file.read(), value.content_type)
            else:
                params[name] = value if isinstance(value, str) else bytes(value).decode()
        return params, files

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _schedule_notify(self) -> None:
        task = asyncio.get_running_loop().create_task(self._notify())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Bot API methods

    async def _api_getMe(self, call: Call) -> JSON:
        return {**bot_user(), "can_join_groups": True, "can_read_all_group_messages": False}

    async def _api_deleteWebhook(self, call: Call) -> bool:
        self.webhook = {}
        return True

    async def _api_setWebhook(self, call: Call) -> bool:
        self.webhook = {
            "url": call.params["url"],
            "secret_token": call.params.get("secret_token"),
            "allowed_updates": call.value("allowed_updates"),
        }
        return True

    async def _api_setMyCommands(self, call: Call) -> bool:
        return True

    async def _api_sendChatAction(self, call: Call) -> bool:
        return True

    async def _api_getUpdates(self, call: Call) -> list[JSON]:
        offset = int(call.value("offset", 0) or 0)
        if offset > self.confirmed:
            self.confirmed = offset
            await self._notify()
        limit = int(call.value("limit", 100) or 100)
        timeout = float(call.value("timeout", 0) or 0)
        if not self._pending() and timeout > 0:
            await self._park(timeout)
        return self._pending()[:limit]

    def _pending(self) -> list[JSON]:
        if self._stopping:
            return []
        return [u for u in self.updates if u["update_id"] >= self.confirmed]

    async def _park(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: bool(self._pending()) or self._stopping)
        except TimeoutError:
            pass

    async def _api_sendMessage(self, call: Call) -> JSON:
        message = {**self._bot_message(call), "text": call.text}
        self.shown[(call.chat_id, message["message_id"])] = call.text
        return message

    async def _api_editMessageText(self, call: Call) -> JSON | Failure:
        where = (call.chat_id, int(call.params["message_id"]))
        if where not in self.shown:
            return Failure(400, "Bad Request: message to edit not found")
        if self.shown[where] == call.text:
            return Failure(
                400,
                "Bad Request: message is not modified: specified new message content and "
                "reply markup are exactly the same as a current content and reply markup of "
                "the message",
            )
        self.shown[where] = call.text
        return {
            "message_id": where[1],
            "date": int(time.time()),
            "edit_date": int(time.time()),
            "chat": self._chats.get(where[0]) or private_chat(where[0]),
            "from": bot_user(),
            "text": call.text,
        }

    async def _api_sendDocument(self, call: Call) -> JSON:
        upload = call.files.get("document")
        document = {
            "file_id": f"doc{len(self.calls)}",
            "file_unique_id": f"u{len(self.calls)}",
            "file_name": upload.filename if upload else "file",
        }
        message = {**self._bot_message(call), "document": document}
        if "caption" in call.params:
            message["caption"] = call.params["caption"]
        return message

    def _bot_message(self, call: Call) -> JSON:
        chat_id = call.chat_id
        chat = self._chats.get(chat_id) or private_chat(chat_id)
        return {
            "message_id": next(self._message_ids[chat_id]),
            "date": int(time.time()),
            "chat": chat,
            "from": bot_user(),
        }
