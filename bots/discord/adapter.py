"""`kobot discord`: the real discord.py client in front of the platform-neutral DialogueManager.

The adapter only translates: a Discord message or slash command becomes an `IncomingMessage`,
the core's `Reply` becomes one or more Discord messages. Everything else (context, commands,
rate limits, restart de-duplication) lives in the core.

When the bot answers
    DMs: every text message. Servers: when mentioned (the user or the bot's managed role), when a
    message replies to the bot, and every message in the channels (or threads of the channels)
    listed in `KOBOT_DISCORD_CHANNELS`. Bots, webhooks and system messages are ignored.

Safety
    Every send uses `AllowedMentions.none()`; only the first chunk of a reply may ping its
    author (`replied_user`). Text from the core is shown as text: markdown is escaped and mentions
    get a zero-width space after the `@`.

Access control
    `KOBOT_DISCORD_ALLOWED_GUILDS/CHANNELS/ROLES` limit where the bot answers (a thread counts as
    its parent channel). Without the privileged members intent a DM cannot be tied to a guild or a
    role, so while any allowlist is set DMs get a polite refusal. Admins (`KOBOT_DISCORD_ADMIN_IDS`)
    pass every allowlist and may use `/stats`.

Proxies (`KOBOT_DISCORD_API_URL`, `KOBOT_DISCORD_GATEWAY_URL`)
    discord.py 2.x has no per-client option for either. REST URLs are built from
    `discord.http.Route.BASE` (discord.py's own `_set_api_version` sets it; interaction callbacks
    and webhook follow-ups use the same `Route`), and the gateway is
    `DiscordWebSocket.DEFAULT_GATEWAY` (used for the first IDENTIFY and after an invalidated
    session; a plain `Client` never calls `GET /gateway`). `discord_endpoints` sets both for the
    lifetime of one `DiscordBot.run()` and restores them afterwards, so one bot runs per process.
    Resumes go to the `resume_gateway_url` the gateway (or the proxy) sends in READY. With
    `KOBOT_DISCORD_SHARDS=auto` the shard count is read from `GET /gateway/bot` (through the REST
    proxy) but the connection still goes to `DEFAULT_GATEWAY`, so a gateway proxy is honoured.

Streaming (`KOBOT_STREAM_REPLIES`, on by default)
    A reply to a message is posted as soon as the model has text and grows by message edits
    (`PATCH`), at most one per second per message (`bots.live`); discord.py waits out 429s
    itself, and one it gives up on pushes the next edit back. The last edit makes the message
    exactly the reply `handle` returns; further chunks follow as messages. The slash commands
    that generate (`/complete`, `/story`, `/retry`) stream the same way into the interaction's
    original response: deferred ("thinking…") once there is text or after `defer_after_s`,
    then edited (`PATCH /webhooks/…/messages/@original`) at the same pace, the last edit
    exactly the reply; further chunks follow as follow-ups.

Reconnects
    discord.py resumes the session after op 7 / network drops and replays missed events.
    Conversations are keyed by Discord ids in storage, never by the gateway session, so a
    reconnect or resume (or a restart) changes nothing about anyone's context; a replayed message
    that was already answered comes back from the core with `duplicate=True` and is not sent again.

Crashes (`bots.discord.inbox`)
    Each message to answer is stored in the inbox before it is answered; one seen again (a
    replay) is a no-op. After a restart, stored messages not yet finished are answered: their
    replies are generated, or sent from storage when the reply was stored but never sent (the
    outbox marks each reply pending, then sent with its Discord message ids, or failed for good
    when the channel is gone or the bot may not write there). A `/retry` (typed, or the slash
    command) stores its new answer under its own message or interaction id: replayed, it is
    answered from storage when the answer was never sent, and not at all when it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.abc import Messageable
from discord.gateway import DiscordWebSocket
from discord.http import INTERNAL_API_VERSION, Route

from bots.access import AccessPolicy, Place
from bots.base import InFlight, done_or_stopped, run_adapter, run_platform
from bots.discord.inbox import DiscordInbox
from bots.live import (
    DEFAULT_INTERVAL_S,
    EditFailed,
    FloodWait,
    LiveMessage,
    finish_reply,
    streaming,
)
from bots.outbox import Outcome, Sent, record
from core.dialogue.commands import DESCRIPTIONS, Command
from core.dialogue.manager import DialogueManager
from core.errors import StartupError
from core.messages import Attachment, IncomingMessage, Reply, ReplyKind
from core.ops.lifecycle import Shutdown
from core.settings import Settings
from core.text import split_message, utf16_length
from storage.base import mask_url_password

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
DEFER_AFTER_S = 2.0  # Discord allows 3 s before an interaction must be answered or deferred
TYPING_REFRESH_S = 8.0  # one typing indicator lasts about 10 s
IDENTIFY_DELAY_S = 5.0  # Discord's default: one IDENTIFY per 5 s per bucket
SLASH_COMMANDS = (
    Command.RESET,
    Command.HELP,
    Command.PERSONA,
    Command.FORGET,
    Command.EXPORT,
    Command.STATS,
    Command.ABOUT,
    Command.COMPLETE,
    Command.STORY,
    Command.SENTIMENT,
    Command.RETRY,
    Command.LINK,
    Command.UNLINK,
)
TEXT_ARGUMENTS = {  # slash commands that need text, and how their option is described
    Command.COMPLETE: "이어 쓸 문장 (text to continue)",
    Command.STORY: "이야기의 첫 문장 (the story's opening)",
    Command.SENTIMENT: "분석할 문장 (text to analyse)",
}
PRIVATE_COMMANDS = frozenset(
    {Command.HELP, Command.FORGET, Command.EXPORT, Command.STATS, Command.LINK, Command.UNLINK}
)
STREAMED_COMMANDS = frozenset({Command.COMPLETE, Command.STORY, Command.RETRY})
USER_MESSAGE_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})
NO_MENTIONS = discord.AllowedMentions.none()
REPLY_MENTION = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)

NO_TEXT = (
    "아직 글만 읽을 수 있어요. 하고 싶은 말을 글로 적어 주세요. "
    "(I can only read text; please write your message.)"
)
COMMAND_FAILED = "죄송해요, 명령을 처리하지 못했어요. (Sorry, that command failed.)"
RESTARTING = "봇이 곧 다시 시작해요. 잠시 후 다시 시도해 주세요. (Restarting; retry shortly.)"
NOT_ALLOWED = "여기서는 이 봇을 쓸 수 없어요. (This bot is not available here.)"
FILE_IN_PRIVATE = (
    "기록 파일은 /export 슬래시 명령으로 나에게만 보이게 보내 드려요. "
    "(Use the /export slash command to get the file privately.)"
)
MISSING_INTENT = (
    "Discord 봇에 Message Content Intent가 켜져 있지 않아요. Developer Portal → Bot → "
    "Privileged Gateway Intents에서 켜 주세요. (The message content intent is not enabled.)"
)
TOKEN_REJECTED = (
    "Discord가 KOBOT_DISCORD_TOKEN을 거부했어요 (401). Developer Portal → Bot에서 토큰을 다시 "
    "확인해 주세요. (Discord rejected the bot token.)"
)
GATEWAY_CLOSE_REASONS = {
    4004: TOKEN_REJECTED,
    4010: "invalid shard: check KOBOT_DISCORD_SHARDS",
    4011: "Discord requires sharding: set KOBOT_DISCORD_SHARDS=auto",
    4012: "invalid gateway API version: check KOBOT_DISCORD_GATEWAY_URL",
    4013: "invalid intents were sent to the gateway",
    4014: MISSING_INTENT,
}


# ---------------------------------------------------------------------------------------------
# Endpoints, intents, client


def api_base(url: str) -> str:
    """`KOBOT_DISCORD_API_URL` as a `Route.BASE`: `/api/v10` is appended unless a version is."""
    trimmed = url.strip().rstrip("/")
    if not trimmed.startswith(("http://", "https://")):
        shown = mask_url_password(url)
        raise StartupError(
            f"KOBOT_DISCORD_API_URL: must start with http:// or https:// ({shown!r})"
        )
    if re.search(r"/api/v\d+$", trimmed):
        return trimmed
    return f"{trimmed}/api/v{INTERNAL_API_VERSION}"


def gateway_base(url: str) -> yarl.URL:
    trimmed = url.strip()
    if not trimmed.startswith(("ws://", "wss://")):
        shown = mask_url_password(url)
        raise StartupError(
            f"KOBOT_DISCORD_GATEWAY_URL: must start with ws:// or wss:// ({shown!r})"
        )
    return yarl.URL(trimmed)


@contextlib.contextmanager
def discord_endpoints(api_url: str | None, gateway_url: str | None) -> Iterator[None]:
    """Point discord.py at a REST and/or gateway proxy while the block runs (see module doc)."""
    saved = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    try:
        if api_url:
            Route.BASE = api_base(api_url)
        if gateway_url:
            DiscordWebSocket.DEFAULT_GATEWAY = gateway_base(gateway_url)
        yield
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved


def bot_intents() -> discord.Intents:
    """Guilds (channel and thread cache), guild and DM messages, and their content."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True
    return intents


