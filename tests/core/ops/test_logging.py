"""No secret ever reaches the output: a canary planted in every secret setting is searched for in
everything real `kobot` processes print (config, a failed start-up with a traceback, a chat at
DEBUG), in text and JSON log formats; plus the redacting filter and the formatters themselves."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from core.ops.logs import (
    JsonFormatter,
    SecretRedactor,
    TextFormatter,
    configure_logging,
    settings_secrets,
)
from core.settings import Settings
from tests.support.kobot import REPLY, Kobot, kobot_env, run_kobot
from tests.support.openai import Answer, FakeOpenAI
from tests.support.services import closed_port

CANARY = f"canary{uuid.uuid4().hex[:12]}"


def canary_settings() -> dict[str, str]:
    """Every secret setting holds the canary (KOBOT_<NAME> values for `kobot_env`)."""
    return {
        "telegram_token": f"123456:{CANARY}TG",
        "telegram_webhook_secret": f"{CANARY}WH",
        "discord_token": f"{CANARY}DC",
        "backend_api_key": f"{CANARY}KEY",
        "log_user_salt": f"{CANARY}SALT",
        "log_level": "DEBUG",
    }


def assert_clean(*outputs: str) -> None:
    for output in outputs:
        assert CANARY not in output, output[-3000:]


def json_lines(text: str) -> list[dict[str, object]]:
    """Every stderr line of a KOBOT_LOG_FORMAT=json run is one JSON object."""
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


# --- real processes ---------------------------------------------------------------------------


def test_kobot_config_masks_every_secret(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = kobot_env(
        tiny_model_dir,
        tmp_path,
        **canary_settings(),
        database_url=f"postgresql+asyncpg://kobot:{CANARY}@db:5432/kobot",
        redis_url=f"redis://:{CANARY}@redis:6379/0",
        telegram_webhook_url=f"https://bot.example/hook/123456:{CANARY}TG",
    )
    out, err, code = run_kobot(["config"], env, tmp_path)
    assert code == 0, err
    assert "KOBOT_TELEGRAM_TOKEN=********" in out and "KOBOT_BACKEND_API_KEY=********" in out
    assert "KOBOT_DATABASE_URL=postgresql+asyncpg://kobot:********@db:5432/kobot" in out
    assert "KOBOT_TELEGRAM_WEBHOOK_URL=https://bot.example/hook/***" in out
    assert_clean(out, err)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_failed_start_up_logs_its_traceback_without_secrets(
    tiny_model_dir: Path, tmp_path: Path, log_format: str
) -> None:
    env = kobot_env(tiny_model_dir, tmp_path, **canary_settings(), log_format=log_format)
    command = [sys.executable, "-m", "tests.core.ops._failing_start", "chat"]
    done = subprocess.run(
        command, input="안녕\n", capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "RuntimeError: could not fetch https://bot:***@models.example/x" in done.stderr
    assert "KeyError" in done.stderr and "Traceback" in done.stderr  # the chained cause too
    assert_clean(done.stdout, done.stderr)
    if log_format == "json":
        events = json_lines(done.stderr)
        crash = [e for e in events if e["level"] == "CRITICAL"]
        assert len(crash) == 1 and "Traceback" in str(crash[0]["exc"])


def test_an_unreachable_database_names_it_without_its_password(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = f"postgresql+asyncpg://kobot:{CANARY}@127.0.0.1:{closed_port()}/kobot"
    env = kobot_env(tiny_model_dir, tmp_path, **canary_settings(), database_url=url)
    out, err, code = run_kobot(["history", "stats"], env, tmp_path)
    assert code == 1 and "KOBOT_DATABASE_URL" in err and "127.0.0.1" in err
    assert_clean(out, err)


async def test_a_debug_chat_with_a_keyed_backend_leaks_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = FakeOpenAI(Answer(REPLY))
    url = await server.start()
    try:
        settings = canary_settings() | {"backend": "openai", "backend_url": url}
        env = kobot_env(tiny_model_dir, tmp_path, **settings, log_format="json")
        kobot = await Kobot.start(["chat", "--user", "alice"], env, tmp_path)
        await kobot.send("안녕하세요")
        await kobot.send("/persona 친절한 선생님")
        out, err, code = await asyncio.wait_for(kobot.finish(), 120)
    finally:
        await server.stop()
    assert code == 0, err[-3000:]
    assert out.splitlines()[0] == REPLY
    headers = server.received[0].headers
    assert headers["Authorization"] == f"Bearer {CANARY}KEY"  # the key was in use
    assert_clean(out, err)
    events = json_lines(err)
    assert any(e["level"] == "DEBUG" for e in events)
    turns = [e for e in events if e.get("event") == "turn"]
    assert [t["kind"] for t in turns] == ["chat", "command"]
    assert all(t["user"] != "alice" and "latency_ms" in t for t in turns)


# --- the filter and the formatters ------------------------------------------------------------


def test_settings_secrets_include_every_secret_and_url_passwords() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        telegram_token=SecretStr("123:tok"),
        discord_token=SecretStr("disc"),
        backend_api_key=SecretStr("key"),
        database_url="postgresql+asyncpg://u:p%40ss@h/db",
        redis_url="redis://:rpw@h:6379/0",
    )
    found = set(settings_secrets(settings))
    assert {"123:tok", "disc", "key", "p%40ss", "p@ss", "rpw"} <= found
    secret_fields = {
        name
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    assert {"telegram_token", "discord_token", "backend_api_key", "log_user_salt"} <= secret_fields


def record_with_traceback(secret: str) -> logging.LogRecord:
    try:
        raise ValueError(f"bad token {secret}")
    except ValueError:
        return logging.LogRecord(
            "kobot.test", logging.ERROR, __file__, 1, "failed with %s", (secret,), sys.exc_info()
        )


@pytest.mark.parametrize("formatter", [TextFormatter, JsonFormatter])
def test_the_filter_scrubs_message_arguments_traceback_and_fields(
    formatter: type[TextFormatter | JsonFormatter],
) -> None:
    redactor = SecretRedactor(["s3cr3t-value"])
    record = record_with_traceback("s3cr3t-value")
    record.fields = {"url": "https://x/s3cr3t-value", "nested": ["s3cr3t-value"]}
    record.stack_info = "stack with s3cr3t-value"
    assert redactor.filter(record)
    output = formatter(redactor).format(record)
    assert "s3cr3t-value" not in output and "***" in output
    assert "ValueError: bad token ***" in output


def test_configure_logging_redacts_every_record_and_uncaught_thread_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings(_env_file=None, discord_token=SecretStr("d1sc0rd-t0ken"))  # type: ignore[call-arg]
    root = logging.getLogger()
    level = root.level
    hooks = sys.excepthook
    thread_hook = threading.excepthook
    try:
        configure_logging(settings)
        logging.getLogger("some.library").warning("connecting with d1sc0rd-t0ken")

        def fail() -> None:
            raise RuntimeError("thread saw d1sc0rd-t0ken")

        worker = threading.Thread(target=fail)
        worker.start()
        worker.join()
    finally:
        for handler in list(root.handlers):
            if type(handler).__name__ == "StderrHandler":
                root.removeHandler(handler)
        root.setLevel(level)
        sys.excepthook, threading.excepthook = hooks, thread_hook
        logging.captureWarnings(False)
    err = capsys.readouterr().err
    assert "connecting with ***" in err and "RuntimeError: thread saw ***" in err
    assert "d1sc0rd-t0ken" not in err
