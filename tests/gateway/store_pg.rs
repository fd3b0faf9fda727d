//! The key store on a real PostgreSQL (its own cluster per test, on a free
//! port): migrations (also by several instances at once), the same results
//! as on SQLite, other instances' changes noticed, and a server that goes
//! away and comes back without reopening the store.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice::access::store::{self, KeyPatch, NewKey, NewUser, Store, StoreError, StoreUrl, UsageRow, schema};

use crate::support::servers::PgServer;

fn open(server: &PgServer) -> Box<dyn Store> {
    let url = StoreUrl::parse(&server.url(), Path::new("/")).unwrap();
    store::open(&url).unwrap_or_else(|e| panic!("cannot open {url}: {e}"))
}

fn new_key(user_id: Option<i64>, hash: &str) -> NewKey {
    NewKey {
        user_id,
        name: "ci".into(),
        prefix: "sk-sluice-Ab12".into(),
        hash: hash.into(),
        models: vec!["gpt-4o".into(), "mini".into()],
        rpm: Some(5),
        ..NewKey::default()
    }
}

#[test]
fn a_fresh_database_migrates_to_the_latest_schema_once() {
    let server = PgServer::start();
    let mut store = open(&server);
    assert_eq!(store.version().unwrap(), schema::latest());
    assert_eq!(store.migrate().unwrap(), schema::latest(), "migrating twice changes nothing");
    store.create_user(&NewUser { name: "alice".into(), email: None }, 1).unwrap();
    drop(store);
    let mut again = open(&server);
    assert_eq!(again.version().unwrap(), schema::latest());
    assert_eq!(again.users().unwrap().len(), 1, "reopening keeps the data");
}

#[test]
fn instances_starting_together_on_a_fresh_database_all_reach_the_latest_schema() {
    let server = PgServer::start();
    let url = StoreUrl::parse(&server.url(), Path::new("/")).unwrap();
    let barrier = std::sync::Barrier::new(3);
    let versions: Vec<Result<u32, String>> = std::thread::scope(|scope| {
        let starts: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    let mut store = store::open(&url).map_err(|e| e.to_string())?;
                    store.version().map_err(|e| e.to_string())
                })
            })
            .collect();
        starts.into_iter().map(|start| start.join().unwrap()).collect()
    });
    assert_eq!(versions, vec![Ok(schema::latest()); 3]);
}

#[test]
fn users_keys_and_usage_round_trip() {
    let server = PgServer::start();
    let mut store = open(&server);
    let alice = store.create_user(&NewUser { name: "alice".into(), email: Some("a@x".into()) }, 10).unwrap();
    assert_eq!(
        (alice.name.as_str(), alice.email.as_deref(), alice.disabled, alice.created_at),
        ("alice", Some("a@x"), false, 10)
    );
    assert!(matches!(
        store.create_user(&NewUser { name: "alice".into(), email: None }, 11),
        Err(StoreError::Conflict(_))
    ));
    let key = store.create_key(&new_key(Some(alice.id), &"ff".repeat(32)), 12).unwrap();
    assert_eq!((key.models.len(), key.rpm, key.rph, key.user_id), (2, Some(5), None, Some(alice.id)));
    assert!(
        matches!(store.create_key(&new_key(None, &"ff".repeat(32)), 12), Err(StoreError::Conflict(_))),
        "the same key hash twice"
    );
    let patched = store.update_key(key.id, &KeyPatch { rph: Some(Some(100)), ..KeyPatch::default() }).unwrap().unwrap();
    assert_eq!((patched.rpm, patched.rph, patched.models.clone()), (Some(5), Some(100), key.models.clone()));
    assert_eq!(store.update_key(9999, &KeyPatch::default()).unwrap(), None);
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
    assert_eq!((usage.len(), usage[0].requests, usage[0].errors, usage[0].prompt_tokens), (1, 4, 2, 60));
    assert_eq!(store.usage(None, 0, 100).unwrap(), usage);
    assert!(store.usage(None, 8, 100).unwrap().is_empty());
    assert_eq!(store.key(key.id).unwrap().unwrap().last_used_at, Some(7 * 3600 + 5), "the latest use stays");
    let snapshot = store.snapshot(0).unwrap();
    assert_eq!((snapshot.users.len(), snapshot.keys.len(), snapshot.tokens_today), (1, 1, vec![(key.id, 78)]));
    assert_eq!(store.snapshot(8).unwrap().tokens_today, vec![], "usage before today is not today's");
    let second = store.create_key(&new_key(Some(alice.id), &"ee".repeat(32)), 13).unwrap();
    assert!(store.revoke_key(key.id, 13).unwrap());
    assert!(!store.revoke_key(key.id, 14).unwrap(), "revoked once");
    assert_eq!(store.snapshot(0).unwrap().keys.iter().map(|k| k.id).collect::<Vec<_>>(), vec![second.id]);
    assert!(store.delete_user(alice.id, 15).unwrap());
    assert!(!store.delete_user(alice.id, 15).unwrap());
    assert!(store.users().unwrap().is_empty());
    let second = store.key(second.id).unwrap().unwrap();
    assert_eq!((second.revoked_at, second.user_id), (Some(15), None), "a deleted user's keys are revoked");
    assert!(store.snapshot(0).unwrap().keys.is_empty());
    assert_eq!(store.prune_usage(8).unwrap(), 1);
    assert!(store.usage(None, 0, 100).unwrap().is_empty());
}