def has_message_content(flags: discord.ApplicationFlags) -> bool:
    return flags.gateway_message_content or flags.gateway_message_content_limited


class _KobotEvents:
    """Gateway events forwarded to the adapter once it is attached (after login)."""

    adapter: DiscordAdapter | None = None
    identify_delay_s: float = IDENTIFY_DELAY_S

    async def on_message(self, message: discord.Message) -> None:
        adapter = self.adapter
        if adapter is not None and not adapter.closing:
            with adapter.in_flight.track():
                await adapter.on_message(message)

    async def on_ready(self) -> None:
        adapter = self.adapter
        if adapter is not None and not adapter.closing:
            with adapter.in_flight.track():
                await adapter.resume_unfinished()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        if not initial:
            await asyncio.sleep(self.identify_delay_s)


class KobotClient(_KobotEvents, discord.Client):
    """One gateway connection."""


class KobotShardedClient(_KobotEvents, discord.AutoShardedClient):
    """`KOBOT_DISCORD_SHARDS` is `auto` or more than 1."""


def create_client(settings: Settings, **options: Any) -> KobotClient | KobotShardedClient:
    """The client for `KOBOT_DISCORD_SHARDS`; `options` go to discord.py (tests lower timeouts)."""
    options.setdefault("allowed_mentions", NO_MENTIONS)
    shards = settings.discord_shards
    if shards == "1":
        return KobotClient(intents=bot_intents(), **options)
    count = None if shards == "auto" else int(shards)
    return KobotShardedClient(intents=bot_intents(), shard_count=count, **options)


