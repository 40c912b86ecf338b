"""Every error a user can meet, in one hierarchy.

Each class carries `kind` (stored on the job row), `key` (the i18n message key, rendered
with the error's `params`), `retryable` (whether trying again later can help) and `refund`
(whether credits reserved for the job go back). Messages for logs use `str(error)`, which
never contains an API key.
"""

from __future__ import annotations

from typing import Any, ClassVar


class DrawbridgeError(Exception):
    """Base of all user-facing errors."""

    kind: ClassVar[str] = "internal"
    key: ClassVar[str] = "error.internal"
    retryable: ClassVar[bool] = False
    refund: ClassVar[bool] = True

    def __init__(self, detail: str = "", **params: Any) -> None:
        super().__init__(detail or self.kind)
        self.detail = detail
        self.params: dict[str, Any] = params


# --- input the user gave (checked before anything is charged) ---


class InputError(DrawbridgeError):
    """The request itself is wrong; nothing was sent upstream."""

    kind = "bad_input"
    key = "error.bad_input"


class BadOptionError(InputError):
    """An option with a value it cannot take (`--n 50`, `--quality ultra`)."""

    kind = "bad_option"
    key = "error.bad_option"


class UnknownOptionError(BadOptionError):
    """An option that does not exist (`--style`)."""

    kind = "unknown_option"
    key = "error.unknown_option"


class InvalidSizeError(InputError):
    """A size the model does not accept; `params` carry `size` and `suggestion`."""

    kind = "invalid_size"
    key = "error.invalid_size"


class SizeRatioError(InvalidSizeError):
    """A ratio beyond what the model draws (`99:1`); `suggestion` is the nearest valid ratio.

    `limit` says the widest ratio allowed (`3:1`).
    """

    key = "error.size_ratio"


class SizeTierError(InvalidSizeError):
    """A tier that does not exist (`8k`); `tier` is what was typed, `suggestion` the nearest."""

    key = "error.size_tier"


class SizeFormatError(InvalidSizeError):
    """Text that is no size at all (`abc`): the message lists the forms a size takes."""

    key = "error.size_format"


class EmptyPromptError(InputError):
    """A draw or edit with nothing to draw."""

    kind = "empty_prompt"
    key = "error.empty_prompt"


class PromptTooLongError(InputError):
    """A prompt over `DRAWBRIDGE_MAX_PROMPT_CHARS`."""

    kind = "prompt_too_long"
    key = "error.prompt_too_long"


class NoReferenceImageError(InputError):
    """An /edit with no image in the message or the one it replies to."""

    kind = "no_reference"
    key = "error.no_reference"


class TooManyReferencesError(InputError):
    """More reference images than the provider accepts."""

    kind = "too_many_references"
    key = "error.too_many_references"


class ImageError(InputError):
    """A reference image could not be used."""

    kind = "bad_image"
    key = "error.bad_image"


class UnsupportedImageError(ImageError):
    """A file that is not an allowed image format."""

    kind = "unsupported_image"
    key = "error.unsupported_image"


class SvgImageError(UnsupportedImageError):
    """An SVG: a drawing to render, which we do not do, not a picture to decode."""

    kind = "svg_image"
    key = "error.svg_image"


class ImageTooLargeError(ImageError):
    """Too many bytes or too many pixels (a decompression bomb)."""

    kind = "image_too_large"
    key = "error.image_too_large"


class TooManyPixelsError(ImageTooLargeError):
    """More pixels than we decode (a decompression bomb, or simply enormous)."""

    kind = "image_too_many_pixels"
    key = "error.image_too_many_pixels"


class JobTooManyPixelsError(ImageTooLargeError):
    """The references of one job declare more pixels together than one job may decode.

    Refused from the headers alone (`DRAWBRIDGE_MAX_JOB_PIXELS`); params `count`,
    `megapixels`, `limit_mp`.
    """

    kind = "job_too_many_pixels"
    key = "error.job_too_many_pixels"


class ImageFetchError(ImageError):
    """A reference image could not be downloaded (expired, unreachable, too slow)."""

    kind = "image_fetch_failed"
    key = "error.image_fetch_failed"
    retryable = True


class ForbiddenURLError(ImageError):
    """An image URL on a host or address that is not allowed (SSRF guard)."""

    kind = "forbidden_url"
    key = "error.forbidden_url"


# --- access, credits and limits ---


class AccessError(DrawbridgeError):
    """The caller may not do this."""

    kind = "access_denied"
    key = "error.access_denied"


class JobNotFoundError(AccessError):
    """No such job, or not one this chat may see."""

    kind = "job_not_found"
    key = "result.not_found"


class BannedError(AccessError):
    """The caller is banned."""

    kind = "banned"
    key = "error.banned"


class NotAdminError(AccessError):
    """An admin command from someone who is not an admin."""

    kind = "not_admin"
    key = "error.not_admin"


class InsufficientCreditsError(DrawbridgeError):
    """Not enough daily or granted credits for the job."""

    kind = "insufficient_credits"
    key = "error.insufficient_credits"


class GroupCapReachedError(DrawbridgeError):
    """The group has spent its daily cap."""

    kind = "group_cap"
    key = "error.group_cap"


class BusyError(DrawbridgeError):
    """The queue is full."""

    kind = "busy"
    key = "error.busy"
    retryable = True


class TooManyJobsError(DrawbridgeError):
    """The user already has as many jobs as allowed queued or running."""

    kind = "too_many_jobs"
    key = "error.too_many_jobs"
    retryable = True


class NotConfiguredError(DrawbridgeError):
    """No shared key and no own key: nobody to pay the upstream."""

    kind = "not_configured"
    key = "error.not_configured"


