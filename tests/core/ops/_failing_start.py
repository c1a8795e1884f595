"""`kobot ARGS` whose model loading fails with an error that carries secrets, as a careless
library might (a URL with credentials, a token in a message): used by the canary test."""

from __future__ import annotations

import sys

import bots.app
from bots.cli import main
from core.settings import Settings


def _failing_build_backend(settings: Settings) -> None:
    token = settings.telegram_token.get_secret_value() if settings.telegram_token else ""
    key = settings.backend_api_key.get_secret_value() if settings.backend_api_key else ""
    try:
        raise KeyError(f"lookup of {token} failed")
    except KeyError as error:
        raise RuntimeError(
            f"could not fetch https://bot:{key}@models.example/x ({token})"
        ) from error


bots.app.build_backend = _failing_build_backend  # type: ignore[assignment]
sys.exit(main(sys.argv[1:]))
