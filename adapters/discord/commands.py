"""Discord application commands built from the shared declarations in `plugins.registry`.

Each declared command becomes a slash command whose options are the declaration's (the free
text argument becomes a string option, reference images become attachment options `image`,
`image2`, ...). discord.py reads a command's options from its callback's signature, so one
generic callback per command gets a signature made from the declaration. Descriptions are
the English help texts, with zh-CN/zh-TW localizations supplied by a translator at sync time.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Optional

import discord
from discord import app_commands
from discord.app_commands import locale_str

from bot.services import Services
from plugins.registry import COMMANDS, CommandSpec, OptionSpec

EDIT_IMAGE_MENU = "Edit image"
"""The message context menu command ("Apps > Edit image"); its zh name comes from i18n."""
EDIT_IMAGE_MENU_KEY = "menu.edit_image"

SECRET_TEXT_ARGS = frozenset({"key"})
"""Free-text arguments asked for in a modal, never as a slash option (the option would show
in the channel as "/token key: sk-...")."""

_ZH_LOCALES = frozenset({discord.Locale.chinese, discord.Locale.taiwan_chinese})
_NAME_LIMIT = 32
_DESCRIPTION_LIMIT = 100
_NAME_LOCATIONS = frozenset(
    {
        app_commands.TranslationContextLocation.command_name,
        app_commands.TranslationContextLocation.parameter_name,
        app_commands.TranslationContextLocation.group_name,
    }
)

SlashHandler = Callable[[discord.Interaction[Any], CommandSpec, dict[str, Any]], Awaitable[None]]
MenuHandler = Callable[[discord.Interaction[Any], discord.Message], Awaitable[None]]


def image_option_names(spec: CommandSpec) -> tuple[str, ...]:
    """The attachment options of a command: `image`, `image2`, ... up to `max_images`."""
    return tuple("image" if i == 0 else f"image{i + 1}" for i in range(spec.max_images))


def text_option_name(spec: CommandSpec) -> str | None:
    """The option carrying the command's free text (the prompt), when it is its own option."""
    declared = {option.name for option in spec.options}
    if not spec.text_arg or spec.text_arg in declared or spec.text_arg in SECRET_TEXT_ARGS:
        return None
    return spec.text_arg


def asks_in_modal(spec: CommandSpec) -> bool:
    """Whether the command's text is asked for in a modal (a key)."""
    return spec.text_arg in SECRET_TEXT_ARGS


def slash_options(spec: CommandSpec) -> list[OptionSpec]:
    """Every option the slash command has, in declaration order."""
    options: list[OptionSpec] = []
    text = text_option_name(spec)
    if text is not None:
        options.append(OptionSpec(text, "str", f"opt.{text}", required=spec.text_required))
    options.extend(spec.options)
    for index, name in enumerate(image_option_names(spec)):
        # The first image is required: a slash command has no replied-to message to use.
        options.append(OptionSpec(name, "image", "opt.image", required=index == 0))
    return options


def _annotation(option: OptionSpec) -> Any:
    if option.type == "image":
        base: Any = discord.Attachment
    elif option.type == "bool":
        base = bool
    elif option.type == "int":
        low = option.min_value
        high = option.max_value
        base = int if low is None and high is None else app_commands.Range[int, low, high]
    else:
        base = str
    return base if option.required else Optional[base]  # noqa: UP045 (a runtime type for discord.py)


def _text(services: Services, key: str, limit: int = _DESCRIPTION_LIMIT) -> locale_str:
    english = services.t("en", key)
    return locale_str(english[:limit], key=key)


def slash_command(
    spec: CommandSpec, services: Services, handler: SlashHandler
) -> app_commands.Command[Any, ..., None]:
    """The slash command for one declaration; invoking it calls `handler(interaction, spec,
    values)` with the given option values by name (None for options left out)."""
    parameters = [
        inspect.Parameter(
            "interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction
        )
    ]
    descriptions: dict[str, locale_str] = {}
    choices: dict[str, list[app_commands.Choice[str]]] = {}
    for option in slash_options(spec):
        parameters.append(
            inspect.Parameter(
                option.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=_annotation(option),
                default=inspect.Parameter.empty if option.required else None,
            )
        )
        descriptions[option.name] = _text(services, option.help_key)
        if option.choices:
            choices[option.name] = [app_commands.Choice(name=c, value=c) for c in option.choices]

    async def invoke(interaction: discord.Interaction[Any], **values: Any) -> None:
        await handler(interaction, spec, values)

    invoke.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    if descriptions:
        app_commands.describe(**descriptions)(invoke)
    if choices:
        app_commands.choices(**choices)(invoke)
    command: app_commands.Command[Any, ..., None] = app_commands.Command(
        name=spec.name, description=_text(services, spec.help_key), callback=invoke
    )
    if spec.admin:
        # Hidden from members without Administrator until a server admin allows more;
        # the bot still checks DRAWBRIDGE_ADMINS itself.
        command.default_permissions = discord.Permissions(administrator=True)
    return command


def edit_image_menu(handler: MenuHandler) -> app_commands.ContextMenu:
    """The "Edit image" message context menu command."""

    async def edit_image(interaction: discord.Interaction[Any], message: discord.Message) -> None:
        await handler(interaction, message)

    return app_commands.ContextMenu(
        name=locale_str(EDIT_IMAGE_MENU, key=EDIT_IMAGE_MENU_KEY), callback=edit_image
    )


def add_commands(
    tree: app_commands.CommandTree[Any],
    services: Services,
    on_slash: SlashHandler,
    on_menu: MenuHandler,
) -> None:
    """Register every menu command of the declarations, and the context menu, on `tree`."""
    for spec in COMMANDS:
        if spec.in_menu:
            tree.add_command(slash_command(spec, services, on_slash))
    tree.add_command(edit_image_menu(on_menu))


class DeclarationTranslator(app_commands.Translator):
    """Localizes names and descriptions for Chinese Discord clients from the zh catalog."""

    def __init__(self, services: Services) -> None:
        self._services = services

    async def translate(
        self,
        string: locale_str,
        locale: discord.Locale,
        context: app_commands.TranslationContextTypes,
    ) -> str | None:
        key = string.extras.get("key")
        if key is None or locale not in _ZH_LOCALES:
            return None
        text = self._services.t("zh", key)
        if text == key:
            return None
        limit = _NAME_LIMIT if context.location in _NAME_LOCATIONS else _DESCRIPTION_LIMIT
        return text[:limit]


async def sync(tree: app_commands.CommandTree[Any], guild_ids: list[int]) -> int:
    """Publish the commands: to each listed guild (instant), else globally; returns a count."""
    if not guild_ids:
        return len(await tree.sync())
    count = 0
    for guild_id in guild_ids:
        guild = discord.Object(guild_id)
        tree.copy_global_to(guild=guild)
        count += len(await tree.sync(guild=guild))
    return count
