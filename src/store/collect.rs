//! Online garbage collection of the store: roots, mark, and a sweep that never races a write.
//!
//! Nodes are (scope, blob) pairs, keyed like `links` (scope prefix ‖ digest key), so each
//! namespace keeps only what its own roots reach, as in containerd. Roots: every backend
//! tenant hold, blobs labelled `containerd.io/gc.root`, image targets (and their
//! `gc.ref.content*` labels), shared ingests, and links younger than the grace period.
//! Edges: the descriptor graph recorded at commit (subject edges excluded) and the
//! `gc.ref.content*` labels of each link. A blob's bytes go when no scope marks it.
//!
//! Locking invariant (the write barrier): every path that creates a link, changes labels or
//! names an image holds `gc_gate` for reading while it checks and writes, and, while a
//! collection runs, records what it touched in `barrier`. The sweep takes `gc_gate` for
//! writing one bounded batch at a time, first marks everything recorded in the barrier (and
//! all it reaches), then re-checks each candidate. So a write either lands before a batch
//! (and its targets are marked) or after it (and it never referred to anything swept, since
//! what it refers to was either marked or already gone before it looked).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use prost::Message as _;

use super::keys::{extent_range, link_key, owner_key, split_link, split_scope};
use super::{ImageRecord, IngestRecord, LinkRecord, Scope, Store, now_ns};
use crate::digest::Digest;
use crate::error::Result;
use crate::gc::{self, Marked};
use crate::graph;
use crate::kv::{Batch, Cf};

/// A (scope, blob) pair: scope prefix (tag ‖ name ‖ 0) followed by the digest key.
pub type Node = Vec<u8>;

/// Roots with the reason each is one.
type Roots = Vec<(Node, String)>;
/// Every link, as sweep candidates.
type Links = Vec<(Node, LinkRecord)>;

/// Parent digest key → (edge key, child digest key, role).
type EdgeMap = HashMap<Vec<u8>, Vec<(Vec<u8>, Vec<u8>, graph::Role)>>;

/// What marking yields: the marks, every link, every edge, and the expired leases.
type MarkResult = (Marked<Node>, Links, EdgeMap, Vec<(Scope, String)>);

/// Links swept per batch: bounds how long any writer can wait on the collector.
const SWEEP_BATCH: usize = 256;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcReport {
    pub dry_run: bool,
    pub started_ns: i64,
    pub duration_ms: i64,
    pub marked: i64,
    pub blobs_swept: i64,
    pub bytes_swept: i64,
    pub links_swept: i64,
    pub swept: Vec<Digest>,
    pub max_pause_us: i64,
    /// Unleased ingests dropped because nobody wrote to them for the expiry time.
    pub ingests_expired: i64,
}

/// Why a blob is alive, or when it stops being.
#[derive(Debug, Clone, PartialEq)]
pub enum Explanation {
    Alive { root: String, path: Vec<Digest> },
    Unreachable { collectable_after_ns: i64 },
}

pub(super) fn node(scope: &Scope, d: &Digest) -> Node {
    link_key(scope, d)
}

fn split(n: &[u8]) -> Option<(Scope, Digest)> {
    split_link(n)
}

impl Store {
    /// Records a write for a running collection (call with `gc_gate` held for reading).
    pub(super) fn barrier(&self, nodes: impl IntoIterator<Item = Node>) {
        if let Some(b) = self.barrier.lock().as_mut() {
            b.extend(nodes);
        }
    }

    pub(super) fn barrier_image(&self, scope: &Scope, img: &ImageRecord) {
        if self.barrier.lock().is_none() {
            return;
        }
        let mut nodes: Vec<Node> = graph::label_refs(&img.labels)
            .iter()
            .map(|d| node(scope, d))
            .collect();
        if let Ok(d) = Digest::parse(&img.digest) {
            nodes.push(node(scope, &d));
        }
        self.barrier(nodes);
    }

