//! The admin API over the key store: users, keys, their usage and a summary,
//! under `/admin/` and, for the seed service's clients, under
//! `/api/v1/admin/` with its names (`api-keys`, `username`, `key_name`,
//! `api_key`). Every change goes through the store's thread and is in the
//! client table before the answer is sent, so it applies to the very next
//! request.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::access::manage::{self, Fields, KeyRequest, Totals};
use crate::access::store::{KeyRecord, StoreHandle, unix_now};
use crate::error::{ProxyError, json_response};
use crate::proxy::body::SluiceBody;
use crate::proxy::read::read_whole;
use crate::state::Shared;

/// Largest admin request body.
const MAX_ADMIN_BODY: u64 = 64 * 1024;
/// Usage shown when the request names no range: the last 30 days.
const DEFAULT_USAGE_SPAN: i64 = 30 * 86_400;

/// Which collection a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    /// `/admin/users`, `/api/v1/admin/users`.
    Users,
    /// `/admin/keys`, `/api/v1/admin/api-keys`.
    Keys,
    /// `/admin/stats`, `/api/v1/admin/stats`.
    Stats,
}

/// Splits an admin path into its collection and the rest (`""`, `/7`,
/// `/7/usage`); `None` if it names none.
pub fn collection(path: &str) -> Option<(Collection, &str)> {
    let (base, rest) = if let Some(rest) = path.strip_prefix("/api/v1/admin/") {
        (rest, "api")
    } else {
        (path.strip_prefix("/admin/")?, "native")
    };
    let (name, tail) = base.find('/').map_or((base, ""), |i| base.split_at(i));
    let which = match (name, rest) {
        ("users", _) => Collection::Users,
        ("keys", "native") | ("api-keys", "api") => Collection::Keys,
        ("stats", _) if tail.is_empty() => Collection::Stats,
        _ => return None,
    };
    Some((which, tail))
}