class KeyUnreadableError(DrawbridgeError):
    """A bound key that can no longer be decrypted (DRAWBRIDGE_SECRET_KEY changed)."""

    kind = "key_unreadable"
    key = "error.key_unreadable"


class ShuttingDownError(DrawbridgeError):
    """The bot is stopping and takes no new jobs."""

    kind = "shutdown"
    key = "error.shutdown"
    retryable = True


class CancelledJobError(DrawbridgeError):
    """The user cancelled the job while it waited."""

    kind = "cancelled"
    key = "error.cancelled"


class DeliveryError(DrawbridgeError):
    """The image was made but could not be sent to the chat."""

    kind = "delivery_failed"
    key = "error.delivery_failed"
    retryable = True


# --- the upstream answered with a failure (or did not answer) ---


class UpstreamError(DrawbridgeError):
    """Base of failures reported by, or on the way to, the image API."""

    kind = "upstream_error"
    key = "error.upstream"
    # Whether another configured provider may succeed where this one failed.
    try_next_provider: ClassVar[bool] = False

    def __init__(
        self,
        detail: str = "",
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        unbilled: bool = False,
        **params: Any,
    ) -> None:
        super().__init__(detail, **params)
        self.status = status
        self.code = code
        self.retry_after = retry_after
        # The answer proves the request never ran upstream (a relay's refusal before
        # forwarding, a gateway with nothing behind it), so nothing was billed and another
        # provider may run the same job. False whenever there is doubt (docs/billing.md).
        self.unbilled = unbilled


class InvalidKeyError(UpstreamError):
    """The key was refused (invalid, expired or its quota used up)."""

    kind = "invalid_key"
    key = "error.invalid_key"
    # Each provider has its own key: another one may still be valid.
    try_next_provider = True


class UpstreamQuotaError(UpstreamError):
    """The reseller account behind the key has no balance left."""

    kind = "upstream_quota"
    key = "error.upstream_quota"
    try_next_provider = True


class NoChannelError(UpstreamError):
    """The key's group has no channel serving this model."""

    kind = "no_channel"
    key = "error.no_channel"
    retryable = True
    try_next_provider = True


class UnknownModelError(NoChannelError):
    """The relay serves no model of the configured name (litellm's "Invalid model name")."""

    kind = "unknown_model"
    key = "error.unknown_model"
    retryable = False


class GroupDeniedError(UpstreamError):
    """The key may not use its reseller group."""

    kind = "group_denied"
    key = "error.group_denied"
    try_next_provider = True


class ModerationError(UpstreamError):
    """The content policy refused the prompt or an image."""

    kind = "moderation"
    key = "error.moderation"


class UpstreamSizeError(UpstreamError):
    """The provider refused the size."""

    kind = "upstream_invalid_size"
    key = "error.upstream_invalid_size"


class UnknownParameterError(UpstreamError):
    """The provider does not accept a parameter we sent."""

    kind = "unknown_parameter"
    key = "error.unknown_parameter"
    try_next_provider = True


class RateLimitedError(UpstreamError):
    """The provider rate-limited us (429)."""

    kind = "rate_limited"
    key = "error.rate_limited"
    retryable = True
    try_next_provider = True


class RequestTooLargeError(UpstreamError):
    """The request body was too large for the provider (413)."""

    kind = "request_too_large"
    key = "error.request_too_large"


class UpstreamUnavailableError(UpstreamError):
    """5xx, an overloaded or banned upstream account, or no connection at all."""

    kind = "upstream_unavailable"
    key = "error.upstream_unavailable"
    retryable = True
    try_next_provider = True


class NotSupportedError(UpstreamError):
    """The relay does not implement this endpoint; as raised, for a generation (/draw).

    The upstream package raises `EditNotSupportedError` instead when the request was an
    edit (`for_edit`), so the user reads which of the two the provider lacks.
    """

    kind = "not_supported"
    key = "error.not_supported"
    try_next_provider = True

    def for_edit(self) -> EditNotSupportedError:
        """The same refusal, told about an edit."""
        if isinstance(self, EditNotSupportedError):
            return self
        edit = EditNotSupportedError(
            self.detail,
            status=self.status,
            code=self.code,
            retry_after=self.retry_after,
            unbilled=self.unbilled,
            **self.params,
        )
        edit.__cause__ = self
        return edit


class EditNotSupportedError(NotSupportedError):
    """The relay does not implement image edits (one-api without edits)."""

    key = "error.not_supported_edit"


class RelayStreamError(UpstreamError):
    """The relay broke on a streamed answer (one-api, litellm): it cannot stream images.

    The upstream behind it already made (and billed) the image, so this is never passed to
    another provider; a provider that learns streaming asks once more without it.
    """

    kind = "relay_cannot_stream"
    key = "error.relay_cannot_stream"


class RelayFailedError(UpstreamError):
    """The relay failed after forwarding (an unreadable upstream body, a cut connection).

    The upstream may have run and billed: neither retried nor passed to another provider.
    """

    kind = "relay_failed"
    key = "error.relay_failed"


class UpstreamTimeoutError(UpstreamError):
    """No answer in time. The request may still run (and be billed): never retried."""

    kind = "timeout"
    key = "error.timeout"
    retryable = True


class MalformedResponseError(UpstreamError):
    """An answer we cannot use: not JSON, no image, bad base64, a stream cut short."""

    kind = "malformed_response"
    key = "error.malformed_response"
    retryable = True


class ResultDownloadError(UpstreamError):
    """The result `url` could not be downloaded (expired, too large, too slow)."""

    kind = "result_download_failed"
    key = "error.result_download_failed"
    retryable = True


ALL_ERRORS: tuple[type[DrawbridgeError], ...] = tuple(
    cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, DrawbridgeError)
)
"""Every error class, so tests can check each has a message in every language."""
