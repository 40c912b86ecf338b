"""SQL both engines run as written (`?` placeholders; PostgreSQL's engine numbers them).

bench/ledger.py's raw ceilings run these same statements.
"""

from __future__ import annotations

SQL_INSERT_JOB = """
    INSERT INTO jobs (user_id, platform, chat_id, group_key, kind, prompt, options, ref_count,
                      own_key, created_at, process_id)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    RETURNING id
"""
# A job's life, one row each (PostgreSQL batches each across jobs: postgres.BATCHED).
# params: provider, started_at, job_id
SQL_MARK_RUNNING = """
    UPDATE jobs SET status = 'running', provider = ?, started_at = COALESCE(started_at, ?)
    WHERE id = ? AND status IN ('queued', 'running')
"""
# params: charge, upstream_done_at, eta_class (None: unchanged), job_id
SQL_MARK_CHARGE = """
    UPDATE jobs SET charge = ?, upstream_done_at = COALESCE(?, upstream_done_at),
                    eta_class = COALESCE(?, eta_class)
    WHERE id = ? AND status IN ('queued', 'running')
"""
# params: status, error_kind, error_detail, usage, revised_prompt, outputs, provider,
# finished_at, job_id
SQL_FINISH_JOB = """
    UPDATE jobs SET status = ?, error_kind = ?, error_detail = ?, usage = ?,
                    revised_prompt = ?, outputs = ?, provider = COALESCE(?, provider),
                    finished_at = ?
    WHERE id = ? AND status IN ('queued', 'running')
"""
# params: provider, slot, process_id
SQL_RELEASE_SLOT = "DELETE FROM provider_slots WHERE provider = ? AND slot = ? AND process_id = ?"
# params: user_id, day, group_key, day, group_key, user_id, job_id
SQL_RESERVE_READ = """
    SELECT j.user_id, j.status, r.state,
           COALESCE((SELECT used FROM daily_usage WHERE user_id = ? AND day = ?), 0),
           u.granted,
           COALESCE((SELECT used FROM group_usage WHERE group_key = ? AND day = ?), 0),
           u.daily_allowance,
           (SELECT cap FROM group_rules WHERE group_key = ?)
    FROM jobs AS j
    JOIN users AS u ON u.id = ?
    LEFT JOIN reservations AS r ON r.job_id = j.id
    WHERE j.id = ?
"""
# params: amount, user_id, amount
SQL_TAKE_BALANCE = "UPDATE users SET granted = granted - ? WHERE id = ? AND granted >= ?"
# params: user_id, day, amount, allowance
SQL_TAKE_DAILY = """
    INSERT INTO daily_usage (user_id, day, used) VALUES (?, ?, ?)
    ON CONFLICT (user_id, day) DO UPDATE SET used = daily_usage.used + excluded.used
    WHERE daily_usage.used + excluded.used <= ?
"""
# params: group_key, day, amount, cap (0 = no cap)
SQL_TAKE_GROUP = """
    INSERT INTO group_usage (group_key, day, used) VALUES (?, ?, ?)
    ON CONFLICT (group_key, day) DO UPDATE SET used = group_usage.used + excluded.used
    WHERE ?4 <= 0 OR group_usage.used + excluded.used <= ?4
"""
# `ledger.reserve_many`'s writes, on rows it has locked (SQLite; PostgreSQL writes a batch's
# reservations in `drawbridge_open_many`). params: amount, user_id
SQL_TAKE_LOCKED_BALANCE = "UPDATE users SET granted = granted - ? WHERE id = ?"
# params: user_id, day, amount
SQL_ADD_DAILY = """
    INSERT INTO daily_usage (user_id, day, used) VALUES (?, ?, ?)
    ON CONFLICT (user_id, day) DO UPDATE SET used = daily_usage.used + excluded.used
"""
# params: group_key, day, amount
SQL_ADD_GROUP = """
    INSERT INTO group_usage (group_key, day, used) VALUES (?, ?, ?)
    ON CONFLICT (group_key, day) DO UPDATE SET used = group_usage.used + excluded.used
"""
SQL_INSERT_RESERVATION = """
    INSERT INTO reservations (job_id, user_id, daily_amount, balance_amount, day, group_key, state)
    VALUES (?, ?, ?, ?, ?, ?, 'reserved')
"""
SQL_INSERT_LEDGER = """
    INSERT INTO ledger (job_id, user_id, kind, daily_amount, balance_amount, day, created_at,
                        note, by_user_id)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# params: new state, job_id
SQL_SETTLE = """
    UPDATE reservations SET state = ? WHERE job_id = ? AND state = 'reserved'
    RETURNING user_id, daily_amount, balance_amount, day, group_key
"""

# An identity with its account's money, key and language: `store.user` and `find_user` read
# users through this, so every identity of one account charges the same row.
USER_SELECT = """
    SELECT i.id AS identity_id, i.platform, i.platform_user_id, i.name, i.role,
           a.id AS id, a.lang, a.granted, a.api_key_enc, a.daily_allowance, a.key_probe
    FROM users AS i JOIN users AS a ON a.id = COALESCE(i.account_id, i.id)
"""

# params: platform, platform_user_id, name, created_at. A new user, or a known one's display
# name refreshed (an empty name keeps the stored one).
SQL_MAKE_USER = """
    INSERT INTO users (platform, platform_user_id, name, created_at)
    VALUES (?, ?, ?, ?)
    ON CONFLICT (platform, platform_user_id) DO UPDATE
    SET name = CASE WHEN excluded.name <> '' THEN excluded.name ELSE users.name END
"""
# The users of one platform by their ids there; params: platform, then the ids as a JSON
# array, for the dialect's `json_texts` appended.
SQL_USERS_OF = USER_SELECT + " WHERE i.platform = ? AND i.platform_user_id IN "

JOB_SELECT = """
    SELECT j.*, r.state AS ledger_state,
           COALESCE(r.daily_amount + r.balance_amount, 0) AS cost,
           COALESCE(r.daily_amount + r.balance_amount, 0) - COALESCE((
               SELECT l.daily_amount + l.balance_amount FROM ledger AS l
               WHERE l.job_id = j.id AND l.kind = 'refund'), 0) AS spent
    FROM jobs AS j
    LEFT JOIN reservations AS r ON r.job_id = j.id
"""
