"""/token, /quota, /help, /cancel, /lang and /whoami."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any, Final
from weakref import WeakKeyDictionary

from bot import probe
from bot.config import ProviderConfig
from bot.i18n import LANGUAGES
from bot.jobs import today
from bot.logs import redacts_argument
from bot.probe import Balance
from bot.secrets import mask_key
from bot.services import Services
from plugins.context import Context
from plugins.registry import COMMANDS

log = logging.getLogger(__name__)

# Reseller keys are "sk-" plus 20-200 URL-safe characters; anything else is likely a typo.
_KEY_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]{15,199}$")

# A probe must not keep a user waiting long: past this the relay counts as unreachable.
PROBE_SECONDS: Final = 10.0
# /quota asks the relay for the key's balance at most this often per user.
BALANCE_CACHE_SECONDS: Final = 60.0

# Per Services (one per process, several in tests): user id -> (expires, key digest, balance).
_balances: WeakKeyDictionary[Services, dict[int, tuple[float, str, Balance | None]]] = (
    WeakKeyDictionary()
)


def _digest(provider: ProviderConfig) -> str:
    # The cache must not outlive a rebind; a digest, so no key sits in another structure.
    return hashlib.sha256(f"{provider.api_base}\n{provider.api_key}".encode()).hexdigest()


def _remember_balance(
    services: Services, user_id: int, provider: ProviderConfig, balance: Balance | None
) -> None:
    cache = _balances.setdefault(services, {})
    cache[user_id] = (time.monotonic() + BALANCE_CACHE_SECONDS, _digest(provider), balance)


async def _key_balance(services: Services, user_id: int, key: str) -> Balance | None:
    """The bound key's balance as its relay reports it, cached for a minute."""
    providers = services.settings.providers()
    if not providers:
        return None
    provider = providers[0].with_key(key)
    cached = _balances.get(services, {}).get(user_id)
    if cached is not None and cached[0] > time.monotonic() and cached[1] == _digest(provider):
        return cached[2]
    try:
        balance = await probe.probe_balance(services.http, provider, deadline=PROBE_SECONDS)
    except Exception:
        # The balance is a courtesy: /quota must answer even when the relay does not.
        log.info("balance lookup failed", exc_info=True)
        balance = None
    _remember_balance(services, user_id, provider, balance)
    # The console's users page shows the key's last probe.
    await services.store.set_key_probe(user_id, probe.record(None, balance))
    return balance


def _amount(balance: Balance) -> str:
    assert balance.amount is not None
    return f"{balance.amount:.2f}" if balance.amount >= 1 else f"{balance.amount:.4f}"


def _balance_line(ctx: Context, balance: Balance | None, prefix: str) -> str | None:
    if balance is None:
        return None
    if balance.unlimited:
        return ctx.t(f"{prefix}.unlimited")
    return ctx.t(f"{prefix}.balance", balance=_amount(balance))


async def _probe_key(ctx: Context, key: str) -> tuple[bool, list[str], dict[str, Any] | None]:
    """Probe a key for free before binding it: (bind it?, lines to add to the answer, what
    the store keeps of the probe once the key is bound)."""
    providers = ctx.services.settings.providers()
    if not providers:
        return True, [], None  # nowhere to ask; the key will meet its relay at the first /draw
    provider = providers[0].with_key(key)
    found = await probe.probe_key(ctx.services.http, provider, deadline=PROBE_SECONDS)
    models = found.models
    if models.outcome == probe.INVALID_KEY:
        return False, [ctx.t("token.refused", reason=models.detail or str(models.status))], None
    lines = []
    if models.outcome in (probe.UNREACHABLE, probe.ERROR):
        # Never lock a user out because the relay hiccuped: bind, and say it is unchecked.
        lines.append(ctx.t("token.unchecked", reason=models.detail or str(models.status)))
    elif models.has_model is False:
        lines.append(ctx.t("token.no_model", model=provider.model))
    balance_line = _balance_line(ctx, found.balance, "token")
    if balance_line:
        lines.append(balance_line)
    _remember_balance(ctx.services, ctx.user.id, provider, found.balance)
    return True, lines, probe.record(models, found.balance)


def _token_argument(ctx: Context) -> str:
    return ctx.inv.text.strip()


