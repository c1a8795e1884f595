"""The platform-neutral dialogue manager: one message in, one reply out."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from core.dialogue import texts
from core.dialogue.commands import PERSONA_CLEAR_WORDS, Command, ParsedCommand, parse_command
from core.dialogue.linking import AccountLinks, merged_export
from core.dialogue.prompt import STOP_STRINGS
from core.dialogue.ratelimit import RateLimiter
from core.dialogue.services import DialogueServices
from core.dialogue.streaming import PartialCallback, partials_to
from core.dialogue.trimming import TrimmedPrompt
from core.dialogue.uses import MODEL_COMMANDS, ModelCommands
from core.generation.base import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
)
from core.messages import (
    PERSON,
    Attachment,
    ConversationKey,
    IncomingMessage,
    Reply,
    ReplyKind,
    Role,
    Turn,
)
from core.ops.turns import TurnObserver
from core.text import remove_control_characters, to_single_line
from storage.base import Delivery, DeliveryRecord, StorageError
from storage.locks import Lease, LeaseLost, LockTimeout

log = logging.getLogger(__name__)
PERSONA_MAX_CHARS = 500
LEASE_ATTEMPTS = 2


@dataclass
class DialogueStats:
    """Live figures; what was counted (messages, replies, errors…) is the observer's."""

    in_flight: int = 0


def speaker_id(key: ConversationKey, message: IncomingMessage) -> str:
    """Whom a stored turn is by (or for): in a person's conversation the person, so that
    `/export` and `/forget` of the person reach it; elsewhere the sender's account."""
    return key.user_id if key.platform == PERSON else message.user_id


