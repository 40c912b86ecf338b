"""The upstream client against the mock image API (and a few odd relays) over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web
from PIL import Image

from bot import errors
from bot.config import ProviderConfig
from bot.images import Reference
from bot.mock_upstream import MockUpstream
from bot.upstream import (
    USER_AGENT,
    ImageRequest,
    ImageResult,
    Progress,
    ProviderChain,
    UpstreamClient,
    build_clients,
    classify_error,
)

KEY = "sk-test-upstream-1234567890"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- fixtures and helpers ---


def make_provider(base_url: str, **overrides: Any) -> ProviderConfig:
    values: dict[str, Any] = {
        "name": "primary",
        "api_base": base_url,
        "api_key": KEY,
        "stream": False,
        "max_retries": 0,
        "timeout": 20.0,
        "connect_timeout": 5.0,
    }
    values.update(overrides)
    return ProviderConfig(**values)


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., UpstreamClient]]:
    """Make clients that are closed after the test."""
    made: list[UpstreamClient] = []

    def make(base_url: str, **overrides: Any) -> UpstreamClient:
        client = UpstreamClient(make_provider(base_url, **overrides))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


class Recorder:
    """An on_progress handler that remembers every event."""

    def __init__(self) -> None:
        self.events: list[Progress] = []

    async def __call__(self, event: Progress) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def reference(index: int, fmt: str = "PNG") -> Reference:
    ext, mime = {"PNG": ("png", "image/png"), "JPEG": ("jpg", "image/jpeg")}[fmt]
    return Reference(image_bytes(fmt), f"ref{index}.{ext}", mime, 64, 48)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_png(result: ImageResult, width: int, height: int) -> None:
    assert result.images
    for image in result.images:
        assert image.data.startswith(PNG_SIGNATURE)
        assert image.mime == "image/png"
        assert (image.width, image.height) == (width, height)
        with Image.open(io.BytesIO(image.data)) as decoded:
            decoded.load()
            assert decoded.size == (width, height)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def relay() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Serve one hand-written handler for both image endpoints (relay quirks the mock lacks)."""
    runners: list[web.AppRunner] = []

    async def serve(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/images/generations", handler)
        app.router.add_post("/v1/images/edits", handler)
        app.router.add_get("/files/{name}", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield serve
    for runner in runners:
        await runner.cleanup()


async def send_in_small_pieces(
    request: web.Request, body: bytes, content_type: str
) -> web.StreamResponse:
    """Write the body 7 bytes at a time, so every boundary case of the readers is crossed."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    for start in range(0, len(body), 7):
        await response.write(body[start : start + 7])
    await response.write_eof()
    return response


# --- successful answers ---


async def test_generation_decodes_b64_png_of_requested_size(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    client = clients(mock_upstream.base_url)
    result = await client.generate(ImageRequest("a red fox", size="1536x1024", quality="low"))

    assert_png(result, 1536, 1024)
    assert result.provider == "primary" and result.model == "gpt-image-2"
    assert result.size == "1536x1024" and result.fallback_size is None
    assert result.usage is not None and result.usage["output_tokens"] > 0
    sent = mock_upstream.requests[-1]
    assert sent.path == "/v1/images/generations"
    assert sent.authorization == f"Bearer {KEY}"
    assert sent.fields["model"] == "gpt-image-2"
    assert sent.fields["prompt"] == "a red fox"
    assert sent.fields["size"] == "1536x1024" and sent.fields["quality"] == "low"
    # Not configured, so never sent: a gpt-image upstream rejects or ignores them.
    for absent in ("stream", "partial_images", "response_format", "input_fidelity"):
        assert absent not in sent.fields


async def test_size_none_is_not_sent(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    result = await clients(mock_upstream.base_url).generate(ImageRequest("auto size"))
    assert "size" not in mock_upstream.requests[-1].fields
    assert_png(result, 1024, 1024)


async def test_url_result_is_downloaded_at_once(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    mock_upstream.options.mode = "url"
    events = Recorder()
    result = await clients(mock_upstream.base_url).generate(
        ImageRequest("a lighthouse", size="1024x1024"), events
    )
    assert_png(result, 1024, 1024)
    assert "downloading" in events.kinds()


async def test_relay_extra_fields_and_empty_url_next_to_b64_are_ignored(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    mock_upstream.options.extra_fields = True  # `"url": ""`, id, gen_id, source_account_id ...
    result = await clients(mock_upstream.base_url).generate(
        ImageRequest("a tram", size="1024x1024")
    )
    assert_png(result, 1024, 1024)
    assert len(result.images) == 1
    assert result.revised_prompt is not None and "a tram" in result.revised_prompt
    assert result.images[0].revised_prompt == result.revised_prompt


async def test_two_images_for_n_2(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    result = await clients(mock_upstream.base_url).generate(
        ImageRequest("two owls", size="1024x1024", n=2)
    )
    assert len(result.images) == 2
    assert_png(result, 1024, 1024)
    assert mock_upstream.requests[-1].fields["n"] == "2"


async def test_streamed_n_2_collects_every_completed_event(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    client = clients(mock_upstream.base_url, stream=True, partial_images=1)
    result = await client.generate(ImageRequest("two owls", size="1024x1024", n=2))
    assert len(result.images) == 2
    assert_png(result, 1024, 1024)


async def test_edit_sends_multipart_with_one_image_part_per_reference(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    client = clients(mock_upstream.base_url)
    events = Recorder()
    request = ImageRequest(
        "make it night",
        size="1024x1536",
        quality="medium",
        output_compression=80,
        references=(reference(1, "PNG"), reference(2, "JPEG")),
    )
    result = await client.run(request, events)

    assert_png(result, 1024, 1536)
    sent = mock_upstream.requests[-1]
    assert sent.path == "/v1/images/edits"
    assert sent.authorization == f"Bearer {KEY}"
    assert [(f.field, f.filename, f.content_type) for f in sent.files] == [
        ("image[]", "ref1.png", "image/png"),
        ("image[]", "ref2.jpg", "image/jpeg"),
    ]
    assert [(f.width, f.height) for f in sent.files] == [(64, 48), (64, 48)]
    assert sent.fields["prompt"] == "make it night"
    assert sent.fields["n"] == "1" and sent.fields["output_compression"] == "80"
    assert sent.fields["model"] == "gpt-image-2"
    assert "input_fidelity" not in sent.fields
    kinds = events.kinds()
    assert kinds.index("uploading") < kinds.index("waiting")


async def test_edit_without_references_is_refused_before_sending(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    with pytest.raises(errors.NoReferenceImageError):
        await clients(mock_upstream.base_url).edit(ImageRequest("nothing to edit"))
    assert mock_upstream.requests == []


async def test_stream_generation_reports_partial_previews(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    client = clients(mock_upstream.base_url, stream=True, partial_images=2)
    events = Recorder()
    result = await client.generate(ImageRequest("a comet", size="1024x1024"), events)

    assert_png(result, 1024, 1024)
    sent = mock_upstream.requests[-1]
    assert sent.stream and sent.fields["partial_images"] == "2"
    partials = [e for e in events.events if e.kind == "partial"]
    assert [p.index for p in partials] == [0, 1]
    assert all(p.data is not None and p.data.startswith(PNG_SIGNATURE) for p in partials)
    assert events.kinds()[0] == "request_sent"
    assert result.usage is not None and result.usage["total_tokens"] > 0


async def test_stream_edit_reports_partial_previews_and_sends_form_booleans(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    client = clients(mock_upstream.base_url, stream=True, partial_images=1)
    events = Recorder()
    request = ImageRequest("add a hat", size="1024x1024", references=(reference(1),))
    result = await client.run(request, events)

    assert_png(result, 1024, 1024)
    sent = mock_upstream.requests[-1]
    assert sent.path == "/v1/images/edits"
    assert sent.fields["stream"] == "true" and sent.fields["partial_images"] == "1"
    partials = [e for e in events.events if e.kind == "partial"]
    assert len(partials) == 1 and partials[0].data is not None


async def test_streamed_request_answered_with_plain_json_still_works(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    mock_upstream.options.stream = False  # a relay that drops `stream`
    events = Recorder()
    client = clients(mock_upstream.base_url, stream=True)
    result = await client.generate(ImageRequest("a kite", size="1024x1024"), events)
    assert mock_upstream.requests[-1].stream
    assert_png(result, 1024, 1024)
    assert "partial" not in events.kinds()


@pytest.mark.parametrize("base_suffix", ["", "/v1", "/v1/"])
async def test_api_base_with_or_without_v1(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient], base_suffix: str
) -> None:
    client = clients(mock_upstream.base_url + base_suffix)
    await client.generate(ImageRequest("a bell", size="1024x1024"))
    assert mock_upstream.requests[-1].path == "/v1/images/generations"


async def test_response_format_rejected_by_gpt_image_upstream(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    client = clients(mock_upstream.base_url, response_format="b64_json")
    with pytest.raises(errors.UnknownParameterError) as caught:
        await client.generate(ImageRequest("a dog", size="1024x1024"))
    assert caught.value.params["param"] == "response_format"
    assert mock_upstream.requests[-1].fields["response_format"] == "b64_json"


async def test_response_format_sent_where_the_relay_wants_it(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    mock_upstream.options.accept_response_format = True
    client = clients(mock_upstream.base_url, response_format="b64_json")
    result = await client.generate(ImageRequest("a dog", size="1024x1024"))
    assert_png(result, 1024, 1024)
    assert mock_upstream.requests[-1].fields["response_format"] == "b64_json"


async def test_a_relay_refusing_stream_gets_a_plain_request_and_keeps_getting_one(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    mock_upstream.options.refuse_fields = ("partial_images",)
    client = clients(mock_upstream.base_url, stream=True)
    result = await client.generate(ImageRequest("a dog", size="1024x1024"))
    assert_png(result, 1024, 1024)
    first, second = mock_upstream.requests
    assert "partial_images" in first.fields and "stream" not in second.fields
    await client.generate(ImageRequest("a cat", size="1024x1024"))
    assert len(mock_upstream.requests) == 3
    assert "stream" not in mock_upstream.requests[-1].fields


async def test_a_relay_refusing_user_gets_the_request_without_it(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    mock_upstream.options.refuse_fields = ("user",)
    client = clients(mock_upstream.base_url)
    result = await client.generate(ImageRequest("a dog", size="1024x1024", user="abc"))
    assert_png(result, 1024, 1024)
    assert [("user" in r.fields) for r in mock_upstream.requests] == [True, False]


async def test_a_refused_required_field_is_not_dropped(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    mock_upstream.options.refuse_fields = ("quality",)
    client = clients(mock_upstream.base_url)
    with pytest.raises(errors.UnknownParameterError):
        await client.generate(ImageRequest("a dog", size="1024x1024", quality="high"))
    assert len(mock_upstream.requests) == 1


# --- size fallback ---


async def test_4k_refused_falls_back_to_2k_of_the_same_shape(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    mock_upstream.options.reject_4k = True
    mock_upstream.options.fast_images = True
    events = Recorder()
    result = await clients(mock_upstream.base_url).generate(
        ImageRequest("a skyline", size="3840x2160"), events
    )
    assert result.fallback_size == "2048x1152"
    assert result.size == "2048x1152"
    assert_png(result, 2048, 1152)
    assert [r.fields["size"] for r in mock_upstream.requests] == ["3840x2160", "2048x1152"]
    assert any(e.kind == "retry" and e.detail == "size_fallback" for e in events.events)


async def test_no_size_fallback_when_disabled(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    mock_upstream.options.reject_4k = True
    client = clients(mock_upstream.base_url, size_fallback=False)
    with pytest.raises(errors.UpstreamSizeError):
        await client.generate(ImageRequest("a skyline", size="3840x2160"))
    assert len(mock_upstream.requests) == 1


# --- every failure kind of the mock ---

FAILURES: list[tuple[str, type[errors.UpstreamError]]] = [
    ("invalid_key", errors.InvalidKeyError),
    ("invalid_key_en", errors.InvalidKeyError),
    ("token_expired", errors.InvalidKeyError),
    ("token_exhausted", errors.InvalidKeyError),
    ("quota", errors.UpstreamQuotaError),
    ("openai_quota", errors.UpstreamQuotaError),
    ("no_channel", errors.NoChannelError),
    ("group_denied", errors.GroupDeniedError),
    ("moderation", errors.ModerationError),
    ("content_policy", errors.ModerationError),
    ("sensitive_words", errors.ModerationError),
    ("invalid_size", errors.UpstreamSizeError),
    ("unknown_parameter", errors.UnknownParameterError),
    ("rate_limit", errors.RateLimitedError),
    ("too_large", errors.RequestTooLargeError),
    ("upstream_banned", errors.UpstreamUnavailableError),
    ("server_error", errors.UpstreamUnavailableError),
    ("bad_gateway", errors.UpstreamUnavailableError),
    ("html_502", errors.UpstreamUnavailableError),
    ("unavailable", errors.UpstreamUnavailableError),
    ("not_implemented", errors.NotSupportedError),
    ("malformed", errors.MalformedResponseError),
    ("no_data", errors.MalformedResponseError),
    ("truncated_b64", errors.MalformedResponseError),
    ("expired_url", errors.ResultDownloadError),
    ("stream_cut", errors.MalformedResponseError),
    ("stream_error", errors.ModerationError),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("kind", "expected"), FAILURES, ids=[k for k, _ in FAILURES])
async def test_failure_kind_maps_to_its_error_class(
    mock_upstream: MockUpstream,
    clients: Callable[..., UpstreamClient],
    kind: str,
    expected: type[errors.UpstreamError],
    stream: bool,
) -> None:
    client = clients(mock_upstream.base_url, stream=stream, partial_images=1)
    with pytest.raises(errors.UpstreamError) as caught:
        await client.generate(ImageRequest(f"a boat [fail:{kind}]", size="1024x1024"))
    assert type(caught.value) is expected
    assert KEY not in str(caught.value) and KEY not in caught.value.detail


async def test_bad_key_against_a_keyed_relay_is_invalid_key(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    mock_upstream.options.api_key = "sk-the-right-one"
    with pytest.raises(errors.InvalidKeyError) as caught:
        await clients(mock_upstream.base_url).generate(ImageRequest("a cat", size="1024x1024"))
    assert caught.value.status == 401
    assert KEY not in str(caught.value)


async def test_edit_on_relay_without_edits_is_not_supported(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    request = ImageRequest("x [fail:not_implemented]", references=(reference(1),))
    with pytest.raises(errors.NotSupportedError):
        await clients(mock_upstream.base_url).run(request)
    assert mock_upstream.requests[-1].path == "/v1/images/edits"


# --- retries: only where the request surely did not run ---


async def test_retries_empty_503_until_success(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    events = Recorder()
    client = clients(mock_upstream.base_url, max_retries=2)
    result = await client.generate(ImageRequest("a gull [fail:flaky_2]", size="1024x1024"), events)
    assert_png(result, 1024, 1024)
    assert len(mock_upstream.requests) == 3
    retries = [e for e in events.events if e.kind == "retry"]
    assert [r.index for r in retries] == [1, 2]


async def test_rate_limit_waits_retry_after_then_gives_up(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    client = clients(mock_upstream.base_url, max_retries=1)
    started = time.monotonic()
    with pytest.raises(errors.RateLimitedError) as caught:
        await client.generate(ImageRequest("a crow [fail:rate_limit]", size="1024x1024"))
    assert time.monotonic() - started >= 0.9  # Retry-After: 1
    assert len(mock_upstream.requests) == 2
    assert caught.value.retry_after == 1.0


async def test_quota_429_without_retry_after_is_not_retried(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    client = clients(mock_upstream.base_url, max_retries=2)
    with pytest.raises(errors.UpstreamQuotaError):
        await client.generate(ImageRequest("x [fail:openai_quota]", size="1024x1024"))
    assert len(mock_upstream.requests) == 1


async def test_timeout_is_never_retried(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    client = clients(mock_upstream.base_url, timeout=0.5, max_retries=2)
    started = time.monotonic()
    with pytest.raises(errors.UpstreamTimeoutError):
        await client.generate(ImageRequest("x [fail:timeout]", size="1024x1024"))
    assert time.monotonic() - started < 3
    assert len(mock_upstream.requests) == 1


async def test_overall_deadline_bounds_a_trickling_stream(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient]
) -> None:
    # Each event comes well within the read timeout, the whole answer does not.
    mock_upstream.options.latency = 3.0
    client = clients(mock_upstream.base_url, stream=True, partial_images=3, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(errors.UpstreamTimeoutError):
        await client.generate(ImageRequest("slow", size="1024x1024"))
    assert time.monotonic() - started < 2.5
    assert len(mock_upstream.requests) == 1


@pytest.mark.parametrize("kind", ["server_error", "html_502"])
async def test_5xx_with_a_body_is_not_retried(
    mock_upstream: MockUpstream, clients: Callable[..., UpstreamClient], kind: str
) -> None:
    client = clients(mock_upstream.base_url, max_retries=2)
    with pytest.raises(errors.UpstreamUnavailableError):
        await client.generate(ImageRequest(f"x [fail:{kind}]", size="1024x1024"))
    assert len(mock_upstream.requests) == 1


async def test_connection_refused_retries_then_unavailable(
    clients: Callable[..., UpstreamClient],
) -> None:
    events = Recorder()
    client = clients(f"http://127.0.0.1:{closed_port()}", max_retries=1)
    started = time.monotonic()
    with pytest.raises(errors.UpstreamUnavailableError) as caught:
        await client.generate(ImageRequest("nobody home", size="1024x1024"), events)
    assert time.monotonic() - started >= 0.4  # one 0.5 s backoff
    assert caught.value.code == "connect_failed"
    assert [e.index for e in events.events if e.kind == "retry"] == [1]


# --- several providers ---


@pytest.fixture
async def second_mock(mock_factory: Callable[..., Awaitable[MockUpstream]]) -> MockUpstream:
    return await mock_factory()


async def chain_of(*providers: ProviderConfig) -> ProviderChain:
    return ProviderChain(build_clients(providers))


async def test_chain_falls_to_the_next_provider_on_no_channel(
    mock_upstream: MockUpstream, second_mock: MockUpstream
) -> None:
    mock_upstream.options.fail = "no_channel"
    chain = await chain_of(
        make_provider(mock_upstream.base_url, name="first"),
        make_provider(second_mock.base_url, name="second"),
    )
    try:
        result = await chain.run(ImageRequest("a pier", size="1024x1024"))
    finally:
        await chain.aclose()
    assert result.provider == "second"
    assert len(mock_upstream.requests) == 1 and len(second_mock.requests) == 1


async def test_chain_falls_to_the_next_provider_when_the_first_is_unreachable(
    second_mock: MockUpstream,
) -> None:
    chain = await chain_of(
        make_provider(f"http://127.0.0.1:{closed_port()}", name="first"),
        make_provider(second_mock.base_url, name="second"),
    )
    try:
        result = await chain.run(ImageRequest("a pier", size="1024x1024"))
    finally:
        await chain.aclose()
    assert result.provider == "second"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("moderation", errors.ModerationError), ("timeout", errors.UpstreamTimeoutError)],
)
async def test_chain_stops_on_moderation_and_timeout(
    mock_upstream: MockUpstream,
    second_mock: MockUpstream,
    kind: str,
    expected: type[errors.UpstreamError],
) -> None:
    mock_upstream.options.fail = kind
    chain = await chain_of(
        make_provider(mock_upstream.base_url, name="first", timeout=0.5),
        make_provider(second_mock.base_url, name="second"),
    )
    try:
        with pytest.raises(expected):
            await chain.run(ImageRequest("a pier", size="1024x1024"))
    finally:
        await chain.aclose()
    assert second_mock.requests == []


async def test_chain_raises_the_most_specific_error_when_all_fail(
    mock_upstream: MockUpstream, second_mock: MockUpstream
) -> None:
    mock_upstream.options.fail = "no_channel"
    second_mock.options.fail = "unavailable"
    chain = await chain_of(
        make_provider(mock_upstream.base_url, name="first"),
        make_provider(second_mock.base_url, name="second"),
    )
    try:
        with pytest.raises(errors.NoChannelError):
            await chain.run(ImageRequest("a pier", size="1024x1024"))
    finally:
        await chain.aclose()
    assert len(second_mock.requests) == 1


async def test_chain_edit_skips_providers_taking_fewer_references(
    mock_upstream: MockUpstream, second_mock: MockUpstream
) -> None:
    chain = await chain_of(
        make_provider(mock_upstream.base_url, name="small", max_references=1),
        make_provider(second_mock.base_url, name="big", max_references=5),
    )
    request = ImageRequest("merge", size="1024x1024", references=(reference(1), reference(2)))
    try:
        result = await chain.run(request)
    finally:
        await chain.aclose()
    assert result.provider == "big"
    assert mock_upstream.requests == []
    assert len(second_mock.requests[-1].files) == 2


async def test_shared_http_client_is_not_closed_by_a_client(mock_upstream: MockUpstream) -> None:
    async with httpx.AsyncClient() as http:
        (client,) = build_clients([make_provider(mock_upstream.base_url)], http=http)
        assert client.http is http
        await client.generate(ImageRequest("shared", size="1024x1024"))
        await client.aclose()
        assert not http.is_closed


# --- relay quirks the mock does not produce ---


def b64_of(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noisy_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_escaped_slashes_and_wrapped_base64_decode_in_tiny_chunks(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    png = noisy_png(200, 100)
    assert "/" in b64_of(png)
    # PHP-style JSON escapes "/" and some encoders wrap base64 lines: both are valid JSON.
    wrapped = "\n".join(b64_of(png)[i : i + 76] for i in range(0, len(b64_of(png)), 76))
    body = json.dumps(
        {
            "data": [{"b64_json": wrapped, "revised_prompt": "sky", "id": "x"}],
            "usage": {"total_tokens": 5},
            "size": "200x100",
        }
    ).replace("/", "\\/")
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("User-Agent", ""))
        await request.read()
        return await send_in_small_pieces(request, body.encode(), "application/json")

    client = clients(await relay(handler))
    result = await client.generate(ImageRequest("sky"))
    assert result.images[0].data == png
    assert (result.images[0].width, result.images[0].height) == (200, 100)
    assert result.usage == {"total_tokens": 5} and result.revised_prompt == "sky"
    assert seen == [USER_AGENT]


async def test_event_stream_in_tiny_chunks_with_crlf_and_comments(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    partial = image_bytes(size=(32, 32), colour="gray")
    final = image_bytes(size=(300, 200), colour="green")
    events = [
        ": keep-alive",
        "event: image_generation.partial_image",
        "data: "
        + json.dumps(
            {
                "type": "image_generation.partial_image",
                "b64_json": b64_of(partial),
                "partial_image_index": 0,
            }
        ),
        "",
        # A relay synthesising the generation event for an edit, and dispatching on `type`
        # even when the `event:` line disagrees.
        "event: message",
        "data: "
        + json.dumps(
            {
                "type": "image_generation.completed",
                "b64_json": b64_of(final),
                "usage": {"total_tokens": 9},
            }
        ),
        "",
        "data: [DONE]",
        "",
    ]
    body = "\r\n".join(events).encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return await send_in_small_pieces(request, body, "text/event-stream")

    recorder = Recorder()
    client = clients(await relay(handler), stream=True)
    result = await client.run(ImageRequest("x", references=(reference(1),)), recorder)
    assert result.images[0].data == final and result.usage == {"total_tokens": 9}
    partials = [e for e in recorder.events if e.kind == "partial"]
    assert len(partials) == 1 and partials[0].data == partial


async def test_base64_that_is_not_an_image_is_malformed(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": [{"b64_json": b64_of(b"<html>not an image</html>")}]})

    with pytest.raises(errors.MalformedResponseError) as caught:
        await clients(await relay(handler)).generate(ImageRequest("x"))
    assert caught.value.code == "not_an_image"


async def test_truncated_png_in_valid_base64_is_malformed(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    png = noisy_png(64, 64)
    cut = png[: len(png) // 2 // 3 * 3]  # whole base64 quanta: decodes without complaint

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": [{"b64_json": b64_of(cut)}]})

    with pytest.raises(errors.MalformedResponseError) as caught:
        await clients(await relay(handler)).generate(ImageRequest("x"))
    assert caught.value.code == "truncated_image"


async def drop_after_reading(request: web.Request) -> web.StreamResponse:
    """A relay that takes the whole request, then dies without answering."""
    await request.read()
    assert request.transport is not None
    request.transport.close()
    await asyncio.sleep(0.1)
    return web.Response()


async def test_connection_dropped_after_sending_is_not_retried(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    calls: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(request.path)
        return await drop_after_reading(request)

    client = clients(await relay(handler), max_retries=2)
    with pytest.raises(errors.UpstreamUnavailableError) as caught:
        await client.generate(ImageRequest("x"))
    assert caught.value.code == "connection_lost"
    assert len(calls) == 1


async def test_chain_stops_when_the_connection_drops_after_sending(
    relay: Callable[[Handler], Awaitable[str]], second_mock: MockUpstream
) -> None:
    # Unavailable may move on only when the request surely did not run; this one may have.
    chain = await chain_of(
        make_provider(await relay(drop_after_reading), name="first"),
        make_provider(second_mock.base_url, name="second"),
    )
    try:
        with pytest.raises(errors.UpstreamUnavailableError):
            await chain.run(ImageRequest("a pier", size="1024x1024"))
    finally:
        await chain.aclose()
    assert second_mock.requests == []


async def test_stream_without_completed_event_is_malformed(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = (
            b"event: image_generation.partial_image\n"
            b'data: {"type":"image_generation.partial_image"}\n\n'
            b"data: [DONE]\n\n"
        )
        return web.Response(body=body, content_type="text/event-stream")

    with pytest.raises(errors.MalformedResponseError) as caught:
        await clients(await relay(handler), stream=True).generate(ImageRequest("x"))
    assert caught.value.code == "stream_cut"


async def test_error_envelope_inside_a_200_is_classified(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "分组 vip 下模型 gpt-image-2 无可用渠道"}})

    with pytest.raises(errors.NoChannelError):
        await clients(await relay(handler)).generate(ImageRequest("x"))


async def test_b64_result_over_max_result_bytes_is_refused(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    big = PNG_SIGNATURE + bytes(2 * 1024 * 1024)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": [{"b64_json": b64_of(big)}]})

    client = clients(await relay(handler), max_result_bytes=1024 * 1024)
    with pytest.raises(errors.MalformedResponseError) as caught:
        await client.generate(ImageRequest("x"))
    assert caught.value.code == "too_large"


async def test_url_result_over_max_result_bytes_is_a_download_error(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    big = PNG_SIGNATURE + bytes(2 * 1024 * 1024)
    base = ""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            # Chunked, no Content-Length: the cap must hold while streaming.
            return await send_in_pieces(request, big)
        return web.json_response({"data": [{"url": f"{base}/files/big.png", "b64_json": ""}]})

    base = await relay(handler)
    client = clients(base, max_result_bytes=1024 * 1024)
    with pytest.raises(errors.ResultDownloadError) as caught:
        await client.generate(ImageRequest("x"))
    assert caught.value.code == "too_large"


async def test_gzip_result_sent_anyway_is_refused_without_inflating_it(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    # 64 MB of zeros in ~64 KB of gzip: httpx would inflate it chunk by chunk past any cap.
    bomb = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=9)
    base = ""
    asked: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            asked.append(request.headers.get("Accept-Encoding", ""))
            return web.Response(
                body=bomb, headers={"Content-Type": "image/png", "Content-Encoding": "gzip"}
            )
        return web.json_response({"data": [{"url": f"{base}/files/bomb.png"}]})

    base = await relay(handler)
    tracemalloc.start()
    try:
        with pytest.raises(errors.ResultDownloadError) as caught:
            await clients(base, max_result_bytes=2 * 1024 * 1024).generate(ImageRequest("x"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.code == "bad_encoding"
    assert asked == ["identity"]
    assert peak < 8 * 1024 * 1024


async def send_in_pieces(request: web.Request, body: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "image/png"})
    await response.prepare(request)
    for start in range(0, len(body), 256 * 1024):
        await response.write(body[start : start + 256 * 1024])
    await response.write_eof()
    return response


async def test_slow_result_download_is_a_download_error(
    relay: Callable[[Handler], Awaitable[str]], clients: Callable[..., UpstreamClient]
) -> None:
    base = ""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            await asyncio.sleep(5)
        return web.json_response({"data": [{"url": f"{base}/files/slow.png"}]})

    base = await relay(handler)
    with pytest.raises(errors.ResultDownloadError) as caught:
        await clients(base, timeout=0.5).generate(ImageRequest("x"))
    assert caught.value.code == "timeout"


# --- classify_error on raw bodies ---

CASES: list[tuple[int, Any, dict[str, str] | None, type[errors.UpstreamError]]] = [
    # OpenAI
    (
        401,
        b'{"error":{"message":"Incorrect API key provided: sk-abc123xyz. You can find your API '
        b'key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error",'
        b'"param":null,"code":"invalid_api_key"}}',
        None,
        errors.InvalidKeyError,
    ),
    (
        429,
        b'{"error":{"message":"You exceeded your current quota, please check your plan and '
        b'billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}',
        {"Retry-After": "3"},
        errors.UpstreamQuotaError,
    ),
    (
        400,
        '{"error":{"message":"Your request was rejected by the safety system. If you believe '
        "this is an error, contact us at help.openai.com and include the request ID req_1. "
        'safety_violations=[sexual].","type":"image_generation_user_error","param":null,'
        '"code":"moderation_blocked"}}',
        None,
        errors.ModerationError,
    ),
    (
        400,
        {
            "error": {
                "message": "Your request was rejected as a result of our safety system.",
                "code": "content_policy_violation",
            }
        },
        None,
        errors.ModerationError,
    ),
    (
        400,
        {
            "error": {
                "message": "Invalid value: '1000x1000'. Supported values are: "
                "'1024x1024', '1024x1536', '1536x1024', and 'auto'.",
                "type": "invalid_request_error",
                "param": "size",
                "code": "invalid_value",
            }
        },
        None,
        errors.UpstreamSizeError,
    ),
    (
        400,
        {
            "error": {
                "message": "Unknown parameter: 'response_format'.",
                "type": "invalid_request_error",
                "param": "response_format",
                "code": "unknown_parameter",
            }
        },
        None,
        errors.UnknownParameterError,
    ),
    (
        429,
        {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
        {"retry-after-ms": "1500"},
        errors.RateLimitedError,
    ),
    (
        500,
        {
            "error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error",
            }
        },
        None,
        errors.UpstreamUnavailableError,
    ),
    # new-api
    (
        401,
        '{"error":{"message":"无效的令牌 (request id: 20260525081234567)",'
        '"type":"new_api_error","param":"","code":""}}',
        None,
        errors.InvalidKeyError,
    ),
    (
        401,
        {"error": {"message": "Invalid token (request id: 2026)", "type": "new_api_error"}},
        None,
        errors.InvalidKeyError,
    ),
    (
        403,
        {
            "error": {
                "message": "用户额度不足, 剩余额度: ＄0.000000 (request id: 2026)",
                "type": "new_api_error",
                "code": "insufficient_user_quota",
            }
        },
        None,
        errors.UpstreamQuotaError,
    ),
    (
        503,
        {
            "error": {
                "message": "分组 default 下模型 gpt-image-2 无可用渠道（distributor）"
                " (request id: 2026)",
                "type": "new_api_error",
                "code": "model_not_found",
            }
        },
        None,
        errors.NoChannelError,
    ),
    (
        403,
        {"error": {"message": "无权访问 vip 分组 (request id: 2026)", "type": "new_api_error"}},
        None,
        errors.GroupDeniedError,
    ),
    (
        400,
        {
            "error": {
                "message": "敏感词检测失败 (request id: 2026)",
                "code": "sensitive_words_detected",
            }
        },
        None,
        errors.ModerationError,
    ),
    (
        400,
        {
            "error": {
                "message": "Invalid size '1919x1079'. Width and height must both be "
                "divisible by 16. (request id: 2026)"
            }
        },
        None,
        errors.UpstreamSizeError,
    ),
    (
        400,
        {"error": {"message": "bad size", "code": "invalid_size"}},
        None,
        errors.UpstreamSizeError,
    ),
    (
        500,
        {
            "error": {
                "message": "上游账号异常（GPT封号） (request id: 2026)",
                "type": "upstream_error",
            }
        },
        None,
        errors.UpstreamUnavailableError,
    ),
    (400, {"error": {"message": "GPT封号了，请稍后再试"}}, None, errors.UpstreamUnavailableError),
    # one-api
    (
        401,
        {"error": {"message": "该令牌已过期", "type": "one_api_error"}},
        None,
        errors.InvalidKeyError,
    ),
    (
        401,
        {"error": {"message": "该令牌额度已用尽", "type": "one_api_error"}},
        None,
        errors.InvalidKeyError,
    ),
    (200, {"success": False, "message": "无效的令牌"}, None, errors.InvalidKeyError),
    (
        501,
        {
            "error": {
                "message": "API not implemented",
                "type": "one_api_error",
                "code": "api_not_implemented",
            }
        },
        None,
        errors.NotSupportedError,
    ),
    # gateways and plain text
    (
        413,
        "<html><head><title>413 Request Entity Too Large</title></head><body>nginx</body></html>",
        None,
        errors.RequestTooLargeError,
    ),
    (502, b"", None, errors.UpstreamUnavailableError),
    (503, None, None, errors.UpstreamUnavailableError),
    (401, "Unauthorized", None, errors.InvalidKeyError),
    (404, "404 page not found", None, errors.UpstreamError),
    (400, {"error": "something odd"}, None, errors.UpstreamError),
]


@pytest.mark.parametrize(("status", "body", "headers", "expected"), CASES)
def test_classify_error_raw_bodies(
    status: int, body: Any, headers: dict[str, str] | None, expected: type[errors.UpstreamError]
) -> None:
    error = classify_error(status, body, headers)
    assert type(error) is expected
    assert error.status == status
    assert len(error.detail) <= 300


def test_classify_keeps_code_param_and_retry_after() -> None:
    unknown = classify_error(400, "Unknown parameter: 'input_fidelity'.")
    assert isinstance(unknown, errors.UnknownParameterError)
    assert unknown.params["param"] == "input_fidelity"
    limited = classify_error(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "1500"})
    assert limited.retry_after == 1.5
    quota = classify_error(403, {"error": {"message": "x", "code": "insufficient_user_quota"}})
    assert quota.code == "insufficient_user_quota"


def test_classify_detail_never_echoes_a_key() -> None:
    body = {
        "error": {
            "message": "Incorrect API key provided: sk-live-SECRET42. Authorization: Bearer abc.def"
        }
    }
    error = classify_error(401, body)
    assert "SECRET42" not in error.detail and "abc.def" not in error.detail
    assert "sk-***" in error.detail
