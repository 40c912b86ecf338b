"""The wire to an OpenAI-compatible image API (gpt-image-2 behind new-api / one-api relays).

A package: `client` (one provider's calls), and the names below re-exported so callers keep
writing `from bot.upstream import ...`.
"""

from bot.upstream.client import (
    DROPPABLE_FIELDS,
    USER_AGENT,
    GeneratedImage,
    ImageRequest,
    ImageResult,
    Progress,
    ProgressHandler,
    ProviderChain,
    UpstreamClient,
    build_clients,
    classify_error,
)

__all__ = [
    "DROPPABLE_FIELDS",
    "USER_AGENT",
    "GeneratedImage",
    "ImageRequest",
    "ImageResult",
    "Progress",
    "ProgressHandler",
    "ProviderChain",
    "UpstreamClient",
    "build_clients",
    "classify_error",
]
