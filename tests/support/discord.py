"""A fake Discord for end-to-end tests: REST and a websocket gateway on 127.0.0.1 (port 0).

The real discord.py client talks to it through `KOBOT_DISCORD_API_URL` and
`KOBOT_DISCORD_GATEWAY_URL`. Facts it honours (each one cost a debugging session):

* REST answers carry `Content-Type: application/json` exactly; aiohttp's `json_response` adds
  `; charset=utf-8` and discord.py then treats the body as text.
* Start-up: `GET /users/@me`, `GET /oauth2/applications/@me`, `PUT /applications/{id}/commands`
  (or the guild variant), then the gateway: HELLO (op 10) → heartbeat (op 1, ACKed with op 11)
  and IDENTIFY (op 2) → READY (with `resume_gateway_url` pointing back here) → GUILD_CREATE.
* RESUME (op 6) replays the events the client missed, then RESUMED; op 7 asks for a reconnect.
* A 429 is retried by discord.py only with a `Via` header and a JSON `retry_after`.
* Interaction answers go to `POST /interactions/{id}/{token}/callback` (`with_response=1`),
  follow-ups to `POST /webhooks/{app_id}/{token}`; both may be multipart with files.
* Text frames are fine whatever compression the client asked for.
* `PATCH /channels/{channel}/messages/{message}` edits a message the bot sent (`shown` keeps
  each one's current content); an unknown message is a 404 (Unknown Message, code 10008).

Every REST call is recorded (`calls`) with its parsed body and uploaded files; `wait_for` waits
on a condition that is re-checked after every recorded call or gateway frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

JSON = dict[str, Any]
API = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
MESSAGE_CONTENT_INTENT = 1 << 15
CONTENT_LIMITED_FLAG = 1 << 19
TIMESTAMP = "2024-01-01T00:00:00.000000+00:00"
PUBLIC_ROUTES = ("/interactions/", "/webhooks/")


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """JSON with `Content-Type: application/json` exactly (no charset)."""
    return web.Response(
        body=json.dumps(data, ensure_ascii=False).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


class Snowflakes:
    """Unique, increasing, 18/19-digit ids; `on_shard` picks one that routes to a given shard."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._base = int(time.time() * 1000) - DISCORD_EPOCH_MS

    def next(self) -> int:
        n = next(self._counter)
        return ((self._base + n) << 22) | (n & 0xFFF)

    def on_shard(self, shard: int, shards: int) -> int:
        while True:
            candidate = self.next()
            if (candidate >> 22) % shards == shard:
                return candidate


