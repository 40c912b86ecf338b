"""The schema, versioned: the same numbered migrations for SQLite and for PostgreSQL.

Migration N does the same thing on both engines, in each one's own DDL, so a database of
either engine at version N has the same tables, columns, constraints and triggers, and
`drawbridge db copy` can move rows between them column for column. Append; never edit a
shipped migration. SQLite records its version in `PRAGMA user_version`, PostgreSQL in the
`schema_version` table.
"""

from __future__ import annotations

# Applied in order, each once, recorded in PRAGMA user_version. Append; never edit a shipped one.
SQLITE_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE users (
        id               INTEGER PRIMARY KEY,
        platform         TEXT    NOT NULL,
        platform_user_id TEXT    NOT NULL,
        name             TEXT    NOT NULL DEFAULT '',
        role             TEXT    NOT NULL DEFAULT 'user'
                                 CHECK (role IN ('user', 'admin', 'banned')),
        lang             TEXT,
        api_key_enc      BLOB,
        granted          INTEGER NOT NULL DEFAULT 0 CHECK (granted >= 0),
        created_at       REAL    NOT NULL,
        UNIQUE (platform, platform_user_id)
    );

    CREATE TABLE daily_usage (
        user_id INTEGER NOT NULL REFERENCES users (id),
        day     TEXT    NOT NULL,
        used    INTEGER NOT NULL CHECK (used >= 0),
        PRIMARY KEY (user_id, day)
    ) WITHOUT ROWID;

    CREATE TABLE group_usage (
        group_key TEXT    NOT NULL,
        day       TEXT    NOT NULL,
        used      INTEGER NOT NULL CHECK (used >= 0),
        PRIMARY KEY (group_key, day)
    ) WITHOUT ROWID;

    CREATE TABLE jobs (
        id             INTEGER PRIMARY KEY,
        user_id        INTEGER NOT NULL REFERENCES users (id),
        platform       TEXT    NOT NULL,
        chat_id        TEXT    NOT NULL,
        group_key      TEXT,
        kind           TEXT    NOT NULL CHECK (kind IN ('draw', 'edit')),
        prompt         TEXT    NOT NULL,
        options        TEXT    NOT NULL DEFAULT '{}',
        ref_count      INTEGER NOT NULL DEFAULT 0,
        provider       TEXT,
        own_key        INTEGER NOT NULL DEFAULT 0,
        status         TEXT    NOT NULL DEFAULT 'queued'
                               CHECK (status IN ('queued', 'running', 'succeeded', 'failed',
                                                 'cancelled')),
        error_kind     TEXT,
        error_detail   TEXT,
        created_at     REAL    NOT NULL,
        started_at     REAL,
        finished_at    REAL,
        usage          TEXT,
        revised_prompt TEXT,
        outputs        TEXT    NOT NULL DEFAULT '[]'
    );
    CREATE INDEX jobs_active ON jobs (status) WHERE status IN ('queued', 'running');
    CREATE INDEX jobs_user ON jobs (user_id, status);

    CREATE TABLE reservations (
        job_id         INTEGER PRIMARY KEY REFERENCES jobs (id),
        user_id        INTEGER NOT NULL REFERENCES users (id),
        daily_amount   INTEGER NOT NULL CHECK (daily_amount >= 0),
        balance_amount INTEGER NOT NULL CHECK (balance_amount >= 0),
        day            TEXT    NOT NULL,
        group_key      TEXT,
        state          TEXT    NOT NULL CHECK (state IN ('reserved', 'committed', 'refunded'))
    );
    CREATE INDEX reservations_day ON reservations (day);
    CREATE INDEX reservations_open ON reservations (state) WHERE state = 'reserved';

    -- A settled reservation is final: a refunded job can never be committed, nor the reverse.
    CREATE TRIGGER reservations_settled_is_final
    BEFORE UPDATE OF state ON reservations WHEN OLD.state <> 'reserved'
    BEGIN
        SELECT RAISE(ABORT, 'reservation already settled');
    END;

    CREATE TABLE ledger (
        id             INTEGER PRIMARY KEY,
        job_id         INTEGER REFERENCES jobs (id),
        user_id        INTEGER NOT NULL REFERENCES users (id),
        kind           TEXT    NOT NULL CHECK (kind IN ('reserve', 'commit', 'refund', 'grant')),
        daily_amount   INTEGER NOT NULL DEFAULT 0,
        balance_amount INTEGER NOT NULL DEFAULT 0,
        day            TEXT,
        created_at     REAL    NOT NULL,
        note           TEXT    NOT NULL DEFAULT '',
        by_user_id     INTEGER REFERENCES users (id),
        CHECK ((job_id IS NULL) = (kind = 'grant'))
    );
    CREATE UNIQUE INDEX ledger_one_per_job_and_kind ON ledger (job_id, kind)
        WHERE job_id IS NOT NULL;
    CREATE INDEX ledger_user ON ledger (user_id);
    CREATE INDEX ledger_day ON ledger (day);

    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN
        SELECT RAISE(ABORT, 'ledger is append-only');
    END;
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN
        SELECT RAISE(ABORT, 'ledger is append-only');
    END;
    """,
    # 2: which sent message shows which job's result (replies to a result, result buttons).
    """
    CREATE TABLE messages (
        platform   TEXT    NOT NULL,
        chat_id    TEXT    NOT NULL,
        message_id TEXT    NOT NULL,
        job_id     INTEGER NOT NULL REFERENCES jobs (id),
        created_at REAL    NOT NULL,
        PRIMARY KEY (platform, chat_id, message_id)
    ) WITHOUT ROWID;
    """,
    # 3: what each provider (relay) was found to support: streaming, edits, 4K, its balance.
    """
    CREATE TABLE provider_capabilities (
        provider   TEXT NOT NULL PRIMARY KEY,
        data       TEXT NOT NULL DEFAULT '{}',
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 4: what a job whose results went to the chat is to be charged (NULL: they never did), so
    # recovery commits a delivered job whose commit could not be written, instead of refunding.
    """
    ALTER TABLE jobs ADD COLUMN charge INTEGER CHECK (charge >= 0);
    """,
    # 5: when the upstream answered (queue wait and upstream time apart) and the job's class
    # for the ETA ("provider|tier|quality|kind"), so estimates come from similar jobs only.
    """
    ALTER TABLE jobs ADD COLUMN upstream_done_at REAL;
    ALTER TABLE jobs ADD COLUMN eta_class TEXT;
    CREATE INDEX jobs_eta ON jobs (eta_class, id) WHERE eta_class IS NOT NULL;
    """,
    # 6: the operator console: who did what (grants, bans, refunds, logins), and the time
    # index its overview and jobs pages read by (the last 24 h / 7 d / 30 d).
    """
    CREATE TABLE audit (
        id         INTEGER PRIMARY KEY,
        created_at REAL    NOT NULL,
        actor      TEXT    NOT NULL,
        action     TEXT    NOT NULL,
        target     TEXT    NOT NULL DEFAULT '',
        detail     TEXT    NOT NULL DEFAULT '{}',
        job_id     INTEGER REFERENCES jobs (id)
    );
    -- A succeeded job is refunded by an operator at most once.
    CREATE UNIQUE INDEX audit_one_refund_per_job ON audit (job_id) WHERE action = 'refund';
    CREATE INDEX jobs_created ON jobs (created_at);
    """,
    # 7: each group's own rules, set by its admins with /group (keyed like group_usage).
    """
    CREATE TABLE group_rules (
        group_key  TEXT    NOT NULL PRIMARY KEY,
        enabled    INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
        size       TEXT,
        quality    TEXT,
        cap        INTEGER CHECK (cap > 0),
        cooldown   INTEGER NOT NULL DEFAULT 0 CHECK (cooldown >= 0),
        updated_at REAL    NOT NULL,
        updated_by INTEGER REFERENCES users (id)
    ) WITHOUT ROWID;
    """,
    # 8: linked accounts (/link): an identity's account (NULL: its own row), when its key was
    # bound (of two keys the newer is kept), one-time link codes, and the ledger rebuilt so a
    # merge is recorded as 'transfer' rows (SQLite cannot alter a CHECK): every row, index and
    # append-only trigger kept.
    """
    ALTER TABLE users ADD COLUMN account_id INTEGER REFERENCES users (id);
    ALTER TABLE users ADD COLUMN key_set_at REAL;
    CREATE INDEX users_account ON users (account_id) WHERE account_id IS NOT NULL;

    CREATE TABLE link_codes (
        code       TEXT    NOT NULL PRIMARY KEY,
        user_id    INTEGER NOT NULL UNIQUE REFERENCES users (id),
        expires_at REAL    NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE ledger_new (
        id             INTEGER PRIMARY KEY,
        job_id         INTEGER REFERENCES jobs (id),
        user_id        INTEGER NOT NULL REFERENCES users (id),
        kind           TEXT    NOT NULL
                               CHECK (kind IN ('reserve', 'commit', 'refund', 'grant',
                                               'transfer')),
        daily_amount   INTEGER NOT NULL DEFAULT 0,
        balance_amount INTEGER NOT NULL DEFAULT 0,
        day            TEXT,
        created_at     REAL    NOT NULL,
        note           TEXT    NOT NULL DEFAULT '',
        by_user_id     INTEGER REFERENCES users (id),
        CHECK ((job_id IS NULL) = (kind IN ('grant', 'transfer')))
    );
    INSERT INTO ledger_new (id, job_id, user_id, kind, daily_amount, balance_amount, day,
                            created_at, note, by_user_id)
        SELECT id, job_id, user_id, kind, daily_amount, balance_amount, day, created_at, note,
               by_user_id
        FROM ledger;
    -- DROP TABLE fires no trigger; the append-only ones go with the old table.
    DROP TABLE ledger;
    ALTER TABLE ledger_new RENAME TO ledger;
    CREATE UNIQUE INDEX ledger_one_per_job_and_kind ON ledger (job_id, kind)
        WHERE job_id IS NOT NULL;
    CREATE INDEX ledger_user ON ledger (user_id);
    CREATE INDEX ledger_day ON ledger (day);
    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN
        SELECT RAISE(ABORT, 'ledger is append-only');
    END;
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN
        SELECT RAISE(ABORT, 'ledger is append-only');
    END;
    """,
    # 9: the operator console's per-user settings: a daily allowance of the user's own (NULL:
    # DRAWBRIDGE_DAILY_CREDITS) and the last probe of the user's key (JSON: ok, kind, balance,
    # at), shown masked beside the key.
    """
    ALTER TABLE users ADD COLUMN daily_allowance INTEGER CHECK (daily_allowance >= 0);
    ALTER TABLE users ADD COLUMN key_probe TEXT;
    """,
    # 10: several processes on one database (issue 15): each process's heartbeat, which
    # process runs each job (recovery settles only the jobs of dead processes), and the
    # provider slots every process shares (`concurrency` counts requests of all processes).
    """
    CREATE TABLE processes (
        id           TEXT    NOT NULL PRIMARY KEY,
        host         TEXT    NOT NULL,
        pid          INTEGER NOT NULL,
        platforms    TEXT    NOT NULL DEFAULT '',
        started_at   REAL    NOT NULL,
        heartbeat_at REAL    NOT NULL,
        stopped_at   REAL
    ) WITHOUT ROWID;
    ALTER TABLE jobs ADD COLUMN process_id TEXT;
    CREATE TABLE provider_slots (
        provider   TEXT    NOT NULL,
        slot       INTEGER NOT NULL,
        process_id TEXT    NOT NULL,
        job_id     INTEGER,
        taken_at   REAL    NOT NULL,
        PRIMARY KEY (provider, slot)
    ) WITHOUT ROWID;
    """,
    # 11: an account's open reservations found by account (/link refuses to merge an account
    # with a reservation in flight) instead of among every open one. PostgreSQL's 11 also
    # installs its reservation as a server-side function (see there).
    """
    CREATE INDEX reservations_open_by_user ON reservations (user_id) WHERE state = 'reserved';
    """,
    # 12: a reservation says what it left (the price line's "N left after this" without a
    # read behind it). Here the rule is Python (`ledger.reserve`): no change to the file. An
    # index the store already has, so the version still moves in step with PostgreSQL's.
    """
    CREATE INDEX IF NOT EXISTS reservations_open_by_user
        ON reservations (user_id) WHERE state = 'reserved';
    """,
    # 13: PostgreSQL opens a batch of jobs with their reservations in one server-side call.
    # Here a batch runs in one trip to the store's thread already: nothing to change.
    "",
)

