"""A command's intake asks the store only what it needs (issue 15, the burst of 500 commands).

Every store call of an intake is paid 500 times when 500 commands arrive together, so a /draw
reads its group's rules once and its credits not at all: the reservation says what it left,
for the price line, also when one user's commands are charged together.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bot import errors
from bot.config import Settings
from bot.jobs import JobSpec, today
from bot.services import Services
from bot.store import Store
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat, invocation, run_command


def count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """Record, in order, every call of these Store methods."""
    calls: list[str] = []
    for name in names:
        original = getattr(Store, name)

        def counted(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(Store, name, counted)
    return calls


async def test_a_draw_in_a_group_reads_its_rules_once_and_no_credits(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_calls(
        monkeypatch,
        "group_rules_of",
        "credits_of",
        "credits",
        "group_used",
        "create_job",
        "reserve",
        "open_job",
    )
    chat = await run_command(services, invocation("draw", "a fox", chat_id="g1", is_private=False))

    assert chat.results()
    # The reservation says what it left: no credits read at all. And the job is written with
    # its charge, in one step.
    assert calls == ["group_rules_of", "open_job"]
    assert "4 left after this" in chat.everything()


async def test_a_group_command_reads_its_rules_beside_its_user_not_after(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The user read waits until the rules have been asked for: read one after the other,
    # they never would be, and the command fails on the 2 s timeout.
    rules_asked = asyncio.Event()
    read_rules, read_users = Store.group_rules_of, Store.users_found

    async def rules_of(self: Store, keys: Any) -> Any:
        rules_asked.set()
        return await read_rules(self, keys)

    async def users_found(self: Store, keys: Any) -> Any:
        await asyncio.wait_for(rules_asked.wait(), 2)
        return await read_users(self, keys)

    monkeypatch.setattr(Store, "group_rules_of", rules_of)
    monkeypatch.setattr(Store, "users_found", users_found)  # before the batcher binds it
    services = await Services.create(settings_factory())
    try:
        inv = invocation("draw", "a fox", chat_id="g1", is_private=False)
        chat = await run_command(services, inv)
    finally:
        await services.close()
    assert chat.results()


async def test_a_failed_user_read_in_a_group_is_the_error_the_command_gets(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rules read beside it fails first: its error is retrieved, the user read's raised.
    async def users_found(self: Store, keys: Any) -> Any:
        await asyncio.sleep(0.05)
        raise RuntimeError("the users table is gone")

    async def rules_of(self: Store, keys: Any) -> Any:
        raise RuntimeError("the rules table is gone")

    monkeypatch.setattr(Store, "users_found", users_found)  # before the batcher binds it
    monkeypatch.setattr(Store, "group_rules_of", rules_of)
    services = await Services.create(settings_factory())
    try:
        inv = invocation("draw", "a fox", chat_id="g1", is_private=False)
        with pytest.raises(RuntimeError, match="users table"):
            await dispatch(inv, RecordingChat(), services)
    finally:
        await services.close()


async def test_commands_arriving_together_say_what_is_left_after_their_charges(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(settings_factory(user_max_jobs=5))
    try:
        chats = [RecordingChat() for _ in range(3)]
        await asyncio.gather(*(dispatch(invocation("draw", "a fox"), c, services) for c in chats))
        await services.jobs.wait_idle()
    finally:
        await services.close()

    said = [
        int(m.group(1))
        for chat in chats
        if (m := re.search(r"(\d+) left after this", chat.everything())) is not None
    ]
    # 5 credits a day. Each reservation says what it left, in the order they were charged;
    # read before the charge, all three said "4 left" and two were wrong.
    assert sorted(said) == [2, 3, 4]


async def test_a_draw_nobody_can_pay_for_is_refused_by_the_reservation_alone(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = await Services.create(settings_factory(daily_credits=0))
    try:
        calls = count_calls(monkeypatch, "credits", "credits_of", "reserve", "open_job")
        chat = await run_command(services, invocation("draw", "a fox"))

        assert "Not enough credits: this needs 1, you have 0" in chat.last_text()
        assert calls == ["open_job"]
        job = await services.store.job(1)
        assert job is not None
        assert (job.status, job.error_kind) == ("failed", "insufficient_credits")
    finally:
        await services.close()


async def test_a_costly_draw_still_asks_first_with_the_credits_it_would_leave(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(settings_factory(daily_credits=20, confirm_above=1))
    try:
        chat = await run_command(services, invocation("draw", "a fox --n 2"))
        assert not chat.results()
        assert "18 left after this" in chat.everything()
    finally:
        await services.close()


# --- a burst's jobs starting: who is told what, and what goes first ---


class SlowStatusChat(RecordingChat):
    """A chat whose messages take a platform's round trip (0.3 s) to send."""

    async def send_text(self, text: str, *, ephemeral: bool = False) -> Any:
        await asyncio.sleep(0.3)
        return await super().send_text(text, ephemeral=ephemeral)


