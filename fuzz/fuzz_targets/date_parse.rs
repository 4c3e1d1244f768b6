//! Fuzzes the RFC 3339 date handling clients reach (lease `containerd.io/gc.expire`): any
//! string parses or is refused without panicking; whatever parses fits the collector's
//! clock and survives expiry validation's arithmetic at any "now".
#![no_main]

#[path = "../../src/error.rs"]
#[allow(dead_code)]
mod error;
#[path = "../../src/dates.rs"]
#[allow(dead_code)]
mod dates;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(ns) = dates::parse_rfc3339(s) {
        // Formatting what parsed, and parsing it back, never panics.
        let again = dates::parse_rfc3339(&dates::rfc3339(ns.div_euclid(1_000_000_000)));
        assert!(again.is_some());
    }
    for now in [i64::MIN, 0, 1_800_000_000_000_000_000, i64::MAX] {
        let _ = dates::validate_expiry(s, now);
    }
});
