"""/draw jobs through the real pipeline at 100 % load: how close to the ideal, at what cost.

    python bench/load.py            # 500 jobs from 100 users (5 each), ideal 10 s
    python bench/load.py --quick    # 100 jobs from 20 users, ideal 2 s
    python bench/load.py --database-url postgresql://postgres@127.0.0.1:5432/test
                                    # the same on PostgreSQL: a fresh database on that
                                    # server for each run, dropped at the end
    python bench/load.py --repeat 9 --before REV
                                    # 9 interleaved pairs of runs against REV: medians and
                                    # ranges (a small VM's runs vary by +-15 % and more)

A run is one process (with `--before` or `--repeat`, a fresh child process for every run, so
runs do not inherit one another's heap), everything on one event loop (uvloop where installed,
as `drawbridge run` runs; `--event-loop asyncio` for asyncio's; `--before` revisions ran on
asyncio's): the mock upstream (1 s latency per image, single-colour 1024x1024 PNGs, streaming
with 2 partial previews, as the default settings ask), `Services.create` over a fresh SQLite
file with provider concurrency 50, and one `RecordingChat` per command, driven through
`plugins.dispatch.dispatch` as an adapter would (users spread over 10 group chats). The
baseline is the ideal, jobs / concurrency x latency: what a bot with no overhead at all would
take. Two arrival patterns, in the same run:

  burst   every command at the same instant (the worst case: all intake work queues up)
  paced   the same commands evenly over the first second (500/s: still a flood, but one
          command at a time, as platforms deliver them); its ideal is that of a perfect
          bot fed the same arrivals (10.1 s for 500 jobs: the 50th arrives at 0.1 s)

Before each run one request fills the mock's render cache, so the first 50 requests do not
all draw the same picture at once (that would be the mock's cost, not the bot's).

Per-job times come from the bench's clock around `dispatch` and `Chat.send_results`, and from
the job rows' `started_at` / `finished_at` (`time.time()`, the same clock; the job runner
takes `started_at` when it asks the store to mark the job running, once it holds a slot):

  intake      dispatch called -> returned (user, job row, credit reservation; under load this
              includes waiting for the store's single writer)
  queue wait  dispatch returned -> started_at (the "queued" message, waiting for a slot)
  in-slot     started_at -> results delivered, minus the mock's latency (recording the job
              as running, the request, stream parsing, partial preview, files, delivery)
  after       results delivered -> finished_at (commit + job row, still holding the slot)
  overhead    intake + in-slot: what the bot adds to a user's wait, queueing for a slot
              excluded (the upstream's own time is the mock's fixed latency)
  intake CPU  the main thread's CPU time (`time.thread_time`) from dispatch called to
              returned: what the event loop computed meanwhile, for every command and the
              mock alike. The loop is CPU-bound in a burst, so an intake cannot be shorter
              than this on the machine; once its p99 alone is past the goal, only less work
              per command (or a faster CPU) can meet it. The machine line gives the CPU's
              speed for plain Python (a 10-million-step loop) to compare VMs by

At the end the ledger is audited: each user's credits must be exactly the allowance minus
their jobs, the ledger's sum must equal that change, and every job must be reserved and
committed exactly once, delivered exactly once, and sent upstream exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import logging
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from _common import (
    MB,
    REPO,
    add_repo_to_path,
    loop_seconds,
    machine,
    peak_rss_bytes,
    percentile,
    reset_peak_rss,
    rss_bytes,
    table,
    verdict,
)

add_repo_to_path()
if "--code" in sys.argv:
    # `--before REV` runs this script again with the bot's code (bot/, plugins/, tests/) from
    # a worktree of REV: that tree goes first on the path.
    sys.path.insert(0, sys.argv[sys.argv.index("--code") + 1])

from bot.chat import Invocation, OutFile, ResultMeta  # noqa: E402
from bot.config import Settings  # noqa: E402
from bot.jobs import today  # noqa: E402
from bot.mock_upstream import MockOptions, MockUpstream  # noqa: E402
from bot.services import Services  # noqa: E402
from plugins.dispatch import dispatch  # noqa: E402
from tests.recording_chat import RecordingChat  # noqa: E402

API_KEY = "sk-bench-not-a-real-key"
PROMPT = "a red fox in fresh snow"
GROUPS = 10
GOAL_TOTAL = 1.1
GOAL_P99_OVERHEAD = 0.100


class TimedChat(RecordingChat):
    """A RecordingChat that notes when the results arrived."""

    delivered_at: float | None = None
    job_id: int | None = None

    async def send_results(self, files: Sequence[OutFile], meta: ResultMeta) -> None:
        await super().send_results(files, meta)
        self.delivered_at = time.time()
        self.job_id = meta.job_id


@dataclass
class Command:
    """One /draw as sent, and when."""

    invocation: Invocation
    chat: TimedChat
    sent_at: float = 0.0
    queued_at: float = 0.0
    # The main thread's CPU clock (`time.thread_time`) at the same two moments: what the
    # event loop (the bot, and the mock in-process) computed meanwhile.
    sent_cpu: float = 0.0
    queued_cpu: float = 0.0


@dataclass
class Outcome:
    """What one run produced."""

    jobs: int
    users: int
    total: float
    ideal: float
    commands: list[Command]
    rows: dict[int, dict[str, Any]]
    upstream_requests: int
    rss_before: int
    rss_peak: int
    problems: list[str]


async def run(
    users: int,
    per_user: int,
    latency: float,
    concurrency: int,
    stream: bool,
    spread: float,
    tmp: Path,
    database_url: str = "",
) -> Outcome:
    """Send every command (at once, or evenly over `spread` s), wait for all, audit the ledger."""
    jobs = users * per_user
    allowance = per_user * 2  # enough for every job, with some left to check exactly
    mock = MockUpstream(MockOptions(latency=latency, fast_images=True))
    await mock.start()
    warm_requests = await _warm_mock(mock)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        api_base=mock.base_url,
        api_key=API_KEY,
        data_dir=tmp / "data",
        concurrency=concurrency,
        queue_size=jobs + 1,
        user_max_jobs=per_user,
        daily_credits=allowance,
        stream=stream,
        default_lang="en",
        shutdown_grace=5.0,
        # Only when set: a `--before` revision may predate the setting.
        **({"database_url": database_url} if database_url else {}),
    )
    services = await Services.create(settings)
    settle_heap()
    try:
        commands = [
            Command(
                Invocation(
                    platform="bench",
                    user_id=f"u{user}",
                    chat_id=f"g{user % GROUPS}",
                    command="draw",
                    text=PROMPT,
                    user_name=f"user {user}",
                    locale="en",
                ),
                TimedChat(),
            )
            for round_ in range(per_user)
            for user in range(users)
        ]

        async def send(command: Command, delay: float) -> None:
            if delay:
                await asyncio.sleep(delay)
            command.sent_at = time.time()
            command.sent_cpu = time.thread_time()
            await dispatch(command.invocation, command.chat, services)
            command.queued_at = time.time()
            command.queued_cpu = time.thread_time()

        rss_before = rss_bytes()
        started = time.perf_counter()
        await asyncio.gather(*(send(c, i * spread / jobs) for i, c in enumerate(commands)))
        await services.jobs.wait_idle()
        total = time.perf_counter() - started
        rss_peak = peak_rss_bytes()

        problems = await _check_credits(services, users, per_user, allowance)
    finally:
        await services.close(grace=5.0)
        await mock.stop()
    upstream_requests = len(mock.requests) - warm_requests
    query = _query_function(settings.database())
    rows = await _job_rows(query)
    problems += await _audit(query, jobs)
    problems += _check_delivery(commands, rows, upstream_requests)
    return Outcome(
        jobs=jobs,
        users=users,
        total=total,
        ideal=ideal_total([i * spread / jobs for i in range(jobs)], concurrency, latency),
        commands=commands,
        rows=rows,
        upstream_requests=upstream_requests,
        rss_before=rss_before,
        rss_peak=rss_peak,
        problems=problems,
    )


def settle_heap() -> None:
    """What `drawbridge run` does with the garbage collector once ready (`bot.heap`); a
    revision from before it left Python's defaults."""
    try:
        from bot import heap
    except ImportError:
        return
    heap.settle()


