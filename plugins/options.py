"""Parsing `/draw` and `/edit` arguments: the prompt and `--size 16:9 --n 2 ...` options."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot import errors
from bot.sizes import Size, parse_size

# Phones turn "--" into an em dash or a full-width pair; accept what people actually type.
_DASHES = r"(?<!\S)(?:--|—|－－|––|-(?=[snqf]\b))"
_OPTION = re.compile(
    _DASHES + r"([A-Za-z_]+)(?:\s*[=:：]\s*|\s+)(\"[^\"]*\"|'[^']*'|“[^”]*”|\S+)?",
)
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
    for match in _OPTION.finditer(text):
        name = match.group(1).lower()
        value = (match.group(2) or "").strip("\"'“”")
        key = _ALIASES.get(name)
        if key is None:
            raise errors.UnknownOptionError(f"unknown option {name}", option="--" + name)
        if not value:
            raise errors.BadOptionError(f"--{name} without value", option=key, value="")
        raw[key] = value
    prompt = _OPTION.sub(" ", text)
    prompt = re.sub(r"[ \t]+", " ", prompt).strip()
    # A stray "--word" with no value left in the prompt is an option typo, not prose.
    stray = re.search(r"(?:^|\s)--([A-Za-z]\w*)\s*$", prompt)
    if stray:
        name = stray.group(1)
        raise errors.UnknownOptionError(f"unknown option {name}", option="--" + name)
    for key, value in typed.items():
        if value is not None and value != "":
            raw[_ALIASES.get(key, key)] = str(value)

    size = parse_size(raw.get("size"), model, default=default_size)
    n = 1
    if "n" in raw:
        try:
            n = int(raw["n"])
        except ValueError:
            raise errors.BadOptionError(f"n={raw['n']}", option="n", value=raw["n"]) from None
        if not 1 <= n <= max_n:
            raise errors.BadOptionError(f"n={n}", option="n", value=f"{n} (1-{max_n})")
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
    return ImageOptions(prompt, size, n, quality, output_format, background)
