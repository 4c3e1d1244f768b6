//! Scrubbing: re-verifying stored blobs against their digests, and quarantining the ones
//! whose bytes changed behind contentd's back (disk rot, a tampered data directory).
//!
//! A quarantined blob leaves service in one atomic batch: its blob record, links and owner
//! entries go, and a quarantine record keeps what it was (its bytes stay in their extent
//! for inspection; nothing reads them again). Images that needed it then show it absent,
//! and a read of it in a scope with a recorded upstream source fetches it again.

use std::time::{Duration, Instant};

use prost::Message as _;

use super::keys::{link_key, owner_key, split_link};
use super::{BlobRecord, Cf, IngestRecord, QuarantineRecord, Scope, Store, decode, now_ns};
use crate::digest::Digest;
use crate::error::{Kind, Result};
use crate::kv::Batch;

/// A blob found corrupt.
#[derive(Debug, Clone)]
pub struct Corrupt {
    pub digest: Digest,
    pub reason: String,
    /// Scopes that held it and have an upstream source to fetch it again from.
    pub refetchable: Vec<Scope>,
}

#[derive(Debug, Clone, Default)]
pub struct ScrubReport {
    pub checked: u64,
    pub bytes: u64,
    pub corrupt: Vec<Corrupt>,
    /// Blobs that could not be checked this pass (an I/O error, say), with why. The pass
    /// goes on past them; the next one tries again.
    pub failed: Vec<(Digest, String)>,
}

impl Store {
    /// Re-verifies `digests` (every stored blob when empty), reading at most `rate` bytes
    /// per second (0: unthrottled). Corrupt blobs are quarantined.
    pub fn scrub(&self, digests: &[Digest], rate: u64) -> Result<ScrubReport> {
        let list: Vec<Digest> = if digests.is_empty() {
            let mut all = Vec::new();
            self.kv.scan(Cf::Blobs, &[], &[], &mut |k, _| {
                if let Some((d, _)) = Digest::from_key(k) {
                    all.push(d);
                }
                true
            })?;
            all
        } else {
            digests.to_vec()
        };
        let mut report = ScrubReport::default();
        let start = Instant::now();
        let m = crate::metrics::get();
        for d in list {
            // One bad blob never ends the pass: damage is quarantined, any other failure is
            // recorded, and the scrub moves on to the next blob.
            let (size, r) = match self.blob(&d) {
                Ok(Some(blob)) => (blob.size.max(0) as u64, self.verify(&d)),
                Ok(None) => continue,
                Err(e) => (0, Err(e)),
            };
            report.checked += 1;
            report.bytes += size;
            m.scrub_bytes.add(&[], size);
            match r {
                Ok(()) => m.scrub_blobs.add(&["ok"], 1),
                Err(e) if e.is(Kind::DataLoss) => {
                    m.scrub_blobs.add(&["corrupt"], 1);
                    tracing::error!(digest = %d, error = %e, "scrub: corrupt blob quarantined");
                    match self.quarantine(&d, e.message()) {
                        Ok(Some(c)) => report.corrupt.push(c),
                        Ok(None) => {}
                        Err(q) => {
                            tracing::error!(digest = %d, error = %q, "scrub: cannot quarantine");
                            report
                                .failed
                                .push((d.clone(), format!("{e}; quarantine: {q}")));
                        }
                    }
                }
                Err(e) if e.is(Kind::NotFound) => {}
                Err(e) => {
                    m.scrub_blobs.add(&["error"], 1);
                    tracing::error!(digest = %d, error = %e, "scrub: cannot check blob");
                    report.failed.push((d.clone(), e.to_string()));
                }
            }
            if rate > 0 {
                // Throttle: never ahead of `rate` bytes per second on average.
                let due = Duration::from_secs_f64(report.bytes as f64 / rate as f64);
                let spent = start.elapsed();
                if due > spent {
                    std::thread::sleep(due - spent);
                }
            }
        }
        Ok(report)
    }

