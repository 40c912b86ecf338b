"""Reference images in, previews out: Pillow behind a safety fence.

Every image comes from a user, so decoding is treated as hostile: only the formats in
`ALLOWED_FORMATS` are opened, the pixel count is checked against our own `MAX_PIXELS` before
anything is decoded, and Pillow's decompression-bomb warning is turned into an error. Pillow's
global settings are never changed; the one thing added to it is the HEIF reader (pillow-heif),
registered at import.

Besides what the image API takes (PNG, JPEG, WebP), people send GIFs, iPhone photos as files
(HEIC), AVIF, BMP and TIFF: these are converted on receipt, to PNG when the pixels fit the
provider's byte limit losslessly, else to JPEG (PNG with transparency). An SVG is refused with
its own message: it is a drawing to render, not a picture to decode.

Memory is spent one image at a time: `prepare_references` reads every header first (the
per-image limit and the job's total pixel budget are checked before any decode), then
prepares the references one after another, each freed before the next. An image larger
than needed is decoded small where the format allows (JPEG DCT scaling via `draft`) and
otherwise reduced by a whole factor first, so no full-size copy is made besides the decode.

The sync work (`probe` and the `_..._sync` functions) is CPU-bound; the async functions run
it in `asyncio.to_thread` so the event loop keeps serving chats meanwhile.
"""

from __future__ import annotations

import asyncio
import math
import re
import struct
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Final

import pillow_heif
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from bot.errors import (
    DrawbridgeError,
    ImageError,
    ImageTooLargeError,
    JobTooManyPixelsError,
    SvgImageError,
    TooManyPixelsError,
    TooManyReferencesError,
    UnsupportedImageError,
)

# Registers the "HEIF" format (HEIC and HEIF files); AVIF is Pillow's own.
pillow_heif.register_heif_opener()

ALLOWED_FORMATS: Final = ("PNG", "JPEG", "WEBP", "GIF", "HEIF", "AVIF", "BMP", "TIFF")
"""Pillow format names we open; the last four are always converted (see `CONVERTED_FORMATS`)."""
CONVERTED_FORMATS: Final = frozenset({"HEIF", "AVIF", "BMP", "TIFF"})
"""Formats the image API does not take: made PNG on receipt (JPEG when PNG cannot fit)."""
MAX_PIXELS: Final = 52_000_000
"""Our decompression-bomb limit, below Pillow's own (89 M pixels warns, 179 M raises).

Just above the full-resolution photos of current phones (48 MP 8064x6048, 50 MP 8160x6144),
which must work; one such photo decodes to at most ~210 MB (PNG or WebP; a JPEG decodes at
half size, ~50 MB), and references are decoded one at a time.
"""

MB: Final = 1024 * 1024

