//! Managing users and keys, for the admin API and the CLI alike: the fields
//! a change may carry (checked one by one, so a refusal names the field),
//! making a key (shown once, stored as its hash), and the usage sums both
//! show.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::access::auth::{KEY_PREFIX, SHOWN_CHARS, generate_key};
use crate::access::limits::MAX_WINDOW_LIMIT;
use crate::access::store::{KeyPatch, KeyRecord, NewKey, NewUser, Store, StoreError, UsageRow, UserPatch};
use crate::access::table::key_hash;
use crate::error::ProxyError;

/// Longest user or key name.
const MAX_NAME: usize = 128;
/// Most models one key may name.
const MAX_MODELS: usize = 256;

impl From<StoreError> for ProxyError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(what) => ProxyError::Conflict(format!("{what} already exists")),
            StoreError::Database(_) | StoreError::Closed => ProxyError::Store(error.to_string()),
        }
    }
}

/// A user or key name, trimmed: 1 to 128 printable characters.
pub fn check_name(field: &'static str, name: &str) -> Result<String, ProxyError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(bad(field, "must be 1 to 128 printable characters"));
    }
    Ok(name.to_string())
}

/// Model names for a key, as the CLI takes them: `*` anywhere is all (empty).
pub fn check_models(field: &'static str, models: Vec<String>) -> Result<Vec<String>, ProxyError> {
    let models: Vec<String> = models.into_iter().map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
    if models.len() > MAX_MODELS || models.iter().any(|m| m.len() > MAX_NAME || m.contains(',')) {
        return Err(bad(field, "must be at most 256 model names of at most 128 characters, without commas"));
    }
    Ok(if models.iter().any(|m| m == "*") { Vec::new() } else { models })
}

/// A JSON object's fields, taken one at a time; whatever is left over is an
/// unknown field and refused by name.
pub struct Fields(Map<String, Value>);

fn bad(field: &'static str, reason: impl Into<String>) -> ProxyError {
    ProxyError::BadField { field, reason: reason.into() }
}