    /// Counts a deletion (images, links, lease resources): one of the collector's triggers.
    pub(super) fn note_deletion(&self) {
        let n = self.deletions.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.gc_deletion_threshold {
            self.gc_wake.notify_one();
        }
    }

    /// Counts a mutation that may leave garbage behind later (a new blob, an image created or
    /// retargeted, a lease resource added): the other count trigger.
    pub(super) fn note_mutation(&self) {
        let n = self.mutations.fetch_add(1, Ordering::Relaxed) + 1;
        if self.gc_mutation_threshold > 0 && n >= self.gc_mutation_threshold {
            self.gc_wake.notify_one();
        }
    }

    /// Deletions and mutations since the last collection.
    pub fn pending_changes(&self) -> (u64, u64) {
        (
            self.deletions.load(Ordering::Relaxed),
            self.mutations.load(Ordering::Relaxed),
        )
    }

    /// Whether enough has changed since the last collection for another to be due.
    pub fn collection_due(&self) -> bool {
        let (d, m) = self.pending_changes();
        d >= self.gc_deletion_threshold
            || (self.gc_mutation_threshold > 0 && m >= self.gc_mutation_threshold)
    }

    /// Resolves when a count trigger has fired (see [`Store::collection_due`]).
    pub async fn changes_noted(&self) {
        self.gc_wake.notified().await
    }

    /// What a node reaches, for the write barrier. Every read error and every damaged record
    /// is an error: a collection that cannot see an edge must not sweep what it protects.
    fn children_of(&self, n: &Node) -> Result<Vec<Node>> {
        let (scope, d) = split(n).ok_or_else(|| super::corrupt_record("barrier", n, None))?;
        let mut out: Vec<Node> = self
            .children(&d)?
            .into_iter()
            .filter(|e| e.role.keeps_alive())
            .map(|e| node(&scope, &e.to))
            .collect();
        if let Some(link) = self.link(&scope, &d)? {
            out.extend(
                graph::label_refs(&link.labels)
                    .iter()
                    .map(|c| node(&scope, c)),
            );
        }
        Ok(out)
    }

    /// Roots and every link (as sweep candidates, with its size and creation time).
    /// Unexpired leases' content as roots (flat ones separately: not followed), and the
    /// expired leases, which the sweep deletes.
    #[allow(clippy::type_complexity)]
    fn lease_roots(&self, now: i64) -> Result<(Roots, Roots, Vec<(Scope, String)>)> {
        let (mut deep, mut flat, mut expired) = (Vec::new(), Vec::new(), Vec::new());
        for (scope, lease, content) in self.all_leases()? {
            if lease.expires_ns().is_some_and(|t| t <= now) {
                expired.push((scope, lease.id));
                continue;
            }
            let target = if lease.is_flat() {
                &mut flat
            } else {
                &mut deep
            };
            for d in content {
                target.push((node(&scope, &d), format!("lease {:?}", lease.id)));
            }
        }
        Ok((deep, flat, expired))
    }

