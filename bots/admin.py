"""Admin commands: `kobot history purge|export|delete|stats` and `kobot health`.

They open the same storage as the bots (KOBOT_DATABASE_URL, behind KOBOT_REDIS_URL when set, so
cached windows are invalidated too) and may run while the bots run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.messages import utc_now
from core.settings import Settings

if TYPE_CHECKING:
    from storage.base import Storage

HEALTH_TIMEOUT_S = 5.0
StorageAction = Callable[["Storage"], Awaitable[int]]


class UsageError(Exception):
    """A bad admin command line; the message says what to type instead."""


def add_commands(sub: Any) -> None:
    """Add `history` and `health` to the `kobot` sub-command parser."""
    history = sub.add_parser("history", help="stored conversations: purge, export, delete, stats")
    actions = history.add_subparsers(dest="action", required=True)
    purge = actions.add_parser("purge", help="delete turns older than the retention period")
    purge.add_argument("--days", type=int, help="older than N days (default: retention setting)")
    purge.add_argument("--before", help="older than this date or time (ISO 8601, UTC if naive)")
    export = actions.add_parser("export", help="print everything stored about a user as JSON")
    export.add_argument("--user", required=True, help="PLATFORM:USER_ID, e.g. telegram:1234")
    export.add_argument("--out", help="write to this file instead of standard output")
    delete = actions.add_parser("delete", help="delete everything stored about a user")
    delete.add_argument("--user", required=True, help="PLATFORM:USER_ID, e.g. telegram:1234")
    actions.add_parser("stats", help="how many turns, users and conversations are stored")
    sub.add_parser("health", help="ask this machine's bot for /healthz (exit 0 when healthy)")


def parse_user(text: str) -> tuple[str, str]:
    platform, _, user_id = text.partition(":")
    if not platform or not user_id:
        raise UsageError(f"--user: expected PLATFORM:USER_ID such as telegram:1234, got {text!r}")
    return platform, user_id


def purge_cutoff(args: argparse.Namespace, settings: Settings, now: datetime) -> datetime:
    """From `--before`, else `--days`, else KOBOT_HISTORY_RETENTION_DAYS."""
    if args.before:
        try:
            cutoff = datetime.fromisoformat(args.before)
        except ValueError:
            raise UsageError(f"--before: not an ISO 8601 date: {args.before!r}") from None
        return cutoff if cutoff.tzinfo else cutoff.replace(tzinfo=UTC)
    days = settings.history_retention_days if args.days is None else args.days
    if days < 1:
        raise UsageError(
            "nothing to purge by: pass --days N or --before DATE, "
            "or set KOBOT_HISTORY_RETENTION_DAYS"
        )
    return now - timedelta(days=days)


async def with_storage(settings: Settings, action: StorageAction) -> int:
    from storage.factory import build_storage

    storage = await build_storage(settings.storage_options())
    try:
        return await action(storage)
    finally:
        await storage.close()


async def _purge(storage: Storage, cutoff: datetime) -> int:
    deleted = await storage.purge_before(cutoff)
    print(f"삭제했어요 (deleted): {deleted} turns older than {cutoff.isoformat()}")
    return 0


async def _export(storage: Storage, user: tuple[str, str], out: str | None) -> int:
    exported = await storage.export_user(*user)
    text = json.dumps(exported.as_dict(), ensure_ascii=False, indent=2) + "\n"
    if out:
        await asyncio.to_thread(Path(out).write_text, text, encoding="utf-8")
        print(f"내보냈어요 (exported) → {out}")
    else:
        sys.stdout.write(text)
    return 0


async def _delete(storage: Storage, user: tuple[str, str]) -> int:
    deleted = await storage.delete_user(*user)
    print(f"삭제했어요 (deleted): {deleted} turns of {user[0]}:{user[1]} and their personas")
    return 0


async def _stats(storage: Storage, settings: Settings) -> int:
    counts = dict(await storage.stats())
    counts["retention_days"] = settings.history_retention_days
    print(json.dumps(counts, ensure_ascii=False))
    return 0


def history_action(settings: Settings, args: argparse.Namespace) -> StorageAction:
    if args.action == "purge":
        cutoff = purge_cutoff(args, settings, utc_now())
        return lambda storage: _purge(storage, cutoff)
    if args.action == "export":
        user = parse_user(args.user)
        return lambda storage: _export(storage, user, args.out)
    if args.action == "delete":
        user = parse_user(args.user)
        return lambda storage: _delete(storage, user)
    return lambda storage: _stats(storage, settings)


def run_history(settings: Settings, args: argparse.Namespace) -> int:
    """`kobot history ...`; a bad command line exits 2 with one line saying why."""
    try:
        action = history_action(settings, args)
    except UsageError as error:
        print(f"kobot history: {error}", file=sys.stderr)
        return 2
    return asyncio.run(with_storage(settings, action))


def health_url(settings: Settings) -> str:
    host = settings.metrics_host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.metrics_port}/healthz"


def run_health(settings: Settings, args: argparse.Namespace) -> int:
    """`kobot health` (the Docker HEALTHCHECK): 0 when /healthz says ok, 1 otherwise."""
    if settings.metrics_port == 0:
        print("kobot health: KOBOT_METRICS_PORT is 0 (the health server is off)", file=sys.stderr)
        return 2
    url = health_url(settings)
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as response:
            print(response.read().decode("utf-8", "replace"))
            return 0
    except urllib.error.HTTPError as error:
        print(error.read().decode("utf-8", "replace"))
        return 1
    except (urllib.error.URLError, OSError) as error:
        print(f"kobot health: no answer from {url} ({error})", file=sys.stderr)
        return 1
