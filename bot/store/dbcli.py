"""`drawbridge db upgrade` and `drawbridge db copy`, as the CLI runs them."""

from __future__ import annotations

import argparse
import logging
import sys

from bot.config import DATABASE_URL_SCHEMES, Settings
from bot.store.copy import CopyRefused, copy_database, redact, upgrade
from bot.store.model import StoreError

log = logging.getLogger(__name__)


def _say(line: str) -> None:
    print(line, flush=True)


def _bad_url(url: str) -> str | None:
    if url.startswith(DATABASE_URL_SCHEMES):
        return None
    return (
        f"{redact(url)} is not a database URL: use postgresql://user:password@host:port/db "
        "or sqlite:///path/to/drawbridge.sqlite3"
    )


async def run_db(args: argparse.Namespace, settings: Settings) -> int:
    """Exit codes: 0 done, 1 failed (the database unreachable, totals differ), 2 refused."""
    if args.db_command == "upgrade":
        urls = [args.database_url or settings.database()]
    else:
        urls = [args.source, args.target]
    for url in urls:
        if problem := _bad_url(url):
            print(f"error: {problem}", file=sys.stderr)
            return 2
    try:
        if args.db_command == "upgrade":
            await upgrade(urls[0], _say)
            return 0
        report = await copy_database(args.source, args.target, _say)
    except CopyRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ConnectionError) as exc:
        print(f"error: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # asyncpg's own errors (no such database, authentication) and sqlite3's: one line.
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for name, value in report.totals.items():
        _say(f"  {name}: {value:,}")
    if report.mismatches:
        for line in report.mismatches:
            print(f"error: {line}", file=sys.stderr)
        return 1
    _say("totals match: the copy is complete")
    return 0
