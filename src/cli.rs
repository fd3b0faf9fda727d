//! `sluice init` ([`init`]), and `sluice users`, `sluice keys` and `sluice
//! usage`: the key store from the command line, with or without a server running on it (SQLite in WAL mode
//! lets both write; a running server sees the change within 2 s). Readable
//! tables by default, the admin API's JSON with `--json`.

pub mod init;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::access::manage::{self, KeyRequest, Totals};
use crate::access::store::{self, NewUser, Store, StoreUrl, UserPatch, unix_now};
use crate::admin::tenants::key_json;
use crate::config::Config;
use crate::telemetry::accesslog::rfc3339;

/// Where the store is: `--store URL`, else the config's `[store] url`.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Config file whose `[store] url` to use.
    #[arg(short, long, global = true, env = "SLUICE_CONFIG", default_value = "config/sluice.toml")]
    pub config: PathBuf,
    /// Store URL (`sqlite://PATH`), instead of the config's.
    #[arg(long, global = true)]
    pub store: Option<String>,
    /// Print JSON (the admin API's shapes) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Create the store if its file does not exist (a server creates it on
    /// its first start; without this a mistyped path is an error).
    #[arg(long, global = true)]
    pub create: bool,
}

/// `sluice users ...`
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user.
    Add {
        /// Unique name.
        name: String,
        /// Contact address.
        #[arg(long)]
        email: Option<String>,
    },
    /// List users.
    List,
    /// Disable a user: every key of theirs is refused.
    Disable {
        /// User id.
        id: i64,
    },
    /// Enable a disabled user again.
    Enable {
        /// User id.
        id: i64,
    },
}

/// `sluice keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key; it is printed once and stored only as its hash.
    Create {
        /// Owner's user id.
        #[arg(long)]
        user: Option<i64>,
        /// A name for people.
        #[arg(long, default_value = "key")]
        name: String,
        /// Allowed models, comma-separated (names or aliases; default all).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Requests per minute (0: none; default: `[limits] rpm`).
        #[arg(long)]
        rpm: Option<u32>,
        /// Requests per hour (0: none; default: `[limits] rph`).
        #[arg(long)]
        rph: Option<u32>,
        /// Tokens per UTC day.
        #[arg(long)]
        tokens_per_day: Option<u64>,
        /// Expiry: unix seconds, YYYY-MM-DD, or a lifetime like 90s, 12h, 30d.
        #[arg(long)]
        expires: Option<String>,
        /// May call paths beyond the inference endpoints (files, batches,
        /// assistants), which live in the upstream account all tenants share.
        #[arg(long)]
        passthrough: bool,
    },
    /// List keys (by prefix; the keys themselves are not stored).
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<i64>,
    },
    /// Revoke a key for good.
    Revoke {
        /// Key id.
        id: i64,
    },
    /// Show one key and its usage of the last 30 days.
    Show {
        /// Key id.
        id: i64,
    },
}

/// `sluice usage`'s options.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this key.
    #[arg(long)]
    pub key: Option<i64>,
    /// Since: an age (24h, 7d), a date (YYYY-MM-DD) or unix seconds.
    #[arg(long, default_value = "7d")]
    pub since: String,
}

fn open(args: &StoreArgs) -> Result<Box<dyn Store>, String> {
    let url = match &args.store {
        Some(url) => StoreUrl::parse(url, &std::env::current_dir().map_err(|e| e.to_string())?)?,
        None => {
            let config = Config::load(&args.config).map_err(|e| e.to_string())?;
            config.store.map(|s| s.url).ok_or_else(|| {
                format!("{} has no [store] url; give one with --store sqlite://PATH", args.config.display())
            })?
        }
    };
    if let StoreUrl::Sqlite(path) = &url
        && !args.create
        && !path.exists()
    {
        return Err(format!("no store at {url} (a server creates it on its first start; --create makes it here)"));
    }
    store::open(&url).map_err(|e| format!("{e} ({url})"))
}