# ---------------------------------------------------------------------------------------------
# Access control and triggers


def place_of(user: discord.abc.User, guild_id: int | None, channel: object) -> Place:
    """For the access policy; a DM is tied to no channel, guild or role (no members intent)."""
    if guild_id is None:
        return Place()
    return Place(channel_ids(channel), guild_id, role_ids(user))


def role_ids(user: discord.abc.User) -> frozenset[int]:
    if not isinstance(user, discord.Member):
        return frozenset()
    return frozenset(role.id for role in user.roles)


def channel_ids(channel: object) -> frozenset[int]:
    """The channel's id, and for a thread its parent channel's too."""
    parent_id = channel.parent_id if isinstance(channel, discord.Thread) else None
    return frozenset(i for i in (getattr(channel, "id", None), parent_id) if i is not None)


def in_channels(channel: object, listed: frozenset[int]) -> bool:
    """True for a listed channel, or a thread whose parent channel is listed."""
    return bool(channel_ids(channel) & listed)


def is_from_person(message: discord.Message) -> bool:
    """Not a bot (this one included), not a webhook, not a system message."""
    return (
        not message.author.bot
        and message.webhook_id is None
        and not message.author.system
        and message.type in USER_MESSAGE_TYPES
    )


def self_role_id(message: discord.Message) -> int | None:
    role = message.guild.self_role if message.guild is not None else None
    return role.id if role is not None else None


def mentions_bot(message: discord.Message, bot_id: int) -> bool:
    return bot_id in message.raw_mentions or self_role_id(message) in message.raw_role_mentions


def replies_to_bot(message: discord.Message, bot_id: int) -> bool:
    reference = message.reference
    if reference is None:
        return False
    replied = reference.resolved or reference.cached_message
    return isinstance(replied, discord.Message) and replied.author.id == bot_id


# ---------------------------------------------------------------------------------------------
# Translation: Discord → core


_MENTION = re.compile(r"<(@[!&]?|#)(\d+)>")


def mention_names(message: discord.Message, bot_id: int) -> dict[str, str]:
    """Raw mention → readable text for the model; the bot's own mentions become nothing."""
    names = {f"<@{u.id}>": f"@{u.display_name}" for u in message.mentions}
    names |= {f"<@!{u.id}>": f"@{u.display_name}" for u in message.mentions}
    names |= {f"<@&{r.id}>": f"@{r.name}" for r in message.role_mentions}
    names |= {f"<#{c.id}>": f"#{getattr(c, 'name', c.id)}" for c in message.channel_mentions}
    names |= {f"<@{bot_id}>": "", f"<@!{bot_id}>": ""}
    role = self_role_id(message)
    if role is not None:
        names[f"<@&{role}>"] = ""
    return names


def message_text(message: discord.Message, bot_id: int) -> str:
    """The words said to the bot: its mentions removed, other mentions made readable."""
    names = mention_names(message, bot_id)
    text = _MENTION.sub(lambda m: names.get(m.group(0), m.group(0)), message.content)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def has_media(message: discord.Message) -> bool:
    return bool(message.attachments or message.stickers or message.embeds)


def incoming_message(
    message: discord.Message, text: str, admins: frozenset[int]
) -> IncomingMessage:
    return IncomingMessage(
        platform=PLATFORM,
        user_id=str(message.author.id),
        chat_id=str(message.channel.id),
        text=text,
        user_name=message.author.display_name,
        message_id=str(message.id),
        sent_at=message.created_at,
        is_private=message.guild is None,
        is_admin=message.author.id in admins,
    )


