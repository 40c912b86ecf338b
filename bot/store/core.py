"""The Store: users, personal keys, credits, jobs, result messages, what relays can do.

One class over either engine (SQLite or PostgreSQL, see engine.py); the parts the console,
/group and /link, and several processes need are its mixins in console.py, accounts.py and
processes.py. Days are `datetime.date`s the caller computes in the configured timezone
(stored as ISO strings); instants are unix seconds (floats).

A job whose results were handed to the chat carries `jobs.charge` (what it is to be charged),
written before the hand-off: should its commit never be written (the database unreachable for
longer than the runner retries, then a stop), recovery commits that amount instead of
refunding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Set
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as dt_time
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.fernet import InvalidToken

from bot.batching import Batcher
from bot.secrets import KeyBox
from bot.store import ledger
from bot.store.accounts import AccountsMixin
from bot.store.console import ConsoleMixin
from bot.store.engine import Dialect, Engine, Tx
from bot.store.ledger import dumps, job_from_row
from bot.store.model import (
    FINAL_STATUSES,
    JOB_KINDS,
    ROLES,
    Credits,
    Job,
    NotFoundError,
    StoreError,
    User,
)
from bot.store.processes import ProcessesMixin
from bot.store.sql import (
    JOB_SELECT,
    SQL_FINISH_JOB,
    SQL_INSERT_JOB,
    SQL_MAKE_USER,
    SQL_MARK_CHARGE,
    SQL_MARK_RUNNING,
    SQL_USERS_OF,
    USER_SELECT,
)

log = logging.getLogger("bot.store")


class Store(AccountsMixin, ConsoleMixin, ProcessesMixin):
    """Async access to drawbridge's database (see the package docstring for the rules)."""

    def __init__(self, engine: Engine, keybox: KeyBox, admins: Set[tuple[str, str]]) -> None:
        super().__init__(engine, keybox, admins)
        # Reservations asked at the same moment, made together (`reserve`); each asked
        # once (the key's first member numbers the calls) and, while in flight, by job.
        self._reservations: Batcher[tuple[int, ledger.Ask], tuple[int, int | Exception]] = Batcher(
            self._reserve_batch, engine.dialect.reserve_batch
        )
        self._asked = 0
        self._reserving: dict[int, set[asyncio.Future[Any]]] = {}

    # --- lifecycle ---

    async def close(self) -> None:
        """Let reservations asked and transactions in flight finish, then close."""
        if not self._closed:
            await self._reservations.drained()
        await super().close()

    @classmethod
    async def open(
        cls, path: Path, *, keybox: KeyBox, admins: Set[tuple[str, str]] = frozenset()
    ) -> Store:
        """Open (creating if needed) the SQLite file at `path`, its schema brought up to date."""
        from bot.store.sqlite import SqliteEngine

        return cls(await SqliteEngine.open(Path(path)), keybox, admins)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        keybox: KeyBox,
        admins: Set[tuple[str, str]] = frozenset(),
        migrate: bool = True,
        full_pool: bool = False,
    ) -> Store:
        """Open the database `url` names (`sqlite:///path` or `postgresql://...`);
        `full_pool` opens every pooled PostgreSQL connection now (`drawbridge run`)."""
        return cls(await open_engine(url, migrate=migrate, full_pool=full_pool), keybox, admins)

    # --- users ---

    async def user(self, platform: str, platform_user_id: str, name: str = "") -> User:
        """Get or create the user; refresh the stored display name when `name` differs."""

        async def get_or_create(tx: Tx) -> Any:
            rows = await tx.fetch(
                USER_SELECT + " WHERE i.platform = ? AND i.platform_user_id = ?",
                platform,
                platform_user_id,
            )
            if rows and (not name or rows[0]["name"] == name):
                return rows[0]
            if self._closed:  # like every write: refused once close() has begun
                raise StoreError("store is closed")
            # One statement, so atomic without a transaction; also right when another process
            # created the same user a moment ago.
            created = await tx.fetch(
                SQL_MAKE_USER + " RETURNING id", platform, platform_user_id, name, time.time()
            )
            # Read back with its account (a linked identity whose name changed).
            return (await tx.fetch(USER_SELECT + " WHERE i.id = ?", created[0][0]))[0]

        # Every command starts here, and a new user (or a new name) would otherwise cost a
        # second trip to the database.
        return self._user(await self._engine.session(get_or_create))

    async def find_user(self, platform: str, ref: str) -> User | None:
        """Find a user by `ref`: an id on `platform`, `"platform:id"`, or the internal `"#id"`."""
        ref = ref.strip()
        if ref.startswith("#") and ref[1:].isdigit():
            rows = await self._read(USER_SELECT + " WHERE i.id = ?", (int(ref[1:]),))
            return self._user(rows[0]) if rows else None
        other, sep, uid = ref.partition(":")
        candidates = [(platform, ref)]
        if sep and other and uid:
            candidates.insert(0, (other.strip().lower(), uid.strip()))
        for candidate in candidates:
            rows = await self._read(
                USER_SELECT + " WHERE i.platform = ? AND i.platform_user_id = ?", candidate
            )
            if rows:
                return self._user(rows[0])
        return None

    async def set_role(self, user_id: int, role: str) -> None:
        """Store "user", "admin" or "banned" for one identity (`User.identity_id`: roles do
        not travel with /link). Config admins stay admin unless banned."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        await self._update_user(user_id, "UPDATE users SET role = ? WHERE id = ?", (role, user_id))

    async def set_daily_allowance(self, user_id: int, allowance: int | None) -> None:
        """Give the account a daily allowance of its own; None goes back to the configured
        one (`credits` and `reserve` use it in place of the `daily_allowance` they are given).
        """
        if allowance is not None and allowance < 0:
            raise ValueError("daily allowance must not be negative")
        await self._update_user(
            user_id, "UPDATE users SET daily_allowance = ? WHERE id = ?", (allowance, user_id)
        )

    async def set_key_probe(self, user_id: int, result: dict[str, Any] | None) -> None:
        """Remember the last probe of the account's key (None forgets it)."""
        await self._update_user(
            user_id,
            "UPDATE users SET key_probe = ? WHERE id = ?",
            (None if result is None else dumps(result), user_id),
        )

    async def set_lang(self, user_id: int, lang: str | None) -> None:
        """Remember the user's language; None goes back to the default."""
        await self._update_user(user_id, "UPDATE users SET lang = ? WHERE id = ?", (lang, user_id))

    # --- personal keys ---

    async def set_api_key(self, user_id: int, api_key: str) -> None:
        """Store the user's own API key, encrypted."""
        token = self._keybox.encrypt(api_key)
        # When it was bound: of two linked accounts' keys, the newer is kept.
        await self._update_user(
            user_id,
            "UPDATE users SET api_key_enc = ?, key_set_at = ? WHERE id = ?",
            (token, time.time(), user_id),
        )

    async def get_api_key(self, user_id: int) -> str | None:
        """The user's own API key, or None (none set, or not readable with this secret)."""
        rows = await self._read("SELECT api_key_enc FROM users WHERE id = ?", (user_id,))
        if not rows or rows[0][0] is None:
            return None
        try:
            return self._keybox.decrypt(bytes(rows[0][0]))
        except InvalidToken:
            log.warning(
                "user #%d has a stored API key this secret cannot decrypt "
                "(DRAWBRIDGE_SECRET_KEY or secret.key changed?)",
                user_id,
            )
            return None

    async def clear_api_key(self, user_id: int) -> bool:
        """Forget the user's own key; False if there was none."""
        changed = await self._execute(
            "UPDATE users SET api_key_enc = NULL WHERE id = ? AND api_key_enc IS NOT NULL",
            (user_id,),
        )
        return changed == 1

    # --- credits ---

    async def credits(self, user_id: int, day: date, daily_allowance: int) -> Credits:
        """The user's allowance used on `day` and granted balance."""
        rows = await self._read(
            """
            SELECT u.granted,
                   COALESCE((SELECT used FROM daily_usage WHERE user_id = u.id AND day = ?), 0),
                   u.daily_allowance
            FROM users AS u WHERE u.id = ?
            """,
            (day.isoformat(), user_id),
        )
        if not rows:
            raise NotFoundError(f"no user #{user_id}")
        own = rows[0][2]
        return Credits(
            daily_allowance=max(0, daily_allowance if own is None else own),
            daily_used=rows[0][1],
            balance=rows[0][0],
        )

    async def group_used(self, group_key: str, day: date) -> int:
        """Credits the group's jobs hold on `day` (reserved or spent), for the group cap."""
        rows = await self._read(
            "SELECT used FROM group_usage WHERE group_key = ? AND day = ?",
            (group_key, day.isoformat()),
        )
        return int(rows[0][0]) if rows else 0

    async def grant(
        self, user_id: int, amount: int, *, by_user_id: int | None = None, note: str = ""
    ) -> int:
        """Add `amount` (may be negative) to the granted balance; returns the new balance.

        The balance never goes below 0: a larger negative grant is clamped, and the ledger
        records the amount actually taken.
        """
        for_update = self.for_update
        return await self._write(
            lambda tx: ledger.grant(tx, for_update, user_id, amount, by_user_id, note)
        )

    # --- jobs and the ledger ---

    async def create_job(
        self,
        *,
        user_id: int,
        platform: str,
        chat_id: str,
        group_key: str | None,
        kind: str,
        prompt: str,
        options: dict[str, Any],
        ref_count: int,
        own_key: bool,
    ) -> int:
        """Record a new queued job (this process's, see `start_process`); returns its id."""
        row = self._new_job(
            user_id, platform, chat_id, group_key, kind, prompt, options, ref_count, own_key
        )
        rows = await self._fetch_write(SQL_INSERT_JOB, row)
        return int(rows[0][0])

    def _new_job(
        self,
        user_id: int,
        platform: str,
        chat_id: str,
        group_key: str | None,
        kind: str,
        prompt: str,
        options: dict[str, Any],
        ref_count: int,
        own_key: bool,
    ) -> tuple[Any, ...]:
        """SQL_INSERT_JOB's parameters for a new queued job of this process."""
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        return (
            user_id,
            platform,
            chat_id,
            group_key,
            kind,
            prompt,
            dumps(options),
            ref_count,
            int(own_key),
            time.time(),
            self.process_id,
        )

    def open_job(
        self,
        *,
        user_id: int,
        platform: str,
        chat_id: str,
        group_key: str | None,
        kind: str,
        prompt: str,
        options: dict[str, Any],
        ref_count: int,
        own_key: bool,
        cost: int,
        day: date,
        daily_allowance: int,
        charged_group: str | None = None,
        group_cap: int = 0,
    ) -> asyncio.Future[tuple[int, int | Exception]]:
        """`create_job` and `reserve` in one transaction: the new job's id, and what the
        reservation left or the refusal `reserve` would raise (the job then stays queued,
        for the caller to record why). `charged_group` is `reserve`'s `group_key`.

        A job that needs nothing between the two (no image to download) costs one store
        step instead of two, and one transaction for a burst's commands asked together.
        Asked now, answered by the future: no task behind it, so a burst's commands add no
        loop step of their own. The future raises (recording nothing) only when the job
        itself could not be written; a caller that gives up on it must not cancel it.
        """
        row = self._new_job(
            user_id, platform, chat_id, group_key, kind, prompt, options, ref_count, own_key
        )
        ask = ledger.Ask(
            0, user_id, cost, day.isoformat(), daily_allowance, charged_group, group_cap, row
        )
        return self._ask(ask)

    async def reserve(
        self,
        job_id: int,
        *,
        user_id: int,
        cost: int,
        day: date,
        daily_allowance: int,
        group_key: str | None = None,
        group_cap: int = 0,
    ) -> int:
        """Take `cost` credits for the job: today's free allowance first, then the balance;
        returns the credits the user has left after it (allowance and balance).

        All or nothing, in one transaction. With `group_key`, `cost` also counts against the
        group's usage for `day`, and `group_cap > 0` (or the group's own lower cap, set with
        /group) refuses beyond it. Raises `GroupCapReachedError` or
        `InsufficientCreditsError` (charging nothing), and `ReservationError` if the job was
        already reserved (charging nothing again). A cost of 0 (the user's own key) still
        records a reservation, so the job settles like any other.

        Reservations asked at the same moment (a burst's commands) are made together, in one
        transaction, each as if alone and in the order asked (`ledger.reserve_many`;
        PostgreSQL's `drawbridge_open_many`, one round trip). A
        caller cancelled meanwhile does not undo its reservation: `refund` waits for it.
        """
        ask = ledger.Ask(
            job_id, user_id, cost, day.isoformat(), daily_allowance, group_key, group_cap
        )
        # Shielded: a caller cancelled meanwhile leaves the reservation to land.
        _, outcome = await asyncio.shield(self._ask(ask))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _ask(self, ask: ledger.Ask) -> asyncio.Future[tuple[int, int | Exception]]:
        """Queue `ask` with the reservations asked at this moment; the future answers its
        job's id and what it left, or its refusal, and raises when its new job could not be
        written."""
        if ask.cost < 0:
            raise ValueError("cost must not be negative")
        if self._closed:
            raise StoreError("store is closed")
        self._asked += 1
        answer = self._reservations.ask((self._asked, ask))
        if ask.job is None:
            # A refund of this job waits for the answer (its caller may be cancelled first).
            self._reserving.setdefault(ask.job_id, set()).add(answer)
        answer.add_done_callback(lambda done: self._reserved(ask.job_id, done))
        return answer  # type: ignore[return-value]  # a batch answers every key it is asked

    def _reserved(self, job_id: int, answer: asyncio.Future[Any]) -> None:
        answers = self._reserving.get(job_id)
        if answers is not None:
            answers.discard(answer)
            if not answers:
                del self._reserving[job_id]
        if not answer.cancelled():
            answer.exception()  # its caller may be gone: nobody else would retrieve it

    async def _reserve_batch(
        self, keys: list[tuple[int, ledger.Ask]]
    ) -> dict[tuple[int, ledger.Ask], tuple[int, int | Exception] | Exception]:
        asks = [ask for _, ask in keys]
        if len(asks) > 1:
            try:
                if self._engine.dialect.open_many_call is not None:
                    decided = await self._open_many(asks)
                else:
                    decided = await self._write(
                        partial(_open_and_reserve, self._engine.dialect, asks)
                    )
                return dict(zip(keys, decided, strict=True))
            except Exception:
                # A write refused under us (another process's reservation of a group's first
                # job, a lost connection): each one alone, so each error is its own.
                log.debug("%d reservations together failed; one by one", len(asks), exc_info=True)
        found: dict[tuple[int, ledger.Ask], tuple[int, int | Exception] | Exception] = {}
        for key, ask in zip(keys, asks, strict=True):
            try:
                if ask.job is not None:
                    rows = await self._fetch_write(SQL_INSERT_JOB, ask.job)
                    ask = replace(ask, job_id=int(rows[0][0]), job=None)
            except Exception as error:
                found[key] = error  # no job: nothing to say it was refused on
                continue
            try:
                found[key] = (ask.job_id, await self._reserve_alone(ask))
            except Exception as error:
                found[key] = (ask.job_id, error)
        return found

    async def _open_many(self, asks: list[ledger.Ask]) -> list[tuple[int, int | Exception]]:
        """`_open_and_reserve` as the engine's one server-side call (`Dialect.open_many_call`)."""
        call = self._engine.dialect.open_many_call
        assert call is not None
        new_jobs: list[tuple[Any, ...]] = []
        for ask in asks:
            if ask.job is None:
                new_jobs.append((None,) * 10)
            else:
                # The job's owner is the ask's user (`open_job` writes both from one id).
                assert ask.job[0] == ask.user_id, "a new job belongs to its ask's user"
                new_jobs.append(ask.job[1:])
        params = (
            [0 if ask.job is not None else ask.job_id for ask in asks],
            [ask.user_id for ask in asks],
            [ask.cost for ask in asks],
            [ask.iso_day for ask in asks],
            [ask.daily_allowance for ask in asks],
            [ask.group_key for ask in asks],
            [ask.group_cap for ask in asks],
            time.time(),
            *(list(column) for column in zip(*new_jobs, strict=True)),
        )
        rows = sorted(await self._write_one(call, params), key=lambda row: row[0])
        decided: list[tuple[int, int | Exception]] = []
        for ask, (_, job_id, outcome, number, detail) in zip(asks, rows, strict=True):
            if outcome == "ok":
                decided.append((int(job_id), int(number)))
            else:
                refused = ledger.refusal(
                    outcome,
                    job_id=int(job_id),
                    user_id=ask.user_id,
                    cost=ask.cost,
                    number=number,
                    detail=detail,
                )
                decided.append((int(job_id), refused))
        return decided

    async def _reserve_alone(self, ask: ledger.Ask) -> int:
        dialect = self._engine.dialect
        if dialect.reserve_call is not None:
            # The same rule run server-side: one round trip instead of five on PostgreSQL.
            params = (
                ask.job_id,
                ask.user_id,
                ask.cost,
                ask.iso_day,
                ask.daily_allowance,
                ask.group_key,
                ask.group_cap,
                time.time(),
            )
            try:
                rows = await self._write_one(dialect.reserve_call, params)
            except Exception as error:
                refused = dialect.reserve_refused(error)
                if refused is None:
                    raise
                outcome, number, detail = refused
            else:
                outcome, number, detail = rows[0]
            if outcome != "ok":
                raise ledger.refusal(
                    outcome,
                    job_id=ask.job_id,
                    user_id=ask.user_id,
                    cost=ask.cost,
                    number=number,
                    detail=detail,
                )
            # 'ok' carries what the reservation left since migration 12 (applied at open).
            assert number is not None, "drawbridge_reserve from before migration 12"
            return int(number)
        return await self._write(partial(ledger.reserve, for_update=self.for_update, ask=ask))

    async def commit(self, job_id: int, amount: int | None = None) -> bool:
        """Make the job's reservation final (spent); False if it is not reserved.

        With `amount` (0 <= amount <= what was reserved), only that much is spent and the rest
        is refunded in the same transaction, as if the job had reserved `amount` from the
        start: the spent part is the daily allowance first, so the balance is what comes back
        first. Safe to call again (a settled reservation is final), so a caller may retry it.
        Raises `ValueError` (changing nothing) for an amount outside that range.
        """
        if amount is not None and amount < 0:
            raise ValueError("amount must not be negative")
        whole = self._engine.dialect.commit_whole
        # The usual case, all of it kept, in one statement where the engine can (no
        # transaction around it: one round trip instead of four on PostgreSQL); a partial
        # commit, or a reservation already settled, goes through the rule.
        if whole is not None and await self._write_one(whole, (job_id, amount, time.time(), "")):
            return True
        return await self._write(lambda tx: ledger.commit(tx, job_id, "", amount))

    async def refund(self, job_id: int, reason: str) -> bool:
        """Give back everything the job's reservation took; False if it is not reserved.

        The daily part goes back to the reservation's day (so it only helps the user if that
        day is still today), the balance part to the granted balance, and the group usage to
        the group. Never twice: a refunded or committed reservation is final. A reservation
        of the job still being made (its caller cancelled) is waited for first.
        """
        if pending := self._reserving.get(job_id):
            await asyncio.wait(list(pending))
        return await self._write(lambda tx: ledger.refund(tx, job_id, reason))

    async def mark_delivering(
        self, job_id: int, charge: int, *, eta_class: str | None = None
    ) -> None:
        """Record what the job is to be charged, just before its results go to the chat.

        If the process stops before the commit is written, recovery commits `charge` rather
        than refunding: the user most likely has the images. With `eta_class` (the jobs it is
        like), also that the upstream answered now, for the estimates of later jobs: one write
        of the job's row.
        """
        if charge < 0:
            raise ValueError("charge must not be negative")
        answered = time.time() if eta_class is not None else None
        await self._execute(SQL_MARK_CHARGE, (charge, answered, eta_class, job_id))

    async def mark_running(self, job_id: int, provider: str) -> None:
        """The job was handed to `provider` (again, when falling back to another one)."""
        await self._execute(SQL_MARK_RUNNING, (provider, time.time(), job_id))

    async def finish_job(
        self,
        job_id: int,
        *,
        status: str,
        error_kind: str | None = None,
        error_detail: str | None = None,
        usage: dict[str, Any] | None = None,
        revised_prompt: str | None = None,
        outputs: list[dict[str, Any]] | None = None,
        provider: str | None = None,
    ) -> None:
        """Record the job's outcome; does nothing unless it is still queued or running."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final job status")
        await self._execute(
            SQL_FINISH_JOB,
            (
                status,
                error_kind,
                error_detail,
                None if usage is None else dumps(usage),
                revised_prompt,
                dumps(outputs or []),
                provider,
                time.time(),
                job_id,
            ),
        )

    async def job(self, job_id: int) -> Job | None:
        """The job, or None."""
        rows = await self._read(JOB_SELECT + " WHERE j.id = ?", (job_id,))
        return job_from_row(rows[0]) if rows else None

    async def active_jobs(self, user_id: int) -> list[Job]:
        """The user's queued and running jobs, oldest first."""
        rows = await self._read(
            JOB_SELECT + " WHERE j.user_id = ? AND j.status IN ('queued', 'running') ORDER BY j.id",
            (user_id,),
        )
        return [job_from_row(row) for row in rows]

    # --- result messages ---

    async def remember_message(
        self, platform: str, chat_id: str, message_id: str, job_id: int
    ) -> None:
        """Record that a sent message shows the job's result (for replies and buttons; any
        process serving the same platform account finds it)."""
        await self._execute(
            """
            INSERT INTO messages (platform, chat_id, message_id, job_id, created_at)
            VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (platform, chat_id, message_id) DO UPDATE SET job_id = excluded.job_id
            """,
            (platform, str(chat_id), str(message_id), job_id, time.time()),
        )

    async def message_job(self, platform: str, chat_id: str, message_id: str) -> int | None:
        """The job whose result the message shows, or None if it is not one of ours."""
        rows = await self._read(
            "SELECT job_id FROM messages WHERE platform = ? AND chat_id = ? AND message_id = ?",
            (platform, str(chat_id), str(message_id)),
        )
        return int(rows[0][0]) if rows else None

    # --- provider capabilities ---

    async def provider_capabilities(self, provider: str) -> dict[str, Any]:
        """What was learned about a provider (a JSON object; empty when nothing is known)."""
        rows = await self._read(
            "SELECT data FROM provider_capabilities WHERE provider = ?", (provider,)
        )
        if not rows:
            return {}
        value = json.loads(rows[0][0])
        return value if isinstance(value, dict) else {}

    async def update_provider_capabilities(
        self, provider: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge `changes` into a provider's learned capabilities; returns the whole object.

        One statement, so two processes learning at once cannot lose an update. A key whose
        value is None is removed.
        """
        merge = self._engine.dialect.json_merge
        rows = await self._fetch_write(
            f"""
            INSERT INTO provider_capabilities (provider, data, updated_at)
            VALUES (?1, {merge("'{}'", "?2")}, ?3)
            ON CONFLICT (provider) DO UPDATE
                SET data = {merge("provider_capabilities.data", "?2")}, updated_at = ?3
            RETURNING data
            """,
            (provider, dumps(changes), time.time()),
        )
        value = json.loads(rows[0][0]) if rows else {}
        return value if isinstance(value, dict) else {}

    # --- numbers ---

    async def stats(self, day: date, *, tz: tzinfo | None = None) -> dict[str, Any]:
        """Numbers for the admin about `day` (a date in `tz`, UTC if None).

        Keys: `users`; `jobs_today` (all jobs created that day, refused ones included) with
        `jobs_by_status`, `succeeded_today` and `failed_today`; `images_today` (delivered
        by jobs created that day); `credits_today` (committed for reservations of that day)
        and `credits_reserved_today` (still in flight); `jobs_running`, `jobs_queued` (now).
        """
        start = datetime.combine(day, dt_time(0), tz or UTC).timestamp()
        end = datetime.combine(day + timedelta(days=1), dt_time(0), tz or UTC).timestamp()
        length = self._engine.dialect.json_length("outputs")
        rows = await self._read(
            f"""
            SELECT status, COUNT(*),
                   SUM(CASE WHEN status = 'succeeded' THEN {length} END)
            FROM jobs WHERE created_at >= ? AND created_at < ? GROUP BY status
            """,
            (start, end),
        )
        by_status: dict[str, int] = {row[0]: int(row[1]) for row in rows}
        # Committed credits come from the commit rows: a partial commit spent less than it
        # reserved.
        credit_rows = await self._read(
            """
            SELECT 'committed', SUM(daily_amount + balance_amount)
            FROM ledger WHERE kind = 'commit' AND day = ?
            UNION ALL
            SELECT 'reserved', SUM(daily_amount + balance_amount)
            FROM reservations WHERE state = 'reserved' AND day = ?
            """,
            (day.isoformat(), day.isoformat()),
        )
        by_state: dict[str, int] = {row[0]: int(row[1] or 0) for row in credit_rows}
        counts = await self._read(
            """
            SELECT (SELECT COUNT(*) FROM users),
                   (SELECT COUNT(*) FROM jobs WHERE status = 'running'),
                   (SELECT COUNT(*) FROM jobs WHERE status = 'queued')
            """,
        )
        users, running, queued = (int(value) for value in counts[0])
        return {
            "day": day.isoformat(),
            "users": users,
            "jobs_today": sum(by_status.values()),
            "jobs_by_status": by_status,
            "succeeded_today": by_status.get("succeeded", 0),
            "failed_today": by_status.get("failed", 0),
            "images_today": sum(int(row[2] or 0) for row in rows),
            "credits_today": by_state.get("committed", 0),
            "credits_reserved_today": by_state.get("reserved", 0),
            "jobs_running": running,
            "jobs_queued": queued,
        }

    async def ledger_sum(self, user_id: int) -> int:
        """Net credits the user's jobs hold: reserved minus refunded (committed or in flight)."""
        rows = await self._read(
            """
            SELECT COALESCE(SUM(CASE kind WHEN 'reserve' THEN daily_amount + balance_amount
                                          WHEN 'refund' THEN -(daily_amount + balance_amount)
                                          ELSE 0 END), 0)
            FROM ledger WHERE user_id = ?
            """,
            (user_id,),
        )
        return int(rows[0][0])

    # --- ETA: upstream timings per job class (issue 14, "An honest ETA") ---

    async def upstream_durations(self, eta_class: str, limit: int) -> list[float]:
        """Upstream seconds of the last `limit` successful jobs of a class, oldest first."""
        rows = await self._read(
            """
            SELECT upstream_done_at - started_at FROM jobs
            WHERE eta_class = ? AND status = 'succeeded'
              AND upstream_done_at IS NOT NULL AND started_at IS NOT NULL
            ORDER BY id DESC LIMIT ?
            """,
            (eta_class, limit),
        )
        return [max(0.0, float(row[0])) for row in reversed(rows)]

    # --- many commands at once (issue 15: a burst's reads, one statement for all) ---

    async def users_found(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], User]:
        """The users among these `(platform, platform user id)` pairs that exist, in one read
        (`user` reads one, and creates it when missing)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        rows = []
        # One statement text however many users (PostgreSQL prepares it once), a read per
        # platform the batch holds (one, nearly always).
        for platform in dict.fromkeys(platform for platform, _ in unique):
            ids = [uid for p, uid in unique if p == platform]
            rows += await self._read(
                SQL_USERS_OF + self._engine.dialect.json_texts, (platform, dumps(ids))
            )
        return {(row["platform"], row["platform_user_id"]): self._user(row) for row in rows}

    async def users_made(
        self, keys: list[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], User]:
        """`user` for many `(platform, platform user id, name)` at once: each created, or its
        name refreshed, as `user` would, in one transaction (a burst of new users)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        now = time.time()
        texts = self._engine.dialect.json_texts
        # Each user once, with the name it would end with were they made one after another
        # (the last one given; an empty one keeps the name before it), in key order: the
        # order every writer locks them in.
        names: dict[tuple[str, str], str] = {}
        for platform, user_id, name in unique:
            if name or (platform, user_id) not in names:
                names[(platform, user_id)] = name
        writes = [(*user, name, now) for user, name in sorted(names.items())]

        async def make(tx: Tx) -> list[Any]:
            await tx.execute_many(SQL_MAKE_USER, writes)
            rows: list[Any] = []
            for platform in dict.fromkeys(platform for platform, _, _ in unique):
                ids = list(dict.fromkeys(uid for p, uid, _ in unique if p == platform))
                rows += await tx.fetch(SQL_USERS_OF + texts, platform, dumps(ids))
            return rows

        made = {
            (row["platform"], row["platform_user_id"]): self._user(row)
            for row in await self._write(make)
        }
        return {key: made[key[:2]] for key in unique if key[:2] in made}

    async def credits_of(
        self, user_ids: list[int], day: date, daily_allowance: int
    ) -> dict[int, Credits]:
        """`credits` of several users in one read; users that do not exist are absent."""
        unique = list(dict.fromkeys(user_ids))
        if not unique:
            return {}
        rows = await self._read(
            """
            SELECT u.id, u.granted, COALESCE(d.used, 0), u.daily_allowance
            FROM users AS u LEFT JOIN daily_usage AS d ON d.user_id = u.id AND d.day = ?
            WHERE u.id IN """
            + self._engine.dialect.json_ints,
            (day.isoformat(), dumps(unique)),
        )
        return {
            int(row[0]): Credits(
                daily_allowance=max(0, daily_allowance if row[3] is None else row[3]),
                daily_used=row[2],
                balance=row[1],
            )
            for row in rows
        }


