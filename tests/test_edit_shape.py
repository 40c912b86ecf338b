"""An /edit without --size keeps its first image's shape, as `drawbridge edit` does.

The size is the first reference's aspect ratio at the default size's tier (so the price is the
default size's), and a reroll of that edit keeps the shape again rather than turning square.
"""

from __future__ import annotations

import io

from PIL import Image

from bot.chat import BytesImage
from bot.mock_upstream import MockUpstream
from bot.services import Services
from tests.recording_chat import invocation, run_command


def photo(width: int, height: int) -> BytesImage:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "teal").save(buffer, "PNG")
    return BytesImage(buffer.getvalue(), "photo.png")


async def test_edit_without_size_keeps_the_first_images_shape_and_its_reroll_too(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run_command(
        services, invocation("edit", "make it dusk", references=(photo(1600, 900),))
    )
    assert chat.results()
    assert mock_upstream.requests[-1].fields["size"] == "1536x864"  # 16:9 at the 1k tier
    job = await services.store.job(1)
    assert job is not None and job.options["size"] is None

    again = await run_command(services, invocation("reroll", reply_to_job=1))
    assert again.results()
    assert mock_upstream.requests[-1].fields["size"] == "1536x864"


async def test_edit_with_a_size_draws_that_size(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run_command(
        services,
        invocation("edit", "make it dusk --size 1:1", references=(photo(1600, 900),)),
    )
    assert chat.results()
    assert mock_upstream.requests[-1].fields["size"] == "1024x1024"
