//! `contentd repair`: salvage a data directory RocksDB no longer opens (damaged `.sst`
//! files, MANIFEST or WAL), then prove what was kept. RocksDB's own repair rebuilds the
//! database from what it can read; contentd then opens it, re-verifies every blob it kept
//! against its digest (a damaged one is quarantined, as the scrubber would), drops links
//! whose blob record did not survive, and reports what was lost. Run it on a stopped
//! daemon's directory, after copying the directory aside.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::error::Result;
use crate::kv::rocks::{RocksKv, Tuning};
use crate::store::Store;

#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairReport {
    /// RocksDB's repair ran (the directory did not open as it was).
    pub rocksdb_repair: bool,
    /// Blobs that survived and verified against their digests.
    pub blobs_verified: u64,
    pub bytes_checked: u64,
    /// Blobs whose bytes were damaged or lost: quarantined, with why.
    pub blobs_lost: Vec<(String, String)>,
    /// Blobs that could not be checked (an I/O error): left in place.
    pub blobs_unchecked: Vec<(String, String)>,
    /// Links (scope, digest) whose blob record did not survive: removed.
    pub links_dropped: Vec<(String, String)>,
}

/// Repairs `root` (see the module doc). With `force`, RocksDB's repair runs even when the
/// directory opens.
pub fn repair(root: &Path, force: bool) -> Result<RepairReport> {
    let tuning = Tuning::default();
    let mut report = RepairReport::default();
    let kv = match (force, RocksKv::open(root, &tuning)) {
        (false, Ok(kv)) => kv,
        (_, first) => {
            if let Err(e) = &first {
                tracing::warn!(error = %e, "data directory does not open; running RocksDB repair");
            }
            drop(first);
            RocksKv::repair(root, &tuning)?;
            report.rocksdb_repair = true;
            RocksKv::open(root, &tuning)?
        }
    };
    let store = Store::open(Arc::new(kv))?;
    for (scope, d) in store.drop_dangling_links()? {
        report.links_dropped.push((scope, d.to_string()));
    }
    let scrub = store.scrub(&[], 0)?;
    report.blobs_verified = scrub.checked - scrub.corrupt.len() as u64 - scrub.failed.len() as u64;
    report.bytes_checked = scrub.bytes;
    for c in scrub.corrupt {
        report.blobs_lost.push((c.digest.to_string(), c.reason));
    }
    for (d, why) in scrub.failed {
        report.blobs_unchecked.push((d.to_string(), why));
    }
    Ok(report)
}