# Formats the image API takes as they are; a GIF is always re-encoded.
_PASS_THROUGH_MODES: Final[dict[str, frozenset[str]]] = {
    "PNG": frozenset({"RGB", "RGBA", "L", "LA", "P"}),
    "JPEG": frozenset({"RGB", "L"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
}
_MIME: Final = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_EXT: Final = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}
# ISO base media boxes (HEIF, AVIF) that hold the image properties: meta > iprp > ipco > ispe.
_ISOBMFF_PATH: Final = (b"meta", b"iprp", b"ipco")
_ISOBMFF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}
)
# How far into a file an SVG's root element may start (after an XML declaration, comments
# and a doctype).
_SVG_SNIFF_BYTES: Final = 4096
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
# A reference may come out up to 10% under the provider's max edge when that lets it be
# decoded (JPEG) or reduced by a whole factor: a 7744 px photo becomes 3872 px from a
# quarter-size decode instead of a full decode, an 85 MB resampling pass and a 45 MB result.
_REFERENCE_NEAR: Final = 0.9
# Output rows per strip when reducing an image with alpha (see `_reduced`).
_REDUCE_STRIP_ROWS: Final = 128
# Modes that reduce() and resize() handle as they are; others are converted to RGB(A) first.
_RESIZABLE_MODES: Final = frozenset({"L", "LA", "RGB", "RGBA"})
_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

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

    `ImageInfo.format` is the file's own format, one of `ALLOWED_FORMATS`.

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
    is re-encoded without metadata (PNG when it has transparency, and HEIC/AVIF/BMP/TIFF when
    their pixels fit `max_bytes` as PNG; else JPEG) and shrunk until it fits `max_bytes`. An
    image over `max_edge` may come out up to 10% under it (a whole decode or reduce factor).
    Errors carry `index` (1-based) so the user knows which failed.
    """
    try:
        return await asyncio.to_thread(_prepare_reference_sync, data, index, max_bytes, max_edge)
    except ImageError as exc:
        exc.params.setdefault("index", index + 1)
        raise


async def prepare_references(
    images: Sequence[bytes],
    *,
    max_count: int,
    max_bytes: int,
    max_edge: int = 4096,
    max_total_pixels: int | None = None,
) -> list[Reference]:
    """Prepare several references one after another, keeping their order.

    Before decoding anything: raises `TooManyReferencesError` (params `count`, `limit`), then
    reads every header, raising `TooManyPixelsError` for one image over `MAX_PIXELS` (with its
    `index`) or `JobTooManyPixelsError` when all of them together declare more than
    `max_total_pixels` (None: no budget). Then each image is decoded, converted and freed
    before the next, so the memory needed is that of the largest image, not of all of them.

    The budget (`DRAWBRIDGE_MAX_JOB_PIXELS`) bounds the CPU time one /edit may take, which
    grows with the pixels decoded: ~0.9 s a 40 MP PNG, ~0.3 s a 50 MP photo JPEG on the
    bench VM. Its default, 832 MP, is sixteen images at `MAX_PIXELS`, so sixteen 50 MP phone
    photos always fit; the review's sixteen 40 MP PNGs are processed in ~235 MB
    (bench/edit_memory.py). Operators of small machines lower it.
    """
    if len(images) > max_count:
        raise TooManyReferencesError(
            f"{len(images)} references", count=len(images), limit=max_count
        )
    # One thread job for all of them: one per reference would let the pool hand them to
    # different threads, each keeping its own malloc arena full of freed image memory.
    return await asyncio.to_thread(
        _prepare_references_sync, images, max_bytes, max_edge, max_total_pixels
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
    img, info = _open_header(data)
    _decode(img)
    return img, info


def _open_header(data: bytes) -> tuple[ImageFile.ImageFile, ImageInfo]:
    """Read the header only and check the pixel count: nothing is decoded yet."""
    # HEIF/AVIF: our own reading of the declared size comes first, so a huge one is refused
    # before libheif or libavif parse the file (libavif refuses one past its own limit as
    # unidentifiable, which would tell the user the wrong thing).
    for width, height in _isobmff_extents(data):
        _check_pixels(width, height)
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
            if _looks_like_svg(data):
                raise SvgImageError("svg") from exc
            raise UnsupportedImageError("not an allowed image format") from exc
        except DrawbridgeError:
            raise
        except Exception as exc:
            # A header Pillow recognised but could not parse: hostile input gets one answer.
            raise ImageError(f"unreadable header: {type(exc).__name__}", reason="corrupt") from exc
    fmt = img.format or ""
    if fmt not in (*ALLOWED_FORMATS, "MPO"):
        raise UnsupportedImageError(f"format {fmt}", format=fmt)
    return img, ImageInfo("JPEG" if fmt == "MPO" else fmt, width, height, animated)


def _isobmff_extents(data: bytes) -> list[tuple[int, int]]:
    """Every size (`ispe`) a HEIF or AVIF file declares; empty for any other file.

    The primary image, its tiles, thumbnails and alpha planes each have one: the primary (or
    grid) is the largest, so checking them all checks it. Reads box headers only.
    """
    if data[4:8] != b"ftyp" or not any(
        data[i : i + 4] in _ISOBMFF_BRANDS for i in range(8, min(len(data), 64), 4)
    ):
        return []
    boxes = [(0, len(data))]
    for name in _ISOBMFF_PATH:
        found = [box for start, end in boxes for box in _boxes(data, start, end, name)]
        # `meta` is a full box: 4 bytes of version and flags before its children.
        boxes = [(start + 4, end) if name == b"meta" else (start, end) for start, end in found]
    extents = []
    for start, end in boxes:
        for body, body_end in _boxes(data, start, end, b"ispe"):
            if body_end - body >= 12:
                extents.append(struct.unpack(">II", data[body + 4 : body + 12]))
    return extents


def _boxes(data: bytes, start: int, end: int, name: bytes) -> list[tuple[int, int]]:
    """The bodies (start, end) of the boxes called `name` directly inside `data[start:end]`."""
    found = []
    while start + 8 <= end:
        size, kind = struct.unpack(">I4s", data[start : start + 8])
        header = 8
        if size == 1 and start + 16 <= end:
            (size,) = struct.unpack(">Q", data[start + 8 : start + 16])
            header = 16
        elif size == 0:
            size = end - start
        if size < header or start + size > end:
            break  # a corrupt box: the decoder will say so
        if kind == name:
            found.append((start + header, start + size))
        start += size
    return found


def _looks_like_svg(data: bytes) -> bool:
    head = data[:_SVG_SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<") and b"<svg" in head


def _decode(img: ImageFile.ImageFile) -> None:
    try:
        img.load()
    except Exception as exc:
        raise ImageError(f"undecodable image: {type(exc).__name__}", reason="corrupt") from exc


def _check_headers(images: Sequence[bytes], limit: int | None) -> None:
    """Every image's own checks, then the sum of the pixels they declare, before any decode."""
    total = 0
    for index, data in enumerate(images):
        try:
            _, info = _open_header(data)
        except ImageError as exc:
            exc.params.setdefault("index", index + 1)
            raise
        total += info.width * info.height
    if limit is not None and total > limit:
        raise JobTooManyPixelsError(
            f"{total} pixels in {len(images)} references",
            count=len(images),
            pixels=total,
            limit=limit,
            reason="job_pixels",
            megapixels=total // 1_000_000,
            limit_mp=limit // 1_000_000,
        )


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
    # The orientation was read from the file; `img` may be a reduced copy without its EXIF.
    method = _TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def _to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    """RGBA when any pixel is see-through, else RGB; keeps an RGB ICC profile.

    An image already in the wanted mode is returned as it is, not copied.
    """
    source_mode = img.mode
    if source_mode.startswith("I;16") or source_mode in ("I", "F"):
        # 16-bit greyscale would clip to white in a plain convert: scale it to 8 bits first.
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    wanted = "RGBA" if has_alpha else "RGB"
    out = img if img.mode == wanted else img.convert(wanted)
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


