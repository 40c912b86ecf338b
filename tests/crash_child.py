"""A bot process for the crash test: starts one /draw, then waits to be killed."""

from __future__ import annotations

import asyncio
import sys

from bot.chat import Invocation
from bot.config import Settings
from bot.services import Services
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat


async def main() -> None:
    services = await Services.create(Settings())
    chat = RecordingChat()
    inv = Invocation(platform="test", user_id="u1", chat_id="c1", command="draw", text=sys.argv[1])
    await dispatch(inv, chat, services)
    print("SUBMITTED", flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main())
