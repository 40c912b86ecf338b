"""Real relays' behaviour (one-api, litellm; relays.md) through a relay double over HTTP.

Streaming is learned per provider and kept in the store; fail-over happens only on answers
that prove nothing ran (so the upstream bills once); each relay's own error bodies give the
right error and a message that says what the relay meant; one-api's broken edits route
edits elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot import errors
from bot.config import ProviderConfig, Settings
from bot.i18n import CATALOGS, t
from bot.images import Reference
from bot.mock_upstream import MockUpstream
from bot.secrets import KeyBox
from bot.services import Services
from bot.store import Store
from bot.upstream import (
    CapabilityStore,
    ImageRequest,
    Progress,
    ProviderChain,
    UpstreamClient,
    build_clients,
)
from bot.upstream.classify import FALLBACK, ROWS, Row, Sample, classify_error, find_row, read_answer
from tests.recording_chat import invocation, left, run_command
from tests.relay_double import LITELLM, ONE_API, RelayDouble

KEY = "sk-test-relay-user-123456"

RelayFactory = Callable[..., Awaitable[tuple[RelayDouble, MockUpstream]]]


@pytest.fixture
async def relay_factory(
    mock_factory: Callable[..., Awaitable[MockUpstream]],
) -> AsyncIterator[RelayFactory]:
    """Start a relay double (and a mock upstream behind it); all stopped after the test."""
    started: list[RelayDouble] = []

    async def start(
        family: str = ONE_API, upstream: MockUpstream | None = None, **options: Any
    ) -> tuple[RelayDouble, MockUpstream]:
        behind = upstream or await mock_factory()
        relay = RelayDouble(behind.base_url, family, **options)
        await relay.start()
        started.append(relay)
        return relay, behind

    try:
        yield start
    finally:
        for relay in started:
            await relay.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """The bot's store in a temp data dir (where learned capabilities are kept)."""
    opened = await open_store(tmp_path / "data")
    try:
        yield opened
    finally:
        await opened.close()


async def open_store(data_dir: Path) -> Store:
    return await Store.open(data_dir / "drawbridge.sqlite3", keybox=KeyBox.load(data_dir))


def settings_for(*entries: dict[str, Any], **overrides: Any) -> Settings:
    """Settings as an operator writes them: defaults, plus DRAWBRIDGE_PROVIDERS entries."""
    providers = [{"api_key": KEY, "max_retries": 0, "timeout": 20.0, **entry} for entry in entries]
    return Settings(_env_file=None, providers_json=providers, **overrides)


def chain_for(settings: Settings, store: Store | None) -> ProviderChain:
    caps = CapabilityStore(store) if store is not None else None
    return ProviderChain(build_clients(settings.providers(), capabilities=caps))


async def draw(chain: ProviderChain, prompt: str = "a lighthouse", **kw: Any) -> Any:
    return await chain.run(ImageRequest(prompt, size="1024x1024", **kw))


def png_reference() -> Reference:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "blue").save(buffer, "PNG")
    return Reference(buffer.getvalue(), "ref1.png", "image/png", 64, 48)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Progress] = []

    async def __call__(self, event: Progress) -> None:
        self.events.append(event)


def stream_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and '"stream": false' in r.getMessage()
    ]


# --- streaming, learned per provider ---


def test_stream_setting_is_learned_by_default_and_forced_only_when_explicit() -> None:
    learned, forced, never = settings_for(
        {"name": "a", "api_base": "http://a"},
        {"name": "b", "api_base": "http://b", "stream": True},
        {"name": "c", "api_base": "http://c", "stream": False},
    ).providers()
    assert (learned.stream, forced.stream, never.stream) == (None, True, False)
    off = settings_for({"name": "a", "api_base": "http://a"}, stream=False).providers()[0]
    assert off.stream is False


