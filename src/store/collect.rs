//! Online garbage collection of the store: roots, mark, and a sweep that never races a write.
//!
//! Nodes are (scope, blob) pairs, keyed like `links` (scope prefix ‖ digest key), so each
//! namespace keeps only what its own roots reach, as in containerd. Roots: every backend
//! tenant hold, blobs labelled `containerd.io/gc.root`, image targets (and their
//! `gc.ref.content*` labels), shared ingests, and links younger than the grace period.
//! Edges: the descriptor graph recorded at commit (subject edges excluded) and the
//! `gc.ref.content*` labels of each link. A blob's bytes go when no scope marks it; an
//! upstream source record goes when its (scope, blob) is unmarked and it is ten minutes old.
//!
//! Locking invariant (the write barrier): every path that creates a link, changes labels or
//! names an image holds `gc_gate` for reading while it checks and writes, and, while a
//! collection runs, records what it touched in `barrier`. The sweep takes `gc_gate` for
//! writing one bounded batch at a time, first marks everything recorded in the barrier (and
//! all it reaches), then re-checks each candidate. So a write either lands before a batch
//! (and its targets are marked) or after it (and it never referred to anything swept, since
//! what it refers to was either marked or already gone before it looked). A recorded node
//! that was marked already is expanded again: its edges or labels may be what changed.
//!
//! Memory: the collector never holds a column family. Roots and sweep candidates are read a
//! page at a time, children are looked up a batch at a time (sorted seeks through one
//! iterator), and marks are 128-bit fingerprints of blob keys with a scope number
//! (`gc::Grouped`), ~21 bytes per live blob (marked in one or two scopes; ~21 more per
//! further scope), held in memory up to `gc_mark_memory` and on disk past it (`marks.rs`).
//! The links labelled with `gc.ref.content*` (whose labels the walk must read) are a Bloom
//! filter of a byte per blob, at most an eighth of that budget. So a collection holds the
//! budget and an eighth plus constant buffers, whatever the store's size.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::Ordering;
use std::time::Instant;

use prost::Message as _;

use super::keys::{extent_range, link_key, owner_key, split_link, split_scope};
use super::marks::SpillingMarks;
use super::{ImageRecord, IngestRecord, LinkRecord, Scope, Store, now_ns};
use crate::digest::Digest;
use crate::error::Result;
use crate::gc::{self, Marked};
use crate::graph;
use crate::kv::{Batch, Cf};

/// A (scope, blob) pair: scope prefix (tag ‖ name ‖ 0) followed by the digest key.
pub type Node = Vec<u8>;

/// Roots with the reason each is one (empty when the caller does not need it).
type Roots = Vec<(Node, String)>;

/// Links swept per batch: bounds how long any writer can wait on the collector.
const SWEEP_BATCH: usize = 256;
/// A drain that found at most this many recorded nodes leaves little for the one under the gate.
const DRAIN_QUIET: usize = 64;
/// Drains tried before a batch takes the gate, whatever they find.
const DRAIN_ROUNDS: usize = 32;
/// How long the collector looks for a moment with no writer before queueing for the gate.
const GATE_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// How often a collector waiting for the gate marks what writers recorded meanwhile.
const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(2);
/// A source nothing reaches is kept at least this long after it was recorded (or last
/// refreshed by a pull), whatever the grace period: a pull in flight is about to reach it.
const SOURCE_MIN_AGE_NS: i64 = 600 * 1_000_000_000;
/// Blobs up to this size have their chunks deleted key by key; larger ones by one range.
/// Below the chunk family's blob-file threshold, so finding the keys reads no blob file.
const POINT_DELETE_MAX: i64 = 16 << 10;

/// Entries read per page of a scan (roots, sweep candidates): what a collection holds of a
/// column family at once.
const PAGE: usize = 4096;

/// Recorded writes the mark phase lets the barrier hold before it marks them (between two
/// pages of roots). Each is a node key (~90 bytes with its allocation), and marking a large
/// store takes minutes: left to the sweep, every write made meanwhile was held at once.
pub(super) const BARRIER_DRAIN_AT: usize = 4096;

/// Bits per stored blob of the filter of labelled links (see `labelled_links`): eight or
/// more per labelled link while there are no more of them than blobs (a manifest's link in
/// one or two scopes, as a rule), so a false "maybe" 2% of the time or less.
const LABELLED_BITS: usize = 8;

/// Nodes whose children are looked up together (one iterator, sorted seeks).
const WALK_BATCH: usize = 512;

/// Swept digests a report lists (in digest order); the counts are always exact.
pub const SWEPT_LISTED: usize = 10_000;

/// 128-bit fingerprints of blob and link keys, from two differently and randomly keyed
/// SipHashes (fresh keys for every collection). The collector's marked sets hold these
/// instead of the keys, so its memory is ~21 bytes per live blob whatever the key length.
/// Two keys sharing a fingerprint would make the walk take the second for walked already, so
/// the odds matter: about n²/2¹²⁹ for n marked keys (10⁻²⁵ at ten million), and with secret
/// keys no client can aim for one.
struct Fingerprints(RandomState, RandomState);

