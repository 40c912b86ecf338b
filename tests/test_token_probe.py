"""/token probes a key for free before binding it; /quota shows the bound key's balance."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bot.config import Settings
from bot.mock_upstream import MockUpstream
from bot.services import Services
from tests.recording_chat import RecordingChat, invocation, run_command

OWN_KEY = "sk-own-key-1234567890abcdef"
MockFactory = Callable[..., Awaitable[MockUpstream]]


async def bound_key(services: Services) -> str | None:
    user = await services.store.user("test", "u1")
    return await services.store.get_api_key(user.id)


def image_requests(mock: MockUpstream) -> int:
    return len(mock.requests)


async def test_token_binds_a_valid_key_and_shows_its_balance(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run_command(services, invocation("token", OWN_KEY))
    text = chat.last_text()
    assert "is bound" in text and "Key balance: 25.00" in text
    assert OWN_KEY not in chat.everything()
    assert await bound_key(services) == OWN_KEY
    assert image_requests(mock_upstream) == 0  # the probe bought nothing
    assert mock_upstream.spent == 0.0


async def test_token_refuses_an_invalid_key_with_the_relays_reason(
    services: Services, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.api_key = "sk-the-only-valid-key-000"
    chat = await run_command(services, invocation("token", OWN_KEY))
    text = chat.last_text()
    assert "not bound" in text and "无效的令牌" in text
    assert "is bound" not in text and "request id" not in text
    assert await bound_key(services) is None
    # The key was posted in the chat: it is removed even though it was refused.
    assert any(sent.kind == "delete_invocation" for sent in chat.log)


async def test_token_refusal_is_in_the_users_language(
    services: Services, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.api_key = "sk-the-only-valid-key-000"
    chat = await run_command(services, invocation("token", OWN_KEY, locale="zh-CN"))
    assert "未绑定" in chat.last_text()


async def test_token_binds_a_key_without_the_model_but_warns(
    services: Services, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.models = ("gpt-image-1", "dall-e-3")
    chat = await run_command(services, invocation("token", OWN_KEY))
    text = chat.last_text()
    assert "is bound" in text and "Warning" in text and "gpt-image-2" in text
    assert await bound_key(services) == OWN_KEY


async def test_token_binds_with_a_note_when_the_relay_is_unreachable(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(settings_factory(api_base="http://127.0.0.1:9"))
    try:
        chat = await run_command(services, invocation("token", OWN_KEY))
        text = chat.last_text()
        assert "is bound" in text and "could not be reached" in text
        assert "Key balance" not in text
        assert await bound_key(services) == OWN_KEY
    finally:
        await services.close()


async def test_token_says_nothing_of_a_balance_the_relay_does_not_report(
    services: Services, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.billing = "none"
    chat = await run_command(services, invocation("token", OWN_KEY))
    assert "is bound" in chat.last_text() and "balance" not in chat.last_text().lower()


async def test_token_shows_an_unlimited_key(
    services: Services, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.unlimited = True
    chat = await run_command(services, invocation("token", OWN_KEY))
    assert "Key balance: unlimited" in chat.last_text()


async def test_token_reads_a_one_api_balance_as_what_is_left(
    services: Services, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.billing = "one-api"
    mock_upstream.options.balance = 0.5
    chat = await run_command(services, invocation("token", OWN_KEY))
    assert "Key balance: 0.5000" in chat.last_text()


async def test_quota_shows_the_bound_keys_balance_beside_the_credits_cached_for_a_minute(
    services: Services, mock_upstream: MockUpstream
) -> None:
    await run_command(services, invocation("token", OWN_KEY))
    await run_command(services, invocation("draw", "a fox --quality low"))
    assert mock_upstream.spent > 0
    # The balance /token read is cached: /quota right after shows it without asking again.
    chat = await run_command(services, invocation("quota"))
    text = chat.last_text()
    assert "5/5" in text and "Key balance: 25.00" in text


async def test_quota_asks_the_relay_again_after_a_rebind(
    services: Services, mock_upstream: MockUpstream
) -> None:
    await run_command(services, invocation("token", OWN_KEY))
    mock_upstream.options.balance = 3.0
    await run_command(services, invocation("token", OWN_KEY[:-1] + "X"))
    chat = await run_command(services, invocation("quota"))
    assert "Key balance: 3.00" in chat.last_text()


async def test_quota_with_the_shared_key_shows_no_key_balance(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run_command(services, invocation("quota"))
    assert "Key balance" not in chat.last_text()
    assert mock_upstream.requests == []


async def test_quota_still_answers_when_the_relay_is_gone(
    settings_factory: Callable[..., Settings], mock_factory: MockFactory
) -> None:
    mock = await mock_factory()
    services = await Services.create(settings_factory(api_base=mock.base_url))
    try:
        await run_command(services, invocation("token", OWN_KEY))
        await mock.stop()
        chat = await run_command(services, invocation("quota"), RecordingChat())
        assert "Credits today" in chat.last_text()
    finally:
        await services.close()