/// Serves one admin request on the store.
pub async fn handle(
    shared: &Shared,
    request: Request<Incoming>,
    which: Collection,
    tail: &str,
) -> Result<Response<SluiceBody>, ProxyError> {
    let store = shared.store.as_ref().ok_or_else(|| ProxyError::NoSuchItem("a key store ([store] url)".into()))?;
    let method = request.method().clone();
    let segments: Vec<&str> = tail.split('/').skip(1).collect();
    let query = request.uri().query().map(str::to_string);
    match (which, segments.as_slice()) {
        (Collection::Stats, []) => {
            only(&method, &[Method::GET])?;
            stats(store).await
        }
        (Collection::Users, []) => match method {
            Method::GET => reply(StatusCode::OK, list(store.read(|s| s.users()).await?)),
            Method::POST => {
                let new = body(request).await?.new_user()?;
                let user = store.write(move |s| s.create_user(&new, unix_now())).await?;
                reply(StatusCode::CREATED, json!(user))
            }
            _ => Err(not_allowed(method, "GET, POST")),
        },
        (Collection::Users, [id]) => {
            let id = item_id(id)?;
            match method {
                Method::GET => reply(StatusCode::OK, json!(found(store.read(move |s| s.user(id)).await?, "user", id)?)),
                Method::PATCH => {
                    let patch = body(request).await?.user_patch()?;
                    let user = store.write(move |s| s.update_user(id, &patch)).await?;
                    reply(StatusCode::OK, json!(found(user, "user", id)?))
                }
                Method::DELETE => {
                    let deleted = store.write(move |s| s.delete_user(id, unix_now())).await?;
                    found(deleted.then_some(()), "user", id)?;
                    reply(StatusCode::OK, json!({ "id": id, "deleted": true }))
                }
                _ => Err(not_allowed(method, "GET, PATCH, DELETE")),
            }
        }
        (Collection::Keys, []) => match method {
            Method::GET => {
                let user =
                    match query_value(query.as_deref(), "user_id") {
                        Some(text) => Some(text.parse::<i64>().map_err(|_| ProxyError::BadField {
                            field: "user_id",
                            reason: "must be a user id".into(),
                        })?),
                        None => None,
                    };
                let keys = store.read(move |s| s.keys(user)).await?;
                reply(StatusCode::OK, list(keys.iter().map(key_json).collect::<Vec<_>>()))
            }
            Method::POST => {
                let request: KeyRequest = body(request).await?.key_request()?;
                let issued = store.write(move |s| Ok(manage::issue_key(s, &request, unix_now()))).await??;
                let mut answer = key_json(&issued.record);
                // Shown this once; `api_key` is the seed service's name for it.
                answer["key"] = json!(issued.key);
                answer["api_key"] = json!(issued.key);
                reply(StatusCode::CREATED, answer)
            }
            _ => Err(not_allowed(method, "GET, POST")),
        },
        (Collection::Keys, [id]) => {
            let id = item_id(id)?;
            match method {
                Method::GET => {
                    reply(StatusCode::OK, key_json(&found(store.read(move |s| s.key(id)).await?, "key", id)?))
                }
                Method::PATCH => {
                    let patch = body(request).await?.key_patch()?;
                    let key = store.write(move |s| s.update_key(id, &patch)).await?;
                    reply(StatusCode::OK, key_json(&found(key, "key", id)?))
                }
                Method::DELETE => {
                    let revoked = store.write(move |s| s.revoke_key(id, unix_now())).await?;
                    found(revoked.then_some(()), "key (not revoked already)", id)?;
                    reply(StatusCode::OK, json!({ "id": id, "revoked": true }))
                }
                _ => Err(not_allowed(method, "GET, PATCH, DELETE")),
            }
        }
        (Collection::Keys, [id, "usage"]) => {
            only(&method, &[Method::GET])?;
            let id = item_id(id)?;
            let now = unix_now();
            let time = |name: &'static str, default: i64| match query_value(query.as_deref(), name) {
                Some(text) => {
                    manage::parse_time(&text, now).map_err(|reason| ProxyError::BadField { field: name, reason })
                }
                None => Ok(default),
            };
            let (from, to) = (time("from", now - DEFAULT_USAGE_SPAN)?, time("to", now)?);
            let (key, rows) = store
                .read(move |s| {
                    let key = s.key(id)?;
                    // Hours overlapping `from..=to`.
                    Ok((key, s.usage(Some(id), from.div_euclid(3600), to.div_euclid(3600) + 1)?))
                })
                .await?;
            found(key, "key", id)?;
            let by_model: Vec<Value> = manage::by_model(&rows)
                .into_iter()
                .map(|(model, t)| totals_json(json!({ "model": model }), &t))
                .collect();
            let by_hour: Vec<Value> = rows
                .iter()
                .map(|r| totals_json(json!({ "hour": r.hour * 3600, "model": r.model }), &Totals::of([r])))
                .collect();
            let total = totals_json(json!({}), &Totals::of(&rows));
            reply(
                StatusCode::OK,
                json!({ "key_id": id, "from": from, "to": to, "total": total, "by_model": by_model, "by_hour": by_hour }),
            )
        }
        _ => Err(ProxyError::NotFound(format!("{which:?} {tail}").to_lowercase())),
    }
}

/// `GET /admin/stats`: users, keys by state, and the last 24 hours' usage.
async fn stats(store: &StoreHandle) -> Result<Response<SluiceBody>, ProxyError> {
    let now = unix_now();
    let (users, keys, rows) = store
        .read(move |s| {
            Ok((s.users()?, s.keys(None)?, s.usage(None, now.div_euclid(3600) - 23, now.div_euclid(3600) + 1)?))
        })
        .await?;
    let user_disabled = |id: Option<i64>| id.is_some_and(|id| users.iter().any(|u| u.id == id && u.disabled));
    let revoked = keys.iter().filter(|k| k.revoked_at.is_some()).count();
    // A disabled user's keys are refused: disabled too.
    let disabled = keys.iter().filter(|k| k.revoked_at.is_none() && (k.disabled || user_disabled(k.user_id))).count();
    let expired = keys
        .iter()
        .filter(|k| {
            k.revoked_at.is_none()
                && !k.disabled
                && !user_disabled(k.user_id)
                && k.expires_at.is_some_and(|at| now >= at)
        })
        .count();
    let mut per_key: Vec<(i64, Totals)> = Vec::new();
    for row in &rows {
        match per_key.iter_mut().find(|(id, _)| *id == row.key_id) {
            Some((_, totals)) => totals.add(row),
            None => per_key.push((row.key_id, Totals::of([row]))),
        }
    }
    per_key.sort_by_key(|(_, totals)| std::cmp::Reverse(totals.requests));
    let top: Vec<Value> = per_key
        .iter()
        .take(10)
        .map(|(id, t)| {
            let name = keys.iter().find(|k| k.id == *id).map(|k| k.name.as_str());
            totals_json(json!({ "key_id": id, "name": name }), t)
        })
        .collect();
    let by_model: Vec<Value> =
        manage::by_model(&rows).into_iter().map(|(model, t)| totals_json(json!({ "model": model }), &t)).collect();
    reply(
        StatusCode::OK,
        json!({
            "users": users.len(),
            "keys": { "total": keys.len(), "active": keys.len() - revoked - disabled - expired, "disabled": disabled, "expired": expired, "revoked": revoked },
            "last_24h": totals_json(json!({}), &Totals::of(&rows)),
            "by_model": by_model,
            "top_keys": top,
        }),
    )
}

