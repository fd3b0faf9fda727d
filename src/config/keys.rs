//! Secrets in the config: `${VAR}` expansion, keys files, and [`Secret`], which
//! cannot leak through `Debug` or `Display`.

use std::fmt;
use std::path::Path;

/// A value that must never be printed. `Debug` and `Display` show `*****`;
/// [`Secret::expose`] is the only way in, so every use is easy to grep.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself. Call only where the value is sent or compared.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// A short, stable, non-reversible name for a key, safe for logs and `/health`:
/// the first four characters (a vendor prefix such as `sk-p`), then a 32-bit
/// FNV-1a hash of the whole key. The hash keeps keys that share a prefix apart.
pub fn fingerprint(key: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let prefix: String = key.chars().take(4).collect();
    format!("{prefix}…{hash:08x}")
}

/// Replaces every `${NAME}` in `text` with the environment variable `NAME`.
/// An unset or non-UTF-8 variable is an error naming it; a lone `$` stays as is.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unterminated `${{` in `{}`", redact_for_error(text)))?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{name}}}` is not a valid environment variable name"));
        }
        let value = lookup(name).ok_or_else(|| format!("environment variable `{name}` is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads the environment for [`expand_env`].
pub fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Only the shape of a value that failed to expand: never its content.
fn redact_for_error(text: &str) -> String {
    format!("<{} characters>", text.chars().count())
}

/// Reads a keys file: one key a line; blank lines and lines starting with `#` are ignored;
/// surrounding whitespace is trimmed.
pub fn read_keys_file(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    Ok(parse_keys_text(&text))
}

/// The parsing half of [`read_keys_file`].
pub fn parse_keys_text(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#')).map(str::to_owned).collect()
}

/// Removes repeated keys, keeping the first occurrence's position.
pub fn dedup_keys(keys: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    keys.into_iter().filter(|k| seen.insert(k.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "SET").then(|| "value".to_string())
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("sk-very-secret".to_string());
        assert_eq!(format!("{s:?} {s}"), "***** *****");
        assert_eq!(s.expose(), "sk-very-secret");
    }

    #[test]
    fn fingerprints_hide_the_key_and_tell_keys_apart() {
        let a = fingerprint("sk-proj-aaaaaaaaaaaaaaaaaaaaaaaa");
        let b = fingerprint("sk-proj-aaaaaaaaaaaaaaaaaaaaaaab");
        assert_ne!(a, b);
        assert!(a.starts_with("sk-p"));
        assert!(!a.contains("aaaa"));
    }

    #[test]
    fn env_expansion() {
        assert_eq!(expand_env("${SET}", env).unwrap(), "value");
        assert_eq!(expand_env("a-${SET}-b", env).unwrap(), "a-value-b");
        assert_eq!(expand_env("plain $ text", env).unwrap(), "plain $ text");
        assert!(expand_env("${UNSET}", env).unwrap_err().contains("UNSET"));
        assert!(expand_env("${SET", env).is_err());
        assert!(expand_env("${BAD NAME}", env).is_err());
    }

    #[test]
    fn keys_text() {
        let keys = parse_keys_text("# comment\n\n  sk-a  \nsk-b\n#sk-c\nsk-a\n");
        assert_eq!(keys, ["sk-a", "sk-b", "sk-a"]);
        assert_eq!(dedup_keys(keys), ["sk-a", "sk-b"]);
    }
}
