//! The store on SQLite (bundled): one connection, WAL journal (readers never
//! wait for the writer, another process may write beside), and
//! `PRAGMA data_version` to notice other processes' commits without reading
//! any table; only when it moved is the change counter read, which users'
//! and keys' writes bump and usage writes do not.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::schema::{self, KEY_COLUMNS, MIGRATIONS, USER_COLUMNS};
use super::{KeyPatch, KeyRecord, NewKey, NewUser, Snapshot, Store, StoreError, UsageRow, User, UserPatch};

/// A SQLite store.
pub struct Sqlite {
    conn: Connection,
    data_version: i64,
    /// The change counter as last seen.
    changes: i64,
}

/// Bumps the change counter, inside the transaction of a change.
const BUMP: &str = "UPDATE sluice_changes SET n = n + 1 WHERE id = 1";

fn db(error: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, _) = &error
        && failure.code == rusqlite::ErrorCode::ConstraintViolation
    {
        return StoreError::Conflict("a user of that name, or that key,".into());
    }
    StoreError::Database(error.to_string())
}

/// The portable SQL's `$N` parameters as SQLite's numbered `?N` (which bind
/// by number wherever they appear; SQLite would take `$N` as named ones
/// numbered by first appearance).
fn sql(portable: &str) -> String {
    portable.replace('$', "?")
}

fn user(row: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User { id: row.get(0)?, name: row.get(1)?, email: row.get(2)?, disabled: row.get(3)?, created_at: row.get(4)? })
}

/// Allowed models as stored: names joined by `,` (`*` for all).
pub(crate) fn models_text(models: &[String]) -> String {
    if models.is_empty() { "*".to_string() } else { models.join(",") }
}

pub(crate) fn models_list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|m| !m.is_empty()).map(str::to_string).collect()
}

fn key(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(KeyRecord {
        id: row.get(0)?,
        user_id: row.get(1)?,
        name: row.get(2)?,
        prefix: row.get(3)?,
        hash: row.get(4)?,
        models: models_list(&row.get::<_, String>(5)?),
        rpm: row.get(6)?,
        rph: row.get(7)?,
        tokens_per_day: row.get(8)?,
        expires_at: row.get(9)?,
        disabled: row.get(10)?,
        revoked_at: row.get(11)?,
        created_at: row.get(12)?,
        last_used_at: row.get(13)?,
        passthrough: row.get(14)?,
    })
}

fn usage_row(row: &Row<'_>) -> rusqlite::Result<UsageRow> {
    Ok(UsageRow {
        key_id: row.get(0)?,
        model: row.get(1)?,
        hour: row.get(2)?,
        requests: row.get(3)?,
        errors: row.get(4)?,
        prompt_tokens: row.get(5)?,
        completion_tokens: row.get(6)?,
        cached_tokens: row.get(7)?,
    })
}

impl Sqlite {
    /// Opens (creating) the file, in WAL mode with a 5 s busy timeout.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Database(format!("cannot create `{}`: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Database(format!("cannot open `{}`: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(db)?;
        Ok(Self { conn, data_version: 0, changes: -1 })
    }

    /// Runs a change to users or keys in one transaction that also bumps the
    /// change counter (which other processes poll).
    fn change<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let tx = self.conn.transaction().map_err(db)?;
        let out = f(&tx).map_err(db)?;
        tx.execute(BUMP, []).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(out)
    }

    /// Runs migrations up to `target` only (tests of upgrades from old versions).
    pub fn migrate_to(&mut self, target: u32) -> Result<u32, StoreError> {
        self.conn.execute_batch("CREATE TABLE IF NOT EXISTS sluice_schema (version BIGINT NOT NULL)").map_err(db)?;
        let mut version = self.version()?;
        if version > schema::latest() {
            return Err(StoreError::Database(format!(
                "the store is at schema version {version}, newer than this sluice knows ({}): upgrade sluice",
                schema::latest()
            )));
        }
        for migration in MIGRATIONS.iter().filter(|m| m.version <= target) {
            // Immediate: two processes starting on a new file migrate one
            // after the other, the second finding the work done.
            let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db)?;
            let now: Option<u32> =
                tx.query_row("SELECT max(version) FROM sluice_schema", [], |r| r.get(0)).map_err(db)?;
            if now.unwrap_or(0) >= migration.version {
                version = version.max(now.unwrap_or(0));
                continue;
            }
            for statement in migration.statements {
                tx.execute_batch(&statement.replace("{id}", "INTEGER PRIMARY KEY AUTOINCREMENT")).map_err(db)?;
            }
            tx.execute("DELETE FROM sluice_schema", []).map_err(db)?;
            tx.execute("INSERT INTO sluice_schema (version) VALUES (?1)", [migration.version]).map_err(db)?;
            tx.commit().map_err(db)?;
            version = migration.version;
        }
        Ok(version)
    }
}

