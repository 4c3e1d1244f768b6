//! Integration tests: each drives the real `contentd` daemon over its unix sockets.

mod backend;
mod certs;
mod cli;
mod collect;
mod content;
mod distribution;
mod durability;
mod errors;
mod graph;
mod harness;
mod hostile;
mod live;
mod ops;
mod registry;
mod tools;
mod upstream;
