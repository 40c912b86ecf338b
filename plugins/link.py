"""/link (/绑定) and /unlink (/解绑): one wallet across platforms.

`/link` answers a one-time code, only where the caller alone can read it (a private chat, a
Discord ephemeral reply). `/link CODE` sent from another platform's identity joins the two
accounts: one balance, one daily allowance, one key, one language, one job history. Admin
rights and bans stay with each identity.
"""

from __future__ import annotations

import logging

from bot.jobs import today
from bot.secrets import mask_key
from bot.store import LINK_CODE_TTL, LinkRefused
from plugins.context import Context

log = logging.getLogger(__name__)


async def link(ctx: Context) -> None:
    """`/link` for a code; `/link CODE` to join this identity to the code's account."""
    inv = ctx.inv
    store = ctx.services.store
    code = (inv.text.strip() or str(inv.options.get("code") or "")).strip()
    if not inv.answers_privately:
        if code:
            # Posted where others read it: someone could redeem it first. Spend it now.
            await store.burn_link_code(code)
            await ctx.chat.delete_invocation()
            await ctx.reply("link.code_exposed", ephemeral=True)
        else:
            await ctx.reply("link.private_only", ephemeral=True)
        return
    if not code:
        new = await store.create_link_code(ctx.user.identity_id)
        minutes = int(LINK_CODE_TTL // 60)
        await ctx.reply("link.code", ephemeral=True, code=new, minutes=minutes)
        return
    try:
        result = await store.link(code, ctx.user.identity_id, today(ctx.services.settings))
    except LinkRefused as refused:
        log.info("%s: /link refused (%s)", inv.platform, refused.reason)
        await ctx.reply(f"link.refused.{refused.reason}", ephemeral=True)
        return
    log.info("%s: linked into account #%d", inv.platform, result.account_id)
    lines = [ctx.t("link.done", identities=_identities(result.identities))]
    if result.moved:
        lines.append(ctx.t("link.moved", credits=result.moved))
    if result.key in ("kept_newer", "took_newer"):
        key = await store.get_api_key(result.account_id)
        lines.append(ctx.t("link.key_kept", masked=mask_key(key) if key else "?"))
    await ctx.chat.send_text("\n".join(lines), ephemeral=True)


async def unlink(ctx: Context) -> None:
    """Detach this identity from its account; the credits stay with the account."""
    try:
        detached = await ctx.services.store.unlink(
            ctx.user.identity_id, today(ctx.services.settings)
        )
    except LinkRefused as refused:
        await ctx.reply(f"link.refused.{refused.reason}", ephemeral=True)
        return
    await ctx.reply("unlink.done" if detached else "unlink.not_linked", ephemeral=True)


def _identities(identities: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{platform}:{uid}" for platform, uid in identities)
