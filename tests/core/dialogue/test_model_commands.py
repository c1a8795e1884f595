"""`/complete`, `/story`, `/sentiment`, `/retry` and several candidates, through the dialogue
manager with SQLite and the factory's local backend (the engine) on the tiny model (scripted
where a test needs to know what the model says)."""

from __future__ import annotations

from typing import Any

import pytest

from bots.console.adapter import ConsoleAdapter
from core.dialogue import texts
from core.dialogue.manager import DialogueManager
from core.dialogue.sentiment import LABELS
from core.dialogue.texts import help_text
from core.generation.base import GenerationError, GenerationErrorKind
from core.messages import ConversationKey, ReplyKind, Role
from tests.support.dialogue import ManagerFactory, message
from tests.support.scripts import RowScripts

KEY = ConversationKey("test", "c1", "u1")


async def stored(manager: DialogueManager, key: ConversationKey = KEY) -> list[tuple[Role, str]]:
    return [(turn.role, turn.text) for turn in await manager.storage.recent(key, 50)]


def prompt_text(manager: DialogueManager, ids: tuple[int, ...]) -> str:
    """A prompt as text (each line is tokenized alone, so it decodes with a leading space)."""
    tokenizer: Any = manager.backend.tokenizer
    return str(tokenizer.decode(list(ids))).replace("\n ", "\n")


def test_help_lists_the_new_commands_with_their_arguments() -> None:
    text = help_text()
    for line in ("/complete <문장> — 문장 이어 쓰기", "/story <첫 문장>", "/sentiment <문장>"):
        assert line in text
    assert "/retry — 마지막 메시지에 다른 대답" in text


# /complete and /story