impl Fields {
    /// The fields of a JSON object body (an empty body is an empty object).
    pub fn parse(body: &[u8]) -> Result<Self, ProxyError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(Map::new()));
        }
        match serde_json::from_slice(body) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ProxyError::BadJson("the body must be a JSON object".into())),
            Err(e) => Err(ProxyError::BadJson(e.to_string())),
        }
    }

    fn take(&mut self, names: &[&'static str]) -> Option<(&'static str, Value)> {
        names.iter().find_map(|name| self.0.remove(*name).map(|v| (*name, v)))
    }

    /// A required name (1 to 128 characters, no control characters).
    fn name(&mut self, names: &[&'static str]) -> Result<Option<String>, ProxyError> {
        let Some((field, value)) = self.take(names) else { return Ok(None) };
        let Value::String(name) = value else { return Err(bad(field, "must be a string")) };
        check_name(field, &name).map(Some)
    }

    /// `Some(None)` when the field is `null`.
    fn optional_string(&mut self, field: &'static str) -> Result<Option<Option<String>>, ProxyError> {
        match self.take(&[field]) {
            None => Ok(None),
            Some((_, Value::Null)) => Ok(Some(None)),
            Some((_, Value::String(s))) if s.len() <= 320 && !s.chars().any(char::is_control) => Ok(Some(Some(s))),
            Some(_) => Err(bad(field, "must be a string of at most 320 characters, or null")),
        }
    }

    fn bool(&mut self, field: &'static str) -> Result<Option<bool>, ProxyError> {
        match self.take(&[field]) {
            None => Ok(None),
            Some((_, Value::Bool(b))) => Ok(Some(b)),
            Some(_) => Err(bad(field, "must be true or false")),
        }
    }

    /// A whole number in `0..=max`, or `null` (`Some(None)`).
    fn count(&mut self, field: &'static str, max: i64) -> Result<Option<Option<i64>>, ProxyError> {
        match self.take(&[field]) {
            None => Ok(None),
            Some((_, Value::Null)) => Ok(Some(None)),
            Some((_, value)) => match value.as_i64() {
                Some(n) if (0..=max).contains(&n) => Ok(Some(Some(n))),
                _ => Err(bad(field, format!("must be a whole number from 0 to {max}, or null"))),
            },
        }
    }

    fn models(&mut self) -> Result<Option<Vec<String>>, ProxyError> {
        let Some((field, value)) = self.take(&["models", "allowed_models"]) else { return Ok(None) };
        let models = match value {
            Value::Null => Vec::new(),
            Value::String(s) if s == "*" => Vec::new(),
            Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) if !s.trim().is_empty() && !s.contains(',') && s.len() <= MAX_NAME => {
                        Ok(s.trim().to_string())
                    }
                    _ => Err(bad(field, "must list model names (strings without commas)")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(bad(field, "must be a list of model names, or \"*\"")),
        };
        if models.len() > MAX_MODELS {
            return Err(bad(field, "lists too many models"));
        }
        // `*` anywhere in the list means every model (an empty list).
        if models.iter().any(|m| m == "*") {
            return Ok(Some(Vec::new()));
        }
        Ok(Some(models))
    }

    /// Refuses the first field nobody took.
    fn finish(self) -> Result<(), ProxyError> {
        match self.0.keys().next() {
            Some(unknown) => Err(ProxyError::BadField {
                field: "body",
                reason: format!("unknown field `{}`", crate::error::printable(unknown)),
            }),
            None => Ok(()),
        }
    }

    /// A purge's `model` (absent: every model); no other field.
    pub fn model_name(mut self) -> Result<Option<String>, ProxyError> {
        let model = match self.take(&["model"]) {
            None | Some((_, Value::Null)) => None,
            Some((_, Value::String(model))) if !model.trim().is_empty() => Some(model.trim().to_string()),
            Some(_) => return Err(bad("model", "must be a model name")),
        };
        self.finish()?;
        Ok(model)
    }

    /// A new user: `name` (or the seed's `username`), `email`.
    pub fn new_user(mut self) -> Result<NewUser, ProxyError> {
        let name = self.name(&["name", "username"])?.ok_or_else(|| bad("name", "is required"))?;
        let email = self.optional_string("email")?.flatten();
        self.finish()?;
        Ok(NewUser { name, email })
    }

    /// Changes to a user: `name`, `email`, `disabled`.
    pub fn user_patch(mut self) -> Result<UserPatch, ProxyError> {
        let patch = UserPatch {
            name: self.name(&["name", "username"])?,
            email: self.optional_string("email")?,
            disabled: self.bool("disabled")?,
        };
        self.finish()?;
        Ok(patch)
    }

    /// A key to make: `user_id`, `name` (or the seed's `key_name`), `models`,
    /// `rpm`, `rph`, `tokens_per_day`, `expires_at` (unix seconds).
    pub fn key_request(mut self) -> Result<KeyRequest, ProxyError> {
        let user_id = match self.take(&["user_id"]) {
            None | Some((_, Value::Null)) => None,
            Some((_, value)) => {
                Some(value.as_i64().filter(|id| *id > 0).ok_or_else(|| bad("user_id", "must be a user id"))?)
            }
        };
        let request = KeyRequest {
            user_id,
            name: self.name(&["name", "key_name"])?.unwrap_or_else(|| "key".to_string()),
            models: self.models()?.unwrap_or_default(),
            rpm: self.count("rpm", i64::from(MAX_WINDOW_LIMIT))?.flatten(),
            rph: self.count("rph", i64::from(MAX_WINDOW_LIMIT))?.flatten(),
            tokens_per_day: self.count("tokens_per_day", i64::MAX)?.flatten(),
            expires_at: self.count("expires_at", i64::MAX)?.flatten(),
            passthrough: self.bool("passthrough")?.unwrap_or(false),
        };
        self.finish()?;
        Ok(request)
    }

    /// Changes to a key: `name`, `models`, `rpm`, `rph`, `tokens_per_day`,
    /// `expires_at`, `disabled` (`null` clears a limit).
    pub fn key_patch(mut self) -> Result<KeyPatch, ProxyError> {
        let patch = KeyPatch {
            name: self.name(&["name", "key_name"])?,
            models: self.models()?,
            rpm: self.count("rpm", i64::from(MAX_WINDOW_LIMIT))?,
            rph: self.count("rph", i64::from(MAX_WINDOW_LIMIT))?,
            tokens_per_day: self.count("tokens_per_day", i64::MAX)?,
            expires_at: self.count("expires_at", i64::MAX)?,
            disabled: self.bool("disabled")?,
            passthrough: self.bool("passthrough")?,
        };
        self.finish()?;
        Ok(patch)
    }
}

/// A key to make, as the admin API or the CLI asked for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRequest {
    /// Owner.
    pub user_id: Option<i64>,
    /// A name for people.
    pub name: String,
    /// Allowed models; empty: all.
    pub models: Vec<String>,
    /// Requests per minute (`None`: the `[limits]` default; 0: none).
    pub rpm: Option<i64>,
    /// Requests per hour (as `rpm`).
    pub rph: Option<i64>,
    /// Tokens per UTC day.
    pub tokens_per_day: Option<i64>,
    /// Unix seconds after which it is refused.
    pub expires_at: Option<i64>,
    /// May call paths beyond the inference endpoints.
    pub passthrough: bool,
}

