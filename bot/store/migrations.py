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
