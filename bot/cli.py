"""The `drawbridge` command: run the bot, draw or edit from a terminal, serve the mock upstream."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pydantic import ValidationError
from pydantic_settings.exceptions import SettingsError

from bot import terminal
from bot.config import Settings, settings_error_lines
from bot.logs import add_secrets, settings_secrets, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from bot import mock_upstream

    parser = argparse.ArgumentParser(
        prog="drawbridge",
        description="Image bot for QQ, Telegram and Discord over an OpenAI-compatible image API.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="serve every configured chat platform")
    terminal.add_subcommands(sub)
    mock = sub.add_parser("mock-upstream", help="serve an offline OpenAI-compatible image API")
    mock_upstream.add_cli_arguments(mock)
    doctor = sub.add_parser(
        "doctor", help="test each configured provider (free unless --spend) and print a table"
    )
    doctor.add_argument("--provider", default=None, metavar="NAME", help="only this provider")
    doctor.add_argument(
        "--spend",
        action="store_true",
        help="also make the cheapest real requests (4 low-quality images per provider)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `drawbridge` and `python -m bot`."""
    args = build_parser().parse_args(argv)
    if args.command == "mock-upstream":
        from bot import mock_upstream

        setup_logging("INFO")
        try:
            asyncio.run(mock_upstream.run_from_args(args))
        except KeyboardInterrupt:
            pass
        return 0
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as exc:
        # A wrong setting is the operator's to fix: name it, no traceback.
        for line in settings_error_lines(exc):
            print(f"error: {line}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    add_secrets(settings_secrets(settings), configured=True)
    if args.command == "run":
        from bot.runner import run

        return asyncio.run(run(settings))
    if args.command == "doctor":
        from bot.doctor import run_doctor

        return asyncio.run(run_doctor(settings, provider_name=args.provider, spend=args.spend))
    return terminal.run(args, settings)
