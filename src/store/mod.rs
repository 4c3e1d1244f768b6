//! The content store: committed blobs, ingests in progress, and who can see what.
//!
//! Owns every domain rule of containerd's content model (the write state machine, commit
//! verification, namespace visibility, backend-tenant holds) on top of the `Kv` boundary.
//! Every byte that enters contentd goes through [`Writer`], which hashes it as it is stored
//! and verifies size and digest once, at commit.
//!
//! Visibility. A blob is stored once per digest. A *scope* sees it through a link:
//! * `Scope::Namespace` (client listeners): containerd's namespaced store. A link is made by a
//!   commit in that namespace (or a shared ingest); Delete removes only the link.
//! * `Scope::Tenant` (backend listeners): the flat store containerd expects behind a proxy
//!   plugin. The tenant can read every stored blob, and any blob it commits or looks up
//!   becomes *held* (linked) for it. List shows only its holds; Delete releases only its
//!   hold; a commit answers AlreadyExists only for what the tenant already holds.
//!
//! Bytes are removed when the last link of a blob goes (reachability GC builds on this).
//!
//! Crash ordering. Chunk puts and the ingest record that counts them are one batch, so a
//! recovered ingest's offset never exceeds its durable bytes. A commit is one synced batch
//! (blob record, link, owner, ingest record removal), so after a kill -9 a blob is either
//! committed whole or not at all; its chunks were written by earlier (WAL-ordered) batches.
//!
//! Locking. One live [`Writer`] per (scope, ref): the slot's async mutex is held for the
//! writer's lifetime. Commit, delete and hold of one digest serialise on a striped digest
//! lock, so a dedupe-commit can never race the removal of the blob it links to.

mod chunks;
mod collect;
mod graphq;
mod images;
mod ingest;
mod keys;
mod leases;
mod live;
mod marks;
mod records;
mod scrub;
mod session;
mod visibility;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::OwnedMutexGuard;

pub use crate::dates::parse_rfc3339;
pub use chunks::Gather;
pub use collect::{Explanation, GcReport};
pub use ingest::{AsyncWriter, Writer, WriterStatus};
use ingest::{Reservation, SlotEntry};
use keys::{
    chunk_key, edge_key, extent_range, ingest_key, link_key, owner_key, parent_key, split_scope,
};
pub use live::{LiveIngest, LiveState};
pub use records::{
    BlobRecord, EdgeRecord, ImageRecord, IngestRecord, LeaseRecord, LinkRecord, QuarantineRecord,
    SourceRecord,
};
pub use scrub::{Corrupt, ScrubReport};
pub use session::{
    WriteAction, WriteRequest, WriteResponse, WriteSession, fuzz_one as session_fuzz_one,
};

use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::{Error, Kind, Result};
use crate::filter::{self, Adaptor, Filter};
use crate::graph::{self, Role};
use crate::kv::{Batch, Cf, Kv, prefix_end};

