"""What the operator console (adapters/console) reads and does, kept together so the console
never reaches the database any other way."""

from __future__ import annotations

import sqlite3
import time
from datetime import date
from typing import Any

from bot.store import ledger
from bot.store.base import StoreBase
from bot.store.engine import Dialect, Tx, run_now
from bot.store.ledger import dumps, job_from_row
from bot.store.model import Job, User
from bot.store.sql import JOB_SELECT


class ConsoleMixin(StoreBase):
    async def console_now(self) -> dict[str, int]:
        """Jobs queued and running right now."""
        rows = await self._read(
            "SELECT status, COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
            " GROUP BY status",
        )
        counts = {row[0]: int(row[1]) for row in rows}
        return {"queued": counts.get("queued", 0), "running": counts.get("running", 0)}

    async def console_overview(self, since: float) -> dict[str, Any]:
        """Numbers about the jobs created since `since` (unix seconds), by platform.

        Keys: `per_hour` [(hour start, platform, jobs)], `platforms` {platform: {jobs,
        succeeded, failed, spent}}, `durations` [(provider, size, seconds queued to finished)]
        of succeeded jobs, `failures` {error kind: jobs}, `top_users` and `top_groups`
        [(label, jobs, spent)].
        """
        dialect = self._engine.dialect
        return await self._engine.session(lambda tx: overview(tx, dialect, since))

    async def console_jobs(
        self, filters: dict[str, str], *, limit: int = 50, offset: int = 0
    ) -> tuple[list[Job], int]:
        """Jobs matching `filters`, newest first, and how many match in all.

        Filters (each optional): platform, chat, user (`#id` or a platform user id), status,
        error_kind, provider, since and until (unix seconds, on the creation time).
        """
        return await self._engine.session(lambda tx: jobs_page(tx, filters, limit, offset))

    async def console_users(
        self, search: str, day: date, *, limit: int = 50
    ) -> list[tuple[User, int, int]]:
        """Users whose platform id or name contains `search`: (user, used today, jobs)."""
        like = search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = await self._read(
            r"""
            SELECT u.*,
                   COALESCE((SELECT used FROM daily_usage WHERE user_id = u.id AND day = ?1), 0)
                       AS used_today,
                   (SELECT COUNT(*) FROM jobs WHERE user_id = u.id) AS job_count
            FROM users AS u
            WHERE u.platform_user_id LIKE ?2 ESCAPE '\' OR u.name LIKE ?2 ESCAPE '\'
               OR u.platform || ':' || u.platform_user_id LIKE ?2 ESCAPE '\'
            ORDER BY u.id DESC LIMIT ?3
            """,
            (day.isoformat(), f"%{like}%", limit),
        )
        return [(self._user(row), int(row["used_today"]), int(row["job_count"])) for row in rows]

    async def console_ledger(
        self, filters: dict[str, str], *, limit: int | None = 200
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Ledger rows matching `filters` (user `#id`, kind, job, since, until), newest first,
        and their totals by kind (daily + balance amounts), summed by the database over all
        matches."""
        clauses: list[str] = []
        params: list[Any] = []
        if user := filters.get("user", "").strip().lstrip("#"):
            clauses.append("l.user_id = ?")
            params.append(int(user) if user.isdigit() else -1)
        if kind := filters.get("kind", "").strip():
            clauses.append("l.kind = ?")
            params.append(kind)
        if job := filters.get("job", "").strip().lstrip("#"):
            clauses.append("l.job_id = ?")
            params.append(int(job) if job.isdigit() else -1)
        for name, op in (("since", ">="), ("until", "<")):
            if value := filters.get(name, "").strip():
                clauses.append(f"l.created_at {op} ?")
                params.append(float(value))
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = await self._read(
            "SELECT l.*, u.platform || ':' || u.platform_user_id AS who FROM ledger AS l"
            " JOIN users AS u ON u.id = l.user_id"
            + where
            + " ORDER BY l.id DESC"
            + (" LIMIT ?" if limit is not None else ""),
            (*params, *(() if limit is None else (limit,))),
        )
        sums = await self._read(
            "SELECT l.kind, SUM(l.daily_amount + l.balance_amount), COUNT(*) FROM ledger AS l"
            + where
            + " GROUP BY l.kind",
            tuple(params),
        )
        totals = {row[0]: int(row[1] or 0) for row in sums}
        totals["rows"] = sum(int(row[2]) for row in sums)
        return [dict(row) for row in rows], totals

    async def console_provider_health(self, since: float) -> dict[str, dict[str, Any]]:
        """Per provider since `since`: jobs, succeeded, latencies (seconds), the last error."""
        rows = await self._read(
            """
            SELECT provider, status, finished_at - COALESCE(started_at, created_at),
                   error_kind, error_detail
            FROM jobs WHERE provider IS NOT NULL AND created_at >= ? ORDER BY id
            """,
            (since,),
        )
        health: dict[str, dict[str, Any]] = {}
        for provider, status, seconds, kind, detail in rows:
            entry = health.setdefault(
                provider, {"jobs": 0, "succeeded": 0, "latencies": [], "last_error": None}
            )
            entry["jobs"] += 1
            if status == "succeeded":
                entry["succeeded"] += 1
                if seconds is not None:
                    entry["latencies"].append(float(seconds))
            elif status == "failed":
                entry["last_error"] = f"{kind}: {detail or ''}".strip()
        return health

    async def console_providers_known(self) -> list[str]:
        """Providers with learned capabilities."""
        rows = await self._read("SELECT provider FROM provider_capabilities ORDER BY 1")
        return [row[0] for row in rows]

    async def console_metrics(self) -> dict[str, Any]:
        """Totals for /metrics: jobs by (platform, status, error kind) and by (provider,
        status), durations of finished jobs, and credits by ledger kind and reserved now."""

        async def read(tx: Tx) -> dict[str, Any]:
            reserved = await tx.fetch(
                "SELECT COALESCE(SUM(daily_amount + balance_amount), 0) FROM reservations"
                " WHERE state = 'reserved'"
            )
            return {
                "jobs": await tx.fetch(
                    "SELECT platform, status, COALESCE(error_kind, ''), COUNT(*) FROM jobs"
                    " GROUP BY 1, 2, 3"
                ),
                "providers": await tx.fetch(
                    "SELECT provider, status, COUNT(*) FROM jobs WHERE provider IS NOT NULL"
                    " GROUP BY 1, 2"
                ),
                "durations": await tx.fetch(
                    "SELECT platform, finished_at - created_at FROM jobs"
                    " WHERE status = 'succeeded' AND finished_at IS NOT NULL"
                ),
                "credits": await tx.fetch(
                    "SELECT kind, SUM(daily_amount + balance_amount) FROM ledger GROUP BY kind"
                ),
                "reserved_now": int(reserved[0][0]),
            }

        return await self._engine.session(read)

    async def console_refund(self, job_id: int, *, actor: str, by_user_id: int | None) -> int:
        """Give back what a succeeded job was charged, as a grant to its user's balance.

        The reservation stays committed (settled is final); the ledger gets a 'grant' row
        noting the job, and the audit table a 'refund' row that makes a second refund of the
        same job fail. Returns the credits given back. Raises `NotFoundError`, or
        `StoreError` when the job did not succeed, was not charged, or was refunded already.
        """
        for_update = self.for_update
        return await self._write(
            lambda tx: ledger.console_refund(tx, for_update, job_id, actor, by_user_id)
        )

    async def audit(
        self, actor: str, action: str, target: str = "", detail: dict[str, Any] | None = None
    ) -> None:
        """Record an operator's action (who, what, on whom)."""
        await self._execute(
            "INSERT INTO audit (created_at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, target, dumps(detail or {})),
        )

    async def audit_entries(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest operator actions, newest first."""
        rows = await self._read("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(row) for row in rows]

    async def console_groups(self, since: float, day: date) -> list[dict[str, Any]]:
        """Each group with jobs since `since` or rules of its own: jobs, credits spent (since
        `since`), used on `day`, and its rules (`group_rules` columns, None when never set)."""
        rows = await self._read(
            """
            WITH seen AS (
                SELECT j.group_key, COUNT(*) AS jobs,
                       SUM(COALESCE(c.daily_amount + c.balance_amount, 0)) AS spent
                FROM jobs AS j LEFT JOIN ledger AS c ON c.job_id = j.id AND c.kind = 'commit'
                WHERE j.created_at >= ? AND j.group_key IS NOT NULL GROUP BY j.group_key
            ),
            keys AS (SELECT group_key FROM seen UNION SELECT group_key FROM group_rules)
            SELECT k.group_key, COALESCE(s.jobs, 0) AS jobs, COALESCE(s.spent, 0) AS spent,
                   COALESCE((SELECT used FROM group_usage AS g
                             WHERE g.group_key = k.group_key AND g.day = ?), 0) AS used_today,
                   r.enabled, r.size, r.quality, r.cap, r.cooldown
            FROM keys AS k
            LEFT JOIN seen AS s ON s.group_key = k.group_key
            LEFT JOIN group_rules AS r ON r.group_key = k.group_key
            ORDER BY jobs DESC, k.group_key LIMIT 500
            """,
            (since, day.isoformat()),
        )
        return [{**dict(row), "jobs": int(row["jobs"]), "spent": int(row["spent"])} for row in rows]

    async def console_upstream_usage(self, since: float) -> list[tuple[str, str, str, str, int]]:
        """The images succeeded jobs created since `since` delivered, for what providers
        likely charged: (platform, provider, size, quality, images) per kind of image.

        `size` is as drawn ("WxH" of the output; a 4K job redrawn at 2K counts at 2K), else
        what the job asked for, else "auto"; `quality` is the job's (lower case, "auto" when
        unset); `provider` "" when unknown. Jobs on a user's own key are left out: the
        operator does not pay for those.
        """
        dialect = self._engine.dialect
        member = dialect.json_member
        width = f"CAST({member('o.value', 'width')} AS TEXT)"
        height = f"CAST({member('o.value', 'height')} AS TEXT)"
        rows = await self._read(
            f"""
            SELECT j.platform, COALESCE(j.provider, ''),
                   CASE WHEN COALESCE({width}, '0') NOT IN ('0', '')
                             AND COALESCE({height}, '0') NOT IN ('0', '')
                        THEN {width} || 'x' || {height}
                        ELSE COALESCE(NULLIF({member("j.options", "size")}, ''), 'auto') END,
                   LOWER(COALESCE(NULLIF({member("j.options", "quality")}, ''), 'auto')),
                   COUNT(*)
            FROM jobs AS j, {dialect.json_elements("j.outputs", "o")}
            WHERE j.created_at >= ? AND j.status = 'succeeded' AND j.own_key = 0
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            """,
            (since,),
        )
        return [(str(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4])) for row in rows]

    async def console_upstream_done(self, job_ids: list[int]) -> dict[int, float]:
        """When the upstream answered each of these jobs (those it did), to tell the time
        spent running upstream from the time delivering."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        rows = await self._read(
            f"SELECT id, upstream_done_at FROM jobs WHERE id IN ({marks})"
            " AND upstream_done_at IS NOT NULL",
            tuple(job_ids),
        )
        return {int(row[0]): float(row[1]) for row in rows}


