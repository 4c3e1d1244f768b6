//! Fuzzes containerd's filter grammar (the `filters` of List calls, written by clients): any
//! string parses or is refused without panicking, and a parsed filter evaluates against an
//! object without panicking.
#![no_main]

#[path = "../../src/error.rs"]
#[allow(dead_code)]
mod error;
#[path = "../../src/filter.rs"]
#[allow(dead_code)]
mod filter;

use std::collections::HashMap;

struct Obj(HashMap<String, String>);

impl filter::Adaptor for Obj {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("digest") => Some("sha256:abc".into()),
            Some("labels") => filter::label_field(path, |k| self.0.get(k)),
            _ => None,
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let parts: Vec<&str> = s.split('\n').collect();
    if let Ok(f) = filter::Filter::parse_all(&parts) {
        let obj = Obj(HashMap::from([
            ("a".to_string(), "b".to_string()),
            ("containerd.io/gc.root".to_string(), "x".to_string()),
        ]));
        let _ = f.matches(&obj);
    }
});
