//! Config validation: every refusal names the file, the field and the reason.

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "OPENAI_API_KEY" => Some("sk-from-env".into()),
        "CLIENT_KEY" => Some("sk-client-env".into()),
        _ => None,
    }
}

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"
max_body = "1MiB"

[auth]
keys = ["sk-client-1", "${CLIENT_KEY}"]

[[upstreams]]
name = "openai"
base_url = "https://api.openai.com/v1/"
keys = ["${OPENAI_API_KEY}", "sk-literal", "sk-literal"]

[[models]]
name = "gpt-4o-mini"
upstream = "openai"
aliases = ["mini"]
defaults = { max_tokens = 1024 }

[routing]
default_model = "mini"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("/etc/sluice/test.toml"), &env)
}

fn refusal(text: &str) -> String {
    parse(text).expect_err("config should be refused").to_string()
}

#[test]
fn good_config_validates() {
    let config = parse(GOOD).unwrap();
    assert_eq!(config.server.max_body, 1 << 20);
    assert_eq!(config.server.shutdown_grace, Duration::from_secs(5));
    assert_eq!(config.server.event_loops, 0, "connections on the runtime's workers unless asked");
    assert_eq!(parse(&GOOD.replace("[server]", "[server]\nevent_loops = 2")).unwrap().server.event_loops, 2);
    assert_eq!(config.auth.keys.len(), 2);
    assert!(config.auth.require_api_key);
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.base_url.path(), "/v1", "trailing slash trimmed");
    let keys: Vec<&str> = upstream.keys().iter().map(|k| k.expose().as_str()).collect();
    assert_eq!(keys, ["sk-from-env", "sk-literal"], "env expanded, duplicates collapsed");
    assert_eq!(config.models[0].defaults["max_tokens"], 1024);
    assert_eq!(config.default_model.as_deref(), Some("mini"));
}

#[test]
fn listen_env_override_wins() {
    let env = |name: &str| match name {
        "SLUICE_LISTEN" => Some("127.0.0.1:9999".into()),
        other => env(other),
    };
    let config = Config::from_toml(GOOD, Path::new("x.toml"), &env).unwrap();
    assert_eq!(config.server.listen.port(), 9999);
}

#[test]
fn unknown_field_is_named() {
    let err = refusal(&GOOD.replace("max_body", "max_bodee"));
    assert!(err.contains("test.toml") && err.contains("max_bodee"), "{err}");
}

#[test]
fn missing_upstreams_refused() {
    let err = refusal("[auth]\nrequire_api_key = false\n");
    assert!(err.contains("field `upstreams`"), "{err}");
}

#[test]
fn model_on_missing_upstream_refused() {
    let err = refusal(&GOOD.replace("upstream = \"openai\"", "upstream = \"nope\""));
    assert!(err.contains("models[0].upstream") && err.contains("nope"), "{err}");
}

#[test]
fn unreadable_keys_file_refused() {
    let err =
        refusal(&GOOD.replace(
            "keys = [\"${OPENAI_API_KEY}\", \"sk-literal\", \"sk-literal\"]",
            "keys_file = \"missing-keys.txt\"",
        ));
    assert!(err.contains("upstreams[0].keys_file") && err.contains("missing-keys.txt"), "{err}");
}

#[test]
fn empty_key_set_refused() {
    let err = refusal(&GOOD.replace("keys = [\"${OPENAI_API_KEY}\", \"sk-literal\", \"sk-literal\"]", "keys = []"));
    assert!(err.contains("upstreams[0].keys") && err.contains("no keys"), "{err}");
}

#[test]
fn unset_env_var_named_not_leaked() {
    let err = refusal(&GOOD.replace("${CLIENT_KEY}", "${NOT_SET_ANYWHERE}"));
    assert!(err.contains("auth.keys[1]") && err.contains("NOT_SET_ANYWHERE"), "{err}");
}