    fn roots(&self, now: i64) -> Result<(Roots, Links)> {
        let mut roots = Vec::new();
        let mut links = Vec::new();
        let mut bad = None;
        // An eviction (the disk past its high watermark) keeps only what is really reachable.
        let grace = if self.evicting.load(Ordering::Relaxed) {
            0
        } else {
            self.gc_grace_ns
        };
        self.kv.scan(Cf::Links, &[], &[], &mut |k, v| {
            let (link, scope) = match (LinkRecord::decode(v), split(k)) {
                (Ok(link), Some((scope, _))) => (link, scope),
                (r, _) => {
                    bad = Some(super::corrupt_record("links", k, r.err()));
                    return false;
                }
            };
            {
                match &scope {
                    Scope::Tenant(t) => {
                        roots.push((k.to_vec(), format!("held by backend tenant {t:?}")))
                    }
                    Scope::Namespace(ns) if graph::is_gc_root(&link.labels) => roots.push((
                        k.to_vec(),
                        format!("label containerd.io/gc.root in namespace {ns:?}"),
                    )),
                    Scope::Namespace(ns) if now - link.created_ns < grace => roots.push((
                        k.to_vec(),
                        format!("committed in namespace {ns:?} less than the grace period ago"),
                    )),
                    _ => {}
                }
            }
            links.push((k.to_vec(), link));
            true
        })?;
        if let Some(e) = bad.take() {
            return Err(e);
        }
        for (scope, img) in self.all_images()? {
            // Targets are validated when an image is written: one that no longer parses is
            // damage, and the image's content must not be swept because of it.
            let d = Digest::parse(&img.digest).map_err(|e| {
                crate::error::Error::data_loss(format!(
                    "image {:?}: stored target {:?} is damaged: {}",
                    img.name,
                    img.digest,
                    e.message()
                ))
            })?;
            {
                roots.push((node(&scope, &d), format!("image {:?}", img.name)));
            }
            for d in graph::label_refs(&img.labels) {
                roots.push((node(&scope, &d), format!("label of image {:?}", img.name)));
            }
        }
        self.kv.scan(Cf::Ingests, &[], &[], &mut |k, v| {
            let (rec, (scope, r)) = match (IngestRecord::decode(v), split_scope(k)) {
                (Ok(rec), Some(parts)) => (rec, parts),
                (r, _) => {
                    bad = Some(super::corrupt_record("ingests", k, r.err()));
                    return false;
                }
            };
            if rec.shared.is_empty() {
                return true;
            }
            match Digest::parse(&rec.shared) {
                Ok(d) => roots.push((
                    node(&scope, &d),
                    format!("ingest {:?}", String::from_utf8_lossy(r)),
                )),
                Err(_) => {
                    bad = Some(super::corrupt_record("ingests", k, None));
                    return false;
                }
            }
            true
        })?;
        bad.map_or(Ok((roots, links)), Err)
    }

    /// Every edge, read in one sequential scan: parent digest key → (edge key, child digest
    /// key, role). Marking then never touches storage per node.
    fn edge_map(&self) -> Result<EdgeMap> {
        let mut map: EdgeMap = HashMap::new();
        let mut bad = None;
        self.kv.scan(Cf::Edges, &[], &[], &mut |k, _| {
            let parsed = Digest::from_key(k).and_then(|(_, rest)| {
                let (role, _, _) = super::keys::split_edge_rest(rest)?;
                Some((rest, role, rest.get(5..)?))
            });
            let Some((rest, role, child)) = parsed else {
                bad = Some(super::corrupt_record("edges", k, None));
                return false;
            };
            let pk = k[..k.len() - rest.len()].to_vec();
            map.entry(pk)
                .or_default()
                .push((k.to_vec(), child.to_vec(), role));
            true
        })?;
        bad.map_or(Ok(map), Err)
    }

    fn mark_all(&self, now: i64) -> Result<MarkResult> {
        let (mut roots, links) = self.roots(now)?;
        let (deep, flat, expired) = self.lease_roots(now)?;
        roots.extend(deep);
        let edges = self.edge_map()?;
        let mut labels: HashMap<&[u8], Vec<Node>> = HashMap::new();
        for (k, link) in &links {
            let refs = graph::label_refs(&link.labels);
            if !refs.is_empty()
                && let Some(nul) = k.iter().position(|b| *b == 0)
            {
                labels.insert(
                    k,
                    refs.iter()
                        .map(|d| [&k[..=nul], &d.key()[..]].concat())
                        .collect(),
                );
            }
        }
        let mut marked = gc::mark(roots, |n| {
            let Some(nul) = n.iter().position(|b| *b == 0) else {
                return Vec::new();
            };
            let (prefix, dk) = (&n[..=nul], &n[nul + 1..]);
            let mut out: Vec<Node> = edges
                .get(dk)
                .into_iter()
                .flatten()
                .filter(|e| e.2.keeps_alive())
                .map(|e| [prefix, &e.1[..]].concat())
                .collect();
            if let Some(l) = labels.get(&n[..]) {
                out.extend(l.iter().cloned());
            }
            out
        });
        for (n, reason) in flat {
            marked.mark_flat(n, reason);
        }
        Ok((marked, links, edges, expired))
    }

