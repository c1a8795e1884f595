"""Keeping the bot token (and the webhook secret) out of every log line.

The token is part of every Bot API URL, and httpx logs request URLs at INFO. Two guards: the
httpx/httpcore loggers are held at WARNING or above, and a filter on those loggers and on the
root logger's handlers replaces any secret in a record (message, arguments, traceback) by `***`.
The filter is `core.ops.logs.SecretRedactor`, which `kobot` also installs for every secret
of the settings; the adapter installs its own as well, for runs that do not go through `kobot`.
"""

from __future__ import annotations

from core.ops.logs import HTTP_LOGGERS, REDACTED, SecretRedactor
from core.settings import Settings

__all__ = ["HTTP_LOGGERS", "REDACTED", "SecretRedactor", "telegram_secrets"]


def telegram_secrets(settings: Settings) -> list[str]:
    secrets = [settings.telegram_token, settings.telegram_webhook_secret]
    return [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]
