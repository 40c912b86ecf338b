"""Shared fixtures: the mock upstream over HTTP, settings in a temp dir, and live services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.mock_upstream import MockOptions, MockUpstream
from tests.databases import ENGINES, database_url, postgres_schema

SHARED_KEY = "sk-test-shared-0000"


@pytest.fixture
async def mock_factory() -> AsyncIterator[Callable[..., Awaitable[MockUpstream]]]:
    """Start extra mock image APIs (`await mock_factory(fail="no_channel")`); all stopped after."""
    started: list[MockUpstream] = []

    async def start(**options: Any) -> MockUpstream:
        mock = MockUpstream(MockOptions(**options))
        await mock.start()
        started.append(mock)
        return mock

    try:
        yield start
    finally:
        for mock in started:
            await mock.stop()


@pytest.fixture
async def mock_upstream(
    mock_factory: Callable[..., Awaitable[MockUpstream]],
) -> MockUpstream:
    """A started mock image API on 127.0.0.1 (b64 mode, streaming, no latency)."""
    return await mock_factory()


@pytest.fixture
def settings_factory(
    tmp_path: Path, mock_upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Settings]:
    """Build Settings pointing at the mock upstream, in a temp data dir, ignoring any `.env`."""
    # A developer's own .env must not leak into tests.
    monkeypatch.chdir(tmp_path)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "api_base": mock_upstream.base_url,
            "api_key": SHARED_KEY,
            "data_dir": tmp_path / "data",
            "daily_credits": 5,
            "stream": True,
            "shutdown_grace": 2.0,
            "default_lang": "en",
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


@pytest.fixture
async def services(settings_factory: Callable[..., Settings]) -> AsyncIterator[Any]:
    """Live Services (store, job runner, upstream clients) on the mock upstream."""
    from bot.services import Services

    svc = await Services.create(settings_factory())
    try:
        yield svc
    finally:
        await svc.close()


@pytest.fixture(params=ENGINES)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database on each engine in turn: a SQLite file, then a PostgreSQL schema."""
    async with database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """An empty PostgreSQL schema (skips where no server answers, unless required)."""
    async with postgres_schema() as url:
        yield url
