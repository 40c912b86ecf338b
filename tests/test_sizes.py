"""Sizes: parsing what users type, the model rules, nearest valid sizes and the 4K fallback."""

from __future__ import annotations

import random

import pytest

from bot.errors import InvalidSizeError, SizeFormatError, SizeRatioError, SizeTierError
from bot.i18n import t
from bot.sizes import (
    MAX_AREA,
    MAX_EDGE,
    MIN_AREA,
    Size,
    fallback_size,
    is_flexible_model,
    nearest_valid_size,
    parse_size,
    size_for_reference,
    validate_size,
)

GPT2 = "gpt-image-2"


def assert_valid_for_gpt2(size: Size) -> None:
    w, h = size.width, size.height
    assert w % 16 == 0 and h % 16 == 0, size
    assert max(w, h) / min(w, h) <= 3, size
    assert max(w, h) <= MAX_EDGE, size
    assert MIN_AREA <= w * h <= MAX_AREA, size


def test_size_prints_as_width_x_height() -> None:
    assert str(Size(1536, 1024)) == "1536x1024"


@pytest.mark.parametrize(
    ("size", "tier"),
    [
        (Size(1024, 1024), "1k"),
        (Size(1536, 1024), "1k"),
        (Size(1024, 1536), "1k"),
        (Size(2048, 1152), "2k"),
        (Size(2560, 1440), "2k"),
        (Size(2576, 1440), "4k"),
        (Size(3840, 2160), "4k"),
    ],
)
def test_tier_follows_the_long_edge(size: Size, tier: str) -> None:
    assert size.tier == tier


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16:9 4k", Size(3840, 2160)),
        ("9:16 4k", Size(2160, 3840)),
        ("16:9 2k", Size(2048, 1152)),
        ("1:1", Size(1024, 1024)),
        ("3:2", Size(1536, 1024)),
        ("2:3", Size(1024, 1536)),
        ("2k", Size(2048, 2048)),
        ("1k", Size(1024, 1024)),
        ("4k", Size(2880, 2880)),
        ("16:9", Size(1824, 1024)),
        ("2k 16:9", Size(2048, 1152)),
        ("16:9@4k", Size(3840, 2160)),
        ("16:9-2k", Size(2048, 1152)),
        ("16:9 @ 4K", Size(3840, 2160)),
        ("16：9", Size(1824, 1024)),
        ("１６：９ ２Ｋ", Size(2048, 1152)),
        ("  2K  ", Size(2048, 2048)),
        ("square", Size(1024, 1024)),
        ("Landscape", Size(1536, 1024)),
        ("portrait", Size(1024, 1536)),
        ("方图", Size(1024, 1024)),
        ("横图", Size(1536, 1024)),
        ("竖图", Size(1024, 1536)),
        ("横图 4k", Size(3520, 2352)),
        ("1536x1024", Size(1536, 1024)),
        ("1536X1024", Size(1536, 1024)),
        ("1536 × 1024", Size(1536, 1024)),
        ("1536*1024", Size(1536, 1024)),
        ("3840x2160", Size(3840, 2160)),
    ],
)
def test_parse_size_for_gpt_image_2(text: str, expected: Size) -> None:
    assert parse_size(text, GPT2) == expected


@pytest.mark.parametrize(
    "text",
    ["16:9", "9:16", "21:9", "9:21", "4:3", "3:4", "2:1", "1:2", "5:4", "2.35:1", "7:3"],
)
@pytest.mark.parametrize("tier", ["", " 1k", " 2k", " 4k"])
def test_every_ratio_and_tier_yields_a_valid_size(text: str, tier: str) -> None:
    size = parse_size(text + tier, GPT2)
    assert size is not None
    assert_valid_for_gpt2(size)
    validate_size(size, GPT2)


