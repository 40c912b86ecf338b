"""The operator console over HTTP (httpx against its app): login, sessions, CSRF, the pages,
and the admin actions as the store and the ledger see them."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.console.app import Console
from adapters.console.auth import FAILED_LOGINS
from adapters.console.logbuffer import LogBuffer
from bot.config import Settings
from bot.jobs import today
from bot.mock_upstream import MockUpstream
from bot.services import Services
from plugins import account
from plugins.registry import find_command, split_command
from tests.bot_process import BotProcess, bot_env
from tests.recording_chat import invocation, run_command

PASSWORD = "correct horse battery staple"


@pytest.fixture
async def console_factory(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Services, LogBuffer]] = []

    async def make(**overrides: Any) -> tuple[Console, Services]:
        settings = settings_factory(console_password=PASSWORD, **overrides)
        services = await Services.create(settings)
        logs = LogBuffer()
        logs.attach()
        made.append((services, logs))
        return Console(settings, services, logs), services

    yield make
    for services, logs in made:
        logs.detach()
        await services.close()


@pytest.fixture
async def console(console_factory: Callable[..., Any]) -> tuple[Console, Services]:
    result: tuple[Console, Services] = await console_factory()
    return result


def client(console: Console, ip: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=console.app, client=(ip, 40000))
    # https when the console says so: the client keeps Secure cookies for https only.
    scheme = "https" if console.secure else "http"
    return httpx.AsyncClient(transport=transport, base_url=f"{scheme}://console.test")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


async def login(http: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    page = await http.get("/login")
    return await http.post("/login", data={"csrf": csrf_of(page.text), "password": password})


@contextlib.asynccontextmanager
async def logged_in(
    console: Console, ip: str = "127.0.0.1"
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client with a session, and the CSRF token its forms carry."""
    async with client(console, ip) as http:
        response = await login(http)
        assert response.status_code == 303
        home = await http.get("/")
        assert home.status_code == 200
        yield http, csrf_of(home.text)


async def finished_job(
    services: Services,
    user_id: int,
    *,
    platform: str = "telegram",
    status: str = "succeeded",
    cost: int = 2,
    provider: str = "default",
    error_kind: str | None = None,
    group_key: str | None = None,
    prompt: str = "a red fox",
) -> int:
    """A job through the store's own life cycle: created, reserved, run, settled."""
    store = services.store
    job_id = await store.create_job(
        user_id=user_id,
        platform=platform,
        chat_id="chat-1",
        group_key=group_key,
        kind="draw",
        prompt=prompt,
        options={"size": "1024x1024", "n": 1, "quality": "high"},
        ref_count=0,
        own_key=False,
    )
    await store.reserve(
        job_id,
        user_id=user_id,
        cost=cost,
        day=today(services.settings),
        daily_allowance=0,
        group_key=group_key,
    )
    await store.mark_running(job_id, provider)
    if status == "succeeded":
        await store.finish_job(job_id, status="succeeded", outputs=[{"width": 1024}])
        await store.commit(job_id)
    else:
        await store.finish_job(
            job_id, status="failed", error_kind=error_kind, error_detail="relay said: no channel"
        )
        await store.refund(job_id, "failed")
    return job_id


# --- login, sessions, CSRF -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/jobs",
        "/jobs/1",
        "/users",
        "/ledger",
        "/ledger.csv",
        "/providers",
        "/settings",
        "/logs",
    ],
)
async def test_every_page_requires_login(console: tuple[Console, Services], path: str) -> None:
    async with client(console[0]) as http:
        response = await http.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == "/login"


async def test_actions_require_login(console: tuple[Console, Services]) -> None:
    app, services = console
    user = await services.store.user("telegram", "42")
    async with client(app) as http:
        response = await http.post(f"/users/{user.id}/grant", data={"credits": "5"})
    assert response.status_code == 401
    assert (await services.store.user("telegram", "42")).granted == 0


async def test_wrong_password_is_refused(console: tuple[Console, Services]) -> None:
    async with client(console[0]) as http:
        response = await login(http, "not the password")
        assert response.status_code == 401
        assert "Wrong password" in response.text
        assert (await http.get("/")).status_code == 303


async def test_right_password_opens_a_session_with_strict_cookie(
    console: tuple[Console, Services],
) -> None:
    async with client(console[0]) as http:
        response = await login(http)
        assert response.status_code == 303
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        # Served over http (no https DRAWBRIDGE_CONSOLE_URL): a Secure cookie would be lost.
        assert "secure" not in cookie.replace("samesite", "")
        assert (await http.get("/")).status_code == 200


