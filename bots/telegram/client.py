"""The python-telegram-bot Application we drive (without PTB's Updater) and the token check."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from telegram.error import InvalidToken, TelegramError
from telegram.ext import Application, ApplicationBuilder

from bots.telegram.redaction import SecretRedactor, telegram_secrets
from bots.telegram.routing import (
    BotIdentity,
)
from core.errors import StartupError
from core.settings import Settings

TelegramApp = Application[Any, Any, Any, Any, Any, Any]


def require_token(settings: Settings) -> str:
    token = settings.telegram_token
    if token is None or not token.get_secret_value().strip():
        raise StartupError("KOBOT_TELEGRAM_TOKEN is not set (get a token from @BotFather)")
    return token.get_secret_value().strip()


def build_application(settings: Settings) -> TelegramApp:
    """A PTB Application without PTB's Updater (our poller confirms updates after handling).

    PTB logs the API URLs, token included, at DEBUG while building the bot: hence the redactor.
    """
    builder = ApplicationBuilder().token(require_token(settings))
    builder = builder.base_url(settings.telegram_base_url).updater(None)
    builder = builder.job_queue(None)  # type: ignore[arg-type]  # None is documented: no jobs
    with SecretRedactor(telegram_secrets(settings)).installed():
        return builder.build()


def api_host(base_url: str) -> str:
    return urlsplit(base_url).netloc or base_url


async def connect(application: TelegramApp, settings: Settings) -> BotIdentity:
    """Check the token with `getMe`; a failure becomes a one-line StartupError."""
    try:
        await application.initialize()
    except InvalidToken:
        await application.bot.shutdown()
        raise StartupError(
            "KOBOT_TELEGRAM_TOKEN was rejected by the Telegram Bot API: "
            "check the token (from @BotFather) and KOBOT_TELEGRAM_BASE_URL"
        ) from None
    except TelegramError as error:
        await application.bot.shutdown()
        where = api_host(settings.telegram_base_url)
        reason = SecretRedactor(telegram_secrets(settings)).redact(str(error))
        raise StartupError(f"cannot reach the Telegram Bot API at {where}: {reason}") from None
    return BotIdentity.create(application.bot.id, application.bot.username)
