"""Several drawbridge processes on one database: heartbeats, recovery, shared provider slots.

Each `drawbridge run` registers itself (`start_process`) and beats (`heartbeat`) while it
runs; its jobs carry its id. Recovery settles only the jobs of processes that are gone: ones
that stopped cleanly (`stop_process`), and ones whose last heartbeat is older than
DRAWBRIDGE_PROCESS_TIMEOUT. It never touches a live process's jobs. A pid is no proof of
death: containers sharing a host name (host networking) each have their own pid 1; only a
Store closed inside this very OS process without a clean stop is known dead at once.

A provider's `concurrency` counts the requests of all processes together: a request holds a
row of `provider_slots` (provider, slot < concurrency) while it runs. A dead process's rows
stop counting once its heartbeat is stale, and are taken over then.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bot.store import ledger
from bot.store.base import StoreBase
from bot.store.engine import Row, Tx
from bot.store.ledger import dumps
from bot.store.sql import SQL_RELEASE_SLOT

log = logging.getLogger("bot.store")

DEFAULT_PROCESS_TIMEOUT = 60.0

# Processes (`start_process` ids) whose Store is open in this very OS process. A row written
# by this OS process (`_INSTANCE`) that is not here belongs to a Store closed without a clean
# stop (its last writes failed): dead, without waiting out the timeout.
_OPEN_HERE: set[str] = set()
_INSTANCE = uuid.uuid4().hex[:12]


def this_host() -> str:
    """This machine, as processes on it name it: the host name and this boot's id (a name
    alone may repeat across machines; a boot id does not)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}" if boot else socket.gethostname()


def this_instance() -> str:
    """This OS process, as its rows in `processes` name it: the machine and a random token."""
    return f"{this_host()}#{_INSTANCE}"


