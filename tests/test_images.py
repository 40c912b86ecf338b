"""Reference preparation and previews, on images made with Pillow in the test."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from bot.errors import (
    ImageError,
    ImageTooLargeError,
    JobTooManyPixelsError,
    TooManyPixelsError,
    TooManyReferencesError,
    UnsupportedImageError,
)
from bot.images import (
    MAX_PIXELS,
    ImageInfo,
    extension_for_format,
    make_preview,
    mime_for_format,
    prepare_reference,
    prepare_references,
    probe,
    to_jpeg_partial,
)

RED = (220, 20, 20)
BLUE = (20, 20, 220)
MB = 1024 * 1024


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def solid(size: tuple[int, int], color: tuple[int, ...] = RED, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def noise(size: tuple[int, int], seed: int = 7) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))


def decode(data: bytes) -> Image.Image:
    img = Image.open(BytesIO(data))
    img.load()
    return img


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple), value
    return value


def close_to(pixel: tuple[int, ...], color: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, color, strict=False))


def png_header_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR says width x height (nothing that big is ever stored)."""
    data = bytearray(encode(solid((1, 1), (0,), "L"), "PNG"))
    # Signature (8) + length (4) + b"IHDR" (4), then width and height, then the CRC at 29.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --- probing and refusing ---


def test_probe_reports_format_size_and_animation() -> None:
    assert probe(encode(solid((40, 30)), "PNG")) == ImageInfo("PNG", 40, 30, False)
    assert probe(encode(solid((40, 30)), "JPEG")) == ImageInfo("JPEG", 40, 30, False)
    assert probe(encode(solid((40, 30)), "WEBP")) == ImageInfo("WEBP", 40, 30, False)