impl Fingerprints {
    fn new() -> Self {
        Self(RandomState::new(), RandomState::new())
    }
    fn of(&self, key: &[u8]) -> u128 {
        (u128::from(self.0.hash_one(key)) << 64) | u128::from(self.1.hash_one(key))
    }
}

/// A collection's marks: (scope, blob) nodes reached, each as (fingerprint of the blob's
/// key, index of its scope), which also answers whether any scope reached a blob (a blob goes
/// when none did); and the links whose labels name more content.
struct Marks {
    fp: Fingerprints,
    nodes: gc::Reach<SpillingMarks>,
    scopes: Scopes,
    labelled: gc::Filter,
}

/// The scope prefixes of marked nodes, numbered as they are first seen.
#[derive(Default)]
struct Scopes(HashMap<Vec<u8>, u32>);

impl Scopes {
    fn index(&mut self, prefix: &[u8]) -> u32 {
        if let Some(i) = self.0.get(prefix) {
            return *i;
        }
        // More scopes than u32 holds cannot exist: each is a key in the store.
        let i = self.0.len() as u32;
        self.0.insert(prefix.to_vec(), i);
        i
    }

    fn find(&self, prefix: &[u8]) -> Option<u32> {
        self.0.get(prefix).copied()
    }
}

/// A node's scope prefix (through its NUL) and blob key. Splitting at the first NUL is
/// one-to-one (a scope tag holds no NUL), and a key without one is its own blob key under the
/// empty prefix, which no scope has.
fn split_node(n: &[u8]) -> (&[u8], &[u8]) {
    match n.iter().position(|b| *b == 0) {
        Some(p) => n.split_at(p + 1),
        None => (&[], n),
    }
}

impl Marks {
    /// The node's mark key, numbering its scope if it is new.
    fn key(fp: &Fingerprints, scopes: &mut Scopes, n: &[u8]) -> (u128, u32) {
        let (scope, blob) = split_node(n);
        (fp.of(blob), scopes.index(scope))
    }

    /// Whether node `n` (a link or source key) was marked.
    fn marked(&self, n: &[u8]) -> bool {
        let (scope, blob) = split_node(n);
        self.scopes
            .find(scope)
            .is_some_and(|s| self.nodes.contains(&(self.fp.of(blob), s)))
    }