/// Largest value stored under one chunk key. Small enough that a ranged read at a random
/// offset reads little beyond what it returns (RocksDB has no partial-value get), large
/// enough that per-key overhead stays negligible for layers.
pub const CHUNK_SIZE: usize = 256 << 10;
/// The default `disk_reserve_mib`, in bytes.
pub const DISK_RESERVE_DEFAULT: u64 = 128 << 20;
/// The collector's mark table when nothing sets it: the daemon's default memory budget,
/// about 1.8M live (blob, namespace) pairs before marks go to disk.
pub const GC_MARK_MEMORY_DEFAULT: usize = 48 << 20;
/// Requests carrying at least this much data write their chunks without the WAL (bytes hit
/// the disk once); the commit then flushes the chunk memtable before its synced batch.
/// Smaller writes stay in the WAL so small multi-message uploads commit without a flush.
const UNLOGGED_MIN: usize = 512 << 10;
/// Set on the Info of a blob that is not stored yet but will be fetched from upstream on
/// first read: its value is `registry/repository`.
pub const LAZY_LABEL: &str = "contentd.io/lazy";
/// Cap on the buffer one read call preallocates.
const READ_BUFFER_LIMIT: usize = 4 << 20;
/// containerd's limit on one label's key plus value.
pub const MAX_LABEL_BYTES: usize = 4096;
/// How long opening a writer waits for a ref held by another stream before `Unavailable`
/// (containerd's local store retries for about the same time).
const LOCK_WAIT: Duration = Duration::from_millis(500);
/// Ingest slots kept in memory at once (see `Store::evict_idle_slots`): each holds a hasher
/// and a record, so this bounds the daemon's memory for uploads in flight.
const MAX_SLOTS: usize = 16_384;
const EXTENT_RESERVATION: u64 = 1 << 16;
const META_EXTENTS: &[u8] = b"extent_reserved";
const META_SCHEMA: &[u8] = b"schema_version";
/// The last collection's mark counts (distinct blobs, spilled pairs; u64 BE each): a hint
/// that sizes the next one's tables, kept across restarts.
pub(super) const META_GC_SIZES: &[u8] = b"gc_sizes";
const SCHEMA_VERSION: &[u8] = b"1";

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Who is looking: a containerd namespace (client listener) or a backend tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Namespace(String),
    Tenant(String),
}

impl Scope {
    /// Validates a namespace name with containerd's rule.
    pub fn namespace(name: &str) -> Result<Scope> {
        let ok = !name.is_empty()
            && name.len() <= 76
            && name
                .split(['.', '_', '-'])
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()));
        if !ok {
            return Err(Error::invalid(format!(
                "namespace {name:?}: invalid namespace name (letters and digits, separated by single '.', '_' or '-', at most 76 characters)"
            )));
        }
        Ok(Scope::Namespace(name.to_string()))
    }

    pub fn tenant(name: &str) -> Result<Scope> {
        if name.is_empty() || name.contains('\0') {
            return Err(Error::invalid(format!(
                "tenant {name:?}: invalid tenant name"
            )));
        }
        Ok(Scope::Tenant(name.to_string()))
    }

    fn is_tenant(&self) -> bool {
        matches!(self, Scope::Tenant(_))
    }
}

fn decode<M: prost::Message + Default>(what: &str, bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| Error::data_loss(format!("corrupt {what} record: {e}")))
}

/// A stored key as an operator can read it: printable ASCII kept, other bytes escaped.
pub fn fmt_key(k: &[u8]) -> String {
    k.iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

/// The error for a stored record (or its key) that does not decode: DataLoss naming the
/// family and the key, so an operator can find it. Readers that decide what is live (the
/// collector above all) stop on it rather than skip it.
pub(crate) fn corrupt_record(family: &str, key: &[u8], err: Option<prost::DecodeError>) -> Error {
    let why = err.map_or_else(|| "its key is malformed".to_string(), |e| e.to_string());
    Error::data_loss(format!(
        "stored {family} record at key \"{}\" is damaged: {why}",
        fmt_key(key)
    ))
}

/// A committed blob as one scope sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub digest: Digest,
    pub size: i64,
    pub created_ns: i64,
    pub updated_ns: i64,
    pub labels: HashMap<String, String>,
}

impl Adaptor for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("digest") if path.len() == 1 => Some(self.digest.to_string()),
            Some("labels") => filter::label_field(path, |k| self.labels.get(k)),
            _ => None,
        }
    }
}

/// One edge of the descriptor graph.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphEdge {
    pub from: Digest,
    pub to: Digest,
    pub role: Role,
    pub index: u32,
    pub rec: EdgeRecord,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WalkNode {
    pub digest: Digest,
    pub media_type: String,
    pub size: i64,
    pub present: bool,
}

/// The closure of a root: every node it keeps alive and the edges between them.
#[derive(Debug, Clone, PartialEq)]
pub struct Walk {
    pub nodes: Vec<WalkNode>,
    pub edges: Vec<GraphEdge>,
}