@pytest.mark.parametrize("text", ["16:9", "16:9 2k", "16:9 4k", "9:16 4k"])
def test_ratio_is_kept_within_one_percent(text: str) -> None:
    size = parse_size(text, GPT2)
    assert size is not None
    a, b = (int(x) for x in text.split()[0].split(":"))
    assert size.width / size.height == pytest.approx(a / b, rel=0.01)


def test_three_to_one_is_the_widest_ratio_drawn() -> None:
    wide = parse_size("3:1 2k", GPT2)
    tall = parse_size("1:3", GPT2)
    assert wide is not None and tall is not None
    assert_valid_for_gpt2(wide)
    assert_valid_for_gpt2(tall)
    assert wide.width / wide.height == pytest.approx(3, rel=0.02)
    assert tall.height / tall.width == pytest.approx(3, rel=0.02)


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [("99:1", "3:1"), ("4:1", "3:1"), ("10:1 2k", "3:1 2k"), ("1:4", "1:3"), ("1:10 4k", "1:3 4k")],
)
def test_ratios_beyond_three_to_one_are_refused_with_the_nearest_valid_ratio(
    text: str, suggestion: str
) -> None:
    with pytest.raises(SizeRatioError) as info:
        parse_size(text, GPT2)
    assert info.value.params["suggestion"] == suggestion
    assert info.value.params["limit"] == "3:1"
    assert info.value.kind == "invalid_size"
    assert parse_size(suggestion, GPT2) is not None
    for lang in ("en", "zh"):
        message = t(lang, info.value.key, **info.value.params)
        assert text in message and suggestion in message and "3:1" in message


def test_a_fixed_model_refuses_a_ratio_beyond_three_to_one_with_its_closest_size() -> None:
    with pytest.raises(SizeRatioError) as info:
        parse_size("4:1", "gpt-image-1")
    assert info.value.params["suggestion"] == "1536x1024"


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [("16:9 8k", "16:9 4k"), ("8k", "4k"), ("9:16@16k", "9:16 4k"), ("3k", "2k")],
)
def test_a_tier_that_does_not_exist_says_the_largest_is_4k(text: str, suggestion: str) -> None:
    with pytest.raises(SizeTierError) as info:
        parse_size(text, GPT2)
    assert info.value.params["suggestion"] == suggestion
    assert parse_size(suggestion, GPT2) is not None
    assert "4k" in t("en", info.value.key, **info.value.params)
    assert "4k" in t("zh", info.value.key, **info.value.params)
    assert "largest" in t("en", info.value.key, **info.value.params)
    assert "最大" in t("zh", info.value.key, **info.value.params)


@pytest.mark.parametrize("text", ["abc", "x", "1024x", "大图", "16:0"])
def test_text_that_is_no_size_shows_the_accepted_forms(text: str) -> None:
    with pytest.raises(SizeFormatError) as info:
        parse_size(text, GPT2)
    english = t("en", info.value.key, **info.value.params)
    chinese = t("zh", info.value.key, **info.value.params)
    for form in ("16:9", "4k", "16:9 4k", "1536x1024", "auto"):
        assert form in english and form in chinese
    assert text in english and text in chinese


@pytest.mark.parametrize(
    ("width", "height", "default", "expected"),
    [
        (300, 200, "1024x1024", Size(1536, 1024)),  # 3:2 photo, the default's 1k tier
        (200, 300, "1024x1024", Size(1024, 1536)),
        (4000, 3000, "1024x1024", Size(1360, 1024)),  # a big photo costs no more: still 1k
        (1600, 900, "16:9 2k", Size(2048, 1152)),  # the default's tier
        (4000, 1000, "1024x1024", Size(1536, 512)),  # 4:1 panorama: nearest valid, 3:1
        (1600, 900, "1024x1024", Size(1536, 864)),  # not 1824x1024: that is a 2k price
        (1000, 1000, "auto", Size(1024, 1024)),
    ],
)
def test_size_for_reference_keeps_the_shape_at_the_default_tier(
    width: int, height: int, default: str, expected: Size
) -> None:
    size = size_for_reference(width, height, GPT2, default)
    assert size == expected
    assert_valid_for_gpt2(size)


