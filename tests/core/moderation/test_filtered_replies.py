"""The reply filter through the dialogue manager: chat, /complete, /retry and streaming, with
SQLite and the engine backend as the factory ships it (tiny model), scripted per test."""

from __future__ import annotations

from core.messages import ConversationKey, Role
from core.moderation.reply_filter import MASK_CHAR, REPLY_BLOCKED
from tests.support.dialogue import ManagerFactory, message
from tests.support.scripts import RowScripts

KEY = ConversationKey("test", "c1", "u1")
MASKED = MASK_CHAR * 2


async def test_off_leaves_replies_alone(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    manager, _ = await make_manager()
    scripted_local.script_texts("씨발 뭐야")
    assert (await manager.handle(message("안녕"))).text == "씨발 뭐야"


async def test_mask_hides_the_word_in_the_reply_the_store_and_every_partial(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    manager, backend = await make_manager(reply_filter="mask")
    scripted_local.script_texts("씨발 뭐야")
    partials: list[str] = []
    reply = await manager.handle_stream(message("안녕"), partials.append)
    assert reply.text == f"{MASKED} 뭐야"
    assert partials and not any("씨발" in partial for partial in partials)
    stored = await manager.storage.recent(KEY, 10)
    assert [(t.role, t.text) for t in stored] == [(Role.USER, "안녕"), (Role.AI, f"{MASKED} 뭐야")]
    assert len(backend.requests) == 1  # masking never generates again

    scripted_local.script_texts(" 씨발")
    completed = await manager.handle(message("/complete 오늘은"))
    assert completed.text.startswith("오늘은") and "씨발" not in completed.text


async def test_block_generates_once_more_then_answers_politely(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    manager, backend = await make_manager(reply_filter="block")
    scripted_local.script_texts("개새끼야")
    reply = await manager.handle(message("안녕"))
    assert reply.text == REPLY_BLOCKED
    assert len(backend.requests) == 2  # the reply, and one more try
    assert (await manager.storage.recent(KEY, 10))[-1].text == REPLY_BLOCKED

    scripted_local.script_texts("좋은 하루예요")
    assert (await manager.handle(message("또 안녕"))).text == "좋은 하루예요"
    assert len(backend.requests) == 3  # a clean reply is not generated again


async def test_block_takes_a_clean_candidate_before_generating_again(
    make_manager: ManagerFactory, scripted_local: RowScripts
) -> None:
    manager, backend = await make_manager(reply_filter="block", num_candidates=3, temperature=0.8)
    scripted_local.script_texts("병신아", "반가워요", "ㅅㅂ 몰라")
    assert (await manager.handle(message("안녕"))).text == "반가워요"
    assert len(backend.requests) == 1
    retried = await manager.handle(message("/retry"))  # no clean candidate is left: fresh ones
    assert "병신" not in retried.text and "ㅅㅂ" not in retried.text