async def test_cookie_is_secure_when_the_console_url_is_https(
    console_factory: Callable[..., Any],
) -> None:
    app, _ = await console_factory(console_url="https://console.example.com")
    async with client(app) as http:
        page = await http.get("/login")
    assert "; secure" in page.headers["set-cookie"].lower()


async def test_a_forged_cookie_is_not_a_session(console: tuple[Console, Services]) -> None:
    async with client(console[0]) as http:
        await login(http)
        value = http.cookies["drawbridge_console"]
        http.cookies.clear()
        http.cookies.set("drawbridge_console", value[:-3] + "AAA", domain="console.test")
        assert (await http.get("/")).status_code == 303


async def test_failed_logins_are_rate_limited_per_address(
    console: tuple[Console, Services],
) -> None:
    app, _ = console
    async with client(app, "10.0.0.7") as http:
        for _ in range(FAILED_LOGINS):
            assert (await login(http, "guess")).status_code == 401
        # Now even the right password is refused from this address...
        refused = await login(http, PASSWORD)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert (await http.get("/")).status_code == 303
    # ...but not from another one.
    async with client(app, "10.0.0.8") as other:
        assert (await login(other)).status_code == 303


async def test_login_without_csrf_is_refused(console: tuple[Console, Services]) -> None:
    async with client(console[0]) as http:
        await http.get("/login")
        response = await http.post("/login", data={"password": PASSWORD})
        assert response.status_code == 403
        assert (await http.get("/")).status_code == 303


async def test_post_without_or_with_a_wrong_csrf_token_is_refused(
    console: tuple[Console, Services],
) -> None:
    app, services = console
    user = await services.store.user("telegram", "42")
    async with logged_in(app) as (http, csrf):
        missing = await http.post(f"/users/{user.id}/grant", data={"credits": "5"})
        wrong = await http.post(
            f"/users/{user.id}/grant", data={"credits": "5", "csrf": csrf[:-2] + "xx"}
        )
        banned = await http.post(f"/users/{user.id}/ban", data={})
    assert (missing.status_code, wrong.status_code, banned.status_code) == (403, 403, 403)
    after = await services.store.user("telegram", "42")
    assert (after.granted, after.role) == (0, "user")
    entries, _ = await services.store.console_ledger({"user": f"#{user.id}"})
    assert entries == []


async def test_the_login_csrf_token_is_replaced_at_login(
    console: tuple[Console, Services],
) -> None:
    async with client(console[0]) as http:
        before = csrf_of((await http.get("/login")).text)
        await http.post("/login", data={"csrf": before, "password": PASSWORD})
        after = csrf_of((await http.get("/")).text)
    assert before != after


# --- open endpoints --------------------------------------------------------------------------


async def test_healthz_answers_without_login(console: tuple[Console, Services]) -> None:
    async with client(console[0]) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    # No chat platform configured: the console alone, and it answers.
    assert response.json() == {"status": "ok", "platforms": {}}


async def test_metrics_in_prometheus_format(console: tuple[Console, Services]) -> None:
    app, services = console
    user = await services.store.user("telegram", "42")
    await services.store.grant(user.id, 10)
    await finished_job(services, user.id)
    await finished_job(services, user.id, status="failed", error_kind="no_channel")
    async with client(app) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    text = response.text
    assert 'drawbridge_jobs_total{error_kind="",platform="telegram",status="succeeded"} 1.0' in text
    assert 'error_kind="no_channel"' in text
    assert 'drawbridge_credits_total{kind="commit"} 2.0' in text
    assert 'drawbridge_queue_depth{state="queued"} 0.0' in text
    assert "drawbridge_job_duration_seconds_bucket" in text


async def test_metrics_token_is_required_when_set(console_factory: Callable[..., Any]) -> None:
    app, _ = await console_factory(metrics_token="scrape-me-please")
    async with client(app) as http:
        assert (await http.get("/metrics")).status_code == 401
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me-please"})
        assert right.status_code == 200


# --- settings and `drawbridge run` -----------------------------------------------------------


def test_short_password_on_a_public_host_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 12 characters"):
        Settings(_env_file=None, console_host="0.0.0.0", console_password="short")  # type: ignore[call-arg]
    # On loopback a short one is the operator's business.
    Settings(_env_file=None, console_host="127.0.0.1", console_password="short")  # type: ignore[call-arg]