# PostgreSQL: the same migrations. Ids are BIGINT identities (`BY DEFAULT`, so `db copy`
# keeps the ids it copies), unix seconds DOUBLE PRECISION, encrypted keys BYTEA, JSON TEXT
# (as in SQLite, read with ::jsonb where a query looks inside). Triggers call one function
# that refuses the change with the message its trigger passes.
POSTGRES_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE FUNCTION drawbridge_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION '%', TG_ARGV[0];
    END
    $$;

    CREATE TABLE users (
        id               BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        platform         TEXT    NOT NULL,
        platform_user_id TEXT    NOT NULL,
        name             TEXT    NOT NULL DEFAULT '',
        role             TEXT    NOT NULL DEFAULT 'user'
                                 CHECK (role IN ('user', 'admin', 'banned')),
        lang             TEXT,
        api_key_enc      BYTEA,
        granted          INTEGER NOT NULL DEFAULT 0 CHECK (granted >= 0),
        created_at       DOUBLE PRECISION NOT NULL,
        UNIQUE (platform, platform_user_id)
    );

    CREATE TABLE daily_usage (
        user_id BIGINT  NOT NULL REFERENCES users (id),
        day     TEXT    NOT NULL,
        used    INTEGER NOT NULL CHECK (used >= 0),
        PRIMARY KEY (user_id, day)
    );

    CREATE TABLE group_usage (
        group_key TEXT    NOT NULL,
        day       TEXT    NOT NULL,
        used      INTEGER NOT NULL CHECK (used >= 0),
        PRIMARY KEY (group_key, day)
    );

    CREATE TABLE jobs (
        id             BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        user_id        BIGINT  NOT NULL REFERENCES users (id),
        platform       TEXT    NOT NULL,
        chat_id        TEXT    NOT NULL,
        group_key      TEXT,
        kind           TEXT    NOT NULL CHECK (kind IN ('draw', 'edit')),
        prompt         TEXT    NOT NULL,
        options        TEXT    NOT NULL DEFAULT '{}',
        ref_count      INTEGER NOT NULL DEFAULT 0,
        provider       TEXT,
        own_key        INTEGER NOT NULL DEFAULT 0,
        status         TEXT    NOT NULL DEFAULT 'queued'
                               CHECK (status IN ('queued', 'running', 'succeeded', 'failed',
                                                 'cancelled')),
        error_kind     TEXT,
        error_detail   TEXT,
        created_at     DOUBLE PRECISION NOT NULL,
        started_at     DOUBLE PRECISION,
        finished_at    DOUBLE PRECISION,
        usage          TEXT,
        revised_prompt TEXT,
        outputs        TEXT    NOT NULL DEFAULT '[]'
    );
    CREATE INDEX jobs_active ON jobs (status) WHERE status IN ('queued', 'running');
    CREATE INDEX jobs_user ON jobs (user_id, status);

    CREATE TABLE reservations (
        job_id         BIGINT  PRIMARY KEY REFERENCES jobs (id),
        user_id        BIGINT  NOT NULL REFERENCES users (id),
        daily_amount   INTEGER NOT NULL CHECK (daily_amount >= 0),
        balance_amount INTEGER NOT NULL CHECK (balance_amount >= 0),
        day            TEXT    NOT NULL,
        group_key      TEXT,
        state          TEXT    NOT NULL CHECK (state IN ('reserved', 'committed', 'refunded'))
    );
    CREATE INDEX reservations_day ON reservations (day);
    CREATE INDEX reservations_open ON reservations (state) WHERE state = 'reserved';

    CREATE TRIGGER reservations_settled_is_final
    BEFORE UPDATE OF state ON reservations FOR EACH ROW WHEN (OLD.state <> 'reserved')
    EXECUTE FUNCTION drawbridge_refuse('reservation already settled');

    CREATE TABLE ledger (
        id             BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        job_id         BIGINT  REFERENCES jobs (id),
        user_id        BIGINT  NOT NULL REFERENCES users (id),
        kind           TEXT    NOT NULL,
        daily_amount   INTEGER NOT NULL DEFAULT 0,
        balance_amount INTEGER NOT NULL DEFAULT 0,
        day            TEXT,
        created_at     DOUBLE PRECISION NOT NULL,
        note           TEXT    NOT NULL DEFAULT '',
        by_user_id     BIGINT  REFERENCES users (id),
        CONSTRAINT ledger_kind CHECK (kind IN ('reserve', 'commit', 'refund', 'grant')),
        CONSTRAINT ledger_job CHECK ((job_id IS NULL) = (kind = 'grant'))
    );
    CREATE UNIQUE INDEX ledger_one_per_job_and_kind ON ledger (job_id, kind)
        WHERE job_id IS NOT NULL;
    CREATE INDEX ledger_user ON ledger (user_id);
    CREATE INDEX ledger_day ON ledger (day);

    CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION drawbridge_refuse('ledger is append-only');
    CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION drawbridge_refuse('ledger is append-only');
    """,
    """
    CREATE TABLE messages (
        platform   TEXT   NOT NULL,
        chat_id    TEXT   NOT NULL,
        message_id TEXT   NOT NULL,
        job_id     BIGINT NOT NULL REFERENCES jobs (id),
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (platform, chat_id, message_id)
    );
    """,
    """
    CREATE TABLE provider_capabilities (
        provider   TEXT NOT NULL PRIMARY KEY,
        data       TEXT NOT NULL DEFAULT '{}',
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    """
    ALTER TABLE jobs ADD COLUMN charge INTEGER CHECK (charge >= 0);
    """,
    """
    ALTER TABLE jobs ADD COLUMN upstream_done_at DOUBLE PRECISION;
    ALTER TABLE jobs ADD COLUMN eta_class TEXT;
    CREATE INDEX jobs_eta ON jobs (eta_class, id) WHERE eta_class IS NOT NULL;
    """,
    """
    CREATE TABLE audit (
        id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        actor      TEXT   NOT NULL,
        action     TEXT   NOT NULL,
        target     TEXT   NOT NULL DEFAULT '',
        detail     TEXT   NOT NULL DEFAULT '{}',
        job_id     BIGINT REFERENCES jobs (id)
    );
    CREATE UNIQUE INDEX audit_one_refund_per_job ON audit (job_id) WHERE action = 'refund';
    CREATE INDEX jobs_created ON jobs (created_at);
    """,
    """
    CREATE TABLE group_rules (
        group_key  TEXT    NOT NULL PRIMARY KEY,
        enabled    INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
        size       TEXT,
        quality    TEXT,
        cap        INTEGER CHECK (cap > 0),
        cooldown   INTEGER NOT NULL DEFAULT 0 CHECK (cooldown >= 0),
        updated_at DOUBLE PRECISION NOT NULL,
        updated_by BIGINT  REFERENCES users (id)
    );
    """,
    # 8: PostgreSQL alters the ledger's CHECKs in place (SQLite had to rebuild the table).
    """
    ALTER TABLE users ADD COLUMN account_id BIGINT REFERENCES users (id);
    ALTER TABLE users ADD COLUMN key_set_at DOUBLE PRECISION;
    CREATE INDEX users_account ON users (account_id) WHERE account_id IS NOT NULL;

    CREATE TABLE link_codes (
        code       TEXT   NOT NULL PRIMARY KEY,
        user_id    BIGINT NOT NULL UNIQUE REFERENCES users (id),
        expires_at DOUBLE PRECISION NOT NULL
    );

    ALTER TABLE ledger DROP CONSTRAINT ledger_kind;
    ALTER TABLE ledger DROP CONSTRAINT ledger_job;
    ALTER TABLE ledger ADD CONSTRAINT ledger_kind
        CHECK (kind IN ('reserve', 'commit', 'refund', 'grant', 'transfer'));
    ALTER TABLE ledger ADD CONSTRAINT ledger_job
        CHECK ((job_id IS NULL) = (kind IN ('grant', 'transfer')));
    """,
    """
    ALTER TABLE users ADD COLUMN daily_allowance INTEGER CHECK (daily_allowance >= 0);
    ALTER TABLE users ADD COLUMN key_probe TEXT;
    """,
    """
    CREATE TABLE processes (
        id           TEXT    NOT NULL PRIMARY KEY,
        host         TEXT    NOT NULL,
        pid          INTEGER NOT NULL,
        platforms    TEXT    NOT NULL DEFAULT '',
        started_at   DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        stopped_at   DOUBLE PRECISION
    );
    ALTER TABLE jobs ADD COLUMN process_id TEXT;
    CREATE TABLE provider_slots (
        provider   TEXT    NOT NULL,
        slot       INTEGER NOT NULL,
        process_id TEXT    NOT NULL,
        job_id     BIGINT,
        taken_at   DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (provider, slot)
    );
    """,
    # 11: the same index as SQLite's 11, and `ledger.reserve` as a function, so that a
    # reservation is one round trip instead of five (BEGIN, lock, read, writes, COMMIT), and a
    # second one that runs many at once (the engine's batches); see "Two engines, one set of
    # rules" in docs/design-notes.md. drawbridge_reserve is that rule line for line: the
    # account's row locked first, then a read that sees what a reservation that held the lock
    # committed (each statement of a VOLATILE function takes a new snapshot under READ
    # COMMITTED), the same checks in the same order, the same guarded writes. A refusal found
    # before writing comes back as `outcome` (with the number or text its exception carries);
    # a guard that refuses after a write raises SQLSTATE DBR01 (credits) or DBR02 (group cap),
    # that number as DETAIL, which rolls the whole call back. `ledger.refusal` turns either
    # into the exception the shared rule raises.
    """
    CREATE INDEX reservations_open_by_user ON reservations (user_id) WHERE state = 'reserved';

    CREATE FUNCTION drawbridge_reserve(
        p_job BIGINT, p_user BIGINT, p_cost INTEGER, p_day TEXT, p_allowance INTEGER,
        p_group TEXT, p_global_cap INTEGER, p_at DOUBLE PRECISION,
        OUT outcome TEXT, OUT number BIGINT, OUT detail TEXT
    ) LANGUAGE plpgsql AS $$
    DECLARE
        v_account BIGINT;
        v_owner BIGINT;
        v_status TEXT;
        v_state TEXT;
        v_daily_used INTEGER;
        v_balance INTEGER;
        v_group_used INTEGER;
        v_own_allowance INTEGER;
        v_own_cap INTEGER;
        v_grouped BOOLEAN := COALESCE(p_group, '') <> '';
        v_allowance INTEGER;
        v_cap INTEGER;
        v_left INTEGER;
        v_daily INTEGER;
        v_from_balance INTEGER;
    BEGIN
        SELECT account_id INTO v_account FROM users WHERE id = p_user FOR NO KEY UPDATE;
        IF v_account IS NOT NULL THEN
            outcome := 'linked';
            RETURN;
        END IF;
        SELECT j.user_id, j.status, r.state,
               COALESCE((SELECT used FROM daily_usage WHERE user_id = p_user AND day = p_day), 0),
               u.granted,
               COALESCE((SELECT used FROM group_usage WHERE group_key = p_group AND day = p_day),
                        0),
               u.daily_allowance,
               (SELECT cap FROM group_rules WHERE group_key = p_group)
        INTO v_owner, v_status, v_state, v_daily_used, v_balance, v_group_used,
             v_own_allowance, v_own_cap
        FROM jobs AS j
        JOIN users AS u ON u.id = p_user
        LEFT JOIN reservations AS r ON r.job_id = j.id
        WHERE j.id = p_job;
        IF NOT FOUND THEN
            outcome := 'not_found';
            RETURN;
        END IF;
        v_allowance := GREATEST(0, COALESCE(v_own_allowance, p_allowance));
        IF v_owner <> p_user THEN
            outcome := 'owner';
            number := v_owner;
            RETURN;
        END IF;
        IF v_state IS NOT NULL THEN
            outcome := 'reserved';
            detail := v_state;
            RETURN;
        END IF;
        IF v_status <> 'queued' THEN
            outcome := 'status';
            detail := v_status;
            RETURN;
        END IF;
        -- bot.groups.effective_cap: the lower of the two where 0 or NULL is no cap.
        v_cap := p_global_cap;
        IF v_grouped AND COALESCE(v_own_cap, 0) > 0 THEN
            v_cap := CASE WHEN p_global_cap > 0 THEN LEAST(p_global_cap, v_own_cap)
                          ELSE v_own_cap END;
        ELSIF v_grouped AND p_global_cap <= 0 THEN
            v_cap := 0;
        END IF;
        IF v_grouped AND v_cap > 0 AND v_group_used + p_cost > v_cap THEN
            outcome := 'group_cap';
            number := v_cap;
            RETURN;
        END IF;
        v_left := GREATEST(0, v_allowance - v_daily_used) + v_balance;
        IF p_cost > v_left THEN
            outcome := 'insufficient';
            number := v_left;
            RETURN;
        END IF;
        v_daily := LEAST(p_cost, GREATEST(0, v_allowance - v_daily_used));
        v_from_balance := p_cost - v_daily;

        IF v_from_balance > 0 THEN
            UPDATE users SET granted = granted - v_from_balance
            WHERE id = p_user AND granted >= v_from_balance;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'DBR01', MESSAGE = 'insufficient',
                                      DETAIL = v_left::TEXT;
            END IF;
        END IF;
        IF v_daily > 0 THEN
            INSERT INTO daily_usage (user_id, day, used) VALUES (p_user, p_day, v_daily)
            ON CONFLICT (user_id, day) DO UPDATE SET used = daily_usage.used + excluded.used
            WHERE daily_usage.used + excluded.used <= v_allowance;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'DBR01', MESSAGE = 'insufficient',
                                      DETAIL = v_left::TEXT;
            END IF;
        END IF;
        IF v_grouped AND p_cost > 0 THEN
            INSERT INTO group_usage (group_key, day, used) VALUES (p_group, p_day, p_cost)
            ON CONFLICT (group_key, day) DO UPDATE SET used = group_usage.used + excluded.used
            WHERE v_cap <= 0 OR group_usage.used + excluded.used <= v_cap;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'DBR02', MESSAGE = 'group_cap',
                                      DETAIL = v_cap::TEXT;
            END IF;
        END IF;
        INSERT INTO reservations (job_id, user_id, daily_amount, balance_amount, day, group_key,
                                  state)
        VALUES (p_job, p_user, v_daily, v_from_balance, p_day, p_group, 'reserved');
        INSERT INTO ledger (job_id, user_id, kind, daily_amount, balance_amount, day, created_at,
                            note, by_user_id)
        VALUES (p_job, p_user, 'reserve', v_daily, v_from_balance, p_day, p_at, '', NULL);
        outcome := 'ok';
    END
    $$;

    -- Many reservations in one call (the engine's batches, bot/store/postgres.py): each one
    -- as drawbridge_reserve would alone, as if they had run one after another. The rows they
    -- write are locked in the order every rule takes them, each kind in key order: the
    -- accounts, then their daily usage (a refund takes it before the group's), then the
    -- groups' usage, as the reservations run in the order of their group. So neither another
    -- batch nor a refund ever waits for this one while holding what it needs: no deadlock.
    CREATE FUNCTION drawbridge_reserve_many(
        p_jobs BIGINT[], p_users BIGINT[], p_costs INTEGER[], p_days TEXT[],
        p_allowances INTEGER[], p_groups TEXT[], p_global_caps INTEGER[],
        p_ats DOUBLE PRECISION[]
    ) RETURNS TABLE (n BIGINT, outcome TEXT, number BIGINT, detail TEXT)
    LANGUAGE plpgsql AS $$
    DECLARE
        v_item RECORD;
        v_done RECORD;
    BEGIN
        PERFORM 1 FROM users WHERE id = ANY (p_users) ORDER BY id FOR NO KEY UPDATE;
        PERFORM 1 FROM daily_usage WHERE user_id = ANY (p_users) AND day = ANY (p_days)
        ORDER BY user_id, day FOR NO KEY UPDATE;
        FOR v_item IN
            SELECT * FROM unnest(p_jobs, p_users, p_costs, p_days, p_allowances, p_groups,
                                 p_global_caps, p_ats)
                 WITH ORDINALITY AS i(job, account, cost, day, allowance, grp, cap, at, k)
            ORDER BY i.grp, i.account, i.k
        LOOP
            SELECT * INTO v_done FROM drawbridge_reserve(
                v_item.job, v_item.account, v_item.cost, v_item.day, v_item.allowance,
                v_item.grp, v_item.cap, v_item.at);
            n := v_item.k;
            outcome := v_done.outcome;
            number := v_done.number;
            detail := v_done.detail;
            RETURN NEXT;
        END LOOP;
    END
    $$;
    """,
)