async def overview(tx: Tx, dialect: Dialect, since: float) -> dict[str, Any]:
    """`console_overview` over any engine. Every query reads the window through
    `jobs_created`; what a job spent is its commit row."""
    per_hour = []
    platforms: dict[str, dict[str, int]] = {}

    def totals_of(platform: str) -> dict[str, int]:
        return platforms.setdefault(platform, {"jobs": 0, "succeeded": 0, "failed": 0, "spent": 0})

    # Per hour and platform in one pass; the platform totals are its sums.
    for hour, platform, jobs, succeeded, failed in await tx.fetch(
        f"""
        SELECT {dialect.hour_of("created_at")}, platform, COUNT(*),
               SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END),
               SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END)
        FROM jobs WHERE created_at >= ? GROUP BY 1, 2 ORDER BY 1
        """,
        since,
    ):
        per_hour.append((int(hour), platform, int(jobs)))
        totals = totals_of(platform)
        totals["jobs"] += int(jobs)
        totals["succeeded"] += int(succeeded or 0)
        totals["failed"] += int(failed or 0)
    for platform, spent in await tx.fetch(
        """
        SELECT j.platform, SUM(c.daily_amount + c.balance_amount)
        FROM jobs AS j JOIN ledger AS c ON c.job_id = j.id AND c.kind = 'commit'
        WHERE j.created_at >= ? GROUP BY j.platform
        """,
        since,
    ):
        totals_of(platform)["spent"] = int(spent or 0)
    durations = await tx.fetch(
        f"""
        SELECT COALESCE(provider, '?'), COALESCE({dialect.json_member("options", "size")}, ''),
               finished_at - created_at
        FROM jobs
        WHERE created_at >= ? AND status = 'succeeded' AND finished_at IS NOT NULL
        """,
        since,
    )
    failures = await tx.fetch(
        """
        SELECT COALESCE(error_kind, '?'), COUNT(*) FROM jobs
        WHERE created_at >= ? AND status = 'failed' GROUP BY 1 ORDER BY 2 DESC
        """,
        since,
    )
    # `+j.user_id`: grouping by the bare column makes SQLite walk all of jobs_user (every job
    # ever) to skip a sort, instead of the window through jobs_created.
    top_users = await tx.fetch(
        """
        SELECT u.platform || ':' || u.platform_user_id
               || CASE WHEN u.name <> '' THEN ' (' || u.name || ')' ELSE '' END,
               t.jobs, t.spent
        FROM (
            SELECT +j.user_id AS user_id, COUNT(*) AS jobs,
                   SUM(COALESCE(c.daily_amount + c.balance_amount, 0)) AS spent
            FROM jobs AS j LEFT JOIN ledger AS c ON c.job_id = j.id AND c.kind = 'commit'
            WHERE j.created_at >= ? GROUP BY 1 ORDER BY 2 DESC, 3 DESC LIMIT 10
        ) AS t JOIN users AS u ON u.id = t.user_id
        ORDER BY t.jobs DESC, t.spent DESC
        """,
        since,
    )
    top_groups = await tx.fetch(
        """
        SELECT j.group_key, COUNT(*), SUM(COALESCE(c.daily_amount + c.balance_amount, 0))
        FROM jobs AS j LEFT JOIN ledger AS c ON c.job_id = j.id AND c.kind = 'commit'
        WHERE j.created_at >= ? AND j.group_key IS NOT NULL
        GROUP BY j.group_key ORDER BY 2 DESC, 3 DESC LIMIT 10
        """,
        since,
    )
    return {
        "per_hour": per_hour,
        "platforms": platforms,
        "durations": [(row[0], row[1], row[2]) for row in durations],
        "failures": {row[0]: int(row[1]) for row in failures},
        "top_users": [(row[0], int(row[1]), int(row[2] or 0)) for row in top_users],
        "top_groups": [(row[0], int(row[1]), int(row[2] or 0)) for row in top_groups],
    }