impl Store for Sqlite {
    fn migrate(&mut self) -> Result<u32, StoreError> {
        self.migrate_to(schema::latest())
    }

    fn version(&mut self) -> Result<u32, StoreError> {
        let exists: bool = self
            .conn
            .query_row("SELECT count(*) > 0 FROM sqlite_master WHERE name = 'sluice_schema'", [], |r| r.get(0))
            .map_err(db)?;
        if !exists {
            return Ok(0);
        }
        let version: Option<u32> =
            self.conn.query_row("SELECT max(version) FROM sluice_schema", [], |r| r.get(0)).map_err(db)?;
        Ok(version.unwrap_or(0))
    }

    fn changed_elsewhere(&mut self) -> Result<bool, StoreError> {
        let version: i64 = self.conn.query_row("PRAGMA data_version", [], |r| r.get(0)).map_err(db)?;
        if version == self.data_version {
            return Ok(false);
        }
        self.data_version = version;
        let changes: i64 =
            self.conn.query_row("SELECT n FROM sluice_changes WHERE id = 1", [], |r| r.get(0)).map_err(db)?;
        Ok(std::mem::replace(&mut self.changes, changes) != changes)
    }

    fn prune_usage(&mut self, before_hour: i64) -> Result<u64, StoreError> {
        let deleted = self.conn.execute(&sql("DELETE FROM key_usage WHERE hour < $1"), [before_hour]).map_err(db)?;
        Ok(deleted as u64)
    }

