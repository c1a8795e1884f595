"""The conversation operations a turn runs on, in one narrow object.

The composition root builds one `DialogueServices` and the DialogueManager on it; the manager
runs its chat turn through it, and the model commands (`core.dialogue.uses`) get the same object
and nothing else of the manager. So each operation has one home: a conversation's key and lock,
the stored reply to a repeated delivery, the history from the context start, the prompt,
generation through the `ReplyGuard` (every reply filtered, streamed when someone listens) and
replacing the last reply.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from core.dialogue.context import ContextStarts
from core.dialogue.prompt import PromptBuilder
from core.dialogue.trimming import TrimmedPrompt, token_budget
from core.generation.base import (
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from core.messages import ConversationKey, IncomingMessage, Reply, Turn
from core.moderation.reply_filter import ReplyGuard
from core.settings import Settings
from storage.base import Delivery, Storage
from storage.locks import ConversationLocks, Lease

_SAMPLING_SETTINGS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
)


def sampling_params(settings: Settings) -> SamplingParams:
    """Chat's sampling: the settings of the same names; greedy when the temperature is 0."""
    same_names = {name: getattr(settings, name) for name in _SAMPLING_SETTINGS}
    return SamplingParams(
        **same_names,
        do_sample=settings.temperature > 0,
        num_return_sequences=settings.num_candidates,
    )


@dataclass(eq=False)
class DialogueServices:
    """The parts a dialogue runs on, and the operations on them that turns share.

    `params` and `budget` are chat's: its sampling settings and its prompt's token budget.
    `backend` is there for its tokenizer, window and scoring; generate through `generate`;
    lock through `lock`; the model commands use these operations, not `storage` or `locks`."""

    settings: Settings
    storage: Storage
    backend: GenerationBackend
    locks: ConversationLocks
    context_starts: ContextStarts = field(default_factory=ContextStarts, init=False)

    def __post_init__(self) -> None:
        self.params = sampling_params(self.settings)
        self.budget = token_budget(self.backend.info().n_positions, self.settings.max_new_tokens)
        self._prompts = PromptBuilder(self.backend.tokenizer)
        self._replies = ReplyGuard.from_settings(self.settings)

    def key_for(self, message: IncomingMessage) -> ConversationKey:
        return ConversationKey.for_message(message, self.settings.context_scope)

    def lock(self, key: ConversationKey) -> AbstractAsyncContextManager[Lease]:
        """The conversation's lock (`LockTimeout` when it stays busy)."""
        return self.locks.lock(key)

    async def earlier_reply(self, key: ConversationKey, message: IncomingMessage) -> Reply | None:
        """When this very message was handled before (a repeated delivery, a restart): its
        stored reply, to be sent now if it never was, or marked a duplicate if it was."""
        if not message.message_id:
            return None
        earlier = await self.storage.reply_to(key, message.message_id)
        if earlier is None:
            return None
        if earlier.delivery is Delivery.PENDING:
            return Reply(earlier.text, pending_delivery=True)
        return Reply(earlier.text, duplicate=True)

    async def history(self, key: ConversationKey) -> list[Turn]:
        """The stored turns, at most `KOBOT_HISTORY_TURNS` of them."""
        return await self.storage.recent(key, self.settings.history_turns)

    def since_start(self, key: ConversationKey, history: list[Turn]) -> list[Turn]:
        """`history` from the conversation's context start (see `ContextStarts.since`)."""
        limit, low_water = self.settings.history_turns, self.settings.trim_low_water
        return self.context_starts.since(key, history, limit, low_water)

    async def persona_for(self, key: ConversationKey) -> str:
        return await self.storage.get_persona(key) or self.settings.persona

    async def prompt(
        self, key: ConversationKey, history: list[Turn], text: str, low_water: int | None = None
    ) -> TrimmedPrompt:
        """The conversation's persona, `history` and the new `text`, trimmed to the budget."""
        persona = await self.persona_for(key)
        return self._prompts.build(persona, history, text, self.budget, low_water)

    async def generate(
        self, request: GenerationRequest, shown: Callable[[str], str] = lambda text: text
    ) -> GenerationResult:
        """The reply through the ReplyGuard; streamed (each partial formatted by `shown`) when
        someone listens (`core.dialogue.streaming`)."""
        return await self._replies.generate(self.backend, request, shown)

    async def replace_last_reply(self, key: ConversationKey, reply: str, message_id: str) -> bool:
        """`/retry`'s new answer in place of the stored one (see `Storage.replace_last_reply`)."""
        return await self.storage.replace_last_reply(key, reply, message_id)
