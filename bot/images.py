"""Reference images in, previews out: Pillow behind a safety fence.

Every image comes from a user, so decoding is treated as hostile: only the formats in
`ALLOWED_FORMATS` are opened, the pixel count is checked against our own `MAX_PIXELS` before
anything is decoded, and Pillow's decompression-bomb warning is turned into an error. Pillow's
global settings are never changed.

The sync work (`probe` and the `_..._sync` functions) is CPU-bound; the async functions run
it in `asyncio.to_thread` so the event loop keeps serving chats meanwhile.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Final

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from bot.errors import (
    DrawbridgeError,
    ImageError,
    ImageTooLargeError,
    TooManyPixelsError,
    TooManyReferencesError,
    UnsupportedImageError,
)

ALLOWED_FORMATS: Final = ("PNG", "JPEG", "WEBP", "GIF")
MAX_PIXELS: Final = 40_000_000
"""Our decompression-bomb limit, below Pillow's own (89 M pixels warns, 179 M raises)."""

MB: Final = 1024 * 1024

# Formats the image API takes as they are; a GIF is always re-encoded.
_PASS_THROUGH_MODES: Final[dict[str, frozenset[str]]] = {
    "PNG": frozenset({"RGB", "RGBA", "L", "LA", "P"}),
    "JPEG": frozenset({"RGB", "L"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
}
_MIME: Final = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_EXT: Final = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}
# Modes whose ICC profile (if any) still describes the pixels after conversion to RGB(A).
_RGB_PROFILE_MODES: Final = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA"})

_REFERENCE_QUALITY: Final = 90
_REFERENCE_MIN_QUALITY: Final = 70
_PREVIEW_QUALITY: Final = 88
_PREVIEW_MIN_QUALITY: Final = 50
_PARTIAL_QUALITY: Final = 80
_PARTIAL_MAX_BYTES: Final = 2 * MB
_MAX_SHRINK_STEPS: Final = 12
_MIN_EDGE: Final = 64

# `warnings.catch_warnings` swaps process-wide filters; the lock keeps our own threads from
# restoring each other's filters out of order. Only the header parse runs under it.
_OPEN_LOCK: Final = threading.Lock()
_BOMB_PIXELS_RE: Final = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What an image is, as far as we accept it (MPO photos report `JPEG`)."""

    format: str
    width: int
    height: int
    animated: bool


@dataclass(frozen=True, slots=True)
class Reference:
    """A reference image ready to upload: the file name's extension matches the bytes."""

    data: bytes
    filename: str
    mime: str
    width: int
    height: int


def mime_for_format(fmt: str) -> str:
    """`image/png`, `image/jpeg`, `image/webp` or `image/gif` for a Pillow format name."""
    return _MIME[_canonical_format(fmt)]


def extension_for_format(fmt: str) -> str:
    """`png`, `jpg`, `webp` or `gif` for a Pillow format name."""
    return _EXT[_canonical_format(fmt)]


def probe(data: bytes) -> ImageInfo:
    """Identify and fully decode the first frame; sync (call it from a thread for big files).

    Raises `UnsupportedImageError` (not an image, or a format we refuse), `ImageTooLargeError`
    (more than `MAX_PIXELS`) or `ImageError` (corrupt or truncated).
    """
    _, info = _open_checked(data)
    return info


async def prepare_reference(
    data: bytes, index: int, *, max_bytes: int, max_edge: int = 4096
) -> Reference:
    """Make one user image fit for `/v1/images/edits`, named `ref{index+1}.{ext}`.

    PNG/JPEG/WEBP already within limits and upright pass through byte for byte; anything else
    is re-encoded (PNG when it has transparency, else JPEG) without metadata and shrunk until
    it fits `max_bytes`. Errors carry `index` (1-based) so the user knows which image failed.
    """
    try:
        return await asyncio.to_thread(_prepare_reference_sync, data, index, max_bytes, max_edge)
    except ImageError as exc:
        exc.params.setdefault("index", index + 1)
        raise


async def prepare_references(
    images: Sequence[bytes], *, max_count: int, max_bytes: int
) -> list[Reference]:
    """Prepare several references concurrently, keeping their order.

    Raises `TooManyReferencesError` (params `count`, `limit`) before decoding anything.
    """
    if len(images) > max_count:
        raise TooManyReferencesError(
            f"{len(images)} references", count=len(images), limit=max_count
        )
    return list(
        await asyncio.gather(
            *(prepare_reference(data, i, max_bytes=max_bytes) for i, data in enumerate(images))
        )
    )


async def make_preview(
    data: bytes, *, max_bytes: int, max_edge: int = 2560, fmt: str = "JPEG"
) -> bytes:
    """Re-encode an image as JPEG or WEBP within `max_edge` and `max_bytes`.

    For platforms that cap photo uploads (Telegram 10 MB, Discord 10 MiB) while the original
    goes out as a file. Transparency is flattened on white for JPEG.
    """
    target = _canonical_format(fmt)
    if target not in ("JPEG", "WEBP"):
        raise ValueError(f"preview format must be JPEG or WEBP, not {fmt!r}")
    return await asyncio.to_thread(
        _preview_sync, data, max_bytes, max_edge, target, _PREVIEW_QUALITY
    )


async def to_jpeg_partial(data: bytes, max_edge: int = 1024) -> bytes:
    """A small JPEG of a partial (in-progress) image, for live previews."""
    return await asyncio.to_thread(
        _preview_sync, data, _PARTIAL_MAX_BYTES, max_edge, "JPEG", _PARTIAL_QUALITY
    )


# --- decoding ---


def _canonical_format(fmt: str) -> str:
    upper = fmt.strip().upper()
    if upper in ("JPG", "MPO"):
        return "JPEG"
    if upper not in _MIME:
        raise UnsupportedImageError(f"format {fmt}", format=fmt)
    return upper


def _open_checked(data: bytes) -> tuple[ImageFile.ImageFile, ImageInfo]:
    """Open, check the pixel count, then decode the first frame."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size
            _check_pixels(width, height)
            # MPO (phone photos with a depth map) is a JPEG with extra frames, not an animation.
            animated = img.format != "MPO" and bool(getattr(img, "is_animated", False))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = _BOMB_PIXELS_RE.search(str(exc))
            # Pillow's own limits are above ours, so "above ours" is true when it trips.
            pixels = int(found.group(1)) if found else MAX_PIXELS + 1
            raise TooManyPixelsError(
                f"{pixels} pixels",
                pixels=pixels,
                limit=MAX_PIXELS,
                reason="pixels",
                megapixels=pixels // 1_000_000,
                limit_mp=MAX_PIXELS // 1_000_000,
            ) from exc
        except UnidentifiedImageError as exc:
            raise UnsupportedImageError("not an allowed image format") from exc
        except DrawbridgeError:
            raise
        except Exception as exc:
            # A header Pillow recognised but could not parse: hostile input gets one answer.
            raise ImageError(f"unreadable header: {type(exc).__name__}", reason="corrupt") from exc
    fmt = img.format or ""
    if fmt not in (*ALLOWED_FORMATS, "MPO"):
        raise UnsupportedImageError(f"format {fmt}", format=fmt)
    try:
        img.load()
    except Exception as exc:
        raise ImageError(f"undecodable image: {type(exc).__name__}", reason="corrupt") from exc
    return img, ImageInfo(_canonical_format(fmt), width, height, animated)


def _check_pixels(width: int, height: int) -> None:
    pixels = width * height
    if pixels > MAX_PIXELS:
        raise TooManyPixelsError(
            f"{width}x{height}",
            pixels=pixels,
            limit=MAX_PIXELS,
            reason="pixels",
            megapixels=pixels // 1_000_000,
            limit_mp=MAX_PIXELS // 1_000_000,
        )


def _orientation(img: Image.Image) -> int:
    value = img.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# --- converting ---


def _upright(img: Image.Image, orientation: int) -> Image.Image:
    if orientation == 1:
        return img
    return ImageOps.exif_transpose(img)


def _to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    """RGBA when any pixel is see-through, else RGB; keeps an RGB ICC profile."""
    source_mode = img.mode
    if source_mode.startswith("I;16") or source_mode in ("I", "F"):
        # 16-bit greyscale would clip to white in a plain convert: scale it to 8 bits first.
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    out = img.convert("RGBA") if has_alpha else img.convert("RGB")
    if has_alpha and out.getchannel("A").getextrema() == (255, 255):
        out = out.convert("RGB")
    if source_mode not in _RGB_PROFILE_MODES:
        out.info.pop("icc_profile", None)
    return out


def _flatten_on_white(img: Image.Image) -> Image.Image:
    if img.mode != "RGBA":
        return img
    background = Image.new("RGB", img.size, (255, 255, 255))
    background.paste(img, mask=img.getchannel("A"))
    background.info["icc_profile"] = img.info.get("icc_profile")
    return background


def _fit_edge(img: Image.Image, max_edge: int) -> Image.Image:
    long_edge = max(img.size)
    if long_edge <= max_edge:
        return img
    return _scaled(img, max_edge / long_edge)


def _scaled(img: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    resized = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    resized.info["icc_profile"] = img.info.get("icc_profile")
    return resized


# --- encoding ---


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    # Nothing from `img.info` is written except the colour profile: EXIF (GPS, camera
    # serials), text chunks and comments are dropped.
    buf = BytesIO()
    extra: dict[str, object] = {}
    if icc := img.info.get("icc_profile"):
        extra["icc_profile"] = icc
    if fmt == "PNG":
        img.save(buf, "PNG", compress_level=6, **extra)
    elif fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality, optimize=True, **extra)
    else:
        img.save(buf, "WEBP", quality=quality, method=4, **extra)
    return buf.getvalue()


def _encode_within(
    img: Image.Image, fmt: str, max_bytes: int, quality: int, min_quality: int
) -> tuple[bytes, Image.Image]:
    """Encode, then lower the quality and shrink step by step until it fits `max_bytes`."""
    for _ in range(_MAX_SHRINK_STEPS):
        out = _encode(img, fmt, quality)
        if len(out) <= max_bytes:
            return out, img
        if min(img.size) <= _MIN_EDGE:
            break
        # Bytes grow roughly with the area: aim just under the budget, by 0.5x-0.9x per side.
        factor = min(0.9, max(0.5, math.sqrt(max_bytes / len(out)) * 0.95))
        img = _scaled(img, factor)
        quality = max(min_quality, quality - 5)
    raise ImageTooLargeError(
        f"cannot fit {max_bytes} bytes",
        size_mb=round(len(out) / MB, 1),
        limit_mb=round(max_bytes / MB, 1),
        reason="bytes",
    )


def _prepare_reference_sync(data: bytes, index: int, max_bytes: int, max_edge: int) -> Reference:
    img, info = _open_checked(data)
    orientation = _orientation(img)
    if (
        info.format in _PASS_THROUGH_MODES
        and img.format != "MPO"
        and img.mode in _PASS_THROUGH_MODES[info.format]
        and not info.animated
        and len(data) <= max_bytes
        and max(info.width, info.height) <= max_edge
        and orientation == 1
    ):
        return Reference(
            data=data,
            filename=f"ref{index + 1}.{extension_for_format(info.format)}",
            mime=mime_for_format(info.format),
            width=info.width,
            height=info.height,
        )
    prepared = _fit_edge(_to_rgb_or_rgba(_upright(img, orientation)), max_edge)
    fmt = "PNG" if prepared.mode == "RGBA" else "JPEG"
    out, final = _encode_within(
        prepared, fmt, max_bytes, _REFERENCE_QUALITY, _REFERENCE_MIN_QUALITY
    )
    return Reference(
        data=out,
        filename=f"ref{index + 1}.{extension_for_format(fmt)}",
        mime=mime_for_format(fmt),
        width=final.width,
        height=final.height,
    )


def _preview_sync(data: bytes, max_bytes: int, max_edge: int, fmt: str, quality: int) -> bytes:
    img, _ = _open_checked(data)
    prepared = _to_rgb_or_rgba(_upright(img, _orientation(img)))
    if fmt == "JPEG":
        prepared = _flatten_on_white(prepared)
    prepared = _fit_edge(prepared, max_edge)
    out, _ = _encode_within(prepared, fmt, max_bytes, quality, _PREVIEW_MIN_QUALITY)
    return out
