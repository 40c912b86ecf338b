"""`drawbridge draw` and `drawbridge edit`: the bot's image pipeline, run from a terminal."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import httpx

from bot import errors
from bot.config import Settings
from bot.datadir import secure_data_dir
from bot.i18n import normalize_lang, t
from bot.images import extension_for_format, prepare_references
from bot.secrets import KeyBox
from bot.sizes import parse_size
from bot.store import Store
from bot.upstream import CapabilityStore, ImageRequest, Progress, ProviderChain, build_clients


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `draw` and `edit` subcommands to the `drawbridge` parser."""
    draw = sub.add_parser("draw", help="make an image from a prompt, in this terminal")
    draw.add_argument("prompt")
    _image_arguments(draw)
    edit = sub.add_parser("edit", help="edit images with a prompt, in this terminal")
    edit.add_argument("prompt")
    edit.add_argument("images", nargs="+", type=Path, help="reference image files")
    _image_arguments(edit)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one `draw` or `edit` from parsed arguments; returns the exit code."""
    lang = normalize_lang(os.environ.get("LANG"), "en")
    try:
        return asyncio.run(_terminal_job(args, settings))
    except errors.DrawbridgeError as exc:
        print(f"error: {t(lang, exc.key, **exc.params)} [{exc.kind}]", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size", "-s", default=None, help="16:9, 9:16, 1:1, 2k, 16:9@4k, 1536x1024, auto"
    )
    parser.add_argument("--n", "-n", type=int, default=1, help="how many images (1-10)")
    parser.add_argument("--quality", "-q", choices=("low", "medium", "high", "auto"), default=None)
    parser.add_argument("--format", "-f", dest="output_format", choices=("png", "jpeg", "webp"))
    parser.add_argument(
        "--compression", type=int, choices=range(0, 101), metavar="0-100", help="jpeg/webp only"
    )
    parser.add_argument("--background", choices=("transparent", "opaque", "auto"))
    parser.add_argument("--moderation", choices=("low", "auto"))
    parser.add_argument("--output", "-o", type=Path, default=Path("."), help="folder for the files")
    parser.add_argument("--no-stream", action="store_true", help="do not ask for streaming")


async def _terminal_job(args: argparse.Namespace, settings: Settings) -> int:
    providers = settings.providers()
    if not providers:
        print(
            "error: set DRAWBRIDGE_API_BASE and DRAWBRIDGE_API_KEY (or DRAWBRIDGE_PROVIDERS) first",
            file=sys.stderr,
        )
        return 2
    if args.no_stream:
        providers = [p.model_copy(update={"stream": False}) for p in providers]
    size = parse_size(args.size, settings.model, default=settings.default_size)
    references = []
    if args.command == "edit":
        raw = []
        for path in args.images:
            try:
                raw.append(path.read_bytes())
            except OSError as exc:
                print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
                return 2
        references = await prepare_references(
            raw,
            max_count=providers[0].max_references,
            max_bytes=providers[0].max_reference_bytes,
        )
    request = ImageRequest(
        prompt=args.prompt,
        size=str(size) if size else None,
        n=args.n,
        quality=args.quality,
        output_format=args.output_format,
        output_compression=args.compression,
        background=args.background,
        moderation=args.moderation,
        references=tuple(references),
    )
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    partials = 0

    async def on_progress(event: Progress) -> None:
        nonlocal partials
        if event.kind == "partial" and event.data:
            partials += 1
            path = args.output / f"drawbridge-{stamp}-partial{partials}.png"
            path.write_bytes(event.data)
            print(f"\r  partial preview saved: {path}", file=sys.stderr)
        elif event.kind == "retry":
            print(f"\r  retrying: {event.detail}", file=sys.stderr)

    async def ticker() -> None:
        while True:
            elapsed = int(time.monotonic() - started)
            print(f"\r  waiting {elapsed // 60}:{elapsed % 60:02d} ", end="", file=sys.stderr)
            await asyncio.sleep(1)

    # The bot's store in DRAWBRIDGE_DATA_DIR: what the bot learned about each relay (cannot
    # stream, cannot edit) spares the CLI a billed failure, and what the CLI learns helps it.
    store = await Store.open(
        secure_data_dir(settings.data_dir) / "drawbridge.sqlite3",
        keybox=KeyBox.load(settings.data_dir, settings.secret_key),
    )
    try:
        async with httpx.AsyncClient(proxy=settings.upstream_proxy or None) as http:
            capabilities = CapabilityStore(store)
            chain = ProviderChain(build_clients(providers, http=http, capabilities=capabilities))
            print(f"{args.command} {request.size or 'auto'} x{request.n} ...", file=sys.stderr)
            tick = asyncio.create_task(ticker())
            try:
                result = await chain.run(request, on_progress)
            finally:
                tick.cancel()
                print(file=sys.stderr)
    finally:
        await store.close()
    for index, image in enumerate(result.images):
        ext = extension_for_format(image.mime.split("/")[-1])
        path = args.output / f"drawbridge-{stamp}-{index + 1}.{ext}"
        path.write_bytes(image.data)
        print(f"{path}  {image.width}x{image.height}  {len(image.data)} bytes")
    if result.fallback_size:
        print(f"note: 4K was refused; drew {result.fallback_size} instead", file=sys.stderr)
    if result.revised_prompt:
        print(f"revised prompt: {result.revised_prompt}")
    if result.usage:
        print(f"usage: {result.usage}")
    print(f"provider: {result.provider}  time: {result.elapsed:.1f}s", file=sys.stderr)
    return 0
