"""What a draw or edit request must satisfy by its text alone, checked before anything is spent.

One set of checks for every way in: the chat options parser (`plugins/options.py`), the job
runner (`bot/jobs.py`) and the terminal (`bot/terminal.py`) call these, so `/draw` and
`drawbridge draw` refuse the same requests with the same messages. Sizes are checked by
`bot.sizes.parse_size`, the one size parser.
"""

from __future__ import annotations

from bot import errors


def check_prompt(prompt: str, max_chars: int) -> None:
    """Refuse an empty prompt, or one longer than `max_chars` characters (spaces trimmed)."""
    text = prompt.strip()
    if not text:
        raise errors.EmptyPromptError()
    if len(text) > max_chars:
        raise errors.PromptTooLongError(f"{len(text)} chars", length=len(text), limit=max_chars)


def check_n(n: int, max_n: int) -> None:
    """Refuse an image count outside 1..`max_n`; the message shows the allowed range."""
    if not 1 <= n <= max_n:
        raise errors.BadOptionError(f"n={n}", option="n", value=f"{n} (1-{max_n})")


def check_references(count: int, limit: int | None = None) -> None:
    """Refuse an edit with no reference image, or with more than `limit` (None: no limit here;
    the provider chain refuses what no provider takes)."""
    if count == 0:
        raise errors.NoReferenceImageError()
    if limit is not None and count > limit:
        raise errors.TooManyReferencesError(count=count, limit=limit)


def check_request(
    kind: str,
    prompt: str,
    n: int,
    references: int,
    *,
    max_prompt_chars: int,
    max_n: int,
    max_references: int | None = None,
) -> None:
    """Every check of a `draw` or `edit` (`kind`) with `references` images, in the user's order.

    Raises the `InputError` of the first check that fails; nothing has been downloaded,
    charged or sent upstream when it does.
    """
    check_prompt(prompt, max_prompt_chars)
    check_n(n, max_n)
    if kind == "edit":
        check_references(references, max_references)