    /// Takes a corrupt blob out of service (see the module doc). None if it is already gone.
    fn quarantine(&self, d: &Digest, reason: &str) -> Result<Option<Corrupt>> {
        let _g = self.digest_lock(d);
        let _gate = self.gc_gate.read();
        let Some(blob) = self.blob(d)? else {
            return Ok(None);
        };
        let scopes = self.owners(d)?;
        let mut b = Batch::new();
        b.delete(Cf::Blobs, d.key());
        for s in &scopes {
            b.delete(Cf::Links, link_key(s, d));
            b.delete(Cf::Owners, owner_key(d, s));
        }
        let rec = QuarantineRecord {
            extent: blob.extent,
            size: blob.size,
            detected_ns: now_ns(),
            reason: reason.to_string(),
            scopes: scopes.iter().map(scope_name).collect(),
        };
        b.put(Cf::Quarantine, d.key(), rec.encode_to_vec());
        self.kv.write(b, true)?;
        for s in &scopes {
            self.usage_add(s, -blob.size);
        }
        self.blob_count
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.blob_bytes
            .fetch_sub(blob.size, std::sync::atomic::Ordering::Relaxed);
        let mut refetchable = Vec::new();
        for s in scopes {
            if self.source(&s, d)?.is_some() {
                refetchable.push(s);
            }
        }
        Ok(Some(Corrupt {
            digest: d.clone(),
            reason: reason.to_string(),
            refetchable,
        }))
    }

    /// Removes links whose blob record is gone (what a RocksDB repair can leave behind):
    /// a link alone cannot be trusted to name verified bytes. Returns (scope, digest) of each.
    pub fn drop_dangling_links(&self) -> Result<Vec<(String, Digest)>> {
        let mut links = Vec::new();
        let mut bad = None;
        self.kv.scan(Cf::Links, &[], &[], &mut |k, _| {
            let Some((scope, d)) = split_link(k) else {
                bad = Some(super::corrupt_record("links", k, None));
                return false;
            };
            links.push((scope, d));
            true
        })?;
        if let Some(e) = bad {
            return Err(e);
        }
        let mut dropped = Vec::new();
        for (scope, d) in links {
            let _g = self.digest_lock(&d);
            let _gate = self.gc_gate.read();
            if self.blob(&d)?.is_some() {
                continue;
            }
            let Some(link) = self.link(&scope, &d)? else {
                continue;
            };
            let mut b = Batch::new();
            b.delete(Cf::Links, link_key(&scope, &d));
            b.delete(Cf::Owners, owner_key(&d, &scope));
            self.kv.write(b, true)?;
            self.usage_add(&scope, -link.size);
            dropped.push((scope_name(&scope), d));
        }
        Ok(dropped)
    }

    /// Every extent a blob, an upload or a quarantine record names (for `contentd repair`).
    pub fn referenced_extents(&self) -> Result<std::collections::HashSet<u64>> {
        let mut out = std::collections::HashSet::new();
        let mut bad = None;
        self.kv.scan(
            Cf::Blobs,
            &[],
            &[],
            &mut |k, v| match BlobRecord::decode(v) {
                Ok(b) => {
                    out.insert(b.extent);
                    true
                }
                Err(e) => {
                    bad = Some(super::corrupt_record("blobs", k, Some(e)));
                    false
                }
            },
        )?;
        self.kv.scan(Cf::Ingests, &[], &[], &mut |_, v| {
            if let Ok(r) = IngestRecord::decode(v) {
                out.insert(r.extent);
            }
            true
        })?;
        self.kv.scan(Cf::Quarantine, &[], &[], &mut |_, v| {
            if let Ok(r) = QuarantineRecord::decode(v) {
                out.insert(r.extent);
            }
            true
        })?;
        bad.map_or(Ok(out), Err)
    }

    /// Every quarantined blob.
    pub fn quarantined(&self) -> Result<Vec<(Digest, QuarantineRecord)>> {
        let mut out = Vec::new();
        let mut bad = None;
        self.kv.scan(Cf::Quarantine, &[], &[], &mut |k, v| {
            if let Some((d, _)) = Digest::from_key(k) {
                match decode::<QuarantineRecord>("quarantine", v) {
                    Ok(r) => out.push((d, r)),
                    Err(e) => bad = Some(e),
                }
            }
            true
        })?;
        bad.map_or(Ok(out), Err)
    }

    pub fn quarantined_count(&self) -> i64 {
        self.quarantined().map(|q| q.len() as i64).unwrap_or(0)
    }
}

fn scope_name(s: &Scope) -> String {
    match s {
        Scope::Namespace(n) => format!("n:{n}"),
        Scope::Tenant(t) => format!("t:{t}"),
    }
}