def _whole_factor(long_edge: int, max_edge: int, near: float) -> int:
    """The largest whole factor that keeps `long_edge` at least `near * max_edge`; >= 1."""
    return max(1, int(long_edge / (max_edge * near)))


def _draft(img: ImageFile.ImageFile, max_edge: int, near: float) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 size when that still fits (near) `max_edge`."""
    if img.format not in ("JPEG", "MPO"):
        return
    factor = _whole_factor(max(img.size), max_edge, near)
    if factor > 1:
        # draft picks the largest power-of-two scale that keeps both sides at least this.
        img.draft(None, (max(1, img.width // factor), max(1, img.height // factor)))


def _shrink(img: Image.Image, max_edge: int, near: float) -> Image.Image:
    """Within `max_edge`: first a cheap whole-factor reduce(), then Lanczos for the rest."""
    if max(img.size) <= max_edge:
        return img
    if img.mode not in _RESIZABLE_MODES or "transparency" in img.info:
        # Palette indices and colour keys cannot be averaged.
        img = _to_rgb_or_rgba(img)
    factor = _whole_factor(max(img.size), max_edge, near)
    if factor > 1:
        img = _reduced(img, factor)
    return _fit_edge(img, max_edge)


def _reduced(img: Image.Image, factor: int) -> Image.Image:
    """`img.reduce(factor)`, without a full-size copy for an image with alpha.

    Pillow reduces RGBA and LA through a premultiplied copy of the whole image; done strip by
    strip, that copy is one strip at a time. Strip heights are multiples of the factor, so
    every output pixel averages the same source pixels as one whole reduce() would.
    """
    if img.mode not in ("RGBA", "LA"):
        out = img.reduce(factor)
    else:
        width, height = img.size
        out = Image.new(img.mode, (-(-width // factor), -(-height // factor)))
        step = factor * _REDUCE_STRIP_ROWS
        for top in range(0, height, step):
            strip = img.crop((0, top, width, min(height, top + step))).reduce(factor)
            out.paste(strip, (0, top // factor))
    out.info["icc_profile"] = img.info.get("icc_profile")
    return out


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


def _decoded(data: bytes, max_edge: int, near: float) -> tuple[Image.Image, ImageInfo, int]:
    """Decode (small, where the format allows); also the EXIF orientation."""
    img, info = _open_header(data)
    if max(info.width, info.height) > max_edge:
        _draft(img, max_edge, near)
    _decode(img)
    return img, info, _orientation(img)


def _prepare_references_sync(
    images: Sequence[bytes], max_bytes: int, max_edge: int, max_total_pixels: int | None
) -> list[Reference]:
    _check_headers(images, max_total_pixels)
    references: list[Reference] = []
    for index, data in enumerate(images):
        try:
            # In turn: each decoded image is freed before the next is decoded.
            references.append(_prepare_reference_sync(data, index, max_bytes, max_edge))
        except ImageError as exc:
            exc.params.setdefault("index", index + 1)
            raise
    return references


def _prepare_reference_sync(data: bytes, index: int, max_bytes: int, max_edge: int) -> Reference:
    img, info, orientation = _decoded(data, max_edge, _REFERENCE_NEAR)
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
    # Shrink first: every later step (turn, convert, encode) then works on the small image.
    prepared = _to_rgb_or_rgba(_upright(_shrink(img, max_edge, _REFERENCE_NEAR), orientation))
    del img  # the full-size decode is not needed past this point
    lossless = info.format in CONVERTED_FORMATS and _fits_as_png(prepared, max_bytes)
    fmt = "PNG" if prepared.mode == "RGBA" or lossless else "JPEG"
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


def _fits_as_png(img: Image.Image, max_bytes: int) -> bool:
    """Whether a PNG of `img` is sure to fit `max_bytes`, known without encoding it.

    A PNG is never larger than its raw pixels plus a filter byte a row, zlib's and the chunks'
    framing (under 0.1%) and the colour profile; a photo too big for that becomes a JPEG
    rather than a PNG shrunk until it fits.
    """
    raw = img.width * img.height * len(img.getbands()) + img.height
    profile = len(img.info.get("icc_profile") or b"")
    return raw + raw // 1000 + profile + 1024 <= max_bytes


def _preview_sync(data: bytes, max_bytes: int, max_edge: int, fmt: str, quality: int) -> bytes:
    # Previews keep their exact edge (near = 1): a whole factor only where it lands above it.
    img, _, orientation = _decoded(data, max_edge, 1.0)
    prepared = _to_rgb_or_rgba(_upright(_shrink(img, max_edge, 1.0), orientation))
    del img
    if fmt == "JPEG":
        prepared = _flatten_on_white(prepared)
    out, _ = _encode_within(prepared, fmt, max_bytes, quality, _PREVIEW_MIN_QUALITY)
    return out
