"""Several providers: route a job to those that can run it, and fail over only when unbilled."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import httpx

from bot.config import ProviderConfig
from bot.errors import (
    EditNotSupportedError,
    NotSupportedError,
    TooManyReferencesError,
    UpstreamError,
    UpstreamUnavailableError,
)
from bot.upstream.capabilities import CapabilityStore
from bot.upstream.client import UpstreamClient, notify
from bot.upstream.values import ImageRequest, ImageResult, Progress, ProgressHandler

log = logging.getLogger(__name__)


def surely_not_billed(error: UpstreamError) -> bool:
    """Whether the failed request provably never ran upstream, so nothing was billed.

    Only answers that prove it count (docs/billing.md): no connection at all, a relay's own
    refusal before forwarding (key, group, channel, quota, an endpoint it lacks), a 429 with
    Retry-After, a 502/503 with an empty body and one-api's 500 rewrap of it. A relay's 5xx
    after forwarding does not: through one-api the upstream had already made and billed it.
    """
    return error.unbilled


class ProviderChain:
    """Tries the configured providers in order.

    Moves to the next provider only when the error class allows it (`try_next_provider`) and
    the request surely was not billed (`surely_not_billed`), never after a timeout or a
    relay's 5xx after forwarding. An edit skips providers taking fewer references than it
    has and providers learned unable to edit.
    """

    def __init__(self, clients: Sequence[UpstreamClient]) -> None:
        self.clients = list(clients)

    async def candidates(self, request_kind: str, refs: int = 0) -> list[UpstreamClient]:
        """The providers that may run a job, in order, given what is learned about them.

        `request_kind` is "edit" for `/edit` (anything else is a generation), `refs` the
        number of reference images. Cheap (no network): the job runner calls it before
        charging. Raises `TooManyReferencesError` when no provider takes that many images and
        `NotSupportedError` when every one that does is known unable to edit.
        """
        if request_kind != "edit":
            return list(self.clients)
        fits = [c for c in self.clients if c.provider.max_references >= refs]
        if not fits:
            limit = max((c.provider.max_references for c in self.clients), default=0)
            raise TooManyReferencesError(count=refs, limit=limit)
        able = [c for c in fits if (await c.learned()).edits is not False]
        if not able:
            names = ", ".join(c.provider.name for c in fits)
            raise EditNotSupportedError(f"no provider can edit images ({names})", unbilled=True)
        return able

    async def run(
        self, request: ImageRequest, on_progress: ProgressHandler | None = None
    ) -> ImageResult:
        """The first provider's result that succeeds; else the most telling error."""
        kind = "edit" if request.is_edit else "draw"
        errors: list[UpstreamError] = []
        clients = await self.candidates(kind, len(request.references))
        for tried, client in enumerate(clients):
            if tried:
                await notify(on_progress, Progress("retry", index=tried, detail="next_provider"))
            try:
                return await client.run(request, on_progress)
            except UpstreamError as caught:
                # The classifier cannot know which endpoint refused: say it was the edit.
                error = (
                    caught.for_edit()
                    if kind == "edit" and isinstance(caught, NotSupportedError)
                    else caught
                )
                if not (type(error).try_next_provider and surely_not_billed(error)):
                    if error is caught:
                        raise
                    raise error from caught
                if tried + 1 < len(clients):
                    # Only when there is a next one: after the last, the error itself is told.
                    log.info(
                        "provider %s failed (%s, not billed); trying the next",
                        client.provider.name,
                        error.kind,
                    )
                errors.append(error)
        # Every provider failed: "unavailable" says less than, say, "no channel".
        specific = [e for e in errors if not isinstance(e, UpstreamUnavailableError)]
        raise (specific or errors)[-1]

    async def aclose(self) -> None:
        """Close every client (and the HTTP clients they own)."""
        for client in self.clients:
            await client.aclose()


def build_clients(
    providers: Sequence[ProviderConfig],
    http: httpx.AsyncClient | None = None,
    capabilities: CapabilityStore | None = None,
) -> list[UpstreamClient]:
    """One client per configured provider, sharing `http` and `capabilities` when given."""
    shared = capabilities if capabilities is not None else CapabilityStore()
    return [UpstreamClient(provider, http=http, capabilities=shared) for provider in providers]
