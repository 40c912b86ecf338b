"""The one entry point adapters call: route an Invocation to its command handler."""

from __future__ import annotations

import logging

from bot import errors
from bot.chat import Chat, Invocation
from bot.groups import answers_here
from bot.i18n import normalize_lang
from bot.jobs import render_error
from bot.services import Services
from plugins import account, admin, confirm, console, group, image, link
from plugins.context import Context, Handler
from plugins.registry import find_command

log = logging.getLogger(__name__)

HANDLERS: dict[str, Handler] = {
    "draw": image.draw,
    "edit": image.edit,
    "reroll": image.reroll,
    "original": image.original,
    "edit_hint": image.edit_hint,
    "console": console.console,
    "token": account.token,
    "quota": account.quota,
    "help": account.help_,
    "cancel": account.cancel,
    "lang": account.lang,
    "whoami": account.whoami,
    "confirm": confirm.confirm,
    "grant": admin.grant,
    "ban": admin.ban,
    "unban": admin.unban,
    "stats": admin.stats,
    "group": group.group,
    "link": link.link,
    "unlink": link.unlink,
}
"""Command name -> handler; result actions ("original", "edit_hint") have no menu entry."""


async def dispatch(inv: Invocation, chat: Chat, services: Services) -> None:
    """Run one command and answer through `chat`. User errors become translated messages."""
    handler = HANDLERS.get(inv.command)
    if handler is None:
        log.debug("unknown command %r", inv.command)
        return
    settings = services.settings
    if not answers_here(
        settings.group_allow_list(),
        settings.private,
        inv.platform,
        inv.space_id or inv.chat_id,
        inv.is_private,
    ):
        # DRAWBRIDGE_GROUPS / DRAWBRIDGE_PRIVATE: not a word here, and no user row either.
        log.debug("%s /%s: not answering in %s", inv.platform, inv.command, inv.space)
        return
    reads = services.jobs.reads
    # The group's rules do not depend on who asks: asked beside the user, not after, so a
    # burst's commands take one store step fewer before their job is charged.
    rules_read = None if inv.group_id is None else reads.ask_group_rules(inv.group_id)
    try:
        user = await reads.user(inv.platform, inv.user_id, inv.user_name)
        rules = [] if rules_read is None else [await rules_read]
    except BaseException:
        if rules_read is not None and not rules_read.cancel() and not rules_read.cancelled():
            rules_read.exception()  # answered with an error too: the user read's is the one
        raise
    lang = user.lang or normalize_lang(inv.locale, services.settings.default_lang)
    ctx = Context(inv, chat, services, user, lang, rules)
    spec = find_command(inv.command)
    try:
        if user.role == "banned":
            raise errors.BannedError()
        if spec is not None and spec.admin and user.role != "admin":
            raise errors.NotAdminError()
        if not await group.admits(ctx):
            return
        await handler(ctx)
    except errors.DrawbridgeError as exc:
        log.info("%s /%s refused: %s", inv.platform, inv.command, exc.kind)
        private = isinstance(exc, errors.AccessError)
        try:
            await chat.send_text(render_error(lang, exc), ephemeral=private)
        except Exception:
            log.warning("could not send an error message", exc_info=True)
    except Exception:
        log.exception("/%s crashed", inv.command)
        try:
            await chat.send_text(services.t(lang, "error.internal"))
        except Exception:
            log.warning("could not send an error message", exc_info=True)
