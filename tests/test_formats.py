"""The formats people actually send: HEIC, AVIF, BMP and TIFF become references; SVG does not.

Every file is made here, with Pillow (BMP, TIFF, AVIF) and pillow-heif (HEIF/HEIC). The
pixel bombs are real files of each format whose header is edited to declare a huge size.
"""

from __future__ import annotations

import struct
from io import BytesIO

import pillow_heif
import pytest
from PIL import Image

from bot.chat import BytesImage, Invocation
from bot.errors import SvgImageError, TooManyPixelsError, UnsupportedImageError
from bot.i18n import t
from bot.images import (
    CONVERTED_FORMATS,
    MAX_PIXELS,
    ImageInfo,
    prepare_reference,
    prepare_references,
    probe,
)
from bot.mock_upstream import MockUpstream
from bot.services import Services
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat

MB = 1024 * 1024
FORMATS = ["HEIF", "AVIF", "BMP", "TIFF"]
LOSSLESS = {"BMP", "TIFF"}
RED = (220, 20, 20)
BLUE = (20, 20, 220)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def two_halves(size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """Red on the left, blue on the right: shows both the colours and which way is up."""
    img = Image.new(mode, size, RED)
    img.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return img


def noise(size: tuple[int, int]) -> Image.Image:
    return Image.frombytes(
        "RGB", size, bytes((i * 7919) % 251 for i in range(size[0] * size[1] * 3))
    )


def decode(data: bytes) -> Image.Image:
    img = Image.open(BytesIO(data))
    img.load()
    return img


def close_to(got: object, want: tuple[int, ...], tolerance: int = 12) -> bool:
    assert isinstance(got, tuple), got
    return all(abs(a - b) <= tolerance for a, b in zip(got, want, strict=False))


def declaring(data: bytes, width: int, height: int) -> bytes:
    """A HEIF/AVIF file made here, its one `ispe` (image spatial extents) box edited."""
    assert data.count(b"ispe") == 1
    at = data.index(b"ispe") + 8  # type, then version and flags, then width and height
    return data[:at] + struct.pack(">II", width, height) + data[at + 8 :]


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (4, 4), RED), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)  # BITMAPINFOHEADER width, height
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (4, 4), RED), "TIFF"))
    assert data[:4] == b"II*\x00"
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for n in range(count):
        entry = ifd + 2 + 12 * n
        (tag,) = struct.unpack("<H", data[entry : entry + 2])
        value = {256: width, 257: height}.get(tag)
        if value is not None:
            # Pillow writes both as one SHORT or LONG stored in the entry itself.
            data[entry + 2 : entry + 4] = struct.pack("<H", 4)
            data[entry + 8 : entry + 12] = struct.pack("<I", value)
    return bytes(data)