async def _open_and_reserve(
    dialect: Dialect, asks: list[ledger.Ask], tx: Tx
) -> list[tuple[int, int | Exception]]:
    """Write the asks' new jobs (`Store.open_job`), then reserve for all of them, in one
    transaction: each job's id, and what its reservation left or why it was refused."""
    asks = list(asks)  # its own copy: a batch rolled back is retried from the asks as asked
    new = [index for index, ask in enumerate(asks) if ask.job is not None]
    fresh: set[int] = set()
    if new:
        made = await tx.fetch_many(SQL_INSERT_JOB, [asks[i].job or () for i in new])
        for index, rows in zip(new, made, strict=True):
            asks[index] = replace(asks[index], job_id=int(rows[0][0]), job=None)
            fresh.add(asks[index].job_id)
    decided = await ledger.reserve_many(tx, dialect, asks, fresh)
    return [(ask.job_id, outcome) for ask, outcome in zip(asks, decided, strict=True)]


async def open_engine(url: str, *, migrate: bool = True, full_pool: bool = False) -> Engine:
    """The engine a database URL names: `sqlite:///path` (or a bare path) or `postgresql://`
    (`full_pool`: its pool's connections all opened now, not on first demand)."""
    if url.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
        from bot.store.postgres import PostgresEngine

        return await PostgresEngine.open(url, migrate=migrate, full=full_pool)
    from bot.store.sqlite import SqliteEngine

    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if url.startswith("sqlite://") and not url.startswith("sqlite:///"):
        raise ValueError(f"a SQLite URL is sqlite:///path/to/file, not {url!r}")
    return await SqliteEngine.open(Path(path), migrate=migrate)