    /// Whether any scope's node of blob key `dk` was marked.
    fn live(&self, dk: &[u8]) -> bool {
        self.nodes.set().contains_item(self.fp.of(dk))
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcReport {
    pub dry_run: bool,
    pub started_ns: i64,
    pub duration_ms: i64,
    pub marked: i64,
    pub blobs_swept: i64,
    pub bytes_swept: i64,
    pub links_swept: i64,
    /// Upstream source records dropped: nothing reaches their blob in their scope.
    pub sources_swept: i64,
    pub swept: Vec<Digest>,
    pub max_pause_us: i64,
    /// Unleased ingests dropped because nobody wrote to them for the expiry time.
    pub ingests_expired: i64,
    /// Times the marks outgrew their memory budget and went to disk (`marks.rs`).
    pub mark_spills: i64,
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

/// Most compactions one collection asks for to give back the space of swept extents; more
/// runs of them are merged into one range over all (it also rewrites the index entries of
/// the kept blobs between them, which are small: their bytes stay in their blob files).
const RECLAIM_RANGES_MAX: usize = 16;

/// Discarded ingests remembered for the next collection to reclaim.
const FREED_MAX: usize = 4096;

impl Store {
    /// Deletes an ingest's record and, unless it only shadows a stored blob (a shared
    /// ingest's extent holds no bytes), its bytes, in one write on top of `b`. The next
    /// collection gives the disk space of those bytes back with its own.
    pub(super) fn drop_ingest(
        &self,
        mut b: Batch,
        key: &[u8],
        rec: &IngestRecord,
        sync: bool,
    ) -> Result<()> {
        b.delete(Cf::Ingests, key.to_vec());
        let owned = rec.shared.is_empty();
        if owned {
            let (from, to) = extent_range(rec.extent);
            b.delete_range(Cf::Chunks, from.to_vec(), to.to_vec());
        }
        self.kv.write(b, sync)?;
        if owned && rec.offset > POINT_DELETE_MAX {
            let mut f = self.freed.lock();
            if f.len() < FREED_MAX {
                f.push(rec.extent);
            }
        }
        Ok(())
    }
}

/// The chunk-key ranges covering `extents`, contiguous ids merged.
fn reclaim_ranges(mut extents: Vec<u64>) -> Vec<(Vec<u8>, Vec<u8>)> {
    extents.sort_unstable();
    extents.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in extents {
        match runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(e) => *last = e,
            _ => runs.push((e, e)),
        }
    }
    if runs.len() > RECLAIM_RANGES_MAX {
        runs = vec![(runs[0].0, runs[runs.len() - 1].1)];
    }
    runs.into_iter()
        .map(|(first, last)| {
            (
                extent_range(first).0.to_vec(),
                extent_range(last).1.to_vec(),
            )
        })
        .collect()
}

/// The keys of a page that `marked` does not hold: a sweep's candidates.
fn unmarked(page: crate::kv::Page, marked: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    page.into_iter()
        .map(|(k, _)| k)
        .filter(|k| !marked(k))
        .collect()
}

impl Store {
    /// `gc_gate` for writing, taken in a moment when no writer holds it. A writer that
    /// queued behind a collector that itself waits on a slow commit (an fsync under a busy
    /// disk) would wait for both; so the collector polls, and so never makes writers wait
    /// for anything but its own bounded batch. A collector that finds no such moment within
    /// GATE_POLL queues as a plain writer would, so it cannot starve.
    ///
    /// While it polls it keeps draining the barrier (marking outside the gate is what the
    /// first drain already does): the drain under the gate, which writers wait for, then
    /// covers only the last DRAIN_EVERY of writes, however fast they arrive.
    fn sweep_gate(
        &self,
        mut drain: impl FnMut() -> Result<usize>,
    ) -> Result<parking_lot::RwLockWriteGuard<'_, ()>> {
        let t = Instant::now();
        let mut drained = Instant::now();
        loop {
            if let Some(g) = self.gc_gate.try_write() {
                return Ok(g);
            }
            if t.elapsed() > GATE_POLL {
                drain()?;
                return Ok(self.gc_gate.write());
            }
            if drained.elapsed() > DRAIN_EVERY {
                drain()?;
                drained = Instant::now();
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }

    /// One sweep batch: the barrier is drained (most of it before the gate, so a writer only
    /// ever waits for what arrived in the last moment plus one bounded batch), then, under
    /// the gate, drained again and `fill` picks the deletes, re-checking each candidate
    /// against the marks. Returns whether the batch was written (not for a dry run).
    fn sweep_batch(
        &self,
        m: &mut Marks,
        drain: &dyn Fn(&mut Marks) -> Result<usize>,
        dry_run: bool,
        report: &mut GcReport,
        fill: impl FnOnce(&Marks, &mut Batch, &mut GcReport) -> Result<()>,
    ) -> Result<bool> {
        // Drained until one drain's worth of new writes is a handful. After the mark phase
        // the barrier holds every write made during it, and marking those takes seconds;
        // the writes made meanwhile would otherwise all be marked under the gate (measured:
        // a 285 ms pause at 1M blobs, the only batch over 15 ms). While writes arrive slower
        // than they are drained this converges in a few rounds; the cap bounds a storm.
        for _ in 0..DRAIN_ROUNDS {
            if drain(m)? <= DRAIN_QUIET {
                break;
            }
        }
        let _gate = self.sweep_gate(|| drain(m))?;
        let pause = Instant::now();
        // Writers wait for this drain: the marks spill now only if they must.
        m.nodes.set_mut().set_holding(true);
        let drained = drain(m);
        m.nodes.set_mut().set_holding(false);
        drained?;
        let mut b = Batch::new();
        fill(m, &mut b, report)?;
        // Marks that could not be read back answer "marked", so the batch deletes nothing
        // live; but the collection stops here rather than sweep on half-known marks.
        if let Some(e) = m.nodes.set().failure() {
            return Err(e.clone());
        }
        let write = !dry_run && !b.is_empty();
        if write {
            self.kv.write(b, false)?;
        }
        report.max_pause_us = report.max_pause_us.max(pause.elapsed().as_micros() as i64);
        Ok(write)
    }

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

    /// Marks what writers recorded in the barrier since the last drain, with all it reaches;
    /// returns how many nodes that was. A recorded node may be marked already but have new
    /// edges or labels (a label update, a dedupe commit repairing edges), so its children
    /// are read afresh rather than trusting the mark. Draining early is always safe: a node
    /// that changes again after it was drained is recorded again.
    fn drain_barrier(&self, m: &mut Marks) -> Result<usize> {
        let recorded = self
            .barrier
            .lock()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        if recorded.is_empty() {
            return Ok(0);
        }
        let n = recorded.len();
        let kids = self.children_batch(&recorded, None)?;
        let start: Vec<Node> = recorded
            .into_iter()
            .chain(kids.into_iter().flatten())
            .collect();
        self.mark_from(m, start, true)?;
        Ok(n)
    }

    /// Drains the barrier during the mark phase once it holds BARRIER_DRAIN_AT nodes, so
    /// what writers record while a large store is marked (minutes at ten million blobs)
    /// never accumulates in memory until the sweep.
    fn drain_barrier_if_long(&self, m: &mut Marks) -> Result<()> {
        let long = self
            .barrier
            .lock()
            .as_ref()
            .is_some_and(|b| b.len() >= BARRIER_DRAIN_AT);
        if long {
            self.drain_barrier(m)?;
        }
        Ok(())
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

    /// The children of a batch of nodes, in order: descriptor edges that keep a child alive
    /// (one forward seek per distinct blob, all through one iterator) and the
    /// `gc.ref.content*` labels of each node's link. With `labelled`, only the links it names
    /// are read (the mark phase builds it from a full scan); without, every node's link is
    /// (the write barrier: labels may have changed since that scan). Every read error and
    /// every damaged record is an error: a collection that cannot see an edge must not sweep
    /// what it protects.
    fn children_batch(
        &self,
        nodes: &[Node],
        labelled: Option<(&Fingerprints, &gc::Filter)>,
    ) -> Result<Vec<Vec<Node>>> {
        let nul: Vec<Option<usize>> = nodes
            .iter()
            .map(|n| n.iter().position(|b| *b == 0))
            .collect();
        let mut dks: Vec<&[u8]> = nodes
            .iter()
            .zip(&nul)
            .filter_map(|(n, p)| p.map(|p| &n[p + 1..]))
            .collect();
        dks.sort_unstable();
        dks.dedup();
        let mut kids: Vec<Vec<Vec<u8>>> = vec![Vec::new(); dks.len()];
        let mut bad = None;
        self.kv.scan_prefixes(Cf::Edges, &dks, &mut |i, k, _| {
            let rest = &k[dks[i].len()..];
            match super::keys::split_edge_rest(rest) {
                Some((role, _, _)) => {
                    if role.keeps_alive() {
                        kids[i].push(rest[5..].to_vec());
                    }
                    true
                }
                None => {
                    bad = Some(super::corrupt_record("edges", k, None));
                    false
                }
            }
        })?;
        if let Some(e) = bad {
            return Err(e);
        }
        let mut out = Vec::with_capacity(nodes.len());
        for (n, p) in nodes.iter().zip(&nul) {
            let Some(p) = *p else {
                out.push(Vec::new());
                continue;
            };
            let (prefix, dk) = (&n[..=p], &n[p + 1..]);
            let mut c: Vec<Node> = match dks.binary_search(&dk) {
                Ok(i) => kids[i]
                    .iter()
                    .map(|child| [prefix, &child[..]].concat())
                    .collect(),
                Err(_) => Vec::new(),
            };
            let read_labels = labelled.is_none_or(|(fp, set)| set.may_contain(fp.of(n)));
            if read_labels && let Some(v) = self.kv.get(Cf::Links, n)? {
                let link = LinkRecord::decode(&v[..])
                    .map_err(|e| super::corrupt_record("links", n, Some(e)))?;
                c.extend(
                    graph::label_refs(&link.labels)
                        .iter()
                        .map(|d| [prefix, &d.key()[..]].concat()),
                );
            }
            out.push(c);
        }
        Ok(out)
    }

    /// Marks `start` and all it reaches. `fresh` reads every walked node's labels instead of
    /// trusting the set the mark phase began with (see [`Store::children_batch`]).
    fn mark_from(&self, m: &mut Marks, start: Vec<Node>, fresh: bool) -> Result<()> {
        let Marks {
            fp,
            nodes,
            scopes,
            labelled,
        } = m;
        let fp = &*fp;
        let labelled = (!fresh).then_some((fp, &*labelled));
        nodes.mark(
            start,
            |n| Marks::key(fp, scopes, n),
            WALK_BATCH,
            |ns| self.children_batch(ns, labelled),
            |_| {},
        )
    }

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

    /// Hands every root to `f`, a page at a time, with no storage iterator open while `f`
    /// runs: backend tenant holds, links labelled `containerd.io/gc.root` or younger than the
    /// grace period, image targets and their label refs, shared ingests, and unexpired deep
    /// leases' content. Returns flat leases' content (marked without their edges) and the
    /// expired leases. `reasons` describes each root (for explain; the collector skips the
    /// cost).
    #[allow(clippy::type_complexity)]
    fn for_each_root(
        &self,
        now: i64,
        reasons: bool,
        f: &mut dyn FnMut(Roots) -> Result<()>,
    ) -> Result<(Roots, Vec<(Scope, String)>)> {
        let why = |r: &dyn Fn() -> String| if reasons { r() } else { String::new() };
        // An eviction (the disk past its high watermark) keeps only what is really reachable.
        let grace = if self.evicting.load(Ordering::Relaxed) {
            0
        } else {
            self.gc_grace_ns
        };
        crate::kv::for_each_page(&*self.kv, Cf::Links, PAGE, &mut |page| {
            let mut roots = Vec::new();
            for (k, v) in page {
                let (link, scope) = match (LinkRecord::decode(&v[..]), split(&k)) {
                    (Ok(link), Some((scope, _))) => (link, scope),
                    (r, _) => return Err(super::corrupt_record("links", &k, r.err())),
                };
                let reason = match &scope {
                    Scope::Tenant(t) => why(&|| format!("held by backend tenant {t:?}")),
                    Scope::Namespace(ns) if graph::is_gc_root(&link.labels) => {
                        why(&|| format!("label containerd.io/gc.root in namespace {ns:?}"))
                    }
                    Scope::Namespace(ns) if now.saturating_sub(link.created_ns) < grace => {
                        why(&|| {
                            format!("committed in namespace {ns:?} less than the grace period ago")
                        })
                    }
                    _ => continue,
                };
                roots.push((k, reason));
            }
            f(roots)?;
            Ok(true)
        })?;
        crate::kv::for_each_page(&*self.kv, Cf::Images, PAGE, &mut |page| {
            let mut roots = Vec::new();
            for (k, v) in page {
                let (scope, img) = match (split_scope(&k), ImageRecord::decode(&v[..])) {
                    (Some((scope, _)), Ok(img)) => (scope, img),
                    (_, r) => return Err(super::corrupt_record("images", &k, r.err())),
                };
                // Targets are validated when an image is written: one that no longer parses
                // is damage, and the image's content must not be swept because of it.
                let d = Digest::parse(&img.digest).map_err(|e| {
                    crate::error::Error::data_loss(format!(
                        "image {:?}: stored target {:?} is damaged: {}",
                        img.name,
                        img.digest,
                        e.message()
                    ))
                })?;
                roots.push((node(&scope, &d), why(&|| format!("image {:?}", img.name))));
                for d in graph::label_refs(&img.labels) {
                    roots.push((
                        node(&scope, &d),
                        why(&|| format!("label of image {:?}", img.name)),
                    ));
                }
            }
            f(roots)?;
            Ok(true)
        })?;
        crate::kv::for_each_page(&*self.kv, Cf::Ingests, PAGE, &mut |page| {
            let mut roots = Vec::new();
            for (k, v) in page {
                let (rec, (scope, r)) = match (IngestRecord::decode(&v[..]), split_scope(&k)) {
                    (Ok(rec), Some(parts)) => (rec, parts),
                    (r, _) => return Err(super::corrupt_record("ingests", &k, r.err())),
                };
                if rec.shared.is_empty() {
                    continue;
                }
                let d = Digest::parse(&rec.shared)
                    .map_err(|_| super::corrupt_record("ingests", &k, None))?;
                roots.push((
                    node(&scope, &d),
                    why(&|| format!("ingest {:?}", String::from_utf8_lossy(r))),
                ));
            }
            f(roots)?;
            Ok(true)
        })?;
        let (deep, flat, expired) = self.lease_roots(now)?;
        f(deep)?;
        Ok((flat, expired))
    }

    /// The links whose labels name more content (`gc.ref.content*`), by fingerprint, in a
    /// filter of LABELLED_BITS per blob and at most an eighth of the marks' budget: a false
    /// "maybe" costs the walk one link read, and a store with more labelled links than its
    /// filter has room for pays in reads, not memory.
    fn labelled_links(&self, fp: &Fingerprints) -> Result<gc::Filter> {
        let blobs = self.blob_count.load(Ordering::Relaxed).max(0) as usize;
        let mut out = gc::Filter::with_bits(
            blobs
                .saturating_mul(LABELLED_BITS)
                // An eighth of the budget's bytes, in bits.
                .min(self.gc_mark_memory / 8 * 8),
        );
        let mut bad = None;
        self.kv.scan(
            Cf::Links,
            &[],
            &[],
            &mut |k, v| match LinkRecord::decode(v) {
                Ok(link) => {
                    if !graph::label_refs(&link.labels).is_empty() {
                        out.insert(fp.of(k));
                    }
                    true
                }
                Err(e) => {
                    bad = Some(super::corrupt_record("links", k, Some(e)));
                    false
                }
            },
        )?;
        bad.map_or(Ok(out), Err)
    }

    /// The last collection's table sizes as saved, bounded by the store (a damaged record
    /// must not size a table beyond what the store could fill): at most one entry per blob
    /// and an eighth more (a manifest may name blobs not stored), and as many spilled pairs
    /// (more are possible, but this is only where the tables start).
    pub(super) fn saved_gc_sizes(&self) -> Result<(usize, usize)> {
        let Some(v) = self.kv.get(Cf::Meta, super::META_GC_SIZES)? else {
            return Ok((0, 0));
        };
        let Ok(v) = <[u8; 16]>::try_from(&v[..]) else {
            tracing::warn!("ignoring a malformed gc_sizes record");
            return Ok((0, 0));
        };
        let blobs = self.blob_count.load(Ordering::Relaxed).max(0) as u64;
        let cap = blobs.saturating_add(blobs / 8).saturating_add(1024);
        let items = u64::from_be_bytes(v[..8].try_into().expect("8 bytes")).min(cap);
        let spilled = u64::from_be_bytes(v[8..].try_into().expect("8 bytes")).min(cap);
        Ok((items as usize, spilled as usize))
    }

    /// The mark phase of a collection: everything reachable from a root, as fingerprints,
    /// and the expired leases.
    fn mark_reach(&self, now: i64) -> Result<(Marks, Vec<(Scope, String)>)> {
        let fp = Fingerprints::new();
        let labelled = self.labelled_links(&fp)?;
        // The marks start at the size the last collection's reached (saved, so also after a
        // restart): grown from empty, a table holds its old self beside the new one at every
        // doubling. A dry run over 5.85M live blobs peaked at 381 MiB RSS from empty sets,
        // 316 MiB from presized ones.
        let (items, spilled) = *self.gc_sizes.lock();
        let mut m = Marks {
            fp,
            nodes: gc::Reach::new(SpillingMarks::new(
                self.gc_mark_memory,
                self.scratch_dir.clone(),
                items,
                spilled,
            )),
            scopes: Scopes::default(),
            labelled,
        };
        let (flat, expired) = self.for_each_root(now, false, &mut |roots| {
            self.mark_from(&mut m, roots.into_iter().map(|(n, _)| n).collect(), false)?;
            #[cfg(test)]
            if let Some(hook) = self.during_mark.lock().take() {
                hook();
            }
            self.drain_barrier_if_long(&mut m)
        })?;
        for (n, _) in flat {
            let k = Marks::key(&m.fp, &mut m.scopes, &n);
            m.nodes.mark_flat(k);
        }
        Ok((m, expired))
    }

    /// Why `d` is alive for `scope`, or when it becomes collectable. A full walk that keeps
    /// each marked node's predecessor, so it costs memory in proportion to what is live: a
    /// diagnostic, not something the collector runs.
    pub fn explain(&self, scope: &Scope, d: &Digest) -> Result<Explanation> {
        let link = self.link(scope, d)?;
        if link.is_none() && self.blob(d)?.is_none() {
            return Err(Self::not_found(d));
        }
        let mut roots = Vec::new();
        let (flat, _) = self.for_each_root(now_ns(), true, &mut |r| {
            roots.extend(r);
            Ok(())
        })?;
        let mut failed = None;
        let mut marked: Marked<Node> = gc::mark(roots, |n| {
            match self.children_batch(std::slice::from_ref(n), None) {
                Ok(mut c) => c.pop().unwrap_or_default(),
                Err(e) => {
                    failed.get_or_insert(e);
                    Vec::new()
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        for (n, reason) in flat {
            marked.mark_flat(n, reason);
        }
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
                    .map(|l| l.created_ns.saturating_add(self.gc_grace_ns))
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
            let _gate = self.sweep_gate(|| Ok(0))?;
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
        let began = std::time::Instant::now();
        let (mut m, expired) = self.mark_reach(started_ns)?;
        tracing::debug!(
            ms = began.elapsed().as_millis() as u64,
            "collection: marked"
        );
        if let Some(e) = m.nodes.set().failure() {
            return Err(e.clone());
        }
        #[cfg(test)]
        if let Some(hook) = self.after_mark.lock().take() {
            hook();
        }
        let mut report = GcReport {
            dry_run,
            started_ns,
            ..Default::default()
        };

        let drain = |m: &mut Marks| self.drain_barrier(m);

        // Expired leases go by the clock.
        if !dry_run && !expired.is_empty() {
            let mut b = Batch::new();
            for (scope, id) in &expired {
                self.drop_lease(&mut b, scope, id);
            }
            self.kv.write(b, false)?;
        }

        report.ingests_expired = self.expire_ingests(started_ns, dry_run)?;

        // Sweep 1: links nothing reaches, a page of the links at a time.
        crate::kv::for_each_page(&*self.kv, Cf::Links, PAGE, &mut |page| {
            let candidates = unmarked(page, |k| m.marked(k));
            for batch in candidates.chunks(SWEEP_BATCH) {
                let mut uncount: Vec<(Scope, i64)> = Vec::new();
                let written =
                    self.sweep_batch(&mut m, &drain, dry_run, &mut report, |m, b, report| {
                        for k in batch {
                            let Some((scope, d)) = split(k) else { continue };
                            // Rescued by the barrier? (One created or replaced meanwhile is in the
                            // barrier, so marked.)
                            if m.marked(k) {
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
                            b.delete(Cf::Links, k.clone());
                            b.delete(Cf::Owners, owner_key(&d, &scope));
                            uncount.push((scope, size));
                            report.links_swept += 1;
                        }
                        Ok(())
                    })?;
                if written {
                    for (scope, size) in uncount {
                        self.usage_add(&scope, -size);
                    }
                }
            }
            Ok(true)
        })?;

        // Sweep 2: blobs no scope marks, a page of the blobs at a time. The extents of the
        // large ones (the bytes in blob files) are given back to the disk at the end.
        let mut freed: Vec<u64> = if dry_run {
            Vec::new()
        } else {
            std::mem::take(&mut *self.freed.lock())
        };
        crate::kv::for_each_page(&*self.kv, Cf::Blobs, PAGE, &mut |page| {
            let candidates = unmarked(page, |dk| m.live(dk));
            for batch in candidates.chunks(SWEEP_BATCH) {
                // Records and edges are read before the gate is taken: only the collector
                // removes a blob (one collection at a time), and a commit that adds edges to
                // one (a dedupe commit repairing them) is in the barrier, so that blob is
                // marked below and kept. The pause a writer may see is just the batch write.
                let mut records = Vec::with_capacity(batch.len());
                for dk in batch {
                    let Some((d, _)) = Digest::from_key(dk) else {
                        continue;
                    };
                    if let Some(blob) = self.blob(&d)? {
                        records.push((dk, d, blob, Vec::new()));
                    }
                }
                let prefixes: Vec<&[u8]> = records.iter().map(|r| &r.0[..]).collect();
                let mut edge_keys: Vec<Vec<Vec<u8>>> = vec![Vec::new(); prefixes.len()];
                self.kv
                    .scan_prefixes(Cf::Edges, &prefixes, &mut |i, k, _| {
                        edge_keys[i].push(k.to_vec());
                        true
                    })?;
                for (r, keys) in records.iter_mut().zip(edge_keys) {
                    r.3 = keys;
                }
                // A small blob's chunks are point-deleted, by the keys found here: a range
                // tombstone per blob made each batch write ~15 ms at 256 blobs, and every
                // later read of the chunk family pays for tombstones until compaction. Only
                // values held inline are scanned (no blob-file reads), and a committed
                // extent gains no chunks, so the keys found here are all of them.
                let mut small: Vec<([u8; 8], usize)> = records
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.2.size <= POINT_DELETE_MAX)
                    .map(|(i, r)| (r.2.extent.to_be_bytes(), i))
                    .collect();
                small.sort_unstable();
                let prefixes: Vec<&[u8]> = small.iter().map(|(e, _)| &e[..]).collect();
                let mut chunk_keys: Vec<Option<Vec<Vec<u8>>>> = vec![None; records.len()];
                for (_, i) in &small {
                    chunk_keys[*i] = Some(Vec::new());
                }
                self.kv
                    .scan_prefixes(Cf::Chunks, &prefixes, &mut |i, k, _| {
                        if let Some(keys) = &mut chunk_keys[small[i].1] {
                            keys.push(k.to_vec());
                        }
                        true
                    })?;
                self.sweep_batch(&mut m, &drain, dry_run, &mut report, |m, b, report| {
                    for ((dk, d, blob, edge_keys), chunks) in records.into_iter().zip(chunk_keys) {
                        // Unmarked in every scope means every link it had was swept above, and any
                        // link made since is in the barrier, hence marked.
                        if m.live(dk) {
                            continue;
                        }
                        b.delete(Cf::Blobs, dk.clone());
                        match chunks {
                            Some(keys) => keys.into_iter().for_each(|k| b.delete(Cf::Chunks, k)),
                            None => {
                                let (from, to) = extent_range(blob.extent);
                                b.delete_range(Cf::Chunks, from.to_vec(), to.to_vec());
                                freed.push(blob.extent);
                            }
                        }
                        for ek in edge_keys {
                            let rest = &ek[dk.len()..];
                            if let Some((role, _, _)) = super::keys::split_edge_rest(rest) {
                                b.delete(
                                    Cf::Parents,
                                    [&rest[5..], &dk[..], &[role.code()][..]].concat(),
                                );
                            }
                            b.delete(Cf::Edges, ek);
                        }
                        report.blobs_swept += 1;
                        report.bytes_swept += blob.size;
                        if report.swept.len() < SWEPT_LISTED {
                            report.swept.push(d);
                        }
                    }
                    Ok(())
                })?;
            }
            Ok(true)
        })?;

        // Sweep 3: upstream sources nothing reaches. A source is how a lazy blob of a kept
        // image is fetched, so one goes only when no scope's walk reached its (scope, blob)
        // and it is older than SOURCE_MIN_AGE (and the grace period): a pull records its
        // sources just before the image that reaches them, and refreshes them when it finds
        // them recorded already. The re-read under the gate sees such a refresh.
        let min_age = self.gc_grace_ns.max(SOURCE_MIN_AGE_NS);
        crate::kv::for_each_page(&*self.kv, Cf::Sources, PAGE, &mut |page| {
            let candidates = unmarked(page, |k| m.marked(k));
            for batch in candidates.chunks(SWEEP_BATCH) {
                self.sweep_batch(&mut m, &drain, dry_run, &mut report, |m, b, report| {
                    for k in batch {
                        if m.marked(k) {
                            continue;
                        }
                        let Some(v) = self.kv.get(Cf::Sources, k)? else {
                            continue;
                        };
                        let rec = super::SourceRecord::decode(&v[..])
                            .map_err(|e| super::corrupt_record("sources", k, Some(e)))?;
                        if started_ns.saturating_sub(rec.created_ns) < min_age {
                            continue;
                        }
                        b.delete(Cf::Sources, k.clone());
                        report.sources_swept += 1;
                    }
                    Ok(())
                })?;
            }
            Ok(true)
        })?;
        report.marked = m.nodes.len() as i64;
        report.mark_spills = m.nodes.set().spills() as i64;
        if report.mark_spills > 0 {
            tracing::info!(
                marked = report.marked,
                spills = m.nodes.set().spills(),
                budget_mib = self.gc_mark_memory >> 20,
                "collection: marks past the memory budget were kept on disk"
            );
        }
        let sizes = (m.nodes.set().items(), m.nodes.set().spilled());
        *self.gc_sizes.lock() = sizes;
        if !dry_run {
            // Unsynced: a hint lost to a crash costs the next collection a table growth.
            let mut b = Batch::new();
            let mut v = (sizes.0 as u64).to_be_bytes().to_vec();
            v.extend_from_slice(&(sizes.1 as u64).to_be_bytes());
            b.put(Cf::Meta, super::META_GC_SIZES, v);
            if let Err(e) = self.kv.write(b, false) {
                tracing::warn!(error = %e, "could not save the collection's table sizes");
            }
        }
        report.swept.sort();
        tracing::debug!(ms = began.elapsed().as_millis() as u64, "collection: swept");
        if !dry_run && let Err(e) = self.kv.reclaim(Cf::Chunks, &reclaim_ranges(freed)) {
            // The blobs are gone either way; their files go with a later compaction.
            tracing::warn!(error = %e, "could not reclaim the disk space of swept blobs now");
        }
        Ok(report)
    }

    /// Drops ingests that no lease holds and nobody has written to for `ingest_expiry`, and
    /// lease resources whose lease is gone.
    fn expire_ingests(&self, now: i64, dry_run: bool) -> Result<i64> {
        let mut leases: HashSet<Vec<u8>> = HashSet::new();
        self.kv.scan(Cf::Leases, &[], &[], &mut |k, _| {
            leases.insert(k.to_vec());
            true
        })?;
        let mut leased: HashSet<Vec<u8>> = HashSet::new();
        let mut orphans = Vec::new();
        self.kv.scan(Cf::LeaseResources, &[], &[], &mut |k, _| {
            // scope ‖ 0 ‖ lease ‖ 0 ‖ "ingests" ‖ 0 ‖ ref  →  scope ‖ 0 ‖ ref. Only a lease
            // that exists holds an ingest (an ingest opened under a lease as it was deleted,
            // or a resource added as an expired lease was dropped, leaves one behind).
            let parts: Vec<&[u8]> = k.splitn(4, |b| *b == 0).collect();
            if parts.len() != 4 {
                return true;
            }
            let lease = [parts[0], &[0], parts[1]].concat();
            if !leases.contains(&lease) {
                orphans.push((lease, k.to_vec()));
            } else if parts[2] == b"ingests" {
                leased.insert([parts[0], &[0], parts[3]].concat());
            }
            true
        })?;
        if !dry_run {
            for (lease, key) in orphans {
                // The lease may have been created since the scan: look again under its stripe
                // (which adding a resource holds), and drop only what is still orphaned.
                let _record = self.record_lock(&lease);
                if self.kv.get(Cf::Leases, &lease)?.is_none() {
                    let mut b = Batch::new();
                    b.delete(Cf::LeaseResources, key);
                    self.kv.write(b, false)?;
                }
            }
        }
        let mut stale = Vec::new();
        self.kv.scan(Cf::Ingests, &[], &[], &mut |k, v| {
            if let Ok(rec) = IngestRecord::decode(v)
                && now - rec.updated_ns > self.ingest_expiry_ns
                && !leased.contains(k)
            {
                stale.push((k.to_vec(), rec));
            }
            true
        })?;
        let mut n = 0;
        for (key, rec) in stale {
            // A live writer holds the slot: leave it. The slots map lock keeps a new writer
            // from opening the ingest while it is dropped.
            let mut slots = self.slots.lock();
            let guard = match slots.get(&key) {
                Some(e) => match e.slot.clone().try_lock_owned() {
                    Ok(g) => Some(g),
                    Err(_) => continue,
                },
                None => None,
            };
            n += 1;
            if dry_run {
                continue;
            }
            self.drop_ingest(Batch::new(), &key, &rec, false)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reclaim_ranges_merge_neighbours_and_stay_few() {
        assert!(reclaim_ranges(vec![]).is_empty());
        let r = reclaim_ranges(vec![7, 5, 6, 9, 7]);
        assert_eq!(
            r,
            vec![
                (extent_range(5).0.to_vec(), extent_range(7).1.to_vec()),
                (extent_range(9).0.to_vec(), extent_range(9).1.to_vec()),
            ]
        );
        // Too many runs: one range over all of them.
        let spread: Vec<u64> = (0..RECLAIM_RANGES_MAX as u64 + 1).map(|i| i * 10).collect();
        let last = *spread.last().unwrap();
        assert_eq!(
            reclaim_ranges(spread),
            vec![(extent_range(0).0.to_vec(), extent_range(last).1.to_vec())]
        );
        // The largest id has a range end too.
        assert_eq!(reclaim_ranges(vec![u64::MAX]).len(), 1);
    }
}
