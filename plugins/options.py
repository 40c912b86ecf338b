"""Parsing `/draw` and `/edit` arguments: the prompt and `--size 16:9 --n 2 ...` options."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot import errors, validation
from bot.sizes import Size, parse_size

# Phones turn "--" into an em dash or a full-width pair; accept what people actually type.
_DASHES = r"(?<!\S)(?:--|—|－－|––|-(?=[snqf]\b))"
_OPTION = re.compile(
    _DASHES + r"([A-Za-z_]+)(?:\s*[=:：]\s*|\s+)(\"[^\"]*\"|'[^']*'|“[^”]*”|\S+)?",
)
# `--dry-run` (`--预览`) takes no value: it asks for the price only.
_DRY_RUN = re.compile(r"(?<!\S)(?:--|—|－－|––)(?:dry[-_]?run|预览)(?!\S)", re.IGNORECASE)
_ALIASES = {
    "size": "size",
    "s": "size",
    "ratio": "size",
    "ar": "size",
    "n": "n",
    "count": "n",
    "quality": "quality",
    "q": "quality",
    "format": "format",
    "f": "format",
    "fmt": "format",
    "background": "background",
    "bg": "background",
}
# A size's second word: a tier after a ratio ("16:9 4k") or a ratio after a tier ("4k 16:9").
_TIER_WORD = re.compile(r"[0-9０-９]{1,2}[kKｋＫ]")
_RATIO_WORD = re.compile(r"[0-9０-９.]+[:：][0-9０-９.]+")
_SIZE_SECOND = re.compile(r"[ \t]+(\S+)")
QUALITIES = ("low", "medium", "high", "auto")
BACKGROUNDS = ("transparent", "opaque", "auto")
FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}


@dataclass(frozen=True, slots=True)
class ImageOptions:
    """The prompt and options of one `/draw` or `/edit`."""

    prompt: str
    size: Size | None
    n: int
    quality: str | None
    output_format: str | None
    background: str | None = None
    size_given: bool = True
    """Whether the user chose the size; an edit without one keeps its reference's shape
    (`bot.sizes.size_for_reference`)."""
    dry_run: bool = False
    """`--dry-run` (`--预览`): say the price and run nothing."""


def parse_image_args(
    text: str,
    typed: Mapping[str, Any],
    *,
    model: str,
    default_size: str,
    max_n: int,
) -> ImageOptions:
    """Split `text` into prompt and options; `typed` (slash-command options) wins.

    Raises `BadOptionError`/`InvalidSizeError`/`EmptyPromptError` before anything is charged.
    """
    raw: dict[str, str] = {}
    dry_run = bool(_DRY_RUN.search(text)) or _truthy(typed.get("dry_run"))
    text = _DRY_RUN.sub(" ", text)
    pieces: list[str] = []
    end = 0
    for match in _OPTION.finditer(text):
        name = match.group(1).lower()
        value = (match.group(2) or "").strip("\"'“”")
        key = _ALIASES.get(name)
        if key is None:
            raise errors.UnknownOptionError(f"unknown option {name}", option="--" + name)
        if not value:
            raise errors.BadOptionError(f"--{name} without value", option=key, value="")
        stop = match.end()
        if key == "size":
            # "--size 16:9 4k" as the terminal takes it: the tier (or ratio) after a ratio
            # (or tier) is part of the size, not of the prompt.
            second = _SIZE_SECOND.match(text, stop)
            if second and _pairs(value, second.group(1)):
                value = f"{value} {second.group(1)}"
                stop = second.end()
        raw[key] = value
        pieces.append(text[end : match.start()])
        end = stop
    pieces.append(text[end:])
    prompt = " ".join(pieces)
    prompt = re.sub(r"[ \t]+", " ", prompt).strip()
    # A stray "--word" with no value left in the prompt is an option typo, not prose.
    stray = re.search(r"(?:^|\s)--([A-Za-z]\w*)\s*$", prompt)
    if stray:
        name = stray.group(1)
        raise errors.UnknownOptionError(f"unknown option {name}", option="--" + name)
    for key, value in typed.items():
        if key == "dry_run":
            continue
        if value is not None and value != "":
            raw[_ALIASES.get(key, key)] = str(value)

    size_given = bool(raw.get("size", "").strip())
    size = parse_size(raw.get("size"), model, default=default_size)
    n = 1
    if "n" in raw:
        try:
            n = int(raw["n"])
        except ValueError:
            raise errors.BadOptionError(f"n={raw['n']}", option="n", value=raw["n"]) from None
        validation.check_n(n, max_n)
    quality = raw.get("quality")
    if quality is not None:
        quality = quality.lower()
        if quality not in QUALITIES:
            raise errors.BadOptionError(f"quality={quality}", option="quality", value=quality)
    output_format = raw.get("format")
    if output_format is not None:
        fmt = FORMATS.get(output_format.lower())
        if fmt is None:
            raise errors.BadOptionError(
                f"format={output_format}", option="format", value=output_format
            )
        output_format = fmt
    background = raw.get("background")
    if background is not None:
        background = background.lower()
        if background not in BACKGROUNDS:
            raise errors.BadOptionError(
                f"background={background}", option="background", value=background
            )
        if background == "transparent" and output_format == "jpeg":
            # JPEG has no alpha channel: the API would refuse the pair.
            raise errors.BadOptionError(
                "transparent jpeg", option="background", value="transparent + jpeg"
            )
    return ImageOptions(
        prompt, size, n, quality, output_format, background, size_given, dry_run=dry_run
    )


def _truthy(value: Any) -> bool:
    """A typed flag (a Discord boolean option; "true" when it came as text)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _pairs(first: str, second: str) -> bool:
    """Whether two words make one size: a ratio and a tier, in either order."""
    return bool(
        (_RATIO_WORD.fullmatch(first) and _TIER_WORD.fullmatch(second))
        or (_TIER_WORD.fullmatch(first) and _RATIO_WORD.fullmatch(second))
    )