def command_message(
    interaction: discord.Interaction, command: Command, argument: str, admins: frozenset[int]
) -> IncomingMessage:
    """A slash command as the text command the core parses (`/persona 친절한 선생님`)."""
    return IncomingMessage(
        platform=PLATFORM,
        user_id=str(interaction.user.id),
        chat_id=str(interaction.channel_id or interaction.user.id),
        text=f"/{command.value} {argument}".strip(),
        user_name=interaction.user.display_name,
        message_id=str(interaction.id),
        sent_at=interaction.created_at,
        is_private=interaction.guild_id is None,
        is_admin=interaction.user.id in admins,
        private_answer=command in PRIVATE_COMMANDS,  # answered ephemerally (`on_command`)
    )


# ---------------------------------------------------------------------------------------------
# Translation: core → Discord


def displayable(text: str) -> str:
    """Core text shown as text: markdown escaped, mentions broken with a zero-width space."""
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def chunks_of(reply: Reply) -> list[str]:
    """Discord-sized pieces, split on paragraph, line or sentence ends (Korean included)."""
    return split_message(displayable(reply.text), MESSAGE_LIMIT, utf16_length) or ["…"]


def files_of(attachment: Attachment | None) -> list[discord.File]:
    if attachment is None:
        return []
    return [discord.File(io.BytesIO(attachment.data), filename=attachment.filename)]


def without_public_file(reply: Reply, private: bool) -> Reply:
    """A history file is personal: in a server channel, point to the ephemeral /export instead."""
    if private or reply.attachment is None:
        return reply
    return Reply(f"{reply.text}\n{FILE_IN_PRIVATE}", reply.kind)


AnyMessage = discord.Message | discord.PartialMessage  # partial: one taken up after a restart


async def send_reply(message: AnyMessage, reply: Reply) -> list[str]:
    """Send `reply` as replies to `message`, in order; only the first may ping its author.
    Returns the ids of the messages sent."""
    chunks = chunks_of(reply)
    reference = message.to_reference(fail_if_not_exists=False)
    sent: list[str] = []
    for index, chunk in enumerate(chunks):
        posted = await message.channel.send(
            chunk,
            reference=reference,
            allowed_mentions=REPLY_MENTION if index == 0 else NO_MENTIONS,
            files=files_of(reply.attachment) if index == len(chunks) - 1 else [],
        )
        sent.append(str(posted.id))
    return sent


async def respond(interaction: discord.Interaction, reply: Reply, ephemeral: bool) -> list[str]:
    """Answer an interaction (or follow up after a defer), file on the last chunk; the ids of
    the messages sent."""
    chunks = chunks_of(reply)
    sent: list[str] = []
    for index, chunk in enumerate(chunks):
        files = files_of(reply.attachment) if index == len(chunks) - 1 else []
        if interaction.response.is_done():
            posted = await interaction.followup.send(
                chunk, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS, files=files, wait=True
            )
            sent.append(str(posted.id))
        else:
            answered = await interaction.response.send_message(
                chunk, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS, files=files
            )
            sent.append(str(answered.message_id or interaction.id))
    return sent


async def _keep_typing(channel: Messageable) -> None:
    while True:
        with contextlib.suppress(discord.HTTPException):
            await channel.typing()
        await asyncio.sleep(TYPING_REFRESH_S)


@contextlib.asynccontextmanager
async def typing_shown(channel: Messageable) -> AsyncIterator[None]:
    """Typing indicator while the block runs; a failed typing request never blocks the reply."""
    task = asyncio.create_task(_keep_typing(channel))
    try:
        yield
    finally:
        task.cancel()


# ---------------------------------------------------------------------------------------------
# Slash commands


def describe(command: Command) -> str:
    korean, english = DESCRIPTIONS[command]
    return f"{korean} ({english})"[:100]


SlashHandler = Callable[[discord.Interaction, Command, str], Awaitable[None]]


def plain_command(command: Command, handle: SlashHandler) -> app_commands.Command[Any, ..., None]:
    async def callback(interaction: discord.Interaction) -> None:
        await handle(interaction, command, "")

    return app_commands.Command(
        name=command.value, description=describe(command), callback=callback
    )


def persona_command(handle: SlashHandler) -> app_commands.Command[Any, ..., None]:
    @app_commands.describe(text="새 페르소나, 또는 clear (new persona, or clear); 비우면 보기")
    async def callback(interaction: discord.Interaction, text: str | None = None) -> None:
        await handle(interaction, Command.PERSONA, text or "")

    return app_commands.Command(
        name=Command.PERSONA.value, description=describe(Command.PERSONA), callback=callback
    )


def link_command(handle: SlashHandler) -> app_commands.Command[Any, ..., None]:
    @app_commands.describe(
        code="다른 계정에서 받은 코드; 비우면 새 코드 (code from your other account)"
    )
    async def callback(interaction: discord.Interaction, code: str | None = None) -> None:
        await handle(interaction, Command.LINK, code or "")

    return app_commands.Command(
        name=Command.LINK.value, description=describe(Command.LINK), callback=callback
    )