def test_probe_marks_an_animated_gif() -> None:
    frames = [solid((32, 32), RED), solid((32, 32), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert probe(data) == ImageInfo("GIF", 32, 32, True)


def test_phone_mpo_photo_is_a_still_jpeg() -> None:
    frames = [solid((64, 48), RED), solid((64, 48), BLUE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert probe(data) == ImageInfo("JPEG", 64, 48, False)


@pytest.mark.parametrize(
    "data",
    [
        b"just some text, not an image\n",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        b"",
    ],
    ids=["text", "pdf", "svg", "empty"],
)
def test_non_images_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedImageError):
        probe(data)


# BMP and TIFF are converted since people send them (tests/test_formats.py).
@pytest.mark.parametrize("fmt", ["ICO", "PPM", "PCX", "TGA"])
def test_real_images_in_other_formats_are_refused(fmt: str) -> None:
    with pytest.raises(UnsupportedImageError):
        probe(encode(solid((16, 16)), fmt))


def test_truncated_png_is_a_corrupt_image() -> None:
    data = encode(noise((64, 64)), "PNG")
    with pytest.raises(ImageError) as info:
        probe(data[: len(data) // 2])
    assert not isinstance(info.value, UnsupportedImageError | ImageTooLargeError)


def test_truncated_jpeg_is_a_corrupt_image() -> None:
    data = encode(noise((64, 64)), "JPEG")
    with pytest.raises(ImageError) as info:
        probe(data[: len(data) // 2])
    assert not isinstance(info.value, UnsupportedImageError | ImageTooLargeError)


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (30000, 30000),  # above twice Pillow's limit: Pillow itself raises
        (10000, 10000),  # between Pillow's warning and error: the warning must become an error
        (9000, 6000),  # above our limit, below Pillow's: only our own check catches it
    ],
)
def test_pixel_bombs_are_refused_without_decoding(width: int, height: int) -> None:
    data = png_header_claiming(width, height)
    assert len(data) < 200
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters_before = list(warnings.filters)
        started = time.monotonic()
        with pytest.raises(ImageTooLargeError) as info:
            probe(data)
        assert time.monotonic() - started < 1.0
        assert list(warnings.filters) == filters_before
    # Pillow's warning became our error instead of leaking out as a warning.
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert info.value.params["pixels"] == width * height
    assert info.value.params["limit"] == MAX_PIXELS
    # Pillow's global limit is left as it was.
    assert Image.MAX_IMAGE_PIXELS == pillow_limit


async def test_pixel_bomb_is_refused_by_prepare_reference_too() -> None:
    with pytest.raises(ImageTooLargeError):
        await prepare_reference(png_header_claiming(30000, 30000), 0, max_bytes=20 * MB)


# --- references ---


async def test_small_png_passes_through_byte_for_byte() -> None:
    data = encode(noise((100, 80)), "PNG")
    ref = await prepare_reference(data, 0, max_bytes=20 * MB)
    assert ref.data is data or ref.data == data
    assert (ref.filename, ref.mime, ref.width, ref.height) == ("ref1.png", "image/png", 100, 80)


async def test_jpeg_and_webp_pass_through_with_matching_names() -> None:
    jpeg = encode(noise((64, 64)), "JPEG", quality=85)
    webp = encode(noise((64, 64)), "WEBP")
    ref_jpeg = await prepare_reference(jpeg, 1, max_bytes=MB)
    ref_webp = await prepare_reference(webp, 2, max_bytes=MB)
    assert (ref_jpeg.data, ref_jpeg.filename, ref_jpeg.mime) == (jpeg, "ref2.jpg", "image/jpeg")
    assert (ref_webp.data, ref_webp.filename, ref_webp.mime) == (webp, "ref3.webp", "image/webp")


async def test_exif_orientation_is_applied_and_metadata_dropped() -> None:
    # 200x100, red on the left, blue on the right; orientation 6 = rotate 90 degrees clockwise.
    img = solid((200, 100), RED)
    img.paste(solid((100, 100), BLUE), (100, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "SecretCam"  # Make
    data = encode(img, "JPEG", exif=exif, quality=95)

    ref = await prepare_reference(data, 0, max_bytes=20 * MB)

    assert ref.data != data
    assert (ref.width, ref.height) == (100, 200)
    out = decode(ref.data)
    assert out.format == "JPEG" and out.size == (100, 200)
    assert close_to(pixel(out, (50, 20)), RED)  # the left side is now on top
    assert close_to(pixel(out, (50, 180)), BLUE)
    assert b"SecretCam" not in ref.data
    assert 0x0112 not in out.getexif()


async def test_animated_gif_uses_its_first_frame() -> None:
    frames = [solid((48, 48), RED), solid((48, 48), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    ref = await prepare_reference(data, 0, max_bytes=MB)
    out = decode(ref.data)
    assert ref.filename == "ref1.jpg" and out.format == "JPEG"
    assert getattr(out, "n_frames", 1) == 1
    assert close_to(pixel(out, (24, 24)), RED)


async def test_palette_png_with_transparency_stays_transparent_png() -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 32, 64))  # left half red, right half palette index 0 = transparent
    data = encode(img, "PNG", transparency=0)
    # A max_edge below the size forces re-encoding instead of pass-through.
    ref = await prepare_reference(data, 0, max_bytes=MB, max_edge=32)
    out = decode(ref.data)
    assert (ref.filename, ref.mime, out.format, out.mode) == (
        "ref1.png",
        "image/png",
        "PNG",
        "RGBA",
    )
    assert out.size == (32, 32)
    assert pixel(out, (4, 16))[3] == 255
    assert pixel(out, (28, 16))[3] == 0


async def test_opaque_alpha_channel_is_dropped_to_jpeg() -> None:
    data = encode(noise((600, 600)).convert("RGBA"), "PNG")
    ref = await prepare_reference(data, 0, max_bytes=len(data) // 2)
    assert ref.filename == "ref1.jpg" and decode(ref.data).mode == "RGB"


async def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    data = encode(solid((64, 64), (0, 255, 255, 0), "CMYK"), "JPEG")
    ref = await prepare_reference(data, 0, max_bytes=MB)
    out = decode(ref.data)
    assert out.mode == "RGB" and close_to(pixel(out, (10, 10)), (255, 0, 0), tolerance=60)


async def test_sixteen_bit_grey_png_keeps_its_tones() -> None:
    data = encode(Image.new("I;16", (64, 64), 30000), "PNG")
    ref = await prepare_reference(data, 0, max_bytes=MB)
    grey = decode(ref.data).getpixel((10, 10))
    assert isinstance(grey, tuple)
    assert close_to(grey, (117, 117, 117), tolerance=3)


async def test_big_noisy_image_is_shrunk_under_a_small_budget() -> None:
    data = encode(noise((1600, 1200)), "PNG")
    assert len(data) > 5 * MB
    budget = 150_000
    ref = await prepare_reference(data, 0, max_bytes=budget)
    assert len(ref.data) <= budget
    out = decode(ref.data)
    assert out.format == "JPEG" and ref.filename == "ref1.jpg" and ref.mime == "image/jpeg"
    assert (ref.width, ref.height) == out.size
    assert out.width < 1600 and out.width / out.height == pytest.approx(4 / 3, rel=0.02)


async def test_oversized_edges_are_scaled_down_to_max_edge() -> None:
    data = encode(noise((900, 300)), "JPEG")
    ref = await prepare_reference(data, 0, max_bytes=20 * MB, max_edge=600)
    assert (ref.width, ref.height) == (600, 200)
    assert decode(ref.data).size == (600, 200)


async def test_big_jpeg_decodes_small_and_lands_near_the_max_edge() -> None:
    # 2000 px over a 1000 px edge: DCT scaling decodes it at half size, turned upright.
    img = solid((2000, 1000), RED)
    img.paste(solid((1000, 1000), BLUE), (1000, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    ref = await prepare_reference(encode(img, "JPEG", exif=exif), 0, max_bytes=MB, max_edge=1000)
    out = decode(ref.data)
    assert out.size == (ref.width, ref.height) == (500, 1000)
    assert close_to(pixel(out, (250, 100)), RED) and close_to(pixel(out, (250, 900)), BLUE)


async def test_image_a_little_over_the_edge_is_resized_to_exactly_the_edge() -> None:
    # 1500 px over 1000: no whole factor lands within 10% of the edge, so Lanczos does it.
    ref = await prepare_reference(
        encode(noise((1500, 600)), "PNG"), 0, max_bytes=20 * MB, max_edge=1000
    )
    assert (ref.width, ref.height) == (1000, 400)


async def test_transparent_png_is_reduced_with_its_alpha_intact() -> None:
    # Wider than tall, far over the edge: reduced by a whole factor, strip by strip.
    img = Image.new("RGBA", (4000, 600), (0, 0, 0, 0))
    img.paste(solid((1998, 600), RED).convert("RGBA"), (2002, 0))
    ref = await prepare_reference(encode(img, "PNG"), 0, max_bytes=MB, max_edge=1000)
    out = decode(ref.data)
    assert (out.format, out.mode, out.size) == ("PNG", "RGBA", (1000, 150))
    assert pixel(out, (100, 75))[3] == 0
    assert pixel(out, (900, 75)) == (*RED, 255)
    # Output column 500 covers two clear and two red columns: half see-through, and still
    # red, not darkened by the clear pixels' black (the reduce averages premultiplied).
    edge = pixel(out, (500, 75))
    assert 120 <= edge[3] <= 135 and close_to(edge[:3], RED, tolerance=4), edge


async def test_impossible_budget_gives_up_with_image_too_large() -> None:
    data = encode(noise((300, 300)), "PNG")
    with pytest.raises(ImageTooLargeError) as info:
        await prepare_reference(data, 4, max_bytes=300)
    assert info.value.params["index"] == 5


async def test_references_keep_their_order_and_names() -> None:
    images = [encode(solid((10 + i, 10)), "PNG") for i in range(3)]
    refs = await prepare_references(images, max_count=4, max_bytes=MB)
    assert [r.filename for r in refs] == ["ref1.png", "ref2.png", "ref3.png"]
    assert [r.width for r in refs] == [10, 11, 12]


async def test_too_many_references_are_refused() -> None:
    images = [encode(solid((8, 8)), "PNG")] * 5
    with pytest.raises(TooManyReferencesError) as info:
        await prepare_references(images, max_count=4, max_bytes=MB)
    assert info.value.params == {"count": 5, "limit": 4}


async def test_a_bad_reference_is_reported_with_its_position() -> None:
    images = [encode(solid((8, 8)), "PNG"), b"not an image"]
    with pytest.raises(UnsupportedImageError) as info:
        await prepare_references(images, max_count=4, max_bytes=MB)
    assert info.value.params["index"] == 2


async def test_edit_over_the_pixel_budget_is_refused_before_decoding() -> None:
    # Headers claiming 7000x7000 (49 MP, under the per-image limit) with no pixel data: any
    # decode would fail as corrupt, so only a refusal from the headers gives this error.
    claims = [png_header_claiming(7000, 7000)] * 3
    images = [encode(solid((64, 48)), "PNG"), *claims]
    with pytest.raises(JobTooManyPixelsError) as info:
        await prepare_references(images, max_count=16, max_bytes=MB, max_total_pixels=100_000_000)
    assert info.value.params["count"] == 4
    assert (info.value.params["megapixels"], info.value.params["limit_mp"]) == (147, 100)
    # Within the budget the same images are decoded, and the first claim fails as corrupt.
    with pytest.raises(ImageError) as decoded:
        await prepare_references(images, max_count=16, max_bytes=MB, max_total_pixels=10**9)
    assert not isinstance(decoded.value, ImageTooLargeError)
    assert decoded.value.params["index"] == 2


async def test_pixel_bomb_after_good_references_is_refused_before_any_decode() -> None:
    images = [encode(solid((64, 48)), "PNG"), png_header_claiming(30000, 30000)]
    with pytest.raises(TooManyPixelsError) as info:
        await prepare_references(images, max_count=16, max_bytes=MB)
    assert info.value.params["index"] == 2
    assert info.value.params["pixels"] == 900_000_000


_PEAK_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from io import BytesIO
    from PIL import Image
    from bot.images import prepare_references

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    # Phone photos held sideways (EXIF orientation 6): each must be decoded and turned.
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = BytesIO()
    Image.new("RGB", (3000, 2000), (200, 120, 40)).save(buf, "JPEG", exif=exif)
    images = [bytes(bytearray(buf.getvalue())) for _ in range(16)]
    asyncio.run(asyncio.sleep(0))
    base = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak mark starts again from here
    refs = asyncio.run(prepare_references(images, max_count=16, max_bytes=2**20))
    print(json.dumps({"peak": peak() - base, "sizes": [[r.width, r.height] for r in refs]}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_sixteen_large_references_are_decoded_one_at_a_time() -> None:
    # 16 photos of 6 MP: 24 MB each decoded (Pillow keeps RGB in 4 bytes a pixel), 384 MB
    # together. Measured in a fresh process: the peak RSS of the call above the RSS before it.
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    result = json.loads(done.stdout)
    assert result["sizes"] == [[2000, 3000]] * 16
    decoded_one = 3000 * 2000 * 4
    # One decoded photo and its turned copy, and slack; all at once would be 16 of each (the
    # old code held about 6 at a time here, one per pool thread, each with two copies).
    assert result["peak"] < 4 * decoded_one, result["peak"] / MB


async def test_names_always_match_the_encoded_bytes() -> None:
    cases = [
        encode(noise((64, 64)), "PNG"),
        encode(noise((64, 64)), "WEBP"),
        encode(noise((64, 64)), "GIF"),
        encode(noise((200, 200)).convert("RGBA"), "PNG"),
        encode(noise((200, 200)), "JPEG"),
    ]
    for data in cases:
        for max_edge in (4096, 50):
            ref = await prepare_reference(data, 0, max_bytes=MB, max_edge=max_edge)
            fmt = probe(ref.data).format
            assert ref.filename == f"ref1.{extension_for_format(fmt)}"
            assert ref.mime == mime_for_format(fmt)


# --- previews ---


async def test_preview_fits_the_byte_budget_and_edge() -> None:
    data = encode(noise((3000, 2000)), "PNG")
    preview = await make_preview(data, max_bytes=200_000)
    out = decode(preview)
    assert len(preview) <= 200_000
    assert out.format == "JPEG" and max(out.size) <= 2560


async def test_preview_flattens_transparency_on_white() -> None:
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    img.paste(solid((32, 64), RED).convert("RGBA"), (0, 0))
    preview = await make_preview(encode(img, "PNG"), max_bytes=MB)
    out = decode(preview)
    assert out.mode == "RGB"
    assert close_to(pixel(out, (50, 32)), (255, 255, 255), tolerance=10)
    assert close_to(pixel(out, (10, 32)), RED)


async def test_preview_can_be_webp() -> None:
    preview = await make_preview(encode(noise((500, 400)), "PNG"), max_bytes=MB, fmt="webp")
    assert decode(preview).format == "WEBP"


async def test_preview_refuses_formats_it_cannot_make() -> None:
    with pytest.raises(ValueError):
        await make_preview(encode(solid((8, 8)), "PNG"), max_bytes=MB, fmt="PNG")


async def test_partial_preview_is_a_small_jpeg() -> None:
    partial = await to_jpeg_partial(encode(noise((2048, 1152)).convert("RGBA"), "PNG"))
    out = decode(partial)
    assert out.format == "JPEG" and out.size == (1024, 576)


def test_format_names_map_to_mime_and_extension() -> None:
    assert [mime_for_format(f) for f in ("PNG", "jpeg", "JPG", "WEBP")] == [
        "image/png",
        "image/jpeg",
        "image/jpeg",
        "image/webp",
    ]
    assert [extension_for_format(f) for f in ("PNG", "JPEG", "WEBP", "GIF")] == [
        "png",
        "jpg",
        "webp",
        "gif",
    ]
    with pytest.raises(UnsupportedImageError):
        mime_for_format("BMP")