@pytest.mark.parametrize("default", ["1024x1024", "auto", "16:9 2k", "4k"])
def test_size_for_reference_never_changes_the_tier_so_never_the_price(default: str) -> None:
    wanted = parse_size(default, GPT2)
    tier = wanted.tier if wanted else "1k"
    rng = random.Random(7)
    for _ in range(500):
        w, h = rng.randint(1, 12000), rng.randint(1, 12000)
        size = size_for_reference(w, h, GPT2, default)
        assert_valid_for_gpt2(size)
        assert size.tier == tier, (w, h, size)
        shape = min(max(w / h, 1 / 3), 3)
        assert size.width / size.height == pytest.approx(shape, rel=0.04), (w, h, size)


def test_size_for_reference_on_a_fixed_model_takes_the_closest_shape() -> None:
    assert size_for_reference(300, 200, "gpt-image-1") == Size(1536, 1024)
    assert size_for_reference(1080, 1920, "dall-e-3") == Size(1024, 1792)


def test_four_k_square_respects_the_area_cap() -> None:
    assert parse_size("1:1 4k", GPT2) == Size(2880, 2880)


def test_auto_means_let_the_api_choose_for_gpt_image_models() -> None:
    assert parse_size("auto", GPT2) is None
    assert parse_size("AUTO", "gpt-image-1") is None


def test_auto_is_refused_for_dall_e() -> None:
    with pytest.raises(InvalidSizeError) as info:
        parse_size("auto", "dall-e-3")
    assert info.value.params["suggestion"] == "1024x1024"


@pytest.mark.parametrize("text", [None, "", "   "])
def test_empty_text_parses_the_default(text: str | None) -> None:
    assert parse_size(text, GPT2, default="16:9 2k") == Size(2048, 1152)
    assert parse_size(text, GPT2) == Size(1024, 1024)


@pytest.mark.parametrize(
    "text", ["abc", "8k", "1.5k", "16:0", "0:9", "16:9 8k", "x", "1024x", "大图"]
)
def test_unparseable_text_raises_with_a_valid_suggestion(text: str) -> None:
    with pytest.raises(InvalidSizeError) as info:
        parse_size(text, GPT2)
    assert info.value.params["size"] == text
    suggestion = parse_size(info.value.params["suggestion"], GPT2)
    assert suggestion is not None


def test_unparseable_text_suggests_the_configured_default() -> None:
    with pytest.raises(InvalidSizeError) as info:
        parse_size("huge", GPT2, default="1536x1024")
    assert info.value.params["suggestion"] == "1536x1024"


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("1919x1079", "multiple_of_16"),
        ("1920x1080", "multiple_of_16"),
        ("3840x1024", "ratio"),
        ("4096x2048", "edge"),
        ("512x512", "area_small"),
        ("3840x2560", "area_large"),
        ("99999x1", "edge"),
        ("0x1024", "ratio"),
    ],
)
def test_explicit_size_breaking_a_rule_names_the_rule(text: str, rule: str) -> None:
    with pytest.raises(InvalidSizeError) as info:
        parse_size(text, GPT2)
    assert info.value.params["rule"] == rule
    assert info.value.params["size"] == text
    suggestion = parse_size(info.value.params["suggestion"], GPT2)
    assert suggestion is not None
    assert_valid_for_gpt2(suggestion)


def test_odd_size_suggests_nearest_multiple_of_16_of_the_same_shape() -> None:
    with pytest.raises(InvalidSizeError) as info:
        parse_size("1919x1079", GPT2)
    assert info.value.params["suggestion"] in ("1920x1072", "1920x1088")