@dataclass
class Call:
    """One REST request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    files: dict[str, bytes]
    authorized: bool
    at: float = field(default_factory=time.perf_counter)
    status: int = 0

    def route(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Connection:
    ws: web.WebSocketResponse
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, frame: JSON) -> None:
        async with self.lock:
            if not self.ws.closed:
                await self.ws.send_str(json.dumps(frame, ensure_ascii=False))


@dataclass
class Session:
    """A gateway session: its events (for RESUME replays) and the live connection, if any."""

    id: str
    shard: tuple[int, int]
    seq: int = 0
    log: list[JSON] = field(default_factory=list)
    connection: Connection | None = None


@dataclass
class FakeGuild:
    id: int
    name: str
    general_id: int
    listed_id: int
    thread_id: int
    member_role_id: int
    bot_role_id: int


class FakeDiscord:
    """REST + gateway. Start with `async with FakeDiscord() as fake:`."""

    def __init__(
        self,
        token: str = "fake-bot-token",
        *,
        app_flags: int = CONTENT_LIMITED_FLAG,
        allow_message_content: bool = True,
        recommended_shards: int = 1,
        guild_shards: int = 1,
    ) -> None:
        self.token = token
        self.app_flags = app_flags
        self.allow_message_content = allow_message_content
        self.recommended_shards = recommended_shards
        self.ids = Snowflakes()
        self.app_id = self.ids.next()
        self.bot_user = self.user("kobot", bot=True, user_id=self.app_id)
        self.owner = self.user("owner")
        self.guilds = [self._make_guild(i, guild_shards) for i in range(guild_shards)]
        self.calls: list[Call] = []
        self.identifies: list[JSON] = []
        self.resumes: list[JSON] = []
        self.sessions: dict[str, Session] = {}
        self.current: dict[int, Session] = {}
        self.closed_codes: list[int] = []
        self.shown: dict[int, tuple[int, str]] = {}  # message id -> (channel id, content)
        self.originals: dict[str, JSON] = {}  # interaction token -> its original response
        self._rate_limits: list[tuple[re.Pattern[str], int]] = []
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", API + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in self.sessions.values():
            if session.connection is not None:
                await session.connection.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- the world ---------------------------------------------------------------------------

    def user(self, name: str, *, bot: bool = False, user_id: int | None = None) -> JSON:
        return {
            "id": str(user_id or self.ids.next()),
            "username": name,
            "global_name": name,
            "discriminator": "0",
            "avatar": None,
            "bot": bot,
            "public_flags": 0,
        }

    def _make_guild(self, index: int, shards: int) -> FakeGuild:
        ids = self.ids
        return FakeGuild(
            id=ids.on_shard(index, shards),
            name=f"테스트 서버 {index}",
            general_id=ids.next(),
            listed_id=ids.next(),
            thread_id=ids.next(),
            member_role_id=ids.next(),
            bot_role_id=ids.next(),
        )

    @property
    def guild(self) -> FakeGuild:
        return self.guilds[0]

    def shard_of(self, guild_id: int | None) -> int:
        session = self.current.get(0)
        shards = session.shard[1] if session else 1
        return 0 if guild_id is None else (guild_id >> 22) % shards

    def guild_payload(self, guild: FakeGuild) -> JSON:
        def role(role_id: int, name: str, **extra: Any) -> JSON:
            return {
                "id": str(role_id),
                "name": name,
                "permissions": "0",
                "position": 0,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": True,
                "flags": 0,
                **extra,
            }

        def channel(channel_id: int, name: str, position: int) -> JSON:
            return {
                "id": str(channel_id),
                "type": 0,
                "name": name,
                "position": position,
                "guild_id": str(guild.id),
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
                "topic": None,
                "last_message_id": None,
                "rate_limit_per_user": 0,
            }

        thread = {
            "id": str(guild.thread_id),
            "type": 11,
            "name": "스레드",
            "parent_id": str(guild.listed_id),
            "guild_id": str(guild.id),
            "owner_id": self.owner["id"],
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": TIMESTAMP,
                "locked": False,
            },
        }
        bot_member = {
            "user": self.bot_user,
            "roles": [str(guild.bot_role_id)],
            "joined_at": TIMESTAMP,
            "deaf": False,
            "mute": False,
            "flags": 0,
        }
        return {
            "id": str(guild.id),
            "name": guild.name,
            "owner_id": self.owner["id"],
            "unavailable": False,
            "member_count": 2,
            "large": False,
            "icon": None,
            "roles": [
                role(guild.id, "@everyone"),
                role(guild.member_role_id, "회원"),
                role(
                    guild.bot_role_id, "kobot", managed=True, tags={"bot_id": self.bot_user["id"]}
                ),
            ],
            "channels": [
                channel(guild.general_id, "general", 0),
                channel(guild.listed_id, "kobot", 1),
            ],
            "threads": [thread],
            "members": [bot_member],
            "emojis": [],
            "stickers": [],
            "features": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "joined_at": TIMESTAMP,
            "mfa_level": 0,
            "verification_level": 0,
            "explicit_content_filter": 0,
            "default_message_notifications": 0,
            "system_channel_id": None,
            "afk_timeout": 300,
            "preferred_locale": "ko",
            "premium_tier": 0,
            "nsfw_level": 0,
            "system_channel_flags": 0,
            "premium_subscription_count": 0,
        }

    def message_payload(
        self,
        author: JSON,
        content: str,
        channel_id: int,
        *,
        guild_id: int | None = None,
        roles: tuple[int, ...] = (),
        mentions: tuple[JSON, ...] = (),
        mention_roles: tuple[int, ...] = (),
        reply_to: JSON | None = None,
        **extra: Any,
    ) -> JSON:
        """A MESSAGE_CREATE (or REST message) payload."""
        payload: JSON = {
            "id": str(self.ids.next()),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": TIMESTAMP,
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": list(mentions),
            "mention_roles": [str(r) for r in mention_roles],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
            "components": [],
        }
        if guild_id is not None:
            payload["guild_id"] = str(guild_id)
            payload["member"] = {
                "roles": [str(r) for r in roles],
                "joined_at": TIMESTAMP,
                "deaf": False,
                "mute": False,
                "flags": 0,
            }
        if reply_to is not None:
            payload["type"] = 19
            payload["referenced_message"] = reply_to
            payload["message_reference"] = {
                "message_id": reply_to["id"],
                "channel_id": str(channel_id),
                "type": 0,
            }
        payload.update(extra)
        return payload

    def dm_channel_id(self, user: JSON) -> int:
        """A stable DM channel id per user (any unique snowflake will do)."""
        return int(user["id"]) + 1

    # -- injecting events --------------------------------------------------------------------

    async def dispatch(self, event: str, data: JSON, shard: int | None = None) -> None:
        """Send an event on the session that owns the guild (shard 0 for DMs)."""
        target = self.shard_of(_guild_id(data)) if shard is None else shard
        await self._emit(self.current[target], event, data)

    async def send_message(
        self, author: JSON, content: str, channel_id: int | None = None, **options: Any
    ) -> JSON:
        """MESSAGE_CREATE from `author`: a DM unless `guild_id` is given. Returns the payload."""
        channel = channel_id or self.dm_channel_id(author)
        payload = self.message_payload(author, content, channel, **options)
        await self.dispatch("MESSAGE_CREATE", payload)
        return payload

    async def mention_bot(self, author: JSON, text: str, guild: FakeGuild) -> JSON:
        """MESSAGE_CREATE in `guild`'s general channel: `@bot text`, mentioning the bot."""
        content = f"<@{self.bot_user['id']}> {text}"
        options: dict[str, Any] = {"guild_id": guild.id, "mentions": (self.bot_user,)}
        return await self.send_message(author, content, guild.general_id, **options)

    async def send_command(
        self,
        user: JSON,
        name: str,
        options: dict[str, str] | None = None,
        *,
        guild: FakeGuild | None = None,
        roles: tuple[int, ...] = (),
    ) -> JSON:
        """INTERACTION_CREATE for `/name`, in the guild's general channel or in a DM."""
        channel_id = guild.general_id if guild else self.dm_channel_id(user)
        payload: JSON = {
            "id": str(self.ids.next()),
            "application_id": str(self.app_id),
            "type": 2,
            "token": secrets.token_urlsafe(16),
            "version": 1,
            "locale": "ko",
            "app_permissions": "0",
            "entitlements": [],
            "attachment_size_limit": 8 << 20,
            "authorizing_integration_owners": {"0": str(guild.id) if guild else user["id"]},
            "data": {
                "id": str(self.ids.next()),
                "name": name,
                "type": 1,
                "options": [{"name": k, "type": 3, "value": v} for k, v in (options or {}).items()],
            },
            "channel_id": str(channel_id),
        }
        if guild is None:
            payload |= {
                "user": user,
                "context": 1,
                "channel": {"id": str(channel_id), "type": 1, "recipients": [user]},
            }
        else:
            payload |= {
                "guild_id": str(guild.id),
                "guild_locale": "ko",
                "context": 0,
                "channel": {
                    "id": str(channel_id),
                    "type": 0,
                    "name": "general",
                    "guild_id": str(guild.id),
                    "position": 0,
                    "permission_overwrites": [],
                    "nsfw": False,
                    "parent_id": None,
                },
                "member": {
                    "user": user,
                    "roles": [str(r) for r in roles],
                    "joined_at": TIMESTAMP,
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                    "permissions": "0",
                },
            }
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def request_reconnect(self, shard: int = 0) -> Session:
        """Op 7: the client should close and RESUME on `resume_gateway_url`."""
        session = self.current[shard]
        assert session.connection is not None
        await session.connection.send({"op": 7, "d": None})
        return session

    def rate_limit(self, route_pattern: str, times: int = 1) -> None:
        """Answer the next `times` calls matching `METHOD /path` (regex) with a 429."""
        self._rate_limits.append((re.compile(route_pattern), times))

    # -- observing ---------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], Any], limit_s: float = 20.0) -> Any:
        """Wait until `predicate()` is truthy and return its value.

        Re-checked on every recorded call or gateway frame, and every 50 ms for conditions on
        state outside the fake (the bot's storage, a test backend).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        async with self._changed:
            while not (result := predicate()):
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"condition not met within {limit_s}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 0.05))
        return result

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def find(self, pattern: str) -> list[Call]:
        regex = re.compile(pattern)
        return [call for call in self.calls if regex.fullmatch(call.route())]

    def messages_in(self, channel_id: int) -> list[JSON]:
        """Bodies of the messages the bot sent (and the fake accepted) in a channel."""
        calls = self.find(rf"POST /channels/{channel_id}/messages")
        return [c.body for c in calls if c.status == 200]

    def shown_in(self, channel_id: int) -> list[str]:
        """The current content of each message the bot sent in a channel (after edits)."""
        return [text for _, (channel, text) in sorted(self.shown.items()) if channel == channel_id]

    def edits_in(self, channel_id: int) -> list[Call]:
        """Accepted message edits in a channel, in order."""
        calls = self.find(rf"PATCH /channels/{channel_id}/messages/\d+")
        return [call for call in calls if call.status == 200]

    def replies_to(self, message: JSON) -> list[JSON]:
        """Bodies of the messages sent as replies to `message`, in order."""
        return [
            body
            for body in self.messages_in(int(message["channel_id"]))
            if str((body.get("message_reference") or {}).get("message_id")) == message["id"]
        ]

    def interaction_answers(self, interaction: JSON) -> list[Call]:
        """The callback and every follow-up for one interaction, in order."""
        token = re.escape(interaction["token"])
        return self.find(
            rf"POST /(interactions/{interaction['id']}/{token}/callback|webhooks/\d+/{token})"
        )

    def original_edits(self, interaction: JSON) -> list[Call]:
        """Accepted edits of one interaction's original response, in order."""
        token = re.escape(interaction["token"])
        calls = self.find(rf"PATCH /webhooks/\d+/{token}/messages/@original")
        return [call for call in calls if call.status == 200]

    def originals_shown(self) -> list[str]:
        """The current content of every interaction's original response."""
        return [str(original.get("content") or "") for original in self.originals.values()]

    # -- REST --------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[..., Any]
    ) -> web.StreamResponse:
        if not request.path.startswith(API):
            response: web.StreamResponse = await handler(request)
            return response
        path = request.path.removeprefix(API)
        body, files = await _parse_body(request)
        public = path.startswith(PUBLIC_ROUTES)
        authorized = public or request.headers.get("Authorization") == f"Bot {self.token}"
        call = Call(request.method, path, dict(request.query), body, files, authorized)
        self.calls.append(call)
        request[CALL] = call
        response = await self._answer(call, request, handler)
        call.status = response.status
        await self._notify()
        return response

    async def _answer(
        self, call: Call, request: web.Request, handler: Callable[..., Any]
    ) -> web.StreamResponse:
        if self._take_rate_limit(call):
            return json_response(
                {"message": "You are being rate limited.", "retry_after": 0.05, "global": False},
                429,
                {"Via": "1.1 google"},
            )
        if not call.authorized:
            return json_response({"message": "401: Unauthorized", "code": 0}, 401)
        response: web.StreamResponse = await handler(request)
        return response

    def _take_rate_limit(self, call: Call) -> bool:
        for index, (pattern, times) in enumerate(self._rate_limits):
            if times > 0 and pattern.fullmatch(call.route()):
                self._rate_limits[index] = (pattern, times - 1)
                return True
        return False

    async def _rest(self, request: web.Request) -> web.Response:
        call = request[CALL]
        for pattern, handler in self._routes():
            match = re.fullmatch(pattern, call.route())
            if match:
                return handler(call, *match.groups())
        return json_response({"message": "404: Not Found", "code": 0}, 404)

    def _routes(self) -> Iterator[tuple[str, Callable[..., web.Response]]]:
        yield r"GET /users/@me", lambda call: json_response(self.bot_user)
        yield r"GET /oauth2/applications/@me", lambda call: json_response(self._application())
        yield r"GET /gateway", lambda call: json_response({"url": self.gateway_url})
        yield r"GET /gateway/bot", lambda call: json_response(self._gateway_bot())
        yield r"PUT /applications/\d+(?:/guilds/\d+)?/commands", self._put_commands
        yield r"POST /channels/(\d+)/typing", lambda call, _: web.Response(status=204)
        yield r"POST /channels/(\d+)/messages", self._create_message
        yield r"PATCH /channels/(\d+)/messages/(\d+)", self._edit_message
        yield r"POST /interactions/(\d+)/([^/]+)/callback", self._interaction_callback
        yield r"POST /webhooks/\d+/[^/]+", self._followup
        yield r"PATCH /webhooks/\d+/([^/]+)/messages/@original", self._edit_original
        yield r"PATCH /webhooks/\d+/[^/]+/messages/[^/]+", self._followup

    def _application(self) -> JSON:
        return {
            "id": str(self.app_id),
            "name": "kobot",
            "icon": None,
            "description": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner,
            "verify_key": "0" * 64,
            "flags": self.app_flags,
            "team": None,
            "summary": "",
        }

    def _gateway_bot(self) -> JSON:
        return {
            "url": self.gateway_url,
            "shards": self.recommended_shards,
            "session_start_limit": {
                "total": 1000,
                "remaining": 999,
                "reset_after": 0,
                "max_concurrency": 1,
            },
        }

    def _put_commands(self, call: Call) -> web.Response:
        commands = [
            {
                **command,
                "id": str(self.ids.next()),
                "application_id": str(self.app_id),
                "version": str(self.ids.next()),
                "default_member_permissions": None,
                "type": 1,
            }
            for command in call.body or []
        ]
        return json_response(commands)

    def _bot_message(self, body: JSON | None, channel_id: int) -> JSON:
        body = body or {}
        payload = self.message_payload(self.bot_user, body.get("content") or "", channel_id)
        reference = body.get("message_reference")
        if reference:
            payload["type"] = 19
            payload["message_reference"] = {
                k: str(v)
                for k, v in reference.items()
                if k in ("message_id", "channel_id", "guild_id")
            }
        return payload

    def _create_message(self, call: Call, channel_id: str) -> web.Response:
        payload = self._bot_message(call.body, int(channel_id))
        self.shown[int(payload["id"])] = (int(channel_id), payload["content"])
        return json_response(payload)

    def _edit_message(self, call: Call, channel_id: str, message_id: str) -> web.Response:
        if int(message_id) not in self.shown:
            return json_response({"message": "Unknown Message", "code": 10008}, 404)
        content = (call.body or {}).get("content") or ""
        self.shown[int(message_id)] = (int(channel_id), content)
        payload = self.message_payload(self.bot_user, content, int(channel_id), id=message_id)
        payload["edited_timestamp"] = TIMESTAMP
        return json_response(payload)

    def _interaction_callback(self, call: Call, interaction_id: str, token: str) -> web.Response:
        kind = int((call.body or {}).get("type", 4))
        data = (call.body or {}).get("data") or {}
        message = self._bot_message(data, 0)
        message["flags"] = int(data.get("flags", 0))
        self.originals[token] = message
        resource: JSON = {"type": kind}
        if kind == 4:
            resource["message"] = message
        return json_response(
            {
                "interaction": {
                    "id": interaction_id,
                    "type": 2,
                    "response_message_id": message["id"],
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": bool(int(data.get("flags", 0)) & 64),
                },
                "resource": resource,
            }
        )

    def _followup(self, call: Call) -> web.Response:
        return json_response(self._bot_message(call.body, 0))

    def _edit_original(self, call: Call, token: str) -> web.Response:
        """The interaction's original response (the deferred "thinking…" one), edited."""
        original = self.originals.get(token)
        if original is None:
            return json_response({"message": "Unknown Webhook", "code": 10015}, 404)
        original["content"] = (call.body or {}).get("content") or ""
        original["edited_timestamp"] = TIMESTAMP
        return json_response(original)

    # -- gateway -----------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        connection = Connection(ws)
        await connection.send({"op": 10, "d": {"heartbeat_interval": 41250}})
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await self._on_frame(connection, json.loads(message.data))
        self._detach(connection)
        await self._notify()
        return ws

    def _detach(self, connection: Connection) -> None:
        for session in self.sessions.values():
            if session.connection is connection:
                session.connection = None

    async def _on_frame(self, connection: Connection, frame: JSON) -> None:
        op, data = frame.get("op"), frame.get("d") or {}
        if op == 1:
            await connection.send({"op": 11})
        elif op == 2:
            await self._identify(connection, data)
        elif op == 6:
            await self._resume(connection, data)
        await self._notify()

    async def _identify(self, connection: Connection, data: JSON) -> None:
        self.identifies.append({k: v for k, v in data.items() if k != "token"})
        if data.get("token") != self.token:
            await self._reject(connection, 4004, "Authentication failed.")
            return
        if int(data.get("intents", 0)) & MESSAGE_CONTENT_INTENT and not self.allow_message_content:
            await self._reject(connection, 4014, "Disallowed intent(s).")
            return
        shard_id, shards = data.get("shard") or [0, 1]
        session = Session(secrets.token_hex(16), (shard_id, shards), connection=connection)
        self.sessions[session.id] = session
        self.current[shard_id] = session
        await self._emit(session, "READY", self._ready(session))
        for guild in self.guilds:
            if (guild.id >> 22) % shards == shard_id:
                await self._emit(session, "GUILD_CREATE", self.guild_payload(guild))

    async def _reject(self, connection: Connection, code: int, reason: str) -> None:
        self.closed_codes.append(code)
        await connection.ws.close(code=code, message=reason.encode())

    def _ready(self, session: Session) -> JSON:
        shard_id, shards = session.shard
        return {
            "v": 10,
            "user": self.bot_user,
            "session_id": session.id,
            "resume_gateway_url": self.gateway_url,
            "shard": [shard_id, shards],
            "guilds": [
                {"id": str(g.id), "unavailable": True}
                for g in self.guilds
                if (g.id >> 22) % shards == shard_id
            ],
            "application": {"id": str(self.app_id), "flags": self.app_flags},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "user_settings": {},
        }

    async def _resume(self, connection: Connection, data: JSON) -> None:
        self.resumes.append({k: v for k, v in data.items() if k != "token"})
        session = self.sessions.get(str(data.get("session_id")))
        if session is None or data.get("token") != self.token:
            await connection.send({"op": 9, "d": False})
            return
        seen = int(data.get("seq") or 0)
        index = next((i for i, f in enumerate(session.log) if f["s"] > seen), len(session.log))
        while index < len(session.log):  # events emitted meanwhile are replayed too
            await connection.send(session.log[index])
            index += 1
        session.connection = connection
        await self._emit(session, "RESUMED", {})

    async def _emit(self, session: Session, event: str, data: JSON) -> None:
        session.seq += 1
        frame = {"op": 0, "t": event, "s": session.seq, "d": data}
        session.log.append(frame)
        if session.connection is not None:
            await session.connection.send(frame)


CALL: web.RequestKey[Call] = web.RequestKey("call", Call)


def _guild_id(data: JSON) -> int | None:
    value = data.get("guild_id")
    return int(value) if value else None


async def _parse_body(request: web.Request) -> tuple[Any, dict[str, bytes]]:
    """JSON, or multipart with `payload_json` and files (keyed by filename)."""
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        files = {f.filename: f.file.read() for f in form.values() if isinstance(f, web.FileField)}
        payload = form.get("payload_json")
        return (json.loads(payload) if isinstance(payload, str) else None), files
    raw = await request.read()
    if not raw:
        return None, {}
    try:
        return json.loads(raw), {}
    except ValueError:
        return raw.decode(errors="replace"), {}