async def test_one_api_default_settings_learn_not_to_stream_after_one_plain_retry(
    relay_factory: RelayFactory,
    store: Store,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay, _ = await relay_factory(ONE_API)
    settings = settings_for({"name": "oneapi", "api_base": relay.base_url})
    chain = chain_for(settings, store)
    events = Recorder()
    caplog.set_level(logging.INFO)

    first = await chain.run(ImageRequest("a lighthouse", size="1024x1024"), events)

    assert first.images and first.provider == "oneapi"
    assert relay.streamed_flags() == [True, False]  # exactly one non-streamed retry
    assert relay.billed == 2  # the streamed attempt was made and billed upstream: the cost
    assert any(e.kind == "retry" and e.detail == "without_stream" for e in events.events)
    learned = await store.provider_capabilities("oneapi")
    assert learned["stream"] is False and learned["stream_checked_at"] > 0

    await draw(chain, "a second lighthouse")
    assert relay.streamed_flags() == [True, False, False]
    assert relay.billed == 3  # one upstream request for the second draw

    # A fresh client on the same data dir (another process would read the same) does not
    # stream either.
    other_store = await open_store(tmp_path / "data")
    try:
        await draw(chain_for(settings, other_store), "a third lighthouse")
    finally:
        await other_store.close()
    assert relay.streamed_flags() == [True, False, False, False]
    assert relay.billed == 4
    assert len(stream_warnings(caplog)) == 1
    await chain.aclose()


async def test_the_bot_learns_through_its_job_runner_and_remembers_after_a_restart(
    relay_factory: RelayFactory, settings_factory: Callable[..., Settings]
) -> None:
    relay, _ = await relay_factory(ONE_API)
    settings = settings_factory(api_base=relay.base_url)  # DRAWBRIDGE_STREAM=true, the default
    services = await Services.create(settings)
    try:
        first = await run_command(services, invocation("draw", "a red fox"))
        second = await run_command(services, invocation("draw", "a blue fox"))
        assert first.results() and second.results()
    finally:
        await services.close()
    assert relay.streamed_flags() == [True, False, False]

    restarted = await Services.create(settings)
    try:
        assert (await run_command(restarted, invocation("draw", "a green fox"))).results()
    finally:
        await restarted.close()
    assert relay.streamed_flags() == [True, False, False, False]


async def test_the_cli_reads_what_the_bot_learned_and_does_not_stream(
    relay_factory: RelayFactory, tmp_path: Path, store_url: str
) -> None:
    """On either engine: with DRAWBRIDGE_DATABASE_URL the CLI reads the bot's PostgreSQL, not
    a SQLite file of its own in the data directory."""
    relay, _ = await relay_factory(ONE_API)
    data_dir = tmp_path / "data"
    learned = await Store.connect(store_url, keybox=KeyBox.load(data_dir))
    try:
        await CapabilityStore(learned).learn("default", stream=False, stream_checked_at=time.time())
    finally:
        await learned.close()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DRAWBRIDGE_", "TELEGRAM_", "DISCORD_", "QQ_"))
    }
    env.update(
        DRAWBRIDGE_API_BASE=relay.base_url,
        DRAWBRIDGE_API_KEY=KEY,
        DRAWBRIDGE_DATA_DIR=str(data_dir),
    )
    if store_url.startswith("postgresql"):
        env["DRAWBRIDGE_DATABASE_URL"] = store_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "draw",
        "a lighthouse",
        "--size",
        "1:1",
        "-o",
        str(tmp_path / "out"),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert relay.streamed_flags() == [False]
    assert relay.billed == 1


async def test_litellm_default_settings_learn_not_to_stream(
    relay_factory: RelayFactory, store: Store
) -> None:
    relay, _ = await relay_factory(LITELLM)
    chain = chain_for(settings_for({"name": "lite", "api_base": relay.base_url}), store)
    await draw(chain)
    await draw(chain, "again")
    assert relay.streamed_flags() == [True, False, False]
    assert relay.billed == 3
    assert (await store.provider_capabilities("lite"))["stream"] is False


