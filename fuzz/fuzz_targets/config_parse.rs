//! Fuzzes the configuration parser and validator: any text parses or is refused with a
//! message, and validation of whatever parses never panics (ports, modes, sizes, registry
//! endpoints, admin namespaces).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(c) = contentd::config::Config::parse(s) {
        let _ = c.validate();
        let _ = c.socket_mode_bits();
    }
});