def test_absurd_width_suggests_a_three_to_one_size() -> None:
    suggestion = nearest_valid_size(99999, 1, GPT2)
    assert_valid_for_gpt2(suggestion)
    assert suggestion.width / suggestion.height > 2.8


def test_nearest_valid_size_keeps_valid_sizes_unchanged() -> None:
    for w, h in [(1024, 1024), (3840, 2160), (2048, 1152), (1280, 3840), (816, 816)]:
        assert nearest_valid_size(w, h, GPT2) == Size(w, h)


def test_nearest_valid_size_is_always_valid() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        w, h = rng.randint(1, 20000), rng.randint(1, 20000)
        size = nearest_valid_size(w, h, GPT2)
        assert_valid_for_gpt2(size)


def test_validate_size_accepts_the_common_gpt_image_2_sizes() -> None:
    for text in ["1024x1024", "1536x1024", "1024x1536", "2048x2048", "2048x1152", "3840x2160"]:
        w, h = (int(x) for x in text.split("x"))
        validate_size(Size(w, h), GPT2)


@pytest.mark.parametrize("model", ["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1:1", Size(1024, 1024)),
        ("16:9", Size(1536, 1024)),
        ("9:16 4k", Size(1024, 1536)),
        ("landscape", Size(1536, 1024)),
        ("2k", Size(1024, 1024)),
        ("1024x1536", Size(1024, 1536)),
    ],
)
def test_gpt_image_1_maps_to_its_three_sizes(model: str, text: str, expected: Size) -> None:
    assert not is_flexible_model(model)
    assert parse_size(text, model) == expected


@pytest.mark.parametrize(
    ("model", "text", "suggestion"),
    [
        ("gpt-image-1", "1920x1088", "1536x1024"),
        ("gpt-image-1", "2048x2048", "1024x1024"),
        ("gpt-image-1-mini", "1024x1792", "1024x1536"),
        ("dall-e-3", "1536x1024", "1792x1024"),
        ("dall-e-2", "2048x2048", "1024x1024"),
    ],
)
def test_fixed_models_refuse_other_explicit_sizes(model: str, text: str, suggestion: str) -> None:
    with pytest.raises(InvalidSizeError) as info:
        parse_size(text, model)
    assert info.value.params["suggestion"] == suggestion
    assert info.value.params["rule"] == "allowed_sizes"


def test_dall_e_models_map_ratios_to_their_sizes() -> None:
    assert parse_size("16:9", "dall-e-3") == Size(1792, 1024)
    assert parse_size("9:16", "dall-e-3") == Size(1024, 1792)
    assert parse_size("16:9", "dall-e-2") == Size(1024, 1024)
    assert parse_size("512x512", "dall-e-2") == Size(512, 512)


def test_unknown_models_follow_the_flexible_rules() -> None:
    assert is_flexible_model(GPT2)
    assert is_flexible_model("some-relay-image-model")
    assert parse_size("16:9 4k", "some-relay-image-model") == Size(3840, 2160)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (Size(3840, 2160), Size(2048, 1152)),
        (Size(2160, 3840), Size(1152, 2048)),
        (Size(2880, 2880), Size(2048, 2048)),
    ],
)
def test_fallback_of_a_4k_size_is_the_2k_size_of_the_same_shape(size: Size, expected: Size) -> None:
    assert fallback_size(size, GPT2) == expected


def test_no_fallback_below_4k_or_for_fixed_models() -> None:
    assert fallback_size(Size(2048, 1152), GPT2) is None
    assert fallback_size(Size(1024, 1024), GPT2) is None
    assert fallback_size(Size(1536, 1024), "gpt-image-1") is None


def test_plain_ratio_never_lands_in_the_4k_tier() -> None:
    # Sizes without an explicit 4k must not trigger the 4K fallback path.
    for text in ["3:1", "1:3", "21:9", "16:9", "1:1"]:
        size = parse_size(text, GPT2)
        assert size is not None and size.tier != "4k"