/// Runs `sluice users ...`; returns what to print.
pub fn users(args: &StoreArgs, command: UsersCommand) -> Result<String, String> {
    let mut store = open(args)?;
    let now = unix_now();
    let user = match command {
        UsersCommand::Add { name, email } => {
            let name = manage::check_name("name", &name).map_err(|e| e.to_string())?;
            store.create_user(&NewUser { name, email }, now).map_err(|e| e.to_string())?
        }
        UsersCommand::List => {
            let users = store.users().map_err(|e| e.to_string())?;
            if args.json {
                return Ok(json!(users).to_string());
            }
            let mut out = format!("{:<6} {:<24} {:<28} {:<9} CREATED\n", "ID", "NAME", "EMAIL", "STATE");
            for u in &users {
                let state = if u.disabled { "disabled" } else { "active" };
                let email = u.email.as_deref().unwrap_or("-");
                let _ = writeln!(out, "{:<6} {:<24} {:<28} {state:<9} {}", u.id, u.name, email, time(u.created_at));
            }
            return Ok(out);
        }
        UsersCommand::Disable { id } | UsersCommand::Enable { id } => {
            let disabled = matches!(command, UsersCommand::Disable { .. });
            let patch = UserPatch { disabled: Some(disabled), ..UserPatch::default() };
            store.update_user(id, &patch).map_err(|e| e.to_string())?.ok_or(format!("user {id} does not exist"))?
        }
    };
    Ok(if args.json {
        json!(user).to_string()
    } else {
        let state = if user.disabled { "disabled" } else { "active" };
        format!("user {} `{}` ({state})", user.id, user.name)
    })
}

/// Runs `sluice keys ...`; returns what to print.
pub fn keys(args: &StoreArgs, command: KeysCommand) -> Result<String, String> {
    let mut store = open(args)?;
    let now = unix_now();
    match command {
        KeysCommand::Create { user, name, models, rpm, rph, tokens_per_day, expires, passthrough } => {
            let expires_at = match expires {
                // A lifetime (`90s`, `12h`, `30d`) counts forward from now; a
                // date or unix seconds are taken as they are.
                Some(text) if text.ends_with(['s', 'm', 'h', 'd']) => Some(2 * now - manage::parse_time(&text, now)?),
                Some(text) => Some(manage::parse_time(&text, now)?),
                None => None,
            };
            let request = KeyRequest {
                user_id: user,
                name: manage::check_name("name", &name).map_err(|e| e.to_string())?,
                models: manage::check_models("models", models).map_err(|e| e.to_string())?,
                rpm: rpm.map(i64::from),
                rph: rph.map(i64::from),
                tokens_per_day: tokens_per_day.map(|t| t.min(i64::MAX as u64) as i64),
                expires_at,
                passthrough,
            };
            let issued = manage::issue_key(store.as_mut(), &request, now).map_err(|e| e.to_string())?;
            if args.json {
                let mut answer = key_json(&issued.record);
                answer["key"] = json!(issued.key);
                return Ok(answer.to_string());
            }
            Ok(format!(
                "key {} `{}` created. It is shown this once; only its hash is stored:\n\n  {}\n",
                issued.record.id, issued.record.name, issued.key
            ))
        }
        KeysCommand::List { user } => {
            let keys = store.keys(user).map_err(|e| e.to_string())?;
            if args.json {
                return Ok(Value::Array(keys.iter().map(key_json).collect()).to_string());
            }
            let mut out = format!(
                "{:<6} {:<6} {:<18} {:<16} {:<20} {:>6} {:>6} {:<10} LAST USED\n",
                "ID", "USER", "NAME", "KEY", "MODELS", "RPM", "RPH", "STATE"
            );
            for k in &keys {
                let state = if k.revoked_at.is_some() {
                    "revoked"
                } else if k.disabled {
                    "disabled"
                } else if k.expires_at.is_some_and(|at| now >= at) {
                    "expired"
                } else {
                    "active"
                };
                let models = if k.models.is_empty() { "*".to_string() } else { k.models.join(",") };
                let limit = |l: Option<i64>| l.map_or_else(|| "dflt".to_string(), |l| l.to_string());
                let _ = writeln!(
                    out,
                    "{:<6} {:<6} {:<18} {:<16} {:<20} {:>6} {:>6} {state:<10} {}",
                    k.id,
                    k.user_id.map_or_else(|| "-".to_string(), |u| u.to_string()),
                    k.name,
                    manage::shown(&k.prefix),
                    models,
                    limit(k.rpm),
                    limit(k.rph),
                    k.last_used_at.map_or_else(|| "never".to_string(), time),
                );
            }
            Ok(out)
        }
        KeysCommand::Revoke { id } => {
            if !store.revoke_key(id, now).map_err(|e| e.to_string())? {
                return Err(format!("key {id} does not exist or is revoked already"));
            }
            Ok(if args.json { json!({ "id": id, "revoked": true }).to_string() } else { format!("key {id} revoked") })
        }
        KeysCommand::Show { id } => {
            let key = store.key(id).map_err(|e| e.to_string())?.ok_or(format!("key {id} does not exist"))?;
            let rows = store.usage(Some(id), (now - 30 * 86_400).div_euclid(3600), now.div_euclid(3600) + 1);
            let rows = rows.map_err(|e| e.to_string())?;
            let totals = Totals::of(&rows);
            if args.json {
                let mut answer = key_json(&key);
                answer["usage_30d"] = json!(totals);
                return Ok(answer.to_string());
            }
            let mut out = String::new();
            let view = key_json(&key);
            if let Value::Object(fields) = &view {
                for (name, value) in fields {
                    let _ = writeln!(out, "{name:<16} {value}");
                }
            }
            let _ = writeln!(
                out,
                "{:<16} {} requests, {} errors, {} prompt + {} completion tokens",
                "usage (30 d)", totals.requests, totals.errors, totals.prompt_tokens, totals.completion_tokens
            );
            Ok(out)
        }
    }
}

