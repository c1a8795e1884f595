from pathlib import Path

import pytest
from pydantic import SecretStr

from core.messages import ContextScope
from core.settings import ConfigError, Settings, load_settings


def write_env(tmp_path: Path, text: str, name: str = ".env") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_embedded_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.model == "skt/kogpt2-base-v2"
    assert settings.database_url.startswith("sqlite+aiosqlite://")
    assert settings.redis_url is None
    assert settings.context_scope is ContextScope.USER_IN_CHAT
    assert settings.device == "auto" and settings.dtype == "auto"


def test_dot_env_in_the_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_env(tmp_path, "KOBOT_TEMPERATURE=0.3\nKOBOT_CONTEXT_SCOPE=chat\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.temperature == 0.3 and settings.context_scope is ContextScope.CHAT


def test_another_file_through_kobot_env_file_and_real_variables_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_env(tmp_path, "KOBOT_TOP_K=7\nKOBOT_TOP_P=0.5\n", "prod.env")
    monkeypatch.setenv("KOBOT_ENV_FILE", str(path))
    monkeypatch.setenv("KOBOT_TOP_P", "0.9")
    settings = load_settings()
    assert settings.top_k == 7 and settings.top_p == 0.9


def test_a_missing_env_file_named_explicitly_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOBOT_ENV_FILE", str(tmp_path / "nope.env"))
    with pytest.raises(ConfigError, match=r"KOBOT_ENV_FILE: file .* does not exist"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("KOBOT_TEMPERATURE", "9", "KOBOT_TEMPERATURE: Input should be less than or equal to 5"),
        ("KOBOT_MAX_NEW_TOKENS", "lots", "KOBOT_MAX_NEW_TOKENS: Input should be a valid integer"),
        ("KOBOT_DEVICE", "tpu", "KOBOT_DEVICE: must be auto, cpu, mps, cuda or cuda:N"),
        ("KOBOT_DTYPE", "int4", "KOBOT_DTYPE: Input should be 'auto', 'fp32', 'fp16' or 'bf16'"),
        ("KOBOT_CONTEXT_SCOPE", "room", "KOBOT_CONTEXT_SCOPE: Input should be 'user'"),
        ("KOBOT_DATABASE_URL", "sqlite:///x.db", "KOBOT_DATABASE_URL: must start with"),
        ("KOBOT_REDIS_URL", "localhost:6379", "KOBOT_REDIS_URL: must start with redis://"),
        ("KOBOT_TELEGRAM_ADMIN_IDS", "12,abc", "KOBOT_TELEGRAM_ADMIN_IDS: Input should be a valid"),
        ("KOBOT_MODLE", "x", "KOBOT_MODLE: unknown setting"),
        (
            "KOBOT_DISCORD_GATEWAY_URL",
            "http://x",
            "KOBOT_DISCORD_GATEWAY_URL: must start with ws://",
        ),
        (
            "KOBOT_TELEGRAM_BASE_URL",
            "api.telegram.org",
            "KOBOT_TELEGRAM_BASE_URL: must start with http",
        ),
    ],
)
def test_a_bad_value_names_the_variable_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith(expected)


def test_unknown_keys_in_the_env_file_are_rejected_but_other_programs_keys_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_env(tmp_path, "POSTGRES_PASSWORD=x\nKOBOT_TEMPRATURE=1\n")
    with pytest.raises(ConfigError, match=r"^KOBOT_TEMPRATURE: unknown setting"):
        load_settings()
    write_env(tmp_path, "POSTGRES_PASSWORD=x\n")
    assert load_settings().temperature == 0.8


def test_id_lists_accept_commas(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KOBOT_DISCORD_CHANNELS", " 1, 22 ,333")
    assert load_settings().discord_channels == [1, 22, 333]


def test_masked_settings_hide_tokens_and_url_passwords() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        telegram_token=SecretStr("123:secret-telegram"),
        discord_token=SecretStr("secret-discord"),
        database_url="postgresql+asyncpg://bot:pa55word@db:5432/kobot",
        redis_url="redis://:redispass@cache:6379/0",
    )
    shown = settings.masked()
    text = "\n".join(f"{k}={v}" for k, v in shown.items())
    for secret in ("secret-telegram", "secret-discord", "pa55word", "redispass"):
        assert secret not in text
    assert shown["KOBOT_DATABASE_URL"] == "postgresql+asyncpg://bot:********@db:5432/kobot"
    assert shown["KOBOT_TELEGRAM_TOKEN"] == "********"
    assert shown["KOBOT_DISCORD_TOKEN"] == "********"


def test_secret_values_are_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOBOT_TELEGRAM_WEBHOOK_PORT", "99999")
    monkeypatch.setenv("KOBOT_TELEGRAM_TOKEN", "123:very-secret")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "very-secret" not in str(caught.value)
    assert "KOBOT_TELEGRAM_WEBHOOK_PORT" in str(caught.value)


def test_env_example_lists_every_setting_and_loads_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = Path(__file__).resolve().parents[2] / ".env.example"
    names = {
        line.split("=", 1)[0].lstrip("# ").strip()
        for line in example.read_text(encoding="utf-8").splitlines()
        if "=" in line and line.lstrip("# ").startswith("KOBOT_")
    }
    expected = {f"KOBOT_{name.upper()}" for name in Settings.model_fields}
    assert expected - names == set(), "settings missing from .env.example"
    assert names - expected - {"KOBOT_ENV_FILE"} == set(), ".env.example names unknown settings"
    monkeypatch.chdir(tmp_path)
    settings = load_settings(example)
    assert settings.telegram_token is None and settings.redis_url is None
    assert settings.masked() == Settings(_env_file=None).masked()  # type: ignore[call-arg]
