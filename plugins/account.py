"""/token, /quota, /help, /cancel and /lang."""

from __future__ import annotations

import logging
import re

from bot.i18n import LANGUAGES
from bot.jobs import today
from bot.logs import redacts_argument
from bot.secrets import mask_key
from plugins.context import Context
from plugins.registry import COMMANDS

log = logging.getLogger(__name__)

# Reseller keys are "sk-" plus 20-200 URL-safe characters; anything else is likely a typo.
_KEY_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]{15,199}$")


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
    await store.set_api_key(ctx.user.id, arg)
    # Private chats: still try to remove the key from the chat history.
    await ctx.chat.delete_invocation()
    await ctx.reply("token.bound", ephemeral=True, masked=mask_key(arg))


async def quota(ctx: Context) -> None:
    """Credits today, balance, key status and active jobs."""
    settings = ctx.services.settings
    store = ctx.services.store
    credits = await store.credits(ctx.user.id, today(settings), settings.daily_credits)
    key = await store.get_api_key(ctx.user.id)
    key_text = ctx.t("quota.own_key", masked=mask_key(key)) if key else ctx.t("quota.shared_key")
    await ctx.reply(
        "quota.text",
        ephemeral=True,
        daily_left=credits.daily_left,
        daily_total=credits.daily_allowance,
        balance=credits.balance,
        key_status=key_text,
        active=ctx.services.jobs.active_count(ctx.user.id),
        tz=settings.timezone,
    )


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