/// A key just made: the key itself (shown this once) and what was stored.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedKey {
    /// The key; never stored, never shown again.
    pub key: String,
    /// The stored record.
    #[serde(flatten)]
    pub record: KeyRecord,
}

/// Makes a key for `request` and stores its hash. A named user must exist.
pub fn issue_key(store: &mut dyn Store, request: &KeyRequest, now: i64) -> Result<IssuedKey, ProxyError> {
    for (field, limit) in [("rpm", request.rpm), ("rph", request.rph)] {
        if limit.is_some_and(|l| !(0..=i64::from(MAX_WINDOW_LIMIT)).contains(&l)) {
            return Err(bad(field, format!("must be from 0 to {MAX_WINDOW_LIMIT}")));
        }
    }
    if let Some(user_id) = request.user_id
        && store.user(user_id)?.is_none()
    {
        return Err(ProxyError::BadField { field: "user_id", reason: format!("user {user_id} does not exist") });
    }
    let key = generate_key().map_err(ProxyError::Internal)?;
    let new = NewKey {
        user_id: request.user_id,
        name: request.name.clone(),
        prefix: key[..SHOWN_CHARS].to_string(),
        hash: hex::encode(key_hash(key.as_bytes())),
        models: request.models.clone(),
        rpm: request.rpm,
        rph: request.rph,
        tokens_per_day: request.tokens_per_day,
        expires_at: request.expires_at,
        passthrough: request.passthrough,
    };
    let record = store.create_key(&new, now)?;
    Ok(IssuedKey { key, record })
}

/// How a stored key is shown: its prefix and an ellipsis (`sk-sluice-Ab12…`).
pub fn shown(prefix: &str) -> String {
    debug_assert!(prefix.starts_with(KEY_PREFIX) || prefix.len() <= SHOWN_CHARS);
    format!("{prefix}…")
}

/// Usage summed over some rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Requests answered.
    pub requests: i64,
    /// Of which errors.
    pub errors: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Tokens served from the cache.
    pub cached_tokens: i64,
}

impl Totals {
    /// Adds one row.
    pub fn add(&mut self, row: &UsageRow) {
        self.requests += row.requests;
        self.errors += row.errors;
        self.prompt_tokens += row.prompt_tokens;
        self.completion_tokens += row.completion_tokens;
        self.cached_tokens += row.cached_tokens;
    }

    /// The sum of `rows`.
    pub fn of<'a>(rows: impl IntoIterator<Item = &'a UsageRow>) -> Self {
        let mut totals = Self::default();
        rows.into_iter().for_each(|row| totals.add(row));
        totals
    }
}

/// Usage of `rows` per model, busiest first.
pub fn by_model(rows: &[UsageRow]) -> Vec<(String, Totals)> {
    let mut models: Vec<(String, Totals)> = Vec::new();
    for row in rows {
        match models.iter_mut().find(|(m, _)| *m == row.model) {
            Some((_, totals)) => totals.add(row),
            None => models.push((row.model.clone(), Totals::of([row]))),
        }
    }
    models.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then_with(|| a.0.cmp(&b.0)));
    models
}

