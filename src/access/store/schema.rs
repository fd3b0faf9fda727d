//! The store's schema, as forward migrations written once for every engine:
//! portable SQL (`BIGINT`, `TEXT`, `BOOLEAN`, `$N` parameters, `ON CONFLICT
//! ... DO UPDATE`), with `{id}` standing for the engine's auto-increment key.
//! Version `n` is reached by running every migration up to `n` in order;
//! `sluice_schema` holds the version reached.

/// The columns a [`User`](super::User) is read from, in its fields' order
/// (every engine's row readers go by position).
pub const USER_COLUMNS: &str = "id, name, email, disabled, created_at";
/// The columns a [`KeyRecord`](super::KeyRecord) is read from, in its fields' order.
pub const KEY_COLUMNS: &str = "id, user_id, name, prefix, key_hash, models, rpm, rph, tokens_per_day, expires_at, \
                               disabled, revoked_at, created_at, last_used_at, passthrough";

/// One migration: the statements that take the schema from `version - 1` to `version`.
pub struct Migration {
    /// The version this migration reaches.
    pub version: u32,
    /// Statements, in order.
    pub statements: &'static [&'static str],
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        statements: &[
            "CREATE TABLE users (
                id {id},
                name TEXT NOT NULL UNIQUE,
                email TEXT,
                disabled BOOLEAN NOT NULL DEFAULT FALSE,
                created_at BIGINT NOT NULL
            )",
            "CREATE TABLE api_keys (
                id {id},
                user_id BIGINT REFERENCES users(id),
                name TEXT NOT NULL,
                prefix TEXT NOT NULL,
                key_hash TEXT NOT NULL UNIQUE,
                models TEXT NOT NULL DEFAULT '*',
                rpm BIGINT,
                rph BIGINT,
                tokens_per_day BIGINT,
                expires_at BIGINT,
                disabled BOOLEAN NOT NULL DEFAULT FALSE,
                revoked_at BIGINT,
                created_at BIGINT NOT NULL
            )",
            "CREATE INDEX api_keys_user ON api_keys (user_id)",
        ],
    },
    Migration {
        version: 2,
        statements: &[
            "ALTER TABLE api_keys ADD COLUMN last_used_at BIGINT",
            "CREATE TABLE key_usage (
                key_id BIGINT NOT NULL,
                model TEXT NOT NULL,
                hour BIGINT NOT NULL,
                requests BIGINT NOT NULL DEFAULT 0,
                errors BIGINT NOT NULL DEFAULT 0,
                prompt_tokens BIGINT NOT NULL DEFAULT 0,
                completion_tokens BIGINT NOT NULL DEFAULT 0,
                cached_tokens BIGINT NOT NULL DEFAULT 0,
                PRIMARY KEY (key_id, model, hour)
            )",
        ],
    },
    Migration {
        version: 3,
        statements: &[
            "ALTER TABLE api_keys ADD COLUMN passthrough BOOLEAN NOT NULL DEFAULT FALSE",
            // The day's tokens and the global usage views read by hour.
            "CREATE INDEX key_usage_hour ON key_usage (hour)",
            // Bumped by every change to users and keys (not by usage), so other
            // processes refresh their client table for those only.
            "CREATE TABLE sluice_changes (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)",
            "INSERT INTO sluice_changes (id, n) VALUES (1, 0)",
        ],
    },
];

/// The newest schema version.
pub fn latest() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}