#[test]
fn keys_file_relative_to_config_and_merged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.txt"), "# team keys\nsk-file-1\n\nsk-literal\n").unwrap();
    let text = GOOD.replace(
        "keys = [\"${OPENAI_API_KEY}\", \"sk-literal\", \"sk-literal\"]",
        "keys = [\"sk-literal\"]\nkeys_file = \"keys.txt\"",
    );
    let config = Config::from_toml(&text, &dir.path().join("sluice.toml"), &env).unwrap();
    let keys: Vec<&str> = config.upstreams[0].keys().iter().map(|k| k.expose().as_str()).collect();
    assert_eq!(keys, ["sk-literal", "sk-file-1"]);
}

#[test]
fn bad_values_refused_with_field() {
    for (from, to, field) in [
        ("\"127.0.0.1:0\"", "\"localhost-ish\"", "server.listen"),
        ("\"1MiB\"", "\"0\"", "server.max_body"),
        ("max_body = \"1MiB\"", "max_body = \"1MiB\"\nevent_loops = 257", "server.event_loops"),
        ("https://api.openai.com/v1/", "ftp://x", "upstreams[0].base_url"),
        ("default_model = \"mini\"", "default_model = \"gpt-9\"", "routing.default_model"),
        ("aliases = [\"mini\"]", "aliases = [\"gpt-4o-mini\"]", "models[0].name"),
        ("defaults = { max_tokens = 1024 }", "defaults = { model = \"x\" }", "models[0].defaults"),
    ] {
        let err = refusal(&GOOD.replace(from, to));
        assert!(err.contains(field), "{field}: {err}");
    }
}

#[test]
fn require_key_without_keys_refused() {
    let err = refusal(&GOOD.replace("keys = [\"sk-client-1\", \"${CLIENT_KEY}\"]", ""));
    assert!(err.contains("auth.keys"), "{err}");
}

#[test]
fn prior_knowledge_over_tls_refused() {
    let err = refusal(&GOOD.replace("[[models]]", "http2 = \"prior-knowledge\"\n\n[[models]]"));
    assert!(err.contains("upstreams[0].http2"), "{err}");
}

#[test]
fn a_syntax_error_names_line_and_column_never_the_text() {
    let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://x\"\nkeys = [\"sk-live-SECRET\" \"oops\"]\n";
    let message = refusal(text);
    assert!(message.contains("line 4"), "{message}");
    assert!(!message.contains("SECRET") && !message.contains("oops"), "the file's text leaked: {message}");
}

#[test]
fn tls_pairs_are_checked_when_the_config_is() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let text = format!(
        "[server]\ntls = {{ cert = {cert:?}, key = {key:?} }}\n[auth]\nrequire_api_key = false\n[[upstreams]]\nname = \"a\"\nbase_url = \"http://x\"\nkeys = [\"k\"]\n"
    );
    let message = refusal(&text);
    assert!(message.contains("server.tls") && message.contains("c.pem"), "{message}");
}

#[test]
fn tenancy_sections_validate_and_anchor_the_store() {
    let text = format!(
        "{GOOD}\n[store]\nurl = \"sqlite://data/keys.db\"\n[limits]\nrpm = 10\nper_ip_rpm = 30\n\
         [[clients]]\nname = \"ci\"\nkey = \"${{CLIENT_KEY}}\"\nmodels = [\"mini\", \"*\"]\nrph = 100\n"
    );
    let config = parse(&text).unwrap();
    assert_eq!(
        config.store.unwrap().url,
        StoreUrl::Sqlite("/etc/sluice/data/keys.db".into()),
        "relative to the config"
    );
    assert_eq!((config.limits.rpm, config.limits.rph, config.limits.per_ip_rpm), (10, 1000, Some(30)));
    assert!(config.limits.enabled && !config.limits.config_keys);
    let client = &config.clients[0];
    assert_eq!((client.name.as_str(), client.key.expose().as_str()), ("ci", "sk-client-env"));
    assert_eq!((client.models.clone(), client.rpm, client.rph), (vec!["mini".to_string()], None, Some(100)));
    // A store alone is enough to require keys.
    let store_only =
        "[store]\nurl = \"sqlite:///tmp/k.db\"\n[[upstreams]]\nname = \"u\"\nbase_url = \"http://x\"\nkeys = [\"k\"]\n";
    assert!(parse(store_only).unwrap().auth.require_api_key);
}