@pytest.fixture
def no_heif_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any decode libheif is asked for (there must be none for a refused file)."""
    calls: list[str] = []
    original = pillow_heif.HeifImageFile.load

    def load(self: object) -> object:
        calls.append("load")
        return original(self)  # type: ignore[arg-type]

    monkeypatch.setattr(pillow_heif.HeifImageFile, "load", load)
    return calls


# --- each format becomes a reference the image API takes ---


def test_the_converted_formats_are_the_ones_people_send() -> None:
    assert set(FORMATS) == CONVERTED_FORMATS


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_recognised_from_its_header(fmt: str) -> None:
    assert probe(encode(two_halves(), fmt)) == ImageInfo(fmt, 96, 64, False)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_each_format_becomes_a_png_reference(fmt: str) -> None:
    ref = await prepare_reference(encode(two_halves(), fmt), 0, max_bytes=20 * MB)

    assert (ref.filename, ref.mime, ref.width, ref.height) == ("ref1.png", "image/png", 96, 64)
    out = decode(ref.data)
    assert (out.format, out.mode, out.size) == ("PNG", "RGB", (96, 64))
    tolerance = 0 if fmt in LOSSLESS else 12
    assert close_to(out.getpixel((10, 32)), RED, tolerance)
    assert close_to(out.getpixel((86, 32)), BLUE, tolerance)


# A 32-bit BMP's fourth byte is officially unused: Pillow (like most readers) reads it as RGB.
@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "TIFF"])
async def test_transparent_images_stay_transparent(fmt: str) -> None:
    img = two_halves(mode="RGBA")
    img.paste((0, 0, 0, 0), (0, 0, 96, 16))  # a see-through band along the top
    ref = await prepare_reference(encode(img, fmt), 0, max_bytes=20 * MB)

    out = decode(ref.data)
    assert (ref.filename, out.format, out.mode) == ("ref1.png", "PNG", "RGBA")
    alpha = out.getchannel("A")
    assert alpha.getpixel((48, 4)) == 0
    assert alpha.getpixel((48, 40)) == 255


async def test_a_photo_too_big_for_a_lossless_png_becomes_a_jpeg_within_the_limit() -> None:
    # 400x300 of noise: 360 KB of raw pixels, more than the provider's 200 KB.
    data = encode(noise((400, 300)), "HEIF", quality=90)
    ref = await prepare_reference(data, 0, max_bytes=200 * 1024)

    assert (ref.filename, ref.mime) == ("ref1.jpg", "image/jpeg")
    assert len(ref.data) <= 200 * 1024
    assert decode(ref.data).format == "JPEG"


async def test_a_big_heic_is_shrunk_to_the_max_edge() -> None:
    data = encode(two_halves((1200, 800)), "HEIF")
    ref = await prepare_reference(data, 0, max_bytes=20 * MB, max_edge=600)
    assert (ref.width, ref.height) == (600, 400)
    assert close_to(decode(ref.data).getpixel((550, 200)), BLUE)


async def test_an_avif_held_sideways_is_turned_upright_like_a_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    for fmt in ("JPEG", "AVIF"):
        ref = await prepare_reference(encode(two_halves(), fmt, exif=exif), 0, max_bytes=MB)
        out = decode(ref.data)
        assert out.size == (64, 96), fmt
        assert close_to(out.getpixel((32, 10)), RED, 16), fmt
        assert close_to(out.getpixel((32, 86)), BLUE, 16), fmt


# --- pixel bombs: refused from the header, before any decode ---


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (9000, 6000),  # above our limit, below Pillow's and libheif's
        (100_000, 100_000),  # past libheif's own limit too
    ],
)
def test_a_heic_declaring_a_huge_size_is_refused_before_decoding(
    no_heif_decode: list[str], width: int, height: int
) -> None:
    # 128 px square: a whole number of coding blocks, so no clean-aperture box crops it.
    bomb = declaring(encode(Image.new("RGB", (128, 128), RED), "HEIF"), width, height)
    assert len(bomb) < 2000

    with pytest.raises(TooManyPixelsError) as info:
        probe(bomb)

    assert info.value.params["pixels"] == width * height
    assert info.value.params["limit"] == MAX_PIXELS
    assert no_heif_decode == []


def test_the_heic_bomb_would_otherwise_be_opened_at_its_declared_size() -> None:
    # The edit above is what a decoder sees: libheif takes the declared size at face value.
    bomb = declaring(encode(Image.new("RGB", (128, 128), RED), "HEIF"), 9000, 6000)
    assert Image.open(BytesIO(bomb)).size == (9000, 6000)


@pytest.mark.parametrize(("width", "height"), [(9000, 6000), (100_000, 100_000)])
def test_an_avif_declaring_a_huge_size_is_refused_as_too_big(width: int, height: int) -> None:
    bomb = declaring(encode(Image.new("RGB", (128, 128), RED), "AVIF"), width, height)
    with pytest.raises(TooManyPixelsError) as info:
        probe(bomb)
    # libavif alone would call the 100000 px one unidentifiable: the user is told the truth.
    assert info.value.params["pixels"] == width * height


@pytest.mark.parametrize(("width", "height"), [(9000, 6000), (30000, 30000)])
@pytest.mark.parametrize("make", [bmp_declaring, tiff_declaring], ids=["bmp", "tiff"])
def test_bmp_and_tiff_declaring_a_huge_size_are_refused(
    make: object, width: int, height: int
) -> None:
    assert callable(make)
    bomb = make(width, height)
    assert len(bomb) < 1000
    with pytest.raises(TooManyPixelsError) as info:
        probe(bomb)
    assert info.value.params["pixels"] == width * height


async def test_a_heic_bomb_after_good_references_is_refused_before_any_decode(
    no_heif_decode: list[str],
) -> None:
    good = encode(two_halves(), "HEIF")
    bomb = declaring(encode(Image.new("RGB", (128, 128), RED), "HEIF"), 9000, 6000)
    with pytest.raises(TooManyPixelsError) as info:
        await prepare_references([good, bomb], max_count=16, max_bytes=MB)
    assert info.value.params["index"] == 2
    assert no_heif_decode == []


# --- SVG: refused, with its own message ---

SVGS = [
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
    b'\xef\xbb\xbf<?xml version="1.0"?>\n<!-- made by hand -->\n'
    b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x">\n<SVG width="1" height="1"/>',
]


@pytest.mark.parametrize("data", SVGS, ids=["bare", "xml_declaration"])
def test_svg_is_refused_with_its_own_message(data: bytes) -> None:
    with pytest.raises(SvgImageError) as info:
        probe(data)
    assert isinstance(info.value, UnsupportedImageError)
    assert t("en", info.value.key).startswith("SVG is a drawing format, not a picture: send PNG")
    assert t("zh", info.value.key).startswith("SVG 是矢量绘图格式")


def test_other_xml_is_just_unsupported() -> None:
    with pytest.raises(UnsupportedImageError) as info:
        probe(b'<?xml version="1.0"?><html><body>hi</body></html>')
    assert not isinstance(info.value, SvgImageError)


# --- through /edit: what the user and the image API see ---


async def edit(services: Services, data: bytes, name: str) -> RecordingChat:
    chat = RecordingChat()
    inv = Invocation(
        platform="test",
        user_id="u1",
        chat_id="c1",
        command="edit",
        text="make it night",
        is_private=True,
        locale="en",
        references=(BytesImage(data, name),),
    )
    await dispatch(inv, chat, services)
    await services.jobs.wait_idle()
    return chat


async def test_an_edit_of_an_iphone_heic_sends_a_png_upstream(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await edit(services, encode(two_halves(), "HEIF"), "IMG_0001.HEIC")
    assert chat.results(), chat.texts()
    [ref] = mock_upstream.requests[-1].files
    assert (ref.filename, ref.content_type, ref.width, ref.height) == (
        "ref1.png",
        "image/png",
        96,
        64,
    )


async def test_an_edit_of_an_svg_is_refused_for_free_with_the_svg_message(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await edit(services, SVGS[0], "logo.svg")
    assert chat.last_text() == t("en", "error.svg_image")
    assert mock_upstream.requests == []
