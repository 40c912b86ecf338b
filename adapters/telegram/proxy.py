"""aiogram's HTTP session through `TELEGRAM_PROXY` (http, https or socks5)."""

from __future__ import annotations

import logging

from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer

from bot.proxies import proxy_from_setting

log = logging.getLogger(__name__)


def bot_session(api: TelegramAPIServer, proxy_setting: str) -> AiohttpSession:
    """The session for every Bot API call and file download, through the proxy if one is set.

    aiogram hands its `proxy` to aiohttp-socks, which tunnels every connection (CONNECT or
    SOCKS5 with remote DNS). aiohttp-socks knows an https proxy only as an http one plus TLS
    to the proxy, which aiogram has no parameter for: that one option is added to the
    connector settings aiogram keeps.
    """
    proxy = proxy_from_setting(proxy_setting)
    if proxy is None:
        return AiohttpSession(api=api)
    log.info("telegram: connecting through %s", proxy.address)
    session = AiohttpSession(api=api, proxy=proxy.tunnel_url)
    tls = proxy.tunnel_tls()
    if tls is not None:
        session._connector_init["proxy_ssl"] = tls
    return session