class DialogueManager:
    """Keeps per-conversation context, builds trimmed prompts and asks the backend for replies.

    Adapters hold one instance and call `handle`; everything platform-specific stays with them.
    """

    def __init__(self, services: DialogueServices) -> None:
        self.services = services
        settings = self.settings = services.settings
        self.storage, self.backend, self.locks = services.storage, services.backend, services.locks
        self.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
        self.stats = DialogueStats()
        self.observer = TurnObserver(settings)
        self.low_water = int(services.budget * settings.trim_low_water)
        self.uses = ModelCommands(self.services, settings)
        self.links = AccountLinks(
            self.storage, settings.link_code_ttl_s, settings.context_scope, self.observer.user_ids
        )

    async def handle(self, message: IncomingMessage) -> Reply:
        """Answer one message: a command, a chat turn, or a polite explanation."""
        with self.observer.turn(message) as turn:
            turn.reply = await self._handle(message)
            return turn.reply

    async def handle_stream(
        self, message: IncomingMessage, on_partial: PartialCallback | None
    ) -> Reply:
        """`handle`, and while a reply is generated, `on_partial(reply so far)` whenever it grows
        (chat, /complete, /story, /retry). The returned Reply is exactly what `handle` gives."""
        with partials_to(on_partial):
            return await self.handle(message)

    async def _handle(self, message: IncomingMessage) -> Reply:
        command = parse_command(message.text)
        try:
            message = await self.links.resolved(message, command.command if command else None)
            if command is not None:
                self.observer.command()
                return await self._run_command(message, command)
            return await self._chat(message)
        except StorageError:
            log.exception("storage failed while handling a message")
            self.observer.error("storage")
            return Reply(texts.STORAGE_FAILED, ReplyKind.ERROR)

    async def _chat(self, message: IncomingMessage) -> Reply:
        text, cut = self._clean_input(message.text)
        if not to_single_line(text):
            return Reply(texts.EMPTY_TEXT, ReplyKind.NOTICE)
        key = self.services.key_for(message)
        earlier = await self.services.earlier_reply(key, message)
        if earlier is not None:
            return earlier
        return await self._limited(message, lambda: self._chat_leased(key, message, text, cut))

    async def _chat_leased(
        self, key: ConversationKey, message: IncomingMessage, text: str, cut: bool
    ) -> Reply:
        """The turn under the conversation's lock; a turn whose lock was lost before it was
        stored is thrown away and made again under a fresh lock (once), so it never lands on
        top of another worker's turn."""
        for _ in range(LEASE_ATTEMPTS):
            try:
                async with self.services.lock(key) as lease:
                    return await self._chat_locked(key, message, text, cut, lease)
            except LeaseLost as lost:
                log.warning(
                    "lost the lock of %s before storing a reply (%s); not stored, answering again",
                    self.observer.user_ids.conversation(key),
                    lost,
                )
        return Reply(texts.BUSY_TEXT, ReplyKind.NOTICE)

    def _clean_input(self, text: str) -> tuple[str, bool]:
        """Control characters out, length bounded (keeping the end, which trimming keeps too)."""
        cleaned = remove_control_characters(text).strip()
        limit = self.settings.max_message_chars
        return cleaned[-limit:], len(cleaned) > limit

    async def _limited(
        self, message: IncomingMessage, work: Callable[[], Awaitable[Reply]]
    ) -> Reply:
        """`work`, rate-limited per sender and counted in flight; a busy conversation (its lock
        not had in time, or lost) answered politely."""
        sender = f"{message.platform}:{message.user_id}"
        if not self.rate_limiter.allow(sender):
            wait = self.rate_limiter.retry_after(sender)
            return Reply(texts.RATE_LIMITED.format(seconds=max(1, round(wait))), ReplyKind.NOTICE)
        self.stats.in_flight += 1
        try:
            return await work()
        except (LockTimeout, LeaseLost):
            return Reply(texts.BUSY_TEXT, ReplyKind.NOTICE)
        finally:
            self.stats.in_flight -= 1

    async def _chat_locked(
        self, key: ConversationKey, message: IncomingMessage, text: str, cut: bool, lease: Lease
    ) -> Reply:
        services = self.services
        earlier = await services.earlier_reply(key, message)
        if earlier is not None:
            return earlier
        history = services.since_start(key, await services.history(key))
        prompt = await services.prompt(key, history, text, self.low_water)
        services.context_starts.update(key, history, prompt)
        note = texts.TRIMMED_NOTE if prompt.newest_trimmed or cut else ""
        try:
            result = await self._generate(prompt, key, lambda partial: note + partial)
        except GenerationError as error:
            return self._generation_failed(error)
        await lease.confirm()
        outbox = Delivery.PENDING if message.message_id else None
        await self.storage.append(key, self._exchange(key, message, text, result.text), outbox)
        self.uses.candidates.keep(key, text, result.text, result.alternatives)
        reply = self._chat_reply(result.text, prompt, cut)
        return replace(reply, pending_delivery=outbox is not None)

    async def delivered(self, message: IncomingMessage, sent_ids: Sequence[str]) -> None:
        """The platform accepted the reply to `message` (its messages got `sent_ids`)."""
        await self._record_delivery(message, Delivery.SENT, sent_ids)

    async def undeliverable(self, message: IncomingMessage) -> None:
        """The platform refused the reply for good (chat gone, bot blocked): never retried."""
        await self._record_delivery(message, Delivery.FAILED, ())

    async def _record_delivery(
        self, message: IncomingMessage, delivery: Delivery, sent_ids: Sequence[str]
    ) -> None:
        try:
            message = await self.links.resolved(message)
            record = DeliveryRecord(message.message_id, delivery, tuple(sent_ids))
            await self.storage.set_delivery(self.services.key_for(message), record)
        except StorageError as error:
            log.warning("could not record a reply as %s: %s", delivery, error)

    async def _generate(
        self, prompt: TrimmedPrompt, key: ConversationKey, shown: Callable[[str], str]
    ) -> GenerationResult:
        """The reply; streamed (each partial formatted by `shown`) when someone listens."""
        started = time.perf_counter()
        request = GenerationRequest(
            prompt.prompt_ids, self.services.params, STOP_STRINGS, cache_key=key.as_id()
        )
        result = await self.services.generate(request, shown)
        self.observer.generated(prompt, result, time.perf_counter() - started)
        log.debug(
            "generated %d tokens from a %d-token prompt in %.3fs (%s)",
            result.new_tokens,
            prompt.n_tokens,
            time.perf_counter() - started,
            result.finish_reason,
        )
        return result

    def _generation_failed(self, error: GenerationError) -> Reply:
        log.warning("generation failed: %s", error)
        self.observer.error(f"generation_{error.kind}")
        text = texts.GENERATION_FAILED.get(str(error.kind), texts.GENERATION_FAILED["default"])
        return Reply(text, ReplyKind.ERROR)

    def _exchange(
        self, key: ConversationKey, message: IncomingMessage, text: str, reply: str
    ) -> list[Turn]:
        speaker = speaker_id(key, message)
        user = Turn(Role.USER, text, speaker, message.sent_at, message.message_id)
        return [user, Turn(Role.AI, reply, speaker)]

    def _chat_reply(self, reply_text: str, prompt: TrimmedPrompt, cut_before: bool) -> Reply:
        trimmed = prompt.newest_trimmed or cut_before
        if trimmed:
            reply_text = texts.TRIMMED_NOTE + reply_text
        return Reply(reply_text, ReplyKind.CHAT, trimmed=trimmed)

    async def _run_command(self, message: IncomingMessage, parsed: ParsedCommand) -> Reply:
        handlers = {
            Command.START: self._start,
            Command.HELP: self._help,
            Command.RESET: self._reset,
            Command.PERSONA: self._persona,
            Command.FORGET: self._forget,
            Command.EXPORT: self._export,
            Command.STATS: self._stats,
            Command.ABOUT: self._about,
            Command.LINK: self.links.link,
            Command.UNLINK: self.links.unlink,
        }
        if parsed.command is None:
            name = to_single_line(parsed.name)[:32]
            return Reply(texts.UNKNOWN_COMMAND.format(name=name), ReplyKind.NOTICE)
        if parsed.command in MODEL_COMMANDS:
            return await self._use_model(message, parsed)
        return await handlers[parsed.command](message, parsed.argument)

    async def _use_model(self, message: IncomingMessage, parsed: ParsedCommand) -> Reply:
        """`/complete`, `/story`, `/sentiment`, `/retry` (`core.dialogue.uses`): rate-limited like
        chat, generation failures and a busy conversation answered politely."""
        missing = self.uses.missing_argument(parsed)
        if missing is not None:
            return missing
        return await self._limited(message, lambda: self._run_use(message, parsed))

    async def _run_use(self, message: IncomingMessage, parsed: ParsedCommand) -> Reply:
        try:
            return await self.uses.run(message, parsed)
        except GenerationError as error:
            return self._generation_failed(error)

    async def _start(self, message: IncomingMessage, argument: str) -> Reply:
        return Reply(texts.START_TEXT, ReplyKind.COMMAND)

    async def _help(self, message: IncomingMessage, argument: str) -> Reply:
        return Reply(texts.help_text(), ReplyKind.COMMAND)

    async def _about(self, message: IncomingMessage, argument: str) -> Reply:
        return Reply(texts.ABOUT_TEXT, ReplyKind.COMMAND)

    async def _reset(self, message: IncomingMessage, argument: str) -> Reply:
        key = self.services.key_for(message)
        async with self.services.lock(key):
            await self.storage.clear(key)
        self.services.context_starts.forget(key)
        return Reply(texts.RESET_TEXT, ReplyKind.COMMAND)

    async def _persona(self, message: IncomingMessage, argument: str) -> Reply:
        key = self.services.key_for(message)
        persona = to_single_line(argument)
        if not persona:
            current = await self.services.persona_for(key)
            return Reply(texts.PERSONA_SHOW.format(persona=current), ReplyKind.COMMAND)
        if persona.lower() in PERSONA_CLEAR_WORDS:
            await self.storage.set_persona(key, None)
            return Reply(texts.PERSONA_CLEARED, ReplyKind.COMMAND)
        if len(persona) > PERSONA_MAX_CHARS:
            return Reply(texts.PERSONA_TOO_LONG.format(limit=PERSONA_MAX_CHARS), ReplyKind.NOTICE)
        await self.storage.set_persona(key, persona)
        return Reply(texts.PERSONA_SET.format(persona=persona), ReplyKind.COMMAND)

    async def _forget(self, message: IncomingMessage, argument: str) -> Reply:
        """Every account of the person (or the sender's alone), their shared conversation and
        the links themselves."""
        key = self.services.key_for(message)
        async with self.services.lock(key):
            count = 0
            for owner in await self.links.owners(message):
                count += await self.storage.delete_user(owner.platform, owner.user_id)
            unlinked = await self.links.unlink_all(message)
        self.services.context_starts.forget(key)
        text = texts.FORGET_TEXT.format(count=count) + (texts.FORGET_UNLINKED if unlinked else "")
        return Reply(text, ReplyKind.COMMAND)

    async def _export(self, message: IncomingMessage, argument: str) -> Reply:
        exports = [
            await self.storage.export_user(owner.platform, owner.user_id)
            for owner in await self.links.owners(message)
        ]
        exported = merged_export(message, exports)
        data = json.dumps(exported.as_dict(), ensure_ascii=False, indent=2).encode("utf-8")
        filename = f"kobot-history-{message.platform}-{message.user_id}.json"
        return Reply(texts.EXPORT_TEXT, ReplyKind.COMMAND, attachment=Attachment(filename, data))

    async def _stats(self, message: IncomingMessage, argument: str) -> Reply:
        if not message.is_admin:
            return Reply(texts.NOT_ADMIN, ReplyKind.NOTICE)
        return Reply(await self.stats_text(), ReplyKind.COMMAND)

    async def stats_text(self) -> str:
        stored = await self.storage.stats()
        live = self.observer.totals()
        return (
            f"메시지 {live.messages} / 답장 {live.replies} / 명령 {live.commands} / "
            f"오류 {live.errors} / 잘린 메시지 {live.trimmed}\n"
            f"처리 중 {self.stats.in_flight}\n"
            f"저장됨: 대화 {stored.get('conversations', 0)}, 턴 {stored.get('turns', 0)}, "
            f"사용자 {stored.get('users', 0)}"
        )

    async def close(self) -> None:
        await self.backend.close()
        await self.storage.close()
        await self.locks.close()
