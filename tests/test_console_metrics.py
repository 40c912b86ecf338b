"""/metrics counts upstream HTTP requests as the upstream client makes them (not jobs): each
retry, fail-over and non-streamed re-ask is one more, labelled by provider and HTTP status,
or `error` / `timeout` when no answer came. Checked against what the mock upstreams recorded.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from adapters.console.app import Console
from adapters.console.logbuffer import LogBuffer
from bot.config import Settings
from bot.mock_upstream import MockUpstream
from bot.services import Services
from tests.recording_chat import invocation, run_command
from tests.test_console import PASSWORD, client


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def upstream_requests(services: Services) -> dict[tuple[str, str], float]:
    """`drawbridge_upstream_requests_total` as /metrics serves it: (provider, status) -> n."""
    console = Console(services.settings, services, LogBuffer())
    async with client(console) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "drawbridge_upstream_requests_total":
                counts[(sample.labels["provider"], sample.labels["status"])] = sample.value
    return counts


def of(counts: dict[tuple[str, str], float], provider: str) -> dict[str, float]:
    return {status: n for (name, status), n in counts.items() if name == provider}


async def test_requests_are_counted_per_attempt_through_retries_fail_over_and_a_stream_reask(
    settings_factory: Callable[..., Settings],
    mock_factory: Callable[..., Awaitable[MockUpstream]],
) -> None:
    # The registry lives as long as the process: names of this test's own.
    tag = uuid.uuid4().hex[:8]
    dead, broken, steady = f"dead-{tag}", f"broken-{tag}", f"steady-{tag}"
    # 502 with an empty body surely did not run: retried once, then the next provider.
    gateway = await mock_factory(fail="bad_gateway")
    # Refuses `stream` (400 unknown_parameter): asked once more without streaming.
    no_stream = await mock_factory(refuse_fields=("stream",))
    providers: list[dict[str, Any]] = [
        {"name": dead, "api_base": f"http://127.0.0.1:{_closed_port()}", "max_retries": 0},
        {"name": broken, "api_base": gateway.base_url, "max_retries": 1},
        {"name": steady, "api_base": no_stream.base_url},
    ]
    services = await Services.create(
        settings_factory(providers_json=providers, console_password=PASSWORD, stream=True)
    )
    try:
        chat = await run_command(services, invocation("draw", "a lighthouse"))
        assert chat.results(), chat.texts()
        counts = await upstream_requests(services)
    finally:
        await services.close()

    assert of(counts, dead) == {"error": 1.0}
    assert of(counts, broken) == {"502": float(len(gateway.requests))} == {"502": 2.0}
    assert [r.stream for r in no_stream.requests] == [True, False]
    assert of(counts, steady) == {"400": 1.0, "200": 1.0}


async def test_a_request_without_an_answer_in_time_counts_as_timeout(
    settings_factory: Callable[..., Settings],
    mock_factory: Callable[..., Awaitable[MockUpstream]],
) -> None:
    name = f"slow-{uuid.uuid4().hex[:8]}"
    stuck = await mock_factory(fail="timeout")
    providers = [{"name": name, "api_base": stuck.base_url, "timeout": 0.5}]
    services = await Services.create(
        settings_factory(providers_json=providers, console_password=PASSWORD)
    )
    try:
        chat = await run_command(services, invocation("draw", "a slow boat"))
        assert not chat.results()
        counts = await upstream_requests(services)
    finally:
        await services.close()
    assert len(stuck.requests) == 1
    assert of(counts, name) == {"timeout": 1.0}
