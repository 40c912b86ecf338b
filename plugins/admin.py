"""Admin commands: /grant, /ban, /unban, /stats. The dispatcher checks the caller is admin."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from bot.jobs import today
from bot.store import User
from plugins.context import Context

MAX_GRANT = 1_000_000_000


async def _target(ctx: Context, ref: str) -> User | None:
    ref = ref.strip().lstrip("@")
    if not ref:
        return None
    return await ctx.services.store.find_user(ctx.inv.platform, ref)


def _name(user: User) -> str:
    label = f"{user.platform}:{user.platform_user_id}"
    return f"{user.name} ({label})" if user.name else label


async def grant(ctx: Context) -> None:
    """`/grant <user> <credits>`."""
    parts = ctx.inv.text.split()
    ref = str(ctx.inv.options.get("user") or (parts[0] if parts else ""))
    amount_text = str(ctx.inv.options.get("credits") or (parts[1] if len(parts) > 1 else ""))
    try:
        amount = int(amount_text)
    except ValueError:
        amount = MAX_GRANT + 1
    if abs(amount) > MAX_GRANT:
        # Beyond SQLite's integers, and certainly a typo.
        await ctx.reply("admin.usage_grant")
        return
    user = await _target(ctx, ref)
    if user is None:
        await ctx.reply("admin.user_not_found", user=ref or "?")
        return
    balance = await ctx.services.store.grant(user.id, amount, by_user_id=ctx.user.id)
    await ctx.reply("admin.granted", user=_name(user), credits=amount, balance=balance)


async def ban(ctx: Context) -> None:
    """`/ban <user>`."""
    await _set_role(ctx, "banned", "admin.banned")


async def unban(ctx: Context) -> None:
    """`/unban <user>`."""
    await _set_role(ctx, "user", "admin.unbanned")


async def _set_role(ctx: Context, role: str, key: str) -> None:
    ref = str(ctx.inv.options.get("user") or ctx.inv.text.strip())
    user = await _target(ctx, ref)
    if user is None:
        await ctx.reply("admin.user_not_found", user=ref or "?")
        return
    # The identity named, not its whole /link account: roles stay per identity.
    await ctx.services.store.set_role(user.identity_id, role)
    await ctx.reply(key, user=_name(user))


async def stats(ctx: Context) -> None:
    """Usage today."""
    settings = ctx.services.settings
    data = await ctx.services.store.stats(today(settings), tz=ZoneInfo(settings.timezone))
    await ctx.reply(
        "admin.stats",
        jobs=data.get("jobs_today", 0),
        succeeded=data.get("succeeded_today", 0),
        failed=data.get("failed_today", 0),
        images=data.get("images_today", 0),
        credits=data.get("credits_today", 0),
        running=ctx.services.jobs.active_total(),
        users=data.get("users", 0),
    )