async def test_explicit_stream_true_is_not_learned_and_fails_as_it_is(
    relay_factory: RelayFactory, mock_factory: Callable[..., Awaitable[MockUpstream]], store: Store
) -> None:
    relay, _ = await relay_factory(ONE_API)
    second = await mock_factory()
    settings = settings_for(
        {"name": "oneapi", "api_base": relay.base_url, "stream": True},
        {"name": "second", "api_base": second.base_url},
    )
    chain = chain_for(settings, store)
    with pytest.raises(errors.RelayStreamError) as caught:
        await draw(chain)
    # One billed upstream image, no second try anywhere: a 500 after forwarding is not
    # proof that nothing ran.
    assert relay.streamed_flags() == [True] and relay.billed == 1
    assert second.requests == []
    assert "stream" not in await store.provider_capabilities("oneapi")
    assert caught.value.unbilled is False
    message = t("en", caught.value.key, **caught.value.params)
    assert '"stream": false' in message and "try again" not in message.lower()


async def test_a_provider_found_unable_to_stream_is_probed_again_after_a_day(
    relay_factory: RelayFactory,
    mock_factory: Callable[..., Awaitable[MockUpstream]],
    store: Store,
) -> None:
    relay, _ = await relay_factory(ONE_API)
    caps = CapabilityStore(store)
    settings = settings_for({"name": "oneapi", "api_base": relay.base_url})
    await caps.learn("oneapi", stream=False, stream_checked_at=time.time() - 3600)
    chain = ProviderChain(build_clients(settings.providers(), capabilities=caps))
    await draw(chain)
    assert relay.streamed_flags() == [False]  # checked an hour ago: not probed

    two_days_ago = time.time() - 2 * 86400
    await caps.learn("oneapi", stream_checked_at=two_days_ago)
    await draw(chain)
    assert relay.streamed_flags() == [False, True, False]  # probed, still broken
    after = await caps.get("oneapi")
    assert after.stream is False and (after.stream_checked_at or 0) > two_days_ago

    # The relay was upgraded (here: the upstream served directly): the probe succeeds.
    upgraded = await mock_factory()
    await caps.learn("upgraded", stream=False, stream_checked_at=two_days_ago)
    direct = ProviderChain(
        build_clients(
            settings_for({"name": "upgraded", "api_base": upgraded.base_url}).providers(),
            capabilities=caps,
        )
    )
    await draw(direct)
    assert [r.stream for r in upgraded.requests] == [True]
    assert (await caps.get("upgraded")).stream is True  # known at once
    await direct.aclose()  # and written by the time the client is closed
    assert (await store.provider_capabilities("upgraded"))["stream"] is True


async def test_learning_works_without_a_store_for_the_life_of_the_client(
    relay_factory: RelayFactory,
) -> None:
    relay, _ = await relay_factory(ONE_API)
    chain = chain_for(settings_for({"name": "oneapi", "api_base": relay.base_url}), None)
    await draw(chain)
    await draw(chain, "again")
    assert relay.streamed_flags() == [True, False, False]


async def test_a_relay_refusing_stream_as_unknown_is_remembered_for_new_clients(
    mock_factory: Callable[..., Awaitable[MockUpstream]], store: Store
) -> None:
    strict = await mock_factory(refuse_fields=("partial_images",))
    settings = settings_for({"name": "strict", "api_base": strict.base_url})
    await draw(chain_for(settings, store))
    await draw(chain_for(settings, store), "again")  # a new client, as after a restart
    assert [r.stream for r in strict.requests] == [True, False, False]


async def test_results_4k_and_edits_are_recorded_as_seen(
    mock_factory: Callable[..., Awaitable[MockUpstream]], store: Store
) -> None:
    small = await mock_factory(mode="url", reject_4k=True)
    chain = chain_for(settings_for({"name": "small", "api_base": small.base_url}), store)
    result = await chain.run(ImageRequest("a wide sea", size="3840x2160"))
    assert result.fallback_size is not None
    await chain.run(ImageRequest("recolour", references=(png_reference(),)))
    await chain.aclose()  # what an answer showed is written beside it, by the close at last
    learned = await store.provider_capabilities("small")
    assert learned["four_k"] is False and learned["result"] == "url"
    assert learned["edits"] is True and learned["stream"] is True


