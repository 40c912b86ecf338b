"""`drawbridge doctor` against the mock upstream: the table, the exit code, what it stores."""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.doctor import run_doctor
from bot.mock_upstream import MockUpstream
from bot.secrets import KeyBox
from bot.store import Store
from tests.conftest import SHARED_KEY
from tests.test_cli import clean_env, drawbridge

MockFactory = Callable[..., Awaitable[MockUpstream]]


async def doctor(settings: Settings, **kwargs: Any) -> tuple[int, str]:
    out = io.StringIO()
    code = await run_doctor(settings, out=out, deadline=5.0, **kwargs)
    return code, out.getvalue()


async def capabilities(settings: Settings, name: str) -> dict[str, Any]:
    keybox = KeyBox.load(settings.data_dir, settings.secret_key)
    store = await Store.open(settings.data_dir / "drawbridge.sqlite3", keybox=keybox)
    try:
        return await store.provider_capabilities(name)
    finally:
        await store.close()


def row(table: str, check: str) -> str:
    """The table line of one check."""
    [line] = [x for x in table.splitlines() if x.split("  ")[1:2] and f"  {check}  " in x]
    return line


def result(table: str, check: str) -> str:
    """The result column of one check."""
    return row(table, check).split(f"  {check}  ", 1)[1].split()[0]


async def test_free_doctor_buys_nothing_and_reports_key_model_balance(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    settings = settings_factory()
    code, table = await doctor(settings)
    assert code == 0
    assert mock_upstream.requests == []  # no image request was made
    assert mock_upstream.spent == 0.0
    assert "listed" in row(table, "model") and "gpt-image-2" in row(table, "model")
    assert "25.0000 left" in row(table, "balance") and "new-api" in row(table, "balance")
    assert " ms " in row(table, "round trip")
    assert "free checks passed: 1/1" in table
    # What it could not learn for free is named with the DRAWBRIDGE_PROVIDERS fields to set.
    assert '"stream": false' in table and '"size_fallback": true' in table
    assert SHARED_KEY not in table
    stored = await capabilities(settings, "default")
    assert stored["models_ok"] is True
    assert stored["balance"] == 25.0 and stored["balance_checked_at"] > 0
    assert "stream" not in stored


async def test_doctor_exits_1_and_says_why_when_the_key_is_refused(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.api_key = "sk-only-this-key-000000"
    settings = settings_factory()
    code, table = await doctor(settings, spend=True)
    assert code == 1
    assert "REFUSED" in row(table, "key") and "无效的令牌" in row(table, "key")
    assert "request id" not in table
    assert "skipped" in row(table, "paid checks")
    assert mock_upstream.requests == []
    assert (await capabilities(settings, "default"))["models_ok"] is False


async def test_doctor_exits_1_when_the_model_is_not_listed(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.models = ("gpt-image-1",)
    code, table = await doctor(settings_factory())
    assert code == 1
    assert "MISSING" in row(table, "model")
    assert "free checks passed: 0/1" in table


async def test_doctor_exits_1_when_the_relay_is_unreachable_and_stores_nothing(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(api_base="http://127.0.0.1:9")
    code, table = await doctor(settings)
    assert code == 1
    assert "UNREACHABLE" in row(table, "key")
    assert "models_ok" not in await capabilities(settings, "default")


async def test_spend_learns_stream_result_edits_and_4k_and_prints_costs(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    settings = settings_factory()
    code, table = await doctor(settings, spend=True)
    assert code == 0
    paths = [r.path for r in mock_upstream.requests]
    assert paths.count("/v1/images/generations") == 3 and paths.count("/v1/images/edits") == 1
    assert all(r.fields.get("quality") == "low" for r in mock_upstream.requests)
    assert [r.stream for r in mock_upstream.requests] == [True, False, False, False]
    [edit] = [r for r in mock_upstream.requests if r.path == "/v1/images/edits"]
    assert [f.field for f in edit.files] == ["image[]", "image[]"]
    assert [f.filename for f in edit.files] == ["ref1.png", "ref2.jpg"]
    assert mock_upstream.requests[-1].fields["size"] == "3840x2160"
    assert result(table, "stream") == "yes"
    assert result(table, "plain + result") == "b64"
    assert "got 3840x2160" in row(table, "4K")
    # Costs: the list price of the usage and what the relay's balance lost.
    for check in ("stream", "plain + result", "edit, 2 images", "4K"):
        assert "list $0.0" in row(table, check) and "relay 0.0" in row(table, check)
    stored = await capabilities(settings, "default")
    assert stored["stream"] is True and stored["stream_checked_at"] > 0
    assert (stored["result"], stored["edits"], stored["four_k"]) == ("b64", True, True)
    assert stored["balance"] == 25.0  # read before anything was bought
    # Learned once, a free run shows it and no longer asks for it by hand.
    code, table = await doctor(settings)
    assert "learned earlier" in row(table, "stream")
    assert "Not learned" not in table


async def test_spend_learns_what_a_limited_relay_cannot_do(
    settings_factory: Callable[..., Settings], mock_factory: MockFactory
) -> None:
    # A one-api-like relay: no image streams, url results, no edits, no 4K.
    mock = await mock_factory(
        stream=False, mode="url", edits=False, reject_4k=True, billing="one-api"
    )
    settings = settings_factory(api_base=mock.base_url)
    code, table = await doctor(settings, spend=True)
    assert code == 0  # the free checks passed; the limits are learned, not failures
    stored = await capabilities(settings, "default")
    assert (stored["stream"], stored["result"], stored["edits"], stored["four_k"]) == (
        False,
        "url",
        False,
        False,
    )
    assert "one-api" in row(table, "balance")
    assert result(table, "edit, 2 images") == "no"
    hints = table.split("Not learned")[1]
    # Learned limits need nothing by hand, except what makes 4K work anyway.
    assert '"stream"' not in hints and '"size_fallback": true' in hints
    assert "list a provider that edits" in hints


async def test_doctor_checks_only_the_named_provider_and_refuses_an_unknown_name(
    settings_factory: Callable[..., Settings], mock_factory: MockFactory
) -> None:
    good = await mock_factory()
    bad = await mock_factory(api_key="sk-something-else-0000")
    providers = [
        {"name": "good", "api_base": good.base_url},
        {"name": "bad", "api_base": bad.base_url},
    ]
    settings = settings_factory(providers_json=providers)
    code, table = await doctor(settings)
    assert code == 1 and "free checks passed: 1/2" in table
    code, table = await doctor(settings, provider_name="good")
    assert code == 0 and "bad" not in table
    code, table = await doctor(settings, provider_name="nope")
    assert code == 2 and table == ""


async def test_doctor_command_line_exit_codes(tmp_path: Path, mock_factory: MockFactory) -> None:
    mock = await mock_factory(balance=7.5)
    env = clean_env(
        DRAWBRIDGE_API_BASE=mock.base_url,
        DRAWBRIDGE_API_KEY=SHARED_KEY,
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
    )
    code, out, _ = await drawbridge("doctor", env=env, cwd=tmp_path)
    assert code == 0, out
    assert "7.5000 left" in out and "free checks passed: 1/1" in out
    mock.options.models = ()
    code, out, _ = await drawbridge("doctor", env=env, cwd=tmp_path)
    assert code == 1 and "MISSING" in out
    providers = json.dumps([{"name": "p", "api_base": mock.base_url}])
    code, _, err = await drawbridge(
        "doctor",
        "--provider",
        "other",
        env={**env, "DRAWBRIDGE_PROVIDERS": providers},
        cwd=tmp_path,
    )
    assert code == 2 and "no provider named 'other'" in err
