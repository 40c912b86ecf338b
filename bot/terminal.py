"""`drawbridge draw` and `drawbridge edit`: the bot's image pipeline, run from a terminal.

The same checks as `/draw` and `/edit` (`bot.validation`, `bot.sizes.parse_size`) refuse a
bad request before anything reaches the upstream, and the same i18n messages tell why, in
`--lang` or `DRAWBRIDGE_DEFAULT_LANG`; where a chat message would send the user to a chat
command (`/token`, `/help`) the catalog's `terminal.<key>` variant speaks of settings and
options instead.

Files are never overwritten: each is created exclusively (`O_EXCL`), so two draws started in
the same second, or in parallel, keep all their images. Progress goes to stderr: on a
terminal one line rewritten in place, cleared before any log line; otherwise one line per
event, so a log file or a pipe never holds a half-line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from bot import errors, validation
from bot.config import Settings
from bot.datadir import secure_data_dir
from bot.i18n import CATALOGS, LANGUAGES, normalize_lang, t
from bot.images import extension_for_format, prepare_references
from bot.secrets import KeyBox
from bot.sizes import Size, parse_size, size_for_reference
from bot.store.opening import open_store
from bot.upstream import (
    CapabilityStore,
    GeneratedImage,
    ImageRequest,
    Progress,
    ProviderChain,
    build_clients,
)
from bot.upstream.transport import upstream_http

PARTIALS_DIR = "partials"
"""Sub-folder of `--output` that holds partial previews (written only with `--partials`)."""
TICK = 1.0
"""Seconds between two redraws of the progress line on a terminal."""
_CLEAR_LINE = "\r\x1b[K"


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `draw` and `edit` subcommands to the `drawbridge` parser."""
    draw = sub.add_parser(
        "draw",
        help="make an image from a prompt, in this terminal",
        description="Make images from a prompt through the configured providers, with the "
        "checks and messages of /draw; the files are written to --output.",
    )
    draw.add_argument("prompt", help="what to draw (quote it)")
    _image_arguments(draw)
    edit = sub.add_parser(
        "edit",
        help="edit images with a prompt, in this terminal",
        description="Edit reference images with a prompt through the configured providers, "
        "with the checks and messages of /edit; the files are written to --output.",
    )
    edit.add_argument("prompt", help="the change to make (quote it)")
    edit.add_argument("images", nargs="+", type=Path, help="reference image files")
    _image_arguments(edit, edit=True)