def ideal_total(arrivals: Sequence[float], concurrency: int, latency: float) -> float:
    """Seconds a bot with no overhead would need for these arrivals.

    Each job starts on arrival or when a slot frees, and takes exactly the upstream's latency:
    jobs / concurrency x latency when all arrive at once.
    """
    free = [0.0] * concurrency
    for arrival in sorted(arrivals):
        start = max(arrival, heapq.heappop(free))
        heapq.heappush(free, start + latency)
    return max(free) - min(arrivals, default=0.0)


async def _warm_mock(mock: MockUpstream) -> int:
    """Fill the mock's render cache with the image every job will get; returns requests made.

    Without it the first 50 requests all miss the cache at once and draw the same image 50
    times in the thread pool, which is the mock's cost, not the bot's.
    """
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{mock.base_url}/v1/images/generations",
            json={"model": "gpt-image-2", "prompt": PROMPT, "size": "1024x1024"},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
        response.raise_for_status()
    return len(mock.requests)


async def _check_credits(
    services: Services, users: int, per_user: int, allowance: int
) -> list[str]:
    """Each user's credits, through the store's own API: allowance - jobs, and the ledger sum."""
    problems = []
    day = today(services.settings)
    for user in range(users):
        record = await services.store.user("bench", f"u{user}")
        credits = await services.store.credits(record.id, day, allowance)
        if credits.total_left != allowance - per_user:
            problems.append(
                f"u{user}: {credits.total_left} credits left, expected {allowance - per_user}"
            )
        spent = await services.store.ledger_sum(record.id)
        if spent != per_user:
            problems.append(f"u{user}: ledger says {spent} spent, expected {per_user}")
    return problems