    /// Why `d` is alive for `scope`, or when it becomes collectable.
    pub fn explain(&self, scope: &Scope, d: &Digest) -> Result<Explanation> {
        let link = self.link(scope, d)?;
        if link.is_none() && self.blob(d)?.is_none() {
            return Err(Self::not_found(d));
        }
        let (marked, _, _, _) = self.mark_all(now_ns())?;
        match marked.explain(&node(scope, d)) {
            Some((root, path)) => Ok(Explanation::Alive {
                root,
                path: path
                    .iter()
                    .filter_map(|n| split(n).map(|(_, d)| d))
                    .collect(),
            }),
            None => Ok(Explanation::Unreachable {
                collectable_after_ns: link
                    .map(|l| l.created_ns + self.gc_grace_ns)
                    .unwrap_or(0)
                    .max(now_ns()),
            }),
        }
    }

    /// One collection. With `dry_run` nothing is removed and the report says exactly what a
    /// run at this moment would remove.
    pub fn collect(&self, dry_run: bool) -> Result<GcReport> {
        self.collect_with(dry_run, false)
    }

    /// A collection that ignores the grace period: recent content is removed unless an
    /// image, lease, label or tenant hold reaches it. What the daemon runs when the disk
    /// passes its high watermark.
    pub fn evict(&self) -> Result<GcReport> {
        self.collect_with(false, true)
    }

    fn collect_with(&self, dry_run: bool, evict: bool) -> Result<GcReport> {
        let _one = self.gc_running.lock();
        self.evicting.store(evict, Ordering::Relaxed);
        let r = self.collect_locked(dry_run);
        self.evicting.store(false, Ordering::Relaxed);
        r
    }

