"""The wire to an OpenAI-compatible image API (gpt-image-2 behind new-api / one-api relays).

- `values`: requests, results, progress events.
- `client`: `UpstreamClient`, one provider's calls, adapting to what its relay can do.
- `readers`: JSON and server-sent event answers, base64 decoded as it streams.
- `classify`: error bodies by relay family, as a table (`ROWS`).
- `capabilities`: what each provider was found able to do, kept in the store.
- `chain`: `ProviderChain`, routing and billing-safe fail-over between providers.

The names below are re-exported so callers write `from bot.upstream import ...`.
"""

from bot.upstream.capabilities import Capabilities, CapabilityStore
from bot.upstream.chain import ProviderChain, build_clients, surely_not_billed
from bot.upstream.classify import classify_error
from bot.upstream.client import DROPPABLE_FIELDS, STREAM_RECHECK_SECONDS, UpstreamClient
from bot.upstream.values import (
    USER_AGENT,
    GeneratedImage,
    ImageRequest,
    ImageResult,
    Progress,
    ProgressHandler,
)

__all__ = [
    "DROPPABLE_FIELDS",
    "STREAM_RECHECK_SECONDS",
    "USER_AGENT",
    "Capabilities",
    "CapabilityStore",
    "GeneratedImage",
    "ImageRequest",
    "ImageResult",
    "Progress",
    "ProgressHandler",
    "ProviderChain",
    "UpstreamClient",
    "build_clients",
    "classify_error",
    "surely_not_billed",
]