def test_the_console_is_a_platform_only_with_a_password() -> None:
    assert "console" not in Settings(_env_file=None).enabled_platforms()  # type: ignore[call-arg]
    with_password = Settings(_env_file=None, console_password="x" * 12)  # type: ignore[call-arg]
    assert with_password.enabled_platforms() == ["console"]


async def test_run_refuses_a_short_password_on_a_public_host(tmp_path: Path) -> None:
    env = bot_env(
        DRAWBRIDGE_CONSOLE_PASSWORD="short",
        DRAWBRIDGE_CONSOLE_HOST="0.0.0.0",
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
    )
    bot = BotProcess(env, tmp_path)
    with pytest.raises(AssertionError, match="the bot exited"):
        await bot.start("console: http", within=30)
    assert await bot.stop() == 2
    errors = [line for line in bot.output if line.strip()]
    assert len(errors) == 1, bot.log
    assert "DRAWBRIDGE_CONSOLE_PASSWORD" in errors[0]
    assert "12 characters" in errors[0]
    assert "short" not in errors[0].replace("shorter", "")


async def test_run_serves_the_console_with_no_chat_platform(tmp_path: Path) -> None:
    env = bot_env(
        DRAWBRIDGE_CONSOLE_PASSWORD=PASSWORD,
        DRAWBRIDGE_CONSOLE_PORT="0",
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
    )
    bot = await BotProcess(env, tmp_path).start(r"drawbridge ready: console", within=60)
    try:
        found = re.search(r"console: http://127\.0\.0\.1:(\d+)/", bot.log)
        assert found, bot.log
        base = f"http://127.0.0.1:{found.group(1)}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/")).status_code == 303
            assert (await login(http, "wrong")).status_code == 401
            assert (await login(http)).status_code == 303
            assert (await http.get("/")).status_code == 200
    finally:
        code = await bot.stop(signal.SIGTERM)
    assert code == 0, bot.log
    assert PASSWORD not in bot.log


# --- pages and actions ------------------------------------------------------------------------


async def test_every_page_renders_what_the_store_holds(console: tuple[Console, Services]) -> None:
    app, services = console
    store = services.store
    fox = await store.user("telegram", "42", "Fox")
    await store.grant(fox.id, 20)
    ok = await finished_job(services, fox.id, group_key="telegram:group-9")
    bad = await finished_job(services, fox.id, status="failed", error_kind="no_channel")
    async with logged_in(app) as (http, _):
        pages = {
            path: await http.get(path)
            for path in (
                "/",
                "/?range=7d",
                "/?range=30d",
                "/partials/now",
                "/jobs",
                f"/jobs/{ok}",
                f"/jobs/{bad}",
                "/users",
                "/ledger",
                "/ledger.csv",
                "/providers",
                "/settings",
                "/logs",
                "/partials/logs",
            )
        }
        missing = await http.get("/jobs/999999")
    assert {path: r.status_code for path, r in pages.items()} == dict.fromkeys(pages, 200)
    assert missing.status_code == 404
    overview = pages["/"].text
    assert 'id="total-jobs">2<' in overview
    assert "no_channel" in overview and "telegram:group-9" in overview
    assert "telegram:42 (Fox)" in overview
    assert "a red fox" in pages["/jobs"].text
    # The failed job shows the relay's own message.
    assert "relay said: no channel" in pages[f"/jobs/{bad}"].text
    assert 'id="refund"' in pages[f"/jobs/{ok}"].text
    assert 'id="refund"' not in pages[f"/jobs/{bad}"].text
    assert "Fox" in pages["/users"].text


async def test_pages_switch_language(console: tuple[Console, Services]) -> None:
    async with logged_in(console[0]) as (http, csrf):
        assert "Overview" in (await http.get("/")).text
        switched = await http.post("/lang", data={"csrf": csrf, "lang": "zh", "next": "/jobs"})
        assert switched.status_code == 303
        assert switched.headers["location"] == "/jobs"
        assert "概览" in (await http.get("/")).text


