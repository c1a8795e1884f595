"""`kobot telegram`: people chat with KoGPT2 on Telegram through python-telegram-bot 22.

The adapter holds a DialogueManager and translates: Telegram update → IncomingMessage →
`manager.handle` → Reply → paced, split, plain-text Telegram messages. Policies decided here:

* Who is answered: see `bots.telegram.routing` (private chats always; groups on a mention, a
  reply to the bot or a command; never bots; allowlists; admins for `/stats`).
* Edited messages are ignored: the bot does not ask Telegram for them (`allowed_updates`), and
  PTB's handler only takes new messages. The original was answered already; an edit keeps its
  message id, so the core's restart dedup would return the old stored reply anyway, and answering
  every typo fix would double the bot's messages in a group.
* Nothing lost, nothing answered twice: each update is written to the storage inbox before it
  is confirmed to Telegram, and confirmed at once (`bots.telegram.updates`); after a crash the
  unfinished ones are taken again. A reply is stored with its AI turn as `pending` (the outbox)
  and marked `sent` (with Telegram's message ids) once sent, so a message handled again finds
  its stored reply (message id `"<chat>:<message>"`) and sends it from storage if it was never
  sent, or nothing if it was.
* Flood limits: sends are paced per chat and overall, a 429 is waited out and retried. A send
  Telegram refuses for good (chat gone, bot blocked) marks the reply `failed`, never retried; one
  that fails for now keeps it `pending` and its update unfinished, for the next start.
* Ids in log lines are keyed hashes unless KOBOT_LOG_USER_IDS=plain.
* `/export` in a group is sent to the user's private chat: the history is theirs alone.
* Streaming (`KOBOT_STREAM_REPLIES`, on by default): a reply being generated is posted as soon
  as it has text and grows by `editMessageText`, at most once a second per message (paced with
  the chat's other sends; a `RetryAfter` pushes the next edit back, see `bots.live`); the
  last edit makes it exactly the reply `handle` returns, further chunks follow as messages.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from telegram import BotCommand, Message, Update
from telegram.error import InvalidToken, TelegramError
from telegram.ext import CallbackContext, MessageHandler, filters

from bots.access import AccessPolicy, Place
from bots.live import EditFailed, LiveMessage, finish_reply, streaming
from bots.outbox import Outcome, Sent, record
from bots.telegram.client import TelegramApp, build_application, connect
from bots.telegram.delivery import Sender, Target, typing
from bots.telegram.dispatch import UpdateDispatcher
from bots.telegram.pacing import ChatPacer, Pacing
from bots.telegram.redaction import SecretRedactor, telegram_secrets
from bots.telegram.routing import (
    NON_TEXT_REPLY,
    PLATFORM,
    BotIdentity,
    Decision,
    Route,
    decide,
    is_private,
    to_incoming,
)
from bots.telegram.updates import (
    ALLOWED_UPDATES,
    DeliveryPending,
    Poller,
    PollingConfig,
    UpdateInbox,
    resume_unfinished,
)
from bots.telegram.webhook import WebhookServer
from core.dialogue import texts
from core.dialogue.commands import Command, parse_command
from core.dialogue.manager import DialogueManager
from core.dialogue.texts import DESCRIPTIONS
from core.dialogue.uses import MODEL_COMMANDS
from core.errors import StartupError
from core.messages import Attachment, IncomingMessage, Reply, ReplyKind, utc_now
from core.ops.logs import UserIds
from core.settings import Settings
from core.text import split_message, utf16_length

log = logging.getLogger(__name__)
Context = CallbackContext[Any, Any, Any, Any]


MESSAGE_LIMIT = 4096
INBOX_KEPT = timedelta(days=1)  # finished inbox rows are forgotten after this
CAPTION_LIMIT = 1024
MENU = tuple(c for c in Command if c is not Command.STATS)  # for admins: not in the menu
EMPTY_REPLY = "…"
EXPORT_SENT_PRIVATELY = (
    "대화 기록은 개인 채팅으로 보내 드렸어요. (I sent your history to you in a private chat.)"
)
EXPORT_NEEDS_PRIVATE_CHAT = (
    "대화 기록을 보내려면 먼저 저와 개인 채팅을 시작해 주세요(/start). "
    "(Please start a private chat with me first, then try /export again.)"
)


@dataclass(frozen=True, slots=True)
class TelegramOptions:
    """Timing knobs; the defaults suit production, tests shorten some of them."""

    polling: PollingConfig = field(default_factory=PollingConfig)
    pacing: Pacing = field(default_factory=Pacing)
    typing_interval_s: float = 4.0
    drain_timeout_s: float = 30.0
    max_concurrent_updates: int = 64
    send_attempts: int = 4
    stream_interval_s: float = 1.0
    stream_first_after_s: float | None = None  # None: one interval


def target_for(message: Message) -> Target:
    """Reply in the same chat (and forum topic); in groups, quote the user's message."""
    group = not is_private(message)
    return Target(
        chat_id=message.chat.id,
        is_group=group,
        thread_id=message.message_thread_id if message.is_topic_message else None,
        reply_to=message.message_id if group else None,
    )


