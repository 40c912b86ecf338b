"""`/console` (`/控制台`): an admin asks, in a private chat, for a one-time console login link."""

from __future__ import annotations

from plugins.context import Context


async def console(ctx: Context) -> None:
    """Answer a link to the console valid for 10 minutes and usable once.

    Admins only (the dispatcher checks), and only in a private chat: whoever reads the link
    first is logged in as that admin.
    """
    settings = ctx.services.settings
    if not settings.console_password:
        await ctx.reply("console.off")
        return
    if not settings.console_url:
        await ctx.reply("console.no_url")
        return
    if not ctx.inv.is_private:
        await ctx.reply("console.private_only", ephemeral=True)
        return
    links = ctx.services.console_links
    token = links.issue(f"{ctx.inv.platform}:{ctx.inv.user_id}")
    link = f"{settings.console_url}/login/link?token={token}"
    await ctx.reply("console.link", link=link, minutes=int(links.ttl // 60))
