//! Fuzzes containerd's Write stream state machine (`store::WriteSession`) on the in-memory
//! store: any sequence of STAT/WRITE/COMMIT requests with any offsets, totals, expected
//! digests and data, across streams that stop and resume, must never panic, never commit a
//! blob whose bytes do not match its digest, and never report a negative offset. The
//! harness lives in the library (`store::session::fuzz_one`) so the unit tests replay this
//! corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| contentd::store::session_fuzz_one(data));