def text_command(command: Command, handle: SlashHandler) -> app_commands.Command[Any, ..., None]:
    """A slash command with one required text option (`/complete text:…`)."""

    @app_commands.describe(text=TEXT_ARGUMENTS[command])
    async def callback(interaction: discord.Interaction, text: str) -> None:
        await handle(interaction, command, text)

    return app_commands.Command(
        name=command.value, description=describe(command), callback=callback
    )


def build_command_tree(client: discord.Client, handle: SlashHandler) -> app_commands.CommandTree:
    tree: app_commands.CommandTree = app_commands.CommandTree(client)
    for command in SLASH_COMMANDS:
        if command is Command.PERSONA:
            tree.add_command(persona_command(handle))
        elif command is Command.LINK:
            tree.add_command(link_command(handle))
        elif command in TEXT_ARGUMENTS:
            tree.add_command(text_command(command, handle))
        else:
            tree.add_command(plain_command(command, handle))
    return tree


# ---------------------------------------------------------------------------------------------
# Streamed replies


@contextlib.contextmanager
def streaming_errors() -> Iterator[None]:
    """discord.py's errors for a streamed message, as `bots.live` expects them."""
    try:
        yield
    except discord.RateLimited as error:
        raise FloodWait(error.retry_after) from None
    except (discord.NotFound, discord.Forbidden) as error:
        raise EditFailed(str(error)) from None
    except discord.HTTPException as error:
        if error.status == 429 or error.status >= 500:
            raise FloodWait(retry_after_of(error)) from None
        raise EditFailed(str(error)) from None
    except (aiohttp.ClientError, OSError) as error:
        log.warning("streamed reply: %s", error)
        raise FloodWait(1.0) from None


def retry_after_of(error: discord.HTTPException) -> float:
    try:
        return float(error.response.headers.get("Retry-After", 1.0))
    except (AttributeError, TypeError, ValueError):
        return 1.0


Posted = Callable[[int], Awaitable[None]]


async def _nothing_to_note(_message_id: int) -> None:
    """The default `on_post`."""


StreamTiming = tuple[float, float | None]  # the interval between edits, the first post's delay


def streamed(
    post: Callable[[str], Awaitable[AnyMessage]],
    mentions: discord.AllowedMentions,
    timing: StreamTiming,
) -> LiveMessage[AnyMessage]:
    """A Discord message that grows by edits (`PATCH`), `post` making it; discord.py's errors
    as `bots.live` expects them; each partial cut to the reply's first chunk."""

    async def posted(text: str) -> AnyMessage:
        with streaming_errors():
            return await post(text)

    async def edit(sent: AnyMessage, text: str) -> None:
        with streaming_errors():
            await sent.edit(content=text, allowed_mentions=mentions)

    interval_s, first_after_s = timing
    return LiveMessage(
        posted,
        edit,
        interval_s=interval_s,
        first_after_s=first_after_s,
        fit=lambda text: chunks_of(Reply(text))[0],
    )


def live_reply(
    message: AnyMessage,
    interval_s: float,
    first_after_s: float | None = None,
    on_post: Posted = _nothing_to_note,
) -> LiveMessage[AnyMessage]:
    """A reply to `message` that grows by edits (the first post may ping its author);
    `on_post` learns the id of the message it streams into."""
    reference = message.to_reference(fail_if_not_exists=False)

    async def post(text: str) -> AnyMessage:
        sent = await message.channel.send(text, reference=reference, allowed_mentions=REPLY_MENTION)
        await on_post(sent.id)
        return sent

    return streamed(post, REPLY_MENTION, (interval_s, first_after_s))


SendMore = Callable[[str], Awaitable[str]]  # sends one more chunk of a reply; the message's id


async def finish_live(
    live: LiveMessage[AnyMessage] | None, reply: Reply, send_more: SendMore
) -> list[str] | None:
    """Finish the streamed message (`bots.live.finish_reply`) and send the rest with
    `send_more`: the ids of every message of the reply; None when it was not streamed."""
    rest = await finish_reply(live, reply, chunks_of(reply))
    if rest is None or live is None or live.handle is None:
        return None
    return [str(live.handle.id), *[await send_more(chunk) for chunk in rest]]


def more_replies_to(message: AnyMessage) -> SendMore:
    """The rest of a streamed reply to a message: further replies to it that ping no one."""
    reference = message.to_reference(fail_if_not_exists=False)

    async def send(chunk: str) -> str:
        posted = await message.channel.send(
            chunk, reference=reference, allowed_mentions=NO_MENTIONS
        )
        return str(posted.id)

    return send