    fn snapshot(&mut self, today_first_hour: i64) -> Result<Snapshot, StoreError> {
        let users = self.users()?;
        let keys = {
            let mut statement = self
                .conn
                .prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL ORDER BY id"))
                .map_err(db)?;
            statement.query_map([], key).map_err(db)?.collect::<Result<Vec<_>, _>>().map_err(db)?
        };
        let mut statement = self
            .conn
            .prepare_cached(&sql("SELECT key_id, sum(prompt_tokens + completion_tokens) FROM key_usage \
                                  WHERE hour >= $1 GROUP BY key_id"))
            .map_err(db)?;
        let tokens_today = statement
            .query_map([today_first_hour], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(Snapshot { users, keys, tokens_today })
    }

    fn create_user(&mut self, new: &NewUser, now: i64) -> Result<User, StoreError> {
        let id = self.change(|tx| {
            tx.execute(
                &sql("INSERT INTO users (name, email, created_at) VALUES ($1, $2, $3)"),
                params![new.name, new.email, now],
            )?;
            Ok(tx.last_insert_rowid())
        })?;
        self.user(id)?.ok_or_else(|| StoreError::Database("the new user vanished".into()))
    }

    fn users(&mut self) -> Result<Vec<User>, StoreError> {
        let mut statement =
            self.conn.prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users ORDER BY id")).map_err(db)?;
        statement.query_map([], user).map_err(db)?.collect::<Result<Vec<_>, _>>().map_err(db)
    }

    fn user(&mut self, id: i64) -> Result<Option<User>, StoreError> {
        self.conn
            .query_row(&sql(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1")), [id], user)
            .optional()
            .map_err(db)
    }

    fn update_user(&mut self, id: i64, patch: &UserPatch) -> Result<Option<User>, StoreError> {
        let Some(current) = self.user(id)? else { return Ok(None) };
        let next = patch.applied_to(current);
        self.change(|tx| {
            tx.execute(
                &sql("UPDATE users SET name = $1, email = $2, disabled = $3 WHERE id = $4"),
                params![next.name, next.email, next.disabled, id],
            )
        })?;
        self.user(id)
    }

    fn delete_user(&mut self, id: i64, now: i64) -> Result<bool, StoreError> {
        let deleted = self.change(|tx| {
            tx.execute(
                &sql("UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL"),
                params![now, id],
            )?;
            tx.execute(&sql("UPDATE api_keys SET user_id = NULL WHERE user_id = $1"), [id])?;
            tx.execute(&sql("DELETE FROM users WHERE id = $1"), [id])
        })?;
        Ok(deleted > 0)
    }

    fn create_key(&mut self, new: &NewKey, now: i64) -> Result<KeyRecord, StoreError> {
        let id = self.change(|tx| {
            tx.execute(
                &sql("INSERT INTO api_keys (user_id, name, prefix, key_hash, models, rpm, rph, tokens_per_day, \
                      expires_at, passthrough, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"),
                params![
                    new.user_id,
                    new.name,
                    new.prefix,
                    new.hash,
                    models_text(&new.models),
                    new.rpm,
                    new.rph,
                    new.tokens_per_day,
                    new.expires_at,
                    new.passthrough,
                    now
                ],
            )?;
            Ok(tx.last_insert_rowid())
        })?;
        self.key(id)?.ok_or_else(|| StoreError::Database("the new key vanished".into()))
    }

    fn keys(&mut self, user_id: Option<i64>) -> Result<Vec<KeyRecord>, StoreError> {
        let query = match user_id {
            Some(_) => format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY id"),
            None => format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"),
        };
        let mut statement = self.conn.prepare_cached(&sql(&query)).map_err(db)?;
        let rows = match user_id {
            Some(user_id) => statement.query_map([user_id], key),
            None => statement.query_map([], key),
        };
        rows.map_err(db)?.collect::<Result<Vec<_>, _>>().map_err(db)
    }

    fn key(&mut self, id: i64) -> Result<Option<KeyRecord>, StoreError> {
        self.conn
            .query_row(&sql(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1")), [id], key)
            .optional()
            .map_err(db)
    }

    fn update_key(&mut self, id: i64, patch: &KeyPatch) -> Result<Option<KeyRecord>, StoreError> {
        let Some(current) = self.key(id)? else { return Ok(None) };
        let next = patch.applied_to(current);
        self.change(|tx| {
            tx.execute(
                &sql("UPDATE api_keys SET name = $1, models = $2, rpm = $3, rph = $4, tokens_per_day = $5, \
                      expires_at = $6, disabled = $7, passthrough = $8 WHERE id = $9"),
                params![
                    next.name,
                    models_text(&next.models),
                    next.rpm,
                    next.rph,
                    next.tokens_per_day,
                    next.expires_at,
                    next.disabled,
                    next.passthrough,
                    id
                ],
            )
        })?;
        self.key(id)
    }

    fn revoke_key(&mut self, id: i64, now: i64) -> Result<bool, StoreError> {
        let changed = self.change(|tx| {
            tx.execute(
                &sql("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL"),
                params![now, id],
            )
        })?;
        Ok(changed > 0)
    }

    fn add_usage(&mut self, rows: &[UsageRow], last_used: &[(i64, i64)]) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(db)?;
        {
            let mut add = tx
                .prepare_cached(&sql(
                    "INSERT INTO key_usage (key_id, model, hour, requests, errors, prompt_tokens, completion_tokens, \
                     cached_tokens) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (key_id, model, hour) DO UPDATE \
                     SET requests = key_usage.requests + excluded.requests, errors = key_usage.errors + excluded.errors, \
                     prompt_tokens = key_usage.prompt_tokens + excluded.prompt_tokens, \
                     completion_tokens = key_usage.completion_tokens + excluded.completion_tokens, \
                     cached_tokens = key_usage.cached_tokens + excluded.cached_tokens",
                ))
                .map_err(db)?;
            for row in rows {
                add.execute(params![
                    row.key_id,
                    row.model,
                    row.hour,
                    row.requests,
                    row.errors,
                    row.prompt_tokens,
                    row.completion_tokens,
                    row.cached_tokens
                ])
                .map_err(db)?;
            }
            let mut touch = tx
                .prepare_cached(&sql(
                    "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
                ))
                .map_err(db)?;
            for (key_id, at) in last_used {
                touch.execute(params![at, key_id]).map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    fn usage(&mut self, key_id: Option<i64>, from_hour: i64, to_hour: i64) -> Result<Vec<UsageRow>, StoreError> {
        const COLUMNS: &str = "key_id, model, hour, requests, errors, prompt_tokens, completion_tokens, cached_tokens";
        // Two queries, so each uses its index (the key's, or the hour's).
        let rows = match key_id {
            Some(key_id) => self
                .conn
                .prepare_cached(&sql(&format!(
                    "SELECT {COLUMNS} FROM key_usage WHERE key_id = $1 AND hour >= $2 AND hour < $3 ORDER BY hour, model"
                )))
                .map_err(db)?
                .query_map(params![key_id, from_hour, to_hour], usage_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>(),
            None => self
                .conn
                .prepare_cached(&sql(&format!(
                    "SELECT {COLUMNS} FROM key_usage WHERE hour >= $1 AND hour < $2 ORDER BY key_id, hour, model"
                )))
                .map_err(db)?
                .query_map(params![from_hour, to_hour], usage_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>(),
        };
        rows.map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> (tempfile::TempDir, Sqlite) {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("s.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn an_empty_file_migrates_to_the_latest_schema() {
        let (_dir, mut store) = fresh();
        assert_eq!(store.version().unwrap(), 0);
        assert_eq!(store.migrate().unwrap(), schema::latest());
        assert_eq!(store.migrate().unwrap(), schema::latest(), "migrating twice changes nothing");
    }

    #[test]
    fn every_earlier_version_migrates_forward_keeping_its_data() {
        for start in 1..schema::latest() {
            let (_dir, mut store) = fresh();
            assert_eq!(store.migrate_to(start).unwrap(), start);
            // Data written at the old version, with the old version's columns.
            store.conn.execute("INSERT INTO users (name, created_at) VALUES ('old', 1)", []).unwrap();
            store
                .conn
                .execute(
                    "INSERT INTO api_keys (user_id, name, prefix, key_hash, created_at) VALUES (1, 'k', 'sk-sluice-Ab', 'h', 1)",
                    [],
                )
                .unwrap();
            assert_eq!(store.migrate().unwrap(), schema::latest());
            assert_eq!(store.users().unwrap()[0].name, "old");
            let key = store.key(1).unwrap().unwrap();
            assert_eq!(
                (key.prefix.as_str(), key.models.clone(), key.last_used_at),
                ("sk-sluice-Ab", vec!["*".to_string()], None)
            );
        }
    }

    #[test]
    fn users_keys_and_usage_round_trip() {
        let (_dir, mut store) = fresh();
        store.migrate().unwrap();
        let alice = store.create_user(&NewUser { name: "alice".into(), email: Some("a@x".into()) }, 10).unwrap();
        assert!(matches!(
            store.create_user(&NewUser { name: "alice".into(), email: None }, 11),
            Err(StoreError::Conflict(_))
        ));
        let new = NewKey {
            user_id: Some(alice.id),
            name: "ci".into(),
            prefix: "sk-sluice-Ab12".into(),
            hash: "ff".repeat(32),
            models: vec!["gpt-4o".into(), "mini".into()],
            rpm: Some(5),
            ..NewKey::default()
        };
        let key = store.create_key(&new, 12).unwrap();
        assert_eq!((key.models.len(), key.rpm, key.rph), (2, Some(5), None));
        let patched =
            store.update_key(key.id, &KeyPatch { rph: Some(Some(100)), ..KeyPatch::default() }).unwrap().unwrap();
        assert_eq!((patched.rpm, patched.rph), (Some(5), Some(100)));
        let row = UsageRow {
            key_id: key.id,
            model: "gpt-4o".into(),
            hour: 7,
            requests: 2,
            errors: 1,
            prompt_tokens: 30,
            completion_tokens: 9,
            cached_tokens: 0,
        };
        store.add_usage(std::slice::from_ref(&row), &[(key.id, 7 * 3600 + 5)]).unwrap();
        store.add_usage(&[row], &[(key.id, 7 * 3600 + 1)]).unwrap();
        let usage = store.usage(Some(key.id), 0, 100).unwrap();
        assert_eq!((usage.len(), usage[0].requests, usage[0].prompt_tokens), (1, 4, 60));
        assert_eq!(store.key(key.id).unwrap().unwrap().last_used_at, Some(7 * 3600 + 5), "the latest use stays");
        let snapshot = store.snapshot(0).unwrap();
        assert_eq!((snapshot.keys.len(), snapshot.tokens_today), (1, vec![(key.id, 78)]));
        assert!(store.revoke_key(key.id, 13).unwrap());
        assert!(store.snapshot(0).unwrap().keys.is_empty(), "revoked keys leave the table");
        assert!(store.delete_user(alice.id, 14).unwrap());
        assert!(store.users().unwrap().is_empty());
    }

    #[test]
    fn another_connections_commit_is_noticed() {
        let (dir, mut store) = fresh();
        store.migrate().unwrap();
        assert!(store.changed_elsewhere().is_ok());
        assert!(!store.changed_elsewhere().unwrap());
        let mut other = Sqlite::open(&dir.path().join("s.db")).unwrap();
        other.create_user(&NewUser { name: "bob".into(), email: None }, 1).unwrap();
        assert!(store.changed_elsewhere().unwrap());
        store.create_user(&NewUser { name: "carol".into(), email: None }, 1).unwrap();
        assert!(!store.changed_elsewhere().unwrap(), "its own writes are not news");
    }
}