async def test_what_the_bot_learned_in_the_background_is_written_by_its_close(
    settings_factory: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`drawbridge run`'s stop (Services.close) waits for the lessons still being written;
    one the store refuses is logged with its provider, and costs the job nothing."""
    real = Store.update_provider_capabilities

    async def slow(self: Store, provider: str, changes: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.3)  # still on its way when the job is done and the bot stops
        return await real(self, provider, changes)

    monkeypatch.setattr(Store, "update_provider_capabilities", slow)
    settings = settings_factory()
    services = await Services.create(settings)
    try:
        assert (await run_command(services, invocation("draw", "a red fox"))).results()
    finally:
        await services.close()
    store = await Store.connect(settings.database(), keybox=KeyBox.load(settings.data_dir))
    try:
        learned = await store.provider_capabilities("default")
    finally:
        await store.close()
    assert learned["stream"] is True and learned["result"] == "b64"

    async def refused(self: Store, provider: str, changes: dict[str, Any]) -> dict[str, Any]:
        raise OSError("disk full")

    monkeypatch.setattr(Store, "update_provider_capabilities", refused)
    entry = {"name": "fresh", "api_base": settings.api_base, "api_key": settings.api_key}
    fresh = settings_factory(providers_json=[entry])
    caplog.set_level(logging.WARNING)
    services = await Services.create(fresh)
    try:
        chat = await run_command(services, invocation("draw", "a blue fox"))
        # Charged as any job: its user's second draw of the day (same data dir).
        assert chat.results() and await left(services) == fresh.daily_credits - 2
        known = services.jobs.clients[0].capabilities.cached("fresh")
        assert known.stream is True and known.result == "b64"  # known, though not written
    finally:
        await services.close()
    assert any("fresh: cannot record what was learned" in r.getMessage() for r in caplog.records)


async def test_a_wave_of_answers_learns_once_and_no_answer_waits_for_the_write(
    mock_factory: Callable[..., Awaitable[MockUpstream]],
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst's first wave (50 requests answering together) on a relay not known yet."""
    upstream = await mock_factory()
    writes: list[dict[str, Any]] = []
    held, held_second = asyncio.Event(), asyncio.Event()
    real = store.update_provider_capabilities

    async def held_back(provider: str, changes: dict[str, Any]) -> dict[str, Any]:
        writes.append(changes)
        # A slow database: nothing the answers should wait for.
        await (held if len(writes) == 1 else held_second).wait()
        return await real(provider, changes)

    monkeypatch.setattr(store, "update_provider_capabilities", held_back)
    chain = chain_for(settings_for({"name": "fresh", "api_base": upstream.base_url}), store)
    results = await asyncio.wait_for(
        asyncio.gather(*(draw(chain, f"wave {i}") for i in range(50))), timeout=30
    )
    assert len(results) == 50 and all(r.images for r in results)
    assert all(r.stream for r in upstream.requests)
    # Known at once to the whole process; not written yet (the next write waits its turn).
    known = chain.clients[0].capabilities.cached("fresh")
    assert known.stream is True and known.result == "b64"
    assert await store.provider_capabilities("fresh") == {}
    held.set()
    for _ in range(100):  # the first write lands, the second is held
        if len(writes) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(writes) == 2
    known = chain.clients[0].capabilities.cached("fresh")
    assert known.stream is True and known.result == "b64"  # still known, though unwritten
    held_second.set()
    await chain.aclose()
    # Learned once for the wave (it streams, it answers b64), in the order learned.
    assert [sorted(changes) for changes in writes] == [["stream", "stream_checked_at"], ["result"]]
    stored = await store.provider_capabilities("fresh")
    assert stored["stream"] is True and stored["result"] == "b64"


# --- fail over only when surely unbilled ---


async def test_one_api_500_after_forwarding_does_not_fail_over(
    relay_factory: RelayFactory, mock_factory: Callable[..., Awaitable[MockUpstream]]
) -> None:
    # The upstream answers an HTML 502 page: one-api turns it into 500 "invalid character '<'".
    relay, upstream = await relay_factory(ONE_API, await mock_factory(fail="html_502"))
    second = await mock_factory()
    chain = chain_for(
        settings_for(
            {"name": "oneapi", "api_base": relay.base_url, "stream": False},
            {"name": "second", "api_base": second.base_url},
        ),
        None,
    )
    with pytest.raises(errors.RelayFailedError) as caught:
        await draw(chain)
    assert len(upstream.requests) == 1 and second.requests == []
    message = t("en", caught.value.key, **caught.value.params)
    assert "invalid character" in message and "try again" not in message.lower()


async def test_upstream_500_with_a_body_does_not_fail_over(
    mock_factory: Callable[..., Awaitable[MockUpstream]],
) -> None:
    first = await mock_factory(fail="server_error")
    second = await mock_factory()
    chain = chain_for(
        settings_for(
            {"name": "first", "api_base": first.base_url},
            {"name": "second", "api_base": second.base_url},
        ),
        None,
    )
    with pytest.raises(errors.UpstreamUnavailableError):
        await draw(chain)
    assert len(first.requests) == 1 and second.requests == []


@pytest.mark.parametrize("through", ["direct", "one-api"])
async def test_empty_502_and_one_api_rewrap_of_it_fail_over(
    relay_factory: RelayFactory,
    mock_factory: Callable[..., Awaitable[MockUpstream]],
    through: str,
) -> None:
    broken = await mock_factory(fail="bad_gateway")
    base = broken.base_url
    if through == "one-api":
        relay, _ = await relay_factory(ONE_API, broken)
        base = relay.base_url
    second = await mock_factory()
    chain = chain_for(
        settings_for(
            {"name": "first", "api_base": base, "stream": False},
            {"name": "second", "api_base": second.base_url, "stream": False},
        ),
        None,
    )
    result = await draw(chain)
    assert result.provider == "second"
    assert len(broken.requests) == 1 and len(second.requests) == 1


async def test_one_api_rewrap_of_an_empty_502_is_retried_on_the_same_provider(
    relay_factory: RelayFactory, mock_factory: Callable[..., Awaitable[MockUpstream]]
) -> None:
    flaky = await mock_factory(fail="flaky_1")
    relay, _ = await relay_factory(ONE_API, flaky)
    entry = {"name": "oneapi", "api_base": relay.base_url, "stream": False, "max_retries": 1}
    chain = chain_for(settings_for(entry), None)
    result = await draw(chain)
    assert result.images and len(flaky.requests) == 2


# --- the relays' own error bodies, end to end ---

RELAY_ERRORS: list[tuple[str, str | None, dict[str, Any], type[errors.UpstreamError], str]] = [
    # family, upstream failure, provider/relay options, error, what the user must read
    (ONE_API, None, {"tokens": frozenset({"sk-other"})}, errors.InvalidKeyError, "/token"),
    (ONE_API, None, {"model": "gpt-image-9"}, errors.NoChannelError, "group"),
    (ONE_API, "quota", {}, errors.UpstreamQuotaError, "balance"),
    (ONE_API, "rate_limit", {}, errors.RateLimitedError, "minute"),
    (LITELLM, None, {"model": "gpt-image-9"}, errors.UnknownModelError, "gpt-image-9"),
    (LITELLM, "token_expired", {}, errors.InvalidKeyError, "/token"),
    (LITELLM, "quota", {}, errors.UpstreamQuotaError, "balance"),
    (LITELLM, "openai_quota", {}, errors.UpstreamQuotaError, "balance"),
    (LITELLM, "moderation", {}, errors.ModerationError, "rephrase"),
]


@pytest.mark.parametrize(
    ("family", "fail", "options", "expected", "needle"),
    RELAY_ERRORS,
    ids=[f"{f}-{k or o}" for f, k, o, _, _ in RELAY_ERRORS],
)
async def test_relay_error_bodies_are_classified_and_explained(
    relay_factory: RelayFactory,
    mock_factory: Callable[..., Awaitable[MockUpstream]],
    family: str,
    fail: str | None,
    options: dict[str, Any],
    expected: type[errors.UpstreamError],
    needle: str,
) -> None:
    relay_options = {k: v for k, v in options.items() if k != "model"}
    relay, _ = await relay_factory(family, await mock_factory(fail=fail), **relay_options)
    entry = {"name": "relay", "api_base": relay.base_url, "stream": False}
    if "model" in options:
        entry["model"] = options["model"]
    chain = chain_for(settings_for(entry), None)
    with pytest.raises(errors.UpstreamError) as caught:
        await draw(chain)
    error = caught.value
    assert type(error) is expected
    for lang in CATALOGS:
        message = t(lang, error.key, **error.params)
        assert "{" not in message and "request id" not in message and KEY not in message
    english = t("en", error.key, **error.params)
    assert needle.lower() in english.lower()
    if not error.retryable:
        assert "try again" not in english.lower()


async def test_litellm_renames_every_edit_image_to_image_png(
    relay_factory: RelayFactory,
) -> None:
    relay, upstream = await relay_factory(LITELLM)
    chain = chain_for(settings_for({"name": "lite", "api_base": relay.base_url}), None)
    result = await chain.run(ImageRequest("recolour", references=(png_reference(),)))
    assert result.images
    assert [f.filename for f in upstream.requests[-1].files] == ["image.png"]


# --- one-api cannot edit ---


async def test_one_api_edit_is_not_supported_marked_and_later_edits_skip_it(
    relay_factory: RelayFactory,
    mock_factory: Callable[..., Awaitable[MockUpstream]],
    store: Store,
) -> None:
    relay, behind = await relay_factory(ONE_API)
    second = await mock_factory()
    settings = settings_for(
        {"name": "oneapi", "api_base": relay.base_url},
        {"name": "second", "api_base": second.base_url},
    )
    chain = chain_for(settings, store)
    edit = ImageRequest("recolour", size="1024x1024", references=(png_reference(),))

    first = await chain.run(edit)  # one-api refuses before forwarding: safe to move on
    assert first.provider == "second"
    assert behind.requests == []  # the upstream never saw the edit
    assert (await store.provider_capabilities("oneapi"))["edits"] is False
    assert [c.provider.name for c in await chain.candidates("edit", 1)] == ["second"]
    assert [c.provider.name for c in await chain.candidates("draw")] == ["oneapi", "second"]

    await chain.run(edit)
    assert len(relay.received) == 1  # not asked again
    assert len(second.requests) == 2


async def test_edit_on_one_api_alone_says_the_provider_cannot_edit(
    relay_factory: RelayFactory, store: Store
) -> None:
    relay, _ = await relay_factory(ONE_API)
    chain = chain_for(settings_for({"name": "oneapi", "api_base": relay.base_url}), store)
    edit = ImageRequest("recolour", references=(png_reference(),))
    with pytest.raises(errors.NotSupportedError) as caught:
        await chain.run(edit)
    assert "does not support editing" in t("en", caught.value.key, **caught.value.params)
    # Known now: refused before anything is sent (or charged, when the runner asks first).
    with pytest.raises(errors.NotSupportedError):
        await chain.candidates("edit", 1)
    assert len(relay.received) == 1


async def test_candidates_refuses_more_references_than_any_provider_takes() -> None:
    chain = ProviderChain(
        [UpstreamClient(ProviderConfig(name="p", api_base="http://x", max_references=2))]
    )
    with pytest.raises(errors.TooManyReferencesError):
        await chain.candidates("edit", 3)
    await chain.aclose()


# --- the classification table ---

SAMPLES = [(row, sample) for row in (*ROWS, FALLBACK) for sample in row.samples]


@pytest.mark.parametrize(
    ("row", "sample"), SAMPLES, ids=[f"{r.name[:60]}-{s.status}" for r, s in SAMPLES]
)
def test_every_table_row_classifies_its_own_samples(row: Row, sample: Sample) -> None:
    seen = read_answer(sample.status, sample.body, sample.headers, streamed=sample.streamed)
    assert find_row(seen) is row
    error = classify_error(sample.status, sample.body, sample.headers, streamed=sample.streamed)
    assert type(error) is row.error
    assert error.unbilled is (
        row.unbilled or (sample.status == 429 and error.retry_after is not None)
    )
    assert error.status == sample.status and len(error.detail) <= 300
    for lang in CATALOGS:
        message = t(lang, error.key, **error.params)
        assert "{" not in message and "request id" not in message.lower()
    if not error.retryable:
        assert "try again" not in t("en", error.key, **error.params).lower()


def test_litellm_wrapper_is_unwrapped_and_its_string_code_dropped() -> None:
    body = {
        "error": {
            "message": "litellm.BadRequestError: OpenAIException - Invalid size '1919x1079'. "
            "Width and height must both be divisible by 16. (request id: 77)\n\nLiteLLM: model "
            "group 'gpt-image-2' failed with the error above. No fallback was attempted.",
            "type": "invalid_request_error",
            "param": None,
            "code": "400",
        }
    }
    seen = read_answer(400, body)
    assert seen.message.startswith("Invalid size '1919x1079'") and seen.code == ""
    assert seen.request_id == "77"
    error = classify_error(400, body)
    assert isinstance(error, errors.UpstreamSizeError) and error.code is None
    assert "request id 77" in error.detail


def test_one_api_request_id_is_kept_for_logs_but_not_shown() -> None:
    error = classify_error(
        404, {"error": {"message": "Invalid URL (POST /v1/x) (request id: 2026112901)"}}
    )
    assert "2026112901" in error.detail
    assert error.params["reason"] == "Invalid URL (POST /v1/x)"


@pytest.mark.parametrize(
    "row", [r for r in ROWS if r.error is errors.RelayStreamError], ids=lambda r: r.name[:40]
)
def test_stream_failure_bodies_mean_a_stream_failure_only_for_streamed_requests(row: Row) -> None:
    sample = row.samples[0]
    plain = classify_error(sample.status, sample.body)
    assert not isinstance(plain, errors.RelayStreamError) and not plain.unbilled
    streamed = classify_error(sample.status, sample.body, streamed=True)
    assert isinstance(streamed, errors.RelayStreamError) and not streamed.unbilled


class CountingImage:
    """A chat reference that counts its downloads (the platform side, not our code)."""

    def __init__(self) -> None:
        self.fetches = 0

    @property
    def name(self) -> str:
        return "photo.png"

    async def fetch(self, max_bytes: int) -> bytes:
        self.fetches += 1
        return png_reference().data


async def test_an_edit_no_provider_can_run_is_refused_before_any_download_or_charge(
    relay_factory: RelayFactory, settings_factory: Callable[..., Settings]
) -> None:
    relay, _ = await relay_factory(ONE_API)
    services = await Services.create(settings_factory(api_base=relay.base_url))
    try:
        # The first edit teaches the bot that this relay cannot edit (and is refunded).
        first = CountingImage()
        chat = await run_command(services, invocation("edit", "recolour", references=(first,)))
        assert "does not support editing" in chat.last_text()
        assert len(relay.received) == 1

        # The next one is refused from what was learned: no download, no charge, no request.
        second = CountingImage()
        chat = await run_command(services, invocation("edit", "recolour", references=(second,)))
        assert "does not support editing" in chat.last_text()
        assert second.fetches == 0
        assert len(relay.received) == 1
        job = await services.store.job(2)
        assert job is not None and job.status == "failed" and job.error_kind == "not_supported"
        assert job.ledger_state is None  # nothing was ever reserved
    finally:
        await services.close()


async def test_an_own_key_job_uses_what_the_shared_key_learned(
    relay_factory: RelayFactory, settings_factory: Callable[..., Settings]
) -> None:
    relay, _ = await relay_factory(ONE_API)
    services = await Services.create(settings_factory(api_base=relay.base_url))
    try:
        assert (await run_command(services, invocation("draw", "a red fox"))).results()
        assert relay.streamed_flags() == [True, False]
        # Another user draws with a key of their own on the same relay.
        owner = await services.store.user("test", "u2")
        await services.store.set_api_key(owner.id, "sk-own-relay-key-0123456789")
        chat = await run_command(services, invocation("draw", "a blue fox", user_id="u2"))
        assert chat.results()
        # No second failed streamed attempt paid for with the user's own key.
        assert relay.streamed_flags() == [True, False, False]
    finally:
        await services.close()