class InteractionAnswer:
    """The answer to one slash command: deferred at most once (by the clock or by the first
    streamed text, whichever comes first), streamed into the original response by edits
    (`PATCH …/messages/@original`), the rest of a long reply sent as follow-ups."""

    def __init__(self, interaction: discord.Interaction, ephemeral: bool) -> None:
        self.interaction = interaction
        self.ephemeral = ephemeral
        self._deferring = asyncio.Lock()

    async def defer(self) -> None:
        async with self._deferring:
            if not self.interaction.response.is_done():
                await self.interaction.response.defer(ephemeral=self.ephemeral, thinking=True)

    def live(self, timing: StreamTiming) -> LiveMessage[AnyMessage]:
        async def post(text: str) -> AnyMessage:
            await self.defer()
            return await self.interaction.edit_original_response(
                content=text, allowed_mentions=NO_MENTIONS
            )

        return streamed(post, NO_MENTIONS, timing)

    async def follow_up(self, chunk: str) -> str:
        posted = await self.interaction.followup.send(
            chunk, ephemeral=self.ephemeral, allowed_mentions=NO_MENTIONS, wait=True
        )
        return str(posted.id)

    async def send(
        self, reply: Reply, private: bool, live: LiveMessage[AnyMessage] | None
    ) -> list[str]:
        """The reply, finishing the streamed answer if there is one; the ids of its messages."""
        streamed_ids = await finish_live(live, reply, self.follow_up)
        return streamed_ids or await respond(self.interaction, reply, private)


async def deliver(message: AnyMessage, reply: Reply, live: LiveMessage[AnyMessage] | None) -> Sent:
    """Send the reply (finishing the streamed message, if any); how it went."""

    async def sending() -> list[str]:
        streamed_ids = await finish_live(live, reply, more_replies_to(message))
        return streamed_ids or await send_reply(message, reply)

    return await outcome_of(sending())


async def outcome_of(sending: Awaitable[list[str]]) -> Sent:
    """How sending a reply went (the ids of its messages when it was sent)."""
    try:
        return Sent(Outcome.SENT, tuple(await sending))
    except (discord.Forbidden, discord.NotFound) as error:
        log.warning("cannot answer in this channel (%s %s)", error.status, error.text)
        return Sent(Outcome.REFUSED)
    except (discord.HTTPException, aiohttp.ClientError, OSError) as error:
        log.warning("sending a reply failed (%s); it is sent at the next start", error)
        return Sent(Outcome.FAILED)