async def test_complete_continues_the_text_itself(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    manager, backend = await make_manager()
    tokenizer = scripted_local.tokenizer
    scripted_local.script_texts("좋네요")  # starts with ▁: a new word
    reply = await manager.handle(message("/complete 오늘 날씨가"))
    assert (reply.kind, reply.text) == (ReplyKind.CHAT, "오늘 날씨가 좋네요")
    request = backend.requests[-1]
    assert request.prompt_ids == tuple(tokenizer.encode_text("오늘 날씨가"))  # no persona, no turns
    assert request.continuation and request.stop_strings == ()

    ne, yo = tokenizer.encode_text("좋네요")[1:]  # "네", "요": inside a word, no ▁
    scripted_local.script([ne, yo, tokenizer.eos_id])
    reply = await manager.handle(message("/이어쓰기 오늘 날씨가 좋"))
    assert reply.text == "오늘 날씨가 좋네요"
    assert await stored(manager) == []  # completions are not conversation turns


async def test_story_has_its_own_budget_and_cuts_a_long_opening_from_the_left(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    manager, backend = await make_manager(story_max_new_tokens=300, max_new_tokens=8)
    scripted_local.script_texts("그래서 모두 행복하게 살았답니다.")
    opening = "옛날 옛적에 호랑이가 살았어요. " * 400
    reply = await manager.handle(message(f"/story {opening}"))
    assert reply.text.endswith("호랑이가 살았어요. 그래서 모두 행복하게 살았답니다.")
    request = backend.requests[-1]
    assert request.params.max_new_tokens == 300
    assert len(request.prompt_ids) == 1024 - 300  # the window, exactly
    assert request.prompt_ids == tuple(scripted_local.tokenizer.encode_text(opening.strip()))[-724:]


@pytest.mark.parametrize("command", ["/complete", "/story", "/sentiment", "/complete   "])
async def test_commands_without_text_explain_themselves(
    make_manager: ManagerFactory, command: str
) -> None:
    manager, backend = await make_manager()
    reply = await manager.handle(message(command))
    assert reply.kind is ReplyKind.NOTICE and "적어 주세요" in reply.text
    assert backend.requests == [] and backend.scored == []


async def test_model_commands_are_rate_limited_like_chat(make_manager: ManagerFactory) -> None:
    manager, _ = await make_manager(rate_limit_per_minute=2)
    await manager.handle(message("/sentiment 좋아"))
    await manager.handle(message("안녕"))
    reply = await manager.handle(message("/story 옛날에"))
    assert reply.kind is ReplyKind.NOTICE and "너무 빨라요" in reply.text


# /sentiment


async def test_sentiment_scores_both_labels_in_one_pass(make_manager: ManagerFactory) -> None:
    manager, backend = await make_manager()
    reply = await manager.handle(message("/sentiment 오늘 정말 행복해"))
    assert reply.kind is ReplyKind.COMMAND
    label = reply.text.split(" ")[0]
    assert label in LABELS and "확신도" in reply.text and "%" in reply.text
    assert len(backend.scored) == 1  # one call, one forward pass
    prompts, continuations = backend.scored[0]
    assert len(prompts) == 2 * (1 + 2)  # the text and two content-free inputs, both labels
    tokenizer = manager.backend.tokenizer
    assert continuations[:2] == [tokenizer.encode_text("긍정"), tokenizer.encode_text("부정")]
    assert backend.requests == []  # nothing was generated


async def test_sentiment_without_a_scoring_backend_says_so(make_manager: ManagerFactory) -> None:
    manager, backend = await make_manager()

    async def cannot_score(prompts: object, continuations: object) -> list[float]:
        raise GenerationError(GenerationErrorKind.UNAVAILABLE, "the remote backend cannot score")

    backend.score = cannot_score
    reply = await manager.handle(message("/sentiment 좋아요"))
    assert (reply.kind, reply.text) == (ReplyKind.NOTICE, texts.SENTIMENT_UNAVAILABLE)


# Several candidates and /retry


async def test_chat_keeps_its_other_candidates_for_retry(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    manager, backend = await make_manager(num_candidates=3, temperature=0.8)
    scripted_local.script_texts("첫째 답이에요", "둘째 답이에요", "셋째 답이에요")
    first = await manager.handle(message("안녕"))
    assert first.text == "첫째 답이에요"
    assert backend.requests[-1].params.num_return_sequences == 3
    generated = len(backend.requests)

    second = await manager.handle(message("/retry"))
    third = await manager.handle(message("/다시"))
    assert [second.text, third.text] == ["둘째 답이에요", "셋째 답이에요"]
    assert second.kind is ReplyKind.CHAT
    assert len(backend.requests) == generated  # taken from the candidates, nothing generated
    assert await stored(manager) == [(Role.USER, "안녕"), (Role.AI, "셋째 답이에요")]

    await manager.handle(message("그리고?"))
    history = prompt_text(manager, backend.requests[-1].prompt_ids)
    assert "AI: 셋째 답이에요" in history and "첫째" not in history


async def test_retry_generates_fresh_candidates_when_none_are_left(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    manager, backend = await make_manager(temperature=0.0, retry_candidates=3)
    scripted_local.script_texts("처음 답")
    await manager.handle(message("안녕"))
    assert backend.requests[-1].params.do_sample is False  # chat stays greedy

    scripted_local.script_texts("처음 답", "새 답 하나", "새 답 둘")
    retried = await manager.handle(message("/retry"))
    request = backend.requests[-1]
    assert retried.text == "새 답 하나"  # never the reply already shown
    assert request.params.do_sample and request.params.num_return_sequences == 3
    assert request.params.temperature > 0
    assert prompt_text(manager, request.prompt_ids).endswith("User: 안녕\nAI:")
    assert (await manager.handle(message("/retry"))).text == "새 답 둘"
    assert await stored(manager) == [(Role.USER, "안녕"), (Role.AI, "새 답 둘")]


async def test_retry_needs_an_answered_message(make_manager: ManagerFactory) -> None:
    manager, _ = await make_manager()
    assert (await manager.handle(message("/retry"))).text == texts.NOTHING_TO_RETRY
    await manager.handle(message("안녕"))
    await manager.handle(message("/reset"))
    reply = await manager.handle(message("/retry"))
    assert (reply.kind, reply.text) == (ReplyKind.NOTICE, texts.NOTHING_TO_RETRY)


async def test_a_retry_delivered_again_is_answered_from_storage_not_retried(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    """The outbox for /retry: pending until sent (the stored answer again, nothing generated),
    then a duplicate; the stored reply changed once. A new retry id retries again."""
    manager, backend = await make_manager(temperature=0.8, retry_candidates=2)
    scripted_local.script_texts("처음 답")
    await manager.handle(message("안녕", message_id="m1"))
    scripted_local.script_texts("다시 한 답", "또 다른 답")
    retry = message("/retry", message_id="r1")
    first = await manager.handle(retry)
    generated = len(backend.requests)

    again = await manager.handle(retry)  # redelivered before the first send was recorded
    await manager.delivered(retry, ["sent-1"])
    after_send = await manager.handle(retry)  # redelivered after it was sent

    assert (first.text, first.pending_delivery) == ("다시 한 답", True)
    assert (again.text, again.pending_delivery, again.duplicate) == ("다시 한 답", True, False)
    assert (after_send.text, after_send.duplicate) == ("다시 한 답", True)
    assert len(backend.requests) == generated
    assert await stored(manager) == [(Role.USER, "안녕"), (Role.AI, "다시 한 답")]
    newer = await manager.handle(message("/retry", message_id="r2"))
    assert newer.text == "또 다른 답" and not newer.duplicate
    assert await stored(manager) == [(Role.USER, "안녕"), (Role.AI, "또 다른 답")]


async def test_candidates_of_another_exchange_are_never_used(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    manager, _ = await make_manager(num_candidates=2, temperature=0.8)
    scripted_local.script_texts("가 답", "가 후보")
    await manager.handle(message("가"))
    scripted_local.script_texts("나 답")  # one row: no candidates for this message
    await manager.handle(message("나"))
    scripted_local.script_texts("나 답", "나 새 답")
    assert (await manager.handle(message("/retry"))).text == "나 새 답"


async def test_the_console_offers_the_model_commands(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    manager, _ = await make_manager()
    console = ConsoleAdapter(manager, "alice")
    scripted_local.script_texts("좋네요")
    assert await console.answer("/complete 오늘 날씨가") == "오늘 날씨가 좋네요"
    assert "확신도" in await console.answer("/감정 오늘 정말 행복해")
    scripted_local.script_texts("반가워요")
    assert await console.answer("안녕") == "반가워요"
    scripted_local.script_texts("반가워요", "저도 반가워요")
    assert await console.answer("/retry") == "저도 반가워요"
    assert "/story <첫 문장>" in await console.answer("/help")
