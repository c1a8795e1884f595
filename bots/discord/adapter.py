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

Proxies (`KOBOT_DISCORD_API_URL`, `KOBOT_DISCORD_GATEWAY_URL`): see `bots.discord.endpoints`.

Streaming (`KOBOT_STREAM_REPLIES`, on by default)
    A reply to a message is posted as soon as the model has text and grows by message edits
    (`PATCH`), at most one per second per message (`bots.live`, `bots.discord.streaming`);
    discord.py waits out 429s itself, and one it gives up on pushes the next edit back. The
    last edit makes the message exactly the reply `handle` returns; further chunks follow as
    messages. The slash commands that generate (`/complete`, `/story`, `/retry`) stream the
    same way into the interaction's original response: deferred ("thinking…") once there is
    text or after `defer_after_s`, then edited (`PATCH /webhooks/…/messages/@original`) at the
    same pace, the last edit exactly the reply; further chunks follow as follow-ups.

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
import logging
from dataclasses import dataclass

import discord
from discord import app_commands

from bots.access import AccessPolicy
from bots.base import InFlight, done_or_stopped
from bots.discord.client import (
    GATEWAY_CLOSE_REASONS,
    MISSING_INTENT,
    KobotClient,
    KobotShardedClient,
)
from bots.discord.commands import (
    PRIVATE_COMMANDS,
    STREAMED_COMMANDS,
    InteractionAnswer,
    build_command_tree,
)
from bots.discord.inbox import DiscordInbox
from bots.discord.rendering import (
    AnyMessage,
    outcome_of,
    respond,
    typing_shown,
    without_public_file,
)
from bots.discord.routing import (
    PLATFORM,
    command_message,
    has_media,
    in_channels,
    incoming_message,
    is_from_person,
    mentions_bot,
    message_text,
    place_of,
    replies_to_bot,
)
from bots.discord.streaming import StreamTiming, deliver, live_reply
from bots.live import (
    DEFAULT_INTERVAL_S,
    LiveMessage,
    streaming,
)
from bots.outbox import Outcome, Sent, record
from core.dialogue.commands import Command
from core.dialogue.manager import DialogueManager
from core.errors import StartupError
from core.messages import IncomingMessage, Reply, ReplyKind
from core.settings import Settings

log = logging.getLogger(__name__)

DEFER_AFTER_S = 2.0  # Discord allows 3 s before an interaction must be answered or deferred


NO_TEXT = (
    "아직 글만 읽을 수 있어요. 하고 싶은 말을 글로 적어 주세요. "
    "(I can only read text; please write your message.)"
)
COMMAND_FAILED = "죄송해요, 명령을 처리하지 못했어요. (Sorry, that command failed.)"
RESTARTING = "봇이 곧 다시 시작해요. 잠시 후 다시 시도해 주세요. (Restarting; retry shortly.)"
NOT_ALLOWED = "여기서는 이 봇을 쓸 수 없어요. (This bot is not available here.)"


async def finish_within(task: asyncio.Task[Reply], seconds: float) -> bool:
    """Wait up to `seconds` for `task` without cancelling it; True when it is done."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return bool(done)


@dataclass(frozen=True, slots=True)
class Timing:
    """How long a slash command may take before it is deferred, and the pace of streamed edits."""

    defer_after_s: float = DEFER_AFTER_S
    stream_interval_s: float = DEFAULT_INTERVAL_S
    stream_first_after_s: float | None = None  # None: one interval

    @property
    def stream(self) -> StreamTiming:
        return self.stream_interval_s, self.stream_first_after_s


class DiscordAdapter:
    """Translates between discord.py and one DialogueManager (held, never subclassed)."""

    def __init__(
        self,
        settings: Settings,
        manager: DialogueManager,
        client: KobotClient | KobotShardedClient,
        timing: Timing | None = None,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.client = client
        self.policy = AccessPolicy.of(settings, PLATFORM)
        self.listed_channels = frozenset(settings.discord_channels)
        self.timing = timing or Timing()
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

        live = live_reply(message, *self.timing.stream, on_post=noted)
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
        live = answer.live(self.timing.stream) if self._streams(command) else None
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
            if not await finish_within(task, self.timing.defer_after_s):
                await answer.defer()
            return await task

    async def on_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """Log it and answer (or finish a deferred answer) so no one waits on "thinking…"."""
        log.error("slash command failed", exc_info=error)
        with contextlib.suppress(discord.HTTPException):
            await respond(interaction, Reply(COMMAND_FAILED, ReplyKind.ERROR), ephemeral=True)
