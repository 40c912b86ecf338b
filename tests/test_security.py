"""Keys stay secret; admins, bans and other users' jobs are respected."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

import pytest

from bot.config import Settings
from bot.jobs import today
from bot.logs import RedactingFilter, redact
from bot.mock_upstream import MockUpstream
from bot.services import Services
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat, invocation, run_command

KEY = "sk-secret-Zq8wK3mN5pR7tV9xB2dF4"


inv = invocation


run = run_command


async def test_a_bound_key_never_reaches_logs_messages_or_the_database(
    services: Services, mock_upstream: MockUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    chats = [
        await run(services, inv("token", KEY)),
        await run(services, inv("token")),
        await run(services, inv("quota")),
        await run(services, inv("draw", "a fox")),
        await run(services, inv("draw", "a fox [fail:invalid_key]")),
        await run(services, inv("token", KEY, is_private=False)),
    ]
    assert mock_upstream.requests[0].authorization == f"Bearer {KEY}"
    for chat in chats:
        assert KEY not in chat.everything()
        assert KEY[3:] not in chat.everything()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in logged
    data_dir = services.settings.data_dir
    for path in data_dir.glob("drawbridge.sqlite3*"):
        assert KEY.encode() not in path.read_bytes()
    with sqlite3.connect(data_dir / "drawbridge.sqlite3") as db:
        dump = "\n".join(db.iterdump())
    assert KEY not in dump


def test_log_redaction_covers_keys_tokens_and_token_commands() -> None:
    # A word after /token that could be no key (letters alone, under 16: /token refuses such)
    # is our own prose and stays; anything key-shaped goes, with or without the bot's @name.
    text = f"got /token {KEY} and /token@bot Zq8wK3mN5p, Bearer {KEY}, bot 123456:{'A' * 35}"
    cleaned = redact(text)
    assert KEY not in cleaned and "Zq8wK3mN5p" not in cleaned and "A" * 35 not in cleaned
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key=%s", (KEY,), None)
    RedactingFilter().filter(record)
    assert KEY not in record.getMessage()


async def test_one_user_cannot_cancel_another_users_job(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.latency = 0.4
    services = await Services.create(settings_factory(concurrency=1))
    try:
        await dispatch(inv("draw", "first", user_id="u2"), RecordingChat(), services)
        victim = RecordingChat()
        await dispatch(inv("draw", "mine", user_id="u3"), victim, services)
        victim_job = (
            await services.store.active_jobs((await services.store.user("test", "u3")).id)
        )[0]
        attacker = RecordingChat()
        await dispatch(inv("cancel", str(victim_job.id)), attacker, services)
        assert "no queued job" in attacker.last_text()
        await services.jobs.wait_idle()
        assert victim.results()
    finally:
        await services.close()


async def test_reroll_spends_the_callers_credits_never_the_owners(services: Services) -> None:
    first = await run(services, inv("draw", "a fox", user_id="owner", is_private=False))
    meta = first.results()[0].meta
    assert meta is not None
    await run(services, inv("reroll", user_id="other", is_private=False, reply_to_job=meta.job_id))
    store, settings = services.store, services.settings
    owner = await store.user("test", "owner")
    other = await store.user("test", "other")
    day = today(settings)
    assert (await store.credits(owner.id, day, 5)).total_left == 4
    assert (await store.credits(other.id, day, 5)).total_left == 4


async def test_quota_shows_only_the_callers_own_data(services: Services) -> None:
    await run(services, inv("token", KEY, user_id="rich"))
    chat = await run(services, inv("quota", user_id="poor"))
    assert "shared key" in chat.last_text()
    assert "sk-...." not in chat.last_text()


async def test_a_grant_needs_an_admin_and_a_banned_admin_is_refused(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory(admins="test:boss"))
    try:
        chat = await run(services, inv("grant", "u1 1000"))
        assert "Only admins" in chat.last_text()
        boss = await services.store.user("test", "boss")
        await services.store.set_role(boss.id, "banned")
        chat = await run(services, inv("stats", user_id="boss"))
        assert "banned" in chat.last_text()
    finally:
        await services.close()


def test_redaction_catches_full_width_and_spaceless_token_commands() -> None:
    for text in (f"／token {KEY}", "/令牌abcdefgh12345678", f"/ token {KEY}", f"/token@bot {KEY}"):
        cleaned = redact(text)
        assert KEY not in cleaned and "abcdefgh12345678" not in cleaned, cleaned


async def test_a_key_of_any_shape_is_kept_out_of_logs(
    services: Services, mock_upstream: MockUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    odd_key = "relay_Zq8wK3mN5pR7tV9xB2dF4hJ6"  # no "sk-" prefix for the patterns to catch
    caplog.set_level(logging.DEBUG)
    await run(services, inv("token", odd_key))
    # Once the key is used, a line showing it (an upstream echoing it back) is redacted.
    await run(services, inv("draw", "a fox"))
    assert mock_upstream.requests[0].authorization == f"Bearer {odd_key}"
    logging.getLogger("drawbridge.test").warning("upstream said: key %s refused", odd_key)
    record = caplog.records[-1]
    RedactingFilter().filter(record)
    assert odd_key not in record.getMessage()


def test_settings_secrets_are_redacted_verbatim() -> None:
    from bot.config import Settings
    from bot.logs import add_secrets, settings_secrets

    settings = Settings(
        _env_file=None,
        api_base="http://x",
        api_key="shared-key-without-prefix-123",
        telegram_bot_token="tg-token-abcdefgh",
        discord_bot_token="discord.token.value",
    )
    add_secrets(settings_secrets(settings), configured=True)
    line = redact("shared-key-without-prefix-123 tg-token-abcdefgh discord.token.value")
    assert "shared-key" not in line and "tg-token" not in line and "discord.token" not in line


def test_tracebacks_are_redacted_too() -> None:
    import io

    from bot.logs import RedactingFormatter, add_secrets

    add_secrets(["relay-secret-in-a-traceback-1234"], configured=True)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    logger = logging.getLogger("drawbridge.test.traceback")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(
                "GET https://api.telegram.org/bot123456:" + "A" * 35 + " with "
                "relay-secret-in-a-traceback-1234"
            )
        except RuntimeError:
            logger.exception("request failed")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert "Traceback" in output
    assert "A" * 35 not in output and "relay-secret-in-a-traceback-1234" not in output
