"""The store the settings name, opened the same way by `drawbridge run`, the CLI and doctor."""

from __future__ import annotations

import asyncpg

from bot.config import Settings
from bot.secrets import KeyBox
from bot.startup import RETRY, SETTINGS, StartupError
from bot.store.copy import redact
from bot.store.core import Store
from bot.store.model import StoreError


async def open_store(settings: Settings, keybox: KeyBox) -> Store:
    """The store the settings name, or a `StartupError` naming DRAWBRIDGE_DATABASE_URL (one
    line, no password): a server down may come back (exit 1); a schema newer than this
    drawbridge, or a database that refuses the login, needs the operator (exit 2)."""
    url = settings.database()
    try:
        # Every pooled connection opened now: a burst must not wait for connects.
        return await Store.connect(url, keybox=keybox, admins=settings.admin_ids(), full_pool=True)
    except StoreError as exc:
        raise StartupError(f"{redact(url)}: {exc}", exit_code=SETTINGS) from None
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError) as exc:
        raise StartupError(
            f"cannot reach the database {redact(url)} ({type(exc).__name__}): is it running? "
            "check DRAWBRIDGE_DATABASE_URL",
            exit_code=RETRY,
        ) from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StartupError(
            f"the database {redact(url)} refused drawbridge ({type(exc).__name__}): "
            "check DRAWBRIDGE_DATABASE_URL",
            exit_code=SETTINGS,
        ) from None
