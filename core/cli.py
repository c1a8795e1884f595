"""The `kobot` command: chat, telegram, discord, config, db."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from core.errors import StartupError
from core.settings import ConfigError, Settings, load_settings
from storage.base import StorageError

log = logging.getLogger("kobot")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kobot", description="KoGPT2 chatbot platform")
    parser.add_argument("--env-file", help="settings file to read instead of .env")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat in this terminal (reads lines when piped)")
    chat.add_argument("--user", default="console", help="who is talking (keeps their history)")
    sub.add_parser("telegram", help="run the Telegram bot")
    sub.add_parser("discord", help="run the Discord bot")
    sub.add_parser("config", help="print the effective settings, secrets masked")
    new_model = sub.add_parser("new-model", help="write an untrained model with KoGPT2's tokenizer")
    new_model.add_argument("out", help="folder to create (then set KOBOT_MODEL to it)")
    new_model.add_argument("--tokenizer", required=True, help="folder holding tokenizer.json")
    new_model.add_argument("--layers", type=int, default=2)
    new_model.add_argument("--dim", type=int, default=64)
    new_model.add_argument("--heads", type=int, default=2)
    db = sub.add_parser("db", help="database maintenance")
    db.add_argument("action", choices=["upgrade"], help="upgrade: apply schema migrations")
    return parser


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _print_config(settings: Settings, args: argparse.Namespace) -> int:
    for name, value in settings.masked().items():
        print(f"{name}={value}")
    return 0


def _run_chat(settings: Settings, args: argparse.Namespace) -> int:
    from bots.console_adapter import main as console_main

    return console_main(settings, user=args.user)


def _run_telegram(settings: Settings, args: argparse.Namespace) -> int:
    from bots.telegram_adapter import main as telegram_main

    return telegram_main(settings)


def _run_discord(settings: Settings, args: argparse.Namespace) -> int:
    from bots.discord_adapter import main as discord_main

    return discord_main(settings)


def _run_db(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from storage.sql import upgrade_database

    asyncio.run(upgrade_database(settings.database_url))
    print("데이터베이스 스키마가 최신이에요. (Database schema is up to date.)")
    return 0


def _new_model(settings: Settings, args: argparse.Namespace) -> int:
    from core.generation.model_files import create_random_model

    out = create_random_model(args.out, args.tokenizer, args.layers, args.dim, args.heads)
    print(f"만들었어요 (created): {out}\nKOBOT_MODEL={out}")
    return 0


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "chat": _run_chat,
    "telegram": _run_telegram,
    "discord": _run_discord,
    "config": _print_config,
    "db": _run_db,
    "new-model": _new_model,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.env_file)
    except ConfigError as error:
        print(f"kobot: 설정 오류 (configuration error):\n{error}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    try:
        return COMMANDS[args.command](settings, args)
    except KeyboardInterrupt:
        return 130
    except (StartupError, StorageError) as error:
        print(f"kobot: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