#[test]
fn tenancy_refusals_name_the_field() {
    for (extra, field) in [
        ("[store]\nurl = \"postgres-ish\"\n", "store.url"),
        ("[limits]\nrpm = 2000000\n", "limits.rpm"),
        ("[[clients]]\nname = \"a\"\nkey = \"\"\n", "clients[0].key"),
        ("[[clients]]\nname = \"a\"\nkey = \"k1\"\n[[clients]]\nname = \"a\"\nkey = \"k2\"\n", "clients[1].name"),
        ("[[clients]]\nname = \"a\"\nkey = \"k\"\nrpm = 2000000\n", "clients[0].rpm"),
        ("[limits]\nburst = 1\n", "burst"),
    ] {
        let message = refusal(&format!("{GOOD}\n{extra}"));
        assert!(message.contains(field), "{field}: {message}");
    }
}

#[test]
fn every_unset_variable_is_named_in_one_run_and_any_string_expands() {
    let text = r#"
[server]
listen = "${LISTEN}"
[auth]
keys = ["${A}", "${B}"]
[admin]
token = "${C}"
[[upstreams]]
name = "u"
base_url = "${BASE}/v1"
keys = ["k"]
"#;
    let message = parse(text).unwrap_err().to_string();
    for field in ["server.listen", "auth.keys[0]", "auth.keys[1]", "admin.token", "upstreams[0].base_url"] {
        assert!(message.contains(field), "{field} missing from: {message}");
    }
    let env = |name: &str| match name {
        "LISTEN" => Some("127.0.0.1:9999".to_string()),
        "BASE" => Some("https://api.example.com".to_string()),
        "A" | "B" | "C" => Some(format!("value-of-{name}-long-enough")),
        _ => None,
    };
    let config = Config::from_toml(text, Path::new("/etc/sluice/t.toml"), &env).unwrap();
    assert_eq!(config.server.listen.port(), 9999);
    assert_eq!(config.upstreams[0].base_url.host(), Some("api.example.com"));
}

#[test]
fn a_log_filter_that_does_not_parse_is_refused() {
    let message = refusal(&format!("{GOOD}\n[log]\nlevel = \"verbose,,=\"\n"));
    assert!(message.contains("log.level"), "{message}");
    assert!(parse(&format!("{GOOD}\n[log]\nlevel = \"warn,sluice=debug\"\n")).is_ok());
}

#[test]
fn problems_of_separate_sections_come_in_one_report() {
    let text = format!(
        "{}\n[limits]\nrpm = 2000000\n[cache]\nttl = \"0s\"\n[log]\nlevel = \"verbose,,=\"\n",
        GOOD.replace("base_url = \"https://api.openai.com/v1/\"", "base_url = \"not a url\"")
    );
    let message = refusal(&text);
    for field in ["limits.rpm", "cache.ttl", "log.level", "upstreams[0].base_url"] {
        assert!(message.contains(field), "{field} missing from: {message}");
    }
}

