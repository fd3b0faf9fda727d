//! `sluice init`: a minimal working config for one provider, with a fresh
//! client key and admin token, so the step after the demo is one command.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use crate::access::auth::generate_key;
use crate::config::Config;

/// Providers `init` knows the base URL and a model of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Provider {
    /// api.openai.com.
    Openai,
    /// api.deepseek.com.
    Deepseek,
    /// Any OpenAI-compatible endpoint (give `--base-url` and `--model`).
    Custom,
}

impl Provider {
    fn defaults(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Openai => ("openai", "https://api.openai.com/v1", "gpt-4o-mini"),
            Self::Deepseek => ("deepseek", "https://api.deepseek.com/v1", "deepseek-chat"),
            Self::Custom => ("upstream", "", ""),
        }
    }
}

/// `sluice init`'s options.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The provider.
    #[arg(long, value_enum, default_value = "openai")]
    pub provider: Provider,
    /// Its base URL (default: the provider's).
    #[arg(long)]
    pub base_url: Option<String>,
    /// The model clients ask for (default: the provider's small one).
    #[arg(long)]
    pub model: Option<String>,
    /// The environment variable holding the provider key (never written to the file).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub key_env: String,
    /// Where to write the config.
    #[arg(short, long, default_value = "config/sluice.toml")]
    pub output: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
    /// Print what was made as JSON (`config`, `client_key`, `admin_token`).
    #[arg(long)]
    pub json: bool,
}

/// Writes the config; returns what to print.
pub fn init(args: &InitArgs) -> Result<String, String> {
    let (name, default_url, default_model) = args.provider.defaults();
    let base_url = args.base_url.clone().unwrap_or_else(|| default_url.to_string());
    let model = args.model.clone().unwrap_or_else(|| default_model.to_string());
    if base_url.is_empty() || model.is_empty() {
        return Err("--provider custom needs --base-url and --model".into());
    }
    if !args.key_env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || args.key_env.is_empty() {
        return Err(format!("`{}` is not an environment variable name", args.key_env));
    }
    if args.output.exists() && !args.force {
        return Err(format!("{} exists; --force to overwrite it", args.output.display()));
    }
    let client_key = generate_key()?;
    let admin_token = generate_key()?.replacen("sk-sluice-", "admin-", 1);
    let text = format!(
        r#"# Written by `sluice init`. Every field is described in the README's
# Configuration table; `sluice check -c {file}` validates it.

[server]
listen = "{listen}"

[auth]
# The key clients send as `Authorization: Bearer ...`.
keys = ["{client_key}"]

[admin]
token = "{admin_token}"

[log]
access = true

[[upstreams]]
name = "{name}"
base_url = "{base_url}"
# Read from the environment at start and on reload; never stored here.
keys = ["${{{key_env}}}"]

[[models]]
name = "{model}"
upstream = "{name}"

# Every other model name goes to the same upstream unchanged.
[[models]]
name = "*"
upstream = "{name}"

[routing]
default_model = "{model}"
"#,
        file = args.output.display(),
        listen = args.listen,
        key_env = args.key_env,
    );
    // The file must make a valid config once the key is in the environment.
    Config::from_toml(&text, &args.output, &|var| (var == args.key_env).then(|| "sk-check".to_string()))
        .map_err(|e| format!("the config init would write is not valid: {e}"))?;
    write_private(&args.output, &text)?;
    if args.json {
        return Ok(serde_json::json!({
            "config": args.output.display().to_string(),
            "client_key": client_key,
            "admin_token": admin_token,
        })
        .to_string());
    }
    Ok(format!(
        "wrote {file} (readable by you only)\n\n  client key   {client_key}\n  admin token  {admin_token}\n\n\
         Next:\n  export {key_env}=...   # your {name} key\n  sluice serve -c {file}\n\n\
         Then point any OpenAI SDK at http://{listen}/v1 with the client key.",
        file = args.output.display(),
        key_env = args.key_env,
        listen = args.listen,
    ))
}

/// Writes `text` to `path` (creating its folder), readable by its owner only:
/// it holds a client key and the admin token.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
