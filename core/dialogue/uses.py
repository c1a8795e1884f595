"""The model's other uses, as commands every adapter gets: `/complete`, `/story`, `/sentiment`,
`/retry`. The DialogueManager routes them here (rate-limited like chat, failures answered
politely). They see only the manager's `DialogueServices` (`core.dialogue.services`): every
generation goes through its `ReplyGuard` (`core.moderation.reply_filter`) and
`core.dialogue.streaming`, so streaming adapters see them grow and the reply filter sees every
reply.

* `/complete <text>`: the prompt is the text itself (no persona, no turns); the reply is the
  text and its continuation (a space between them when the model began a new word).
* `/story <opening>`: the same with its own, larger token budget (`KOBOT_STORY_MAX_NEW_TOKENS`);
  the opening is cut from the left so that it plus the story fit the window.
* `/sentiment <text>`: 긍정/부정 with a confidence, by scoring (`core.dialogue.sentiment`).
* `/retry`: another answer to the last message, replacing the stored reply. Unused candidates of
  that message (`KOBOT_NUM_CANDIDATES`) come first; when none are left, `KOBOT_RETRY_CANDIDATES`
  new ones are sampled at once (sampling even when chat is greedy: a greedy retry would only
  repeat itself) and the first one not shown before is used. The retry's message id is stored
  with the new answer, which goes through the outbox like a chat reply: the same retry
  delivered again is answered from storage (or not at all once sent), not retried twice.
"""

from __future__ import annotations

import dataclasses

from core.dialogue import texts
from core.dialogue.candidates import Candidates
from core.dialogue.commands import Command, ParsedCommand
from core.dialogue.prompt import STOP_STRINGS
from core.dialogue.sentiment import SentimentScorer
from core.dialogue.services import DialogueServices
from core.dialogue.trimming import token_budget
from core.generation.base import (
    FinishReason,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from core.messages import ConversationKey, IncomingMessage, Reply, ReplyKind, Role, Turn
from core.settings import Settings
from core.text import remove_control_characters, to_single_line

MODEL_COMMANDS = frozenset({Command.COMPLETE, Command.STORY, Command.SENTIMENT, Command.RETRY})
RETRY_TEMPERATURE = 0.8


def story_tokens(requested: int, n_positions: int) -> int:
    """The story budget, leaving at least a quarter of the window for the opening."""
    return max(1, min(requested, n_positions * 3 // 4))


class ModelCommands:
    """Runs the model commands over the dialogue's services (see the module doc)."""

    def __init__(self, services: DialogueServices, settings: Settings) -> None:
        self.services = services
        self.max_chars = settings.max_message_chars
        chat = services.params
        n_positions = services.backend.info().n_positions
        self.story_params = dataclasses.replace(
            chat,
            max_new_tokens=story_tokens(settings.story_max_new_tokens, n_positions),
            num_return_sequences=1,
        )
        self.complete_params = dataclasses.replace(chat, num_return_sequences=1)
        self.story_budget = token_budget(n_positions, self.story_params.max_new_tokens)
        self.retry_params = retry_params(chat, settings.retry_candidates)
        self.sentiment = SentimentScorer(services.backend)
        self.candidates = Candidates()

    def missing_argument(self, parsed: ParsedCommand) -> Reply | None:
        """The usage notice when a command that needs text came without it."""
        if parsed.command in texts.NEEDS_TEXT and not clean_text(parsed.argument):
            return Reply(texts.NEEDS_TEXT[parsed.command], ReplyKind.NOTICE)
        return None

    async def run(self, message: IncomingMessage, parsed: ParsedCommand) -> Reply:
        """Raises GenerationError or LockTimeout; the manager answers those."""
        argument = clean_text(parsed.argument)[-self.max_chars :]
        if parsed.command is Command.COMPLETE:
            return await self.continue_text(argument, self.complete_params, self.services.budget)
        if parsed.command is Command.STORY:
            return await self.continue_text(argument, self.story_params, self.story_budget)
        if parsed.command is Command.SENTIMENT:
            return await self.classify(argument)
        return await self.retry(message)

    # /complete and /story

    async def continue_text(self, text: str, params: SamplingParams, budget: int) -> Reply:
        ids = self.services.backend.tokenizer.encode_text(text)
        request = GenerationRequest(
            tuple(ids[-budget:]), params, stop_strings=(), continuation=True
        )
        result = await self.services.generate(request, lambda more: text + more)
        if result.finish_reason is FinishReason.FALLBACK:
            return Reply(texts.NO_CONTINUATION, ReplyKind.NOTICE)
        return Reply(text + result.text, ReplyKind.CHAT)

    # /sentiment

    async def classify(self, text: str) -> Reply:
        try:
            found = await self.sentiment.classify(text)
        except GenerationError as error:
            if error.kind is not GenerationErrorKind.UNAVAILABLE:
                raise
            return Reply(texts.SENTIMENT_UNAVAILABLE, ReplyKind.NOTICE)
        english = texts.SENTIMENT_ENGLISH[found.label]
        shown = texts.SENTIMENT_TEXT.format(
            label=found.label, confidence=found.confidence, english=english
        )
        return Reply(shown, ReplyKind.COMMAND)

    # /retry

    async def retry(self, message: IncomingMessage) -> Reply:
        """The new answer, stored with the retry's message id: a retry delivered again (after
        a restart, a replay) gets that stored answer, sent if it never was, never a third one."""
        services = self.services
        key = services.key_for(message)
        async with services.lock(key) as lease:
            earlier = await services.earlier_reply(key, message)
            if earlier is not None:
                return earlier
            history = await services.history(key)
            if not is_answered(history):
                return Reply(texts.NOTHING_TO_RETRY, ReplyKind.NOTICE)
            question, shown = history[-2].text, history[-1].text
            reply = self.candidates.take(key, question, shown)
            if reply is None:
                reply = await self._fresh_reply(key, history[:-2], question)
            await lease.confirm()
            if not await services.replace_last_reply(key, reply, message.message_id):
                return Reply(texts.NOTHING_TO_RETRY, ReplyKind.NOTICE)
        return Reply(reply, ReplyKind.CHAT, pending_delivery=bool(message.message_id))

    async def _fresh_reply(self, key: ConversationKey, earlier: list[Turn], question: str) -> str:
        """Sample new candidates for `question`: the first one not shown before is the reply."""
        earlier = self.services.since_start(key, earlier)
        prompt = await self.services.prompt(key, earlier, question)
        request = GenerationRequest(
            prompt.prompt_ids, self.retry_params, STOP_STRINGS, cache_key=key.as_id()
        )
        result = await self.services.generate(request)
        fresh = [
            text for text in candidates_of(result) if self.candidates.is_new(key, question, text)
        ]
        reply, *others = fresh or [result.text]
        self.candidates.add(key, question, reply, others)
        return reply


def retry_params(params: SamplingParams, candidates: int) -> SamplingParams:
    """Chat's settings, sampled (at the chat temperature, or 0.8 when chat is greedy)."""
    return dataclasses.replace(
        params,
        do_sample=True,
        temperature=params.temperature if params.temperature > 0 else RETRY_TEMPERATURE,
        num_return_sequences=candidates,
    )


def candidates_of(result: GenerationResult) -> list[str]:
    return [result.text, *result.alternatives]


def is_answered(history: list[Turn]) -> bool:
    """Whether the conversation ends with a user turn and the AI's answer to it."""
    return len(history) >= 2 and history[-1].role is Role.AI and history[-2].role is Role.USER


def clean_text(text: str) -> str:
    return to_single_line(remove_control_characters(text)).strip()
