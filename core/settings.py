"""All configuration, from `KOBOT_*` environment variables and an env file (`.env` by default)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.generation.device import parse_device
from core.messages import ContextScope
from storage.base import mask_url_password

if TYPE_CHECKING:
    from storage.factory import LockOptions, StorageOptions

ENV_PREFIX = "KOBOT_"
ENV_FILE_VARIABLE = "KOBOT_ENV_FILE"
DEFAULT_PERSONA = "다음은 친절하고 예의 바른 AI 챗봇과 사용자의 대화입니다."

HTTP_SCHEMES = ("http://", "https://")
URL_SCHEMES: dict[str, tuple[str, ...]] = {
    "database_url": ("sqlite+aiosqlite://", "postgresql+asyncpg://"),
    "redis_url": ("redis://", "rediss://", "unix://"),
    "telegram_base_url": HTTP_SCHEMES,
    "telegram_webhook_url": HTTP_SCHEMES,
    "discord_api_url": HTTP_SCHEMES,
    "discord_gateway_url": ("ws://", "wss://"),
}
"""What each URL setting must start with (`backend_url` too, checked with KOBOT_BACKEND)."""
URL_NOTES = {"database_url": " (async drivers)"}

IdList = Annotated[list[int], NoDecode]
TextList = Annotated[list[str], NoDecode]


class ConfigError(Exception):
    """A bad setting. The message names the variable and what is allowed, one line each."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_ignore_empty=True,
        validate_default=True,
        case_sensitive=False,
    )

    # Model and generation
    model: str = Field("skt/kogpt2-base-v2", min_length=1)
    backend: Literal["local", "openai", "onnx"] = "local"
    device: str = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    max_new_tokens: int = Field(64, ge=1, le=512)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_k: int = Field(50, ge=0, le=1000)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.2, ge=1.0, le=3.0)
    no_repeat_ngram_size: int = Field(3, ge=0, le=16)
    generation_timeout_s: float = Field(120.0, gt=0, le=3600)
    persona: str = Field(DEFAULT_PERSONA, max_length=1000)
    story_max_new_tokens: int = Field(256, ge=16, le=768)
    num_candidates: int = Field(1, ge=1, le=8)
    retry_candidates: int = Field(3, ge=1, le=8)

    # Remote (KOBOT_BACKEND=openai) and ONNX Runtime (KOBOT_BACKEND=onnx) backends
    backend_url: str | None = None
    backend_api_key: SecretStr | None = None
    backend_model: str | None = None
    backend_timeout_s: float = Field(60.0, gt=0, le=3600)
    backend_retries: int = Field(2, ge=0, le=10)
    backend_breaker_failures: int = Field(5, ge=1, le=1000)
    backend_breaker_cooldown_s: float = Field(30.0, gt=0, le=3600)
    backend_n_positions: int | None = Field(None, ge=16, le=1_048_576)
    onnx_dir: str = Field("kobot-onnx", min_length=1)

    # Generation engine (KOBOT_BACKEND=local): continuous batching, per-conversation KV reuse
    engine_max_batch: int = Field(0, ge=0, le=1024)  # 0: what the KV budget holds
    engine_kv_budget_mb: int = Field(1024, ge=16, le=1_048_576)
    engine_kv_idle_s: float = Field(600.0, ge=1.0, le=86_400.0)
    engine_prefill_chunk: int = Field(512, ge=16, le=8192)
    engine_compile: Literal["off", "compile"] = "off"
    engine_quant: Literal["auto", "off", "int8"] = "auto"
    engine_kv_dtype: Literal["auto", "model", "int8"] = "auto"
    engine_kernels: Literal["auto", "off"] = "auto"
    engine_kernel_dir: str | None = Field(None, min_length=1)
    engine_graphs: Literal["auto", "off", "static"] = "auto"

    # Dialogue
    context_scope: ContextScope = ContextScope.USER_IN_CHAT
    history_turns: int = Field(40, ge=2, le=1000)
    trim_low_water: float = Field(0.75, ge=0.1, le=1.0)
    max_message_chars: int = Field(20000, ge=100, le=1_000_000)
    lock_timeout_s: float = Field(300.0, gt=0, le=3600)
    lock_lease_s: float = Field(15.0, ge=1.0, le=600)
    rate_limit_per_minute: int = Field(20, ge=0, le=10000)
    link_code_ttl_s: int = Field(600, ge=60, le=86400)
    stream_replies: bool = True
    reply_filter: Literal["off", "mask", "block"] = "off"
    reply_filter_words: str | None = None

    # Storage
    database_url: str = Field("sqlite+aiosqlite:///kobot.db", min_length=1)
    redis_url: str | None = None
    redis_ttl_s: int = Field(86400, ge=60, le=30 * 86400)
    redis_window_turns: int = Field(80, ge=2, le=10000)
    history_retention_days: int = Field(0, ge=0, le=36500)
    history_purge_interval_s: int = Field(3600, ge=1, le=7 * 86400)

    # Operations
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_user_ids: Literal["hash", "plain"] = "hash"
    log_user_salt: SecretStr | None = None
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = Field("127.0.0.1", min_length=1)
    shutdown_timeout_s: float = Field(20.0, gt=0, le=3600)

    # Telegram
    telegram_token: SecretStr | None = None
    telegram_base_url: str = "https://api.telegram.org/bot"
    telegram_webhook_url: str | None = None
    telegram_webhook_listen: str = "0.0.0.0"
    telegram_webhook_port: int = Field(8443, ge=1, le=65535)
    telegram_webhook_secret: SecretStr | None = None
    telegram_allowed_users: IdList = Field(default_factory=list)
    telegram_allowed_chats: IdList = Field(default_factory=list)
    telegram_admin_ids: IdList = Field(default_factory=list)

    # Discord
    discord_token: SecretStr | None = None
    discord_api_url: str | None = None
    discord_gateway_url: str | None = None
    discord_channels: IdList = Field(default_factory=list)
    discord_guilds: IdList = Field(default_factory=list)
    discord_shards: str = "1"
    discord_allowed_guilds: IdList = Field(default_factory=list)
    discord_allowed_channels: IdList = Field(default_factory=list)
    discord_allowed_roles: IdList = Field(default_factory=list)
    discord_admin_ids: IdList = Field(default_factory=list)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        parse_device(value)
        return value.strip().lower()

    @field_validator("reply_filter_words")
    @classmethod
    def _check_words_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError("must name a readable file of words, one a line")
        return value

    @field_validator("backend_url")
    @classmethod
    def _check_backend_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        value = value.strip() if value else None
        if value is None:
            if info.data.get("backend") == "openai":
                raise ValueError("must be set when KOBOT_BACKEND=openai, e.g. http://vllm:8000/v1")
            return None
        return require_scheme(value, HTTP_SCHEMES, "backend_url")

    def storage_options(self) -> StorageOptions:
        """The storage settings, for `storage.factory.build_storage`."""
        from storage.factory import StorageOptions

        return StorageOptions(
            self.database_url, self.redis_url, self.redis_ttl_s, self.redis_window_turns
        )

    def lock_options(self) -> LockOptions:
        """The conversation-lock settings, for `storage.factory.build_locks`."""
        from storage.factory import LockOptions

        return LockOptions(self.redis_url, self.lock_lease_s, self.lock_timeout_s)

    @field_validator("redis_url", mode="before")
    @classmethod
    def _blank_redis_url_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(*URL_SCHEMES)
    @classmethod
    def _check_url_scheme(cls, value: str | None, info: ValidationInfo) -> str | None:
        name = str(info.field_name)
        return None if value is None else require_scheme(value, URL_SCHEMES[name], name)

    @field_validator("discord_shards")
    @classmethod
    def _check_shards(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "auto" and not (value.isdigit() and 1 <= int(value) <= 10000):
            raise ValueError("must be auto or a number of shards from 1")
        return value

    @field_validator(
        "telegram_allowed_users",
        "telegram_allowed_chats",
        "telegram_admin_ids",
        "discord_channels",
        "discord_guilds",
        "discord_allowed_guilds",
        "discord_allowed_channels",
        "discord_allowed_roles",
        "discord_admin_ids",
        mode="before",
    )
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def masked(self) -> dict[str, str]:
        """Every setting as `KOBOT_NAME -> text`, secrets shown as `********`."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                text = "********"
            elif name in {"database_url", "redis_url", "backend_url"} and value:
                text = mask_url_password(str(value))
            elif isinstance(value, list):
                text = ",".join(str(item) for item in value)
            else:
                text = "" if value is None else str(value)
            shown[f"{ENV_PREFIX}{name.upper()}"] = text
        return shown


def require_scheme(value: str, schemes: tuple[str, ...], setting: str) -> str:
    """`value` when it starts with one of `schemes`, else ValueError saying which ones."""
    if not value.startswith(schemes):
        *others, last = schemes
        note = URL_NOTES.get(setting, "")
        raise ValueError(f"must start with {', '.join(others)} or {last}{note}")
    return value


def known_variables() -> set[str]:
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields} | {ENV_FILE_VARIABLE}


def _unknown_variables(names: Iterable[str]) -> list[str]:
    known = known_variables()
    return sorted(n for n in names if n.upper().startswith(ENV_PREFIX) and n.upper() not in known)


def _describe(error: Mapping[str, Any]) -> str:
    location = error.get("loc") or ()
    field = str(location[0]) if location else "?"
    variable = f"{ENV_PREFIX}{field.upper()}"
    given = error.get("input")
    shown = (
        ""
        if isinstance(given, dict) or field.endswith(("token", "secret"))
        else f" (got {given!r})"
    )
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{variable}: {message}{shown}"


def load_settings(env_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the settings, or raise ConfigError with one line per bad variable."""
    chosen = Path(env_file or os.environ.get(ENV_FILE_VARIABLE) or ".env")
    explicit = bool(env_file or os.environ.get(ENV_FILE_VARIABLE))
    if explicit and not chosen.is_file():
        raise ConfigError(f"{ENV_FILE_VARIABLE}: file {str(chosen)!r} does not exist")
    file_keys = dotenv_values(chosen).keys() if chosen.is_file() else []
    unknown = _unknown_variables([*os.environ, *file_keys])
    if unknown:
        raise ConfigError(
            "\n".join(f"{name}: unknown setting (see .env.example)" for name in unknown)
        )
    try:
        return Settings(_env_file=chosen, **overrides)  # type: ignore[call-arg]
    except ValidationError as error:
        raise ConfigError("\n".join(_describe(e) for e in error.errors())) from None