async def jobs_page(
    tx: Tx, filters: dict[str, str], limit: int, offset: int
) -> tuple[list[Job], int]:
    """`console_jobs` over any engine."""
    where, params = _job_filters(filters)
    rows = await tx.fetch(
        JOB_SELECT + where + " ORDER BY j.id DESC LIMIT ? OFFSET ?", *params, limit, offset
    )
    count = await tx.fetch("SELECT COUNT(*) FROM jobs AS j" + where, *params)
    return [job_from_row(row) for row in rows], int(count[0][0])


def console_overview_sql(con: sqlite3.Connection, since: float) -> dict[str, Any]:
    """`Store.console_overview` on a plain sqlite3 connection (bench/console.py times it raw)."""
    from bot.store.sqlite import DIALECT, SqliteTx

    return run_now(overview(SqliteTx(con), DIALECT, since))


def console_jobs_sql(
    con: sqlite3.Connection, filters: dict[str, str], limit: int, offset: int
) -> tuple[list[Job], int]:
    """`Store.console_jobs` on a plain sqlite3 connection (bench/console.py times it raw)."""
    from bot.store.sqlite import SqliteTx

    return run_now(jobs_page(SqliteTx(con), filters, limit, offset))


def _job_filters(filters: dict[str, str]) -> tuple[str, tuple[Any, ...]]:
    """The console's job filters as a WHERE clause over `jobs AS j`."""
    clauses: list[str] = []
    params: list[Any] = []
    for name, column in (
        ("platform", "j.platform"),
        ("chat", "j.chat_id"),
        ("status", "j.status"),
        ("error_kind", "j.error_kind"),
        ("provider", "j.provider"),
    ):
        if value := filters.get(name, "").strip():
            clauses.append(f"{column} = ?")
            params.append(value)
    if user := filters.get("user", "").strip():
        if user.startswith("#") and user[1:].isdigit():
            clauses.append("j.user_id = ?")
            params.append(int(user[1:]))
        else:
            platform, sep, uid = user.partition(":")
            clauses.append(
                "j.user_id IN (SELECT id FROM users WHERE platform_user_id = ?"
                + (" AND platform = ?)" if sep else ")")
            )
            params.extend((uid, platform) if sep else (user,))
    for name, op in (("since", ">="), ("until", "<")):
        if value := filters.get(name, "").strip():
            clauses.append(f"j.created_at {op} ?")
            params.append(float(value))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", tuple(params)
