"""The `drawbridge` command: run the bot, draw or edit from a terminal, serve the mock upstream."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings.exceptions import SettingsError

from bot import terminal
from bot.config import Settings, settings_error_lines
from bot.logs import add_secrets, settings_secrets, setup_logging
from bot.startup import StartupError

DEFAULT_ENV_FILE = Path(".env")
SETTINGS_SOURCES = (
    "The image API comes from DRAWBRIDGE_API_BASE and DRAWBRIDGE_API_KEY (one provider) or "
    "DRAWBRIDGE_PROVIDERS (a JSON list), read from the environment or the --env-file "
    "(./.env by default); the environment wins. Every setting is listed in .env.example. "
    "Exit codes: 0 done, 1 failed (may succeed later), 2 fix the settings or arguments."
)
# Subcommands that read the settings (mock-upstream reads none).
_WITH_SETTINGS = ("run", "draw", "edit", "check", "doctor", "db")


def _version() -> str:
    try:
        return version("drawbridge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from bot import mock_upstream

    parser = argparse.ArgumentParser(
        prog="drawbridge",
        description="Image bot for QQ, Telegram and Discord over an OpenAI-compatible image API.",
        epilog=SETTINGS_SOURCES,
    )
    parser.add_argument(
        "--version", action="version", version=f"drawbridge {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "run",
        help="serve every configured chat platform",
        description="Serve every chat platform whose settings are present (TELEGRAM_BOT_TOKEN, "
        "QQ_ENABLED, DISCORD_BOT_TOKEN) until SIGINT or SIGTERM.",
    )
    terminal.add_subcommands(sub)
    sub.add_parser(
        "check",
        help="validate the settings and check every endpoint is reachable (free)",
        description="Validate the settings, print the effective configuration with secrets "
        "masked, and check without spending anything that each platform's API accepts its "
        "token, the OneBot HOST:PORT can be bound, and each provider's /v1/models accepts its "
        "key. Exit 0 when all is reachable, 1 when something is not, 2 for bad settings.",
    )
    mock = sub.add_parser(
        "mock-upstream",
        help="serve an offline OpenAI-compatible image API",
        description="Serve an offline OpenAI-compatible image API for demos and tests; it "
        "reads no settings. Exit 1 when the port is in use.",
    )
    mock_upstream.add_cli_arguments(mock)
    doctor = sub.add_parser(
        "doctor",
        help="test each configured provider (free unless --spend) and print a table",
        description="Test each configured provider: key, model, balance and round trip for "
        "free; with --spend also the cheapest real requests. Exit 0 when every provider passed.",
    )
    doctor.add_argument("--provider", default=None, metavar="NAME", help="only this provider")
    doctor.add_argument(
        "--spend",
        action="store_true",
        help="also make the cheapest real requests (4 low-quality images per provider)",
    )
    db = sub.add_parser(
        "db",
        help="upgrade the database's schema, or copy an install to another database",
        description="Manage the store: DRAWBRIDGE_DATABASE_URL (PostgreSQL), else the SQLite "
        "file in DRAWBRIDGE_DATA_DIR. Exit 0 done, 1 failed, 2 refused (bad URL, target not "
        "empty, the source in use).",
    )
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_sub.add_parser(
        "upgrade",
        help="apply the pending schema migrations",
        description="Apply the pending schema migrations (drawbridge run also applies them at "
        "start) and print the schema version before and after.",
    )
    upgrade.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="postgresql://user:password@host/db or sqlite:///path (default: the settings')",
    )
    copy = db_sub.add_parser(
        "copy",
        help="copy every row into an empty database and check the totals",
        description="Copy users, keys (still encrypted: keep the same DRAWBRIDGE_SECRET_KEY or "
        "secret.key), credits, the ledger, jobs and everything else into an empty database, "
        "then compare row counts and ledger totals. Stop drawbridge on the source first. "
        "Example: drawbridge db copy --from sqlite:///data/drawbridge.sqlite3 "
        "--to postgresql://drawbridge:secret@db/drawbridge",
    )
    copy.add_argument("--from", dest="source", required=True, metavar="URL", help="copy from")
    copy.add_argument("--to", dest="target", required=True, metavar="URL", help="copy into")
    for name in _WITH_SETTINGS:
        command = sub.choices[name]
        command.epilog = SETTINGS_SOURCES
        command.add_argument(
            "--env-file",
            type=Path,
            default=None,
            metavar="PATH",
            help="read settings from this file (default: ./.env if it exists); "
            "environment variables override it",
        )
    return parser


def load_settings(env_file: Path | None) -> Settings | None:
    """The settings from the environment and `env_file`, or None after printing why not.

    An explicit file that does not exist is an error (a typo in a unit file must not start
    the bot with no settings); the default `./.env` may be absent.
    """
    if env_file is not None and not env_file.is_file():
        print(f"error: --env-file {env_file}: no such file", file=sys.stderr)
        return None
    try:
        return Settings(_env_file=env_file or DEFAULT_ENV_FILE)  # type: ignore[call-arg]
    except (ValidationError, SettingsError) as exc:
        # A wrong setting is the operator's to fix: name it, no traceback.
        for line in settings_error_lines(exc):
            print(f"error: {line}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `drawbridge` and `python -m bot`."""
    args = build_parser().parse_args(argv)
    if args.command == "mock-upstream":
        from bot import mock_upstream

        setup_logging("INFO")
        try:
            asyncio.run(mock_upstream.run_from_args(args))
        except StartupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            pass
        return 0
    settings = load_settings(args.env_file)
    if settings is None:
        return 2
    if args.command in ("draw", "edit", "check"):
        # Where nobody can bind their own key, a provider without one can only answer 401.
        # `check` of a bot with chat platforms checks what `run` would: users may bring keys.
        if args.command != "check" or not settings.chat_platforms():
            problems = settings.keyless_provider_lines()
            for line in problems:
                print(f"error: {line}", file=sys.stderr)
            if problems:
                return 2
    setup_logging(settings.log_level)
    add_secrets(settings_secrets(settings), configured=True)
    if args.command == "run":
        from bot import event_loop
        from bot.runner import run

        try:
            return event_loop.run(run(settings), settings.event_loop)
        except StartupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
    if args.command == "check":
        from bot.check import run_check

        return asyncio.run(run_check(settings))
    if args.command == "db":
        from bot.store.dbcli import run_db

        return asyncio.run(run_db(args, settings))
    if args.command == "doctor":
        from bot.doctor import run_doctor

        return _one_line(
            lambda: asyncio.run(run_doctor(settings, provider_name=args.provider, spend=args.spend))
        )
    return _one_line(lambda: terminal.run(args, settings))


def _one_line(command: Callable[[], int]) -> int:
    """Run a command that opens the store: a database it cannot open is one line, no traceback."""
    try:
        return command()
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
