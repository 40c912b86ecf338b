"""/group (/群设置): a group's own rules, set by its admins; and what dispatch asks of them.

`/group` alone shows the rules to anyone in the group; `/group on|off`, `size`, `quality`,
`cap` and `cooldown` change them, for the group's own admins (as the adapter reports them in
`Invocation.group_admin`) and the bot's admins.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from bot import errors
from bot.groups import MAX_COOLDOWN, GroupRules
from bot.jobs import today
from bot.sizes import parse_size
from plugins.context import Context
from plugins.registry import GROUP_SETTINGS, QUALITY_CHOICES

log = logging.getLogger(__name__)

IMAGE_COMMANDS = frozenset({"draw", "edit", "reroll"})
"""Commands that start a job: the ones a group's cooldown and cap apply to."""
_CLEAR_WORDS = frozenset({"off", "none", "default", "clear", "关", "关闭", "默认", "无"})


async def admits(ctx: Context) -> bool:
    """Whether the command may go on in this group; False once the caller has been told why
    (a cooldown) or when the bot is off here (silence, except /group itself).

    Raises `GroupCapReachedError` for a job when the group has spent its cap already, so
    an /edit downloads nothing (the reservation checks the exact price later).
    """
    key = ctx.inv.group_id
    rules = await ctx.group_rules()
    if key is None or rules is None:
        return True
    if not rules.enabled and ctx.inv.command != "group":
        log.debug("%s /%s: the bot is off in %s", ctx.inv.platform, ctx.inv.command, key)
        return False
    if ctx.inv.command not in IMAGE_COMMANDS:
        return True
    if rules.cooldown > 0:
        last = await ctx.services.store.last_group_job_at(ctx.user.id, key)
        wait = 0.0 if last is None else last + rules.cooldown - time.time()
        if wait > 0:
            await ctx.reply("group.cooldown", ephemeral=True, seconds=int(wait) + 1)
            return False
    settings = ctx.services.settings
    cap = rules.effective_cap(settings.group_daily_cap)
    # A user's own key costs the group nothing (the runner reserves it outside the group).
    if cap > 0 and not ctx.user.has_key:
        if await ctx.services.store.group_used(key, today(settings)) >= cap:
            raise errors.GroupCapReachedError(cap=cap)
    return True


async def image_defaults(ctx: Context) -> tuple[str | None, str | None]:
    """The group's default size and quality for /draw and /edit (None: the bot's own)."""
    rules = await ctx.group_rules()
    if rules is None:
        return None, None
    return rules.size, rules.quality


async def group(ctx: Context) -> None:
    """`/group [on|off|size S|quality Q|cap N|cooldown SECONDS]`."""
    inv = ctx.inv
    key = inv.group_id
    if key is None:
        await ctx.reply("group.private_only", ephemeral=True)
        return
    setting, value = _arguments(ctx)
    store = ctx.services.store
    if not setting:
        await _show(ctx, key, await store.group_rules(key))
        return
    if not (inv.group_admin or ctx.user.is_admin):
        await ctx.reply("group.not_admin", ephemeral=True)
        return
    if setting not in GROUP_SETTINGS:
        await ctx.reply("group.usage")
        return
    change = await _change(ctx, setting, value)
    if change is None:
        return
    name, stored = change
    rules = await store.set_group_rule(key, name, stored, by_user_id=ctx.user.id)
    log.info("%s: /group %s set by %s in %s", inv.platform, setting, ctx.user.id, key)
    await _show(ctx, key, rules, header="group.saved")


def _arguments(ctx: Context) -> tuple[str, str]:
    """(setting, value) from slash options or the text ("size 16:9", "on")."""
    options = ctx.inv.options
    setting = str(options.get("setting") or "").strip().lower()
    value = str(options.get("value") or "").strip()
    if not setting:
        words = ctx.inv.text.strip().split(None, 1)
        setting = words[0].lower() if words else ""
        value = words[1].strip() if len(words) > 1 else value
    aliases = {"开": "on", "开启": "on", "关": "off", "关闭": "off", "尺寸": "size"}
    aliases |= {"画质": "quality", "质量": "quality", "上限": "cap", "冷却": "cooldown"}
    return aliases.get(setting, setting), value


async def _change(ctx: Context, setting: str, value: str) -> tuple[str, Any] | None:
    """The column and value to store, or None once the caller was told what is wrong."""
    settings = ctx.services.settings
    word = value.strip().lower()
    if setting in ("on", "off"):
        return "enabled", setting == "on"
    clear = word in _CLEAR_WORDS
    if setting == "size" and word:
        if clear:
            return "size", None
        # Refused here, with the size rules' own message, rather than at every /draw.
        parse_size(value, settings.model, default=settings.default_size)
        return "size", value.strip()
    if setting == "quality" and word:
        if clear:
            return "quality", None
        if word in QUALITY_CHOICES:
            return "quality", word
    number = _whole(word)
    if setting == "cap" and word:
        limit = settings.group_daily_cap
        if clear or number == 0:
            return "cap", None
        if number is not None and number > 0 and (limit <= 0 or number <= limit):
            return "cap", number
        if number is not None and limit > 0 and number > limit:
            # The operator's cap is the ceiling: a group may only be stricter.
            await ctx.reply("group.cap_above", cap=number, limit=limit)
            return None
    if setting == "cooldown" and word:
        if clear:
            return "cooldown", 0
        if number is not None and 0 <= number <= MAX_COOLDOWN:
            return "cooldown", number
    await ctx.reply(f"group.bad_{setting}", value=value or "?", max=MAX_COOLDOWN)
    return None


def _whole(word: str) -> int | None:
    word = word.removesuffix("s").removesuffix("秒").strip()
    try:
        return int(word)
    except ValueError:
        return None


async def _show(ctx: Context, key: str, rules: GroupRules, header: str = "group.header") -> None:
    settings = ctx.services.settings
    global_cap = settings.group_daily_cap
    cap = rules.effective_cap(global_cap)
    used = await ctx.services.store.group_used(key, today(settings))
    none = ctx.t("group.none")
    lines = [
        ctx.t(header),
        ctx.t("group.state_on" if rules.enabled else "group.state_off"),
        ctx.t("group.size", size=rules.size or none, default=settings.default_size),
        ctx.t("group.quality", quality=rules.quality or none),
        ctx.t("group.cap", cap=cap or none, used=used, limit=global_cap or none),
        ctx.t("group.cooldown_line", seconds=rules.cooldown),
    ]
    if ctx.inv.group_admin or ctx.user.is_admin:
        lines.append(ctx.t("group.usage"))
    await ctx.chat.send_text("\n".join(lines))