def watch_requests(services: Services, seen: Callable[[httpx.Request], None]) -> None:
    """Call `seen` as each request to the image API is handed to the transport."""
    transport = services.http._transport
    send = transport.handle_async_request

    async def watched(request: httpx.Request) -> httpx.Response:
        seen(request)
        return await send(request)

    transport.handle_async_request = watched  # type: ignore[method-assign]


async def burst(services: Services, chats: list[RecordingChat]) -> None:
    await asyncio.gather(
        *(
            dispatch(invocation("draw", "a fox", user_id=f"u{i}", chat_id=f"dm{i}"), chat, services)
            for i, chat in enumerate(chats)
        )
    )


async def test_commands_arriving_together_beyond_the_slots_are_told_they_queue(
    settings_factory: Callable[..., Settings], mock_upstream: Any
) -> None:
    # Before: every job of a burst was queued before any job task ran, the slots' lock was
    # still open, and all five were told "Drawing..." while three waited for a slot.
    mock_upstream.options.latency = 0.3
    services = await Services.create(settings_factory(concurrency=2))
    try:
        chats = [RecordingChat() for _ in range(5)]
        await burst(services, chats)
        await services.jobs.wait_idle()
    finally:
        await services.close()
    first = [next(s.text for s in chat.log if s.kind == "text") for chat in chats]
    assert sum(text.startswith("Drawing") for text in first) == 2, first
    queued = sorted(int(m[1]) for t in first if (m := re.match(r"Queued #(\d+)", t)))
    assert queued == [1, 2, 3], first
    assert all(chat.results() for chat in chats)
    assert mock_upstream.max_in_flight == 2


async def test_a_starting_jobs_request_does_not_wait_for_its_status_message(
    settings_factory: Callable[..., Settings], mock_upstream: Any
) -> None:
    services = await Services.create(settings_factory())
    try:
        chat = SlowStatusChat()
        entered = asyncio.Event()
        watch_requests(services, lambda _: entered.set())
        started = asyncio.get_running_loop().time()
        await dispatch(invocation("draw", "a fox"), chat, services)
        await entered.wait()
        asked_after = asyncio.get_running_loop().time() - started
        await services.jobs.wait_idle()
    finally:
        await services.close()
    # The request went out while "Drawing..." was still on its way (0.3 s).
    assert asked_after < 0.25, asked_after
    texts = [s for s in chat.log if s.kind in ("text", "results")]
    assert texts[0].text.startswith("Drawing") and texts[-1].kind == "results"