async def test_jobs_are_filtered(console: tuple[Console, Services]) -> None:
    app, services = console
    store = services.store
    fox = await store.user("telegram", "42")
    owl = await store.user("discord", "7")
    await store.grant(fox.id, 20)
    await store.grant(owl.id, 20)
    await finished_job(services, fox.id, prompt="fox job")
    await finished_job(services, owl.id, platform="discord", prompt="owl job")
    await finished_job(
        services,
        owl.id,
        platform="discord",
        status="failed",
        error_kind="timeout",
        prompt="owl failed",
        provider="backup",
    )
    async with logged_in(app) as (http, _):
        by_platform = (await http.get("/jobs", params={"platform": "discord"})).text
        by_status = (await http.get("/jobs", params={"status": "failed"})).text
        by_user = (await http.get("/jobs", params={"user": "telegram:42"})).text
        by_kind = (await http.get("/jobs", params={"error_kind": "timeout"})).text
        by_provider = (await http.get("/jobs", params={"provider": "backup"})).text
        day = today(services.settings).isoformat()
        by_date = (await http.get("/jobs", params={"date": day})).text
        other_day = (await http.get("/jobs", params={"date": "2001-01-01"})).text
    assert "owl job" in by_platform and "fox job" not in by_platform
    assert "owl failed" in by_status and "owl job" not in by_status
    assert "fox job" in by_user and "owl" not in by_user
    assert "owl failed" in by_kind and "owl job" not in by_kind
    assert "owl failed" in by_provider and "fox job" not in by_provider
    assert "3 matching" in by_date
    assert "0 matching" in other_day


async def test_grant_through_the_console_reaches_the_store_ledger_and_audit(
    console: tuple[Console, Services],
) -> None:
    app, services = console
    store = services.store
    user = await store.user("telegram", "42")
    async with logged_in(app) as (http, csrf):
        response = await http.post(
            f"/users/{user.id}/grant", data={"csrf": csrf, "credits": "15", "next": "/users"}
        )
        assert response.status_code == 303
        page = (await http.get("/users", params={"q": "42"})).text
    assert (await store.user("telegram", "42")).granted == 15
    entries, totals = await store.console_ledger({"user": f"#{user.id}"})
    assert [(e["kind"], e["balance_amount"]) for e in entries] == [("grant", 15)]
    assert entries[0]["note"] == "console: password@127.0.0.1"
    assert totals["grant"] == 15
    audit = await store.audit_entries()
    assert [(a["actor"], a["action"], a["target"]) for a in audit[:1]] == [
        ("password@127.0.0.1", "grant", f"#{user.id}")
    ]
    assert re.search(rf'id="user-{user.id}".*?class="num balance">15<', page, re.S)


async def test_ban_and_unban_through_the_console(console: tuple[Console, Services]) -> None:
    app, services = console
    store = services.store
    user = await store.user("qq", "10001")
    async with logged_in(app) as (http, csrf):
        assert (await http.post(f"/users/{user.id}/ban", data={"csrf": csrf})).status_code == 303
        assert (await store.user("qq", "10001")).role == "banned"
        assert (await http.post(f"/users/{user.id}/unban", data={"csrf": csrf})).status_code == 303
        assert (await store.user("qq", "10001")).role == "user"
    actions = [a["action"] for a in await store.audit_entries()]
    assert actions[:2] == ["unban", "ban"]


async def test_refund_of_a_succeeded_job_is_in_the_ledger_once(
    console: tuple[Console, Services],
) -> None:
    app, services = console
    store = services.store
    user = await store.user("telegram", "42")
    await store.grant(user.id, 10)
    job_id = await finished_job(services, user.id, cost=3)
    assert (await store.user("telegram", "42")).granted == 7
    async with logged_in(app) as (http, csrf):
        first = await http.post(f"/jobs/{job_id}/refund", data={"csrf": csrf})
        again = await http.post(f"/jobs/{job_id}/refund", data={"csrf": csrf})
        page = (await http.get(f"/jobs/{job_id}")).text
    assert first.status_code == 303
    assert again.status_code == 409
    assert (await store.user("telegram", "42")).granted == 10
    entries, _ = await store.console_ledger({"user": f"#{user.id}", "kind": "grant"})
    assert [e["balance_amount"] for e in entries] == [3, 10]
    assert entries[0]["note"] == f"refund of job #{job_id} by password@127.0.0.1"
    assert 'id="refund"' not in page
    # The job's own settlement is untouched: it was committed, and stays so.
    job = await store.job(job_id)
    assert job is not None and job.ledger_state == "committed"


