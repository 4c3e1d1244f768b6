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

mod collect;
mod keys;
mod images;
mod leases;
mod live;
mod records;
mod scrub;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::OwnedMutexGuard;

pub use collect::{Explanation, GcReport};
pub use crate::dates::parse_rfc3339;
use keys::{
    chunk_key, edge_key, extent_range, ingest_key, link_key, owner_key, parent_key, split_scope,
};
pub use live::{LiveIngest, LiveState};
pub use records::{
    BlobRecord, EdgeRecord, ImageRecord, IngestRecord, LeaseRecord, LinkRecord, QuarantineRecord,
    SourceRecord,
};
pub use scrub::{Corrupt, ScrubReport};

use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::{Error, Kind, Result};
use crate::filter::{self, Adaptor, Filter};
use crate::graph::{self, Role};
use crate::kv::{Batch, Cf, Kv, prefix_end};

/// Largest value stored under one chunk key. Small enough that a ranged read at a random
/// offset reads little beyond what it returns (RocksDB has no partial-value get), large
/// enough that per-key overhead stays negligible for layers.
pub const CHUNK_SIZE: usize = 256 << 10;
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
pub(crate) fn corrupt_record(
    family: &str,
    key: &[u8],
    err: Option<prost::DecodeError>,
) -> Error {
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

type Slot = Arc<tokio::sync::Mutex<Option<IngestState>>>;
/// When the current holder took a slot (ns), for the Unavailable message.
type LockedSince = Arc<std::sync::atomic::AtomicI64>;

struct IngestState {
    rec: IngestRecord,
    hasher: Hasher,
    /// Some chunks were written without the WAL: the commit must flush them first.
    unlogged: bool,
    /// Freshly recovered: stale chunks past `rec.offset` must be removed before writing.
    trim: bool,
}

struct Extents {
    next: u64,
    reserved: u64,
}

pub struct Store {
    kv: Arc<dyn Kv>,
    slots: Mutex<HashMap<Vec<u8>, (Slot, LockedSince)>>,
    digest_locks: Vec<Mutex<()>>,
    extents: Mutex<Extents>,
    /// The collector's write barrier; see `collect.rs` for the invariant.
    gc_gate: parking_lot::RwLock<()>,
    barrier: Mutex<Option<Vec<collect::Node>>>,
    gc_running: Mutex<()>,
    /// Set while an eviction runs (under `gc_running`): the grace period does not apply.
    evicting: std::sync::atomic::AtomicBool,
    gc_last: Mutex<Option<GcReport>>,
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
    /// Committed blobs and their bytes (counted at open, kept by commit and sweep).
    blob_count: std::sync::atomic::AtomicI64,
    blob_bytes: std::sync::atomic::AtomicI64,
    /// Ingests readers can follow, by the digest they will commit (see `live.rs`).
    live: Mutex<HashMap<Digest, Vec<Arc<LiveIngest>>>>,
    gc_grace_ns: i64,
    ingest_expiry_ns: i64,
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
            extents: Mutex::new(Extents {
                next: reserved,
                reserved,
            }),
            gc_gate: parking_lot::RwLock::new(()),
            barrier: Mutex::new(None),
            gc_running: Mutex::new(()),
            evicting: Default::default(),
            gc_last: Mutex::new(None),
            gc_runs: Default::default(),
            deletions: Default::default(),
            mutations: Default::default(),
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
            gc_grace_ns: config.gc_grace.as_nanos().min(i64::MAX as u128) as i64,
            ingest_expiry_ns: config.ingest_expiry.as_nanos().min(i64::MAX as u128) as i64,
        });
        store.count_blobs()?;
        *store.usage.lock() = store.recount_usage()?;
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

    /// Every scope's usage from a full scan of the links: what the counters start from at
    /// open, and what they must always equal.
    pub fn recount_usage(&self) -> Result<HashMap<Scope, i64>> {
        let mut out: HashMap<Scope, i64> = HashMap::new();
        let mut bad = None;
        self.kv.scan(Cf::Links, &[], &[], &mut |k, v| {
            let scope = split_scope(k).map(|(s, _)| s);
            match (scope, LinkRecord::decode(v)) {
                (Some(scope), Ok(l)) => {
                    let u = out.entry(scope).or_default();
                    *u = u.saturating_add(l.size.max(0));
                    true
                }
                (_, r) => {
                    bad = Some(corrupt_record("links", k, r.err()));
                    false
                }
            }
        })?;
        bad.map_or(Ok(out), Err)
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

    /// A fresh extent id. Ids are reserved in blocks with a synced write before use, so an id
    /// seen in any durable record can never be handed out again after a restart.
    fn new_extent(&self) -> Result<u64> {
        let mut e = self.extents.lock();
        if e.next >= e.reserved {
            let reserved = e.next + EXTENT_RESERVATION;
            let mut b = Batch::new();
            b.put(Cf::Meta, META_EXTENTS, reserved.to_be_bytes().to_vec());
            self.kv.write(b, true)?;
            e.reserved = reserved;
        }
        e.next += 1;
        Ok(e.next - 1)
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

    fn not_found(d: &Digest) -> Error {
        Error::not_found(format!("content {d}: not found"))
    }

    /// What `scope` sees of `d` through its own link: one point lookup that never writes, so
    /// it may run on an async worker.
    fn linked(&self, scope: &Scope, d: &Digest) -> Result<Option<(BlobRecord, LinkRecord)>> {
        Ok(self.link(scope, d)?.map(|link| {
            let blob = BlobRecord {
                extent: link.extent,
                size: link.size,
                created_ns: link.created_ns,
                ..Default::default()
            };
            (blob, link)
        }))
    }

    /// Info of `d` if `scope` links it; None means "ask [`Store::info`]", which may have to
    /// write a tenant's hold (a synced write: run it on the blocking pool).
    pub fn info_linked(&self, scope: &Scope, d: &Digest) -> Result<Option<Info>> {
        Ok(self
            .linked(scope, d)?
            .map(|(blob, link)| Self::info_of(d, &blob, link)))
    }

    /// Where to read `d` if `scope` links it; None means "ask [`Store::locate`]".
    pub fn locate_linked(&self, scope: &Scope, d: &Digest) -> Result<Option<BlobLocation>> {
        Ok(self.linked(scope, d)?.map(|(blob, _)| BlobLocation {
            extent: blob.extent,
            size: blob.size,
        }))
    }

    /// Resolves what `scope` may see of `d`. For a tenant any stored blob is visible and
    /// becomes held by it (so another tenant's delete can never remove it). The hold is
    /// durable before this returns (containerd records the blob as present once Info
    /// answers), so call this on the blocking pool.
    fn resolve(&self, scope: &Scope, d: &Digest) -> Result<Option<(BlobRecord, LinkRecord)>> {
        if let Some(found) = self.linked(scope, d)? {
            return Ok(Some(found));
        }
        if !scope.is_tenant() {
            return Ok(None);
        }
        let _g = self.digest_lock(d);
        let _gate = self.gc_gate.read();
        let Some(blob) = self.blob(d)? else {
            return Ok(None);
        };
        self.barrier([collect::node(scope, d)]);
        let now = now_ns();
        let link = LinkRecord {
            created_ns: blob.created_ns,
            updated_ns: now,
            labels: HashMap::new(),
            size: blob.size,
            extent: blob.extent,
        };
        let mut b = Batch::new();
        self.put_link(&mut b, scope, d, &link);
        self.kv.write(b, true)?;
        self.usage_add(scope, blob.size);
        Ok(Some((blob, link)))
    }

    fn put_link(&self, b: &mut Batch, scope: &Scope, d: &Digest, link: &LinkRecord) {
        b.put(Cf::Links, link_key(scope, d), link.encode_to_vec());
        b.put(Cf::Owners, owner_key(d, scope), Vec::new());
    }

    fn info_of(d: &Digest, blob: &BlobRecord, link: LinkRecord) -> Info {
        Info {
            digest: d.clone(),
            size: blob.size,
            created_ns: link.created_ns,
            updated_ns: link.updated_ns,
            labels: link.labels,
        }
    }

    // ---- upstream sources ---------------------------------------------------------------------

    /// Records where `scope` can fetch `d` from (a pull records every blob it saw).
    pub fn put_source(&self, scope: &Scope, d: &Digest, rec: &SourceRecord) -> Result<()> {
        let mut b = Batch::new();
        b.put(Cf::Sources, link_key(scope, d), rec.encode_to_vec());
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

    pub fn info(&self, scope: &Scope, d: &Digest) -> Result<Info> {
        let (blob, link) = self.resolve(scope, d)?.ok_or_else(|| Self::not_found(d))?;
        Ok(Self::info_of(d, &blob, link))
    }

    /// Where to read `d` from, if `scope` can see it.
    pub fn locate(&self, scope: &Scope, d: &Digest) -> Result<BlobLocation> {
        let (blob, _) = self.resolve(scope, d)?.ok_or_else(|| Self::not_found(d))?;
        Ok(BlobLocation {
            extent: blob.extent,
            size: blob.size,
        })
    }

    /// Up to `max` bytes of an extent starting at `offset` (one iterator, one copy). Fewer
    /// bytes only where the extent's stored data ends.
    pub fn read_extent(&self, extent: u64, offset: u64, max: usize) -> Result<Bytes> {
        let mut got = None;
        let r = self.stream_extent(
            extent,
            offset,
            offset.saturating_add(max as u64),
            max,
            &mut |b| {
                got = Some(b);
                false
            },
        );
        match (got, r) {
            (Some(b), _) => Ok(b),
            (None, Err(e)) => Err(e),
            (None, Ok(())) => Err(Error::data_loss(format!(
                "stored bytes missing at offset {offset}"
            ))),
        }
    }

    /// Streams `[offset, end)` of an extent in pieces of `piece` bytes (the last may be
    /// shorter) through one storage iterator. `sink` returns false to stop early. Where the
    /// stored bytes end before `end`, what precedes the gap is delivered, then DataLoss.
    pub fn stream_extent(
        &self,
        extent: u64,
        offset: u64,
        end: u64,
        piece: usize,
        sink: &mut dyn FnMut(Bytes) -> bool,
    ) -> Result<()> {
        if offset >= end {
            return Ok(());
        }
        let (lower, _) = extent_range(extent);
        let upper = chunk_key(extent, end);
        let mut buf = BytesMut::with_capacity(piece.min((end - offset) as usize));
        let mut pos = offset;
        let mut stopped = false;
        self.kv.scan_from_floor(
            Cf::Chunks,
            &chunk_key(extent, offset),
            &lower,
            &upper,
            &mut |k, v| {
                let start = u64::from_be_bytes(k[8..16].try_into().expect("16-byte chunk key"));
                if start > pos || start + v.len() as u64 <= pos {
                    return false;
                }
                let mut from = (pos - start) as usize;
                let stop = v.len().min((end - start) as usize);
                while from < stop {
                    let n = (stop - from).min(piece - buf.len());
                    buf.extend_from_slice(&v[from..from + n]);
                    from += n;
                    pos += n as u64;
                    if buf.len() == piece || pos == end {
                        let full = std::mem::replace(
                            &mut buf,
                            BytesMut::with_capacity(piece.min((end - pos) as usize)),
                        );
                        if !sink(full.freeze()) {
                            stopped = true;
                            return false;
                        }
                    }
                }
                pos < end
            },
        )?;
        if !stopped && pos < end {
            // Bytes before the gap are still delivered; the gap itself is the error.
            if !buf.is_empty() {
                sink(buf.freeze());
            }
            return Err(Error::data_loss(format!(
                "stored bytes missing at offset {pos}"
            )));
        }
        Ok(())
    }

    /// Reads `[offset, offset+len)` of an extent, chunk by chunk.
    pub fn read_range(
        &self,
        extent: u64,
        offset: u64,
        len: u64,
        mut sink: impl FnMut(Bytes) -> Result<()>,
    ) -> Result<()> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let data = self.read_extent(
                extent,
                pos,
                (end - pos).min(READ_BUFFER_LIMIT as u64) as usize,
            )?;
            pos += data.len() as u64;
            sink(data)?;
        }
        Ok(())
    }

    /// Re-hashes a stored blob and checks it against its digest and size.
    pub fn verify(&self, d: &Digest) -> Result<()> {
        let blob = self.blob(d)?.ok_or_else(|| Self::not_found(d))?;
        let mut h = d.algorithm().hasher();
        let mut n = 0i64;
        self.read_range(blob.extent, 0, blob.size as u64, |c| {
            n += c.len() as i64;
            h.update(&c);
            Ok(())
        })?;
        if n != blob.size || h.digest() != *d {
            return Err(Error::data_loss(format!(
                "content {d}: stored bytes do not match the digest"
            )));
        }
        Ok(())
    }

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
        let (blob, mut link) = self.resolve(scope, d)?.ok_or_else(|| Self::not_found(d))?;
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
        link.updated_ns = now_ns();
        let _g = self.digest_lock(d);
        let _gate = self.gc_gate.read();
        if self.link(scope, d)?.is_none() {
            return Err(Self::not_found(d));
        }
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

    /// Whether `scope` can see `d`, without creating a hold.
    pub fn visible(&self, scope: &Scope, d: &Digest) -> Result<bool> {
        if self.link(scope, d)?.is_some() {
            return Ok(true);
        }
        Ok(scope.is_tenant() && self.blob(d)?.is_some())
    }

    /// Size of a committed blob.
    pub fn info_size(&self, d: &Digest) -> Result<i64> {
        Ok(self.blob(d)?.ok_or_else(|| Self::not_found(d))?.size)
    }

    /// Whether any outgoing edge of `d` is recorded.
    fn has_edges(&self, d: &Digest) -> Result<bool> {
        let dk = d.key();
        let mut any = false;
        self.kv.scan(Cf::Edges, &dk, &prefix_end(&dk), &mut |_, _| {
            any = true;
            false
        })?;
        Ok(any)
    }

    /// A committed blob's bytes when they may be a document worth classifying (small enough,
    /// starting like a JSON object).
    fn stored_document(&self, d: &Digest) -> Result<Option<Vec<u8>>> {
        let Some(blob) = self.blob(d)? else {
            return Ok(None);
        };
        if blob.size <= 0 || blob.size as usize > self.max_document {
            return Ok(None);
        }
        let first = self.read_extent(blob.extent, 0, 1)?;
        if !matches!(first.first(), Some(b'{' | b' ' | b'\n' | b'\r' | b'\t')) {
            return Ok(None);
        }
        let mut doc = Vec::with_capacity(blob.size as usize);
        self.read_range(blob.extent, 0, blob.size as u64, |c| {
            doc.extend_from_slice(&c);
            Ok(())
        })?;
        Ok(Some(doc))
    }

    /// A committed blob's outgoing edges, in document order (config, layers / manifests, subject).
    pub fn children(&self, d: &Digest) -> Result<Vec<GraphEdge>> {
        let dk = d.key();
        let mut out = Vec::new();
        let mut err = None;
        self.kv
            .scan(Cf::Edges, &dk, &prefix_end(&dk), &mut |k, v| {
                let parsed = keys::split_edge_rest(&k[dk.len()..]);
                match (parsed, EdgeRecord::decode(v)) {
                    (Some((role, index, to)), Ok(rec)) => out.push(GraphEdge {
                        from: d.clone(),
                        to,
                        role,
                        index,
                        rec,
                    }),
                    (_, r) => {
                        err = Some(corrupt_record("edges", k, r.err()));
                        return false;
                    }
                }
                true
            })?;
        err.map_or(Ok(out), Err)
    }

    /// Documents that point at `d` (`rec` describes the parent itself).
    pub fn parents(&self, d: &Digest) -> Result<Vec<GraphEdge>> {
        let dk = d.key();
        let mut out = Vec::new();
        self.kv
            .scan(Cf::Parents, &dk, &prefix_end(&dk), &mut |k, v| {
                if let (Some((from, rest)), Ok(rec)) =
                    (Digest::from_key(&k[dk.len()..]), EdgeRecord::decode(v))
                    && let Some(role) = rest.first().and_then(|c| Role::from_code(*c))
                {
                    {
                        out.push(GraphEdge {
                            from,
                            to: d.clone(),
                            role,
                            index: 0,
                            rec,
                        });
                    }
                }
                true
            })?;
        Ok(out)
    }

    /// The parents of `d` that `scope` can see.
    pub fn visible_parents(&self, scope: &Scope, d: &Digest) -> Result<Vec<GraphEdge>> {
        let mut out = Vec::new();
        for e in self.parents(d)? {
            if self.visible(scope, &e.from)? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Everything `root` keeps alive, as `scope` sees it: nodes with size and presence, and
    /// every edge met on the way (subject edges are listed but not followed).
    pub fn walk(&self, scope: &Scope, root: &Digest) -> Result<Walk> {
        const MAX_NODES: usize = 100_000;
        let blob = self
            .blob(root)?
            .filter(|_| self.visible(scope, root).unwrap_or(false));
        let blob = blob.ok_or_else(|| Self::not_found(root))?;
        let mut walk = Walk {
            nodes: vec![WalkNode {
                digest: root.clone(),
                media_type: blob.media_type,
                size: blob.size,
                present: true,
            }],
            edges: Vec::new(),
        };
        let mut seen = std::collections::HashSet::from([root.clone()]);
        let mut next = 0;
        while next < walk.nodes.len() {
            let node = walk.nodes[next].clone();
            next += 1;
            if !node.present {
                continue;
            }
            for e in self.children(&node.digest)? {
                if e.role.keeps_alive() && seen.insert(e.to.clone()) {
                    if walk.nodes.len() >= MAX_NODES {
                        return Err(Error::new(
                            Kind::ResourceExhausted,
                            format!("graph under {root} has more than {MAX_NODES} nodes"),
                        ));
                    }
                    walk.nodes.push(WalkNode {
                        digest: e.to.clone(),
                        media_type: e.rec.media_type.clone(),
                        size: e.rec.size,
                        present: self.visible(scope, &e.to)?,
                    });
                }
                walk.edges.push(e);
            }
        }
        Ok(walk)
    }

    // ---- ingests ----------------------------------------------------------------------------

    fn ingest_record(&self, scope: &Scope, r: &str) -> Result<Option<IngestRecord>> {
        self.kv
            .get(Cf::Ingests, &ingest_key(scope, r))?
            .map(|v| decode("ingest", &v))
            .transpose()
    }

    fn status_of(reference: String, rec: &IngestRecord) -> IngestStatus {
        IngestStatus {
            reference,
            offset: rec.offset,
            total: rec.total,
            expected: Digest::parse(&rec.expected).ok(),
            started_ns: rec.started_ns,
            updated_ns: rec.updated_ns,
        }
    }

    pub fn status(&self, scope: &Scope, r: &str) -> Result<IngestStatus> {
        let rec = self.ingest_record(scope, r)?.ok_or_else(|| {
            Error::not_found(format!("could not get status for ref {r:?}: not found"))
        })?;
        Ok(Self::status_of(r.to_string(), &rec))
    }

    pub fn list_statuses(&self, scope: &Scope, filter: &Filter) -> Result<Vec<IngestStatus>> {
        let prefix = scope.prefix();
        let mut out = Vec::new();
        let mut bad = 0usize;
        self.kv
            .scan(Cf::Ingests, &prefix, &prefix_end(&prefix), &mut |k, v| {
                // A record that cannot be read is skipped, never fatal to the whole listing.
                match (
                    std::str::from_utf8(&k[prefix.len()..]),
                    IngestRecord::decode(v),
                ) {
                    (Ok(r), Ok(rec)) => {
                        let st = Self::status_of(r.to_string(), &rec);
                        if filter.matches(&st) {
                            out.push(st);
                        }
                    }
                    _ => bad += 1,
                }
                true
            })?;
        if bad > 0 {
            tracing::warn!(skipped = bad, "unreadable ingest records skipped");
        }
        Ok(out)
    }

    /// Drops an ingest and its bytes. Waits briefly for a live writer to let go.
    /// Returns whether the ingest existed.
    pub async fn abort(self: &Arc<Self>, scope: &Scope, r: &str) -> Result<bool> {
        let key = ingest_key(scope, r);
        let mut guard = self.lock_slot(&key, r).await?;
        let store = self.clone();
        let scope = scope.clone();
        let r = r.to_string();
        tokio::task::spawn_blocking(move || {
            let rec = match guard.as_ref() {
                Some(st) => Some(st.rec.clone()),
                None => store.ingest_record(&scope, &r)?,
            };
            let Some(rec) = rec else { return Ok(false) };
            let mut b = Batch::new();
            b.delete(Cf::Ingests, key.clone());
            let (from, to) = extent_range(rec.extent);
            b.delete_range(Cf::Chunks, from.to_vec(), to.to_vec());
            store.kv.write(b, true)?;
            *guard = None;
            store.release_slot(&key);
            Ok(true)
        })
        .await
        .map_err(|e| Error::internal(format!("abort task failed: {e}")))?
    }

    fn release_slot(&self, key: &[u8]) {
        self.slots.lock().remove(key);
    }

    /// Forgets the cached state of ingests nobody is writing: each reloads from its durable
    /// record (re-hashing its bytes) when it is next opened. Memory then grows with the
    /// uploads in flight, not with every ref a client ever opened. A slot whose bytes went
    /// without the WAL keeps its state: only it knows they must be flushed before a commit.
    fn evict_idle_slots(slots: &mut HashMap<Vec<u8>, (Slot, LockedSince)>) {
        slots.retain(|_, (slot, _)| match slot.try_lock() {
            Ok(g) => g.as_ref().is_some_and(|st| st.unlogged),
            Err(_) => true,
        });
    }

    /// Takes the exclusive lock on an ingest ref, retrying for [`LOCK_WAIT`].
    async fn lock_slot(&self, key: &[u8], r: &str) -> Result<OwnedMutexGuard<Option<IngestState>>> {
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let mut pause = Duration::from_millis(2);
        loop {
            let (slot, since) = {
                let mut slots = self.slots.lock();
                if !slots.contains_key(key) && slots.len() >= MAX_SLOTS {
                    Self::evict_idle_slots(&mut slots);
                    if slots.len() >= MAX_SLOTS {
                        return Err(Error::exhausted(format!(
                            "{} uploads are open at once, the most this daemon keeps; \
                             finish or abort some, then retry ref {r}",
                            slots.len()
                        )));
                    }
                }
                let entry = slots.entry(key.to_vec()).or_insert_with(|| {
                    (
                        Arc::new(tokio::sync::Mutex::new(None)),
                        Arc::new(std::sync::atomic::AtomicI64::new(0)),
                    )
                });
                (entry.0.clone(), entry.1.clone())
            };
            if let Ok(guard) = slot.clone().try_lock_owned() {
                // The slot may have been retired (commit/abort) between lookup and lock; only
                // the slot still registered for this key may be used, or two writers could
                // share a ref.
                let current = self
                    .slots
                    .lock()
                    .get(key)
                    .map(|e| Arc::ptr_eq(&e.0, &slot))
                    .unwrap_or(false);
                if current {
                    since.store(now_ns(), std::sync::atomic::Ordering::Relaxed);
                    return Ok(guard);
                }
                continue;
            }
            if tokio::time::Instant::now() >= deadline {
                let t = since.load(std::sync::atomic::Ordering::Relaxed);
                let held = Duration::from_nanos((now_ns() - t).max(0) as u64);
                return Err(Error::unavailable(format!(
                    "ref {r} locked for {:.3}s (since {}): another writer holds it",
                    held.as_secs_f64(),
                    fmt_ns(t)
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Opens (or resumes) the ingest `r` in `scope` for exclusive writing.
    pub async fn open_writer(
        self: &Arc<Self>,
        scope: Scope,
        r: &str,
        total: i64,
        expected: Option<Digest>,
        lease: Option<String>,
    ) -> Result<Writer> {
        if r.is_empty() {
            return Err(Error::invalid("ingest ref must not be empty"));
        }
        if let Some(l) = &lease {
            self.require_lease(&scope, l)?;
        }
        if let Some(d) = &expected {
            let store = self.clone();
            let (s, d2, l) = (scope.clone(), d.clone(), lease.clone());
            let exists = blocking(move || {
                let exists = store.link(&s, &d2)?.is_some();
                // Opening a writer for content one has is how containerd clients check and
                // pin in one step: the lease gets the blob.
                if let (true, Some(l)) = (exists, l) {
                    store.add_lease_resource(&s, &l, "content", &d2.to_string())?;
                }
                Ok(exists)
            })
            .await?;
            if exists {
                return Err(Error::exists(format!("content {d}: already exists")));
            }
        }
        let key = ingest_key(&scope, r);
        let guard = self.lock_slot(&key, r).await?;
        let store = self.clone();
        let r = r.to_string();
        blocking(move || store.load_writer(guard, scope, key, r, total, expected, lease)).await
    }

    #[allow(clippy::too_many_arguments)]
    fn load_writer(
        self: Arc<Self>,
        mut guard: OwnedMutexGuard<Option<IngestState>>,
        scope: Scope,
        key: Vec<u8>,
        r: String,
        total: i64,
        expected: Option<Digest>,
        lease: Option<String>,
    ) -> Result<Writer> {
        if guard.is_none() {
            *guard = match self.ingest_record(&scope, &r)? {
                Some(rec) => {
                    // Resume after a restart: the running hash is rebuilt from the bytes that
                    // are actually stored, and the offset trimmed to them.
                    let algo = Digest::parse(&rec.expected)
                        .map(|d| d.algorithm())
                        .unwrap_or(Algorithm::Sha256);
                    Some(self.recover(rec, algo)?)
                }
                None => None,
            };
        }
        let mut w = Writer {
            store: self.clone(),
            scope: scope.clone(),
            key,
            reference: r,
            total,
            expected: expected.clone(),
            lease: lease.clone(),
            media_type: None,
            live: None,
            quota: self.quota(&scope),
            pending: Batch::new(),
            chunks: Batch::new(),
            chunk_bytes: 0,
            guard,
        };
        if let Some(l) = &lease {
            self.queue_lease_resource(&mut w.pending, &scope, l, "ingests", &w.reference.clone());
        }
        match w.guard.as_mut() {
            Some(st) => {
                if std::mem::take(&mut st.trim) {
                    let (extent, offset) = (st.rec.extent, st.rec.offset as u64);
                    let mut b = Batch::new();
                    b.delete_range(
                        Cf::Chunks,
                        chunk_key(extent, offset).to_vec(),
                        chunk_key(extent + 1, 0).to_vec(),
                    );
                    w.persist(b)?;
                }
                let st = w.guard.as_mut().expect("loaded");
                if total > 0
                    && st.rec.total > 0
                    && total != st.rec.total
                    && st.rec.shared.is_empty()
                {
                    // A different size was asked for: restart from zero rather than mixing data.
                    w.truncate()?;
                }
                let st = w.guard.as_mut().expect("loaded");
                if total > 0 {
                    st.rec.total = total;
                }
                w.total = st.rec.total;
            }
            None => {
                let now = now_ns();
                let algo = expected
                    .as_ref()
                    .map(|d| d.algorithm())
                    .unwrap_or(Algorithm::Sha256);
                let mut rec = IngestRecord {
                    extent: self.new_extent()?,
                    offset: 0,
                    total,
                    expected: expected.as_ref().map(|d| d.to_string()).unwrap_or_default(),
                    started_ns: now,
                    updated_ns: now,
                    shared: String::new(),
                };
                // containerd's shared policy: a namespace opening a writer for a blob another
                // namespace already has sees it complete without uploading it again.
                if let (Scope::Namespace(_), Some(d)) = (&scope, &expected)
                    && let Some(blob) = self.blob(d)?
                    && (total == 0 || total == blob.size)
                {
                    rec.shared = d.to_string();
                    rec.offset = blob.size;
                    rec.total = blob.size;
                }
                w.pending
                    .put(Cf::Ingests, w.key.clone(), rec.encode_to_vec());
                w.total = rec.total;
                *w.guard = Some(IngestState {
                    rec,
                    hasher: algo.hasher(),
                    unlogged: false,
                    trim: false,
                });
            }
        }
        if let Some(d) = expected {
            w.go_live(d)?;
        }
        Ok(w)
    }

    /// Rebuilds an ingest's state from storage. Chunks written without the WAL may have been
    /// lost in a crash that kept the record counting them; the ingest then resumes from the
    /// end of its contiguous stored bytes, and any stale chunk beyond that point is removed so
    /// it can never be read as part of the blob.
    fn recover(&self, mut rec: IngestRecord, algo: Algorithm) -> Result<IngestState> {
        if !rec.shared.is_empty() {
            let hasher = self.rehash(&rec, algo)?;
            return Ok(IngestState {
                rec,
                hasher,
                unlogged: false,
                trim: false,
            });
        }
        let mut h = algo.hasher();
        let mut pos = 0u64;
        while pos < rec.offset as u64 {
            let want = (rec.offset as u64 - pos).min(READ_BUFFER_LIMIT as u64) as usize;
            match self.read_extent(rec.extent, pos, want) {
                Ok(data) => {
                    h.update(&data);
                    pos += data.len() as u64;
                }
                Err(e) if e.is(Kind::DataLoss) => break,
                Err(e) => return Err(e),
            }
        }
        if pos != rec.offset as u64 {
            tracing::warn!(
                recorded = rec.offset,
                stored = pos,
                "ingest resumes from its stored bytes"
            );
            rec.offset = pos as i64;
        }
        Ok(IngestState {
            rec,
            hasher: h,
            unlogged: false,
            trim: true,
        })
    }

    fn rehash(&self, rec: &IngestRecord, algo: Algorithm) -> Result<Hasher> {
        let mut h = algo.hasher();
        if rec.shared.is_empty() {
            self.read_range(rec.extent, 0, rec.offset as u64, |c| {
                h.update(&c);
                Ok(())
            })?;
        } else {
            let d = Digest::parse(&rec.shared)?;
            let blob = self.blob(&d)?.ok_or_else(|| Self::not_found(&d))?;
            self.read_range(blob.extent, 0, blob.size as u64, |c| {
                h.update(&c);
                Ok(())
            })?;
        }
        Ok(h)
    }
}

/// Queues a committed document's outgoing edges and their reverse index.
fn put_edges(b: &mut Batch, parent: &Digest, p: &graph::Parsed) {
    let me = EdgeRecord {
        media_type: p.media_type.clone().unwrap_or_default(),
        size: 0,
        artifact_type: p.artifact_type.clone().unwrap_or_default(),
        platform: String::new(),
        urls: Vec::new(),
    };
    for e in &p.edges {
        let rec = EdgeRecord {
            media_type: e.media_type.clone(),
            size: e.size,
            artifact_type: e.artifact_type.clone().unwrap_or_default(),
            platform: e.platform.clone().unwrap_or_default(),
            urls: e.urls.clone(),
        };
        b.put(
            Cf::Edges,
            edge_key(parent, e.role, e.index, &e.digest),
            rec.encode_to_vec(),
        );
        b.put(
            Cf::Parents,
            parent_key(&e.digest, parent, e.role),
            me.encode_to_vec(),
        );
    }
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

pub fn fmt_ns(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    format!("{secs}.{nanos:09}")
}

/// Bytes of usage reserved for a link not yet written (see [`Store::reserve`]).
struct Reservation<'a> {
    store: &'a Store,
    scope: Scope,
    bytes: i64,
    kept: bool,
}

impl Reservation<'_> {
    /// The link was written: the bytes stay counted.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.store.usage_add(&self.scope, -self.bytes);
        }
    }
}

/// Exclusive handle on one ingest. Dropping it leaves the ingest resumable.
pub struct Writer {
    store: Arc<Store>,
    scope: Scope,
    key: Vec<u8>,
    reference: String,
    /// The size to verify at commit, as known to this stream.
    total: i64,
    /// The digest to verify at commit, as known to this stream (containerd keeps it per
    /// stream: a later stream on the same ref starts without it).
    expected: Option<Digest>,
    /// The `containerd-lease` this writer works under: it gets the ingest, then the blob.
    lease: Option<String>,
    /// The media type the client declared (contentd's own API); without it, commit sniffs.
    media_type: Option<String>,
    /// Readers following this ingest, when it is the live one for its digest.
    live: Option<Arc<LiveIngest>>,
    /// The scope's byte quota: a write that would pass it (with what the scope already
    /// links) is refused before anything is stored; commit checks exactly.
    quota: Option<u64>,
    /// Changes not yet written: a single-message upload becomes one synced batch.
    pending: Batch,
    /// Chunk puts of the current request, written with or without the WAL by `flush`.
    chunks: Batch,
    chunk_bytes: usize,
    guard: OwnedMutexGuard<Option<IngestState>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Normally flushed by the caller after each request; this keeps queued bytes of an
        // abandoned writer resumable too.
        if let Err(e) = self.flush() {
            tracing::warn!(reference = %self.reference, error = %e, "could not persist ingest progress");
        }
        if let Some(l) = self.live.take() {
            let offset = self.guard.as_ref().map(|st| st.rec.offset).unwrap_or(0);
            self.store.live_end(
                &l,
                Err(Error::unavailable(format!(
                    "the upload of this blob stopped at offset {offset} before it committed; \
                     retry once it resumes"
                ))),
            );
        }
    }
}

/// What a writer reports after every step.
#[derive(Debug, Clone)]
pub struct WriterStatus {
    pub offset: i64,
    pub total: i64,
    pub started_ns: i64,
    pub updated_ns: i64,
    pub digest: Digest,
}

impl Writer {
    fn state(&mut self) -> Result<&mut IngestState> {
        self.guard
            .as_mut()
            .ok_or_else(|| Error::not_found(format!("ingest {:?} is gone", self.reference)))
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    pub fn status(&mut self) -> Result<WriterStatus> {
        let total = self.total;
        let st = self.state()?;
        let digest = if st.rec.shared.is_empty() {
            st.hasher.digest()
        } else {
            Digest::parse(&st.rec.shared)?
        };
        Ok(WriterStatus {
            offset: st.rec.offset,
            total,
            started_ns: st.rec.started_ns,
            updated_ns: st.rec.updated_ns,
            digest,
        })
    }

    /// Declares the blob's media type. Commit still classifies by the bytes; the declared type
    /// only breaks a tie they leave (a manifest without its own `mediaType`), and names an
    /// opaque blob.
    pub fn set_media_type(&mut self, media_type: Option<String>) {
        self.media_type = media_type.filter(|m| !m.is_empty());
    }

    pub fn set_total(&mut self, total: i64) {
        if total > 0 {
            self.total = total;
        }
    }

    /// Records the digest the commit must produce. If this scope already has it (linked, or
    /// held by this tenant) the ingest is pointless: it is aborted and the caller gets
    /// AlreadyExists.
    pub fn set_expected(&mut self, d: Digest) -> Result<()> {
        if self.store.link(&self.scope, &d)?.is_some() {
            if let Some(l) = self.lease.clone() {
                self.store
                    .add_lease_resource(&self.scope, &l, "content", &d.to_string())?;
            }
            self.discard()?;
            return Err(Error::exists(format!("content {d}: already exists")));
        }
        self.expected = Some(d.clone());
        self.go_live(d)
    }

    /// Lets readers follow this ingest as the blob `d` (unless another ingest of `d` in this
    /// scope already is the live one).
    fn go_live(&mut self, d: Digest) -> Result<()> {
        if self.live.is_some() {
            return Ok(());
        }
        let total = self.total;
        let st = self.state()?;
        if !st.rec.shared.is_empty() {
            return Ok(());
        }
        let (extent, offset) = (st.rec.extent, st.rec.offset);
        self.live = self
            .store
            .live_register(&self.scope, &d, extent, offset, total);
        Ok(())
    }

    /// Tells readers following this ingest why it stopped (the ingest itself stays, to be
    /// resumed).
    pub fn fail_live(&mut self, e: Error) {
        self.end_live(Err(e));
    }

    /// Ends the live entry (if this writer has one) with `result`.
    fn end_live(&mut self, result: Result<(), Error>) {
        if let Some(l) = self.live.take() {
            self.store.live_end(&l, result);
        }
    }

    /// Queues `b` and the updated ingest record; [`Writer::flush`] or the commit batch
    /// writes them. Chunks and the record that counts them always land in one batch.
    fn persist(&mut self, b: Batch) -> Result<()> {
        let key = self.key.clone();
        let rec = self.state()?.rec.encode_to_vec();
        self.pending.ops.extend(b.ops);
        self.pending.put(Cf::Ingests, key, rec);
        Ok(())
    }

    /// Writes queued changes (unsynced: the WAL keeps them across a process crash, and the
    /// next synced commit makes them durable against power loss). Called after every
    /// request that did not commit, so a stream's acknowledged bytes are visible to Status
    /// and resumable.
    pub fn flush(&mut self) -> Result<()> {
        let mut chunks = std::mem::take(&mut self.chunks);
        let bytes = std::mem::take(&mut self.chunk_bytes);
        // Queued metadata (which may trim or drop chunks) goes before the new chunks.
        let mut b = std::mem::take(&mut self.pending);
        if bytes < UNLOGGED_MIN {
            b.ops.append(&mut chunks.ops);
        }
        if !b.is_empty() {
            self.store.kv.write(b, false)?;
        }
        if !chunks.is_empty() {
            // Crash ordering: the record just written may outlive these chunks (they are not
            // in the WAL); resume re-reads what is actually stored and trims the offset to it.
            self.store.kv.write_unlogged(chunks)?;
            self.state()?.unlogged = true;
        }
        if let (Some(l), Some(st)) = (&self.live, self.guard.as_ref()) {
            // Only now are the bytes up to this offset readable from the store.
            l.publish(st.rec.extent, st.rec.offset, self.total);
        }
        Ok(())
    }

    /// Drops all data and restarts the ingest at offset zero (in a fresh extent).
    fn truncate(&mut self) -> Result<()> {
        // A reader that followed the old bytes cannot be told they were rewritten.
        if let Some(l) = self.live.take() {
            self.store.live_end(
                &l,
                Err(Error::aborted(
                    "the upload of this blob restarted from offset 0; read it again",
                )),
            );
            if let Some(d) = self.expected.clone() {
                self.live = self.store.live_register(&self.scope, &d, 0, 0, self.total);
            }
        }
        let extent = self.store.new_extent()?;
        let st = self.state()?;
        let mut b = Batch::new();
        if st.rec.shared.is_empty() {
            let (from, to) = extent_range(st.rec.extent);
            b.delete_range(Cf::Chunks, from.to_vec(), to.to_vec());
        }
        st.rec.extent = extent;
        st.rec.offset = 0;
        st.rec.shared.clear();
        st.rec.updated_ns = now_ns();
        st.hasher = st.hasher.algorithm().hasher();
        self.persist(b)
    }

    /// A shared ingest gets bytes of its own before it is appended to (containerd's own
    /// suite appends to one and commits the longer blob). The copy streams: the writer never
    /// holds more than one read window of it, and no WAL record holds it at all.
    ///
    /// Crash ordering: the ingest record is first pointed at the fresh extent at offset 0
    /// (logged), then the bytes go in unlogged batches, then the record's offset moves to the
    /// end. A crash before the end leaves an unshared ingest that resumes from its durable
    /// contiguous bytes (`recover` trims the rest); commit flushes the chunk family before
    /// its synced batch (`unlogged`), as for any large write.
    fn unshare(&mut self) -> Result<()> {
        let st = self.state()?;
        if st.rec.shared.is_empty() {
            return Ok(());
        }
        let d = Digest::parse(&st.rec.shared)?;
        let algo = st.hasher.algorithm();
        let store = self.store.clone();
        let blob = store.blob(&d)?.ok_or_else(|| Store::not_found(&d))?;
        let extent = store.new_extent()?;
        let st = self.state()?;
        st.rec.extent = extent;
        st.rec.offset = 0;
        st.rec.shared.clear();
        st.hasher = algo.hasher();
        st.unlogged = true;
        self.persist(Batch::new())?;
        self.flush()?;
        let mut hasher = algo.hasher();
        let mut off = 0u64;
        let mut batch = Batch::new();
        let mut queued = 0usize;
        store.read_range(blob.extent, 0, blob.size.max(0) as u64, |c| {
            hasher.update(&c);
            for piece in c.chunks(CHUNK_SIZE) {
                batch.put(Cf::Chunks, chunk_key(extent, off).to_vec(), piece.to_vec());
                off += piece.len() as u64;
                queued += piece.len();
            }
            if queued >= UNLOGGED_MIN {
                store.kv.write_unlogged(std::mem::take(&mut batch))?;
                queued = 0;
            }
            Ok(())
        })?;
        if !batch.is_empty() {
            store.kv.write_unlogged(batch)?;
        }
        let st = self.state()?;
        st.rec.offset = off as i64;
        st.rec.updated_ns = now_ns();
        st.hasher = hasher;
        self.persist(Batch::new())
    }

    /// Appends `data` at `offset`, following containerd's rules: an offset of zero on an ingest
    /// that has data restarts it; any other offset must be the current one.
    pub fn write(&mut self, offset: i64, data: &[u8]) -> Result<()> {
        let current = self.state()?.rec.offset;
        if offset > 0 && offset != current {
            return Err(Error::out_of_range(format!(
                "write @{offset} must occur at current offset {current}"
            )));
        }
        if let Some(limit) = self.quota {
            let used = self.store.usage_of(&self.scope);
            let after = if offset == 0 { 0 } else { current }.saturating_add(data.len() as i64);
            if used.saturating_add(after) > i64::try_from(limit).unwrap_or(i64::MAX) {
                return Err(self.store.over_quota(&self.scope, limit, used, after));
            }
        }
        if offset == 0 && current > 0 {
            self.truncate()?;
        }
        if data.is_empty() {
            return Ok(());
        }
        self.unshare()?;
        let st = self.state()?;
        let extent = st.rec.extent;
        let mut pos = st.rec.offset as u64;
        st.hasher.update(data);
        st.rec.offset += data.len() as i64;
        st.rec.updated_ns = now_ns();
        for piece in data.chunks(CHUNK_SIZE) {
            self.chunks
                .put(Cf::Chunks, chunk_key(extent, pos).to_vec(), piece.to_vec());
            pos += piece.len() as u64;
        }
        self.chunk_bytes += data.len();
        crate::metrics::get()
            .bytes_in
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.persist(Batch::new())
    }

    /// The ingest's bytes when they may be a JSON document worth classifying: small enough,
    /// and starting like a JSON object. Queued chunks not yet written are included.
    fn document(&mut self) -> Result<Option<Vec<u8>>> {
        let (extent, offset) = {
            let st = self.state()?;
            (st.rec.extent, st.rec.offset)
        };
        if offset == 0 || offset as usize > self.store.max_document {
            return Ok(None);
        }
        // Queued chunk puts of this extent (copied shared bytes sit in `pending`, new
        // request data in `chunks`); everything before the first of them is stored.
        let mut queued: Vec<(u64, &Vec<u8>)> = self
            .pending
            .ops
            .iter()
            .chain(self.chunks.ops.iter())
            .filter_map(|op| match op {
                crate::kv::Op::Put(Cf::Chunks, k, v) if k[..8] == extent.to_be_bytes() => {
                    Some((u64::from_be_bytes(k[8..16].try_into().ok()?), v))
                }
                _ => None,
            })
            .collect();
        queued.sort_by_key(|q| q.0);
        let stored_len = queued.first().map(|q| q.0).unwrap_or(offset as u64);
        let mut doc = Vec::with_capacity(offset as usize);
        if stored_len > 0 {
            let first = self.store.read_extent(extent, 0, 1)?;
            if !matches!(first.first(), Some(b'{' | b' ' | b'\n' | b'\r' | b'\t')) {
                return Ok(None);
            }
            self.store.read_range(extent, 0, stored_len, |c| {
                doc.extend_from_slice(&c);
                Ok(())
            })?;
        } else if !matches!(
            queued.first().and_then(|q| q.1.first()),
            Some(b'{' | b' ' | b'\n' | b'\r' | b'\t')
        ) {
            return Ok(None);
        }
        for (_, v) in queued {
            doc.extend_from_slice(v);
        }
        Ok(Some(doc))
    }

    /// Drops the ingest and its bytes (live readers see Aborted).
    pub fn abort(&mut self) -> Result<()> {
        self.discard()
    }

    /// Drops the ingest and its bytes.
    fn discard(&mut self) -> Result<()> {
        let Some(st) = self.guard.as_ref() else {
            return Ok(());
        };
        let mut b = std::mem::take(&mut self.pending);
        self.chunks = Batch::new();
        self.chunk_bytes = 0;
        b.delete(Cf::Ingests, self.key.clone());
        if st.rec.shared.is_empty() {
            let (from, to) = extent_range(st.rec.extent);
            b.delete_range(Cf::Chunks, from.to_vec(), to.to_vec());
        }
        self.store.kv.write(b, true)?;
        *self.guard = None;
        self.store.release_slot(&self.key);
        self.end_live(Err(Error::aborted("the upload of this blob was aborted")));
        Ok(())
    }

    /// Verifies the ingest against `size` (if > 0) and `expected` (if given) and makes it a
    /// blob visible to this scope. On a size or digest mismatch the ingest is kept.
    pub fn commit(
        &mut self,
        size: i64,
        expected: Option<Digest>,
        labels: Option<HashMap<String, String>>,
    ) -> Result<Info> {
        let size = if size > 0 { size } else { self.total };
        if let (false, Some(l)) = (self.scope.is_tenant(), labels.as_ref()) {
            validate_labels(l)?;
        }
        let expected = expected.or_else(|| self.expected.clone());
        let store = self.store.clone();
        if expected.as_ref().map(|e| e.algorithm()) != Some(self.state()?.hasher.algorithm())
            && expected.is_some()
        {
            // Re-hashing reads the stored bytes, so queued ones must be written first.
            self.flush()?;
        }
        let st = self.state()?;
        if size > 0 && st.rec.offset != size {
            let e = Error::precondition(format!(
                "unexpected commit size {}, expected {size}",
                st.rec.offset
            ));
            self.end_live(Err(Error::data_loss(format!(
                "the upload of this blob failed verification: {e}"
            ))));
            return Err(e);
        }
        let actual = if let Ok(shared) = Digest::parse(&st.rec.shared) {
            shared
        } else {
            match &expected {
                Some(e) if e.algorithm() != st.hasher.algorithm() => {
                    st.hasher = store.rehash(&st.rec, e.algorithm())?;
                    st.hasher.digest()
                }
                _ => st.hasher.digest(),
            }
        };
        if let Some(e) = &expected
            && *e != actual
        {
            let e = Error::precondition(format!("unexpected commit digest {actual}, expected {e}"));
            self.end_live(Err(Error::data_loss(format!(
                "the upload of this blob failed verification: {e}"
            ))));
            return Err(e);
        }
        let rec = st.rec.clone();
        let now = now_ns();
        let mut link = LinkRecord {
            created_ns: now,
            updated_ns: now,
            labels: labels.unwrap_or_default(),
            size: 0,
            extent: 0,
        };
        let scope = self.scope.clone();
        // Edges are a function of the bytes: whatever type the client declared, bytes that
        // look like JSON are parsed (the declared type only breaks ties), and a shared ingest
        // parses the stored blob, so a later commit can repair edges an earlier one missed.
        let hint = self.media_type.clone();
        let doc = if rec.shared.is_empty() {
            self.document()?
        } else {
            store.stored_document(&actual)?
        };
        let parsed = doc
            .map(|doc| graph::parse_limited(hint.as_deref(), &doc, store.max_document))
            .or_else(|| hint.as_deref().map(|h| graph::Parsed::opaque(Some(h))));
        if self.state()?.unlogged {
            // Crash ordering: bytes written without the WAL must be on disk before the synced
            // commit record that makes them a blob.
            store.kv.flush(Cf::Chunks)?;
        }
        let outcome = {
            let _g = store.digest_lock(&actual);
            let _gate = store.gc_gate.read();
            store.barrier([collect::node(&scope, &actual)]);
            // A new link counts against the scope's usage: reserved (and checked against its
            // quota) before the batch, kept once it lands. Over quota, the ingest stays (an
            // abort or a later retry decides).
            let reservation = if store.link(&scope, &actual)?.is_none() {
                Some(store.reserve(&scope, rec.offset)?)
            } else {
                None
            };
            // Queued chunk writes go in the same synced batch as the commit itself.
            let mut b = std::mem::take(&mut self.pending);
            b.ops.append(&mut self.chunks.ops);
            self.chunk_bytes = 0;
            b.delete(Cf::Ingests, self.key.clone());
            if let Some(l) = &self.lease {
                // The lease moves from the ingest to the blob, in the commit itself.
                store.queue_lease_resource_removal(&mut b, &scope, l, "ingests", &self.reference);
                store.queue_lease_resource(&mut b, &scope, l, "content", &actual.to_string());
            }
            let existing = store.blob(&actual)?;
            match existing {
                Some(blob) => {
                    if rec.shared.is_empty() {
                        let (from, to) = extent_range(rec.extent);
                        b.delete_range(Cf::Chunks, from.to_vec(), to.to_vec());
                    }
                    // A dedupe commit repairs a document committed without its edges (by a
                    // version that trusted a declared type, say), in the same batch.
                    if let Some(p) = &parsed
                        && p.kind != graph::Kind::Opaque
                        && !store.has_edges(&actual)?
                    {
                        put_edges(&mut b, &actual, p);
                    }
                    let linked = store.link(&scope, &actual)?;
                    (link.size, link.extent) = (blob.size, blob.extent);
                    if linked.is_none() {
                        store.put_link(&mut b, &scope, &actual, &link);
                    }
                    store.kv.write(b, true)?;
                    if let (None, Some(r)) = (linked, reservation) {
                        r.keep();
                    }
                    if linked.is_some() {
                        Err(Error::exists(format!("content {actual}: already exists")))
                    } else {
                        Ok(Store::info_of(&actual, &blob, link))
                    }
                }
                None if !rec.shared.is_empty() => {
                    store.kv.write(b, true)?;
                    Err(Error::precondition(format!(
                        "content {actual} was removed while a shared ingest of it was open; write it again"
                    )))
                }
                None => {
                    let mut blob = BlobRecord {
                        extent: rec.extent,
                        size: rec.offset,
                        created_ns: now,
                        ..Default::default()
                    };
                    // The blob's place in the descriptor graph is recorded in the same batch
                    // that commits it: no committed manifest is ever without its edges.
                    if let Some(p) = &parsed {
                        blob.media_type = p.media_type.clone().unwrap_or_default();
                        blob.artifact_type = p.artifact_type.clone().unwrap_or_default();
                        if p.kind != graph::Kind::Opaque {
                            put_edges(&mut b, &actual, p);
                        }
                    }
                    b.put(Cf::Blobs, actual.key(), blob.encode_to_vec());
                    (link.size, link.extent) = (blob.size, blob.extent);
                    store.put_link(&mut b, &scope, &actual, &link);
                    store.kv.write(b, true)?;
                    if let Some(r) = reservation {
                        r.keep();
                    }
                    store.note_mutation();
                    store
                        .blob_count
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    store
                        .blob_bytes
                        .fetch_add(blob.size, std::sync::atomic::Ordering::Relaxed);
                    Ok(Store::info_of(&actual, &blob, link))
                }
            }
        };
        *self.guard = None;
        store.release_slot(&self.key);
        self.end_live(match &outcome {
            Ok(_) => Ok(()),
            Err(e) if e.is(Kind::AlreadyExists) => Ok(()),
            Err(e) => Err(e.clone()),
        });
        outcome
    }
}

/// A [`Writer`] driven from async code (the Put API, pulls, imports): each step runs on the
/// blocking pool and what it queued is flushed before it returns, so progress is resumable
/// and visible to live readers exactly as with a content.v1 Write.
pub struct AsyncWriter(Option<Writer>);

impl AsyncWriter {
    pub fn new(w: Writer) -> Self {
        AsyncWriter(Some(w))
    }

    pub async fn step<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Writer) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let mut w = self
            .0
            .take()
            .ok_or_else(|| Error::internal("writer lost by an earlier failed step"))?;
        let (w, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut w);
            let r = match (r, w.flush()) {
                (Ok(v), Ok(())) => Ok(v),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            };
            (w, r)
        })
        .await
        .map_err(|e| Error::internal(format!("write task failed: {e}")))?;
        self.0 = Some(w);
        r
    }

    /// Appends at the ingest's current offset.
    pub async fn append(&mut self, data: Bytes) -> Result<i64> {
        self.step(move |w| {
            let at = w.status()?.offset;
            w.write(at, &data)?;
            Ok(at + data.len() as i64)
        })
        .await
    }
}

/// Whether an error says the thing already exists (for callers that treat it as success).
pub fn is_exists(e: &Error) -> bool {
    e.is(Kind::AlreadyExists)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hostile;