def _query_function(url: str) -> Any:
    """`await query(sql)`: rows as tuples, straight from the database (plain SQL, no Store)."""
    if url.startswith("postgresql://"):
        import asyncpg

        async def fetch(sql: str) -> list[tuple[Any, ...]]:
            con = await asyncpg.connect(url)
            try:
                return [tuple(row) for row in await con.fetch(sql)]
            finally:
                await con.close()

        return fetch

    async def query(sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return [tuple(row) for row in db.execute(sql)]

    return query


async def _job_rows(query: Any) -> dict[int, dict[str, Any]]:
    wanted = ("id", "started_at", "finished_at")
    rows = await query("SELECT id, started_at, finished_at FROM jobs")
    return {row[0]: dict(zip(wanted, row, strict=True)) for row in rows}


async def _audit(query: Any, jobs: int) -> list[str]:
    """The ledger, read with plain SQL: one reserve and one commit per job, no refund."""
    problems = []
    statuses = Counter(status for (status,) in await query("SELECT status FROM jobs"))
    if statuses != Counter(succeeded=jobs):
        problems.append(f"job statuses {dict(statuses)}, expected {jobs} succeeded")
    kinds = Counter(
        dict(
            await query("SELECT kind, COUNT(*) FROM ledger WHERE job_id IS NOT NULL GROUP BY kind")
        )
    )
    if kinds != Counter(reserve=jobs, commit=jobs):
        problems.append(f"ledger rows {dict(kinds)}, expected {jobs} reserve + {jobs} commit")
    twice = (
        await query(
            "SELECT COUNT(*) FROM (SELECT job_id FROM ledger WHERE kind = 'reserve'"
            " GROUP BY job_id HAVING COUNT(*) > 1) AS twice"
        )
    )[0][0]
    if twice:
        problems.append(f"{twice} jobs charged more than once")
    states = Counter(state for (state,) in await query("SELECT state FROM reservations"))
    if states != Counter(committed=jobs):
        problems.append(f"reservations {dict(states)}, expected {jobs} committed")
    mismatched = (
        await query(
            """
            SELECT COUNT(*) FROM daily_usage AS d WHERE d.used <> (
                SELECT COALESCE(SUM(CASE kind WHEN 'reserve' THEN daily_amount
                                              WHEN 'refund' THEN -daily_amount ELSE 0 END), 0)
                FROM ledger WHERE user_id = d.user_id AND day = d.day)
            """
        )
    )[0][0]
    if mismatched:
        problems.append(f"{mismatched} users' daily usage differs from their ledger")
    return problems


def _check_delivery(
    commands: Sequence[Command], rows: dict[int, dict[str, Any]], upstream_requests: int
) -> list[str]:
    problems = []
    if upstream_requests != len(commands):
        problems.append(f"{upstream_requests} upstream requests for {len(commands)} jobs")
    undelivered = [c for c in commands if len(c.chat.results()) != 1 or c.chat.job_id is None]
    if undelivered:
        problems.append(f"{len(undelivered)} commands without exactly one delivered result")
    ids = Counter(c.chat.job_id for c in commands)
    if len(ids) != len(commands) or set(ids) != set(rows):
        problems.append("delivered results do not match the job rows one to one")
    return problems


@dataclass
class Summary:
    """One run's figures, per phase, in seconds."""

    name: str
    outcome: Outcome
    phases: dict[str, list[float]]

    @property
    def ratio(self) -> float:
        return self.outcome.total / self.outcome.ideal

    @property
    def p99_overhead(self) -> float:
        return percentile(self.phases["overhead"], 0.99)

    @property
    def complete(self) -> bool:
        return len(self.phases["overhead"]) == self.outcome.jobs


def summarize(name: str, outcome: Outcome, latency: float) -> Summary:
    """Split every job's life into the phases of the module docstring."""
    phases: dict[str, list[float]] = {
        "intake": [],
        "queue wait": [],
        "in-slot": [],
        "after": [],
        "overhead": [],
        "intake CPU": [],
    }
    for command in outcome.commands:
        job_id = command.chat.job_id
        row = outcome.rows.get(job_id) if job_id is not None else None
        if row is None or command.chat.delivered_at is None or row["started_at"] is None:
            continue
        intake = command.queued_at - command.sent_at
        in_slot = command.chat.delivered_at - row["started_at"] - latency
        phases["intake"].append(intake)
        phases["queue wait"].append(row["started_at"] - command.queued_at)
        phases["in-slot"].append(in_slot)
        phases["after"].append(row["finished_at"] - command.chat.delivered_at)
        phases["overhead"].append(intake + in_slot)
        phases["intake CPU"].append(command.queued_cpu - command.sent_cpu)
    return Summary(name, outcome, phases)


def report(
    summaries: Sequence[Summary],
    latency: float,
    concurrency: int,
    stream: bool,
    database_url: str = "",
    speeds: Sequence[float] = (),
) -> int:
    """Print the figures; 0 if every goal is met and every ledger is exact (this checkout's
    runs: a `--before` run only shows what changed)."""
    first = summaries[0].outcome
    store = "PostgreSQL (a fresh database a run)" if database_url else "SQLite"
    print(
        f"load: {first.jobs} /draw from {first.users} users, mock upstream in-process "
        f"({latency:g} s latency, {'streaming' if stream else 'plain JSON'}), provider "
        f"concurrency {concurrency}, store {store}; ideal = jobs / concurrency x latency "
        "(paced: a perfect bot fed the same arrivals)"
    )
    speed = f"{min(speeds):.2f}-{max(speeds):.2f}" if speeds else "?"
    print(f"machine: {machine()}; a 10-million-step Python loop: {speed} s before the runs")
    print()
    rows = []
    for summary in summaries:
        outcome = summary.outcome
        overhead = summary.phases["overhead"]
        rows.append(
            [
                summary.name,
                f"{outcome.ideal:.2f}",
                f"{outcome.total:.2f}",
                f"{summary.ratio:.3f}",
                verdict(summary.ratio, GOAL_TOTAL),
                f"{percentile(overhead, 0.5) * 1e3:.1f}",
                f"{summary.p99_overhead * 1e3:.1f}",
                verdict(summary.p99_overhead, GOAL_P99_OVERHEAD - 1e-9),
                f"{outcome.rss_peak / MB:.0f}",
                "yes" if not outcome.problems else "NO",
            ]
        )
    print(
        table(
            [
                "arrivals",
                "ideal s",
                "total s",
                "x ideal",
                f"<= {GOAL_TOTAL}",
                "overhead p50 ms",
                "p99 ms",
                f"< {GOAL_P99_OVERHEAD * 1e3:.0f}",
                "peak RSS MB",
                "ledger exact",
            ],
            rows,
        )
    )
    print()
    print("per-job phases, ms (p50 / p99 / max)")
    names = list(summaries[0].phases)
    phase_rows = []
    for name in names:
        row: list[object] = [name]
        for summary in summaries:
            values = summary.phases[name]
            row.append(
                f"{percentile(values, 0.5) * 1e3:.1f} / {percentile(values, 0.99) * 1e3:.1f}"
                f" / {max(values, default=float('nan')) * 1e3:.1f}"
            )
        phase_rows.append(row)
    print(table(["phase", *(s.name for s in summaries)], phase_rows))
    print()
    missed = False
    for summary in summaries:
        outcome = summary.outcome
        print(
            f"{summary.name}: RSS {outcome.rss_before / MB:.0f} MB before, peak "
            f"{outcome.rss_peak / MB:.0f} MB (bot and mock upstream together); "
            f"{outcome.upstream_requests} upstream requests"
        )
        if outcome.problems:
            print(f"{summary.name}: ledger NOT exact:")
            for problem in outcome.problems[:20]:
                print(f"  {problem}")
        else:
            print(
                f"{summary.name}: ledger exact: {outcome.users} users at allowance - "
                f"{outcome.jobs // outcome.users}, ledger sums match, {outcome.jobs} jobs "
                "reserved + committed once, no refund, delivered once"
            )
        cpu = summary.phases.get("intake CPU", [])
        if cpu:
            print(
                f"{summary.name}: the loop's CPU during an intake, p50 / p99 "
                f"{percentile(cpu, 0.5) * 1e3:.0f} / {percentile(cpu, 0.99) * 1e3:.0f} ms "
                f"(the p99 overhead goal is {GOAL_P99_OVERHEAD * 1e3:.0f} ms)"
            )
        if ", before" in summary.name:
            continue
        missed |= (
            summary.ratio > GOAL_TOTAL
            or not summary.p99_overhead < GOAL_P99_OVERHEAD
            or bool(outcome.problems)
            or not summary.complete
        )
    return 1 if missed else 0


def median_run(runs: Sequence[Summary]) -> Summary:
    """The run of median p99 overhead (the lower middle one of an even number)."""
    ordered = sorted(runs, key=lambda run: run.p99_overhead)
    return ordered[(len(ordered) - 1) // 2]


def report_repeats(runs: dict[str, list[Summary]]) -> int:
    """Each side's p99 overhead over its runs, the ratio of the medians against the runs
    before, and whether every run's ledger was exact; 1 if any of this checkout's was not."""
    print()
    print("over every run: p99 overhead, ms, median (min-max)")
    status = 0
    medians: dict[str, float] = {}
    for name, side in runs.items():
        p99s = sorted(run.p99_overhead * 1e3 for run in side)
        intakes = [percentile(run.phases["intake"], 0.99) * 1e3 for run in side]
        slots = [percentile(run.phases["in-slot"], 0.99) * 1e3 for run in side]
        cpus = [percentile(run.phases.get("intake CPU", []), 0.99) * 1e3 for run in side]
        medians[name] = statistics.median(p99s)
        under = sum(p99 < GOAL_P99_OVERHEAD * 1e3 for p99 in p99s)
        print(
            f"{name}: {medians[name]:.0f} ({p99s[0]:.0f}-{p99s[-1]:.0f}) over {len(side)} runs,"
            f" under {GOAL_P99_OVERHEAD * 1e3:.0f} ms in {under}; intake p99"
            f" {statistics.median(intakes):.0f}, in-slot p99 {statistics.median(slots):.0f},"
            f" intake CPU p99 {statistics.median(cpus):.0f}"
        )
        broken = [run for run in side if run.outcome.problems or not run.complete]
        if broken:
            print(f"{name}: ledger NOT exact in {len(broken)} of {len(side)} runs")
            if ", before" not in name:
                status = 1
    for name, middle in medians.items():
        before = next((m for n, m in medians.items() if n.startswith(name + ", before")), None)
        if before is not None:
            print(f"{name}: median p99 {middle:.0f} vs {before:.0f} ms ({middle / before:.2f}x)")
    return status


def postgres_database(base_url: str, name: str) -> Any:
    """A fresh database `name` on the server of `base_url`: (its URL, a function dropping it)."""
    import asyncpg

    parts = urlsplit(base_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    admin = urlunsplit(parts)

    async def admin_sql(sql: str) -> None:
        con = await asyncpg.connect(admin)
        try:
            await con.execute(sql)
        finally:
            await con.close()

    asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}"'))
    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    return urlunsplit(parts._replace(path=f"/{name}")), lambda: asyncio.run(
        admin_sql(f'DROP DATABASE "{name}"')
    )


def run_once(args: argparse.Namespace, users: int, name: str, spread: float) -> Summary:
    """One arrival pattern with this process's code, on a fresh database."""
    reset_peak_rss()
    drop = None
    url = ""
    if args.database_url:
        url, drop = postgres_database(args.database_url, f"dload_{os.getpid()}_{name}")
    try:
        with tempfile.TemporaryDirectory(prefix="drawbridge-bench-") as tmp:
            outcome = run_on_loop(
                run(
                    users,
                    args.per_user,
                    args.latency,
                    args.concurrency,
                    args.stream,
                    spread,
                    Path(tmp),
                    url,
                ),
                args.event_loop,
            )
    finally:
        if drop is not None:
            drop()
    return summarize(name, outcome, args.latency)


def run_on_loop(main: Any, choice: str) -> Outcome:
    """Run on the loop `drawbridge run` would (DRAWBRIDGE_EVENT_LOOP's `choice`); a revision
    from before the setting ran on asyncio's."""
    try:
        from bot import event_loop
    except ImportError:
        outcome: Outcome = asyncio.run(main)
        return outcome
    result: Outcome = event_loop.run(main, choice)
    return result


def run_child(args: argparse.Namespace, code: Path, name: str, label: str) -> Summary:
    """The same pattern with the bot's code from `code` (a `--before` worktree, or this
    checkout): this script in a fresh child process, that code first on its path; its figures
    come back as JSON. Runs compared with one another each get a process of their own: runs
    one after another in one process slow down (its heap grows, and `bot.heap` freezes more
    of it each time), which made the side run in this process look slower than it was."""
    argv = [sys.executable, __file__, "--code", str(code), "--only", name, "--json"]
    for flag in (
        "users",
        "per_user",
        "latency",
        "concurrency",
        "spread",
        "database_url",
        "event_loop",
    ):
        value = getattr(args, flag)
        if value not in (None, ""):
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.quick:
        argv.append("--quick")
    if not args.stream:
        argv.append("--no-stream")
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if not done.stdout.strip():
        raise RuntimeError(f"the run before failed:\n{done.stderr[-2000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    outcome = Outcome(
        jobs=data["jobs"],
        users=data["users"],
        total=data["total"],
        ideal=data["ideal"],
        commands=[],
        rows={},
        upstream_requests=data["upstream_requests"],
        rss_before=data["rss_before"],
        rss_peak=data["rss_peak"],
        problems=data["problems"],
    )
    return Summary(label, outcome, data["phases"])


def to_json(summary: Summary) -> str:
    outcome = summary.outcome
    return json.dumps(
        {
            "jobs": outcome.jobs,
            "users": outcome.users,
            "total": outcome.total,
            "ideal": outcome.ideal,
            "upstream_requests": outcome.upstream_requests,
            "rss_before": outcome.rss_before,
            "rss_peak": outcome.rss_peak,
            "problems": outcome.problems,
            "phases": summary.phases,
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 jobs from 20 users")
    parser.add_argument("--users", type=int, help="users (100; quick 20)")
    parser.add_argument("--per-user", type=int, default=5, help="/draw per user (5)")
    parser.add_argument("--latency", type=float, default=1.0, help="mock latency, s (1.0)")
    parser.add_argument("--concurrency", type=int, default=50, help="provider slots (50)")
    parser.add_argument(
        "--spread", type=float, default=1.0, help="paced arrivals over this many seconds (1)"
    )
    parser.add_argument(
        "--no-stream", dest="stream", action="store_false", help="ask for plain JSON answers"
    )
    parser.add_argument(
        "--database-url", default="", help="postgresql://... (fresh databases are made there)"
    )
    parser.add_argument("--before", metavar="REV", help="also run the bot as of this revision")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each arrival pattern N times (with --before, N interleaved pairs): the "
        "tables show each side's run of median p99, then the medians and ranges of all",
    )
    parser.add_argument(
        "--event-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="as DRAWBRIDGE_EVENT_LOOP (auto: uvloop where installed, as drawbridge run)",
    )
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("burst", "paced"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat takes a number of runs, 1 or more")
    users = args.users or (20 if args.quick else 100)
    logging.basicConfig(level=logging.WARNING)
    patterns = [("burst", 0.0), ("paced", args.spread)]
    if args.only:
        patterns = [p for p in patterns if p[0] == args.only]
    runs: dict[str, list[Summary]] = {}
    # The CPU's speed for plain Python before each run: a VM's drifts from minute to minute.
    speeds: list[float] = []
    isolated = not args.json and (args.before is not None or args.repeat > 1)
    with tempfile.TemporaryDirectory(prefix="drawbridge-bench-") as tmp:
        code = None
        if args.before:
            code = Path(tmp) / "before"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(code), args.before],
                check=True,
                capture_output=True,
            )
        try:
            for name, spread in patterns:
                for repetition in range(args.repeat):
                    # The side that goes first alternates: the VM drifts in speed, and a run
                    # may follow the other side's database being dropped.
                    sides = [False, True] if repetition % 2 == 0 else [True, False]
                    for before in sides:
                        if before and code is None:
                            continue
                        if not args.json:
                            speeds.append(loop_seconds())
                        if before and code is not None:
                            run = run_child(args, code, name, f"{name}, before ({args.before})")
                        elif isolated:
                            run = run_child(args, REPO, name, name)
                        else:
                            run = run_once(args, users, name, spread)
                        runs.setdefault(run.name, []).append(run)
        finally:
            if code is not None:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(code)],
                    check=False,
                    capture_output=True,
                )
    # Each side's run of median p99 overhead stands for it in the tables (the only run
    # without --repeat); every run's ledger is checked all the same.
    summaries = [median_run(side) for side in runs.values()]
    if args.json:
        print(to_json(summaries[0]))
        return 0
    status = report(
        summaries, args.latency, args.concurrency, args.stream, args.database_url, speeds
    )
    if args.repeat > 1:
        # The medians and their ratio; one run's figures would only repeat the tables.
        return status | report_repeats(runs)
    before = [s for s in summaries if ", before" in s.name]
    for summary in summaries:
        old = next((b for b in before if b.name.startswith(summary.name + ",")), None)
        if old is None:
            continue
        p99, old_p99 = summary.p99_overhead, old.p99_overhead
        intake = percentile(summary.phases["intake"], 0.99)
        old_intake = percentile(old.phases["intake"], 0.99)
        print(
            f"{summary.name}: p99 overhead {p99 * 1e3:.0f} ms vs {old_p99 * 1e3:.0f} ms before "
            f"({p99 / old_p99:.2f}x); intake p99 {intake * 1e3:.0f} vs "
            f"{old_intake * 1e3:.0f} ms ({intake / old_intake:.2f}x)"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