/// An ingest in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestStatus {
    pub reference: String,
    pub offset: i64,
    pub total: i64,
    pub expected: Option<Digest>,
    pub started_ns: i64,
    pub updated_ns: i64,
}

impl Adaptor for IngestStatus {
    fn field(&self, path: &[String]) -> Option<String> {
        match (path.len(), path.first().map(String::as_str)) {
            (1, Some("ref")) => Some(self.reference.clone()),
            _ => None,
        }
    }
}

/// Where a blob's bytes are, for reading.
#[derive(Debug, Clone, Copy)]
pub struct BlobLocation {
    pub extent: u64,
    pub size: i64,
}

/// A label update: `None` replaces all labels, otherwise the listed `labels` / `labels.<k>`
/// paths are applied.
pub fn validate_labels(labels: &HashMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(Error::invalid("label key must not be empty"));
        }
        if k.len() + v.len() > MAX_LABEL_BYTES {
            return Err(Error::invalid(format!(
                "label key and value greater than maximum size ({MAX_LABEL_BYTES} bytes), key: {}",
                k.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(())
}

struct Extents {
    next: u64,
    reserved: u64,
}

pub struct Store {
    kv: Arc<dyn Kv>,
    slots: Mutex<HashMap<Vec<u8>, SlotEntry>>,
    digest_locks: Vec<Mutex<()>>,
    /// Striped by record key (images, leases): a record's read-modify-write (create's
    /// existence check, update's merge, adding a lease resource) and its delete serialise,
    /// so a delete is never undone by a write that read the record just before it.
    /// Lock order: digest stripe, then record stripe, then the collector's gate; never two
    /// record stripes at once.
    record_locks: Vec<Mutex<()>>,
    extents: Mutex<Extents>,
    /// Bytes all writers hold in memory for their commits (`Writer::can_hold`).
    held_bytes: std::sync::atomic::AtomicUsize,
    /// The collector's write barrier; see `collect.rs` for the invariant.
    gc_gate: parking_lot::RwLock<()>,
    barrier: Mutex<Option<Vec<collect::Node>>>,
    gc_running: Mutex<()>,
    /// Set while an eviction runs (under `gc_running`): the grace period does not apply.
    evicting: std::sync::atomic::AtomicBool,
    gc_last: Mutex<Option<GcReport>>,
    /// The last collection's mark table sizes (distinct blobs, spilled pairs), also saved in
    /// `meta`: the next one starts its tables at that size (see `Store::mark_reach`).
    gc_sizes: Mutex<(usize, usize)>,
    gc_mark_memory: usize,
    scratch_dir: std::path::PathBuf,
    /// Extents of discarded ingests whose disk space the next collection gives back (see
    /// `Kv::reclaim`); at most FREED_MAX, the rest go with RocksDB's own compactions.
    freed: Mutex<Vec<u64>>,
    gc_runs: std::sync::atomic::AtomicU64,
    deletions: std::sync::atomic::AtomicU64,
    mutations: std::sync::atomic::AtomicU64,
    gc_deletion_threshold: u64,
    gc_mutation_threshold: u64,
    gc_wake: tokio::sync::Notify,
    quotas: HashMap<String, u64>,
    default_quota: u64,
    /// Bytes each scope links: kept with every link write and removal (after the batch lands,
    /// or reserved before it for a commit), recounted from the links at open. Quota checks
    /// read it in O(1).
    usage: Mutex<HashMap<Scope, i64>>,
    max_document: usize,
    disk_reserve: u64,
    /// Committed blobs and their bytes (counted at open, kept by commit and sweep).
    blob_count: std::sync::atomic::AtomicI64,
    blob_bytes: std::sync::atomic::AtomicI64,
    /// Ingests readers can follow, by the digest they will commit (see `live.rs`).
    live: Mutex<HashMap<Digest, Vec<Arc<LiveIngest>>>>,
    gc_grace_ns: i64,
    ingest_expiry_ns: i64,
    /// Runs once between a collection's mark and its sweep: lets a test write at the moment
    /// the write barrier exists for.
    #[cfg(test)]
    pub(crate) after_mark: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Runs once, in the mark phase, after the first page of roots is marked: lets a test
    /// write while a collection marks.
    #[cfg(test)]
    pub(crate) during_mark: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Content linked more recently than this is a root (it may still be being assembled
    /// into an image).
    pub gc_grace: Duration,
    /// An ingest no lease holds is dropped once it has not been written for this long.
    pub ingest_expiry: Duration,
    /// A collection is due once this many deletions accumulate.
    pub gc_deletion_threshold: u64,
    /// A collection is due once this many mutations accumulate (0: never by count).
    pub gc_mutation_threshold: u64,
    /// Byte quotas per namespace (bytes of the blobs it links); `default_quota` applies to
    /// namespaces not listed (0: unlimited).
    pub quotas: HashMap<String, u64>,
    pub default_quota: u64,
    /// Largest document the descriptor-graph parser reads (larger ones are opaque).
    pub max_document: usize,
    /// Free disk space new bytes may not use (capped at a quarter of the filesystem): see
    /// `Store::check_disk_reserve`.
    pub disk_reserve: u64,
    /// Bytes a collection's mark table may hold; past it, marks go to scratch files (see
    /// `marks.rs`).
    pub gc_mark_memory: usize,
    /// Where those files go (unnamed, so nothing is left behind): the system's temporary
    /// directory when unset.
    pub scratch_dir: Option<std::path::PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            gc_grace: Duration::from_secs(3600),
            ingest_expiry: Duration::from_secs(24 * 3600),
            gc_deletion_threshold: 100,
            gc_mutation_threshold: 1000,
            quotas: HashMap::new(),
            default_quota: 0,
            max_document: graph::MAX_DOCUMENT,
            disk_reserve: DISK_RESERVE_DEFAULT,
            gc_mark_memory: GC_MARK_MEMORY_DEFAULT,
            scratch_dir: None,
        }
    }
}

impl Store {
    pub fn open(kv: Arc<dyn Kv>) -> Result<Arc<Store>> {
        Self::open_with(kv, StoreConfig::default())
    }

    pub fn open_with(kv: Arc<dyn Kv>, config: StoreConfig) -> Result<Arc<Store>> {
        match kv.get(Cf::Meta, META_SCHEMA)? {
            None => {
                let mut b = Batch::new();
                b.put(Cf::Meta, META_SCHEMA, SCHEMA_VERSION);
                kv.write(b, true)?;
            }
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(Error::precondition(format!(
                    "data directory has schema version {:?}; this contentd understands {:?}",
                    String::from_utf8_lossy(&v),
                    String::from_utf8_lossy(SCHEMA_VERSION)
                )));
            }
        }
        let reserved = match kv.get(Cf::Meta, META_EXTENTS)? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.try_into().expect("8 bytes")),
            Some(_) => return Err(Error::internal("corrupt extent reservation record")),
            None => 1,
        };
        let store = Arc::new(Store {
            kv,
            slots: Mutex::new(HashMap::new()),
            digest_locks: (0..64).map(|_| Mutex::new(())).collect(),
            record_locks: (0..64).map(|_| Mutex::new(())).collect(),
            extents: Mutex::new(Extents {
                next: reserved,
                reserved,
            }),
            gc_gate: parking_lot::RwLock::new(()),
            barrier: Mutex::new(None),
            gc_running: Mutex::new(()),
            evicting: Default::default(),
            gc_last: Mutex::new(None),
            gc_sizes: Mutex::new((0, 0)),
            freed: Mutex::new(Vec::new()),
            gc_runs: Default::default(),
            deletions: Default::default(),
            mutations: Default::default(),
            held_bytes: Default::default(),
            gc_deletion_threshold: config.gc_deletion_threshold.max(1),
            gc_mutation_threshold: config.gc_mutation_threshold,
            gc_wake: tokio::sync::Notify::new(),
            live: Mutex::new(HashMap::new()),
            blob_count: Default::default(),
            blob_bytes: Default::default(),
            quotas: config.quotas.clone(),
            default_quota: config.default_quota,
            usage: Mutex::new(HashMap::new()),
            max_document: config.max_document,
            disk_reserve: config.disk_reserve,
            gc_grace_ns: config.gc_grace.as_nanos().min(i64::MAX as u128) as i64,
            ingest_expiry_ns: config.ingest_expiry.as_nanos().min(i64::MAX as u128) as i64,
            gc_mark_memory: config.gc_mark_memory,
            scratch_dir: config
                .scratch_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir),
            #[cfg(test)]
            after_mark: Mutex::new(None),
            #[cfg(test)]
            during_mark: Mutex::new(None),
        });
        store.count_blobs()?;
        *store.usage.lock() = store.recount_usage()?;
        *store.gc_sizes.lock() = store.saved_gc_sizes()?;
        Ok(store)
    }

    pub fn kv(&self) -> &Arc<dyn Kv> {
        &self.kv
    }

    /// Counts the committed blobs once, at open; commits and sweeps keep the count.
    fn count_blobs(&self) -> Result<()> {
        let (mut n, mut bytes) = (0i64, 0i64);
        let mut bad = None;
        self.kv.scan(Cf::Blobs, &[], &[], &mut |_, v| {
            match decode::<BlobRecord>("blob", v) {
                Ok(b) => {
                    n += 1;
                    bytes += b.size;
                }
                Err(e) => bad = Some(e),
            }
            true
        })?;
        if let Some(e) = bad {
            return Err(e);
        }
        self.blob_count
            .store(n, std::sync::atomic::Ordering::Relaxed);
        self.blob_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The byte quota of a namespace, if it has one.
    fn quota(&self, scope: &Scope) -> Option<u64> {
        let Scope::Namespace(ns) = scope else {
            return None;
        };
        match self.quotas.get(ns).copied().unwrap_or(self.default_quota) {
            0 => None,
            q => Some(q),
        }
    }

    /// Bytes of the blobs a scope links (O(1): kept as links come and go).
    pub fn usage_of(&self, scope: &Scope) -> i64 {
        self.usage.lock().get(scope).copied().unwrap_or(0)
    }

    /// Visits every record of a per-scope family (`scope ‖ 0 ‖ …` keys). A key without a
    /// scope or a value that does not decode stops the scan with an error naming it: callers
    /// decide what is live from these, and must not do so on a partial view.
    pub(crate) fn scan_scoped<M: prost::Message + Default>(
        &self,
        cf: Cf,
        family: &str,
        mut visit: impl FnMut(Scope, M),
    ) -> Result<()> {
        let mut bad = None;
        self.kv.scan(
            cf,
            &[],
            &[],
            &mut |k, v| match (split_scope(k), M::decode(v)) {
                (Some((scope, _)), Ok(m)) => {
                    visit(scope, m);
                    true
                }
                (_, r) => {
                    bad = Some(corrupt_record(family, k, r.err()));
                    false
                }
            },
        )?;
        bad.map_or(Ok(()), Err)
    }

    /// Every scope's usage from a full scan of the links: what the counters start from at
    /// open, and what they must always equal.
    pub fn recount_usage(&self) -> Result<HashMap<Scope, i64>> {
        let mut out: HashMap<Scope, i64> = HashMap::new();
        self.scan_scoped(Cf::Links, "links", |scope, l: LinkRecord| {
            let u = out.entry(scope).or_default();
            *u = u.saturating_add(l.size.max(0));
        })?;
        Ok(out)
    }

    /// Every scope's usage as the counters have it (for checks against a recount).
    pub fn usage_counters(&self) -> HashMap<Scope, i64> {
        self.usage
            .lock()
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Adds `delta` bytes to what `scope` links (call once the batch that changed its links
    /// has landed).
    fn usage_add(&self, scope: &Scope, delta: i64) {
        let mut u = self.usage.lock();
        let v = u.entry(scope.clone()).or_default();
        *v = v.saturating_add(delta);
        if *v == 0 {
            u.remove(scope);
        }
    }

    /// Reserves `bytes` of `scope`'s usage for a link about to be written, refusing it with
    /// ResourceExhausted past the scope's quota. Check and reservation are one step, so two
    /// commits racing in one namespace can never pass the quota together. The reservation is
    /// returned when the guard drops unless [`Reservation::keep`] is called.
    fn reserve(&self, scope: &Scope, bytes: i64) -> Result<Reservation<'_>> {
        let mut u = self.usage.lock();
        let used = u.get(scope).copied().unwrap_or(0);
        if let Some(limit) = self.quota(scope)
            && used.saturating_add(bytes) > i64::try_from(limit).unwrap_or(i64::MAX)
        {
            return Err(self.over_quota(scope, limit, used, bytes));
        }
        *u.entry(scope.clone()).or_default() = used.saturating_add(bytes);
        Ok(Reservation {
            store: self,
            scope: scope.clone(),
            bytes,
            kept: false,
        })
    }

    /// Refuses `more` new bytes when they would eat into the disk reserve. RocksDB stops
    /// taking writes after it meets a full disk (until there is room again), deletes and
    /// collections included, so new bytes stop short of that while the space the reserve
    /// keeps lets deletes, collections and the flush of what is already written go on.
    pub(super) fn check_disk_reserve(&self, more: usize) -> Result<()> {
        let Some((free, size)) = self.kv.disk_space() else {
            return Ok(());
        };
        let reserve = self.disk_reserve.min(size / 4);
        if free.saturating_sub(reserve) >= more as u64 {
            return Ok(());
        }
        crate::metrics::get().disk_reserve_rejections.add(&[], 1);
        Err(Error::exhausted(format!(
            "the disk holding the store is full: {free} bytes free, {reserve} of them kept in \
             reserve (disk_reserve_mib) so deletes and collections can still run; delete \
             content or free disk space"
        )))
    }

    /// Refuses a metadata record that would grow into the disk reserve. Labels and records
    /// are new bytes too: a client adding 4 KiB labels in a loop fills a disk as surely as
    /// one uploading blobs (measured on a 64 MiB filesystem: full after 115 label updates,
    /// RocksDB then refusing every write). A record that shrinks or keeps its size (a
    /// gc.root label removed, say) always goes through.
    pub(super) fn check_record_growth(&self, before: usize, after: usize) -> Result<()> {
        match after.checked_sub(before) {
            Some(n) if n > 0 => self.check_disk_reserve(n),
            _ => Ok(()),
        }
    }

    fn over_quota(&self, scope: &Scope, limit: u64, used: i64, more: i64) -> Error {
        let ns = match scope {
            Scope::Namespace(n) | Scope::Tenant(n) => n.as_str(),
        };
        // Namespaces are named by clients: only configured ones become metric labels.
        let label = if self.quotas.contains_key(ns) {
            ns
        } else {
            "(default)"
        };
        crate::metrics::get().quota_rejections.add(&[label], 1);
        Error::exhausted(format!(
            "namespace {ns:?} is over its quota: {used} of {limit} bytes used, {more} more needed; \
             delete content or raise the quota"
        ))
    }

    /// (committed blobs, their bytes, ingests in progress), for metrics.
    pub fn usage(&self) -> Result<(i64, i64, i64)> {
        let mut ingests = 0i64;
        self.kv.scan(Cf::Ingests, &[], &[], &mut |_, _| {
            ingests += 1;
            true
        })?;
        Ok((
            self.blob_count.load(std::sync::atomic::Ordering::Relaxed),
            self.blob_bytes.load(std::sync::atomic::Ordering::Relaxed),
            ingests,
        ))
    }

    fn record_lock(&self, key: &[u8]) -> parking_lot::MutexGuard<'_, ()> {
        let i = key
            .iter()
            .fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(*b as usize));
        self.record_locks[i % self.record_locks.len()].lock()
    }

    fn digest_lock(&self, d: &Digest) -> parking_lot::MutexGuard<'_, ()> {
        let k = d.key();
        let i = k[1..9]
            .iter()
            .fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(*b as usize));
        self.digest_locks[i % self.digest_locks.len()].lock()
    }

    fn blob(&self, d: &Digest) -> Result<Option<BlobRecord>> {
        self.kv
            .get(Cf::Blobs, &d.key())?
            .map(|v| decode("blob", &v))
            .transpose()
    }

    fn link(&self, scope: &Scope, d: &Digest) -> Result<Option<LinkRecord>> {
        self.kv
            .get(Cf::Links, &link_key(scope, d))?
            .map(|v| decode("link", &v))
            .transpose()
    }

    // ---- upstream sources ---------------------------------------------------------------------

    /// Records where `scope` can fetch `d` from (a pull records every blob it saw).
    pub fn put_source(&self, scope: &Scope, d: &Digest, rec: &SourceRecord) -> Result<()> {
        self.put_sources(scope, std::slice::from_ref(&(d.clone(), rec.clone())))
    }

    /// [`Store::put_source`] for several blobs, in one synced write.
    pub fn put_sources(&self, scope: &Scope, recs: &[(Digest, SourceRecord)]) -> Result<()> {
        let mut b = Batch::new();
        for (d, rec) in recs {
            b.put(Cf::Sources, link_key(scope, d), rec.encode_to_vec());
        }
        // Under the gate: the collector re-reads a source under it before dropping one, so a
        // record refreshed meanwhile (a younger `created_ns`) is seen and kept.
        let _gate = self.gc_gate.read();
        // Durable with the pull's answer: a lazy blob without its source cannot be read.
        self.kv.write(b, true)
    }

    /// Info of a stored blob, else of a lazy one: pulled into this scope, not fetched yet (a
    /// read fetches it). A lazy blob carries [`LAZY_LABEL`].
    pub fn info_or_lazy(&self, scope: &Scope, d: &Digest) -> Result<Info> {
        match self.info(scope, d) {
            Err(e) if e.is(Kind::NotFound) => match self.source(scope, d)? {
                Some(src) if src.size > 0 => Ok(Info {
                    digest: d.clone(),
                    size: src.size,
                    created_ns: src.created_ns,
                    updated_ns: src.created_ns,
                    labels: [(
                        LAZY_LABEL.to_string(),
                        format!("{}/{}", src.registry, src.repository),
                    )]
                    .into(),
                }),
                _ => Err(e),
            },
            r => r,
        }
    }

    /// Where `scope` can fetch `d` from; a tenant may use any scope's source.
    pub fn source(&self, scope: &Scope, d: &Digest) -> Result<Option<SourceRecord>> {
        if let Some(v) = self.kv.get(Cf::Sources, &link_key(scope, d))? {
            return decode("source", &v).map(Some);
        }
        Ok(None)
    }

    // ---- provider ---------------------------------------------------------------------------

    // ---- manager ----------------------------------------------------------------------------

    /// Applies a label update. `paths` empty means replace all labels.
    pub fn update(
        &self,
        scope: &Scope,
        d: &Digest,
        labels: HashMap<String, String>,
        paths: &[String],
    ) -> Result<Info> {
        for p in paths {
            if p != "labels" && !p.starts_with("labels.") {
                return Err(Error::invalid(format!(
                    "cannot update {p:?} field on content info {d:?}"
                )));
            }
        }
        // A tenant's first touch of a blob holds it (outside the stripe: `hold` takes it).
        if scope.is_tenant() && self.resolve(scope, d)?.is_none() {
            return Err(Self::not_found(d));
        }
        // The merge reads the link under the digest's stripe: two updates of different
        // labels (a gc.ref from one client, a source label from another) both land.
        let _g = self.digest_lock(d);
        let (blob, mut link) = self.linked(scope, d)?.ok_or_else(|| Self::not_found(d))?;
        let before = link.encoded_len();
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            link.labels = labels;
        } else {
            for p in paths {
                let key = &p["labels.".len()..];
                match labels.get(key) {
                    Some(v) if !v.is_empty() => {
                        link.labels.insert(key.to_string(), v.clone());
                    }
                    _ => {
                        link.labels.remove(key);
                    }
                }
            }
        }
        if !scope.is_tenant() {
            validate_labels(&link.labels)?;
        }
        self.check_record_growth(before, link.encoded_len())?;
        link.updated_ns = now_ns();
        let _gate = self.gc_gate.read();
        // New gc.ref labels may reach blobs a running collection has not marked.
        self.barrier([collect::node(scope, d)]);
        let mut b = Batch::new();
        b.put(Cf::Links, link_key(scope, d), link.encode_to_vec());
        // Labels decide what the collector keeps (gc.root, gc.ref.*): acknowledged means
        // durable.
        self.kv.write(b, true)?;
        Ok(Self::info_of(d, &blob, link))
    }

    /// Blobs visible to `scope` that match `filter`, in digest-key order, starting after
    /// `after` (a digest returned earlier), at most `limit`.
    pub fn list(
        &self,
        scope: &Scope,
        filter: &Filter,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<Info>> {
        let prefix = scope.prefix();
        let start = match after {
            Some(d) => {
                let mut k = link_key(scope, d);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        let mut err = None;
        self.kv
            .scan(Cf::Links, &start, &prefix_end(&prefix), &mut |k, v| {
                let r = (|| -> Result<Option<Info>> {
                    let (d, _) = Digest::from_key(&k[prefix.len()..])
                        .ok_or_else(|| Error::internal("corrupt link key"))?;
                    let link: LinkRecord = decode("link", v)?;
                    let blob = BlobRecord {
                        extent: link.extent,
                        size: link.size,
                        created_ns: link.created_ns,
                        ..Default::default()
                    };
                    let info = Self::info_of(&d, &blob, link);
                    Ok(filter.matches(&info).then_some(info))
                })();
                match r {
                    Ok(Some(info)) => out.push(info),
                    Ok(None) => {}
                    Err(e) => {
                        err = Some(e);
                        return false;
                    }
                }
                out.len() < limit
            })?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Removes `d` from `scope`. The bytes stay until the collector finds nothing that
    /// reaches the blob any more. Returns whether a link existed.
    pub fn delete(&self, scope: &Scope, d: &Digest) -> Result<bool> {
        let _g = self.digest_lock(d);
        // Under the gate too: the sweep checks a link still exists before it removes (and
        // uncounts) it, which only holds if no delete runs between its check and its write.
        let _gate = self.gc_gate.read();
        let Some(link) = self.link(scope, d)? else {
            return Ok(false);
        };
        let mut b = Batch::new();
        b.delete(Cf::Links, link_key(scope, d));
        b.delete(Cf::Owners, owner_key(d, scope));
        self.kv.write(b, true)?;
        self.usage_add(scope, -link.size);
        self.note_deletion();
        Ok(true)
    }

    /// Every scope that links `d`.
    pub fn owners(&self, d: &Digest) -> Result<Vec<Scope>> {
        let dk = d.key();
        let mut out = Vec::new();
        self.kv
            .scan(Cf::Owners, &dk, &prefix_end(&dk), &mut |k, _| {
                if let Some(s) = Scope::from_tag(&k[dk.len()..]) {
                    out.push(s);
                }
                true
            })?;
        Ok(out)
    }

    // ---- graph ------------------------------------------------------------------------------

    // ---- ingests ----------------------------------------------------------------------------
}

pub fn fmt_ns(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    format!("{secs}.{nanos:09}")
}

/// The one way async code runs store work that may block: synced writes (an fsync), RocksDB
/// writes and iterators, and waits on the store's locks (the digest stripes, the collector's
/// gate). Point lookups that never write may run inline (see `info_linked`).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("storage task failed: {e}")))?
}

/// Whether an error says the thing already exists (for callers that treat it as success).
pub fn is_exists(e: &Error) -> bool {
    e.is(Kind::AlreadyExists)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hostile;