def _reserve_saying_what_is_left(migration_11: str) -> str:
    """PostgreSQL's 12: 11's `drawbridge_reserve`, whose 'ok' now carries the credits the
    reservation left (`number`), as `ledger.reserve` returns them; every other line as in 11
    (a migration is never edited, so this one is 11's text with that line added)."""
    start = migration_11.index("    CREATE FUNCTION drawbridge_reserve(")
    end = migration_11.index("    $$;", start) + len("    $$;")
    function = migration_11[start:end]
    ok = "        outcome := 'ok';"
    assert function.count(ok) == 1
    return (
        function.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1).replace(
            ok, "        number := v_left - p_cost;\n" + ok
        )
        + "\n"
    )


POSTGRES_MIGRATIONS += (_reserve_saying_what_is_left(POSTGRES_MIGRATIONS[10]),)

# 13: `ledger.reserve_many` after writing its new jobs (`Store.open_job`), as one function:
# a burst's batch of 256 commands was seven round trips (BEGIN, the jobs, three row locks, the
# writes, COMMIT), each waiting behind the loop's other work; now it is one. The rule is
# `ledger.reserve_many`'s, line for line: the accounts locked in id order, then their daily
# usage, then each group's usage of the day (made if missing), every row read once; each ask
# decided in order as if alone, refusals as `drawbridge_reserve` names them; then each table
# written once. The store tests run the same batches through this and through the Python rule.
POSTGRES_MIGRATIONS += (
    """
    CREATE FUNCTION drawbridge_open_many(
        p_jobs BIGINT[], p_users BIGINT[], p_costs INTEGER[], p_days TEXT[],
        p_allowances INTEGER[], p_groups TEXT[], p_global_caps INTEGER[], p_at DOUBLE PRECISION,
        p_platforms TEXT[], p_chats TEXT[], p_job_groups TEXT[], p_kinds TEXT[],
        p_prompts TEXT[], p_options TEXT[], p_ref_counts INTEGER[], p_own_keys INTEGER[],
        p_created DOUBLE PRECISION[], p_processes TEXT[]
    ) RETURNS TABLE (n INTEGER, job_id BIGINT, outcome TEXT, number BIGINT, detail TEXT)
    LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        v_count INTEGER := COALESCE(cardinality(p_users), 0);
        v_ids BIGINT[] := p_jobs;
        v_new_k BIGINT[];
        v_new_ids BIGINT[];
        a_ids BIGINT[];
        a_account BIGINT[];
        a_balance BIGINT[];
        a_allowance INTEGER[];
        d_keys TEXT[];
        d_used INTEGER[];
        g_keys TEXT[];
        g_used INTEGER[];
        g_caps INTEGER[];
        j_ids BIGINT[];
        j_owner BIGINT[];
        j_status TEXT[];
        j_state TEXT[];
        -- Filled in place, one element an ask (appending would copy the array each time).
        o_outcome TEXT[] := array_fill(NULL::TEXT, ARRAY[v_count]);
        o_number BIGINT[] := array_fill(NULL::BIGINT, ARRAY[v_count]);
        o_detail TEXT[] := array_fill(NULL::TEXT, ARRAY[v_count]);
        r_jobs BIGINT[] := array_fill(NULL::BIGINT, ARRAY[v_count]);
        r_users BIGINT[] := array_fill(NULL::BIGINT, ARRAY[v_count]);
        r_daily INTEGER[] := array_fill(NULL::INTEGER, ARRAY[v_count]);
        r_balance INTEGER[] := array_fill(NULL::INTEGER, ARRAY[v_count]);
        r_days TEXT[] := array_fill(NULL::TEXT, ARRAY[v_count]);
        r_groups TEXT[] := array_fill(NULL::TEXT, ARRAY[v_count]);
        r INTEGER := 0;
        i INTEGER;
        v_a INTEGER;
        v_j INTEGER;
        v_d INTEGER;
        v_g INTEGER;
        v_owner BIGINT;
        v_status TEXT;
        v_state TEXT;
        v_grouped BOOLEAN;
        v_cost INTEGER;
        v_cap INTEGER;
        v_own_cap INTEGER;
        v_group_used INTEGER;
        v_daily_used INTEGER;
        v_allowance INTEGER;
        v_daily_left INTEGER;
        v_left BIGINT;
        v_daily INTEGER;
    BEGIN
        -- The asks' new jobs (job 0), in ask order, ids from the jobs' own sequence.
        WITH input AS (
            SELECT i.k, nextval(pg_get_serial_sequence('jobs', 'id')) AS id, i.account,
                   i.platform, i.chat, i.grp, i.kind, i.prompt, i.options, i.refs, i.own,
                   i.created, i.process
            FROM unnest(p_jobs, p_users, p_platforms, p_chats, p_job_groups, p_kinds,
                        p_prompts, p_options, p_ref_counts, p_own_keys, p_created, p_processes)
                 WITH ORDINALITY AS i(job, account, platform, chat, grp, kind, prompt, options,
                                      refs, own, created, process, k)
            WHERE i.job = 0
        ), inserted AS (
            INSERT INTO jobs (id, user_id, platform, chat_id, group_key, kind, prompt, options,
                              ref_count, own_key, created_at, process_id)
            SELECT id, account, platform, chat, grp, kind, prompt, options, refs, own, created,
                   process
            FROM input ORDER BY k
        )
        SELECT array_agg(k ORDER BY k), array_agg(id ORDER BY k) INTO v_new_k, v_new_ids
        FROM input;
        FOR i IN 1..COALESCE(cardinality(v_new_k), 0) LOOP
            v_ids[v_new_k[i]] := v_new_ids[i];
        END LOOP;

        -- Every row the decisions read, locked (accounts, their days, the groups' days), in
        -- the order every rule takes them, each kind in key order.
        PERFORM 1 FROM users WHERE id = ANY (p_users) ORDER BY id FOR NO KEY UPDATE;
        SELECT array_agg(id), array_agg(account_id), array_agg(granted),
               array_agg(daily_allowance)
        INTO a_ids, a_account, a_balance, a_allowance
        FROM users WHERE id = ANY (p_users);
        PERFORM 1 FROM daily_usage WHERE user_id = ANY (p_users) AND day = ANY (p_days)
        ORDER BY user_id, day FOR NO KEY UPDATE;
        SELECT array_agg(user_id::TEXT || ' ' || day), array_agg(used) INTO d_keys, d_used
        FROM daily_usage WHERE user_id = ANY (p_users) AND day = ANY (p_days);
        -- An upsert locks the row it finds as FOR NO KEY UPDATE does, and a row it inserts
        -- is this call's until commit (another process's reservation could otherwise insert
        -- it meanwhile): made and locked, in key order, with the caps.
        WITH locked AS (
            INSERT INTO group_usage (group_key, day, used)
            SELECT DISTINCT x.grp, x.day, 0 FROM unnest(p_groups, p_days) AS x(grp, day)
            WHERE COALESCE(x.grp, '') <> ''
            ORDER BY x.grp, x.day
            ON CONFLICT (group_key, day) DO UPDATE SET used = group_usage.used
            RETURNING group_key, day, used
        )
        SELECT array_agg(l.group_key || ' ' || l.day), array_agg(l.used), array_agg(r.cap)
        INTO g_keys, g_used, g_caps
        FROM locked AS l LEFT JOIN group_rules AS r ON r.group_key = l.group_key;
        -- Jobs written before (a /edit's, after its downloads): whose, and where they are.
        SELECT array_agg(j.id), array_agg(j.user_id), array_agg(j.status), array_agg(r.state)
        INTO j_ids, j_owner, j_status, j_state
        FROM jobs AS j LEFT JOIN reservations AS r ON r.job_id = j.id
        WHERE j.id = ANY (p_jobs) AND j.id <> 0;

        FOR i IN 1..v_count LOOP
            v_a := array_position(a_ids, p_users[i]);
            IF v_a IS NOT NULL AND a_account[v_a] IS NOT NULL THEN
                o_outcome[i] := 'linked';
                CONTINUE;
            END IF;
            IF p_jobs[i] = 0 THEN
                v_owner := p_users[i];
                v_status := 'queued';
                v_state := NULL;
                v_j := NULL;
            ELSE
                v_j := array_position(j_ids, p_jobs[i]);
            END IF;
            IF v_a IS NULL OR (p_jobs[i] <> 0 AND v_j IS NULL) THEN
                o_outcome[i] := 'not_found';
                CONTINUE;
            END IF;
            IF v_j IS NOT NULL THEN
                v_owner := j_owner[v_j];
                v_status := j_status[v_j];
                v_state := j_state[v_j];
            END IF;
            IF v_owner <> p_users[i] THEN
                o_outcome[i] := 'owner';
                o_number[i] := v_owner;
                CONTINUE;
            END IF;
            IF v_state IS NOT NULL THEN
                o_outcome[i] := 'reserved';
                o_detail[i] := v_state;
                CONTINUE;
            END IF;
            IF v_status <> 'queued' THEN
                o_outcome[i] := 'status';
                o_detail[i] := v_status;
                CONTINUE;
            END IF;
            v_cost := p_costs[i];
            v_grouped := COALESCE(p_groups[i], '') <> '';
            v_cap := p_global_caps[i];
            v_group_used := 0;
            v_g := NULL;
            IF v_grouped THEN
                v_g := array_position(g_keys, p_groups[i] || ' ' || p_days[i]);
                v_group_used := g_used[v_g];
                -- bot.groups.effective_cap: the lower of the two where 0 or NULL is no cap.
                v_own_cap := COALESCE(g_caps[v_g], 0);
                IF v_own_cap > 0 THEN
                    v_cap := CASE WHEN v_cap > 0 THEN LEAST(v_cap, v_own_cap) ELSE v_own_cap END;
                ELSIF v_cap <= 0 THEN
                    v_cap := 0;
                END IF;
                IF v_cap > 0 AND v_group_used + v_cost > v_cap THEN
                    o_outcome[i] := 'group_cap';
                    o_number[i] := v_cap;
                    CONTINUE;
                END IF;
            END IF;
            v_allowance := GREATEST(0, COALESCE(a_allowance[v_a], p_allowances[i]));
            v_d := array_position(d_keys, p_users[i]::TEXT || ' ' || p_days[i]);
            v_daily_used := CASE WHEN v_d IS NULL THEN 0 ELSE d_used[v_d] END;
            v_daily_left := GREATEST(0, v_allowance - v_daily_used);
            v_left := v_daily_left + a_balance[v_a];
            IF v_cost > v_left THEN
                o_outcome[i] := 'insufficient';
                o_number[i] := v_left;
                CONTINUE;
            END IF;
            v_daily := LEAST(v_cost, v_daily_left);
            -- What the next ask of this account, day or group sees.
            a_balance[v_a] := a_balance[v_a] - (v_cost - v_daily);
            IF v_d IS NULL THEN
                d_keys := d_keys || (p_users[i]::TEXT || ' ' || p_days[i]);
                d_used := d_used || v_daily;
            ELSE
                d_used[v_d] := v_daily_used + v_daily;
            END IF;
            IF v_grouped THEN
                g_used[v_g] := v_group_used + v_cost;
            END IF;
            IF v_j IS NOT NULL THEN
                j_state[v_j] := 'reserved';
            END IF;
            r := r + 1;
            r_jobs[r] := v_ids[i];
            r_users[r] := p_users[i];
            r_daily[r] := v_daily;
            r_balance[r] := v_cost - v_daily;
            r_days[r] := p_days[i];
            r_groups[r] := p_groups[i];
            o_outcome[i] := 'ok';
            o_number[i] := v_left - v_cost;
        END LOOP;

        -- The writes, each table's in key order, on rows locked above: plain increments,
        -- with the tables' CHECKs (granted >= 0, used >= 0) behind them.
        r_jobs := r_jobs[1:r];
        r_users := r_users[1:r];
        r_daily := r_daily[1:r];
        r_balance := r_balance[1:r];
        r_days := r_days[1:r];
        r_groups := r_groups[1:r];
        UPDATE users AS u SET granted = u.granted - t.amount
        FROM (SELECT x.account, SUM(x.amount) AS amount
              FROM unnest(r_users, r_balance) AS x(account, amount)
              GROUP BY x.account HAVING SUM(x.amount) > 0) AS t
        WHERE u.id = t.account;
        INSERT INTO daily_usage (user_id, day, used)
        SELECT x.account, x.day, SUM(x.amount)
        FROM unnest(r_users, r_days, r_daily) AS x(account, day, amount)
        GROUP BY x.account, x.day HAVING SUM(x.amount) > 0
        ORDER BY x.account, x.day
        ON CONFLICT (user_id, day) DO UPDATE SET used = daily_usage.used + excluded.used;
        INSERT INTO group_usage (group_key, day, used)
        SELECT x.grp, x.day, SUM(x.daily + x.bal)
        FROM unnest(r_groups, r_days, r_daily, r_balance) AS x(grp, day, daily, bal)
        WHERE COALESCE(x.grp, '') <> '' AND x.daily + x.bal > 0
        GROUP BY x.grp, x.day
        ORDER BY x.grp, x.day
        ON CONFLICT (group_key, day) DO UPDATE SET used = group_usage.used + excluded.used;
        INSERT INTO reservations (job_id, user_id, daily_amount, balance_amount, day, group_key,
                                  state)
        SELECT x.job, x.account, x.daily, x.bal, x.day, x.grp, 'reserved'
        FROM unnest(r_jobs, r_users, r_daily, r_balance, r_days, r_groups)
             WITH ORDINALITY AS x(job, account, daily, bal, day, grp, k)
        ORDER BY x.k;
        INSERT INTO ledger (job_id, user_id, kind, daily_amount, balance_amount, day,
                            created_at, note, by_user_id)
        SELECT x.job, x.account, 'reserve', x.daily, x.bal, x.day, p_at, '', NULL
        FROM unnest(r_jobs, r_users, r_daily, r_balance, r_days)
             WITH ORDINALITY AS x(job, account, daily, bal, day, k)
        ORDER BY x.k;

        RETURN QUERY
        SELECT k::INTEGER, v_ids[k], o_outcome[k], o_number[k], o_detail[k]
        FROM generate_series(1, v_count) AS k;
    END
    $$;
    """,
)

assert len(POSTGRES_MIGRATIONS) == len(SQLITE_MIGRATIONS), "one migration per number on both"

TABLES = (
    "users",
    "daily_usage",
    "group_usage",
    "jobs",
    "reservations",
    "ledger",
    "messages",
    "provider_capabilities",
    "audit",
    "group_rules",
    "link_codes",
    "processes",
    "provider_slots",
)
"""Every table, parents before the tables that refer to them (the order `db copy` uses)."""
