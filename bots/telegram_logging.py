"""Keeping the bot token (and the webhook secret) out of every log line.

The token is part of every Bot API URL, and httpx logs request URLs at INFO. Two guards: the
httpx/httpcore loggers are held at WARNING or above, and a filter on those loggers and on the
root logger's handlers replaces any secret in a record (message, arguments, traceback) by `***`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from core.settings import Settings

REDACTED = "***"
HTTP_LOGGERS = ("httpx", "httpcore")


def telegram_secrets(settings: Settings) -> list[str]:
    secrets = [settings.telegram_token, settings.telegram_webhook_secret]
    return [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]


class SecretRedactor(logging.Filter):
    """A logging filter that rewrites records containing a secret; it never drops a record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = {secret for secret in secrets if secret}
        self._saved_levels: dict[str, int] = {}

    def add(self, secret: str) -> None:
        if secret:
            self._secrets.add(secret)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._scrub(record)
        except Exception:  # a broken record must not break the program that logs it
            record.msg, record.args = "(log record dropped: it could not be checked)", None
        return True

    def _scrub(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self._contains(message):
            record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and self._contains(record.exc_text):
            record.exc_text = self.redact(record.exc_text)

    def _contains(self, text: str) -> bool:
        return any(secret in text for secret in self._secrets)

    def install(self) -> None:
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
