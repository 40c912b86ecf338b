"""Refusals that cost no download: a job is checked before any reference image is fetched.

The image sources here are test doubles of the platform side (an attachment whose `fetch()`
downloads); they count and gate fetches. Everything of ours runs for real.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable

import pytest
from PIL import Image

from bot import errors
from bot.chat import ChatLimits, OutFile, ResultMeta
from bot.config import Settings
from bot.jobs import JobSpec
from bot.services import Services
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat, invocation, run_command

MB = 1024 * 1024


def png(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "PNG")
    return buf.getvalue()


class CountingSource:
    """An attachment that counts its downloads and, with a gate, holds them open."""

    def __init__(self, counter: FetchCounter, label: str) -> None:
        self.counter = counter
        self.label = label

    @property
    def name(self) -> str:
        return self.label

    async def fetch(self, max_bytes: int) -> bytes:
        self.counter.calls += 1
        self.counter.limits.append(max_bytes)
        self.counter.in_flight += 1
        self.counter.peak = max(self.counter.peak, self.counter.in_flight)
        if self.counter.in_flight >= 2:
            self.counter.two_in_flight.set()
        try:
            await self.counter.gate.wait()
        finally:
            self.counter.in_flight -= 1
        return png()


class FetchCounter:
    def __init__(self, *, open_gate: bool = True) -> None:
        self.calls = 0
        self.in_flight = 0
        self.peak = 0
        self.limits: list[int] = []
        self.gate = asyncio.Event()
        self.two_in_flight = asyncio.Event()
        if open_gate:
            self.gate.set()

    def sources(self, count: int) -> tuple[CountingSource, ...]:
        return tuple(CountingSource(self, f"ref{i}.png") for i in range(count))


class HeldChat(RecordingChat):
    """A chat whose result upload waits until released (keeps its job active)."""

    def __init__(self) -> None:
        super().__init__(ChatLimits(can_preview=False))
        self.uploading = asyncio.Event()
        self.release = asyncio.Event()

    async def send_results(self, files: list[OutFile], meta: ResultMeta) -> None:  # type: ignore[override]
        self.uploading.set()
        await self.release.wait()
        await super().send_results(files, meta)


async def test_a_banned_user_costs_no_download(services: Services) -> None:
    user = await services.store.user("test", "u1")
    await services.store.set_role(user.id, "banned")
    user = await services.store.user("test", "u1")
    counter = FetchCounter()
    inv = invocation("edit", "make it blue", references=counter.sources(16))
    spec = JobSpec(kind="edit", prompt="make it blue", references=inv.references)

    # Straight to the runner (any caller, not only the dispatcher, gets the check) ...
    with pytest.raises(errors.BannedError):
        await services.jobs.submit(inv=inv, user=user, chat=RecordingChat(), spec=spec, lang="en")
    # ... and through the dispatcher.
    chat = await run_command(services, inv)

    assert counter.calls == 0
    assert "banned" in chat.last_text().lower()


async def test_a_user_without_credits_costs_no_download(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(settings_factory(daily_credits=0))
    try:
        counter = FetchCounter()
        chat = await run_command(
            services, invocation("edit", "make it blue", references=counter.sources(16))
        )
        assert counter.calls == 0
        assert "Not enough credits" in chat.last_text()
        job = await services.store.job(1)
        assert job is not None and (job.status, job.error_kind) == (
            "failed",
            "insufficient_credits",
        )
    finally:
        await services.close()


async def test_a_group_over_its_cap_costs_no_download(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(settings_factory(group_daily_cap=1))
    try:
        counter = FetchCounter()
        inv = invocation(
            "edit", "make it blue --n 2", references=counter.sources(4), is_private=False
        )
        chat = await run_command(services, inv)
        assert counter.calls == 0
        assert "group has used" in chat.last_text()
    finally:
        await services.close()


async def test_a_user_at_the_job_limit_costs_no_download(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(settings_factory(user_max_jobs=1))
    try:
        held = HeldChat()
        await dispatch(invocation("draw", "a fox"), held, services)
        await asyncio.wait_for(held.uploading.wait(), 10)

        counter = FetchCounter()
        chat = RecordingChat()
        await dispatch(invocation("edit", "blue", references=counter.sources(16)), chat, services)

        assert counter.calls == 0
        assert "You already have 1 jobs" in chat.last_text()
        held.release.set()
        await services.jobs.wait_idle()
        assert held.results()
    finally:
        await services.close()


async def test_a_users_downloads_in_flight_stay_within_their_byte_budget(
    settings_factory: Callable[..., Settings],
) -> None:
    # Two downloads of up to 20 MB each at a time, whatever the number of references.
    services = await Services.create(
        settings_factory(max_input_bytes=20 * MB, user_download_bytes=40 * MB)
    )
    try:
        counter = FetchCounter(open_gate=False)
        chat = RecordingChat()
        intake = asyncio.create_task(
            dispatch(invocation("edit", "blue", references=counter.sources(6)), chat, services)
        )
        await asyncio.wait_for(counter.two_in_flight.wait(), 10)
        for _ in range(20):  # give any download over the budget every chance to start
            await asyncio.sleep(0)
        assert (counter.in_flight, counter.peak, counter.calls) == (2, 2, 2)

        counter.gate.set()
        await intake
        await services.jobs.wait_idle()
        assert counter.calls == 6 and counter.peak == 2
        assert counter.limits == [20 * MB] * 6
        assert chat.results()
    finally:
        await services.close()


async def test_one_download_is_never_allowed_more_than_the_users_whole_budget(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(
        settings_factory(max_input_bytes=20 * MB, user_download_bytes=5 * MB)
    )
    try:
        counter = FetchCounter()
        chat = await run_command(
            services, invocation("edit", "blue", references=counter.sources(3))
        )
        assert counter.limits == [5 * MB] * 3
        assert chat.results()
    finally:
        await services.close()