class ProcessesMixin(StoreBase):
    process_timeout: float = DEFAULT_PROCESS_TIMEOUT

    async def start_process(
        self,
        platforms: str = "",
        *,
        timeout: float = DEFAULT_PROCESS_TIMEOUT,  # noqa: ASYNC109 (seconds of silence, not a deadline)
    ) -> str:
        """Register this process (its jobs will carry the returned id) and beat once."""
        self.process_timeout = timeout
        process_id = uuid.uuid4().hex
        now = time.time()
        await self._execute(
            "INSERT INTO processes (id, host, pid, platforms, started_at, heartbeat_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (process_id, this_instance(), os.getpid(), platforms, now, now),
        )
        self.process_id = process_id
        _OPEN_HERE.add(process_id)
        return process_id

    async def close(self) -> None:
        if self.process_id is not None:
            _OPEN_HERE.discard(self.process_id)
        await super().close()

    async def heartbeat(self) -> None:
        """Say this process is alive."""
        if self.process_id is not None:
            await self._execute(
                "UPDATE processes SET heartbeat_at = ? WHERE id = ?",
                (time.time(), self.process_id),
            )

    async def stop_process(self) -> None:
        """Say this process stopped cleanly: its leftover jobs may be recovered at once."""
        if self.process_id is not None:
            await self._execute(
                "UPDATE processes SET stopped_at = ? WHERE id = ?", (time.time(), self.process_id)
            )
            await self._execute(
                "DELETE FROM provider_slots WHERE process_id = ?", (self.process_id,)
            )

    async def processes(self) -> list[dict[str, Any]]:
        """Every registered process, newest first, with `alive` as recovery judges it."""
        rows = await self._read("SELECT * FROM processes ORDER BY started_at DESC")
        dead = set(self._dead(rows, time.time()))
        return [{**dict(row), "alive": row["id"] not in dead} for row in rows]

    async def recover(self, *, timeout: float | None = None) -> list[int]:  # noqa: ASYNC109
        """Settle what dead processes left behind; returns the ids of the interrupted jobs.

        Jobs of no process (the CLI, tests, a database from before migration 10) count as
        left behind too. A queued or running job whose results were handed to the chat
        (`mark_delivering`) becomes succeeded and is charged what it recorded; every other
        queued or running job becomes failed ("interrupted") and its reservation is
        refunded. A finished job whose reservation was never settled is settled by its
        outcome: committed if it succeeded (its recorded charge, if any), refunded otherwise.
        """
        limit = self.process_timeout if timeout is None else timeout
        me = self.process_id

        async def settle(tx: Tx) -> list[int]:
            rows = await tx.fetch("SELECT * FROM processes WHERE id <> ?", me or "")
            dead = self._dead(rows, time.time(), limit)
            interrupted = await ledger.settle_orphans(tx, dead, include_unowned=True)
            if dead:
                # Their slots are free now, and the rows of stale processes go (the jobs keep
                # the id, for the record).
                marks = ", ".join("?" * len(dead))
                await tx.execute(f"DELETE FROM provider_slots WHERE process_id IN ({marks})", *dead)
                await tx.execute(f"DELETE FROM processes WHERE id IN ({marks})", *dead)
            return interrupted

        interrupted = await self._write(settle)
        if interrupted:
            log.info("recovered %d interrupted job(s)", len(interrupted))
        return interrupted

    def _dead(self, rows: list[Row], now: float, timeout: float | None = None) -> list[str]:
        limit = self.process_timeout if timeout is None else timeout
        here = this_instance()
        dead = []
        for row in rows:
            if row["id"] == self.process_id:
                continue
            if (
                row["stopped_at"] is not None
                or row["heartbeat_at"] < now - limit
                or (row["host"] == here and row["id"] not in _OPEN_HERE)
            ):
                dead.append(row["id"])
        return dead

    # --- provider slots: `concurrency` across every process ---

    async def acquire_slot(self, provider: str, capacity: int, job_id: int | None) -> int | None:
        """Take a free slot of `provider` (0 <= slot < capacity) for this process; None when
        all are taken by live processes. Slots of dead processes are taken over."""
        return (await self.acquire_slots(provider, capacity, [job_id]))[0]

    async def acquire_slots(
        self, provider: str, capacity: int, job_ids: Sequence[int | None]
    ) -> list[int | None]:
        """`acquire_slot` for several jobs in one transaction: each job's slot, or None.

        A burst's jobs starting together take their slots with three statements, not three
        each: on PostgreSQL fifty jobs were fifty transactions through the pool, and on SQLite
        fifty savepoints in the writer's queue, in front of every job's upstream request.
        """
        if self.process_id is None:
            raise RuntimeError("acquire_slot needs start_process first")
        me = self.process_id
        stale_before = time.time() - self.process_timeout

        async def take(tx: Tx) -> list[int | None]:
            # Slots of processes gone quiet are free again; never this process's own (it is
            # running this: a late heartbeat of its own, a busy loop, proves nothing).
            await tx.execute(
                """
                DELETE FROM provider_slots WHERE provider = ? AND process_id <> ?
                AND process_id NOT IN (
                    SELECT id FROM processes WHERE stopped_at IS NULL AND heartbeat_at >= ?)
                """,
                provider,
                me,
                stale_before,
            )
            taken = {
                int(row[0])
                for row in await tx.fetch(
                    "SELECT slot FROM provider_slots WHERE provider = ?", provider
                )
            }
            slots: list[int | None] = [None] * len(job_ids)
            waiting = list(range(len(job_ids)))
            now = time.time()
            # Another process may take a slot this one found free, meanwhile: its row stays,
            # ours is not written (DO NOTHING), and the jobs left try the slots not tried yet,
            # as one job at a time would.
            while waiting:
                free = [slot for slot in range(capacity) if slot not in taken][: len(waiting)]
                if not free:
                    break
                taken.update(free)
                # One statement text for any number of slots: a burst's batches of every
                # size reuse what each connection prepared (a VALUES list per size was a new
                # statement to prepare, and to keep, each time). Inserted in slot order, as
                # every process does: two taking the same slots never wait on each other's.
                chosen = list(zip(free, waiting, strict=False))
                added = await tx.fetch(
                    "INSERT INTO provider_slots (provider, slot, process_id, job_id, taken_at)"
                    f" SELECT ?, p.a, ?, p.b, ? FROM {self._engine.dialect.json_int_pairs} AS p"
                    " WHERE true ORDER BY p.a"
                    " ON CONFLICT (provider, slot) DO NOTHING RETURNING slot",
                    provider,
                    me,
                    now,
                    dumps([slot for slot, _ in chosen]),
                    dumps([job_ids[index] for _, index in chosen]),
                )
                got = {int(row[0]) for row in added}
                for slot, index in zip(free, waiting, strict=False):
                    if slot in got:
                        slots[index] = slot
                waiting = [index for index in waiting if slots[index] is None]
            return slots

        return await self._write(take)

    async def release_slot(self, provider: str, slot: int) -> None:
        """Give back a slot `acquire_slot` took."""
        await self._execute(SQL_RELEASE_SLOT, (provider, slot, self.process_id))
