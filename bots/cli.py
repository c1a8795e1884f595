"""The `kobot` command: chat, telegram, discord, config, db."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from bots.admin import add_commands, run_health, run_history
from core.errors import StartupError
from core.ops.logs import SecretRedactor, configure_logging, settings_secrets
from core.settings import ConfigError, Settings, load_settings
from core.training.cli import add_train_command, run_train
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
    onnx = sub.add_parser("export-onnx", help="export KOBOT_MODEL to ONNX (KOBOT_BACKEND=onnx)")
    onnx.add_argument("--out", help="folder to write (default: KOBOT_ONNX_DIR)")
    db = sub.add_parser("db", help="database maintenance")
    db.add_argument("action", choices=["upgrade"], help="upgrade: apply schema migrations")
    add_commands(sub)
    add_train_command(sub)
    return parser


def _print_config(settings: Settings, args: argparse.Namespace) -> int:
    redactor = SecretRedactor(settings_secrets(settings))  # e.g. a token inside a webhook URL
    for name, value in settings.masked().items():
        print(redactor.redact(f"{name}={value}"))
    return 0


def _run_chat(settings: Settings, args: argparse.Namespace) -> int:
    from bots.console.adapter import main as console_main

    return console_main(settings, user=args.user)


def _run_telegram(settings: Settings, args: argparse.Namespace) -> int:
    from bots.telegram.runner import main as telegram_main

    return telegram_main(settings)


def _run_discord(settings: Settings, args: argparse.Namespace) -> int:
    from bots.discord.runner import main as discord_main

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


def _export_onnx(settings: Settings, args: argparse.Namespace) -> int:
    from core.generation.onnx.export import export_onnx

    report = export_onnx(settings.model, args.out or settings.onnx_dir)
    print(
        f"내보냈어요 (exported) {settings.model} → {report.folder} in {report.seconds:.0f} s "
        f"(max |logit diff| vs torch: {report.max_abs_diff:.1e})\n"
        f"KOBOT_BACKEND=onnx\nKOBOT_ONNX_DIR={report.folder}"
    )
    return 0


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "chat": _run_chat,
    "telegram": _run_telegram,
    "discord": _run_discord,
    "config": _print_config,
    "db": _run_db,
    "new-model": _new_model,
    "export-onnx": _export_onnx,
    "history": run_history,
    "health": run_health,
    "train": run_train,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.env_file)
    except ConfigError as error:
        print(f"kobot: 설정 오류 (configuration error):\n{error}", file=sys.stderr)
        return 2
    redactor = configure_logging(settings)
    try:
        return COMMANDS[args.command](settings, args)
    except KeyboardInterrupt:
        return 130
    except (StartupError, StorageError) as error:
        print(f"kobot: {redactor.redact(str(error))}", file=sys.stderr)
        return 1
    except Exception:
        log.critical("kobot stopped by an unexpected error", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
