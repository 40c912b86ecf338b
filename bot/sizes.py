"""Image sizes: what the user typed, what each model accepts, and the nearest valid size.

Pure functions, no I/O. Two families of models exist:

- flexible (gpt-image-2, and any model we do not know): any `WxH` with both sides divisible
  by 16, aspect ratio within 3:1, long edge <= 3840 and 655,360 <= W*H <= 8,294,400;
- fixed (gpt-image-1*, dall-e-3, dall-e-2): a short list of allowed sizes.

Users may type an explicit `WxH`, a ratio (`16:9`), a tier (`2k`), both (`16:9 4k`), a shape
word (`landscape`, `横图`) or `auto`. Ratios and tiers resolve to a size the model accepts;
a ratio beyond 3:1 (`99:1`), a tier that does not exist (`8k`) and an explicit `WxH` the
model would refuse are refused with the nearest valid choice, text that is no size at all with
the forms a size takes. `parse_size` is the one parser: chat options and the terminal use it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from bot.errors import InvalidSizeError, SizeFormatError, SizeRatioError, SizeTierError

MULTIPLE: Final = 16
MAX_RATIO: Final = 3.0
MAX_EDGE: Final = 3840
MIN_AREA: Final = 655_360
MAX_AREA: Final = 8_294_400

_FIXED_SIZES: Final[dict[str, tuple[tuple[int, int], ...]]] = {
    "gpt-image-1": ((1024, 1024), (1536, 1024), (1024, 1536)),
    "dall-e-3": ((1024, 1024), (1792, 1024), (1024, 1792)),
    "dall-e-2": ((256, 256), (512, 512), (1024, 1024)),
}
# DALL-E models predate `size=auto`; gpt-image models (and unknown ones) accept it.
_NO_AUTO_PREFIXES: Final = ("dall-e-",)

_TIERS: Final = ("1k", "2k", "4k")
# The longest edge of each tier but the last (`Size.tier`).
_TIER_LONG_EDGE: Final = {"1k": 1536, "2k": 2560}
_SHAPE_WORDS: Final[dict[str, tuple[float, float]]] = {
    "square": (1, 1),
    "landscape": (3, 2),
    "portrait": (2, 3),
    "方图": (1, 1),
    "横图": (3, 2),
    "竖图": (2, 3),
}

_DIMS_RE: Final = re.compile(r"(\d{1,6})x(\d{1,6})")
_NUM: Final = r"\d{1,5}(?:\.\d{1,3})?"
_SHAPE: Final = rf"(?:{_NUM}:{_NUM}|{'|'.join(_SHAPE_WORDS)})"
# Any number of k, so "8k" reads as a tier that does not exist rather than as garbage.
_TIER: Final = r"\d{1,2}k"
# Shape and tier in either order, joined by nothing, a space, `@`, `-`, `_`, `,` or `/`.
_SEP: Final = r"[ @\-_,/]?"
_SHAPE_TIER_RE: Final = re.compile(
    rf"(?P<s1>{_SHAPE})(?:{_SEP}(?P<t1>{_TIER}))?|(?P<t2>{_TIER})(?:{_SEP}(?P<s2>{_SHAPE}))?"
)


@dataclass(frozen=True, slots=True)
class Size:
    """A concrete image size in pixels."""

    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def tier(self) -> str:
        """`1k`, `2k` or `4k`, by the long edge (<= 1536, <= 2560, above)."""
        long_edge = max(self.width, self.height)
        if long_edge <= 1536:
            return "1k"
        if long_edge <= 2560:
            return "2k"
        return "4k"


def is_flexible_model(model: str) -> bool:
    """True when the model takes any size within the gpt-image-2 rules (unknown models too)."""
    return _fixed_sizes(model) is None


def parse_size(text: str | None, model: str, default: str = "1024x1024") -> Size | None:
    """Turn what a user typed into a size the model accepts; None means `auto`.

    Empty text parses `default`. Raises `InvalidSizeError` (params `size`, `suggestion`, and
    `rule` when a rule was broken) for text that is not a size, or an explicit `WxH` the model
    refuses.
    """
    if text is None or not text.strip():
        text = default
    # Most commands give no size or one of a few: each is parsed once (a Size is immutable;
    # a refusal is not cached, so it is raised afresh every time).
    return _parse_size(text, model, default)


@lru_cache(maxsize=512)
def _parse_size(text: str, model: str, default: str) -> Size | None:
    norm = _normalise(text)
    if norm == "auto":
        if _allows_auto(model):
            return None
        raise InvalidSizeError(
            "auto not supported", size=text, suggestion=str(_SAFE_DEFAULT), rule="auto"
        )
    dims = _DIMS_RE.fullmatch(norm)
    if dims:
        size = Size(int(dims.group(1)), int(dims.group(2)))
        validate_size(size, model)
        return size
    shape_tier = _SHAPE_TIER_RE.fullmatch(norm)
    if shape_tier is None:
        raise SizeFormatError(
            "unparseable size", size=text, suggestion=_suggestion_for_garbage(model, default)
        )
    typed_shape = shape_tier.group("s1") or shape_tier.group("s2")
    typed_tier = shape_tier.group("t1") or shape_tier.group("t2")
    shape = typed_shape or "1:1"
    tier = typed_tier or "1k"
    if tier not in _TIERS:
        nearest = _nearest_tier(tier)
        raise SizeTierError(
            f"no tier {tier}",
            size=text,
            tier=tier,
            largest=_TIERS[-1],
            suggestion=f"{typed_shape} {nearest}" if typed_shape else nearest,
        )
    ratio = _shape_ratio(shape)
    if ratio is None:
        raise SizeFormatError(
            "zero in ratio", size=text, suggestion=_suggestion_for_garbage(model, default)
        )
    if max(ratio, 1 / ratio) > MAX_RATIO * (1 + 1e-9):
        # Nobody asking for 99:1 wants 3:1 without being told: refuse, naming the nearest.
        widest = _ratio_text(MAX_RATIO if ratio > 1 else 1 / MAX_RATIO)
        if is_flexible_model(model):
            suggestion = f"{widest} {typed_tier}" if typed_tier else widest
        else:
            suggestion = str(_size_for(ratio, tier, model))
        raise SizeRatioError(
            f"ratio {shape} beyond {_ratio_text(MAX_RATIO)}",
            size=text,
            suggestion=suggestion,
            limit=_ratio_text(MAX_RATIO),
            rule="ratio",
        )
    return _size_for(ratio, tier, model)


def size_for_reference(width: int, height: int, model: str, default: str = "1024x1024") -> Size:
    """The size an edit without `--size` draws: the reference's shape, at the default's tier.

    The shape is kept as closely as the model allows (a 4:1 panorama becomes 3:1; a fixed
    model takes its closest shape). The tier is the default size's (1k when the default is
    `auto` or not valid), so on a flexible model keeping the shape never changes what the
    edit costs (a fixed model's sizes are what they are, as for `--size`).
    """
    try:
        base = parse_size(default, model, default="1024x1024") if default.strip() else None
    except InvalidSizeError:
        base = None
    tier = base.tier if base is not None else "1k"
    size = _size_for(max(1, width) / max(1, height), tier, model)
    if size.tier == tier or not is_flexible_model(model):
        return size
    # A plain ratio at 1k may reach a 2k long edge (16:9 is 1824x1024): the tier's own
    # longest edge instead, so the price is the default size's. (A fixed model has its few
    # sizes, whatever their tier.)
    long_edge = float(_TIER_LONG_EDGE[tier])
    ratio = size.width / size.height
    if ratio >= 1:
        return _fit(long_edge, long_edge / ratio)
    return _fit(long_edge * ratio, long_edge)


def validate_size(size: Size, model: str) -> None:
    """Raise `InvalidSizeError` when `model` would refuse `size`.

    `params["rule"]` says which rule failed: for flexible models one of `edge`, `ratio`,
    `area_large`, `area_small`, `multiple_of_16` (checked in that order, so the shape problems
    come before the rounding one); for fixed models `allowed_sizes` (with `allowed` listing
    them). `params["suggestion"]` is the nearest valid size.
    """
    fixed = _fixed_sizes(model)
    if fixed is not None:
        if (size.width, size.height) in fixed:
            return
        raise InvalidSizeError(
            f"{size} not allowed for {model}",
            size=str(size),
            suggestion=str(nearest_valid_size(size.width, size.height, model)),
            rule="allowed_sizes",
            allowed=", ".join(f"{w}x{h}" for w, h in fixed),
        )
    rule = _broken_rule(size.width, size.height)
    if rule is None:
        return
    raise InvalidSizeError(
        f"{size} breaks rule {rule}",
        size=str(size),
        suggestion=str(nearest_valid_size(size.width, size.height, model)),
        rule=rule,
    )


def nearest_valid_size(width: int, height: int, model: str) -> Size:
    """The valid size for `model` closest to `width` x `height`, keeping the shape if possible.

    Flexible models: the ratio is clamped to 3:1, the area and long edge into range, then both
    sides go to the nearest multiples of 16 that satisfy every rule. Fixed models: the allowed
    size of closest aspect ratio (then closest area).
    """
    width, height = max(1, width), max(1, height)
    fixed = _fixed_sizes(model)
    if fixed is not None:
        return _closest_fixed(width / height, width * height, fixed)
    return _fit(float(width), float(height))


def fallback_size(size: Size, model: str) -> Size | None:
    """For a 4K-tier size on a flexible model, the 2K size of the same shape; else None.

    Some relay groups fail on 4K and succeed on 2K; this is the size to retry with.
    """
    if not is_flexible_model(model) or size.tier != "4k":
        return None
    return _size_for(size.width / size.height, "2k", model)


# --- internals ---


def _normalise(text: str) -> str:
    # NFKC folds full-width digits, letters and `：` to ASCII; `×` and `*` are not folded.
    norm = unicodedata.normalize("NFKC", text).strip().lower()
    norm = norm.replace("×", "x").replace("*", "x")
    # Spaces around separators carry no meaning; a lone space still separates shape and tier
    # (so "16:9 2k" cannot read as "16:92k").
    norm = re.sub(r"\s+", " ", norm)
    return re.sub(r" ?([:x@\-_,/]) ?", r"\1", norm)


def _model_key(model: str) -> str:
    return model.strip().lower()


def _fixed_sizes(model: str) -> tuple[tuple[int, int], ...] | None:
    key = _model_key(model)
    for prefix, sizes in _FIXED_SIZES.items():
        if key.startswith(prefix):
            return sizes
    return None


def _allows_auto(model: str) -> bool:
    return not _model_key(model).startswith(_NO_AUTO_PREFIXES)


# In every fixed list and valid for flexible models: the suggestion when nothing better exists.
_SAFE_DEFAULT: Final = Size(1024, 1024)


def _suggestion_for_garbage(model: str, default: str) -> str:
    try:
        size = parse_size(default, model, default="1024x1024") if default.strip() else None
    except InvalidSizeError:
        size = None
    return str(size or _SAFE_DEFAULT)


def _nearest_tier(tier: str) -> str:
    """The largest existing tier not above `tier` (`8k` -> `4k`, `3k` -> `2k`, `0k` -> `1k`)."""
    wanted = int(tier[:-1])
    fitting = [t for t in _TIERS if int(t[:-1]) <= wanted]
    return fitting[-1] if fitting else _TIERS[0]


def _ratio_text(ratio: float) -> str:
    """`3:1` or `1:3` for 3.0 or 1/3 (whole numbers only, which is all this needs)."""
    return f"{round(ratio)}:1" if ratio >= 1 else f"1:{round(1 / ratio)}"


def _shape_ratio(shape: str) -> float | None:
    if shape in _SHAPE_WORDS:
        a, b = _SHAPE_WORDS[shape]
    else:
        left, right = shape.split(":")
        a, b = float(left), float(right)
    if a <= 0 or b <= 0:
        return None
    return a / b


def _size_for(ratio: float, tier: str, model: str) -> Size:
    """The valid size for `model` of aspect `ratio` (width / height) at `tier`."""
    fixed = _fixed_sizes(model)
    if fixed is not None:
        # Fixed models have no tiers worth the name: the closest shape wins.
        return _closest_fixed(ratio, 1024 * 1024, fixed)
    ratio = min(max(ratio, 1 / MAX_RATIO), MAX_RATIO)
    long_over_short = max(ratio, 1 / ratio)
    if tier == "1k":
        # Short edge 1024, but never so long that a plain ratio lands in the 4K tier.
        short = 1024.0
        long_ = min(short * long_over_short, 2048.0)
        short = long_ / long_over_short
    elif tier == "2k":
        long_ = 2048.0
        short = long_ / long_over_short
    else:
        long_ = float(MAX_EDGE)
        short = long_ / long_over_short
    width, height = (long_, short) if ratio >= 1 else (short, long_)
    return _fit(width, height)


def _fit(width: float, height: float) -> Size:
    """Nearest size satisfying the flexible rules to a real-valued target."""
    ratio = min(max(width / height, 1 / MAX_RATIO), MAX_RATIO)
    area = min(max(width * height, MIN_AREA), MAX_AREA)
    w = math.sqrt(area * ratio)
    h = math.sqrt(area / ratio)
    scale = min(1.0, MAX_EDGE / max(w, h))
    w, h = w * scale, h * scale
    target_ratio = w / h

    def distance(c: tuple[int, int]) -> tuple[float, float, int]:
        # Closest sides first; then the closer shape; then the larger image.
        sides = abs(c[0] - w) + abs(c[1] - h)
        return (sides, abs(math.log(c[0] / c[1] / target_ratio)), -c[0] * c[1])

    # Look at multiples of 16 around the target, widening until one passes every rule.
    base_w, base_h = round(w / MULTIPLE), round(h / MULTIPLE)
    for radius in range(2, 16):
        candidates = [
            (cw * MULTIPLE, ch * MULTIPLE)
            for cw in range(max(1, base_w - radius), base_w + radius + 1)
            for ch in range(max(1, base_h - radius), base_h + radius + 1)
        ]
        valid = [c for c in candidates if _broken_rule(*c) is None]
        if valid:
            return Size(*min(valid, key=distance))
    raise AssertionError(f"no valid size near {width}x{height}")  # pragma: no cover


def _broken_rule(width: int, height: int) -> str | None:
    if width <= 0 or height <= 0:
        return "ratio"
    if max(width, height) > MAX_EDGE:
        return "edge"
    if max(width, height) / min(width, height) > MAX_RATIO:
        return "ratio"
    area = width * height
    if area > MAX_AREA:
        return "area_large"
    if area < MIN_AREA:
        return "area_small"
    if width % MULTIPLE or height % MULTIPLE:
        return "multiple_of_16"
    return None


def _closest_fixed(ratio: float, area: float, sizes: tuple[tuple[int, int], ...]) -> Size:
    def distance(size: tuple[int, int]) -> tuple[float, float]:
        w, h = size
        return (abs(math.log((w / h) / ratio)), abs(math.log((w * h) / area)))

    return Size(*min(sizes, key=distance))
