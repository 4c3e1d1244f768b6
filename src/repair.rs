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
    /// Records read back from the blob files moved aside, and how many were chunks of a
    /// surviving blob or upload (put back; the rest belonged to content already collected).
    pub blob_file_records: u64,
    pub chunks_restored: u64,
    /// Where the original blob files were moved (delete it once the report satisfies you).
    pub salvage_dir: Option<String>,
}

fn salvage_dir(root: &Path) -> std::path::PathBuf {
    root.join("lost").join("blob-files")
}

/// Moves every `*.blob` file of `root` into the salvage directory; returns their new paths.
fn move_blob_files_aside(root: &Path) -> Result<Vec<std::path::PathBuf>> {
    let io = |what: &str, e: std::io::Error| {
        crate::error::Error::unavailable(format!("{what} under {}: {e}", root.display()))
    };
    let dir = salvage_dir(root);
    std::fs::create_dir_all(&dir).map_err(|e| io("creating lost/blob-files", e))?;
    let mut moved = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| io("listing", e))? {
        let p = entry.map_err(|e| io("listing", e))?.path();
        if p.extension().is_some_and(|x| x == "blob") {
            let to = dir.join(p.file_name().expect("a file name"));
            std::fs::rename(&p, &to).map_err(|e| io("moving a blob file", e))?;
            moved.push(to);
        }
    }
    // Files moved aside by an earlier, interrupted repair count too.
    for entry in std::fs::read_dir(&dir).map_err(|e| io("listing", e))? {
        let p = entry.map_err(|e| io("listing", e))?.path();
        if !moved.contains(&p) {
            moved.push(p);
        }
    }
    moved.sort();
    Ok(moved)
}

/// Puts back the chunk records of `files` that belong to an extent a surviving blob,
/// upload or quarantine record still names; returns (records read, chunks put back).
fn put_back_chunks(
    store: &Store,
    kv: &Arc<RocksKv>,
    files: &[std::path::PathBuf],
) -> Result<(u64, u64)> {
    use crate::kv::{Batch, Cf, Kv as _};
    let wanted = store.referenced_extents()?;
    let (mut read, mut kept) = (0u64, 0u64);
    for f in files {
        let records = match RocksKv::blob_file_records(f) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "unreadable blob file skipped");
                continue;
            }
        };
        let mut b = Batch::new();
        for (k, v) in records {
            read += 1;
            let extent = k
                .get(..8)
                .and_then(|e| e.try_into().ok())
                .map(u64::from_be_bytes);
            if k.len() == 16 && extent.is_some_and(|e| wanted.contains(&e)) {
                b.put(Cf::Chunks, k, v);
                kept += 1;
            }
            if b.ops.len() >= 16 {
                kv.write_unlogged(std::mem::take(&mut b))?;
            }
        }
        if !b.is_empty() {
            kv.write_unlogged(b)?;
        }
    }
    kv.flush(Cf::Chunks)?;
    Ok((read, kept))
}

/// Repairs `root` (see the module doc). With `force`, RocksDB's repair runs even when the
/// directory opens.
pub fn repair(root: &Path, force: bool) -> Result<RepairReport> {
    let tuning = Tuning::default();
    let mut report = RepairReport::default();
    let mut salvaged_files = Vec::new();
    let kv = match (force, RocksKv::open(root, &tuning)) {
        (false, Ok(kv)) => kv,
        (_, first) => {
            if let Err(e) = &first {
                tracing::warn!(error = %e, "data directory does not open; running RocksDB repair");
            }
            drop(first);
            // Blob files first go where neither the repair nor the next open can delete
            // them (see `RocksKv::blob_file_records`).
            salvaged_files = move_blob_files_aside(root)?;
            RocksKv::repair(root, &tuning)?;
            report.rocksdb_repair = true;
            RocksKv::open(root, &tuning)?
        }
    };
    let kv = Arc::new(kv);
    let store = Store::open(kv.clone())?;
    if !salvaged_files.is_empty() {
        let (records, kept) = put_back_chunks(&store, &kv, &salvaged_files)?;
        report.blob_file_records = records;
        report.chunks_restored = kept;
        report.salvage_dir = Some(salvage_dir(root).display().to_string());
    }
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
