"""What `/token` sends is hidden in its own log lines, and poisons no one else's."""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import Iterator

import pytest

from bot.logs import (
    MAX_BOUND_KEYS,
    RedactingFilter,
    RedactingFormatter,
    add_secrets,
    redact,
    redacting,
    redacts_argument,
    secret_counts,
)
from bot.mock_upstream import MockUpstream
from bot.services import Services
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat, invocation, run_command


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """What a logger writes through the same filter and formatter as `setup_logging`'s."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("drawbridge.test.redaction")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def _later_line(text: str) -> str:
    return redact(f"discord: /draw from user {text} queued as job 7")


async def test_token_in_a_group_does_not_blank_that_text_from_later_log_lines(
    services: Services,
) -> None:
    # Someone else's Discord id and an ordinary word, sent as "keys" in a group.
    victim_id = str(100000000000000000 + secrets.randbelow(10**17))
    word = f"lighthouse{secrets.token_hex(4)}"
    for text in (victim_id, word):
        chat = await run_command(services, invocation("token", text, is_private=False))
        assert chat.log[0].kind == "delete_invocation"
        assert text in _later_line(text)


async def test_token_in_private_from_an_unbound_user_does_not_blank_that_text_later(
    services: Services,
) -> None:
    victim_id = str(100000000000000000 + secrets.randbelow(10**17))
    short = f"id-{secrets.token_hex(3)}"
    # Key-shaped, so it is bound to the sender's account; still not a redaction literal,
    # since the sender never used it.
    await run_command(services, invocation("token", victim_id, user_id="mallory"))
    await run_command(services, invocation("token", short, user_id="mallory2"))
    assert victim_id in _later_line(victim_id)
    assert short in _later_line(short)


async def test_a_bound_key_that_looks_like_an_id_never_becomes_a_literal(
    services: Services, mock_upstream: MockUpstream
) -> None:
    victim_id = str(100000000000000000 + secrets.randbelow(10**17))
    await run_command(services, invocation("token", victim_id, user_id="mallory3"))
    # Used for a job: the job runner offers it for redaction, but digits alone are no key.
    await run_command(services, invocation("draw", "a fox", user_id="mallory3"))
    assert mock_upstream.requests[-1].authorization == f"Bearer {victim_id}"
    assert victim_id in _later_line(victim_id)


async def test_a_bound_key_used_for_a_job_is_redacted_from_later_log_lines(
    services: Services, mock_upstream: MockUpstream
) -> None:
    key = f"relay{secrets.token_hex(12)}"  # no "sk-": only the literal can catch it
    await run_command(services, invocation("token", key, user_id="owner"))
    await run_command(services, invocation("draw", "a fox", user_id="owner"))
    assert mock_upstream.requests[-1].authorization == f"Bearer {key}"
    assert key not in _later_line(key)
    # Cut out of a longer word too (a URL, say).
    assert key not in redact(f"GET https://relay.example/check?k={key}&x=1")


async def test_the_token_argument_is_hidden_in_the_lines_of_its_own_invocation(
    log_lines: io.StringIO,
) -> None:
    logger = logging.getLogger("drawbridge.test.redaction")
    key = f"Zq8w{secrets.token_hex(10)}"

    @redacts_argument(lambda text: text)
    async def handler(text: str) -> None:
        logger.info("relay refused %s", text)
        try:
            raise RuntimeError(f"probe failed for {text}")
        except RuntimeError:
            logger.exception("probe")

    await handler(key)
    logger.info("after: %s", key)
    inside, after = log_lines.getvalue().split("after: ")
    assert key not in inside and "relay refused ***" in inside and "Traceback" in inside
    assert key in after


async def test_a_crash_of_token_logged_by_dispatch_does_not_show_the_argument(
    services: Services, log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"Zq8w{secrets.token_hex(10)}"

    async def broken_delete() -> bool:
        raise RuntimeError(f"recall failed for message holding {key}")

    # The chat fails (a platform error quoting the message): /token crashes, and dispatch
    # logs the traceback after the handler, and its redaction block, are done.
    chat = RecordingChat()
    monkeypatch.setattr(chat, "delete_invocation", broken_delete)
    handler = logging.StreamHandler(log_lines)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    handler.addFilter(RedactingFilter())
    dispatch_log = logging.getLogger("plugins.dispatch")
    dispatch_log.addHandler(handler)
    try:
        await dispatch(invocation("token", key, is_private=False), chat, services)
    finally:
        dispatch_log.removeHandler(handler)
    logged = log_lines.getvalue()
    assert "Traceback" in logged and "RuntimeError: recall failed for message holding ***" in logged
    assert key not in logged
    assert key in redact(f"later: {key}")


def test_redacting_is_scoped_to_its_block() -> None:
    value = f"plain{secrets.token_hex(8)}"
    with redacting(value):
        assert value not in redact(f"x {value} y")
    assert value in redact(f"x {value} y")


async def test_redaction_literals_stay_bounded_after_10000_token_calls(
    services: Services,
) -> None:
    before = secret_counts()
    for index in range(10_000):
        # Groups (deleted, never bound), private texts no key looks like (refused) and, every
        # 100th, a private key-shaped one (probed and bound): what an attacker can send.
        private = index % 2 == 0
        text = f"k{index:05d}{secrets.token_hex(8)}"
        if private and index % 100:
            text = f"{text}!"
        await run_command(
            services, invocation("token", text, user_id=f"u{index % 50}", is_private=private)
        )
    # /token alone adds nothing process-wide.
    assert secret_counts() == before
    # Keys in use are capped, least recently used forgotten first.
    keys = [f"key{index}{secrets.token_hex(10)}" for index in range(10_000)]
    for key in keys:
        add_secrets([key])
    assert secret_counts()[1] == MAX_BOUND_KEYS
    assert keys[-1] not in redact(keys[-1])
    assert keys[0] in redact(keys[0])


@pytest.mark.parametrize(
    "line",
    [
        "Message 42 from 1@[群:2] \"/token 'Zq8wLongSecretValue123'\"",
        "Message 42 from 1@[群:2] '/token \"Zq8wLongSecretValue123\"'",
        "Message 42 from 1@[群:2] '/token \\'Zq8wLongSecretValue123\\''",
        "Message 42 from 1@[群:2] '/令牌 「Zq8wLongSecretValue123」'",
        "Message 42 from 1@[群:2] '／TOKEN Zq8wLongSecretValue123'",
        '{"text": "/token \\"Zq8wLongSecretValue123\\"", "chat": 1}',
        "'[CQ:at,qq=10000] /token@drawbot   Zq8wLongSecretValue123'",
    ],
)
def test_quoted_and_unquoted_token_arguments_are_masked(line: str) -> None:
    cleaned = redact(line)
    assert "Zq8wLongSecretValue123" not in cleaned
    assert "LongSecret" not in cleaned


def test_discord_interaction_tokens_in_urls_are_masked() -> None:
    token = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5OmFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6"
    for line in (
        f"POST https://discord.com/api/v10/interactions/1234/{token}/callback has returned 204",
        f"PATCH https://discord.com/api/v10/webhooks/5678/{token}/messages/@original",
        f"POST http://127.0.0.1:4000/api/v10/webhooks/5678/{token}?wait=true",
    ):
        assert token not in redact(line)


def test_proxy_passwords_and_console_secrets_are_configured_secrets() -> None:
    from bot.config import Settings
    from bot.logs import settings_secrets

    settings = Settings(
        _env_file=None,
        telegram_proxy="socks5://bob:Pr0xyPass@127.0.0.1:1080",
        upstream_proxy="http://alice:Up5treamPw@127.0.0.1:3128",
        console_password="console-Pass-0123456789",
        metrics_token="metrics-Tok-0123456789",
    )
    assert {
        "Pr0xyPass",
        "Up5treamPw",
        "console-Pass-0123456789",
        "metrics-Tok-0123456789",
    } <= settings_secrets(settings)
