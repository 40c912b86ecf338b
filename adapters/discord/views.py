"""Buttons under a result and the one-field modals that ask for a prompt or a key.

Result buttons are `DynamicItem`s with the job in their custom id (`db:reroll:42`), so they
keep working after a restart: discord.py matches the id against the template and rebuilds
the item from it, whatever message it sits on.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import discord

BUTTON_KEYS = {"reroll": "button.reroll", "edit": "button.edit", "ref": "button.reference"}
"""Result actions in button order (draw again, edit with a prompt, use as a reference) and
the i18n keys of their labels."""

MODAL_TIMEOUT = 15 * 60.0
"""Seconds a modal waits for its submit (Discord drops interactions after 15 minutes)."""

_STYLES = {
    "reroll": discord.ButtonStyle.primary,
    "edit": discord.ButtonStyle.secondary,
    "confirm": discord.ButtonStyle.success,
}


class ActionHandler(Protocol):
    """What a result button hands its click to (the Discord intake)."""

    async def on_result_action(
        self, interaction: discord.Interaction[Any], action: str, job_id: int
    ) -> None: ...


def custom_id(action: str, job_id: int) -> str:
    """The persistent id of a result button."""
    return f"db:{action}:{job_id}"


class ResultButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"db:(?P<action>reroll|edit|ref|confirm):(?P<job>[0-9]+)",
):
    """One result action on one job (for `confirm`: the request waiting for it, by token)."""

    def __init__(self, action: str, job_id: int, label: str) -> None:
        super().__init__(
            discord.ui.Button(
                label=label[:80] or action,
                style=_STYLES.get(action, discord.ButtonStyle.secondary),
                custom_id=custom_id(action, job_id),
            )
        )
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> ResultButton:
        label = getattr(item, "label", None) or match["action"]
        return cls(match["action"], int(match["job"]), label)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        handler: ActionHandler = interaction.client.intake
        await handler.on_result_action(interaction, self.action, self.job_id)


def result_view(job_id: int, labels: dict[str, str]) -> discord.ui.View:
    """The row of result buttons for one job; `labels` maps action -> translated label."""
    view = discord.ui.View(timeout=None)
    for action in BUTTON_KEYS:
        view.add_item(ResultButton(action, job_id, labels.get(action, action)))
    return view


def confirm_view(token: int, label: str) -> discord.ui.View:
    """The Confirm button of a costly request; a press after a restart is still answered
    (there is then nothing to confirm), as the button is matched by its custom id."""
    view = discord.ui.View(timeout=None)
    view.add_item(ResultButton("confirm", token, label))
    return view


SubmitCallback = Callable[[discord.Interaction[Any], str], Awaitable[None]]


class TextModal(discord.ui.Modal):
    """A modal with one text field; the submitted text goes to `on_text`."""

    def __init__(
        self,
        *,
        title: str,
        label: str,
        on_text: SubmitCallback,
        paragraph: bool = True,
        required: bool = True,
        max_length: int = 4000,
        default: str | None = None,
    ) -> None:
        # Discord caps modal titles and labels at 45 characters.
        super().__init__(title=title[:45], timeout=MODAL_TIMEOUT)
        self.field: discord.ui.TextInput[TextModal] = discord.ui.TextInput(
            style=discord.TextStyle.paragraph if paragraph else discord.TextStyle.short,
            required=required,
            max_length=max(1, min(max_length, 4000)),
            default=default,
        )
        self.add_item(discord.ui.Label(text=label[:45], component=self.field))
        self._on_text = on_text

    async def on_submit(self, interaction: discord.Interaction[Any], /) -> None:
        await self._on_text(interaction, self.field.value or "")
