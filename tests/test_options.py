"""Parsing `/draw` arguments."""

from __future__ import annotations

import pytest

from bot import errors
from plugins.options import parse_image_args
from plugins.registry import DRAW, EDIT, split_command


def parse(text: str, **typed: object):  # type: ignore[no-untyped-def]
    return parse_image_args(text, typed, model="gpt-image-2", default_size="1024x1024", max_n=4)


def test_prompt_and_options_are_separated() -> None:
    opts = parse("a red fox --size 16:9 --n 2 --quality high --format webp")
    assert opts.prompt == "a red fox"
    assert str(opts.size) and opts.size is not None and opts.size.width > opts.size.height
    assert (opts.n, opts.quality, opts.output_format) == (2, "high", "webp")


def test_phone_dashes_and_equals_are_accepted() -> None:
    opts = parse("一只猫 —size=9:16 —n 2")
    assert opts.prompt == "一只猫"
    assert opts.size is not None and opts.size.height > opts.size.width
    assert opts.n == 2


def test_hyphens_inside_the_prompt_are_prose() -> None:
    assert parse("a well-known fox -like creature").prompt == "a well-known fox -like creature"


def test_typed_options_win() -> None:
    opts = parse("a fox --n 1", n=3, size="2k")
    assert opts.n == 3
    assert str(opts.size) == "2048x2048"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("a fox --n 0", errors.BadOptionError),
        ("a fox --n 50", errors.BadOptionError),
        ("a fox --n two", errors.BadOptionError),
        ("a fox --quality ultra", errors.BadOptionError),
        ("a fox --format gif", errors.BadOptionError),
        ("a fox --style vivid", errors.UnknownOptionError),
        ("a fox --seed", errors.UnknownOptionError),
        ("a fox --size 1919x1079", errors.InvalidSizeError),
        ("a fox --size 99999x1", errors.InvalidSizeError),
        ("a fox --size banana", errors.InvalidSizeError),
    ],
)
def test_bad_options_raise_typed_errors(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse(text)


def test_split_command_handles_aliases_mentions_and_newlines() -> None:
    assert split_command("/draw@my_bot a fox") == (DRAW, "a fox")
    assert split_command("/画一只猫") == (DRAW, "一只猫")
    assert split_command("/改图 加个帽子") == (EDIT, "加个帽子")
    assert split_command("/draw\na fox\non two lines") == (DRAW, "a fox\non two lines")
    assert split_command("hello /draw") is None
    assert split_command("/unknown x") is None


def test_background_option_and_its_jpeg_conflict() -> None:
    assert parse("a sticker --bg transparent --format png").background == "transparent"
    assert parse("a sticker", background="opaque").background == "opaque"
    with pytest.raises(errors.BadOptionError):
        parse("a sticker --background glass")
    with pytest.raises(errors.BadOptionError):
        parse("a sticker --background transparent --format jpeg")


@pytest.mark.parametrize(
    ("text", "size", "prompt"),
    [
        ("a fox --size 16:9 4k", "3840x2160", "a fox"),
        ("a fox --size 4k 16:9 in snow", "3840x2160", "a fox in snow"),
        ("a fox —size 16：9 ２Ｋ --n 2", "2048x1152", "a fox"),
        ("a fox --size 16:9 nice", "1824x1024", "a fox nice"),
        ("a 4k fox --size 1536x1024 4k", "1536x1024", "a 4k fox 4k"),
    ],
)
def test_a_size_of_ratio_and_tier_is_read_whole_as_the_terminal_reads_it(
    text: str, size: str, prompt: str
) -> None:
    opts = parse(text)
    assert (str(opts.size), opts.prompt) == (size, prompt)


@pytest.mark.parametrize(
    ("text", "error", "suggestion"),
    [
        ("a fox --size 16:9 8k", errors.SizeTierError, "16:9 4k"),
        ("a fox --size 99:1", errors.SizeRatioError, "3:1"),
        ("a fox --size 4:1", errors.SizeRatioError, "3:1"),
        ("a fox --size abc", errors.SizeFormatError, "1024x1024"),
    ],
)
def test_sizes_are_refused_with_the_nearest_valid_choice(
    text: str, error: type[errors.InvalidSizeError], suggestion: str
) -> None:
    with pytest.raises(error) as caught:
        parse(text)
    assert caught.value.params["suggestion"] == suggestion


def test_whether_the_size_was_chosen_is_kept() -> None:
    assert parse("a fox").size_given is False
    assert parse("a fox --size 16:9").size_given is True
    assert parse("a fox", size="2k").size_given is True


def test_n_out_of_range_names_the_range() -> None:
    with pytest.raises(errors.BadOptionError) as caught:
        parse("a fox --n 9")
    assert caught.value.params == {"option": "n", "value": "9 (1-4)"}
