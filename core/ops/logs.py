"""Logging for every kobot process: text or JSON lines on stderr, with no secret in any of them.

* `settings_secrets`: every `SecretStr` value of the settings (bot tokens, webhook secret, API key,
  salt) plus the passwords inside the database, Redis and backend URLs.
* `SecretRedactor`: a logging filter that rewrites a record (message, arguments, traceback, stack,
  structured fields) so that no secret survives; it never drops a record. `configure_logging`
  puts it on the one root handler, so it sees every record of every library that propagates.
* `JsonFormatter` (`KOBOT_LOG_FORMAT=json`): one JSON object per line; structured fields passed as
  `extra={"event": "turn", "fields": {...}}` become top-level keys. `TextFormatter` is the
  classic line. Both redact their final output once more.
* `UserIds`: user and chat ids as keyed hashes (`KOBOT_LOG_USER_IDS=hash`, the default).
* Uncaught exceptions (main thread and other threads) and `warnings` go through logging too, so a
  traceback is redacted like any other record.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from core.messages import ConversationKey
from core.settings import Settings

REDACTED = "***"
HTTP_LOGGERS = ("httpx", "httpcore")  # they log request URLs, and a Bot API URL holds the token
NOISY_LOGGERS = ("httpx", "httpcore", "aiosqlite", "asyncio", "alembic.runtime.plugins")
URL_SETTINGS = ("database_url", "redis_url", "backend_url")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RECORD_KEYS = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})

log = logging.getLogger("kobot")


# --- secrets ----------------------------------------------------------------------------------


def url_password(url: str | None) -> list[str]:
    """The password inside `scheme://user:password@host`, as written and percent-decoded."""
    if not url:
        return []
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [p for p in {password, unquote(password or "")} if p]


def settings_secrets(settings: Settings) -> list[str]:
    """Every value that must never reach a log line."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr) and value.get_secret_value():
            found.append(value.get_secret_value())
    for name in URL_SETTINGS:
        found.extend(url_password(getattr(settings, name, None)))
    return found


class SecretRedactor(logging.Filter):
    """A logging filter that rewrites records containing a secret; it never drops a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._saved_levels: dict[str, int] = {}
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        if secret:
            self._secrets.add(secret)
            stripped = secret.strip()  # settings strip tokens before use
            if stripped:
                self._secrets.add(stripped)

    def redact(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return text

    def redact_value(self, value: Any) -> Any:
        """Strings redacted, containers walked; anything else made a redacted string."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, bool | int | float) or value is None:
            return value
        if isinstance(value, Mapping):
            return {str(k): self.redact_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.redact_value(v) for v in value]
        return self.redact(str(value))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._scrub(record)
        except Exception:  # a broken record must not break the program that logs it
            record.msg, record.args = "(log record dropped: it could not be checked)", None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True

    def _scrub(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self._contains(message):
            record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and self._contains(record.exc_text):
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info and self._contains(record.stack_info):
            record.stack_info = self.redact(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            record.fields = self.redact_value(fields)

    def _contains(self, text: str) -> bool:
        return any(secret in text for secret in self._secrets)

    def install(self) -> None:
        """On the root logger's handlers, and on the HTTP loggers (held at WARNING or above)."""
        for handler in logging.getLogger().handlers:
            handler.addFilter(self)
        for name in HTTP_LOGGERS:
            logger = logging.getLogger(name)
            logger.addFilter(self)
            self._saved_levels[name] = logger.level
            if logger.getEffectiveLevel() < logging.WARNING:
                logger.setLevel(logging.WARNING)

    def remove(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self)
        for name, level in self._saved_levels.items():
            logging.getLogger(name).removeFilter(self)
            logging.getLogger(name).setLevel(level)
        self._saved_levels.clear()

    @contextmanager
    def installed(self) -> Iterator[SecretRedactor]:
        self.install()
        try:
            yield self
        finally:
            self.remove()


# --- formatting -------------------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, redacted once more as a whole."""

    def __init__(self, redactor: SecretRedactor | None = None) -> None:
        super().__init__(TEXT_FORMAT)
        self.redactor = redactor or SecretRedactor()

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's fields, exc, stack."""

    def __init__(self, redactor: SecretRedactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or SecretRedactor()

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event:
            data["event"] = str(event)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            data.update({str(k): v for k, v in fields.items() if str(k) not in _RECORD_KEYS})
        if record.exc_info or record.exc_text:
            data["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        if record.stack_info:
            data["stack"] = record.stack_info
        return json.dumps(self.redactor.redact_value(data), ensure_ascii=False)


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stderr` is now (tests swap it), never a stale stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """Ignored: the handler always follows `sys.stderr`."""


# --- user ids ---------------------------------------------------------------------------------


_PROCESS_KEY = secrets.token_bytes(32)  # drawn once: every unsalted UserIds of a process agrees


class UserIds:
    """How user and chat ids appear in logs: a keyed hash (default) or as they are.

    The key is KOBOT_LOG_USER_SALT; without it each process draws a random one, so hashes then
    match only within one process's logs (set the salt to follow a user across workers).
    """

    def __init__(self, mode: str = "hash", salt: SecretStr | None = None) -> None:
        self.mode = mode
        raw = salt.get_secret_value() if salt is not None else ""
        self._key = raw.encode("utf-8") if raw else _PROCESS_KEY

    @classmethod
    def from_settings(cls, settings: Settings) -> UserIds:
        return cls(settings.log_user_ids, settings.log_user_salt)

    def __call__(self, platform: str, value: str) -> str:
        if self.mode == "plain" or not value:
            return value
        digest = hmac.new(self._key, f"{platform}:{value}".encode(), hashlib.sha256)
        return digest.hexdigest()[:16]

    def conversation(self, key: ConversationKey) -> str:
        """A conversation as `platform:chat:user`, each id shown the way `__call__` shows it."""
        chat, user = self(key.platform, key.chat_id), self(key.platform, key.user_id)
        return f"{key.platform}:{chat}:{user}"

    def message(self, platform: str, message_id: str) -> str:
        """A message id; a Telegram `chat:message` id keeps its message number, the chat hashed."""
        chat, separator, number = message_id.rpartition(":")
        return f"{self(platform, chat)}:{number}" if separator else message_id


# --- set-up -----------------------------------------------------------------------------------


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    log.critical("uncaught exception", exc_info=(kind, error, traceback))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    log.critical(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def quiet_stderr(level: int = logging.WARNING) -> None:
    """Raise the stderr handler's threshold to `level` (an interactive terminal chat: its
    screen is the conversation); loggers keep their levels, so other handlers see everything."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, StderrHandler):
            handler.setLevel(max(level, handler.level))


def configure_logging(settings: Settings) -> SecretRedactor:
    """One stderr handler on the root logger, redacting every setting's secret; returns its
    redactor (for text printed outside logging, such as start-up errors)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)
    redactor = SecretRedactor(settings_secrets(settings))
    handler = StderrHandler()
    formatter = JsonFormatter if settings.log_format == "json" else TextFormatter
    handler.setFormatter(formatter(redactor))
    handler.addFilter(redactor)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception
    return redactor
