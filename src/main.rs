//! The `sluice` command line: serve, check, models, mock, demo.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use sluice::cli::{self, KeysCommand, StoreArgs, UsageArgs, UsersCommand};
use sluice::config::{Config, LogFormat};
use sluice::mock::MockServer;
use sluice::server::{self, Drain};
use sluice::state::Shared;
use sluice::tasks::loops::EventLoops;
use sluice::{shutdown, telemetry};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a config that cannot be used (systemd: `RestartPreventExitStatus=2`).
const EXIT_CONFIG: u8 = 2;

/// sluice: a fast, dependable OpenAI-compatible LLM API gateway.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file.
    #[arg(short, long, env = "SLUICE_CONFIG", default_value = "config/sluice.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ConfigArg),
    /// Validate the config and keys files, print a summary, exit non-zero on error.
    Check(ConfigArg),
    /// Print the model routing table.
    Models(ConfigArg),
    /// Send a one-token chat to each model through the real upstream path; exit 1 if any fails.
    Test {
        #[command(flatten)]
        config: ConfigArg,
        /// Models to test (default: every configured model but `*`).
        models: Vec<String>,
        /// Seconds to wait for each model.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// One chat call without starting a server, streamed to the terminal as it arrives.
    Chat {
        #[command(flatten)]
        config: ConfigArg,
        /// Model to ask.
        #[arg(short, long)]
        model: String,
        /// The message.
        message: String,
    },
    /// Run the bundled mock OpenAI upstream.
    Mock {
        /// Address to listen on.
        #[arg(short, long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Serve TLS with this certificate chain (PEM; with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// HTTP/2 streams a connection may have open at once, as providers limit them.
        #[arg(long)]
        max_streams: Option<u32>,
    },
    /// Write a minimal working config for one provider, with a client key and an admin token.
    Init(cli::init::InitArgs),
    /// Users of the key store.
    Users {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Client keys of the key store.
    Keys {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Usage per key and model from the key store.
    Usage {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        options: UsageArgs,
    },
    /// Run the mock on a free port and the gateway in front of it, offline.
    Demo {
        /// Address the gateway listens on.
        #[arg(short, long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(arg) => check(&arg.config),
        Command::Models(arg) => models(&arg.config),
        Command::Serve(arg) => match Config::load(&arg.config) {
            Ok(config) => run_on(config.server.workers, serve(config)),
            Err(error) => config_failure(&error),
        },
        Command::Mock { listen, tls_cert, tls_key, max_streams } => {
            run(mock(listen, tls_cert.zip(tls_key), max_streams))
        }
        Command::Test { config, models, timeout } => match Config::load(&config.config) {
            Ok(config) => run(test(config, models, timeout)),
            Err(error) => config_failure(&error),
        },
        Command::Chat { config, model, message } => match Config::load(&config.config) {
            Ok(config) => run(chat(config, model, message)),
            Err(error) => config_failure(&error),
        },
        Command::Init(args) => print(cli::init::init(&args)),
        Command::Users { store, command } => print(cli::users(&store, command)),
        Command::Keys { store, command } => print(cli::keys(&store, command)),
        Command::Usage { store, options } => print(cli::usage(&store, &options)),
        Command::Demo { listen } => run(demo(listen)),
    }
}

fn print(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("sluice: {error}");
            ExitCode::FAILURE
        }
    }
}

fn config_failure(error: &sluice::config::ConfigError) -> ExitCode {
    eprintln!("sluice: invalid config: {error}");
    ExitCode::from(EXIT_CONFIG)
}

fn run(task: impl std::future::Future<Output = Result<(), String>> + Send + 'static) -> ExitCode {
    run_on(0, task)
}

/// Runs `task` on a runtime with `workers` threads (0: one per core).
///
/// The task is spawned onto the workers rather than driven by `block_on` on
/// the main thread: the accept loop then runs where its connections run, and
/// a new connection is served without waking another thread first (with one
/// worker, that wake-up added ~60 µs to the first byte of every new connection).
fn run_on(workers: usize, task: impl std::future::Future<Output = Result<(), String>> + Send + 'static) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sluice: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(runtime.spawn(task)).unwrap_or_else(|panicked| Err(panicked.to_string())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice: {error}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            println!("{}: ok", path.display());
            println!("  listen     {}", config.server.listen);
            println!(
                "  auth       {} ({} client keys)",
                if config.auth.require_api_key { "required" } else { "off" },
                config.auth.keys.len()
            );
            if !config.clients.is_empty() {
                println!("  clients    {} with policies", config.clients.len());
            }
            if let Some(store) = &config.store {
                println!("  store      {}", store.url);
            }
            if config.limits.enabled {
                println!("  limits     store keys {} rpm / {} rph by default", config.limits.rpm, config.limits.rph);
            }
            for upstream in &config.upstreams {
                println!(
                    "  upstream   {} -> {} ({} keys, http2 {:?})",
                    upstream.name,
                    // Its query may carry a secret.
                    upstream.base_url.to_string().split('?').next().unwrap_or_default(),
                    upstream.keys().len(),
                    upstream.http2
                );
            }
            println!("  models     {}", config.models.len());
            if let Some(default) = &config.default_model {
                println!("  default    {default}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => config_failure(&error),
    }
}

fn models(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => return config_failure(&error),
    };
    println!("{:<28} {:<24} {:<16} {:<28} TIER WEIGHT", "MODEL", "ALIASES", "UPSTREAM", "UPSTREAM MODEL");
    for model in &config.models {
        // One line per target; the model's name and aliases on the first.
        for (i, target) in model.targets.iter().enumerate() {
            let upstream_model = match model.name.as_str() {
                "*" => "(as requested)",
                name => target.upstream_model.as_deref().unwrap_or(name),
            };
            let (name, aliases) =
                if i == 0 { (model.name.clone(), model.aliases.join(",")) } else { Default::default() };
            println!(
                "{name:<28} {aliases:<24} {:<16} {upstream_model:<28} {:<4} {}",
                target.upstream, target.priority, target.weight
            );
        }
    }
    ExitCode::SUCCESS
}