async def test_jobs_that_wait_say_so_after_the_starting_jobs_sent_their_requests(
    settings_factory: Callable[..., Settings], mock_upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    mock_upstream.options.latency = 0.3
    services = await Services.create(settings_factory(concurrency=2))
    order: list[str] = []
    original = RecordingChat.send_text
    watch_requests(services, lambda _: order.append("request"))

    async def noted(self: RecordingChat, text: str, *, ephemeral: bool = False) -> Any:
        if text.startswith("Queued"):
            order.append("queued")
        return await original(self, text, ephemeral=ephemeral)

    monkeypatch.setattr(RecordingChat, "send_text", noted)
    try:
        await burst(services, [RecordingChat() for _ in range(5)])
        await services.jobs.wait_idle()
    finally:
        await services.close()
    # Before: the three "Queued" lines went first, and the two requests after them.
    assert order[:5] == ["request", "request", "queued", "queued", "queued"], order


async def test_queued_jobs_keep_their_lines_true_with_no_task_before_the_first_update(
    settings_factory: Callable[..., Settings], mock_upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: each queued job started a task at once to edit its line every QUEUE_TICK, most
    # cancelled unused when the job got its slot (a burst's next waves).
    import bot.jobs

    monkeypatch.setattr(bot.jobs, "QUEUE_TICK", 0.4)
    mock_upstream.options.latency = 1.0
    services = await Services.create(settings_factory(concurrency=1))

    def watchers() -> int:
        return sum(
            getattr(task.get_coro(), "__qualname__", "") == "JobRunner._watch_queue"
            for task in asyncio.all_tasks()
        )

    try:
        chats = [RecordingChat() for _ in range(3)]
        await burst(services, chats)
        await asyncio.sleep(0.2)
        assert [c.texts()[0][:9] for c in chats] == ["Drawing..", "Queued #1", "Queued #2"]
        assert watchers() == 0
        await asyncio.sleep(0.4)  # the first update is due: the two waiting jobs' watchers
        assert watchers() == 2
        await services.jobs.wait_idle()
        assert watchers() == 0
    finally:
        await services.close()
    # The last job's line followed the queue (#2, then #1) and every job was answered.
    edits = [s.text for s in chats[2].log if s.kind == "edit"]
    assert any(text.startswith("Queued #1") for text in edits), edits
    assert all(chat.results() for chat in chats)


# --- a draw's job written with its charge (`Store.open_job`) ---


async def test_a_draw_refused_before_its_charge_still_has_a_job_row_saying_why(
    services: Services,
) -> None:
    user = await services.store.user("test", "u1")
    await services.store.set_role(user.id, "banned")
    user = await services.store.user("test", "u1")
    inv = invocation("draw", "a fox")
    spec = JobSpec(kind="draw", prompt="a fox")

    with pytest.raises(errors.BannedError):
        await services.jobs.submit(inv=inv, user=user, chat=RecordingChat(), spec=spec, lang="en")

    job = await services.store.job(1)
    assert job is not None
    assert (job.status, job.error_kind, job.kind, job.prompt) == (
        "failed",
        "banned",
        "draw",
        "a fox",
    )
    assert job.ledger_state is None  # never charged


async def test_a_draw_cancelled_while_its_job_is_written_and_charged_is_settled(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked, go_on = asyncio.Event(), asyncio.Event()
    open_job = Store.open_job

    async def slow_open_job(self: Store, **fields: Any) -> Any:
        asked.set()
        await go_on.wait()  # the caller is cancelled meanwhile; the write goes on
        return await open_job(self, **fields)

    monkeypatch.setattr(Store, "open_job", slow_open_job)
    command = asyncio.create_task(dispatch(invocation("draw", "a fox"), RecordingChat(), services))
    await asyncio.wait_for(asked.wait(), 5)
    command.cancel()
    await asyncio.sleep(0.05)
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await command
    await services.jobs.wait_idle()

    # The job it wrote (one row, not a second one for the refusal) is failed and refunded.
    user = await services.store.user("test", "u1")
    job = await services.store.job(1)
    assert job is not None and job.status == "failed" and job.ledger_state == "refunded"
    assert await services.store.job(2) is None
    credits = await services.store.credits(user.id, today(services.settings), 5)
    assert credits.total_left == 5


# --- a starting job's provider slot (the first wave of a burst) ---


def slot_rows(services: Services) -> list[tuple[Any, ...]]:
    from tests.databases import Raw

    raw = Raw(services.settings.database())
    try:
        return raw.query("SELECT provider, slot, job_id FROM provider_slots")
    finally:
        raw.close()


def job_statuses(services: Services) -> list[str]:
    from tests.databases import Raw

    raw = Raw(services.settings.database())
    try:
        return [row[0] for row in raw.query("SELECT status FROM jobs ORDER BY id")]
    finally:
        raw.close()


async def test_a_starting_job_asks_for_its_slot_before_its_task_first_runs(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a burst every job's first step runs before any slot is asked for, unless the jobs
    that start at once ask while they are queued: their slot's round trip then goes beside
    the other jobs' first steps, not after them."""
    from bot.jobs import JobRunner

    order: list[str] = []
    acquire, in_queue = Store.acquire_slots, JobRunner._in_queue

    async def acquire_slots(self: Store, *args: Any) -> Any:
        order.append("slot asked")
        return await acquire(self, *args)

    def first_step(self: JobRunner, *args: Any) -> Any:
        order.append("job task runs")
        return in_queue(self, *args)

    monkeypatch.setattr(Store, "acquire_slots", acquire_slots)
    monkeypatch.setattr(JobRunner, "_in_queue", first_step)
    chat = await run_command(services, invocation("draw", "a fox"))

    assert chat.results()
    assert order == ["slot asked", "job task runs"]
    assert slot_rows(services) == []  # given back after the job


async def test_a_job_cancelled_while_its_slot_is_being_taken_gives_the_slot_back(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the batch taking its slot is in flight, the job is refunded and the
    slot the batch took is given back: held, it would count against the provider's
    concurrency in every process until this one stops."""
    taking, go_on, taken = asyncio.Event(), asyncio.Event(), asyncio.Event()
    acquire = Store.acquire_slots

    async def slow_acquire(self: Store, *args: Any) -> Any:
        taking.set()
        await go_on.wait()
        try:
            return await acquire(self, *args)
        finally:
            taken.set()

    monkeypatch.setattr(Store, "acquire_slots", slow_acquire)
    chat = RecordingChat()
    await dispatch(invocation("draw", "a fox"), chat, services)
    await asyncio.wait_for(taking.wait(), 5)
    await asyncio.sleep(0.05)  # the job's task waits for the slot now
    user = await services.store.user("test", "u1")
    job_id = await services.jobs.cancel(user.id)
    assert job_id is not None
    go_on.set()
    await services.jobs.wait_idle()
    await asyncio.wait_for(taken.wait(), 5)  # the batch took slot 0 for the cancelled job
    for _ in range(100):  # and it goes back, in the background
        if not slot_rows(services):
            break
        await asyncio.sleep(0.02)
    assert slot_rows(services) == []
    job = await services.store.job(job_id)
    assert job is not None and job.status == "cancelled"
    credits = await services.store.credits(user.id, today(services.settings), 5)
    assert credits.total_left == 5  # refunded
    assert not chat.results()


async def test_a_slot_asked_early_for_a_job_that_never_ran_goes_back(services: Services) -> None:
    """A job that ends before its task ever asks (cancelled at once) leaves no slot taken."""
    jobs = services.jobs
    provider = jobs.clients[0].provider
    slot = jobs._slot(provider, 77)
    slot.ask_early()
    slot.abandon()
    await jobs._slot_batches[(provider.name, provider.concurrency)].drained()  # slot 0 taken
    for _ in range(100):  # and given back, in the background
        if not slot_rows(services):
            break
        await asyncio.sleep(0.02)
    assert slot_rows(services) == []


async def test_a_result_does_not_wait_for_its_slot_to_go_back_and_the_next_job_does(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot's release is a store round trip: the result goes to the chat beside it. The
    next job of this process (one slot) enters once the row is gone, so it finds it free."""
    held = asyncio.Event()
    releasing = asyncio.Event()
    release = Store.release_slot

    async def slow_release(self: Store, *args: Any) -> Any:
        releasing.set()
        await held.wait()
        return await release(self, *args)

    monkeypatch.setattr(Store, "release_slot", slow_release)
    services = await Services.create(settings_factory(concurrency=1))
    try:
        first, second = RecordingChat(), RecordingChat()
        await dispatch(invocation("draw", "a fox"), first, services)
        await dispatch(invocation("draw", "a hare", user_id="u2"), second, services)
        await asyncio.wait_for(releasing.wait(), 10)
        for _ in range(200):  # the first result arrives while its slot is still held
            if first.results():
                break
            await asyncio.sleep(0.01)
        assert first.results()
        meta = first.results()[0].meta
        assert meta is not None
        assert [row[2] for row in slot_rows(services)] == [meta.job_id]
        await asyncio.sleep(0.2)
        assert job_statuses(services)[-1] == "queued"  # the next job waits for the slot
        held.set()
        await services.jobs.wait_idle()  # both jobs, and both slots given back
        assert second.results()
        assert slot_rows(services) == []
    finally:
        held.set()
        await services.close()


def test_queue_places_follow_jobs_leaving_from_anywhere() -> None:
    from bot.jobs import _Queue, _Ticket

    queue = _Queue()
    tickets = [_Ticket(n, n, "main") for n in range(500)]
    for ticket in tickets:
        queue.append(ticket)
    assert [queue.place(t) for t in tickets[:3]] == [1, 2, 3] and queue.place(tickets[-1]) == 500
    queue.discard(tickets[0])  # started
    queue.discard(tickets[250])  # cancelled while waiting
    queue.discard(tickets[250])  # twice: no-op
    assert queue.place(tickets[0]) == 0 and queue.place(tickets[250]) == 0
    assert queue.place(tickets[1]) == 1
    assert queue.place(tickets[249]) == 249 and queue.place(tickets[251]) == 250
    late = _Ticket(999, 9, "main")
    queue.append(late)
    assert len(queue) == 499 and queue.place(late) == 499
