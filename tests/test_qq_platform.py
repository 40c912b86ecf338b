"""The QQ platform's own duties: log redaction, the exposure warning, a clean start failure."""

from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loguru import logger
from nonebot.drivers import Request

from adapters.qq import create_platform, redaction
from adapters.qq.platform import ensure_adapter, ensure_driver, refuse_if_exposed
from bot.config import Settings
from bot.startup import StartupError


@pytest.fixture
def loguru_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lines.append, level="TRACE", format="{message}|{exception}")
    try:
        yield lines
    finally:
        logger.remove(sink)


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("Message 5 from 1@[群:2] '/token sk-abcdef1234567890'", "sk-abcdef1234567890"),
        ("Message 6 from 1@[群:2] '/token Zq8wX2cV4bN6mL1k'", "Zq8wX2cV4bN6mL1k"),
        ("'／令牌 Zq8wX2cV4bN6mL1k'", "Zq8wX2cV4bN6mL1k"),
        ("'/令牌Zq8wX2cV4bN6mL1k'", "Zq8wX2cV4bN6mL1k"),
        ("[CQ:reply,id=3]/TOKEN@drawbot Zq8wX2cV4bN6mL1k[CQ:at,qq=1]", "Zq8wX2cV4bN6mL1k"),
        ("raw: {'raw_message': '/token Zq8wX2cV4bN6mL1k', 'font': 0}", "Zq8wX2cV4bN6mL1k"),
    ],
)
def test_token_arguments_are_redacted_in_every_spelling(line: str, secret: str) -> None:
    cleaned = redaction.Redactor().redact(line)
    assert secret not in cleaned
    assert "***" in cleaned


def test_ordinary_messages_are_left_alone() -> None:
    line = "Message 7 from 1@[群:2] '/画 一只猫 --size 16:9'"
    assert redaction.Redactor().redact(line) == line


def test_secrets_from_settings_are_masked_in_loguru_records_and_exceptions(
    loguru_lines: list[str],
) -> None:
    # Built at run time: a traceback shows source lines, and this one must not hold the token.
    key, token = "plainkey-without-" + "prefix-123", "onebot-" + "token-abcdef"
    settings = Settings(_env_file=None, api_key=key, onebot_access_token=token)
    redaction.install(redaction.secrets_of(settings))
    logger.trace("loaded drawbridge_api_key={!r}", key)
    try:
        raise ValueError(f"bad header: {token}")
    except ValueError:
        logger.exception("connection refused")
    output = "".join(loguru_lines)
    assert "loaded drawbridge_api_key" in output and "connection refused" in output
    assert key not in output
    assert token not in output


def test_exposed_endpoint_without_access_token_is_refused_unless_allowed(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    def warnings_for(**values: Any) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            refuse_if_exposed(Settings(_env_file=None, **values))
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    for host in ("0.0.0.0", "::", "192.168.1.20", "qq.example.com", ""):
        with pytest.raises(SystemExit) as refused:
            refuse_if_exposed(Settings(_env_file=None, host=host))
        assert refused.value.code == 2
        [line] = capsys.readouterr().err.splitlines()
        assert "HOST" in line and "ONEBOT_ACCESS_TOKEN" in line and "QQ_ALLOW_NO_TOKEN" in line
    allowed = warnings_for(host="0.0.0.0", qq_allow_no_token=True)
    assert any("ONEBOT_ACCESS_TOKEN" in m for m in allowed)
    assert warnings_for(host="0.0.0.0", onebot_access_token="set-and-long-enough") == []
    for loopback in ("127.0.0.1", "127.3.2.1", "localhost", "LOCALHOST", "::1", "[::1]"):
        assert warnings_for(host=loopback) == []


async def test_taken_port_fails_start_with_a_startup_error_naming_port(
    settings_factory: Callable[..., Settings], services: Any
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        platform = create_platform(settings_factory(qq_enabled=True, port=port), services)
        with pytest.raises(StartupError, match="PORT") as caught:
            await platform.start()
        assert caught.value.exit_code == 1
        await platform.stop()


def test_access_token_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, settings_factory: Callable[..., Settings]
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    token = "onebot-" + "constant-time-4f1a"
    adapter = ensure_adapter(ensure_driver(settings_factory(qq_enabled=True)), token)
    try:

        def answer(authorization: str | None) -> int | None:
            headers = {"authorization": authorization} if authorization is not None else {}
            request = Request("GET", "ws://127.0.0.1/onebot/v11/ws", headers=headers)
            response = adapter._check_access_token(request)
            return None if response is None else response.status_code

        assert answer(f"Bearer {token}") is None
        assert answer(f"Token {token}") is None
        assert answer(f"Bearer {token[:-1]}x") == 403
        assert answer(f"Bearer {token}x") == 403
        assert answer(f"Basic {token}") == 403
        assert answer(None) == 403
        # Every candidate token went through the constant-time comparison.
        assert (token.encode(), token.encode()) in compared
        assert (f"{token[:-1]}x".encode(), token.encode()) in compared

        # The HTTP route's HMAC signature as well, when a secret is set.
        secret, body = "onebot-" + "secret-9b2c", b'{"post_type": "meta_event"}'
        adapter.onebot_config = adapter.onebot_config.model_copy(update={"onebot_secret": secret})
        good = "sha1=" + hmac.new(secret.encode(), body, "sha1").hexdigest()

        def signed(signature: str | None, authorization: str = f"Bearer {token}") -> int | None:
            headers = {"authorization": authorization}
            if signature is not None:
                headers["x-signature"] = signature
            request = Request("POST", "http://127.0.0.1/onebot/v11/", headers=headers, content=body)
            response = adapter._check_signature(request)
            return None if response is None else response.status_code

        compared.clear()
        assert signed(good) is None
        assert signed(good[:-1] + ("0" if good[-1] != "0" else "1")) == 403
        assert signed(None) == 401
        # The HTTP route asks for the access token as the WebSocket does.
        assert signed(good, authorization="") == 403
        assert (good.encode(), good.encode()) in compared
    finally:
        adapter.onebot_config = adapter.onebot_config.model_copy(update={"onebot_secret": None})
        ensure_adapter(ensure_driver(settings_factory(qq_enabled=True)), "")
