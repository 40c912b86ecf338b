"""The terminal pipeline (bot/terminal.py) in-process, against the mock upstream.

`drawbridge draw`/`edit` as real processes are in tests/test_cli.py; here the same function
runs with its output captured, so each case can look at what reached the upstream.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from PIL import Image

from bot import errors
from bot.cli import build_parser
from bot.config import Settings
from bot.i18n import t
from bot.logs import redact
from bot.mock_upstream import MockUpstream
from bot.sizes import parse_size
from bot.terminal import (
    PARTIALS_DIR,
    ProgressLine,
    create_exclusive,
    render_error,
    save_results,
    terminal_job,
    usage_line,
)
from bot.upstream import GeneratedImage
from plugins.options import parse_image_args

MakeSettings = Callable[..., Settings]


async def job(settings: Settings, *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = await terminal_job(args, settings, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def refusal(settings: Settings, *argv: str) -> errors.DrawbridgeError:
    with pytest.raises(errors.DrawbridgeError) as caught:
        await job(settings, *argv)
    return caught.value


def png_file(path: Path, width: int, height: int) -> Path:
    Image.new("RGB", (width, height), "green").save(path, "PNG")
    return path


# --- the chat's validation, the terminal's wording ---


@pytest.mark.parametrize(
    ("argv", "error", "kind"),
    [
        (("draw", "a fox", "--n", "0"), errors.BadOptionError, "bad_option"),
        (("draw", "a fox", "--n", "5"), errors.BadOptionError, "bad_option"),
        (("draw", "   "), errors.EmptyPromptError, "empty_prompt"),
        (("draw", "x" * 4001), errors.PromptTooLongError, "prompt_too_long"),
        (("draw", "a fox", "--size", "99:1"), errors.SizeRatioError, "invalid_size"),
        (("draw", "a fox", "--size", "4:1"), errors.SizeRatioError, "invalid_size"),
        (("draw", "a fox", "--size", "99999x1"), errors.InvalidSizeError, "invalid_size"),
        (("draw", "a fox", "--size", "abc"), errors.SizeFormatError, "invalid_size"),
        (("draw", "a fox", "--size", "16:9 8k"), errors.SizeTierError, "invalid_size"),
    ],
)
async def test_a_request_the_chat_refuses_is_refused_before_the_upstream(
    settings_factory: MakeSettings,
    mock_upstream: MockUpstream,
    argv: tuple[str, ...],
    error: type[errors.DrawbridgeError],
    kind: str,
) -> None:
    refused = await refusal(settings_factory(max_n=4), *argv)
    assert type(refused) is error and refused.kind == kind
    assert mock_upstream.requests == []


@pytest.mark.parametrize(
    ("text", "argv"),
    [
        ("a fox --n 9", ("draw", "a fox", "--n", "9")),
        ("a fox --size 99:1", ("draw", "a fox", "--size", "99:1")),
        ("a fox --size abc", ("draw", "a fox", "--size", "abc")),
        ("a fox --size 16:9 8k", ("draw", "a fox", "--size", "16:9 8k")),
    ],
)
async def test_chat_and_terminal_refuse_with_the_same_error_and_params(
    settings_factory: MakeSettings, text: str, argv: tuple[str, ...]
) -> None:
    settings = settings_factory(max_n=4)
    with pytest.raises(errors.InputError) as chat:
        parse_image_args(
            text, {}, model=settings.model, default_size=settings.default_size, max_n=4
        )
    terminal = await refusal(settings, *argv)
    assert type(terminal) is type(chat.value)
    assert terminal.params == chat.value.params


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_terminal_messages_never_send_the_operator_to_a_chat_command(lang: str) -> None:
    for error in (
        errors.BadOptionError(option="n", value="9 (1-4)"),
        errors.EmptyPromptError(),
        errors.NotConfiguredError(),
        errors.InvalidKeyError(),
        errors.UpstreamQuotaError(),
        errors.UnknownModelError(model="gpt-image-9"),
        errors.UnknownParameterError(param="response_format"),
        errors.RelayStreamError(),
        errors.RelayFailedError(reason="cut"),
    ):
        text = render_error(lang, error)
        assert "/token" not in text and "/help" not in text and "/draw" not in text
        assert "/画" not in text
    assert "DRAWBRIDGE_API_KEY" in render_error(lang, errors.NotConfiguredError())
    assert "DRAWBRIDGE_API_KEY" in render_error(lang, errors.InvalidKeyError())
    assert "drawbridge draw" in render_error(lang, errors.EmptyPromptError())
    # The chat keeps its own wording.
    assert "/token" in t(lang, errors.NotConfiguredError.key)


async def test_without_a_key_the_terminal_says_which_settings(
    settings_factory: MakeSettings, mock_upstream: MockUpstream
) -> None:
    refused = await refusal(settings_factory(api_key=""), "draw", "a fox")
    assert isinstance(refused, errors.NotConfiguredError)
    assert "DRAWBRIDGE_API_KEY" in render_error("en", refused)
    assert mock_upstream.requests == []


async def test_a_refused_key_says_check_the_setting(
    settings_factory: MakeSettings, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.api_key = "sk-the-right-one-0000"
    refused = await refusal(settings_factory(), "draw", "a fox")
    assert isinstance(refused, errors.InvalidKeyError)
    text = render_error("en", refused)
    assert "check DRAWBRIDGE_API_KEY" in text and "/token" not in text


# --- what is drawn ---


async def test_edit_without_size_keeps_the_first_images_shape(
    settings_factory: MakeSettings, mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    wide = png_file(tmp_path / "wide.png", 300, 200)
    tall = png_file(tmp_path / "tall.png", 200, 300)
    code, _, err = await job(
        settings_factory(), "edit", "night", str(wide), str(tall), "-o", str(tmp_path / "o")
    )
    assert code == 0, err
    assert mock_upstream.requests[-1].fields["size"] == "1536x1024"
    [path] = (tmp_path / "o").glob("drawbridge-*-1.png")
    assert Image.open(path).size == (1536, 1024)
    assert "shape of wide.png" in err


async def test_edit_with_a_size_draws_that_size(
    settings_factory: MakeSettings, mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    wide = png_file(tmp_path / "wide.png", 300, 200)
    code, _, err = await job(
        settings_factory(), "edit", "night", str(wide), "--size", "1:1", "-o", str(tmp_path)
    )
    assert code == 0, err
    assert mock_upstream.requests[-1].fields["size"] == "1024x1024"


async def test_a_draw_without_size_uses_the_default(
    settings_factory: MakeSettings, mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    code, _, err = await job(
        settings_factory(default_size="16:9"), "draw", "a fox", "-o", str(tmp_path)
    )
    assert code == 0, err
    assert mock_upstream.requests[-1].fields["size"] == str(parse_size("16:9", "gpt-image-2"))


# --- files ---


async def test_results_never_overwrite_a_file(
    settings_factory: MakeSettings, mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    settings = settings_factory()
    out_dir = tmp_path / "out"
    first = await job(settings, "draw", "a fox", "--n", "2", "-o", str(out_dir))
    second = await job(settings, "draw", "a fox", "--n", "2", "-o", str(out_dir))
    assert first[0] == second[0] == 0
    files = sorted(out_dir.glob("drawbridge-*"))
    assert len(files) == 4
    printed = [line.split()[0] for line in (first[1] + second[1]).splitlines() if "bytes" in line]
    assert sorted(printed) == [str(f) for f in files]


def test_a_run_whose_name_is_taken_keeps_its_files_together(tmp_path: Path) -> None:
    image = GeneratedImage(b"new", "image/png", 1, 1, None)
    (tmp_path / "drawbridge-20260101-000000-1.png").write_bytes(b"old")
    paths = save_results(tmp_path, "20260101-000000", [image, image])
    assert [p.name for p in paths] == [
        "drawbridge-20260101-000000_2-1.png",
        "drawbridge-20260101-000000_2-2.png",
    ]
    assert (tmp_path / "drawbridge-20260101-000000-1.png").read_bytes() == b"old"


def test_create_exclusive_counts_past_taken_names(tmp_path: Path) -> None:
    paths = [create_exclusive(tmp_path, "p", "png", bytes([i])) for i in range(3)]
    assert [p.name for p in paths] == ["p.png", "p~2.png", "p~3.png"]
    assert [p.read_bytes() for p in paths] == [b"\x00", b"\x01", b"\x02"]


async def test_partial_previews_are_kept_only_with_partials_in_their_folder(
    settings_factory: MakeSettings, mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    settings = settings_factory()
    code, _, err = await job(settings, "draw", "a fox", "-o", str(tmp_path / "plain"))
    assert code == 0, err
    assert "partial preview 1" in err
    assert [p.name for p in (tmp_path / "plain").iterdir()] != []
    assert not any("partial" in p.name for p in (tmp_path / "plain").rglob("*"))
    code, _, err = await job(settings, "draw", "a fox", "--partials", "-o", str(tmp_path / "p"))
    assert code == 0, err
    kept = list((tmp_path / "p" / PARTIALS_DIR).iterdir())
    assert kept and all(Image.open(p).format == "PNG" for p in kept)
    assert not any("partial" in p.name for p in (tmp_path / "p").glob("*.png"))


# --- what is printed ---


def test_usage_is_one_short_line() -> None:
    usage = {
        "input_tokens": 70,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 70},
        "output_tokens": 3336,
        "total_tokens": 3406,
    }
    assert usage_line(usage) == "70 in (70 text, 0 image) + 3336 out = 3406 tokens"
    assert usage_line({"prompt_tokens": 5, "note": "x"}) == "prompt_tokens 5"


async def test_the_printed_usage_is_no_python_dict(
    settings_factory: MakeSettings, mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    code, out, _ = await job(settings_factory(), "draw", "a fox", "-o", str(tmp_path))
    assert code == 0
    [line] = [x for x in out.splitlines() if x.startswith("usage:")]
    assert "{" not in line and "'" not in line and line.endswith("tokens")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_line_clears_the_progress_line_first() -> None:
    stream = Tty()
    progress = ProgressLine(stream)
    logger = logging.getLogger("drawbridge.test.progress")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with progress.attach(logger):
            progress.show("  waiting 0:01 ")
            logger.warning("provider a failed")
            progress.show("  waiting 0:02 ")
        progress.clear()
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    screen = stream.getvalue()
    # What a terminal shows: each line is what follows its last carriage return.
    shown = [line.rsplit("\r", 1)[-1].replace("\x1b[K", "") for line in screen.split("\n")]
    assert "LOG provider a failed" in shown


def test_off_a_terminal_progress_is_whole_lines() -> None:
    stream = io.StringIO()
    progress = ProgressLine(stream)
    progress.show("  waiting 0:01 ")
    progress.event("  retrying: next_provider")
    progress.clear()
    assert stream.getvalue() == "  retrying: next_provider\n"


# --- the upstream package's messages ---


async def test_not_supported_says_edit_for_an_edit(
    settings_factory: MakeSettings, mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    mock_upstream.options.edits = False
    ref = png_file(tmp_path / "in.png", 64, 64)
    refused = await refusal(settings_factory(), "edit", "night", str(ref), "-o", str(tmp_path))
    assert isinstance(refused, errors.EditNotSupportedError)
    assert refused.kind == "not_supported"
    assert "editing images" in render_error("en", refused)
    assert "改图" in render_error("zh", refused)


async def test_not_supported_says_draw_for_a_draw(
    settings_factory: MakeSettings, mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    mock_upstream.options.fail = "not_implemented"
    refused = await refusal(settings_factory(), "draw", "a fox", "-o", str(tmp_path))
    assert type(refused) is errors.NotSupportedError
    assert "editing" not in render_error("en", refused)
    assert "from a prompt" in render_error("en", refused)
    assert "改图" not in render_error("zh", refused)


async def test_trying_the_next_provider_is_logged_only_when_there_is_one(
    settings_factory: MakeSettings,
    mock_factory: Callable[..., Awaitable[MockUpstream]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = await mock_factory(fail="no_channel")
    good = await mock_factory()
    two = [
        {"name": "first", "api_base": broken.base_url, "api_key": "sk-first-000000"},
        {"name": "second", "api_base": good.base_url, "api_key": "sk-second-00000"},
    ]
    caplog.set_level(logging.INFO, logger="bot.upstream.chain")
    code, _, err = await job(
        settings_factory(providers_json=two), "draw", "a fox", "-o", str(tmp_path)
    )
    assert code == 0, err
    assert [r.getMessage() for r in caplog.records if "trying the next" in r.getMessage()] == [
        "provider first failed (no_channel, not billed); trying the next"
    ]
    caplog.clear()
    good.options.fail = "no_channel"
    refused = await refusal(settings_factory(providers_json=two), "draw", "a fox")
    assert isinstance(refused, errors.NoChannelError)
    lines = [r.getMessage() for r in caplog.records if "trying the next" in r.getMessage()]
    assert lines == ["provider first failed (no_channel, not billed); trying the next"]


# --- the start-up warning about /token ---


def test_the_token_redaction_leaves_our_own_sentence_readable() -> None:
    sentence = (
        "no shared upstream key (DRAWBRIDGE_API_BASE/DRAWBRIDGE_API_KEY): only users who "
        "bind their own key with /token can draw"
    )
    assert redact(sentence) == sentence
    assert redact("Send /token.") == "Send /token."
    for line in (
        "/token Zq8wLongSecretValue123",
        "/token sk-abcdef123",
        "/token lettersonlylongkey",
    ):
        assert redact(line) == "/token ***"


async def test_an_edit_goes_to_the_provider_that_takes_its_images(
    settings_factory: MakeSettings,
    mock_factory: Callable[..., Awaitable[MockUpstream]],
    tmp_path: Path,
) -> None:
    small, large = await mock_factory(), await mock_factory()
    providers = [
        {"name": "one-image", "api_base": small.base_url, "max_references": 1},
        {"name": "three-images", "api_base": large.base_url, "max_references": 3},
    ]
    refs = [str(png_file(tmp_path / f"{i}.png", 64, 48)) for i in range(2)]
    settings = settings_factory(providers_json=providers)
    code, _, err = await job(settings, "edit", "merge", *refs, "-o", str(tmp_path / "o"))
    assert code == 0, err
    assert (len(small.requests), len(large.requests)) == (0, 1)
    refused = await refusal(settings, "edit", "merge", *(refs * 2), "-o", str(tmp_path / "o"))
    assert isinstance(refused, errors.TooManyReferencesError)
    assert refused.params == {"count": 4, "limit": 3}
    assert len(large.requests) == 1


def test_the_shared_checks_refuse_in_the_users_order() -> None:
    from bot import validation

    def check(kind: str, prompt: str, n: int, refs: int, limit: int | None = None) -> str:
        try:
            validation.check_request(
                kind, prompt, n, refs, max_prompt_chars=10, max_n=4, max_references=limit
            )
        except errors.InputError as exc:
            return exc.kind
        return "ok"

    assert check("draw", " ", 9, 0) == "empty_prompt"
    assert check("draw", "x" * 11, 9, 0) == "prompt_too_long"
    assert check("draw", "fox", 9, 0) == "bad_option"
    assert check("draw", "fox", 4, 0) == "ok"
    assert check("edit", "fox", 1, 0) == "no_reference"
    assert check("edit", "fox", 1, 20) == "ok"  # no limit here: the chain routes by it
    assert check("edit", "fox", 1, 4, limit=3) == "too_many_references"