    fn collect_locked(&self, dry_run: bool) -> Result<GcReport> {
        let t0 = Instant::now();
        let started_ns = now_ns();
        self.deletions.store(0, Ordering::Relaxed);
        self.mutations.store(0, Ordering::Relaxed);
        {
            // Opened under the gate: a write in flight when the collection starts has landed
            // (so the scans below see it), and every later one is recorded.
            let _gate = self.gc_gate.write();
            *self.barrier.lock() = Some(Vec::new());
        }
        let result = self.collect_inner(dry_run, started_ns);
        *self.barrier.lock() = None;
        let m = crate::metrics::get();
        let mut report = match result {
            Ok(r) => r,
            Err(e) => {
                m.gc_runs.add(&["error"], 1);
                return Err(e);
            }
        };
        report.duration_ms = t0.elapsed().as_millis() as i64;
        if !dry_run {
            m.gc_runs.add(&["ok"], 1);
            m.gc_seconds.observe(&[], t0.elapsed().as_secs_f64());
            m.gc_swept.add(&["blobs"], report.blobs_swept as u64);
            m.gc_swept.add(&["bytes"], report.bytes_swept.max(0) as u64);
            self.blob_count
                .fetch_sub(report.blobs_swept, Ordering::Relaxed);
            self.blob_bytes
                .fetch_sub(report.bytes_swept, Ordering::Relaxed);
        }
        *self.gc_last.lock() = Some(report.clone());
        self.gc_runs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            dry_run,
            marked = report.marked,
            blobs = report.blobs_swept,
            bytes = report.bytes_swept,
            links = report.links_swept,
            ms = report.duration_ms,
            "garbage collection"
        );
        Ok(report)
    }

    fn collect_inner(&self, dry_run: bool, started_ns: i64) -> Result<GcReport> {
        let (mut marked, links, edges, expired) = self.mark_all(started_ns)?;
        let mut live: HashSet<Vec<u8>> = marked
            .nodes()
            .filter_map(|n| split(n).map(|(_, d)| d.key()))
            .collect();
        let mut report = GcReport {
            dry_run,
            started_ns,
            ..Default::default()
        };
        // Every stored blob, as the second sweep's candidates.
        let mut blobs: Vec<Vec<u8>> = Vec::new();
        self.kv.scan(Cf::Blobs, &[], &[], &mut |k, _| {
            blobs.push(k.to_vec());
            true
        })?;

        // Write barrier: whatever was written since the mark is marked now, with all it
        // reaches. Called with `gc_gate` held for writing.
        let drain = |marked: &mut Marked<Node>, live: &mut HashSet<Vec<u8>>| -> Result<()> {
            let recorded = self
                .barrier
                .lock()
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            for n in recorded {
                // The marker is pure and takes an infallible `children`; the first failure is
                // kept and the collection stops on it before anything more is swept.
                let mut failed = None;
                let added = marked.mark_more(n, "written during the collection".into(), |n| {
                    match self.children_of(n) {
                        Ok(c) => c,
                        Err(e) => {
                            failed.get_or_insert(e);
                            Vec::new()
                        }
                    }
                });
                if let Some(e) = failed {
                    return Err(e);
                }
                for added in added {
                    if let Some((_, d)) = split(&added) {
                        live.insert(d.key());
                    }
                }
            }
            Ok(())
        };

        // Expired leases go by the clock.
        if !dry_run && !expired.is_empty() {
            let mut b = Batch::new();
            for (scope, id) in &expired {
                self.drop_lease(&mut b, scope, id);
            }
            self.kv.write(b, false)?;
        }

        report.ingests_expired = self.expire_ingests(started_ns, dry_run)?;

        // Sweep 1: links nothing reaches.
        let candidates: Vec<&Node> = links
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !marked.contains(*k))
            .collect();
        for batch in candidates.chunks(SWEEP_BATCH) {
            // Most of the barrier is marked before taking the gate, so a writer only ever
            // waits for what arrived in the last moment plus one bounded batch.
            drain(&mut marked, &mut live)?;
            let pause = Instant::now();
            let _gate = self.gc_gate.write();
            drain(&mut marked, &mut live)?;
            let mut b = Batch::new();
            let mut uncount: Vec<(Scope, i64)> = Vec::new();
            for k in batch {
                let Some((scope, d)) = split(k) else { continue };
                // Rescued by the barrier? (One created or replaced meanwhile is in the
                // barrier, so marked.)
                if marked.contains(*k) {
                    continue;
                }
                // Deleted meanwhile? Then it was uncounted already. Deletes take the gate
                // for reading, so nothing changes between this check and the write below.
                let Some(v) = self.kv.get(Cf::Links, k)? else {
                    continue;
                };
                let size = LinkRecord::decode(&v[..])
                    .map_err(|e| super::corrupt_record("links", k, Some(e)))?
                    .size;
                b.delete(Cf::Links, (*k).clone());
                b.delete(Cf::Owners, owner_key(&d, &scope));
                uncount.push((scope, size));
                report.links_swept += 1;
            }
            if !dry_run && !b.is_empty() {
                self.kv.write(b, false)?;
                for (scope, size) in uncount {
                    self.usage_add(&scope, -size);
                }
            }
            report.max_pause_us = report.max_pause_us.max(pause.elapsed().as_micros() as i64);
        }

        // Sweep 2: blobs no scope marks.
        let candidates: Vec<&Vec<u8>> = blobs.iter().filter(|dk| !live.contains(*dk)).collect();
        for batch in candidates.chunks(SWEEP_BATCH) {
            drain(&mut marked, &mut live)?;
            // Blob records are read before the gate is taken: only the collector removes
            // them (one collection at a time), so they cannot change meanwhile, and the
            // pause a writer may see is just the batch write.
            let mut records = Vec::with_capacity(batch.len());
            for dk in batch {
                let Some((d, _)) = Digest::from_key(dk) else {
                    continue;
                };
                if let Some(blob) = self.blob(&d)? {
                    records.push((*dk, d, blob));
                }
            }
            let pause = Instant::now();
            let _gate = self.gc_gate.write();
            drain(&mut marked, &mut live)?;
            let mut b = Batch::new();
            for (dk, d, blob) in records {
                // Unmarked in every scope means every link it had was swept above, and any
                // link made since is in the barrier, hence marked.
                if live.contains(dk) {
                    continue;
                }
                let (from, to) = extent_range(blob.extent);
                b.delete(Cf::Blobs, (*dk).clone());
                b.delete_range(Cf::Chunks, from.to_vec(), to.to_vec());
                for (ek, child, role) in edges.get(dk).into_iter().flatten() {
                    b.delete(Cf::Edges, ek.clone());
                    b.delete(
                        Cf::Parents,
                        [&child[..], &dk[..], &[role.code()][..]].concat(),
                    );
                }
                report.blobs_swept += 1;
                report.bytes_swept += blob.size;
                report.swept.push(d);
            }
            if !dry_run && !b.is_empty() {
                self.kv.write(b, false)?;
            }
            report.max_pause_us = report.max_pause_us.max(pause.elapsed().as_micros() as i64);
        }
        report.marked = marked.len() as i64;
        report.swept.sort();
        Ok(report)
    }

    /// Drops ingests that no lease holds and nobody has written to for `ingest_expiry`.
    fn expire_ingests(&self, now: i64, dry_run: bool) -> Result<i64> {
        let mut leased: HashSet<Vec<u8>> = HashSet::new();
        self.kv.scan(Cf::LeaseResources, &[], &[], &mut |k, _| {
            // scope ‖ 0 ‖ lease ‖ 0 ‖ "ingests" ‖ 0 ‖ ref  →  scope ‖ 0 ‖ ref
            let parts: Vec<&[u8]> = k.splitn(4, |b| *b == 0).collect();
            if parts.len() == 4 && parts[2] == b"ingests" {
                leased.insert([parts[0], &[0], parts[3]].concat());
            }
            true
        })?;
        let mut stale = Vec::new();
        self.kv.scan(Cf::Ingests, &[], &[], &mut |k, v| {
            if let Ok(rec) = IngestRecord::decode(v)
                && now - rec.updated_ns > self.ingest_expiry_ns
                && !leased.contains(k)
            {
                stale.push((k.to_vec(), rec.extent, rec.shared.is_empty()));
            }
            true
        })?;
        let mut n = 0;
        for (key, extent, owns_extent) in stale {
            // A live writer holds the slot: leave it. The slots map lock keeps a new writer
            // from opening the ingest while it is dropped.
            let mut slots = self.slots.lock();
            let guard = match slots.get(&key) {
                Some((slot, _)) => match slot.clone().try_lock_owned() {
                    Ok(g) => Some(g),
                    Err(_) => continue,
                },
                None => None,
            };
            n += 1;
            if dry_run {
                continue;
            }
            let mut b = Batch::new();
            b.delete(Cf::Ingests, key.clone());
            if owns_extent {
                let (from, to) = extent_range(extent);
                b.delete_range(Cf::Chunks, from.to_vec(), to.to_vec());
            }
            self.kv.write(b, false)?;
            if let Some(mut g) = guard {
                *g = None;
            }
            slots.remove(&key);
        }
        Ok(n)
    }

    pub fn gc_status(&self) -> (bool, Option<GcReport>, u64) {
        let running = self.gc_running.try_lock().is_none();
        (
            running,
            self.gc_last.lock().clone(),
            self.gc_runs.load(Ordering::Relaxed),
        )
    }
}
