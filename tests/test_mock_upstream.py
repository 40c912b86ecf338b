"""The offline image API behaves like a new-api reseller in front of gpt-image-2, over real HTTP."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image

from bot.mock_upstream import (
    FAIL_KINDS,
    MockOptions,
    MockUpstream,
    add_cli_arguments,
    run_from_args,
)

KEY = "sk-mock-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


@pytest.fixture
async def client(mock_upstream: MockUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock_upstream.base_url, headers=AUTH, timeout=10) as c:
        yield c


def image_bytes(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, fmt)
    return buffer.getvalue()


def decode_image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))


async def generate(client: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    body = {"model": "gpt-image-2", "prompt": "a red fox", "size": "1024x1024", **fields}
    return await client.post(GENERATIONS, json=body)


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event line or None, data line) pairs, in order."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event = None
        data = ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
        events.append((event, data))
    return events


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


# --- successful answers ---


async def test_generation_returns_b64_png_of_requested_size(client: httpx.AsyncClient) -> None:
    response = await generate(client, size="1536x1024")

    assert response.status_code == 200
    body = response.json()
    image = decode_image(body["data"][0]["b64_json"])
    assert (image.format, image.size) == ("PNG", (1536, 1024))
    assert body["size"] == "1536x1024"
    assert body["model"] == "gpt-image-2"
    assert body["output_format"] == "png"
    assert "a red fox" in body["data"][0]["revised_prompt"]


async def test_noisy_images_weigh_like_real_photos(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    smooth = base64.b64decode((await generate(client)).json()["data"][0]["b64_json"])
    mock_upstream.options.noisy_images = True
    noisy = base64.b64decode((await generate(client, prompt="b")).json()["data"][0]["b64_json"])

    assert Image.open(io.BytesIO(noisy)).size == (1024, 1024)
    # Grain does not compress: close to 3 bytes per pixel, like a real photo's PNG.
    assert len(noisy) > 2_500_000 > 20 * len(smooth)


async def test_b64_items_carry_relay_fields_and_empty_url(client: httpx.AsyncClient) -> None:
    item = (await generate(client)).json()["data"][0]

    assert item["url"] == ""
    assert item["gen_id"] == ""
    assert item["conversation_id"] == ""
    assert item["id"].startswith("compat-generate-")
    assert len(item["source_account_id"]) == 16


async def test_without_extra_fields_items_are_plain_openai(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.extra_fields = False

    item = (await generate(client)).json()["data"][0]

    assert set(item) == {"b64_json", "revised_prompt"}


async def test_n_images_each_drawn_and_usage_follows_cost_formula(
    client: httpx.AsyncClient,
) -> None:
    body = (await generate(client, n=2, quality="high")).json()

    assert len(body["data"]) == 2
    first, second = (base64.b64decode(item["b64_json"]) for item in body["data"])
    assert first != second  # each carries its own "#i" index
    # 7024 output tokens per 1024x1024 high image (upstream-api.md cost table).
    assert body["usage"]["output_tokens"] == 2 * 7024
    assert body["usage"]["input_tokens_details"]["image_tokens"] == 0
    usage = body["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


@pytest.mark.parametrize(
    ("size", "quality", "tokens"),
    [("1024x1024", "low", 196), ("2048x1152", "medium", 1413), ("3840x2160", "auto", 3336)],
)
async def test_usage_output_tokens_match_published_prices(
    mock_upstream: MockUpstream, client: httpx.AsyncClient, size: str, quality: str, tokens: int
) -> None:
    mock_upstream.options.fast_images = True

    body = (await generate(client, size=size, quality=quality)).json()

    assert body["usage"]["output_tokens"] == tokens


async def test_4k_result_is_a_real_png_of_that_size(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    response = await generate(client, size="3840x2160")

    image = decode_image(response.json()["data"][0]["b64_json"])
    assert image.size == (3840, 2160)
    image.load()  # the whole file decodes, not just its header


async def test_jpeg_output_format_gives_jpeg_bytes(client: httpx.AsyncClient) -> None:
    body = (await generate(client, output_format="jpeg", output_compression=70)).json()

    image = decode_image(body["data"][0]["b64_json"])
    assert (image.format, image.size) == ("JPEG", (1024, 1024))
    assert body["output_format"] == "jpeg"


async def test_auto_size_draws_1024_square(client: httpx.AsyncClient) -> None:
    body = (await generate(client, size="auto")).json()

    assert decode_image(body["data"][0]["b64_json"]).size == (1024, 1024)
    assert body["size"] == "1024x1024"


async def test_url_mode_gives_absolute_url_that_downloads_then_expires(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.mode = "url"
    mock_upstream.options.url_ttl = 0.2

    item = (await generate(client)).json()["data"][0]

    assert "b64_json" not in item
    url = item["url"]
    assert url.startswith(f"{mock_upstream.base_url}/files/")
    async with httpx.AsyncClient() as plain:  # downloads need no key
        downloaded = await plain.get(url)
        assert downloaded.status_code == 200
        assert downloaded.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(downloaded.content)).size == (1024, 1024)
        await asyncio.sleep(0.3)
        expired = await plain.get(url)
    assert expired.status_code == 404
    assert expired.text


async def test_generation_request_is_recorded(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    await generate(client, n=2, stream=False)

    recorded = mock_upstream.requests[-1]
    assert recorded.path == GENERATIONS
    assert recorded.fields["prompt"] == "a red fox"
    assert recorded.fields["n"] == "2"
    assert recorded.authorization == f"Bearer {KEY}"
    assert recorded.stream is False
    assert recorded.files == []


async def test_models_lists_gpt_image_2(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert "gpt-image-2" in [model["id"] for model in body["data"]]


# --- edits ---


async def test_edit_records_each_image_part_with_filename_and_type(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    files = [
        ("image[]", ("ref1.png", image_bytes("PNG", (64, 48)), "image/png")),
        ("image[]", ("ref2.jpg", image_bytes("JPEG", (32, 32)), "image/jpeg")),
    ]
    data = {"model": "gpt-image-2", "prompt": "merge them", "size": "1024x1536", "n": "1"}

    response = await client.post(EDITS, data=data, files=files)

    assert response.status_code == 200, response.text
    body = response.json()
    assert decode_image(body["data"][0]["b64_json"]).size == (1024, 1536)
    assert body["data"][0]["id"].startswith("compat-edit-")
    assert body["usage"]["input_tokens_details"]["image_tokens"] > 0
    recorded = mock_upstream.requests[-1]
    assert recorded.path == EDITS
    assert recorded.fields["prompt"] == "merge them"
    assert [(f.field, f.filename, f.content_type) for f in recorded.files] == [
        ("image[]", "ref1.png", "image/png"),
        ("image[]", "ref2.jpg", "image/jpeg"),
    ]
    assert [(f.width, f.height) for f in recorded.files] == [(64, 48), (32, 32)]
    assert recorded.files[0].size == len(files[0][1][1])


async def test_edit_accepts_plain_image_field_name(client: httpx.AsyncClient) -> None:
    files = [("image", ("ref.webp", image_bytes("WEBP"), "image/webp"))]

    response = await client.post(EDITS, data={"prompt": "p"}, files=files)

    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "filename", ["ref1.jpg", "ref1", "ref1.gif"], ids=["wrong-ext", "no-ext", "gif-ext"]
)
async def test_edit_rejects_file_name_not_matching_content(
    client: httpx.AsyncClient, filename: str
) -> None:
    files = [("image[]", (filename, image_bytes("PNG"), "image/png"))]

    response = await client.post(EDITS, data={"prompt": "p"}, files=files)

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "unsupported_file_mimetype"
    assert "unsupported file type" in error["message"]


async def test_edit_rejects_part_that_is_not_an_image(client: httpx.AsyncClient) -> None:
    files = [("image[]", ("ref1.png", b"definitely not a png", "image/png"))]

    response = await client.post(EDITS, data={"prompt": "p"}, files=files)

    assert response.status_code == 400
    assert error_of(response)["param"] == "image[]"


async def test_edit_without_images_is_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post(EDITS, data={"prompt": "p"}, files={"note": ("a.txt", b"x")})

    assert response.status_code == 400
    assert error_of(response)["code"] == "missing_required_parameter"


# --- streaming ---


async def test_stream_sends_partials_then_completed_then_done(client: httpx.AsyncClient) -> None:
    response = await generate(client, size="1024x1536", stream=True, partial_images=2)

    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [event for event, _ in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
        None,
    ]
    assert events[-1][1] == "[DONE]"
    partials = [json.loads(data) for _, data in events[:2]]
    assert [p["partial_image_index"] for p in partials] == [0, 1]
    assert all(p["type"] == "image_generation.partial_image" for p in partials)
    assert decode_image(partials[0]["b64_json"]).format == "PNG"
    completed = json.loads(events[2][1])
    assert completed["type"] == "image_generation.completed"
    assert decode_image(completed["b64_json"]).size == (1024, 1536)
    assert completed["size"] == "1024x1536"
    assert completed["usage"]["output_tokens"] > 0


async def test_stream_edit_uses_image_edit_event_types(client: httpx.AsyncClient) -> None:
    files = [("image[]", ("ref1.png", image_bytes("PNG"), "image/png"))]
    data = {"prompt": "p", "stream": "true", "partial_images": "1"}

    response = await client.post(EDITS, data=data, files=files)

    types = [json.loads(d)["type"] for _, d in sse_events(response.text) if d != "[DONE]"]
    assert types == ["image_edit.partial_image", "image_edit.completed"]


async def test_stream_with_n_two_completes_each_image(client: httpx.AsyncClient) -> None:
    response = await generate(client, stream=True, n=2)

    events = [event for event, _ in sse_events(response.text)]
    assert events == ["image_generation.completed", "image_generation.completed", None]


async def test_stream_in_url_mode_completes_with_url(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.mode = "url"

    response = await generate(client, stream=True, partial_images=1)

    completed = json.loads(sse_events(response.text)[1][1])
    assert "b64_json" not in completed
    assert (await client.get(completed["url"])).status_code == 200


async def test_stream_disabled_answers_plain_json(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.stream = False

    response = await generate(client, stream=True, partial_images=2)

    assert response.headers["content-type"].startswith("application/json")
    assert decode_image(response.json()["data"][0]["b64_json"]).size == (1024, 1024)
    assert mock_upstream.requests[-1].stream is True


async def test_stream_latency_is_spread_over_events(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.latency = 1.5
    arrivals: list[float] = []
    started = time.monotonic()

    body = {"prompt": "p", "size": "1024x1024", "stream": True, "partial_images": 2}
    async with client.stream("POST", GENERATIONS, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)

    assert len(arrivals) == 4
    # Pauses of latency/3 before each partial and the completed event: the first partial comes
    # well before the last event. Relative, so a loaded machine's stalls do not fail it.
    assert arrivals[-1] - arrivals[0] >= 0.6
    assert arrivals[-1] >= 1.45


# --- failures ---


@pytest.mark.parametrize(
    ("kind", "status", "code", "fragment"),
    [
        ("invalid_key", 401, "", "无效的令牌"),
        ("token_expired", 401, "", "该令牌已过期"),
        ("token_exhausted", 401, "", "该令牌额度已用尽"),
        ("quota", 403, "insufficient_user_quota", "用户额度不足"),
        ("openai_quota", 429, "insufficient_quota", "exceeded your current quota"),
        ("no_channel", 503, "model_not_found", "分组 default 下模型 gpt-image-2 无可用渠道"),
        ("group_denied", 403, "", "无权访问 vip 分组"),
        ("moderation", 400, "moderation_blocked", "safety_violations=[sexual]"),
        ("content_policy", 400, "content_policy_violation", "safety system"),
        ("sensitive_words", 400, "sensitive_words_detected", "敏感词检测失败"),
        ("invalid_size", 400, "invalid_value", "Invalid size '1024x1024'"),
        ("unknown_parameter", 400, "unknown_parameter", "response_format"),
        ("rate_limit", 429, "rate_limit_exceeded", "Rate limit"),
        ("upstream_banned", 500, "account_deactivated", "GPT封号"),
        ("server_error", 500, None, "server had an error"),
        ("not_implemented", 501, "api_not_implemented", "not implemented"),
    ],
)
async def test_injected_error_has_documented_status_and_envelope(
    mock_upstream: MockUpstream,
    client: httpx.AsyncClient,
    kind: str,
    status: int,
    code: str | None,
    fragment: str,
) -> None:
    mock_upstream.options.fail = kind

    response = await generate(client)

    assert response.status_code == status
    error = error_of(response)
    assert error["code"] == code
    assert fragment in error["message"]
    assert " (request id: " in error["message"]


async def test_moderation_error_has_gpt_image_type(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.fail = "moderation"

    error = error_of(await generate(client))

    assert error["type"] == "image_generation_user_error"


async def test_rate_limit_carries_retry_after_but_quota_does_not(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.fail = "rate_limit"
    limited = await generate(client)
    mock_upstream.options.fail = "openai_quota"
    quota = await generate(client)

    assert limited.headers["retry-after"] == "1"
    assert "retry-after" not in quota.headers


@pytest.mark.parametrize(("kind", "status"), [("bad_gateway", 502), ("unavailable", 503)])
async def test_gateway_failures_have_empty_bodies(
    mock_upstream: MockUpstream, client: httpx.AsyncClient, kind: str, status: int
) -> None:
    mock_upstream.options.fail = kind

    response = await generate(client)

    assert (response.status_code, response.content) == (status, b"")


async def test_too_large_is_413(mock_upstream: MockUpstream, client: httpx.AsyncClient) -> None:
    mock_upstream.options.fail = "too_large"

    response = await generate(client)

    assert response.status_code == 413
    assert "413" in response.text


async def test_malformed_is_200_json_content_type_that_does_not_parse(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.fail = "malformed"

    response = await generate(client)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)


async def test_no_data_is_empty_list(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.fail = "no_data"

    response = await generate(client)

    assert response.json() == {"created": 1, "data": []}


async def test_truncated_b64_is_not_a_decodable_image(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.fail = "truncated_b64"

    b64 = (await generate(client)).json()["data"][0]["b64_json"]

    assert b64.startswith("iVBORw0KGgo")  # starts like a PNG...
    with pytest.raises(binascii.Error):  # ...but is cut mid-way
        base64.b64decode(b64, validate=True)


async def test_expired_url_answer_links_to_404(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.fail = "expired_url"

    item = (await generate(client)).json()["data"][0]

    assert (await client.get(item["url"])).status_code == 404


async def test_stream_cut_closes_after_a_partial_without_completion(
    client: httpx.AsyncClient,
) -> None:
    seen: list[str] = []
    body = {"prompt": "a fox [fail:stream_cut]", "size": "1024x1024", "stream": True}

    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", GENERATIONS, json=body) as response:
            async for line in response.aiter_lines():
                seen.append(line)

    types = [json.loads(line[6:])["type"] for line in seen if line.startswith("data: {")]
    assert types == ["image_generation.partial_image"]
    assert "data: [DONE]" not in seen


async def test_stream_error_sends_error_event(client: httpx.AsyncClient) -> None:
    response = await generate(client, prompt="a fox [fail:stream_error]", stream=True)

    events = sse_events(response.text)
    assert [event for event, _ in events] == ["error"]
    payload = json.loads(events[0][1])
    assert payload["type"] == "error"
    assert payload["error"]["code"] == "moderation_blocked"


async def test_flaky_fails_first_n_requests_per_prompt_then_succeeds(
    client: httpx.AsyncClient,
) -> None:
    statuses = [(await generate(client, prompt="cat [fail:flaky_2]")).status_code for _ in range(3)]
    other = await generate(client, prompt="dog [fail:flaky_2]")

    assert statuses == [503, 503, 200]
    assert other.status_code == 503


async def test_prompt_marker_wins_over_option(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.fail = "moderation"

    marked = await generate(client, prompt="a fox [fail:no_channel]")
    unmarked = await generate(client, prompt="a fox")

    assert marked.status_code == 503
    assert error_of(unmarked)["code"] == "moderation_blocked"


async def test_unknown_fail_kind_is_loud(client: httpx.AsyncClient) -> None:
    response = await generate(client, prompt="x [fail:no_such_kind]")

    assert response.status_code == 400
    assert "no_such_kind" in error_of(response)["message"]


def test_every_documented_kind_is_listed() -> None:
    documented = {
        "invalid_key", "token_expired", "token_exhausted", "quota", "openai_quota",
        "no_channel", "group_denied", "moderation", "content_policy", "sensitive_words",
        "invalid_size", "unknown_parameter", "rate_limit", "too_large", "upstream_banned",
        "server_error", "bad_gateway", "unavailable", "not_implemented", "timeout",
        "malformed", "no_data", "truncated_b64", "expired_url", "stream_cut", "stream_error",
        "flaky_N",
    }  # fmt: skip

    assert documented <= set(FAIL_KINDS)


# --- validation ---


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        ("1919x1079", "Width and height must both be divisible by 16."),
        ("3840x1024", "aspect ratio"),
        ("4096x2048", "longest edge"),
        ("512x512", "total number of pixels"),
        ("big", "WIDTHxHEIGHT"),
    ],
)
async def test_invalid_size_names_the_size(
    client: httpx.AsyncClient, size: str, fragment: str
) -> None:
    response = await generate(client, size=size)

    assert response.status_code == 400
    error = error_of(response)
    assert error["message"].startswith(f"Invalid size '{size}'.")
    assert fragment in error["message"]
    assert error["param"] == "size"


async def test_gpt_image_1_accepts_only_its_three_sizes(client: httpx.AsyncClient) -> None:
    rejected = await generate(client, model="gpt-image-1", size="2048x2048")
    accepted = await generate(client, model="gpt-image-1", size="1536x1024")

    assert rejected.status_code == 400
    assert accepted.status_code == 200


async def test_reject_4k_refuses_long_edges_above_2560(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.reject_4k = True
    mock_upstream.options.fast_images = True

    rejected = await generate(client, size="3840x2160")
    accepted = await generate(client, size="2048x1152")

    assert rejected.status_code == 400
    assert "Invalid size '3840x2160'" in error_of(rejected)["message"]
    assert accepted.status_code == 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"n": "2"}, "n"),
        ({"quality": "ultra"}, "quality"),
        ({"background": "green"}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"partial_images": 4}, "partial_images"),
    ],
)
async def test_bad_parameter_is_400_naming_it(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str
) -> None:
    response = await generate(client, **fields)

    assert response.status_code == 400
    assert error_of(response)["param"] == param


async def test_missing_prompt_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(GENERATIONS, json={"size": "1024x1024"})

    assert response.status_code == 400
    assert error_of(response)["code"] == "missing_required_parameter"


async def test_response_format_is_rejected_like_openai(client: httpx.AsyncClient) -> None:
    response = await generate(client, response_format="b64_json")

    assert response.status_code == 400
    error = error_of(response)
    assert (error["code"], error["param"]) == ("unknown_parameter", "response_format")


async def test_response_format_honoured_when_accepted(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.accept_response_format = True

    item = (await generate(client, response_format="url")).json()["data"][0]

    assert item["url"].startswith(mock_upstream.base_url)


async def test_unknown_fields_are_ignored(client: httpx.AsyncClient) -> None:
    response = await generate(client, style="vivid", input_fidelity="high")

    assert response.status_code == 200


# --- auth ---


async def test_missing_bearer_is_401_no_token(mock_upstream: MockUpstream) -> None:
    async with httpx.AsyncClient(base_url=mock_upstream.base_url) as anonymous:
        response = await anonymous.post(GENERATIONS, json={"prompt": "p"})

    assert response.status_code == 401
    error = error_of(response)
    assert error["message"].startswith("未提供令牌 (request id: ")
    assert error["type"] == "new_api_error"


async def test_api_key_set_rejects_other_bearer(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.api_key = "sk-the-right-one"

    wrong = await generate(client)
    right = await client.post(
        GENERATIONS,
        json={"prompt": "p", "size": "1024x1024"},
        headers={"Authorization": "Bearer sk-the-right-one"},
    )

    assert wrong.status_code == 401
    assert "无效的令牌" in error_of(wrong)["message"]
    assert right.status_code == 200


# --- latency and shutdown ---


async def test_latency_delays_the_answer(
    mock_upstream: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock_upstream.options.latency = 0.3
    started = time.monotonic()

    response = await generate(client)

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3


async def wait_for_requests(mock: MockUpstream, count: int) -> None:
    for _ in range(200):
        if len(mock.requests) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the mock never received the request")


async def test_stop_returns_promptly_while_a_timeout_request_is_pending() -> None:
    mock = MockUpstream(MockOptions(fail="timeout"))
    await mock.start()
    async with httpx.AsyncClient(base_url=mock.base_url, headers=AUTH, timeout=30) as c:
        pending = asyncio.create_task(c.post(GENERATIONS, json={"prompt": "p"}))
        await wait_for_requests(mock, 1)

        started = time.monotonic()
        await mock.stop()
        stopped_in = time.monotonic() - started

        with pytest.raises(httpx.TransportError):
            await asyncio.wait_for(pending, 5)
    assert stopped_in < 1.5


async def test_stop_returns_promptly_with_a_stream_open() -> None:
    mock = MockUpstream(MockOptions(latency=60))
    await mock.start()
    body = {"prompt": "p", "size": "1024x1024", "stream": True, "partial_images": 3}
    async with httpx.AsyncClient(base_url=mock.base_url, headers=AUTH, timeout=30) as c:

        async def read_stream() -> None:
            async with c.stream("POST", GENERATIONS, json=body) as response:
                async for _ in response.aiter_bytes():
                    pass

        reader = asyncio.create_task(read_stream())
        await wait_for_requests(mock, 1)
        await asyncio.sleep(0.05)

        started = time.monotonic()
        await mock.stop()
        stopped_in = time.monotonic() - started

        with pytest.raises(httpx.TransportError):
            await asyncio.wait_for(reader, 5)
    assert stopped_in < 1.5


async def test_context_manager_starts_and_stops() -> None:
    async with MockUpstream() as mock:
        async with httpx.AsyncClient(base_url=mock.base_url, headers=AUTH) as c:
            assert (await c.get("/v1/models")).status_code == 200
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=mock.base_url, headers=AUTH) as c:
            await c.get("/v1/models")


# --- command line ---


def test_cli_arguments_map_to_options() -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)

    args = parser.parse_args(
        ["--mode", "url", "--latency", "1.5", "--no-stream", "--fail", "flaky_3", "--reject-4k"]
    )

    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert (args.mode, args.latency, args.stream, args.fail) == ("url", 1.5, False, "flaky_3")
    assert args.reject_4k and not args.fast_images
    with pytest.raises(SystemExit):
        parser.parse_args(["--fail", "no_such_kind"])


async def test_run_from_args_serves_and_prints_base_url(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--port", "0", "--mode", "url", "--api-key", KEY])
    server = asyncio.create_task(run_from_args(args))
    try:
        base_url = ""
        for _ in range(200):
            base_url = capsys.readouterr().out.strip()
            if base_url:
                break
            await asyncio.sleep(0.01)
        assert base_url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH) as c:
            item = (await c.post(GENERATIONS, json={"prompt": "p"})).json()["data"][0]
        assert item["url"].startswith(base_url)
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server


# --- /v1/models options and the balance endpoints (new-api / one-api shapes) ---


async def test_models_list_can_leave_the_model_out(mock_factory: Any) -> None:
    mock = await mock_factory(models=("gpt-image-1",))
    async with httpx.AsyncClient(base_url=mock.base_url, headers=AUTH) as c:
        ids = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
    assert ids == ["gpt-image-1"]


async def test_new_api_billing_reports_total_as_hard_limit_and_spending_as_usage(
    client: httpx.AsyncClient, mock_upstream: MockUpstream
) -> None:
    assert (await generate(client, quality="low")).status_code == 200
    spent = mock_upstream.spent
    # 196 output tokens at $30/M plus a few text tokens at $5/M.
    assert 196 * 30 / 1e6 < spent < 0.0065
    sub = (await client.get("/v1/dashboard/billing/subscription")).json()
    assert sub["object"] == "billing_subscription"
    assert sub["hard_limit_usd"] == pytest.approx(25.0)  # new-api: left + used
    usage = (await client.get("/dashboard/billing/usage")).json()
    assert usage == {"object": "list", "total_usage": pytest.approx(spent * 100)}
    token = (await client.get("/api/usage/token/")).json()
    assert token["code"] is True and token["data"]["object"] == "token_usage"
    assert token["data"]["total_available"] == round((25.0 - spent) * 500_000)
    assert token["data"]["total_granted"] == token["data"]["total_available"] + round(
        spent * 500_000
    )


async def test_one_api_billing_reports_what_is_left_and_has_no_token_endpoint(
    mock_factory: Any,
) -> None:
    mock = await mock_factory(billing="one-api", balance=3.0)
    async with httpx.AsyncClient(base_url=mock.base_url, headers=AUTH) as c:
        assert (await generate(c, quality="low")).status_code == 200
        sub = (await c.get("/v1/dashboard/billing/subscription")).json()
        assert sub["hard_limit_usd"] == pytest.approx(3.0 - mock.spent)
        assert (await c.get("/api/usage/token/")).status_code == 404


async def test_billing_none_answers_404_and_unlimited_reports_the_relays_sentinel(
    mock_factory: Any,
) -> None:
    bare = await mock_factory(billing="none")
    unlimited = await mock_factory(unlimited=True)
    async with httpx.AsyncClient(headers=AUTH) as c:
        for path in ("/v1/dashboard/billing/subscription", "/v1/dashboard/billing/usage"):
            assert (await c.get(bare.base_url + path)).status_code == 404
        sub = (await c.get(unlimited.base_url + "/v1/dashboard/billing/subscription")).json()
        assert sub["hard_limit_usd"] == 100_000_000
        token = (await c.get(unlimited.base_url + "/api/usage/token/")).json()
        assert token["data"]["unlimited_quota"] is True


async def test_balance_endpoints_refuse_a_wrong_key_like_the_image_routes(
    mock_factory: Any,
) -> None:
    mock = await mock_factory(api_key="sk-the-right-key-0000")
    async with httpx.AsyncClient(base_url=mock.base_url, headers=AUTH) as c:
        for path in ("/v1/dashboard/billing/subscription", "/api/usage/token/", "/v1/models"):
            response = await c.get(path)
            assert response.status_code == 401
            assert "无效的令牌" in response.json()["error"]["message"]


async def test_a_rejected_request_is_not_charged(
    client: httpx.AsyncClient, mock_upstream: MockUpstream
) -> None:
    assert (await generate(client, size="1919x1079")).status_code == 400
    assert mock_upstream.spent == 0.0


def test_cli_sets_models_billing_and_balance() -> None:
    from bot.mock_upstream import _options_from_args

    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--models", "a,b", "--billing", "one-api", "--balance", "2.5"])
    options = _options_from_args(args)
    assert (options.models, options.billing, options.balance) == (("a", "b"), "one-api", 2.5)