# The argument is hidden in this invocation's own log lines only. It becomes a process-wide
# redaction literal once bound and used (the job runner adds it then), never merely by being
# sent: anyone could otherwise blank someone's id or any word out of every later log line.
@redacts_argument(_token_argument)
async def token(ctx: Context) -> None:
    """Bind (private chat only), show or clear the user's own API key."""
    arg = ctx.inv.text.strip()
    store = ctx.services.store
    if arg.lower() in ("clear", "delete", "remove", "清除", "删除"):
        removed = await store.clear_api_key(ctx.user.id)
        await store.set_key_probe(ctx.user.id, None)
        await ctx.reply("token.cleared" if removed else "token.not_set", ephemeral=True)
        return
    if not arg:
        key = await store.get_api_key(ctx.user.id)
        if key:
            await ctx.reply("token.status", ephemeral=True, masked=mask_key(key))
        else:
            await ctx.reply("token.none", ephemeral=True)
        return
    if not ctx.inv.is_private:
        # The key is already visible to the group: remove it and never bind a leaked key.
        deleted = await ctx.chat.delete_invocation()
        log.info("a key was posted in a group on %s; deleted=%s", ctx.inv.platform, deleted)
        name = ctx.inv.user_name or ctx.inv.user_id
        await ctx.reply("token.group_deleted" if deleted else "token.group_not_deleted", user=name)
        return
    if not _KEY_SHAPE.match(arg):
        await ctx.reply("token.bad_format", ephemeral=True)
        return
    bind, notes, probed = await _probe_key(ctx, arg)
    # Private chats: still try to remove the key from the chat history, bound or not.
    await ctx.chat.delete_invocation()
    if not bind:
        await ctx.chat.send_text("\n".join(notes), ephemeral=True)
        return
    await store.set_api_key(ctx.user.id, arg)
    # Kept with the key it describes: a refused key is not bound, so its probe is not kept.
    await store.set_key_probe(ctx.user.id, probed)
    lines = [ctx.t("token.bound", masked=mask_key(arg)), *notes]
    await ctx.chat.send_text("\n".join(lines), ephemeral=True)


async def quota(ctx: Context) -> None:
    """Credits today, balance, key status and active jobs."""
    settings = ctx.services.settings
    store = ctx.services.store
    credits = await store.credits(ctx.user.id, today(settings), settings.daily_credits)
    key = await store.get_api_key(ctx.user.id)
    key_text = ctx.t("quota.own_key", masked=mask_key(key)) if key else ctx.t("quota.shared_key")
    text = ctx.t(
        "quota.text",
        daily_left=credits.daily_left,
        daily_total=credits.daily_allowance,
        balance=credits.balance,
        key_status=key_text,
        active=ctx.services.jobs.active_count(ctx.user.id),
        tz=settings.timezone,
    )
    if key:
        line = _balance_line(ctx, await _key_balance(ctx.services, ctx.user.id, key), "quota.key")
        text = f"{text}\n{line}" if line else text
    identities = await store.identities(ctx.user.id)
    if len(identities) > 1:
        # One wallet across platforms (/link): say which identities share it.
        linked = ", ".join(f"{platform}:{uid}" for platform, uid, _ in identities)
        text = f"{text}\n{ctx.t('quota.linked', identities=linked)}"
    await ctx.chat.send_text(text, ephemeral=True)


async def help_(ctx: Context) -> None:
    """Every command from the shared declarations, in the user's language."""
    settings = ctx.services.settings
    lines = [ctx.t("help.header", model=settings.model), ""]
    for spec in COMMANDS:
        if spec.admin and ctx.user.role != "admin":
            continue
        if not spec.in_menu and spec.name not in ("reroll", "original"):
            continue
        aliases = "".join(f" /{a}" for a in spec.aliases if a != "start")
        args = ctx.t(f"arg.{spec.text_arg}") if spec.text_arg else ""
        lines.append(
            ctx.t(
                "help.line", name=spec.name, aliases=aliases, args=args, text=ctx.t(spec.help_key)
            ).replace("  ", " ")
        )
    lines += [
        "",
        ctx.t("help.options", max_n=settings.max_n),
        ctx.t("help.examples"),
        ctx.t("help.footer", daily=settings.daily_credits),
    ]
    await ctx.chat.send_text("\n".join(lines))


async def cancel(ctx: Context) -> None:
    """Cancel the caller's newest queued job (or `/cancel <job id>`)."""
    arg = ctx.inv.text.strip().lstrip("#")
    job_id = int(arg) if arg.isdigit() else None
    cancelled = await ctx.services.jobs.cancel(ctx.user.id, job_id)
    if cancelled is None:
        await ctx.reply("cancel.none", ephemeral=True)
    # A cancelled job reports itself through its status message.


async def whoami(ctx: Context) -> None:
    """The caller's `platform:id`, exactly as `DRAWBRIDGE_ADMINS` takes it.

    In a group, also the group's, as `DRAWBRIDGE_GROUPS` takes it (the QQ group number, the
    Telegram chat id, the Discord server id).
    """
    # The platform as the store matches admins (lower case), the id as the platform gives it.
    who = f"{ctx.inv.platform.lower()}:{ctx.inv.user_id}"
    lines = [ctx.t("whoami.text", who=who)]
    if not ctx.inv.is_private:
        lines.append(ctx.t("whoami.group", space=ctx.inv.space))
    await ctx.chat.send_text("\n".join(lines), ephemeral=True)


async def lang(ctx: Context) -> None:
    """`/lang zh|en|auto`."""
    choice = (ctx.inv.text.strip() or str(ctx.inv.options.get("lang") or "")).lower()
    choice = {"中文": "zh", "english": "en", "英文": "en", "cn": "zh"}.get(choice, choice)
    if choice == "auto":
        await ctx.services.store.set_lang(ctx.user.id, None)
        await ctx.chat.send_text(ctx.services.t(ctx.lang, "lang.auto"))
    elif choice in LANGUAGES:
        await ctx.services.store.set_lang(ctx.user.id, choice)
        await ctx.chat.send_text(ctx.services.t(choice, "lang.set"))
    else:
        await ctx.reply("lang.bad")
