import pytest

from core.dialogue.commands import Command, parse_command
from core.dialogue.ratelimit import RateLimiter
from core.dialogue.texts import help_text


@pytest.mark.parametrize(
    ("text", "name", "command", "argument"),
    [
        ("/reset", "reset", Command.RESET, ""),
        ("  /RESET@kobot_bot  ", "reset", Command.RESET, ""),
        ("/persona 친절한 선생님", "persona", Command.PERSONA, "친절한 선생님"),
        ("/초기화", "초기화", Command.RESET, ""),
        ("/forgetme", "forgetme", Command.FORGET, ""),
        ("/dance now", "dance", None, "now"),
        ("/help\n두 번째 줄", "help", Command.HELP, "두 번째 줄"),
        ("/persona\n친절한\n선생님", "persona", Command.PERSONA, "친절한\n선생님"),
        ("/reset@kobot_bot\t지금", "reset", Command.RESET, "지금"),
        ("/stats\u3000", "stats", Command.STATS, ""),
    ],
)
def test_parse_command(text: str, name: str, command: Command | None, argument: str) -> None:
    parsed = parse_command(text)
    assert parsed is not None
    assert (parsed.name, parsed.command, parsed.argument) == (name, command, argument)


@pytest.mark.parametrize("text", ["hello", "/", "// comment", "a /reset", "/@bot"])
def test_plain_text_is_not_a_command(text: str) -> None:
    assert parse_command(text) is None


def test_help_lists_every_public_command_in_korean_and_english() -> None:
    text = help_text()
    for command in Command:
        assert (f"/{command.value} " in text) is (command is not Command.STATS)
    assert "초기화" in text and "fresh" in text


def test_rate_limiter_allows_per_minute_then_recovers() -> None:
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.allow("u") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("other")
    assert 59 <= limiter.retry_after("u") <= 60
    now[0] = 60.0
    assert limiter.allow("u")


def test_rate_limiter_zero_means_unlimited_and_memory_is_bounded() -> None:
    assert all(RateLimiter(0).allow("u") for _ in range(1000))
    limiter = RateLimiter(1, max_users=10)
    for user in range(100):
        limiter.allow(str(user))
    assert limiter.allow("0")  # forgotten, so allowed again
    assert len(limiter._recent) <= 10
