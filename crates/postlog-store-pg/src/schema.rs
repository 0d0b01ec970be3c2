//! The PostgreSQL schema, applied at open under an advisory lock (several nodes may start
//! at once). Every table of the embedded store has its twin here, with the same columns and
//! meaning (postlog-store's `db.rs` documents them); `heads` is new: the row a node locks
//! to append to an account.

use postgres::GenericClient;

use crate::R;

/// Key of the advisory lock held while the schema is created or upgraded.
const SCHEMA_LOCK: i64 = 0x706f_7374_6c6f_6701;

/// Schema versions; each entry runs once, in order, in one transaction.
const MIGRATIONS: &[&str] = &["
CREATE TABLE accounts (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL
);
-- The next offset of each account's log. Appending nodes lock the row (FOR UPDATE), so
-- offsets are assigned gap-free and in commit order, whichever node appends.
CREATE TABLE heads (
    account_id BIGINT PRIMARY KEY REFERENCES accounts(id),
    head BIGINT NOT NULL
);
CREATE TABLE addresses (
    address TEXT PRIMARY KEY,
    account_id BIGINT NOT NULL REFERENCES accounts(id)
);
CREATE TABLE devices (
    id BIGSERIAL PRIMARY KEY,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    secret_hash BYTEA NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT false
);
-- The metadata log; body, checksum and kind exactly as in the embedded store (the
-- checksum covers account id, offset and body, so a migrated record keeps its checksum).
CREATE TABLE log (
    account_id BIGINT NOT NULL,
    log_offset BIGINT NOT NULL,
    time_ms BIGINT NOT NULL,
    kind BIGINT NOT NULL,
    body BYTEA NOT NULL,
    checksum BYTEA NOT NULL,
    PRIMARY KEY (account_id, log_offset)
);
CREATE TABLE blobs (
    account_id BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    log_offset BIGINT NOT NULL,
    size BIGINT NOT NULL,
    PRIMARY KEY (account_id, hash)
);
CREATE TABLE tag_ops (
    account_id BIGINT NOT NULL,
    device BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    log_offset BIGINT NOT NULL,
    PRIMARY KEY (account_id, device, seq)
);
CREATE TABLE refs (
    account_id BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    log_offset BIGINT NOT NULL,
    PRIMARY KEY (account_id, hash, log_offset)
);
CREATE TABLE unlink_pending (
    account_id BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (account_id, hash)
);
CREATE TABLE relay_queue (
    account_id BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    recipient TEXT NOT NULL,
    send_offset BIGINT NOT NULL,
    sender TEXT NOT NULL,
    state BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    next_ms BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    reply TEXT NOT NULL,
    -- The node whose relay attempt holds the row (0: none); see relay.rs.
    claimed_by BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, hash, recipient)
);
CREATE INDEX relay_queue_due ON relay_queue (state, next_ms);
"];

/// Creates or upgrades the schema. Safe to run from several nodes at once.
pub(crate) fn migrate(c: &mut impl GenericClient) -> R<()> {
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS postlog_schema (version BIGINT NOT NULL)")?;
    let version: i64 = tx
        .query_opt("SELECT version FROM postlog_schema", &[])?
        .map(|r| r.try_get(0))
        .transpose()?
        .unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        tx.batch_execute(sql)?;
        tx.execute("DELETE FROM postlog_schema", &[])?;
        tx.execute(
            "INSERT INTO postlog_schema (version) VALUES ($1)",
            &[&(i as i64 + 1)],
        )?;
    }
    tx.commit()?;
    Ok(())
}