async fn serve(config: Config) -> Result<(), String> {
    telemetry::init(&config.log.level, config.log.format);
    let (listen, backlog) = (config.server.listen, config.server.backlog);
    let grace = config.server.shutdown_grace;
    let event_loops = config.server.event_loops;
    let shared = Shared::new(config)?;
    let listener = server::bind(listen, backlog).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let loops = match event_loops {
        0 => None,
        count => Some(EventLoops::start(count).map_err(|e| format!("cannot start {count} event loops: {e}"))?),
    };
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let scheme = if shared.certs.is_some() { "https" } else { "http" };
    println!("sluice {} listening on {scheme}://{addr}", sluice::VERSION);
    tracing::info!(%addr, version = sluice::VERSION, "listening");
    shared.tasks.spawn(shutdown::reload_on_sighup(std::sync::Arc::clone(&shared)));
    shared.tasks.spawn(shutdown::reopen_log_on_sigusr1(std::sync::Arc::clone(&shared)));
    let stop_signal = shutdown::first_stop_signal(shared.tasks.clone());
    sluice::notify::ready(&format!("listening on {addr}"));
    let stop = async {
        stop_signal.await;
        sluice::notify::stopping();
    };
    let drain = server::serve(listener, std::sync::Arc::clone(&shared), stop, grace, loops.as_ref()).await;
    if let Drain::TimedOut(left) = drain {
        tracing::warn!(connections = left, "exiting with connections cut at the end of the grace period");
    }
    shared.close_store().await;
    shared.telemetry.flush();
    // Last: work spawned from requests (cache writes to Redis, key checks)
    // and connections opened on a loop (Redis, upstreams) are driven there.
    if let Some(loops) = loops {
        loops.stop().await;
    }
    Ok(())
}

async fn test(config: Config, models: Vec<String>, timeout: u64) -> Result<(), String> {
    telemetry::init("warn", config.log.format);
    let models = if models.is_empty() {
        config.models.iter().filter(|m| m.name != "*").map(|m| m.name.clone()).collect()
    } else {
        models
    };
    let shared = Shared::new(config)?;
    let mut failed = 0;
    for model in &models {
        let result = sluice::admin::probe::probe(&shared, model, std::time::Duration::from_secs(timeout)).await;
        let verdict = if result.ok { "ok  " } else { "FAIL" };
        println!(
            "{verdict} {:<32} {:>4} {:>9.1} ms  {}",
            result.model,
            result.status,
            result.latency_ms,
            result.detail.as_deref().unwrap_or("")
        );
        failed += usize::from(!result.ok);
    }
    if failed == 0 { Ok(()) } else { Err(format!("{failed} of {} models failed", models.len())) }
}

async fn chat(config: Config, model: String, message: String) -> Result<(), String> {
    use http_body_util::BodyExt;
    use std::io::Write;
    telemetry::init("warn", config.log.format);
    let shared = Shared::new(config)?;
    let body =
        serde_json::json!({ "model": model, "stream": true, "messages": [{ "role": "user", "content": message }] });
    let response = sluice::admin::probe::send_chat(&shared, body).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
    }
    let (mut pending, mut out) = (String::new(), std::io::stdout());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the stream broke: {e}"))?;
        if let Some(data) = frame.data_ref() {
            let _ = write!(out, "{}", sluice::admin::probe::sse_text(&mut pending, data));
            let _ = out.flush();
        }
    }
    println!();
    Ok(())
}

async fn mock(listen: SocketAddr, tls: Option<(PathBuf, PathBuf)>, max_streams: Option<u32>) -> Result<(), String> {
    telemetry::init("warn", LogFormat::Text);
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let acceptor = match tls {
        Some((cert, key)) => {
            let files = sluice::config::TlsConfig { cert, key, client_ca: None };
            Some(std::sync::Arc::new(sluice::config::tls::CertStore::load(&files)?).acceptor()?)
        }
        None => None,
    };
    let mock = MockServer::serve_limited(listener, acceptor, max_streams.unwrap_or(sluice::mock::MOCK_H2_MAX_STREAMS));
    println!("sluice mock upstream listening on {} (base URL {})", mock.addr, mock.base_url());
    shutdown::first_stop_signal(sluice::tasks::Tasks::default()).await;
    Ok(())
}

