"""`drawbridge run`'s supervision: signals stop it cleanly, a platform dying stops it loudly."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from bot import jobs as jobs_module
from bot.chat import MessageRef, OutFile, ResultMeta
from bot.config import Settings
from bot.jobs import today
from bot.mock_upstream import MockUpstream
from bot.runner import _serve_until_stopped, announce_recovered
from bot.services import Services
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat, invocation


class FakePlatform:
    """A platform whose connection ends after `lifetime` seconds (None: never)."""

    def __init__(self, name: str, lifetime: float | None) -> None:
        self.name = name
        self.lifetime = lifetime
        self.told: list[tuple[str, str]] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def notify(self, chat_id: str, text: str) -> None:
        self.told.append((chat_id, text))

    async def wait_ended(self) -> None:
        if self.lifetime is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(self.lifetime)


async def test_a_signal_stops_with_exit_code_0() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    code = await _serve_until_stopped(stop, [FakePlatform("telegram", None)])
    assert code == 0


async def test_a_platform_that_ends_by_itself_stops_with_exit_code_1(caplog) -> None:  # type: ignore[no-untyped-def]
    healthy, dying = FakePlatform("telegram", None), FakePlatform("discord", 0.05)
    code = await asyncio.wait_for(_serve_until_stopped(asyncio.Event(), [healthy, dying]), 5)
    assert code == 1
    assert "discord stopped by itself" in caplog.text


async def test_chats_of_jobs_a_crash_interrupted_are_told_after_restart(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    settings = settings_factory(default_lang="en")
    services = await Services.create(settings)
    store = services.store
    user = await store.user("test", "u1")
    await store.set_lang(user.id, "zh")
    job = await store.create_job(
        user_id=user.id,
        platform="test",
        chat_id="c9",
        group_key=None,
        kind="draw",
        prompt="a fox in the snow",
        options={},
        ref_count=0,
        own_key=False,
    )
    await store.reserve(job, user_id=user.id, cost=1, day=today(settings), daily_allowance=5)
    await store.mark_running(job, "default")
    await services.close(grace=0)  # as if the process died here: the job stays "running"

    services = await Services.create(settings)
    try:
        assert services.recovered == [job]
        platform = FakePlatform("test", None)
        assert (
            await announce_recovered(
                services, [platform, FakePlatform("other", None)], services.recovered
            )
            == 1
        )
        [(chat_id, text)] = platform.told
        assert chat_id == "c9" and "a fox in the snow" in text and "额度已退还" in text
    finally:
        await services.close()


# --- the job runner: slots, delivery and kept files ---


class BlockedChat(RecordingChat):
    """A chat whose result upload waits until released (a platform's flood wait)."""

    def __init__(self) -> None:
        super().__init__()
        self.uploading = asyncio.Event()
        self.release = asyncio.Event()

    async def send_results(self, files: Sequence[OutFile], meta: ResultMeta) -> None:
        self.uploading.set()
        await self.release.wait()
        await super().send_results(files, meta)


class SignallingChat(RecordingChat):
    """A chat that says when its results arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered = asyncio.Event()

    async def send_results(self, files: Sequence[OutFile], meta: ResultMeta) -> None:
        await super().send_results(files, meta)
        self.delivered.set()


async def test_a_slow_delivery_does_not_hold_the_providers_slot(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory(concurrency=1))
    try:
        stuck = BlockedChat()
        await dispatch(invocation("draw", "a fox", chat_id="busy-group"), stuck, services)
        await asyncio.wait_for(stuck.uploading.wait(), 10)

        # Another user in another chat: the upstream's only slot is free although A's
        # upload is still blocked.
        bystander = SignallingChat()
        await dispatch(
            invocation("draw", "a cat", user_id="u2", chat_id="private"), bystander, services
        )
        await asyncio.wait_for(bystander.delivered.wait(), 10)
        assert len(mock_upstream.requests) == 2
        assert not stuck.results()

        stuck.release.set()
        await services.jobs.wait_idle()
        assert stuck.results() and bystander.results()
        for user_id in ("u1", "u2"):
            user = await services.store.user("test", user_id)
            credits = await services.store.credits(user.id, today(services.settings), 5)
            assert credits.total_left == 4
    finally:
        await services.close()


def old_job_folder(services: Services, job_id: int) -> Path:
    folder = services.jobs.job_dir(job_id)
    folder.mkdir(parents=True)
    (folder / "out1.png").write_bytes(b"png")
    long_ago = time.time() - (services.settings.keep_hours + 1) * 3600
    os.utime(folder, (long_ago, long_ago))
    return folder


async def test_kept_files_are_pruned_on_a_timer_while_running(
    settings_factory: Callable[..., Settings],
    mock_upstream: MockUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jobs_module, "PRUNE_EVERY", 0.05)
    services = await Services.create(settings_factory())
    try:
        fresh = services.jobs.job_dir(500)
        fresh.mkdir(parents=True)
        # Made after the start: only a pruning while running removes them.
        for job_id in (501, 502):
            folder = old_job_folder(services, job_id)
            async with asyncio.timeout(10):
                # A folder on disk has no event to wait on.
                while folder.exists():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        assert fresh.is_dir()
    finally:
        await services.close()
    # Shutdown stopped the timer: nothing named "prune" is left running.
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "prune"]


class PreviewNeverFinishesChat(SignallingChat):
    """A chat whose preview upload hangs (a platform sleeping through a rate limit)."""

    previewing = False

    async def send_preview(self, ref: MessageRef | None, image: bytes) -> MessageRef | None:
        self.previewing = True
        await asyncio.Event().wait()
        return ref


async def test_a_hanging_preview_upload_neither_stalls_the_stream_nor_the_result(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    # The preview used to be awaited inside the upstream stream: a hung upload stopped the
    # image from being read, held the provider's slot, and the job ended in a timeout.
    services = await Services.create(settings_factory(timeout=20))
    try:
        chat = PreviewNeverFinishesChat()
        await dispatch(invocation("draw", "a fox"), chat, services)
        await asyncio.wait_for(chat.delivered.wait(), 10)
        await asyncio.wait_for(services.jobs.wait_idle(), 10)
        assert chat.results() and chat.previewing
        job = await services.store.job(1)
        assert job is not None and job.status == "succeeded"
        # No preview task outlives its job.
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "preview"]
    finally:
        await services.close()