def chunks(text: str) -> list[str]:
    """Plain-text pieces within Telegram's limit (UTF-16 units), cut at sentence or line ends."""
    return split_message(text, MESSAGE_LIMIT, utf16_length) or [EMPTY_REPLY]


def menu(language: int) -> list[BotCommand]:
    """The command menu; `language` 0 is Korean, 1 English (as in `DESCRIPTIONS`)."""
    return [BotCommand(command.value, DESCRIPTIONS[command][language]) for command in MENU]


def is_stats(text: str) -> bool:
    parsed = parse_command(text)
    return parsed is not None and parsed.command is Command.STATS


class TelegramAdapter:
    """Runs the Telegram side of kobot: updates in, replies out; holds a DialogueManager."""

    def __init__(
        self,
        manager: DialogueManager,
        settings: Settings,
        application: TelegramApp | None = None,
        options: TelegramOptions | None = None,
    ) -> None:
        self.manager = manager
        self.settings = settings
        self.options = options or TelegramOptions()
        self.application = application or build_application(settings)
        self.bot = self.application.bot
        self.access = AccessPolicy.of(settings, PLATFORM)
        self.ids = UserIds.from_settings(settings)
        self.inbox = UpdateInbox(manager.storage, self.bot, self._process)
        self.dispatcher = UpdateDispatcher(self.inbox.process, self.options.max_concurrent_updates)
        self._undelivered: set[int] = set()
        pacer = ChatPacer(self.options.pacing)
        self.sender = Sender(self.bot, pacer, self.options.send_attempts, ids=self.ids)
        self.redactor = SecretRedactor(telegram_secrets(settings))
        self.me: BotIdentity | None = None
        self.webhook: WebhookServer | None = None
        self._poller: Poller | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.application.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self._on_message))
        self.application.add_error_handler(self._on_error)

    # Lifecycle

    async def start(self) -> None:
        """Check the token, register the command menu, then poll or listen for the webhook."""
        self.redactor.install()
        try:
            self.me = await connect(self.application, self.settings)
            await self.application.start()
            await self._register_commands()
            await self._resume_inbox()
            if self.settings.telegram_webhook_url:
                await self._start_webhook(self.settings.telegram_webhook_url)
            else:
                await self._start_polling()
        except BaseException:
            if self.webhook is not None:
                await self.webhook.stop(0)
            await self._shutdown_application()
            raise

    async def _resume_inbox(self) -> None:
        """Take up what the previous run stored but did not finish; forget old finished rows."""
        await self.manager.storage.inbox_prune(utc_now() - INBOX_KEPT)
        await resume_unfinished(self.inbox, self.dispatcher)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (or polling fails for good)."""
        stopped = asyncio.ensure_future(stop.wait())
        waiters: set[asyncio.Future[Any]] = {stopped}
        if self._poll_task is not None:
            waiters.add(self._poll_task)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking updates, let running ones finish (up to `timeout_s`), shut down."""
        try:
            if self.webhook is not None:
                await self.webhook.stop(timeout_s)
            else:
                await self._stop_polling(timeout_s)
        finally:
            await self._shutdown_application()

    async def stop(self) -> None:
        """`drain` within the options' drain timeout (for a caller that runs the adapter)."""
        await self.drain(self.options.drain_timeout_s)

    async def _start_polling(self) -> None:
        """Remove any webhook (pending updates stay queued at Telegram), then poll."""
        try:
            await self.bot.delete_webhook(drop_pending_updates=False)
        except TelegramError as error:
            reason = self.redactor.redact(str(error))
            raise StartupError(f"deleteWebhook failed, cannot start polling: {reason}") from None
        self._poller = Poller(self.bot, self.dispatcher, self.inbox, self.options.polling)
        self._poll_task = asyncio.create_task(self._poller.run(self._stopping))
        log.info("telegram: long polling as @%s", self._username())

    async def _stop_polling(self, timeout_s: float) -> None:
        self._stopping.set()
        failure = await self._finish_poll_task()
        await self.dispatcher.drain(timeout_s)
        if self._poller is not None and failure is None:
            await self._poller.confirm()
        if isinstance(failure, InvalidToken):
            raise StartupError("KOBOT_TELEGRAM_TOKEN was rejected while polling (revoked?)")

    async def _finish_poll_task(self) -> BaseException | None:
        if self._poll_task is None:
            return None
        await asyncio.wait([self._poll_task])
        failure = None if self._poll_task.cancelled() else self._poll_task.exception()
        if failure is not None:
            log.error("polling stopped: %s", type(failure).__name__)
        return failure

    async def _start_webhook(self, url: str) -> None:
        secret = self._webhook_secret()
        self.webhook = WebhookServer(
            self.bot, self.dispatcher, self.inbox, secret, urlsplit(url).path or "/"
        )
        listen, port = self.settings.telegram_webhook_listen, self.settings.telegram_webhook_port
        bound = await self.webhook.start(listen, port)
        await self._set_webhook(url, secret)
        log.info("telegram: webhook as @%s on %s:%d", self._username(), listen, bound)

    def _webhook_secret(self) -> str:
        """The configured secret, or a fresh random one (Telegram echoes it on every request)."""
        configured = self.settings.telegram_webhook_secret
        secret = configured.get_secret_value() if configured else secrets.token_urlsafe(32)
        self.redactor.add(secret)
        return secret

    async def _set_webhook(self, url: str, secret: str) -> None:
        try:
            await self.bot.set_webhook(
                url=url, secret_token=secret, allowed_updates=list(ALLOWED_UPDATES)
            )
        except TelegramError as error:
            reason = self.redactor.redact(str(error))
            raise StartupError(f"setWebhook was refused: {reason}") from None

    async def _register_commands(self) -> None:
        try:
            await self.bot.set_my_commands(menu(0))
            await self.bot.set_my_commands(menu(1), language_code="en")
        except TelegramError as error:
            log.warning("could not register the command menu: %s", error)

    async def _shutdown_application(self) -> None:
        try:
            if self.application.running:
                await self.application.stop()
            await self.application.shutdown()
        finally:
            self.redactor.remove()

    def _username(self) -> str:
        return self.me.username if self.me else "?"

    def is_connected(self) -> bool:
        """For `/healthz`: the token was accepted and polling (or the webhook) is running."""
        serving = self.webhook is not None or (
            self._poll_task is not None and not self._poll_task.done()
        )
        return self.me is not None and self.application.running and serving

    # Messages

    async def _process(self, update: Update) -> None:
        """PTB's handlers on one update; `DeliveryPending` when its reply could not be sent."""
        await self.application.process_update(update)
        if update.update_id in self._undelivered:
            self._undelivered.discard(update.update_id)
            raise DeliveryPending(update.update_id)

    def _chat(self, chat_id: int) -> str:
        return self.ids(PLATFORM, str(chat_id))

    async def _on_message(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or self.me is None:
            return
        decision = decide(message, self.me)
        if decision.route is Route.IGNORE:
            log.debug(
                "ignored message %d in chat %s: %s",
                message.message_id,
                self._chat(message.chat.id),
                decision.reason,
            )
        elif self._allowed(message):
            await self._respond(update.update_id, message, decision)

    def _allowed(self, message: Message) -> bool:
        user_id = message.from_user.id if message.from_user else 0
        allowed = self.access.allows(user_id, Place(frozenset({message.chat.id})))
        if not allowed:
            log.info(
                "ignored user %s in chat %s: not in the allowlists",
                self.ids(PLATFORM, str(user_id)),
                self._chat(message.chat.id),
            )
        return allowed

    async def _respond(self, update_id: int, message: Message, decision: Decision) -> None:
        target = target_for(message)
        if decision.route is Route.NON_TEXT:
            await self.sender.send_texts(target, [NON_TEXT_REPLY])
            return
        incoming = to_incoming(message, decision.text, self.access.admins)
        async with self._typing(target, incoming.text):
            async with streaming(self._live_message(target, update_id)) as live:
                reply = await self._handle(incoming, live)
            if reply.duplicate:
                shown = self.ids.message(PLATFORM, incoming.message_id)
                log.info("message %s was answered already; not sent again", shown)
                return
            sent = await self._send_reply(incoming, reply, target, live)
        await record(self.manager, incoming, reply, sent)
        if reply.pending_delivery and sent.outcome is Outcome.FAILED:
            self._undelivered.add(update_id)

    async def _send_reply(
        self,
        incoming: IncomingMessage,
        reply: Reply,
        target: Target,
        live: LiveMessage[int] | None,
    ) -> Sent:
        """Finish the streamed message, if any, and send the rest; else send it all."""
        rest = await finish_reply(live, reply, chunks(reply.text))
        if rest is None or live is None or live.handle is None:
            return await self._deliver(incoming, reply, target)
        after = await self.sender.send_chunks(target, list(rest))
        return Sent(after.outcome, (str(live.handle), *after.ids))

    async def _handle(
        self, incoming: IncomingMessage, live: LiveMessage[int] | None = None
    ) -> Reply:
        """The core's reply (streamed into `live`, if given); an unexpected failure still gets
        the user a polite line."""
        try:
            return await self.manager.handle_stream(incoming, live.update if live else None)
        except Exception:
            shown = self.ids.message(PLATFORM, incoming.message_id)
            log.exception("the dialogue manager failed on message %s", shown)
            return Reply(texts.GENERATION_FAILED["default"], ReplyKind.ERROR)

    def _live_message(self, target: Target, update_id: int) -> LiveMessage[int] | None:
        """A message to stream the reply into, when streaming is on: the one a previous run
        had begun (the reply is finished in it), or a new one, noted in the inbox."""
        if not self.settings.stream_replies:
            return None

        async def post(text: str) -> int:
            message_id = await self.sender.send_text(target, text)
            if message_id is None:
                raise EditFailed(f"could not post to chat {self.sender.chat(target)}")
            await self.inbox.note_streamed(update_id, message_id)
            return message_id

        async def edit(message_id: int, text: str) -> None:
            await self.sender.edit_text(target, message_id, text)

        live = LiveMessage(
            post,
            edit,
            interval_s=self.options.stream_interval_s,
            first_after_s=self.options.stream_first_after_s,
            fit=lambda text: chunks(text)[0],
        )
        live.handle = self.inbox.streamed_before(update_id)
        return live

    def _typing(self, target: Target, text: str) -> AbstractAsyncContextManager[None]:
        parsed = parse_command(text)
        if parsed is not None and parsed.command not in MODEL_COMMANDS:
            return nullcontext()
        return typing(self.bot, target, self.options.typing_interval_s)

    async def _deliver(self, incoming: IncomingMessage, reply: Reply, target: Target) -> Sent:
        text = self._with_queue_depth(reply) if is_stats(incoming.text) else reply.text
        if reply.attachment is None:
            return await self.sender.send_chunks(target, chunks(text))
        if incoming.is_private:
            return Sent.of(await self._send_document(target, reply.attachment, text))
        await self._send_document_privately(incoming, reply.attachment, text, target)
        return Sent.of(True)

    def _with_queue_depth(self, reply: Reply) -> str:
        if reply.kind is not ReplyKind.COMMAND:
            return reply.text
        depth = self.dispatcher.in_flight
        return f"{reply.text}\n텔레그램 처리 중인 업데이트 {depth} (Telegram updates in flight)"

    async def _send_document(self, target: Target, attachment: Attachment, text: str) -> bool:
        if utf16_length(text) <= CAPTION_LIMIT:
            return await self.sender.send_document(target, attachment, text)
        sent = await self.sender.send_texts(target, chunks(text))
        return sent and await self.sender.send_document(target, attachment, "")

    async def _send_document_privately(
        self, incoming: IncomingMessage, attachment: Attachment, text: str, target: Target
    ) -> None:
        sent = await self._send_document(Target(int(incoming.user_id)), attachment, text)
        notice = EXPORT_SENT_PRIVATELY if sent else EXPORT_NEEDS_PRIVATE_CHAT
        await self.sender.send_texts(target, [notice])

    async def _on_error(self, update: object, context: Context) -> None:
        log.error("handling a Telegram update failed", exc_info=context.error)