/// Client key the demo gateway accepts.
const DEMO_CLIENT_KEY: &str = "sk-sluice-demo";

async fn demo(listen: SocketAddr) -> Result<(), String> {
    let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| format!("cannot start the mock: {e}"))?;
    // A key store of its own, gone when the demo ends.
    let dir = DemoDir::create()?;
    let store_path = dir.0.join("keys.db");
    let (user_key, admin_token) = demo_store(&store_path)?;
    let text = format!(
        r#"
[server]
listen = "{listen}"
shutdown_grace = "5s"

[auth]
keys = ["{DEMO_CLIENT_KEY}"]

[store]
url = "sqlite://{store}"

[admin]
token = "{admin_token}"

[log]
access = true

[[upstreams]]
name = "mock"
base_url = "{base}"
keys = ["sk-mock-1", "sk-mock-2", "sk-mock-3"]
http2 = "prior-knowledge"
# A 429 while trying things out cools a key for seconds, not a minute.
cooldown = "5s"
max_cooldown = "30s"

[[models]]
name = "gpt-4o-mini"
upstream = "mock"
aliases = ["mini"]
defaults = {{ max_tokens = 256 }}

[[models]]
name = "*"
upstream = "mock"

[routing]
default_model = "gpt-4o-mini"
"#,
        base = mock.base_url(),
        store = store_path.display(),
    );
    let config =
        Config::from_toml(&text, Path::new("<demo>"), &|name| std::env::var(name).ok()).map_err(|e| e.to_string())?;
    telemetry::init(&config.log.level, config.log.format);
    let grace = config.server.shutdown_grace;
    let shared = Shared::new(config)?;
    let listener = server::bind(listen, sluice::config::server::DEFAULT_BACKLOG)
        .map_err(|e| format!("cannot listen on {listen}: {e} (try --listen 127.0.0.1:0)"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!(
        r#"sluice {version} demo: gateway on http://{addr}, mock upstream on http://{mock} (3 keys, h2c)

Try it:
  curl -s http://{addr}/v1/chat/completions \
    -H 'Authorization: Bearer {DEMO_CLIENT_KEY}' -H 'Content-Type: application/json' \
    -d '{{"model":"mini","messages":[{{"role":"user","content":"Hello"}}]}}'

  curl -sN http://{addr}/v1/chat/completions \
    -H 'Authorization: Bearer {DEMO_CLIENT_KEY}' -H 'Content-Type: application/json' \
    -d '{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"Hello"}}]}}'

OpenAI SDK (Python):
  from openai import OpenAI
  client = OpenAI(base_url="http://{addr}/v1", api_key="{DEMO_CLIENT_KEY}")
  print(client.chat.completions.create(model="mini", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)

A store key (user `demo`, 60 requests a minute, usage counted):
  curl -si http://{addr}/v1/chat/completions -H 'Authorization: Bearer {user_key}' \
    -H 'Content-Type: application/json' -d '{{"model":"mini","messages":[{{"role":"user","content":"Hi"}}]}}'

More keys and users (admin token {admin_token}):
  curl -s http://{addr}/admin/keys -H 'Authorization: Bearer {admin_token}' -d '{{"user_id":1,"name":"mine","rpm":5}}'
  sluice keys list --store sqlite://{store}     sluice usage --store sqlite://{store}

Mock counters: curl -s http://{mock}/_stats    Stop: Ctrl-C"#,
        version = sluice::VERSION,
        mock = mock.addr,
        store = store_path.display(),
    );
    let stop = shutdown::first_stop_signal(shared.tasks.clone());
    server::serve(listener, std::sync::Arc::clone(&shared), stop, grace, None).await;
    shared.close_store().await;
    Ok(())
}

/// The demo's temporary folder, removed when the demo ends.
struct DemoDir(PathBuf);

impl DemoDir {
    fn create() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates the demo user and a key for it; returns the key and an admin token.
fn demo_store(path: &Path) -> Result<(String, String), String> {
    use sluice::access::{manage, store};
    let mut opened = store::open(&store::StoreUrl::Sqlite(path.to_path_buf())).map_err(|e| e.to_string())?;
    let now = store::unix_now();
    let user =
        opened.create_user(&store::NewUser { name: "demo".into(), email: None }, now).map_err(|e| e.to_string())?;
    let request = manage::KeyRequest { user_id: Some(user.id), name: "demo".into(), ..manage::KeyRequest::default() };
    let issued = manage::issue_key(opened.as_mut(), &request, now).map_err(|e| e.to_string())?;
    let admin = sluice::access::auth::generate_key()?.replacen("sk-sluice-", "admin-", 1);
    Ok((issued.key, admin))
}
