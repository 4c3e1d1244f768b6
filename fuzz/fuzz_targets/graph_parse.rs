//! Fuzzes the descriptor-graph parser: any bytes, with and without a media-type hint, must
//! classify without panicking, and every edge must carry a valid digest.
#![no_main]

#[path = "../../src/digest.rs"]
#[allow(dead_code)]
mod digest;
#[path = "../../src/error.rs"]
#[allow(dead_code)]
mod error;
#[path = "../../src/graph.rs"]
#[allow(dead_code)]
mod graph;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for hint in [None, Some(graph::OCI_MANIFEST), Some(graph::DOCKER_LIST)] {
        let p = graph::parse(hint, data);
        for e in &p.edges {
            assert!(digest::Digest::parse(&e.digest.to_string()).is_ok());
        }
    }
});