async def finish_within(task: asyncio.Task[Reply], seconds: float) -> bool:
    """Wait up to `seconds` for `task` without cancelling it; True when it is done."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return bool(done)


# ---------------------------------------------------------------------------------------------
# The adapter


class DiscordAdapter:
    """Translates between discord.py and one DialogueManager (held, never subclassed)."""

    def __init__(
        self,
        settings: Settings,
        manager: DialogueManager,
        client: KobotClient | KobotShardedClient,
        *,
        defer_after_s: float = DEFER_AFTER_S,
        stream_interval_s: float = DEFAULT_INTERVAL_S,
        stream_first_after_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.client = client
        self.policy = AccessPolicy.discord(settings)
        self.listed_channels = frozenset(settings.discord_channels)
        self.defer_after_s = defer_after_s
        self.stream_timing = (stream_interval_s, stream_first_after_s)
        self.in_flight = InFlight()
        self.inbox = DiscordInbox(manager.storage)
        self._gateway: asyncio.Task[None] | None = None
        self._resumed = False
        self.closing = False
        self.tree = build_command_tree(client, self._tracked_command)
        self.tree.error(self.on_command_error)
        client.adapter = self

    @property
    def bot_id(self) -> int:
        user = self.client.user
        return user.id if user is not None else 0

    def is_connected(self) -> bool:
        """For `/healthz`: the gateway session is ready and the client not closed."""
        return self.client.is_ready() and not self.client.is_closed()

    async def start(self) -> None:
        """Register the slash commands, then open the gateway (in the background)."""
        await self.sync_commands()
        self._gateway = asyncio.create_task(self._connect(), name="kobot-discord-gateway")

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set or the gateway ends (a bad intent or shard setting raises
        StartupError)."""
        if self._gateway is not None and await done_or_stopped(self._gateway, stop):
            self._gateway.result()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking messages and commands; wait for those in flight (at most `timeout_s`,
        then they are cancelled); close the client."""
        self.closing = True
        await self.in_flight.drain(timeout_s)
        await self.client.close()
        if self._gateway is not None:
            await asyncio.wait([self._gateway])

    async def _connect(self) -> None:
        if isinstance(self.client, KobotShardedClient) and self.client.shard_count is None:
            count, _, _ = await self.client.http.get_bot_gateway()
            self.client.shard_count = count
            log.info("Discord recommends %d shards", count)
        try:
            await self.client.connect(reconnect=True)
        except discord.PrivilegedIntentsRequired:
            raise StartupError(MISSING_INTENT) from None
        except discord.ConnectionClosed as error:
            reason = GATEWAY_CLOSE_REASONS.get(error.code or 0, "see Discord's close codes")
            raise StartupError(f"Discord gateway closed ({error.code}): {reason}") from None

    async def sync_commands(self) -> None:
        """Register the slash commands: per listed guild (instant) or globally (up to an hour)."""
        try:
            await self._sync()
        except discord.HTTPException as error:
            log.warning("could not sync slash commands (%s %s)", error.status, error.text)

    async def _sync(self) -> None:
        if not self.settings.discord_guilds:
            synced = await self.tree.sync()
            log.info("synced %d global slash commands", len(synced))
            return
        for guild_id in self.settings.discord_guilds:
            guild = discord.Object(id=guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d slash commands to guild %d", len(synced), guild_id)

    # -- messages ----------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if not is_from_person(message) or not self.is_addressed(message):
            return
        prepared = self.prepare(message)
        if isinstance(prepared, Reply):
            await deliver(message, prepared, None)
        elif prepared is not None and await self.inbox.first_sighting(prepared):
            await self.answer(message, prepared)

    def is_addressed(self, message: discord.Message) -> bool:
        """DMs always; in servers a mention, a reply to the bot, or a listed channel."""
        if message.guild is None:
            return True
        return (
            mentions_bot(message, self.bot_id)
            or replies_to_bot(message, self.bot_id)
            or in_channels(message.channel, self.listed_channels)
        )

    def prepare(self, message: discord.Message) -> IncomingMessage | Reply | None:
        """What the core should answer, or a local notice; None when nothing should be sent."""
        guild_id = message.guild.id if message.guild is not None else None
        place = place_of(message.author, guild_id, message.channel)
        if not self.policy.allows(message.author.id, place):
            return Reply(NOT_ALLOWED, ReplyKind.NOTICE) if message.guild is None else None
        text = message_text(message, self.bot_id)
        if not text and has_media(message):
            return Reply(NO_TEXT, ReplyKind.NOTICE)
        return incoming_message(message, text, self.policy.admins)

    async def answer(self, message: AnyMessage, incoming: IncomingMessage) -> None:
        """The core's reply to a stored message, sent; the outbox and the inbox updated."""
        live = self._live(message, incoming) if self.settings.stream_replies else None
        async with streaming(live), typing_shown(message.channel):
            reply = await self.manager.handle_stream(incoming, live.update if live else None)
        if reply.duplicate:
            log.info("message %s was answered before; not sending again", incoming.message_id)
            await self.inbox.done(incoming)
            return
        sent = await deliver(message, without_public_file(reply, incoming.is_private), live)
        await self._record(incoming, reply, sent)

    def _live(self, message: AnyMessage, incoming: IncomingMessage) -> LiveMessage[AnyMessage]:
        """The streamed reply: in the message a previous run had begun, if any (noted in the
        inbox), so a restart finishes it instead of leaving it half-written."""

        async def noted(reply_id: int) -> None:
            await self.inbox.note_streamed(incoming, reply_id)

        live = live_reply(message, *self.stream_timing, on_post=noted)
        earlier = self.inbox.streamed_before(incoming)
        if earlier is not None:
            channel = self.client.get_partial_messageable(int(incoming.chat_id))
            live.handle = channel.get_partial_message(earlier)
        return live

    async def _record(self, incoming: IncomingMessage, reply: Reply, sent: Sent) -> None:
        await record(self.manager, incoming, reply, sent)
        if sent.outcome is not Outcome.FAILED:
            await self.inbox.done(incoming)

    async def resume_unfinished(self) -> None:
        """Once per run, when the gateway is first ready: answer what the last run left."""
        if self._resumed:
            return
        self._resumed = True
        pending = await self.inbox.unfinished()
        if pending:
            log.info("taking up %d unfinished messages from the inbox", len(pending))
        await asyncio.gather(*(self.answer(self._partial(m), m) for m in pending))

    def _partial(self, incoming: IncomingMessage) -> discord.PartialMessage:
        channel = self.client.get_partial_messageable(int(incoming.chat_id))
        return channel.get_partial_message(int(incoming.message_id))

    # -- slash commands ----------------------------------------------------------------------

    async def _tracked_command(
        self, interaction: discord.Interaction, command: Command, argument: str
    ) -> None:
        if self.closing:
            await respond(interaction, Reply(RESTARTING, ReplyKind.NOTICE), ephemeral=True)
            return
        with self.in_flight.track():
            await self.on_command(interaction, command, argument)

    async def on_command(
        self, interaction: discord.Interaction, command: Command, argument: str
    ) -> None:
        """Route to the core; defer when the core takes longer than `defer_after_s` (or when
        the reply starts streaming); a command answered before (a replay) is not answered
        again, and a stored answer goes through the outbox like a message's."""
        place = place_of(interaction.user, interaction.guild_id, interaction.channel)
        if not self.policy.allows(interaction.user.id, place):
            await respond(interaction, Reply(NOT_ALLOWED, ReplyKind.NOTICE), ephemeral=True)
            return
        answer = InteractionAnswer(interaction, command in PRIVATE_COMMANDS)
        incoming = command_message(interaction, command, argument, self.policy.admins)
        live = answer.live(self.stream_timing) if self._streams(command) else None
        reply = await self._command_reply(answer, incoming, live)
        if reply.duplicate:
            log.info("interaction %s was answered before; not again", incoming.message_id)
            return
        private = answer.ephemeral or reply.kind in (ReplyKind.NOTICE, ReplyKind.ERROR)
        sent = await outcome_of(answer.send(reply, private, live))
        await record(self.manager, incoming, reply, sent)

    def _streams(self, command: Command) -> bool:
        return self.settings.stream_replies and command in STREAMED_COMMANDS

    async def _command_reply(
        self,
        answer: InteractionAnswer,
        incoming: IncomingMessage,
        live: LiveMessage[AnyMessage] | None,
    ) -> Reply:
        on_partial = live.update if live is not None else None
        async with streaming(live):
            task = asyncio.create_task(self.manager.handle_stream(incoming, on_partial))
            if not await finish_within(task, self.defer_after_s):
                await answer.defer()
            return await task

    async def on_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """Log it and answer (or finish a deferred answer) so no one waits on "thinking…"."""
        log.error("slash command failed", exc_info=error)
        with contextlib.suppress(discord.HTTPException):
            await respond(interaction, Reply(COMMAND_FAILED, ReplyKind.ERROR), ephemeral=True)