async def test_a_failed_job_cannot_be_refunded_again(console: tuple[Console, Services]) -> None:
    app, services = console
    user = await services.store.user("telegram", "42")
    await services.store.grant(user.id, 10)
    job_id = await finished_job(services, user.id, status="failed", error_kind="timeout")
    async with logged_in(app) as (http, csrf):
        response = await http.post(f"/jobs/{job_id}/refund", data={"csrf": csrf})
    assert response.status_code == 409
    assert (await services.store.user("telegram", "42")).granted == 10


async def test_ledger_csv_totals_equal_the_store_sums(console: tuple[Console, Services]) -> None:
    app, services = console
    store = services.store
    users = [await store.user("telegram", str(n)) for n in range(3)]
    for n, user in enumerate(users):
        await store.grant(user.id, 10 + n)
        await finished_job(services, user.id, cost=2)
        await finished_job(services, user.id, status="failed", error_kind="timeout", cost=1)
    async with logged_in(app) as (http, _):
        page = (await http.get("/ledger")).text
        exported = (await http.get("/ledger.csv")).text
        one = (await http.get("/ledger.csv", params={"user": f"#{users[1].id}"})).text
    rows = list(csv.DictReader(io.StringIO(exported)))
    sums: dict[str, int] = {}
    for row in rows:
        amount = int(row["daily_amount"]) + int(row["balance_amount"])
        sums[row["kind"]] = sums.get(row["kind"], 0) + amount
    for kind, total in sums.items():
        assert f'data-total="{kind}">{total}<' in page
    assert f'data-total="rows">{len(rows)}<' in page
    # The store's own sums: what each user's jobs hold, and their balances.
    for user in users:
        mine = [r for r in rows if r["user_id"] == str(user.id)]
        held = sum(
            (1 if r["kind"] == "reserve" else -1)
            * (int(r["daily_amount"]) + int(r["balance_amount"]))
            for r in mine
            if r["kind"] in ("reserve", "refund")
        )
        assert held == await store.ledger_sum(user.id)
        granted = sum(int(r["balance_amount"]) for r in mine if r["kind"] == "grant")
        assert (await store.user("telegram", user.platform_user_id)).granted == granted - held
    only = list(csv.DictReader(io.StringIO(one)))
    assert {r["user_id"] for r in only} == {str(users[1].id)}


async def test_users_show_their_key_masked(console: tuple[Console, Services]) -> None:
    app, services = console
    user = await services.store.user("telegram", "42")
    key = "sk-live-0123456789abcdefWXYZ"
    await services.store.set_api_key(user.id, key)
    async with logged_in(app) as (http, _):
        page = (await http.get("/users")).text
    assert "sk-...WXYZ" in page
    assert key not in page and "0123456789" not in page


async def test_a_daily_allowance_set_in_the_console_is_what_credits_use_and_is_audited(
    console: tuple[Console, Services],
) -> None:
    app, services = console
    store = services.store
    user = await store.user("telegram", "42")
    day, default = today(services.settings), services.settings.daily_credits

    async def allowance() -> int:
        return (await store.credits(user.id, day, default)).daily_allowance

    assert await allowance() == default == 5
    async with logged_in(app) as (http, csrf):
        form = {"csrf": csrf, "allowance": "12", "next": "/users"}
        response = await http.post(f"/users/{user.id}/allowance", data=form)
        assert response.status_code == 303
        assert await allowance() == 12
        page = (await http.get("/users")).text
        assert re.search(rf'id="user-{user.id}".*?class="allowance">12<', page, re.S)
        assert 'name="allowance" type="number" min="0" size="4" value="12"' in page

        # Blank: back to DRAWBRIDGE_DAILY_CREDITS.
        form["allowance"] = ""
        assert (await http.post(f"/users/{user.id}/allowance", data=form)).status_code == 303
        assert await allowance() == default
        assert (await store.user("telegram", "42")).daily_allowance is None

        for bad in ("-1", "lots"):
            form["allowance"] = bad
            refused = await http.post(f"/users/{user.id}/allowance", data=form)
            assert refused.status_code == 400
        form["allowance"] = "3"
        assert (await http.post("/users/999999/allowance", data=form)).status_code == 404
        no_csrf = await http.post(f"/users/{user.id}/allowance", data={"allowance": "99"})
        assert no_csrf.status_code == 403
    assert await allowance() == default
    audit = [a for a in await store.audit_entries() if a["action"] == "allowance"]
    assert [(a["actor"], a["target"]) for a in audit] == [("password@127.0.0.1", f"#{user.id}")] * 2
    assert [json.loads(a["detail"])["allowance"] for a in audit] == [None, 12]