def _image_arguments(parser: argparse.ArgumentParser, *, edit: bool = False) -> None:
    size_help = "16:9, 9:16, 1:1, 2k, 16:9@4k, 1536x1024, auto (default: DRAWBRIDGE_DEFAULT_SIZE"
    size_help += "; for edit, the first image's shape)" if edit else ")"
    parser.add_argument("--size", "-s", default=None, help=size_help)
    parser.add_argument(
        "--n", "-n", type=int, default=1, help="how many images (1 to DRAWBRIDGE_MAX_N)"
    )
    parser.add_argument(
        "--quality",
        "-q",
        choices=("low", "medium", "high", "auto"),
        default=None,
        help="image quality; higher costs more credits and upstream tokens (default: the API's)",
    )
    parser.add_argument(
        "--format",
        "-f",
        dest="output_format",
        choices=("png", "jpeg", "webp"),
        help="file format of the results (default: png)",
    )
    parser.add_argument(
        "--compression", type=int, choices=range(0, 101), metavar="0-100", help="jpeg/webp only"
    )
    parser.add_argument(
        "--background",
        choices=("transparent", "opaque", "auto"),
        help="transparent needs png or webp",
    )
    parser.add_argument(
        "--moderation", choices=("low", "auto"), help="the API's content filter strictness"
    )
    parser.add_argument("--output", "-o", type=Path, default=Path("."), help="folder for the files")
    parser.add_argument("--no-stream", action="store_true", help="do not ask for streaming")
    parser.add_argument(
        "--partials",
        action="store_true",
        help=f"keep the partial previews of a stream, in {PARTIALS_DIR}/ under --output",
    )
    parser.add_argument(
        "--lang",
        choices=LANGUAGES,
        default=None,
        help="language of the messages (default: DRAWBRIDGE_DEFAULT_LANG)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one `draw` or `edit` from parsed arguments; returns the exit code.

    0 on success, 1 when the request or the upstream failed, 2 when no provider is
    configured, 130 on Ctrl-C.
    """
    lang = args.lang or normalize_lang(settings.default_lang, "en")
    try:
        return asyncio.run(terminal_job(args, settings))
    except errors.DrawbridgeError as exc:
        print(f"error: {render_error(lang, exc)} [{exc.kind}]", file=sys.stderr)
        return 2 if isinstance(exc, errors.NotConfiguredError) else 1
    except KeyboardInterrupt:
        return 130


def render_error(lang: str, error: errors.DrawbridgeError) -> str:
    """The user's message for `error`, in its terminal wording when the catalog has one."""
    key = f"terminal.{error.key}"
    return t(lang, key if key in CATALOGS["en"] else error.key, **error.params)


def usage_line(usage: Mapping[str, Any]) -> str:
    """The upstream's `usage` as one short line: `70 in (70 text, 0 image) + 3336 out = 3406`."""
    numbers = {k: v for k, v in usage.items() if isinstance(v, int | float)}
    inputs, outputs = numbers.get("input_tokens"), numbers.get("output_tokens")
    if inputs is None or outputs is None:
        # A relay's own shape: its plain numbers, whatever they are called.
        return ", ".join(f"{k} {v}" for k, v in numbers.items()) or "-"
    line = f"{inputs} in"
    details = usage.get("input_tokens_details")
    if isinstance(details, Mapping):
        parts = [
            f"{details[k]} {k.removesuffix('_tokens')}"
            for k in ("text_tokens", "image_tokens")
            if isinstance(details.get(k), int)
        ]
        if parts:
            line += f" ({', '.join(parts)})"
    total = numbers.get("total_tokens", inputs + outputs)
    return f"{line} + {outputs} out = {total} tokens"


class ProgressLine:
    """The progress shown on `stream` (stderr), safe to interleave with log lines.

    On a terminal, `show` rewrites one line in place and `clear` wipes it; `attach` makes every
    log record clear it first, so no log line starts in the middle of it. Elsewhere (a pipe,
    a file) `show` prints nothing and `event` prints whole lines.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._shown = False

    def show(self, text: str) -> None:
        """Rewrite the progress line (terminals only)."""
        if self.tty:
            self.stream.write(_CLEAR_LINE + text)
            self.stream.flush()
            self._shown = True

    def clear(self) -> None:
        """Wipe the progress line, if one is shown, so the next write starts a fresh line."""
        if self._shown:
            self.stream.write(_CLEAR_LINE)
            self.stream.flush()
            self._shown = False

    def event(self, text: str) -> None:
        """One line about something that happened (a retry, a partial preview)."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    @contextmanager
    def attach(self, logger: logging.Logger | None = None) -> Iterator[None]:
        """While inside, every handler of `logger` (the root) clears the line before writing."""
        handlers = (logger or logging.getLogger()).handlers
        clearing = _ClearsProgress(self)
        for handler in handlers:
            handler.addFilter(clearing)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(clearing)


class _ClearsProgress(logging.Filter):
    """Passes every record, wiping the progress line first (a handler runs filters before emit)."""

    def __init__(self, progress: ProgressLine) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


def create_exclusive(folder: Path, stem: str, ext: str, data: bytes) -> Path:
    """Write `data` to `folder/stem.ext`, or `stem~2.ext`, `stem~3.ext`...: never over a file.

    `O_EXCL` makes the check and the creation one step, so parallel runs cannot both take a
    name.
    """
    for attempt in range(1, 10_000):
        path = folder / (f"{stem}.{ext}" if attempt == 1 else f"{stem}~{attempt}.{ext}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return path
    raise FileExistsError(f"no free name for {stem}.{ext} in {folder}")


def save_results(folder: Path, stamp: str, images: Sequence[GeneratedImage]) -> list[Path]:
    """Save a run's images as `drawbridge-<stamp>-<i>.<ext>` without overwriting anything.

    The run claims its name with its first image; when another run holds it already, this
    one becomes `drawbridge-<stamp>_2-<i>`, `_3`... so the files of one run stay together.
    """
    if not images:
        return []
    exts = [extension_for_format(image.mime.split("/")[-1]) for image in images]
    for attempt in range(1, 10_000):
        stem = f"drawbridge-{stamp}" if attempt == 1 else f"drawbridge-{stamp}_{attempt}"
        try:
            fd = os.open(
                folder / f"{stem}-1.{exts[0]}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
            )
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as file:
            file.write(images[0].data)
        paths = [folder / f"{stem}-1.{exts[0]}"]
        for index, (image, ext) in enumerate(zip(images[1:], exts[1:], strict=True), start=2):
            paths.append(create_exclusive(folder, f"{stem}-{index}", ext, image.data))
        return paths
    raise FileExistsError(f"no free name for drawbridge-{stamp} in {folder}")


async def terminal_job(
    args: argparse.Namespace,
    settings: Settings,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """One `draw` or `edit` (`args.command`) from parsed arguments; returns the exit code.

    Raises a `DrawbridgeError` for a request refused (nothing sent upstream) or failed;
    `run` prints it (`render_error`). `out` and `err` default to stdout and stderr; what is
    printed here is for operators, in English.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    providers = settings.providers()
    if not providers or not any(p.api_key for p in providers):
        raise errors.NotConfiguredError("no provider or no key")
    if args.no_stream:
        providers = [p.model_copy(update={"stream": False}) for p in providers]
    kind = "edit" if args.command == "edit" else "draw"
    paths: list[Path] = list(getattr(args, "images", None) or [])
    # The chat's checks, in the chat's order (options, then the request): one input, one
    # first complaint, wherever it was typed.
    size_given = bool(args.size and args.size.strip())
    size: Size | None = parse_size(args.size, settings.model, default=settings.default_size)
    validation.check_request(
        kind,
        args.prompt,
        args.n,
        len(paths),
        max_prompt_chars=settings.max_prompt_chars,
        max_n=settings.max_n,
        # The chain routes an edit to a provider taking that many images, as in the chat.
        max_references=max(p.max_references for p in providers),
    )
    references = []
    if kind == "edit":
        raw = []
        for path in paths:
            try:
                raw.append(await asyncio.to_thread(path.read_bytes))
            except OSError as exc:
                print(f"error: cannot read {path}: {exc.strerror}", file=err)
                return 2
        references = await prepare_references(
            raw,
            max_count=max(p.max_references for p in providers),
            max_bytes=providers[0].max_reference_bytes,
            max_total_pixels=settings.max_job_pixels,
        )
        if not size_given:
            first = references[0]
            size = size_for_reference(
                first.width, first.height, settings.model, settings.default_size
            )
    request = ImageRequest(
        prompt=args.prompt.strip(),
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
    partials_dir = args.output / PARTIALS_DIR
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    progress = ProgressLine(err)
    partials = 0

    def elapsed() -> str:
        seconds = int(time.monotonic() - started)
        return f"{seconds // 60}:{seconds % 60:02d}"

    async def on_progress(event: Progress) -> None:
        nonlocal partials
        if event.kind == "partial" and event.data:
            partials += 1
            if args.partials:
                partials_dir.mkdir(exist_ok=True)
                path = await asyncio.to_thread(
                    create_exclusive,
                    partials_dir,
                    f"drawbridge-{stamp}-partial{partials}",
                    _image_ext(event.data),
                    event.data,
                )
                progress.event(f"  partial preview {partials} saved: {path}")
            else:
                progress.event(f"  partial preview {partials} ({elapsed()})")
        elif event.kind == "retry":
            progress.event(f"  retrying: {event.detail}")

    async def ticker() -> None:
        while True:
            progress.show(f"  waiting {elapsed()} ")
            await asyncio.sleep(TICK)

    # The bot's store (DRAWBRIDGE_DATABASE_URL, else SQLite in DRAWBRIDGE_DATA_DIR): what
    # the bot learned about each relay spares the CLI a billed failure, and the other way.
    secure_data_dir(settings.data_dir)
    store = await open_store(settings, KeyBox.load(settings.data_dir, settings.secret_key))
    try:
        async with upstream_http(settings.upstream_proxy) as http:
            capabilities = CapabilityStore(store)
            chain = ProviderChain(build_clients(providers, http=http, capabilities=capabilities))
            shape = "" if size_given or kind == "draw" else f" (shape of {paths[0].name})"
            progress.event(f"{kind} {request.size or 'auto'}{shape} x{request.n} ...")
            with progress.attach():
                tick = asyncio.create_task(ticker()) if progress.tty else None
                try:
                    result = await chain.run(request, on_progress)
                finally:
                    if tick is not None:
                        tick.cancel()
                        await asyncio.gather(tick, return_exceptions=True)
                    progress.clear()
    finally:
        await store.close()
    saved = await asyncio.to_thread(save_results, args.output, stamp, result.images)
    for path, image in zip(saved, result.images, strict=True):
        print(f"{path}  {image.width}x{image.height}  {len(image.data)} bytes", file=out)
    if result.fallback_size:
        print(f"note: 4K was refused; drew {result.fallback_size} instead", file=err)
    if result.revised_prompt:
        print(f"revised prompt: {result.revised_prompt}", file=out)
    if result.usage:
        print(f"usage: {usage_line(result.usage)}", file=out)
    print(f"provider: {result.provider}  time: {result.elapsed:.1f}s", file=err)
    out.flush()
    return 0


def _image_ext(data: bytes) -> str:
    """The extension of a partial preview's bytes (they come in the requested format)."""
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"
