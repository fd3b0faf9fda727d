//! Human-friendly durations (`"30s"`, `"250ms"`) and sizes (`"8MiB"`) for the config file.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A duration written as `"250ms"`, `"30s"`, `"5m"`, `"2h"`, or an integer number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// A byte size written as `"8MiB"`, `"512KiB"`, `"1MB"`, `"100B"`, or an integer number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"2h"` (whitespace between number and unit allowed).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = split_number(text)?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" | "sec" | "secs" => 1_000,
        "m" | "min" | "mins" => 60_000,
        "h" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        "" => return Err(format!("`{text}` needs a unit: ms, s, m, h or d")),
        other => {
            return Err(format!("unknown duration unit `{other}` (use ms, s, m, h or d)"));
        }
    };
    number.checked_mul(millis_per_unit).map(Duration::from_millis).ok_or_else(|| format!("`{text}` is too large"))
}

/// Parses `"8MiB"`, `"512KiB"`, `"1MB"`, `"100B"` or a bare number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = split_number(text)?;
    let factor: u64 = match unit {
        "" | "B" => 1,
        "K" | "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!("unknown size unit `{other}` (use B, KB, KiB, MB, MiB, GB or GiB)"));
        }
    };
    number.checked_mul(factor).ok_or_else(|| format!("`{text}` is too large"))
}

fn split_number(text: &str) -> Result<(u64, &str), String> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    if digits_end == 0 {
        return Err(format!("`{text}` does not start with a number"));
    }
    let number = text[..digits_end].parse::<u64>().map_err(|e| format!("`{text}`: {e}"))?;
    Ok((number, text[digits_end..].trim()))
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = HumanDuration;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration like \"30s\" or \"250ms\", or a number of seconds")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u64::try_from(v)
            .map(|s| HumanDuration(Duration::from_secs(s)))
            .map_err(|_| E::custom("a duration cannot be negative"))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(HumanDuration(Duration::from_secs(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_duration(v).map(HumanDuration).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a size like \"8MiB\", or a number of bytes")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u64::try_from(v).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(ByteSize(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_size(v).map(ByteSize).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration(" 5 m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("8 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn durations_scale_by_their_unit(n in 0u64..1_000_000, unit in prop::sample::select(vec![("ms", 1u64), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)]), space in any::<bool>()) {
                let text = format!("{n}{}{}", if space { " " } else { "" }, unit.0);
                prop_assert_eq!(parse_duration(&text), Ok(Duration::from_millis(n * unit.1)));
            }

            #[test]
            fn sizes_scale_by_their_unit(n in 0u64..1_000_000, unit in prop::sample::select(vec![("B", 1u64), ("KB", 1_000), ("KiB", 1024), ("MB", 1_000_000), ("MiB", 1 << 20), ("GiB", 1 << 30)])) {
                prop_assert_eq!(parse_size(&format!("{n}{}", unit.0)), Ok(n * unit.1));
            }

            #[test]
            fn any_text_is_a_value_or_a_reason_never_a_panic(text in "\\PC{0,24}") {
                let _ = parse_duration(&text);
                let _ = parse_size(&text);
            }
        }
    }
}
