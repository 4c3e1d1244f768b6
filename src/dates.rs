//! RFC 3339 dates as contentd reads and writes them (lease expiry labels, CLI output): parsed
//! and formatted by jiff, bounded to what an i64 of nanoseconds since the epoch holds. Pure
//! code: unit-tested here and fuzzed (`fuzz/fuzz_targets/date_parse.rs`).

use crate::error::{Error, Result};

/// containerd's lease expiry label.
pub const EXPIRE_LABEL: &str = "containerd.io/gc.expire";

/// Parses an RFC 3339 date-time (`2006-01-02T15:04:05[.999999999](Z|±07:00)`) to ns since
/// the Unix epoch. None if it is not one, or if it falls outside what an i64 of nanoseconds
/// holds (1677–2262).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t: jiff::Timestamp = s.parse().ok()?;
    i64::try_from(t.as_nanosecond()).ok()
}

/// `secs` since the epoch as RFC 3339 UTC, e.g. `2026-12-02T15:04:05Z` (seconds outside
/// what a date can hold are clamped to its range).
pub fn rfc3339(secs: i64) -> String {
    let t = jiff::Timestamp::from_second(secs).unwrap_or(if secs < 0 {
        jiff::Timestamp::MIN
    } else {
        jiff::Timestamp::MAX
    });
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The latest expiry a lease may ask for: about a century ahead is already "never"; beyond
/// that a date is a mistake, and far enough out it would not fit the collector's clock.
const MAX_EXPIRY_AHEAD_NS: i64 = 100 * 366 * 86_400 * 1_000_000_000;

/// Checks a `containerd.io/gc.expire` value given at lease creation: an RFC 3339 date from
/// the Unix epoch to about a century after `now` (ns since the epoch).
pub fn validate_expiry(value: &str, now: i64) -> Result<i64> {
    let t = parse_rfc3339(value).ok_or_else(|| {
        Error::invalid(format!(
            "label {EXPIRE_LABEL}: {value:?} is not an RFC 3339 date-time between 1970 and 2262"
        ))
    })?;
    if t < 0 {
        return Err(Error::invalid(format!(
            "label {EXPIRE_LABEL}: {value:?} is before 1970"
        )));
    }
    if t > now.saturating_add(MAX_EXPIRY_AHEAD_NS) {
        return Err(Error::invalid(format!(
            "label {EXPIRE_LABEL}: {value:?} is more than 100 years ahead"
        )));
    }
    Ok(t)
}

/// How long the collector sleeps until a lease that expires at `expiry_ns` (ns since the
/// epoch) has expired, seen at `now_ns`. Stored dates come from clients: any i64 is possible
/// (a lease from 1700, one from 2262), so the arithmetic saturates, and a wait is never
/// longer than a day (the loop re-plans on every wake-up anyway).
pub fn expiry_wait(expiry_ns: i64, now_ns: i64) -> std::time::Duration {
    const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(86_400);
    let ns = u64::try_from(expiry_ns.saturating_sub(now_ns)).unwrap_or(0);
    std::time::Duration::from_nanos(ns).min(MAX_WAIT) + std::time::Duration::from_millis(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-01-01T00:00:00Z"),
            Some(1_704_067_200_000_000_000)
        );
        assert_eq!(
            parse_rfc3339("2024-01-01T01:00:00+01:00"),
            Some(1_704_067_200_000_000_000)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T12:30:45.5Z"),
            Some(1_709_209_845_500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00.000000001-00:00"),
            Some(951_868_800_000_000_001)
        );
        // Before the epoch parses (a stored lease may say so); past 2262 does not fit.
        assert!(parse_rfc3339("1700-01-01T00:00:00Z").unwrap() < 0);
        assert_eq!(parse_rfc3339("2263-01-01T00:00:00Z"), None);
        for bad in [
            "",
            "2024-01-01",
            "2024-13-01T00:00:00Z",
            "2024-02-30T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "x024-01-01T00:00:00Z",
            "-001-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_what_it_parses() {
        for secs in [0i64, 951_782_400, 1_700_000_000, 4_102_444_799] {
            let s = rfc3339(secs);
            assert_eq!(parse_rfc3339(&s), Some(secs * 1_000_000_000), "{s}");
        }
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // Hostile inputs clamp rather than panic.
        rfc3339(i64::MAX);
        rfc3339(i64::MIN);
    }

    #[test]
    fn expiry_bounds() {
        let now = 1_800_000_000_000_000_000;
        assert!(validate_expiry("2027-01-01T00:00:00Z", now).is_ok());
        for bad in ["1700-01-01T00:00:00Z", "2200-01-01T00:00:00Z", "soon"] {
            let e = validate_expiry(bad, now).unwrap_err();
            assert!(e.message().contains(EXPIRE_LABEL), "{e}");
        }
    }

    /// Replays the fuzz corpus on stable, so the fuzz target's inputs stay covered in CI.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/date_parse");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let Ok(s) = std::str::from_utf8(&bytes) else {
                continue;
            };
            if let Some(ns) = parse_rfc3339(s) {
                assert!(parse_rfc3339(&rfc3339(ns.div_euclid(1_000_000_000))).is_some());
            }
            for now in [i64::MIN, 0, 1_800_000_000_000_000_000, i64::MAX] {
                let _ = validate_expiry(s, now);
            }
            n += 1;
        }
        assert!(n >= 5, "corpus missing at {}", dir.display());
    }
}