#[test]
fn another_instances_key_change_is_noticed_and_usage_is_not() {
    let server = PgServer::start();
    let mut store = open(&server);
    assert!(store.changed_elsewhere().is_ok(), "the first call primes it");
    assert!(!store.changed_elsewhere().unwrap());
    let mut other = open(&server);
    let bob = other.create_user(&NewUser { name: "bob".into(), email: None }, 1).unwrap();
    assert!(store.changed_elsewhere().unwrap());
    assert!(!store.changed_elsewhere().unwrap());
    let key = other.create_key(&new_key(Some(bob.id), "aa"), 2).unwrap();
    assert!(store.changed_elsewhere().unwrap());
    let row = UsageRow { key_id: key.id, model: "m".into(), hour: 1, requests: 1, ..UsageRow::default() };
    other.add_usage(&[row], &[(key.id, 3600)]).unwrap();
    assert!(!store.changed_elsewhere().unwrap(), "usage writes are not key changes");
    store.create_user(&NewUser { name: "carol".into(), email: None }, 1).unwrap();
    assert!(!store.changed_elsewhere().unwrap(), "its own writes are not news");
}

#[test]
fn a_stopped_server_fails_fast_and_the_same_store_works_once_it_is_back() {
    let mut server = PgServer::start();
    let mut store = open(&server);
    store.create_user(&NewUser { name: "dave".into(), email: None }, 1).unwrap();
    server.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", server.port())).is_err(), "stopped, yet the port accepts");
    for _ in 0..3 {
        let started = Instant::now();
        let error = store.users().unwrap_err();
        assert!(matches!(error, StoreError::Database(_)), "{error:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        assert!(!error.to_string().contains(&server.url()), "{error}");
    }
    server.restart();
    assert_eq!(store.users().unwrap()[0].name, "dave", "reconnected on its own");
    store.create_user(&NewUser { name: "erin".into(), email: None }, 2).unwrap();
    assert_eq!(store.users().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_uses_and_drops_inside_an_async_runtime() {
    let server = PgServer::start();
    let mut store = open(&server);
    store.create_user(&NewUser { name: "frank".into(), email: None }, 1).unwrap();
    assert_eq!(store.users().unwrap().len(), 1);
    drop(store);
}

#[test]
fn an_unreachable_database_fails_to_open() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = StoreUrl::parse(&format!("postgres://sluice:hunter2@127.0.0.1:{port}/sluice"), Path::new("/")).unwrap();
    let started = Instant::now();
    let error = store::open(&url).err().expect("no server, no store");
    assert!(matches!(error, StoreError::Database(_)), "{error:?}");
    assert!(!error.to_string().contains("hunter2"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(6));
}
