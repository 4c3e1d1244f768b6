//! contentd: a content-addressable blob store daemon for container images.
//!
//! Layers (imports point downwards only): `digest`/`filter` (pure) → `kv` (the storage
//! boundary; RocksDB named only in `kv::rocks`) → `store` (the content domain) → `api` (gRPC
//! translation) → `daemon` (listeners and lifecycle). `upstream` (registries, pulls) and
//! `reads` (the read path: stored, live, lazy) sit beside `store`, above it. `bench` and
//! `client` are clients.

pub mod api;
pub mod bench;
pub mod bench_pull;
pub mod bench_registry;
pub mod cli;
pub mod client;
pub mod config;
#[cfg(feature = "rocksdb")]
pub mod daemon;
pub mod dates;
pub mod digest;
pub mod error;
pub mod filter;
pub mod gc;
pub mod graph;
pub mod kv;
pub mod metrics;
pub mod net;
pub mod reads;
pub mod registry;
#[cfg(feature = "rocksdb")]
pub mod repair;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod upstream;