# ---------------------------------------------------------------------------------------------
# Running


class DiscordBot:
    """The Discord platform: the token is accepted (a login) before the model loads, so a bad
    token fails in a second; then the adapter runs over the manager.

    `run()` serves one given `manager` (the caller closes it; without one it is built after
    the login) until `close()`; `kobot discord` runs it through `bots.base.run_adapter`.
    """

    name = PLATFORM

    def __init__(
        self,
        settings: Settings,
        manager: DialogueManager | None = None,
        *,
        defer_after_s: float = DEFER_AFTER_S,
        identify_delay_s: float = IDENTIFY_DELAY_S,
        stream_interval_s: float = DEFAULT_INTERVAL_S,
        stream_first_after_s: float | None = None,
        **client_options: Any,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.defer_after_s = defer_after_s
        self.stream_timing = (stream_interval_s, stream_first_after_s)
        self.client = create_client(settings, **client_options)
        self.client.identify_delay_s = identify_delay_s
        self.adapter: DiscordAdapter | None = None
        self._held = contextlib.AsyncExitStack()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Serve until `close()`; a bad token, intent or gateway setting raises StartupError."""
        await run_platform(self.settings, self, Shutdown(self._stop), 0.0, manager=self.manager)

    async def close(self) -> None:
        """End `run()` now (replies in flight are cancelled)."""
        self._stop.set()

    async def connect(self) -> None:
        token = discord_token(self.settings)
        endpoints = discord_endpoints(
            self.settings.discord_api_url, self.settings.discord_gateway_url
        )
        self._held.enter_context(endpoints)
        await self._held.enter_async_context(self.client)
        await self._login(token)

    def adapter_for(self, manager: DialogueManager, shutdown: Shutdown) -> DiscordAdapter:
        self.adapter = DiscordAdapter(
            self.settings,
            manager,
            self.client,
            defer_after_s=self.defer_after_s,
            stream_interval_s=self.stream_timing[0],
            stream_first_after_s=self.stream_timing[1],
        )
        return self.adapter

    async def disconnect(self) -> None:
        """Close the client and give discord.py its own endpoints back."""
        await self._held.aclose()

    async def _login(self, token: str) -> None:
        try:
            await self.client.login(token)
        except discord.LoginFailure:
            raise StartupError(TOKEN_REJECTED) from None
        except (aiohttp.ClientError, OSError) as error:
            where = mask_url_password(Route.BASE)
            raise StartupError(f"Discord API에 연결할 수 없어요 ({where}): {error}") from None
        if not has_message_content(self.client.application_flags):
            raise StartupError(MISSING_INTENT)


def discord_token(settings: Settings) -> str:
    token = settings.discord_token.get_secret_value().strip() if settings.discord_token else ""
    if not token:
        raise StartupError("KOBOT_DISCORD_TOKEN: not set (Developer Portal → Bot → Reset Token)")
    return token


def main(settings: Settings) -> int:
    """`kobot discord`: SIGTERM/SIGINT lets the replies in flight finish within
    KOBOT_SHUTDOWN_TIMEOUT_S, then the client closes, then the model and storage."""
    asyncio.run(run_adapter(settings, DiscordBot(settings)))
    return 0