/// A key as the API shows it: never the key, never its hash.
pub fn key_json(key: &KeyRecord) -> Value {
    json!({
        "id": key.id,
        "user_id": key.user_id,
        "name": key.name,
        "prefix": manage::shown(&key.prefix),
        "models": if key.models.is_empty() { vec!["*".to_string()] } else { key.models.clone() },
        "rpm": key.rpm,
        "rph": key.rph,
        "tokens_per_day": key.tokens_per_day,
        "expires_at": key.expires_at,
        "disabled": key.disabled,
        "revoked": key.revoked_at.is_some(),
        "revoked_at": key.revoked_at,
        "passthrough": key.passthrough,
        "created_at": key.created_at,
        "last_used_at": key.last_used_at,
    })
}

fn totals_json(mut base: Value, totals: &Totals) -> Value {
    if let (Value::Object(map), Value::Object(sums)) = (&mut base, json!(totals)) {
        map.extend(sums);
    }
    base
}

fn list(items: impl serde::Serialize) -> Value {
    json!({ "object": "list", "data": items })
}

fn reply(status: StatusCode, value: Value) -> Result<Response<SluiceBody>, ProxyError> {
    Ok(json_response(status, value.to_string().into()))
}

async fn body(request: Request<Incoming>) -> Result<Fields, ProxyError> {
    Fields::parse(&read_whole(request.into_body(), MAX_ADMIN_BODY).await?)
}

fn item_id(text: &str) -> Result<i64, ProxyError> {
    text.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| ProxyError::NoSuchItem(format!("`{text}`")))
}

fn found<T>(item: Option<T>, what: &str, id: i64) -> Result<T, ProxyError> {
    item.ok_or_else(|| ProxyError::NoSuchItem(format!("{what} {id}")))
}

fn only(method: &Method, allowed: &[Method]) -> Result<(), ProxyError> {
    if allowed.contains(method) { Ok(()) } else { Err(not_allowed(method.clone(), "GET")) }
}

fn not_allowed(method: Method, allow: &'static str) -> ProxyError {
    ProxyError::MethodNotAllowed { method, allow }
}

/// One query parameter's value (admin queries hold ids and times: no escapes).
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| pair.strip_prefix(name)?.strip_prefix('=')).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_collection() {
        assert_eq!(collection("/admin/users"), Some((Collection::Users, "")));
        assert_eq!(collection("/admin/users/7"), Some((Collection::Users, "/7")));
        assert_eq!(collection("/admin/keys/7/usage"), Some((Collection::Keys, "/7/usage")));
        assert_eq!(collection("/api/v1/admin/api-keys/3"), Some((Collection::Keys, "/3")));
        assert_eq!(collection("/api/v1/admin/stats"), Some((Collection::Stats, "")));
        assert_eq!(collection("/admin/api-keys"), None);
        assert_eq!(collection("/api/v1/admin/keys"), None);
        assert_eq!(collection("/admin/usersX"), None);
        assert_eq!(collection("/admin/reload"), None);
    }

    #[test]
    fn query_values() {
        assert_eq!(query_value(Some("from=7d&to=1"), "to").as_deref(), Some("1"));
        assert_eq!(query_value(Some("user_id=3"), "user"), None);
    }
}