#[test]
fn targets_routing_and_upstream_kinds_validate() {
    let text = GOOD.replace(
        "[[models]]\nname = \"gpt-4o-mini\"\nupstream = \"openai\"",
        "[[upstreams]]\nname = \"azure\"\nkind = \"azure\"\napi_version = \"2024-10-21\"\nbase_url = \"https://eu.openai.azure.com?x=1\"\nkeys = [\"az-1\"]\n\n[[models]]\nname = \"gpt-4o-mini\"\nfallback_on = [\"5xx\", \"timeout\"]\nmax_tokens_cap = 4096\nmax_tokens_over = \"refuse\"\ntargets = [{ upstream = \"openai\", weight = 3 }, { upstream = \"azure\", deployment = \"eu\", priority = 2 }]",
    ) + "retry_budget = 0.5\nfallback_on = [\"429\"]\n";
    let config = parse(&text).unwrap();
    let model = &config.models[0];
    assert_eq!(model.targets.len(), 2);
    assert_eq!((model.targets[0].weight, model.targets[1].priority), (3, 2));
    assert_eq!(model.targets[1].deployment.as_deref(), Some("eu"));
    assert!(model.fallback_on.contains(FallbackOn::Timeout) && !model.fallback_on.contains(FallbackOn::RateLimited));
    assert_eq!(model.max_tokens_cap, Some((4096, CapMode::Refuse)));
    assert_eq!(config.routing.retry_budget, 0.5);
    assert!(config.routing.fallback_on.contains(FallbackOn::RateLimited));
    let azure = &config.upstreams[1];
    assert_eq!((azure.auth_header.as_str(), azure.auth_template.as_str()), ("api-key", "{key}"));
    assert_eq!(azure.base_url.query(), Some("x=1"), "a base URL may carry a query");

    for (from, to, field) in [
        ("weight = 3", "weight = 0", "models[0].targets[0].weight"),
        ("weight = 3", "weight = 5000", "models[0].targets[0].weight"),
        ("upstream = \"azure\", deployment", "upstream = \"nope\", deployment", "models[0].targets[1].upstream"),
        ("api_version = \"2024-10-21\"\n", "", "upstreams[1].api_version"),
        ("retry_budget = 0.5", "retry_budget = -1", "routing.retry_budget"),
        ("kind = \"azure\"", "kind = \"azure\"\nauth_template = \"Bearer\"", "upstreams[1].auth_template"),
        ("kind = \"azure\"", "kind = \"azure\"\nauth_header = \"bad header\"", "upstreams[1].auth_header"),
        ("max_tokens_cap = 4096", "max_tokens_cap = 4096\nupstream = \"openai\"", "models[0].targets"),
        ("deployment = \"eu\"", "deployment = \"../x\"", "models[0].targets[1].deployment"),
        ("upstream = \"azure\", deployment", "upstream = \"openai\", deployment", "models[0].targets[1].upstream"),
        ("weight = 3 }", "weight = 3, deployment = \"x\" }", "models[0].targets[0].deployment"),
        ("api_version = \"2024-10-21\"", "api_version = \"1?x=2\"", "upstreams[1].api_version"),
        ("kind = \"azure\"", "kind = \"azure\"\nauth_header = \"content-length\"", "upstreams[1].auth_header"),
        ("kind = \"azure\"", "kind = \"azure\"\nheaders = { api-key = \"x\" }", "upstreams[1].headers"),
        ("max_tokens = 1024", "max_tokens = 5000", "models[0].defaults.max_tokens"),
        ("max_tokens_cap = 4096\n", "", "models[0].max_tokens_over"),
    ] {
        let err = refusal(&text.replace(from, to));
        assert!(err.contains(field), "{field}: {err}");
    }
    let err = refusal(&text.replace("\"5xx\", \"timeout\"", "\"5xx\", \"sometimes\""));
    assert!(err.contains("sometimes"), "{err}");
}

#[test]
fn redis_settings_are_checked_and_the_url_never_echoed() {
    let with = |redis: &str| parse(&format!("{GOOD}\n[redis]\n{redis}\n"));
    let config = with("url = \"redis://:hunter2@10.0.0.5:6379/1\"\non_error = \"deny\"").unwrap();
    let redis = config.redis.unwrap();
    assert_eq!((redis.timeout, redis.on_error), (Duration::from_millis(50), OnRedisError::Deny));
    assert!(!format!("{redis:?}").contains("hunter2"));
    for (bad, field) in [
        ("url = \"http://:hunter2@x\"", "redis.url"),
        ("timeout = \"1s\"", "redis.url"),
        ("url = \"redis://x\"\ntimeout = \"0s\"", "redis.timeout"),
        ("url = \"redis://x\"\nca_file = \"ca.pem\"", "redis.ca_file"),
        ("url = \"rediss://x\"\nca_file = \"/no/such/ca.pem\"", "redis.ca_file"),
        ("url = \"redis://x\"\non_error = \"maybe\"", "expected `local` or `deny`"),
        ("url = \"redis://:hunter2@x:notaport/0\"", "redis.url"),
        ("url = \"redis://x/notadb\"", "redis.url"),
        ("url = \"redis://x\"\ncache_url = \"memcached://:hunter2@y\"", "redis.cache_url"),
    ] {
        let error = with(bad).unwrap_err().to_string();
        assert!(error.contains(field), "{bad}: {error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
