"""From Discord interactions to Invocations: a handful of short handlers around `dispatch`.

Every handler answers Discord within its 3 seconds first (a deferred "thinking..." response,
or a modal), then hands the rest to a task this intake owns: turn the attachments into lazy
sources (the job runner downloads them once it has admitted the job), build the
`Invocation`, and call `dispatch`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import discord

from bot.chat import Invocation
from bot.errors import NoReferenceImageError, ShuttingDownError
from bot.groups import answers_here
from bot.services import Services
from plugins.dispatch import dispatch
from plugins.registry import CommandSpec

from .attachments import attachment_sources
from .chat import PLATFORM, TOKEN_TTL, InteractionChat
from .commands import asks_in_modal, image_option_names, text_option_name
from .views import TextModal

log = logging.getLogger(__name__)

T = TypeVar("T")

IMAGE_COMMANDS = frozenset({"draw", "edit", "reroll"})
"""Commands answered in public; all others (account, admin, help) only to the caller."""


async def acknowledge(interaction: discord.Interaction[Any], response: Awaitable[T]) -> T | None:
    """Await the first response to an interaction; None when Discord took it but its answer
    could not be read.

    discord.py asks for the callback's resource (`with_response`) and parses it after the
    interaction is already answered; a peer that answers "204 No Content" (or a partial body)
    would otherwise leave the user with "thinking..." for good.
    """
    try:
        return await response
    except discord.HTTPException:
        raise
    except (KeyError, TypeError, ValueError, AttributeError):
        if not interaction.response.is_done():
            raise
        log.debug("discord: interaction %s answered; the reply was unreadable", interaction.id)
        return None


class DiscordIntake:
    """Receives slash commands, the context menu, result buttons and modal submits."""

    def __init__(
        self,
        services: Services,
        *,
        cdn_hosts: Sequence[str],
        token_ttl: float = TOKEN_TTL,
    ) -> None:
        self.services = services
        self.accepting = True
        # An operator behind a reverse proxy or CDN mirror gets attachment URLs on their own
        # host: DRAWBRIDGE_IMAGE_HOSTS are accepted too (still under the same SSRF checks).
        extra = services.settings.image_host_list()
        self._cdn_hosts = tuple(dict.fromkeys([*cdn_hosts, *extra]))
        self._token_ttl = token_ttl
        self._tasks: set[asyncio.Task[None]] = set()

    # --- handlers ----------------------------------------------------------------------

    async def on_slash(
        self, interaction: discord.Interaction[Any], spec: CommandSpec, values: Mapping[str, Any]
    ) -> None:
        """A slash command from the declarations."""
        if not await self._admit(interaction):
            return
        if asks_in_modal(spec):
            await self._ask(interaction, spec.name, secret=True)
            return
        chat = await self._defer(interaction, ephemeral=spec.name not in IMAGE_COMMANDS)
        images = image_option_names(spec)
        text_name = text_option_name(spec)
        attachments = [values[name] for name in images if values.get(name) is not None]
        options = {
            name: value
            for name, value in values.items()
            if value is not None and name not in images and name != text_name
        }
        text = str(values.get(text_name) or "") if text_name else ""
        self._spawn(
            self._invoke(
                interaction, chat, spec.name, text=text, options=options, attachments=attachments
            )
        )

    async def on_edit_image(
        self, interaction: discord.Interaction[Any], message: discord.Message
    ) -> None:
        """The "Edit image" context menu on a message: ask for the prompt, then edit."""
        if not await self._admit(interaction):
            return
        job = await self.services.job_for_message(
            PLATFORM, str(message.channel.id), str(message.id)
        )
        if job is None and not message.attachments:
            lang = await self._lang(interaction)
            await acknowledge(
                interaction,
                interaction.response.send_message(
                    self.services.t(lang, NoReferenceImageError.key), ephemeral=True
                ),
            )
            return
        # On one of our results, the job's kept originals beat the (maybe shrunk) attachments.
        attachments = [] if job is not None else list(message.attachments)
        await self._ask(
            interaction,
            "edit",
            attachments=attachments,
            reply_to_job=job,
            message_id=str(message.id),
        )

    async def on_result_action(
        self, interaction: discord.Interaction[Any], action: str, job_id: int
    ) -> None:
        """A button under a result: reroll at once, or ask for a prompt to edit with."""
        if not await self._admit(interaction):
            return
        message_id = str(interaction.message.id) if interaction.message else None
        if action == "confirm":
            # The Confirm button of a costly request: `job_id` is the request's token.
            chat = await self._defer(interaction, ephemeral=False)
            self._spawn(
                self._invoke(interaction, chat, "confirm", text=str(job_id), message_id=message_id)
            )
            return
        if action == "reroll":
            chat = await self._defer(interaction, ephemeral=False)
            self._spawn(
                self._invoke(
                    interaction, chat, "reroll", reply_to_job=job_id, message_id=message_id
                )
            )
            return
        if action == "edit":
            await self._ask(interaction, "edit", reply_to_job=job_id, message_id=message_id)
            return
        # "Use as reference" starts from the job's own prompt, to be reworded for a new image;
        # "Edit" starts empty, for the change alone.
        job = await self.services.store.job(job_id)
        here = (PLATFORM, str(interaction.channel_id))
        prompt = job.prompt if job is not None and (job.platform, job.chat_id) == here else None
        await self._ask(
            interaction,
            "edit",
            title_key="modal.reference_title",
            default=prompt,
            reply_to_job=job_id,
            message_id=message_id,
        )

    # --- steps -------------------------------------------------------------------------

    async def _admit(self, interaction: discord.Interaction[Any]) -> bool:
        settings = self.services.settings
        guild = None if interaction.guild_id is None else str(interaction.guild_id)
        if not answers_here(
            settings.group_allow_list(), settings.private, PLATFORM, guild, guild is None
        ):
            # DRAWBRIDGE_GROUPS / DRAWBRIDGE_PRIVATE: silent, not even "thinking...".
            return False
        if self.accepting:
            return True
        lang = await self._lang(interaction)
        await acknowledge(
            interaction,
            interaction.response.send_message(
                self.services.t(lang, ShuttingDownError.key), ephemeral=True
            ),
        )
        return False

    async def _lang(self, interaction: discord.Interaction[Any]) -> str:
        return await self.services.user_lang(
            PLATFORM, str(interaction.user.id), str(interaction.locale)
        )

    async def _defer(
        self, interaction: discord.Interaction[Any], *, ephemeral: bool
    ) -> InteractionChat:
        """Say "thinking..." now, within Discord's 3 seconds; answer through the chat later."""
        response = await acknowledge(
            interaction, interaction.response.defer(thinking=True, ephemeral=ephemeral)
        )
        # Unknown when the peer did not name the message: the chat learns it on its first edit.
        original_id = response.message_id if response is not None else None
        return InteractionChat(
            interaction,
            self.services,
            lang=await self._lang(interaction),
            ephemeral=ephemeral,
            original_id=original_id,
            token_ttl=self._token_ttl,
        )

    async def _ask(
        self,
        interaction: discord.Interaction[Any],
        command: str,
        *,
        secret: bool = False,
        title_key: str = "modal.edit_title",
        default: str | None = None,
        attachments: Sequence[discord.Attachment] = (),
        reply_to_job: int | None = None,
        message_id: str | None = None,
    ) -> None:
        """Open a one-field modal; its text becomes the command's text."""
        lang = await self._lang(interaction)
        t = self.services.t

        async def submitted(submit: discord.Interaction[Any], text: str) -> None:
            if not await self._admit(submit):
                return
            chat = await self._defer(submit, ephemeral=secret)
            self._spawn(
                self._invoke(
                    submit,
                    chat,
                    command,
                    text=text.strip(),
                    attachments=attachments,
                    reply_to_job=reply_to_job,
                    message_id=message_id,
                    # A key typed into a modal was seen by nobody else: bind it as in private.
                    private=True if secret else None,
                )
            )

        if secret:
            modal = TextModal(
                title=t(lang, "modal.token_title"),
                label=t(lang, "modal.token_label"),
                on_text=submitted,
                paragraph=False,
                required=False,
                max_length=200,
            )
        else:
            modal = TextModal(
                title=t(lang, title_key),
                label=t(lang, "modal.prompt_label"),
                on_text=submitted,
                max_length=self.services.settings.max_prompt_chars,
                default=default,
            )
        await acknowledge(interaction, interaction.response.send_modal(modal))

    async def _invoke(
        self,
        interaction: discord.Interaction[Any],
        chat: InteractionChat,
        command: str,
        *,
        text: str = "",
        options: Mapping[str, Any] | None = None,
        attachments: Sequence[discord.Attachment] = (),
        reply_to_job: int | None = None,
        message_id: str | None = None,
        private: bool | None = None,
    ) -> None:
        try:
            # Nothing is downloaded here: a banned or over-limit user costs no download.
            references = attachment_sources(
                attachments,
                max_bytes=self.services.settings.max_input_bytes,
                # No shared client: that one may go through DRAWBRIDGE_UPSTREAM_PROXY or
                # HTTPS_PROXY, and a download must reach the very address that was checked.
                hosts=self._cdn_hosts,
            )
            user = interaction.user
            inv = Invocation(
                platform=PLATFORM,
                user_id=str(user.id),
                chat_id=str(interaction.channel_id),
                command=command,
                text=text,
                is_private=interaction.guild_id is None if private is None else private,
                user_name=user.display_name,
                options=dict(options or {}),
                references=references,
                locale=str(interaction.locale),
                message_id=message_id,
                reply_to_job=reply_to_job,
                # DRAWBRIDGE_GROUPS names a server; its Manage Server members set its rules.
                space_id=None if interaction.guild_id is None else str(interaction.guild_id),
                group_admin=bool(getattr(interaction.permissions, "manage_guild", False)),
                # Answered ephemerally (deferred so above): a /link code may be shown here.
                private_answer=command not in IMAGE_COMMANDS,
            )
            await dispatch(inv, chat, self.services)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("discord: /%s failed", command)
            lang = await self._lang(interaction)
            await chat.send_text(self.services.t(lang, "error.internal"))

    # --- tasks -------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Refuse new interactions and cancel the ones being handed over."""
        self.accepting = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until every handed-over interaction has reached `dispatch`'s end (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
