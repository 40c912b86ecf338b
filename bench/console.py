"""The console's overview and jobs pages with 100,000 jobs in the store, against the same queries
run raw in sqlite3.

    python bench/console.py            # 100,000 jobs, 20 renders of each page
    python bench/console.py --quick    # 20,000 jobs, 5 renders

Jobs are spread over the last 30 days on four platforms, 2,000 users, 40 groups and three
providers; 85 % succeeded (reserved and committed in the ledger), the rest failed (reserved and
refunded). Each page is fetched as a logged-in operator through the console's own FastAPI app
(httpx over ASGI, no socket): store query on aiosqlite's thread, Python shaping (percentiles),
the Jinja2 template. The baseline runs the very same SQL (`bot.store.console_overview_sql` /
`console_jobs_sql`) on a plain synchronous sqlite3 connection: the cost of the queries alone.
Last, the time index (`jobs_created`, migration 6) is dropped and the raw queries timed again,
to show what it is for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from adapters.console.app import OVERVIEW_CACHE, Console
from adapters.console.logbuffer import LogBuffer
from bot.config import Settings
from bot.services import Services
from bot.store import console_jobs_sql, console_overview_sql

PASSWORD = "bench-console-password"
PLATFORMS = ("telegram", "qq", "discord", "telegram")
PROVIDERS = ("main", "backup", "cheap")
SIZES = ("1024x1024", "1536x1024", "2048x2048", "3840x2160")
ERRORS = ("timeout", "no_channel", "moderation", "upstream_5xx")
GOAL_OVERHEAD = 0.25
"""Seconds the console may add to its queries' own time (HTTP, shaping, template), p50."""


def fill(path: Path, jobs: int, seed: int = 13) -> None:
    """`jobs` finished jobs with their reservations and ledger rows, in one transaction."""
    rng = random.Random(seed)
    now = time.time()
    con = sqlite3.connect(path)
    con.execute("BEGIN")
    users = [(n + 1, PLATFORMS[n % 4], str(100000 + n), f"user{n}") for n in range(2000)]
    con.executemany(
        "INSERT INTO users (id, platform, platform_user_id, name, granted, created_at)"
        " VALUES (?, ?, ?, ?, 1000000, 0)",
        users,
    )
    job_rows, reservations, ledger = [], [], []
    # Ids grow with time, as the store assigns them.
    times = sorted(now - rng.uniform(0, 30 * 86400) for _ in range(jobs))
    for job_id, created in enumerate(times, 1):
        user_id, platform, _, _ = users[rng.randrange(len(users))]
        started = created + rng.uniform(0.2, 10)
        finished = started + rng.uniform(10, 150)
        ok = rng.random() < 0.85
        day = time.strftime("%Y-%m-%d", time.gmtime(created))
        group = f"{platform}:g{rng.randrange(10)}" if rng.random() < 0.6 else None
        options = {"size": rng.choice(SIZES), "n": 1, "quality": "high"}
        job_rows.append(
            (
                job_id,
                user_id,
                platform,
                group or f"private-{user_id}",
                group,
                "draw",
                f"prompt {job_id}",
                json.dumps(options),
                rng.choice(PROVIDERS),
                "succeeded" if ok else "failed",
                None if ok else rng.choice(ERRORS),
                None if ok else "relay said: something",
                created,
                started,
                finished,
                '[{"width":1024}]' if ok else "[]",
            )
        )
        reservations.append((job_id, user_id, 0, 2, day, group, "committed" if ok else "refunded"))
        ledger.append((job_id, user_id, "reserve", 0, 2, day, created))
        ledger.append((job_id, user_id, "commit" if ok else "refund", 0, 2, day, finished))
    con.executemany(
        "INSERT INTO jobs (id, user_id, platform, chat_id, group_key, kind, prompt, options,"
        " provider, status, error_kind, error_detail, created_at, started_at, finished_at,"
        " outputs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        job_rows,
    )
    con.executemany(
        "INSERT INTO reservations (job_id, user_id, daily_amount, balance_amount, day,"
        " group_key, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
        reservations,
    )
    con.executemany(
        "INSERT INTO ledger (job_id, user_id, kind, daily_amount, balance_amount, day,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ledger,
    )
    con.execute("COMMIT")
    con.execute("ANALYZE")
    con.close()


def quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return ordered[len(ordered) // 2], p95


def time_raw(fn: Callable[[], Any], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int)
    args = parser.parse_args()
    jobs = args.jobs or (20_000 if args.quick else 100_000)
    runs = 5 if args.quick else 20
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        data = Path(tmp) / "data"
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, data_dir=data, console_password=PASSWORD, timezone="UTC"
        )
        services = await Services.create(settings)
        db = data / "drawbridge.sqlite3"
        started = time.perf_counter()
        await asyncio.to_thread(fill, db, jobs)
        print(f"{jobs:,} jobs written in {time.perf_counter() - started:.1f} s")
        logs = LogBuffer()
        console = Console(settings, services, logs)
        # Timed as the first visit after the cache expired; the cached visit is timed apart.
        console.overview_cache = dict.fromkeys(console.overview_cache, 0.0)
        transport = httpx.ASGITransport(app=console.app)
        some_day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 3 * 86400))
        pages = {
            "overview 24h": ("/?range=24h", ("overview", 86400)),
            "overview 7d": ("/?range=7d", ("overview", 7 * 86400)),
            "overview 30d": ("/?range=30d", ("overview", 30 * 86400)),
            "jobs": ("/jobs", ("jobs", {})),
            "jobs status=failed": ("/jobs?status=failed", ("jobs", {"status": "failed"})),
            "jobs qq + a day": (
                f"/jobs?platform=qq&date={some_day}",
                ("jobs", {"platform": "qq", "date": some_day}),
            ),
            "jobs user=#77": ("/jobs?user=%2377", ("jobs", {"user": "#77"})),
        }
        from adapters.console.views import job_filters

        def raw_call(con: sqlite3.Connection, name: str) -> Callable[[], Any]:
            kind, arg = pages[name][1]
            if kind == "overview":
                since = time.time() - float(arg)
                return lambda: console_overview_sql(con, since)
            filters = job_filters(dict(arg), "UTC")
            return lambda: console_jobs_sql(con, filters, 50, 0)

        raw_con = sqlite3.connect(db)
        raw_con.row_factory = sqlite3.Row
        page_times: dict[str, list[float]] = {}
        raw: dict[str, list[float]] = {}
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            login = await http.get("/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
            assert csrf is not None
            await http.post("/login", data={"csrf": csrf.group(1), "password": PASSWORD})
            for name, (path, _) in pages.items():
                assert (await http.get(path)).status_code == 200, path  # warm
                call = raw_call(raw_con, name)
                call()
                page_times[name], raw[name] = [], []
                # Page and raw queries in turns, so a busy moment of the machine hits both.
                for _ in range(runs):
                    t0 = time.perf_counter()
                    response = await http.get(path)
                    page_times[name].append(time.perf_counter() - t0)
                    assert response.status_code == 200
                    raw[name].append(time_raw(call, 1)[0])
            console.overview_cache = dict(OVERVIEW_CACHE)
            await http.get("/?range=30d")
            cached = []
            for _ in range(runs):
                t0 = time.perf_counter()
                await http.get("/?range=30d")
                cached.append(time.perf_counter() - t0)
        await services.close()
        raw_con.execute("DROP INDEX jobs_created")
        unindexed = {}
        for name in pages:
            call = raw_call(raw_con, name)
            call()
            unindexed[name] = time_raw(call, runs)
        raw_con.close()

    print(f"\n{runs} renders each, seconds (p50 / p95)\n")
    print(f"{'page':<22}{'console page':>20}{'raw sqlite3':>20}{'raw, no time index':>22}")
    worst = overhead = 0.0
    for name in pages:
        page = quantiles(page_times[name])
        base = quantiles(raw[name])
        bare = quantiles(unindexed[name])
        worst = max(worst, page[1])
        overhead = max(overhead, page[0] - base[0])
        print(
            f"{name:<22}{page[0]:>9.3f} / {page[1]:<8.3f}{base[0]:>9.3f} / {base[1]:<8.3f}"
            f"{bare[0]:>11.3f} / {bare[1]:<8.3f}"
        )
    cached_p50, cached_p95 = quantiles(cached)
    print(f"{'overview 30d, cached':<22}{cached_p50:>9.3f} / {cached_p95:<8.3f}")
    print(
        f"\nslowest page p95, uncached: {worst:.3f} s; the console's own cost over its queries "
        f"(p50, worst page): {overhead:.3f} s (goal < {GOAL_OVERHEAD:.2f} s)"
    )
    return 0 if overhead < GOAL_OVERHEAD else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