async def test_token_and_quota_record_the_key_probe_and_the_users_page_shows_it_masked(
    console: tuple[Console, Services],
    mock_upstream: MockUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, services = console
    # /quota would otherwise reuse the balance /token read a moment ago.
    monkeypatch.setattr(account, "BALANCE_CACHE_SECONDS", 0.0)
    key = "sk-test-own-0123456789abcdefQRST"
    bound = await run_command(services, invocation("token", key))
    assert "sk-...QRST" in bound.last_text()
    user = await services.store.user("test", "u1")
    assert user.key_probe is not None
    # The mock is a new-api relay: the key is accepted and its balance read.
    assert user.key_probe["ok"] is True and user.key_probe["kind"] == "ok"
    assert user.key_probe["balance"] == pytest.approx(mock_upstream.options.balance)
    async with logged_in(app) as (http, _):
        page = (await http.get("/users", params={"q": "u1"})).text
    row = re.search(rf'<tr id="user-{user.id}">.*?</tr>', page, re.S)
    assert row, page
    assert "<code>sk-...QRST</code>" in row.group(0)
    assert "key accepted · balance 25.00" in row.group(0)
    assert key not in page and "0123456789abcdef" not in page

    # /quota's balance lookup is a probe too: the relay now reports another balance.
    mock_upstream.options.balance = 0.5
    await run_command(services, invocation("quota"))
    probed = (await services.store.user("test", "u1")).key_probe
    assert probed is not None and probed["kind"] == "balance" and probed["balance"] == 0.5
    async with logged_in(app) as (http, _):
        page = (await http.get("/users", params={"q": "u1"})).text
    assert "balance read · balance 0.5000" in page

    # A key the relay refuses is not bound, and its probe not kept.
    mock_upstream.options.api_key = "sk-test-the-only-good-key-000"
    refused = await run_command(services, invocation("token", "sk-test-refused-key-0000wxyz"))
    assert "refused" in refused.last_text().lower()
    assert (await services.store.user("test", "u1")).key_probe == probed
    mock_upstream.options.api_key = None

    await run_command(services, invocation("token", "clear"))
    assert (await services.store.user("test", "u1")).key_probe is None


async def test_settings_are_shown_with_secrets_masked(
    console_factory: Callable[..., Any],
) -> None:
    app, _ = await console_factory(
        telegram_bot_token="123456:AAbbCCddEEffGGhhIIjjKKllMMnnOOppQQ",
        upstream_proxy="http://user:proxy-pass-99@127.0.0.1:3128",
    )
    async with logged_in(app) as (http, _):
        page = (await http.get("/settings")).text
    assert "DRAWBRIDGE_API_BASE" in page and "DRAWBRIDGE_CONSOLE_PORT" in page
    for secret in ("sk-test-shared-0000", "AAbbCCdd", "proxy-pass-99", PASSWORD):
        assert secret not in page
    assert "http://***@127.0.0.1:3128" in page


async def test_logs_page_shows_lines_redacted_with_a_level_filter(
    console: tuple[Console, Services],
) -> None:
    app, _ = console
    noisy = logging.getLogger("drawbridge.test-console")
    noisy.setLevel(logging.DEBUG)
    secret = "sk-test-console-0123456789"
    noisy.warning("relay refused key %s", secret)
    noisy.info("an info line for the console")
    async with logged_in(app) as (http, _):
        everything = (await http.get("/logs", params={"level": "INFO"})).text
        warnings = (await http.get("/partials/logs", params={"level": "WARNING"})).text
    assert "relay refused key sk-***" in everything
    assert secret not in everything
    assert "an info line for the console" in everything
    assert "an info line" not in warnings and "relay refused key" in warnings


# --- the one-time login link (/console) ------------------------------------------------------


def test_console_command_is_declared_for_admins_with_its_chinese_alias() -> None:
    spec = find_command("console")
    assert spec is not None and spec.admin
    assert find_command("控制台") is spec
    assert split_command("/控制台") == (spec, "")


async def link_from_chat(services: Services, **fields: Any) -> str:
    chat = await run_command(services, invocation("console", user_id="boss", **fields))
    found = re.search(r"https://console\.example\.com/login/link\?token=\S+", chat.last_text())
    assert found, chat.last_text()
    return found.group(0)


async def test_a_one_time_link_logs_in_once(console_factory: Callable[..., Any]) -> None:
    app, services = await console_factory(
        admins="test:boss", console_url="https://console.example.com"
    )
    link = await link_from_chat(services)
    path = link.removeprefix("https://console.example.com")
    async with client(app) as first:
        page = await first.get(path)
        assert page.status_code == 200
        # Opening the page (as a link preview would) does not spend the token.
        page = await first.get(path)
        token = re.search(r'name="token" value="([^"]+)"', page.text)
        assert token is not None
        used = await first.post(
            "/login/link", data={"csrf": csrf_of(page.text), "token": token.group(1)}
        )
        assert used.status_code == 303
        home = await first.get("/")
        assert home.status_code == 200
        assert "test:boss" in home.text
    async with client(app) as second:
        page = await second.get(path)
        again = await second.post(
            "/login/link", data={"csrf": csrf_of(page.text), "token": token.group(1)}
        )
        assert again.status_code == 401
        assert "expired or was used" in again.text
        assert (await second.get("/")).status_code == 303
    audit = await services.store.audit_entries()
    assert [(a["actor"], a["action"]) for a in audit] == [("test:boss", "login")]


async def test_a_link_login_names_the_admin_in_grants(console_factory: Callable[..., Any]) -> None:
    app, services = await console_factory(
        admins="test:boss", console_url="https://console.example.com"
    )
    link = await link_from_chat(services)
    target = await services.store.user("telegram", "42")
    async with client(app) as http:
        page = await http.get(link.removeprefix("https://console.example.com"))
        token = re.search(r'name="token" value="([^"]+)"', page.text)
        assert token is not None
        csrf = csrf_of(page.text)
        await http.post("/login/link", data={"csrf": csrf, "token": token.group(1)})
        csrf = csrf_of((await http.get("/")).text)
        await http.post(f"/users/{target.id}/grant", data={"csrf": csrf, "credits": "3"})
    boss = await services.store.user("test", "boss")
    entries, _ = await services.store.console_ledger({"user": f"#{target.id}"})
    assert [(e["kind"], e["by_user_id"]) for e in entries] == [("grant", boss.id)]


async def test_an_expired_link_is_refused(console_factory: Callable[..., Any]) -> None:
    app, services = await console_factory(
        admins="test:boss", console_url="https://console.example.com"
    )
    services.console_links.ttl = 0.0
    link = await link_from_chat(services)
    async with client(app) as http:
        page = await http.get(link.removeprefix("https://console.example.com"))
        token = re.search(r'name="token" value="([^"]+)"', page.text)
        assert token is not None
        response = await http.post(
            "/login/link", data={"csrf": csrf_of(page.text), "token": token.group(1)}
        )
    assert response.status_code == 401


async def test_console_link_only_for_admins_in_private_chats(
    console_factory: Callable[..., Any],
) -> None:
    _, services = await console_factory(
        admins="test:boss", console_url="https://console.example.com"
    )
    stranger = await run_command(services, invocation("console", user_id="nobody"))
    assert "token=" not in stranger.last_text()
    in_group = await run_command(
        services, invocation("console", user_id="boss", is_private=False, chat_id="g1")
    )
    assert "token=" not in in_group.last_text()
    assert "private chat" in in_group.last_text()


async def test_console_link_needs_the_console_url(console_factory: Callable[..., Any]) -> None:
    _, services = await console_factory(admins="test:boss")
    chat = await run_command(services, invocation("console", user_id="boss"))
    assert "DRAWBRIDGE_CONSOLE_URL" in chat.last_text()


# --- groups and kept job files ----------------------------------------------------------------


async def test_groups_show_jobs_spent_cap_and_their_own_rules(
    console_factory: Callable[..., Any],
) -> None:
    app, services = await console_factory(group_daily_cap=50)
    store = services.store
    user = await store.user("qq", "10001")
    await store.grant(user.id, 20)
    await finished_job(services, user.id, platform="qq", group_key="qq:777", cost=3)
    await store.set_group_rule("qq:888", "cap", 10)
    await store.set_group_rule("qq:888", "enabled", False)
    await store.set_group_rule("qq:888", "size", "16:9")
    async with logged_in(app) as (http, _):
        page = (await http.get("/groups")).text
    rows = {
        key: re.sub(r"<[^>]+>", "|", row)
        for key, row in re.findall(r">(qq:\d+)</a>(.*?)</tr>", page, re.S)
    }
    cells = {key: [c.strip() for c in row.split("|") if c.strip()] for key, row in rows.items()}
    # jobs, spent, used today, effective cap, enabled, size, ...
    assert cells["qq:777"][:5] == ["1", "3", "3", "50", "yes"]
    assert cells["qq:888"][:6] == ["0", "0", "0", "10", "no", "16:9"]


async def test_jobs_show_kept_results_as_thumbnails(console: tuple[Console, Services]) -> None:
    app, services = console
    chat = await run_command(services, invocation("draw", "a small boat"))
    assert chat.log
    jobs, _ = await services.store.console_jobs({})
    [job] = jobs
    assert job.status == "succeeded", job
    async with logged_in(app) as (http, _):
        page = (await http.get("/jobs")).text
        found = re.search(rf'src="(/jobs/{job.id}/files/out1\.\w+)\?thumb=1"', page)
        assert found, page
        thumb = await http.get(found.group(1), params={"thumb": "1"})
        original = await http.get(found.group(1))
        sneaky = await http.get(f"/jobs/{job.id}/files/..%2F..%2Fdrawbridge.sqlite3")
        other = await http.get(f"/jobs/{job.id}/files/secret.key")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content[:3] == b"\xff\xd8\xff"
    assert original.status_code == 200 and len(original.content) > len(thumb.content)
    assert (sneaky.status_code, other.status_code) == (404, 404)
    async with client(app) as anonymous:
        assert (await anonymous.get(found.group(1))).status_code == 303


async def test_run_doctor_runs_the_free_checks_and_keeps_what_it_learned(
    console: tuple[Console, Services],
) -> None:
    app, services = console
    async with logged_in(app) as (http, csrf):
        page = (await http.get("/providers")).text
        assert 'name="provider" value="default"' in page
        refused = await http.post("/providers/doctor", data={"provider": "default"})
        ran = await http.post("/providers/doctor", data={"csrf": csrf, "provider": "default"})
        missing = await http.post("/providers/doctor", data={"csrf": csrf, "provider": "nope"})
    assert refused.status_code == 403
    assert ran.status_code == 200
    assert 'id="doctor-report"' in ran.text and "free checks passed: 1/1" in ran.text
    assert "sk-test-shared-0000" not in ran.text
    assert missing.status_code == 404
    assert (await services.store.provider_capabilities("default")).get("models_ok") is True
    assert [a["action"] for a in await services.store.audit_entries()][:1] == ["doctor"]


@pytest.mark.parametrize("target", ["//evil.example", "/\\evil.example", "https://evil.example"])
async def test_actions_never_redirect_off_the_console(
    console: tuple[Console, Services], target: str
) -> None:
    async with logged_in(console[0]) as (http, csrf):
        response = await http.post("/lang", data={"csrf": csrf, "lang": "en", "next": target})
    assert response.status_code == 303
    assert response.headers["location"] == "/"


def test_check_masks_the_console_password_and_metrics_token() -> None:
    from bot.check import configuration_lines

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, console_password=PASSWORD, metrics_token="scrape-token-123456789"
    )
    text = "\n".join(configuration_lines(settings))
    assert "DRAWBRIDGE_CONSOLE_PASSWORD" in text and "DRAWBRIDGE_METRICS_TOKEN" in text
    assert PASSWORD not in text and "scrape-token-123456789" not in text


async def test_the_console_password_is_redacted_from_log_lines(
    settings_factory: Callable[..., Settings],
) -> None:
    from adapters.console.platform import ConsolePlatform
    from bot.logs import redact

    settings = settings_factory(console_password=PASSWORD, metrics_token="scrape-token-123456789")
    services = await Services.create(settings)
    try:
        platform = ConsolePlatform(settings, services)
        platform.logs.detach()
        assert (
            redact(f"login with {PASSWORD} and scrape-token-123456789") == "login with *** and ***"
        )
    finally:
        await services.close()


async def test_job_times_split_queued_running_and_delivering(
    console: tuple[Console, Services],
) -> None:
    app, services = console
    chat = await run_command(services, invocation("draw", "a small boat"))
    assert chat.log
    jobs, _ = await services.store.console_jobs({})
    [job] = jobs
    done = await services.store.console_upstream_done([job.id])
    assert job.id in done, "the runner marks when the upstream answered"
    async with logged_in(app) as (http, _):
        page = (await http.get("/jobs")).text
    times = re.search(r'class="times">([^<]*)<', page)
    assert times is not None
    assert re.fullmatch(r"\d+\.\ds / \d+\.\ds / \d+\.\ds", times.group(1).strip()), times.group(1)