/// A point in time as the admin API and the CLI take it: unix seconds, a
/// UTC date `YYYY-MM-DD`, or an age (`90m`, `24h`, `7d`) before `now`.
pub fn parse_time(text: &str, now: i64) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs);
    }
    if let Some((number, unit)) = text.split_at_checked(text.len().saturating_sub(1))
        && let Ok(n) = number.parse::<i64>()
        && n >= 0
    {
        let unit = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(format!("`{text}`: an age takes s, m, h or d")),
        };
        return Ok(now - n.saturating_mul(unit));
    }
    let parts: Vec<&str> = text.split('-').collect();
    if let [y, m, d] = parts[..]
        && let (Ok(y), Ok(m), Ok(d)) = (y.parse::<i64>(), m.parse::<u32>(), d.parse::<u32>())
        && (1..=12).contains(&m)
        && (1..=31).contains(&d)
    {
        return Ok(days_from_civil(y, m, d) * 86_400);
    }
    Err(format!("`{text}` is not a time (unix seconds, YYYY-MM-DD, or an age like 7d)"))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> Fields {
        Fields::parse(json.as_bytes()).unwrap()
    }

    fn field_of(error: ProxyError) -> &'static str {
        match error {
            ProxyError::BadField { field, .. } => field,
            other => panic!("not a field error: {other:?}"),
        }
    }

    #[test]
    fn a_refusal_names_the_field() {
        assert_eq!(field_of(fields(r#"{"email":"a@b"}"#).new_user().unwrap_err()), "name");
        assert_eq!(field_of(fields(r#"{"name":7}"#).new_user().unwrap_err()), "name");
        assert_eq!(field_of(fields(r#"{"name":"a","colour":"red"}"#).new_user().unwrap_err()), "body");
        assert_eq!(field_of(fields(r#"{"rpm":2000000}"#).key_request().unwrap_err()), "rpm");
        assert_eq!(field_of(fields(r#"{"rph":-1}"#).key_request().unwrap_err()), "rph");
        assert_eq!(field_of(fields(r#"{"models":"gpt"}"#).key_request().unwrap_err()), "models");
        assert_eq!(field_of(fields(r#"{"user_id":"1"}"#).key_request().unwrap_err()), "user_id");
        assert_eq!(field_of(fields(r#"{"disabled":"yes"}"#).key_patch().unwrap_err()), "disabled");
        assert!(matches!(Fields::parse(b"[1]"), Err(ProxyError::BadJson(_))));
    }

    #[test]
    fn the_seed_services_names_are_accepted() {
        assert_eq!(fields(r#"{"username":"u","email":"e"}"#).new_user().unwrap().name, "u");
        let request = fields(r#"{"user_id":1,"key_name":"mine"}"#).key_request().unwrap();
        assert_eq!((request.user_id, request.name.as_str(), request.models.len()), (Some(1), "mine", 0));
    }

    #[test]
    fn a_patch_tells_clearing_from_leaving() {
        let patch = fields(r#"{"rpm":null,"models":["a"],"passthrough":true}"#).key_patch().unwrap();
        assert_eq!((patch.rpm, patch.rph, patch.models), (Some(None), None, Some(vec!["a".to_string()])));
        assert_eq!(patch.passthrough, Some(true));
        let all = fields(r#"{"models":["a","*"]}"#).key_patch().unwrap();
        assert_eq!(all.models, Some(vec![]), "`*` anywhere is every model");
    }

    #[test]
    fn times() {
        let now = 1_000_000;
        assert_eq!(parse_time("12345", now), Ok(12345));
        assert_eq!(parse_time("7d", now), Ok(now - 7 * 86_400));
        assert_eq!(parse_time("90m", now), Ok(now - 5400));
        assert_eq!(parse_time("1970-01-02", now), Ok(86_400));
        assert_eq!(parse_time("2026-12-02", now), Ok(1_796_169_600));
        assert!(parse_time("soon", now).is_err());
        assert!(parse_time("5y", now).is_err());
    }
}
