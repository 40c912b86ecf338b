"""Every command declared once: name, aliases, options, help.

Adapters read these declarations to build `/help`, Telegram's command menu, Discord's slash
commands and the QQ matchers, so a command exists the same way everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One typed option of a command (`--size 16:9`, or a Discord slash option)."""

    name: str
    type: str  # "str" | "int" | "bool" | "image"
    help_key: str
    choices: tuple[str, ...] = ()
    required: bool = False
    min_value: int | None = None
    max_value: int | None = None


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """A command as every platform sees it."""

    name: str
    help_key: str
    aliases: tuple[str, ...] = ()
    # The free text after the command: "prompt", "key", "user", "lang", "" (none).
    text_arg: str = ""
    text_required: bool = False
    options: tuple[OptionSpec, ...] = ()
    # Reference images the command takes (Discord attachment options image..image5).
    max_images: int = 0
    admin: bool = False
    # Shown in menus (Telegram setMyCommands, Discord slash list).
    in_menu: bool = True

    @property
    def all_names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


SIZE_CHOICES = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "2k", "4k", "16:9 4k", "auto")
QUALITY_CHOICES = ("low", "medium", "high", "auto")
FORMAT_CHOICES = ("png", "jpeg", "webp")
BACKGROUND_CHOICES = ("transparent", "opaque", "auto")

IMAGE_OPTIONS = (
    OptionSpec("size", "str", "opt.size", choices=SIZE_CHOICES),
    OptionSpec("quality", "str", "opt.quality", choices=QUALITY_CHOICES),
    OptionSpec("n", "int", "opt.n", min_value=1, max_value=10),
    OptionSpec("format", "str", "opt.format", choices=FORMAT_CHOICES),
    OptionSpec("background", "str", "opt.background", choices=BACKGROUND_CHOICES),
    # `--dry-run` / `--预览` in text: the price only, nothing runs.
    OptionSpec("dry_run", "bool", "opt.dry_run"),
)

DRAW = CommandSpec(
    "draw",
    "help.draw",
    aliases=("画", "绘图"),
    text_arg="prompt",
    text_required=True,
    options=IMAGE_OPTIONS,
)
EDIT = CommandSpec(
    "edit",
    "help.edit",
    aliases=("改图", "图生图"),
    text_arg="prompt",
    text_required=True,
    options=IMAGE_OPTIONS,
    max_images=5,
)
REROLL = CommandSpec("reroll", "help.reroll", aliases=("重画",), in_menu=False)
ORIGINAL = CommandSpec("original", "help.original", aliases=("原图",), in_menu=False)
TOKEN = CommandSpec("token", "help.token", aliases=("令牌",), text_arg="key")
QUOTA = CommandSpec("quota", "help.quota", aliases=("额度",))
HELP = CommandSpec("help", "help.help", aliases=("帮助", "start"))
CANCEL = CommandSpec("cancel", "help.cancel", aliases=("取消",))
LANG = CommandSpec(
    "lang",
    "help.lang",
    aliases=("语言",),
    text_arg="lang",
    options=(OptionSpec("lang", "str", "opt.lang", choices=("zh", "en", "auto")),),
)
# The answer is the caller's `platform:id`, what an operator puts in DRAWBRIDGE_ADMINS.
WHOAMI = CommandSpec("whoami", "help.whoami", aliases=("我是谁",))
# Admins, in a private chat: a one-time login link to the operator console.
CONSOLE = CommandSpec("console", "help.console", aliases=("控制台",), admin=True)
# Starts the caller's request that waits for a confirmation (priced over CONFIRM_ABOVE); the
# Telegram and Discord confirm buttons run it too, naming the request in the text.
CONFIRM = CommandSpec("confirm", "help.confirm", aliases=("确认",))
GRANT = CommandSpec(
    "grant",
    "help.grant",
    text_arg="user",
    text_required=True,
    options=(
        OptionSpec("user", "str", "opt.user", required=True),
        OptionSpec("credits", "int", "opt.credits", required=True),
    ),
    admin=True,
)
BAN = CommandSpec(
    "ban",
    "help.ban",
    text_arg="user",
    text_required=True,
    options=(OptionSpec("user", "str", "opt.user", required=True),),
    admin=True,
)
UNBAN = CommandSpec(
    "unban",
    "help.unban",
    text_arg="user",
    text_required=True,
    options=(OptionSpec("user", "str", "opt.user", required=True),),
    admin=True,
)
STATS = CommandSpec("stats", "help.stats", admin=True)
# A group's own rules, for its admins: `/group size 16:9` (Discord: setting + value options).
GROUP_SETTINGS = ("on", "off", "size", "quality", "cap", "cooldown")
GROUP = CommandSpec(
    "group",
    "help.group",
    aliases=("群设置",),
    text_arg="setting",
    options=(
        OptionSpec("setting", "str", "opt.group_setting", choices=GROUP_SETTINGS),
        OptionSpec("value", "str", "opt.group_value"),
    ),
)

# One wallet across platforms: `/link` answers a code (privately), `/link CODE` on another
# platform joins the two identities' accounts; `/unlink` detaches the caller's identity.
LINK = CommandSpec("link", "help.link", aliases=("绑定",), text_arg="code")
UNLINK = CommandSpec("unlink", "help.unlink", aliases=("解绑",))

COMMANDS: tuple[CommandSpec, ...] = (
    DRAW,
    EDIT,
    REROLL,
    ORIGINAL,
    TOKEN,
    QUOTA,
    CONSOLE,
    HELP,
    CANCEL,
    LANG,
    WHOAMI,
    CONFIRM,
    GRANT,
    BAN,
    UNBAN,
    STATS,
    GROUP,
    LINK,
    UNLINK,
)

_BY_NAME = {name.lower(): spec for spec in COMMANDS for name in spec.all_names}
_CJK_NAMES = sorted((n for n in _BY_NAME if not n.isascii()), key=len, reverse=True)


def find_command(word: str) -> CommandSpec | None:
    """The command named by `word` (`/draw`, `draw@mybot`, `画`), or None."""
    word = word.strip().lstrip("/").lstrip("／")
    word = word.split("@", 1)[0]
    return _BY_NAME.get(word.lower())


def split_command(
    text: str, prefixes: tuple[str, ...] = ("/", "／")
) -> tuple[CommandSpec, str] | None:
    """Split `"/draw@bot a red fox"` into (DRAW, "a red fox"); None when not a command."""
    stripped = text.strip()
    if not stripped.startswith(prefixes):
        return None
    match = re.match(r"(\S+)\s*(.*)", stripped, re.S)
    if match is None:
        return None
    head, rest = match.group(1), match.group(2).strip()
    spec = find_command(head)
    if spec is not None:
        return spec, rest
    # "/画一只猫" without a space: the longest Chinese alias that prefixes the word.
    bare = head.lstrip("/").lstrip("／")
    for name in _CJK_NAMES:
        if bare.startswith(name):
            return _BY_NAME[name], (bare[len(name) :] + " " + rest).strip()
    return None
