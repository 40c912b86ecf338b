"""Groups' own rules (/group) and linked accounts (/link): one wallet across platforms.

Linked identities share one account: one users row holds the money, key and language, and
every identity's `account_id` points at it (NULL: the identity is its own). Joining two
accounts moves the balance and the day's used allowance in 'transfer' rows, a pair per
movement (out of one row, into the other: signed amounts that sum to 0), only while no job of
the joining account is in flight, so no reservation is ever settled against a row that no
longer holds the account.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from datetime import date
from typing import Any

from bot.groups import GroupRules
from bot.store import ledger
from bot.store.base import StoreBase
from bot.store.engine import Tx
from bot.store.ledger import dumps
from bot.store.model import (
    LINK_CODE_ALPHABET,
    LINK_CODE_LENGTH,
    LINK_CODE_TTL,
    LinkRefused,
    LinkResult,
    normalize_code,
)

_GROUP_RULES = frozenset({"enabled", "size", "quality", "cap", "cooldown"})


class AccountsMixin(StoreBase):
    # --- groups (/group) ---

    async def group_rules(self, group_key: str) -> GroupRules:
        """The group's own rules (the defaults when its admins never set any)."""
        return (await self.group_rules_of([group_key]))[group_key]

    async def group_rules_of(self, group_keys: Sequence[str]) -> dict[str, GroupRules]:
        """`group_rules` for several groups in one statement (a burst's commands)."""
        if not group_keys:
            return {}
        # One statement text for any number of groups (prepared once per connection).
        rows = await self._read(
            "SELECT * FROM group_rules WHERE group_key IN " + self._engine.dialect.json_texts,
            (dumps(list(group_keys)),),
        )
        found = {
            row["group_key"]: GroupRules(
                enabled=bool(row["enabled"]),
                size=row["size"],
                quality=row["quality"],
                cap=row["cap"],
                cooldown=row["cooldown"],
            )
            for row in rows
        }
        return {key: found.get(key, GroupRules()) for key in group_keys}

    async def set_group_rule(
        self, group_key: str, name: str, value: Any, *, by_user_id: int | None = None
    ) -> GroupRules:
        """Set one rule (`enabled`, `size`, `quality`, `cap`, `cooldown`); returns them all.

        None clears `size`, `quality` and `cap`. One statement: two admins at once each
        change only their own rule.
        """
        if name not in _GROUP_RULES:
            raise ValueError(f"unknown group rule {name!r}")
        if name == "enabled":
            value = int(bool(value))
        elif name == "cooldown":
            value = int(value or 0)
        # The column name comes from the fixed set above, never from the caller's text.
        await self._execute(
            f"""
            INSERT INTO group_rules (group_key, {name}, updated_at, updated_by)
            VALUES (?1, ?2, ?3, ?4)
            ON CONFLICT (group_key) DO UPDATE
                SET {name} = ?2, updated_at = ?3, updated_by = ?4
            """,
            (group_key, value, time.time(), by_user_id),
        )
        return await self.group_rules(group_key)

    async def last_group_job_at(self, user_id: int, group_key: str) -> float | None:
        """When the user last started a job in the group that was not refunded (cooldown)."""
        rows = await self._read(
            """
            SELECT MAX(j.created_at) FROM jobs AS j JOIN reservations AS r ON r.job_id = j.id
            WHERE j.user_id = ? AND j.group_key = ? AND r.state <> 'refunded'
            """,
            (user_id, group_key),
        )
        return None if rows[0][0] is None else float(rows[0][0])

    # --- linked accounts (/link) ---

    async def create_link_code(self, identity_id: int, *, ttl: float = LINK_CODE_TTL) -> str:
        """A new one-time code for joining another identity to this one's account.

        It replaces the identity's earlier code and is valid `ttl` seconds.
        """

        async def create(tx: Tx) -> str:
            await tx.execute("DELETE FROM link_codes WHERE expires_at < ?", time.time())
            while True:
                code = "".join(secrets.choice(LINK_CODE_ALPHABET) for _ in range(LINK_CODE_LENGTH))
                if await tx.fetch("SELECT 1 FROM link_codes WHERE code = ?", code):
                    continue  # another identity holds this very code: draw again
                await tx.execute(
                    """
                    INSERT INTO link_codes (code, user_id, expires_at) VALUES (?, ?, ?)
                    ON CONFLICT (user_id) DO UPDATE
                        SET code = excluded.code, expires_at = excluded.expires_at
                    """,
                    code,
                    identity_id,
                    time.time() + ttl,
                )
                return code

        return await self._write(create)

    async def burn_link_code(self, code: str) -> None:
        """Forget a code that was shown where others could read it."""
        await self._execute("DELETE FROM link_codes WHERE code = ?", (normalize_code(code),))

    async def link(self, code: str, identity_id: int, day: date) -> LinkResult:
        """Join the identity (and its account) to the account of the code's owner.

        In one transaction: the joining account's balance, its allowance used on `day`, key,
        language and jobs move to the other account (the credits as 'transfer' ledger rows,
        out of one and into the other), and each of its identities points there. Of two keys
        the newer is kept. Raises `LinkRefused` (nothing changed) for an unknown, expired or
        own code, a banned identity on either side, two identities of one platform, accounts
        already one, or a job of the joining account still running.
        """
        wanted = normalize_code(code)
        for_update = self.for_update

        async def join(tx: Tx) -> LinkResult:
            rows = await tx.fetch(
                "SELECT user_id, expires_at FROM link_codes WHERE code = ?" + for_update, wanted
            )
            if not rows:
                raise LinkRefused("bad_code")
            owner, expires_at = rows[0]
            if expires_at < time.time():
                await tx.execute("DELETE FROM link_codes WHERE code = ?", wanted)
                return LinkResult(0, (), expired=True)
            if owner == identity_id:
                raise LinkRefused("own_code")
            dst = await ledger.account_of(tx, owner)
            src = await ledger.account_of(tx, identity_id)
            if dst == src:
                raise LinkRefused("already")
            await ledger.lock_accounts(tx, for_update, dst, src)
            members = await tx.fetch(
                "SELECT platform, role FROM users WHERE COALESCE(account_id, id) IN (?, ?)",
                dst,
                src,
            )
            if any(role == "banned" for _, role in members):
                raise LinkRefused("banned")
            platforms = [platform.lower() for platform, _ in members]
            if len(platforms) != len(set(platforms)):
                raise LinkRefused("same_platform")
            if await ledger.has_jobs_in_flight(tx, src):
                raise LinkRefused("busy")
            moved, key = await ledger.move_account(tx, src, dst, day, note=f"link #{src} -> #{dst}")
            await tx.execute(
                "UPDATE users SET account_id = ? WHERE account_id = ? OR id = ?", dst, src, src
            )
            await tx.execute("DELETE FROM link_codes WHERE code = ?", wanted)
            return LinkResult(dst, await ledger.identities(tx, dst), moved=moved, key=key)

        result = await self._write(join)
        if result.expired:
            raise LinkRefused("expired")
        return result

    async def unlink(self, identity_id: int, day: date) -> bool:
        """Detach the identity from its account; False if it shares its account with none.

        The credits, key, language and jobs stay with the account: when the identity was the
        account's own row, they move (as 'transfer' rows) to the oldest other identity, which
        then holds the account. Raises `LinkRefused("busy")` while one of its jobs runs.
        """
        for_update = self.for_update

        async def detach(tx: Tx) -> bool:
            account = await ledger.account_of(tx, identity_id)
            others = [
                int(row[0])
                for row in await tx.fetch(
                    "SELECT id FROM users WHERE COALESCE(account_id, id) = ? AND id <> ?"
                    " ORDER BY id",
                    account,
                    identity_id,
                )
            ]
            if not others:
                return False
            if account == identity_id:
                # The account lives in this row: hand it to the next identity first.
                await ledger.lock_accounts(tx, for_update, identity_id, others[0])
                if await ledger.has_jobs_in_flight(tx, identity_id):
                    raise LinkRefused("busy")
                heir = others[0]
                await ledger.move_account(tx, identity_id, heir, day, note=f"unlink #{identity_id}")
                await tx.execute(
                    "UPDATE users SET account_id = ? WHERE account_id = ?", heir, identity_id
                )
                await tx.execute("UPDATE users SET account_id = NULL WHERE id = ?", heir)
            else:
                await tx.execute("UPDATE users SET account_id = NULL WHERE id = ?", identity_id)
            return True

        return await self._write(detach)

    async def identities(self, account_id: int) -> list[tuple[str, str, str]]:
        """(platform, platform user id, name) of each identity sharing the account."""
        rows = await self._read(
            "SELECT platform, platform_user_id, name FROM users"
            " WHERE COALESCE(account_id, id) = ? ORDER BY id",
            (account_id,),
        )
        return [(row[0], row[1], row[2]) for row in rows]