/// Runs `sluice usage`; returns what to print.
pub fn usage(args: &StoreArgs, options: &UsageArgs) -> Result<String, String> {
    let mut store = open(args)?;
    let now = unix_now();
    let since = manage::parse_time(&options.since, now)?;
    let rows = store.usage(options.key, since.div_euclid(3600), now.div_euclid(3600) + 1).map_err(|e| e.to_string())?;
    let keys = store.keys(None).map_err(|e| e.to_string())?;
    let mut per_key: Vec<(i64, String, Totals)> = Vec::new();
    for row in &rows {
        match per_key.iter_mut().find(|(id, model, _)| *id == row.key_id && *model == row.model) {
            Some((_, _, totals)) => totals.add(row),
            None => per_key.push((row.key_id, row.model.clone(), Totals::of([row]))),
        }
    }
    if args.json {
        let items: Vec<Value> = per_key
            .iter()
            .map(|(id, model, t)| {
                json!({ "key_id": id, "model": model, "requests": t.requests, "errors": t.errors,
                        "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens, "cached_tokens": t.cached_tokens })
            })
            .collect();
        return Ok(json!({ "since": since, "to": now, "total": Totals::of(&rows), "data": items }).to_string());
    }
    let mut out = format!("since {}\n", time(since));
    let _ = writeln!(
        out,
        "{:<6} {:<18} {:<24} {:>10} {:>8} {:>12} {:>12}",
        "KEY", "NAME", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION"
    );
    for (id, model, t) in &per_key {
        let name = keys.iter().find(|k| k.id == *id).map_or("-", |k| k.name.as_str());
        let _ = writeln!(
            out,
            "{id:<6} {name:<18} {model:<24} {:>10} {:>8} {:>12} {:>12}",
            t.requests, t.errors, t.prompt_tokens, t.completion_tokens
        );
    }
    let t = Totals::of(&rows);
    let _ = writeln!(
        out,
        "{:<6} {:<18} {:<24} {:>10} {:>8} {:>12} {:>12}",
        "all", "", "", t.requests, t.errors, t.prompt_tokens, t.completion_tokens
    );
    Ok(out)
}

/// Unix seconds as RFC 3339 (UTC, whole seconds).
fn time(unix: i64) -> String {
    let mut text = rfc3339(UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64));
    text.replace_range(19.., "Z");
    text
}
