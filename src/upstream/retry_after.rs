//! `Retry-After`: delay-seconds or an HTTP date, as RFC 9110 §10.2.3 defines
//! it (all three date forms a recipient must accept, read by `httpdate`).
//! Anything else is ignored and the configured cooldown applies.

use std::time::{Duration, SystemTime};

/// The delay a `Retry-After` value asks for, measured from `now`.
/// A date in the past means "now" (zero); garbage means `None`.
pub fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Huge values saturate; the caller caps them with max_cooldown.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn seconds() {
        assert_eq!(parse("2", at(0)), Some(Duration::from_secs(2)));
        assert_eq!(parse(" 120 ", at(0)), Some(Duration::from_secs(120)));
        assert_eq!(parse("0", at(0)), Some(Duration::ZERO));
    }

    #[test]
    fn http_date_in_all_three_forms() {
        // 784111777 = Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example), in
        // IMF-fixdate, the obsolete RFC 850 form, and asctime.
        let now = at(784_111_777 - 30);
        for form in ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"] {
            assert_eq!(parse(form, now), Some(Duration::from_secs(30)), "{form}");
        }
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:37 GMT", at(784_111_777 + 5)), Some(Duration::ZERO), "past is now");
        assert_eq!(parse("Sat, 29 Feb 2020 00:00:00 GMT", at(1_582_934_400 - 1)), Some(Duration::from_secs(1)));
    }

    #[test]
    fn garbage() {
        for bad in [
            "",
            "soon",
            "-5",
            "1.5",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse(bad, at(0)), None, "{bad:?}");
        }
    }

    #[test]
    fn huge_values_saturate() {
        assert_eq!(parse("99999999999999999999999", at(0)), Some(Duration::from_secs(u64::MAX)));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn seconds_are_seconds(secs in 0u64..10_000_000) {
                prop_assert_eq!(parse(&secs.to_string(), at(0)), Some(Duration::from_secs(secs)));
            }

            #[test]
            fn an_http_date_is_the_time_until_it(now in 0u64..4_000_000_000, ahead in 0u64..1_000_000) {
                let date = httpdate::fmt_http_date(at(now + ahead));
                prop_assert_eq!(parse(&date, at(now)), Some(Duration::from_secs(ahead)));
            }

            #[test]
            fn any_text_is_a_delay_or_nothing_never_a_panic(text in "\\PC{0,40}") {
                let _ = parse(&text, at(0));
            }
        }
    }
}
