//! The ingest writer: uploads in progress (containerd's Write state machine, on the store
//! side), their exclusive per-ref slots, resume after a restart, and commit — the one write
//! path every byte takes (client writes, Blobs/Put, imports, upstream fetches), verified once.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;

use super::graphq::put_edges;
use super::*;

pub(super) type Slot = Arc<tokio::sync::Mutex<Option<IngestState>>>;

/// Most bytes a new ingest holds in memory until its commit ([`Writer::can_hold`]): a
/// blob of this size uploaded the way containerd's client does it (STAT, WRITE, COMMIT, each
/// awaiting its answer) is stored by one synced batch, with no write and no blocking-pool
/// hand-off for its WRITE. Configs, manifests and small layers fit.
pub(super) const HOLD: usize = 64 << 10;

/// Most bytes all writers together hold that way: the bound for clients that open many
/// uploads and never commit them (past it, WRITEs are stored at once, as before).
pub(super) const HOLD_TOTAL: usize = 64 << 20;

/// The longest ingest ref a writer may open.
pub const MAX_REF: usize = 4096;

/// When the current holder took a slot (ns), for the Unavailable message.
pub(super) type LockedSince = Arc<std::sync::atomic::AtomicI64>;

/// The record of an ingest that is open but not stored yet, for Status and ListStatuses
/// (see [`IngestState::saved`]).
pub(super) type Unsaved = Arc<parking_lot::Mutex<Option<IngestRecord>>>;

/// A locked slot, with its entry's copy of an unsaved record.
pub(super) type Held = (OwnedMutexGuard<Option<IngestState>>, Unsaved);

/// One ref's entry in the slot map.
pub(super) struct SlotEntry {
    pub(super) slot: Slot,
    pub(super) since: LockedSince,
    pub(super) unsaved: Unsaved,
}

pub(super) struct IngestState {
    pub(super) rec: IngestRecord,
    pub(super) hasher: Hasher,
    /// Some chunks were written without the WAL: the commit must flush them first.
    pub(super) unlogged: bool,
    /// Freshly recovered: stale chunks past `rec.offset` must be removed before writing.
    pub(super) trim: bool,
    /// The record is stored. A new ingest's record is not stored until its first bytes (or
    /// its commit) are, in the same batch: opening a writer then costs no write and no
    /// blocking-pool hand-off, which is a third of the work of a small blob uploaded the way
    /// containerd's client does it (STAT, WRITE, COMMIT). Until then the ingest lives only in
    /// its slot: Status and ListStatuses show it from the slot entry, and a restart or an
    /// eviction of the idle slot forgets it, which loses nothing, as it has no bytes. Its
    /// writer may hold a small upload's first bytes too (`Writer::can_hold`); those are
    /// stored before the writer lets go of the slot (commit, or the flush on drop), so an
    /// idle slot never has held bytes to forget: only a crash does.
    pub(super) saved: bool,
}

impl Store {
    pub(super) fn ingest_record(&self, scope: &Scope, r: &str) -> Result<Option<IngestRecord>> {
        self.kv
            .get(Cf::Ingests, &ingest_key(scope, r))?
            .map(|v| decode("ingest", &v))
            .transpose()
    }

    pub(super) fn status_of(reference: String, rec: &IngestRecord) -> IngestStatus {
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
        let rec = match self.ingest_record(scope, r)? {
            Some(rec) => Some(rec),
            None => self.unsaved_record(&ingest_key(scope, r)),
        };
        let rec = rec.ok_or_else(|| {
            Error::not_found(format!("could not get status for ref {r:?}: not found"))
        })?;
        Ok(Self::status_of(r.to_string(), &rec))
    }

    /// The record of an open ingest not stored yet.
    fn unsaved_record(&self, key: &[u8]) -> Option<IngestRecord> {
        let unsaved = self.slots.lock().get(key)?.unsaved.clone();
        unsaved.lock().clone()
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
        let unsaved: Vec<(Vec<u8>, Unsaved)> = self
            .slots
            .lock()
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, e)| (k.clone(), e.unsaved.clone()))
            .collect();
        if unsaved.is_empty() {
            return Ok(out);
        }
        // One saved since the scan above is listed already.
        let listed: std::collections::HashSet<String> =
            out.iter().map(|s| s.reference.clone()).collect();
        for (k, cell) in unsaved {
            let rec = cell.lock().clone();
            if let (Some(rec), Ok(r)) = (rec, std::str::from_utf8(&k[prefix.len()..])) {
                let st = Self::status_of(r.to_string(), &rec);
                if filter.matches(&st) && !listed.contains(&st.reference) {
                    out.push(st);
                }
            }
        }
        Ok(out)
    }

    /// Drops an ingest and its bytes. Waits briefly for a live writer to let go.
    /// Returns whether the ingest existed.
    pub async fn abort(self: &Arc<Self>, scope: &Scope, r: &str) -> Result<bool> {
        let key = ingest_key(scope, r);
        let (mut guard, _) = self.lock_slot(&key, r).await?;
        let store = self.clone();
        let scope = scope.clone();
        let r = r.to_string();
        tokio::task::spawn_blocking(move || {
            let rec = match guard.as_ref() {
                Some(st) => Some(st.rec.clone()),
                None => store.ingest_record(&scope, &r)?,
            };
            let Some(rec) = rec else { return Ok(false) };
            store.drop_ingest(Batch::new(), &key, &rec, true)?;
            *guard = None;
            store.release_slot(&key);
            Ok(true)
        })
        .await
        .map_err(|e| Error::internal(format!("abort task failed: {e}")))?
    }

    pub(super) fn release_slot(&self, key: &[u8]) {
        self.slots.lock().remove(key);
    }

    /// Forgets the cached state of ingests nobody is writing: each reloads from its durable
    /// record (re-hashing its bytes) when it is next opened. Memory then grows with the
    /// uploads in flight, not with every ref a client ever opened. A slot whose bytes went
    /// without the WAL keeps its state: only it knows they must be flushed before a commit.
    pub(super) fn evict_idle_slots(slots: &mut HashMap<Vec<u8>, SlotEntry>) {
        slots.retain(|_, e| match e.slot.try_lock() {
            Ok(g) => g.as_ref().is_some_and(|st| st.unlogged),
            Err(_) => true,
        });
    }

    /// Takes the exclusive lock on an ingest ref, retrying for [`LOCK_WAIT`].
    pub(super) async fn lock_slot(&self, key: &[u8], r: &str) -> Result<Held> {
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let mut pause = Duration::from_millis(2);
        loop {
            let (slot, since, unsaved) = {
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
                let entry = slots.entry(key.to_vec()).or_insert_with(|| SlotEntry {
                    slot: Arc::new(tokio::sync::Mutex::new(None)),
                    since: Arc::new(std::sync::atomic::AtomicI64::new(0)),
                    unsaved: Default::default(),
                });
                (
                    entry.slot.clone(),
                    entry.since.clone(),
                    entry.unsaved.clone(),
                )
            };
            if let Ok(guard) = slot.clone().try_lock_owned() {
                // The slot may have been retired (commit/abort) between lookup and lock; only
                // the slot still registered for this key may be used, or two writers could
                // share a ref.
                let current = self
                    .slots
                    .lock()
                    .get(key)
                    .map(|e| Arc::ptr_eq(&e.slot, &slot))
                    .unwrap_or(false);
                if current {
                    since.store(now_ns(), std::sync::atomic::Ordering::Relaxed);
                    return Ok((guard, unsaved));
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
        self.open_writer_with(scope, r, total, expected, lease, false, |_| Ok(()))
            .await
            .map(|(w, ())| w)
    }

    /// [`Store::open_writer`], then `first` on the new writer in the same blocking-pool task:
    /// a content.v1 Write stream's open and first request cost one hand-off, not two. A new
    /// ingest is opened without a hand-off at all (its record waits for its first bytes)
    /// when `first` stores nothing (`first_stores` false: a STAT).
    #[allow(clippy::too_many_arguments)]
    pub async fn open_writer_with<T: Send + 'static>(
        self: &Arc<Self>,
        scope: Scope,
        r: &str,
        total: i64,
        expected: Option<Digest>,
        lease: Option<String>,
        first_stores: bool,
        first: impl FnOnce(&mut Writer) -> Result<T> + Send + 'static,
    ) -> Result<(Writer, T)> {
        if r.is_empty() {
            return Err(Error::invalid("ingest ref must not be empty"));
        }
        // A ref is a key and comes back whole in every status listing; clients name
        // ingests with a digest and a word (containerd: `layer-sha256:…`), far below this.
        if r.len() > MAX_REF {
            return Err(Error::invalid(format!(
                "ingest ref of {} bytes: at most {MAX_REF} are accepted",
                r.len()
            )));
        }
        if let Some(l) = &lease {
            self.require_lease(&scope, l)?;
        }
        if let Some(d) = &expected {
            let exists = match &lease {
                // A point lookup: answered on this worker, like a small read's.
                None => self.link(&scope, d)?.is_some(),
                Some(l) => {
                    let store = self.clone();
                    let (s, d2, l) = (scope.clone(), d.clone(), l.clone());
                    blocking(move || {
                        let exists = store.link(&s, &d2)?.is_some();
                        // Opening a writer for content one has is how containerd clients
                        // check and pin in one step: the lease gets the blob.
                        if exists {
                            store.add_lease_resource(&s, &l, "content", &d2.to_string())?;
                        }
                        Ok(exists)
                    })
                    .await?
                }
            };
            if exists {
                return Err(Error::exists(format!("content {d}: already exists")));
            }
        }
        let key = ingest_key(&scope, r);
        let (guard, unsaved) = self.lock_slot(&key, r).await?;
        // Looked up under the slot lock, so no other writer changes it meanwhile; a point
        // lookup, on this worker.
        let stored = if guard.is_none() {
            self.ingest_record(&scope, r)?
        } else {
            None
        };
        // A new ingest with a reserved extent at hand needs nothing more than memory:
        // answered on this worker. A resumed one re-reads its bytes.
        if !first_stores
            && guard.is_none()
            && stored.is_none()
            && let Some(extent) = self.new_extent_reserved()
        {
            let mut w = self.clone().load_writer(
                (guard, unsaved),
                Start::New(extent),
                (scope, key, r.to_string()),
                total,
                expected,
                lease,
            )?;
            let v = first(&mut w)?;
            return Ok((w, v));
        }
        let store = self.clone();
        let r = r.to_string();
        blocking(move || {
            let mut w = store.load_writer(
                (guard, unsaved),
                Start::Stored(stored),
                (scope, key, r),
                total,
                expected,
                lease,
            )?;
            let v = first(&mut w)?;
            Ok((w, v))
        })
        .await
    }

    pub(super) fn load_writer(
        self: Arc<Self>,
        (mut guard, unsaved): Held,
        mut at: Start,
        (scope, key, r): (Scope, Vec<u8>, String),
        total: i64,
        expected: Option<Digest>,
        lease: Option<String>,
    ) -> Result<Writer> {
        if guard.is_none() {
            *guard = match at.stored() {
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
            held: 0,
            guard,
            unsaved,
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
                if !st.saved {
                    *w.unsaved.lock() = Some(st.rec.clone());
                }
            }
            None => {
                let now = now_ns();
                let algo = expected
                    .as_ref()
                    .map(|d| d.algorithm())
                    .unwrap_or(Algorithm::Sha256);
                let extent = match at {
                    Start::New(extent) => extent,
                    Start::Stored(_) => self.new_extent()?,
                };
                let mut rec = IngestRecord {
                    extent,
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
                *w.unsaved.lock() = Some(rec.clone());
                *w.guard = Some(IngestState {
                    rec,
                    hasher: algo.hasher(),
                    unlogged: false,
                    trim: false,
                    saved: false,
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
    pub(super) fn recover(&self, mut rec: IngestRecord, algo: Algorithm) -> Result<IngestState> {
        if !rec.shared.is_empty() {
            let hasher = self.rehash(&rec, algo)?;
            return Ok(IngestState {
                rec,
                hasher,
                unlogged: false,
                trim: false,
                saved: true,
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
            // Crash ordering: bytes an earlier writer (or process) put without the WAL may
            // still sit unflushed in the memtable; whoever commits this ingest flushes them
            // first, whatever the previous holder knew.
            unlogged: true,
            trim: true,
            saved: true,
        })
    }

    pub(super) fn rehash(&self, rec: &IngestRecord, algo: Algorithm) -> Result<Hasher> {
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

/// Bytes of usage reserved for a link not yet written (see [`Store::reserve`]).
pub(super) struct Reservation<'a> {
    pub(super) store: &'a Store,
    pub(super) scope: Scope,
    pub(super) bytes: i64,
    pub(super) kept: bool,
}

impl Reservation<'_> {
    /// The link was written: the bytes stay counted.
    pub(super) fn keep(mut self) {
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
    pub(super) store: Arc<Store>,
    pub(super) scope: Scope,
    pub(super) key: Vec<u8>,
    pub(super) reference: String,
    /// The size to verify at commit, as known to this stream.
    pub(super) total: i64,
    /// The digest to verify at commit, as known to this stream (containerd keeps it per
    /// stream: a later stream on the same ref starts without it).
    pub(super) expected: Option<Digest>,
    /// The `containerd-lease` this writer works under: it gets the ingest, then the blob.
    pub(super) lease: Option<String>,
    /// The media type the client declared (contentd's own API); without it, commit sniffs.
    pub(super) media_type: Option<String>,
    /// Readers following this ingest, when it is the live one for its digest.
    pub(super) live: Option<Arc<LiveIngest>>,
    /// The scope's byte quota: a write that would pass it (with what the scope already
    /// links) is refused before anything is stored; commit checks exactly.
    pub(super) quota: Option<u64>,
    /// Changes not yet written: a single-message upload becomes one synced batch.
    pub(super) pending: Batch,
    /// Chunk puts of the current request, written with or without the WAL by `flush`.
    pub(super) chunks: Batch,
    pub(super) chunk_bytes: usize,
    /// Of those, bytes held for the commit and counted in the store's `held_bytes`.
    pub(super) held: usize,
    pub(super) guard: OwnedMutexGuard<Option<IngestState>>,
    /// The slot entry's copy of the record while it is not stored.
    pub(super) unsaved: Unsaved,
}

/// How [`Store::load_writer`] finds its ingest when the slot holds no state.
pub(super) enum Start {
    /// The stored record the caller found under the slot lock; without one, a new ingest.
    Stored(Option<IngestRecord>),
    /// The caller found no record: a new ingest, in this reserved extent.
    New(u64),
}

impl Start {
    fn stored(&mut self) -> Option<IngestRecord> {
        match self {
            Start::Stored(rec) => rec.take(),
            Start::New(_) => None,
        }
    }
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
    pub(super) fn state(&mut self) -> Result<&mut IngestState> {
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
    pub(super) fn go_live(&mut self, d: Digest) -> Result<()> {
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
    pub(super) fn end_live(&mut self, result: Result<(), Error>) {
        if let Some(l) = self.live.take() {
            self.store.live_end(&l, result);
        }
    }

    /// Queues `b` and the updated ingest record; [`Writer::flush`] or the commit batch
    /// writes them. Chunks and the record that counts them always land in one batch.
    pub(super) fn persist(&mut self, b: Batch) -> Result<()> {
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
        if self.chunks.is_empty() && self.guard.as_ref().is_some_and(|st| !st.saved) {
            // Crash ordering: nothing of a new ingest is stored before its first bytes, which
            // then land in one batch with its record (see `IngestState::saved`).
            return Ok(());
        }
        let (mut chunks, bytes) = self.take_chunks();
        // Queued metadata (which may trim or drop chunks) goes before the new chunks.
        let mut b = std::mem::take(&mut self.pending);
        if bytes < UNLOGGED_MIN {
            b.ops.append(&mut chunks.ops);
        }
        if !b.is_empty() {
            self.store.kv.write(b, false)?;
        }
        self.mark_saved();
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

    /// Stores the ingest now, bytes or not: for an upload that must outlive a restart before
    /// its first byte (the registry's, which a client resumes by its URL).
    pub fn save(&mut self) -> Result<()> {
        if self.guard.as_ref().is_some_and(|st| !st.saved) {
            self.persist(Batch::new())?;
            self.store
                .kv
                .write(std::mem::take(&mut self.pending), false)?;
            self.mark_saved();
        }
        Ok(())
    }

    fn mark_saved(&mut self) {
        if let Some(st) = self.guard.as_mut()
            && !st.saved
        {
            st.saved = true;
            *self.unsaved.lock() = None;
        }
    }

    /// Whether `len` more bytes at `offset` can wait in memory for this ingest's commit
    /// (see [`super::WriteSession::step_in_memory`]): a new ingest (nothing of it stored,
    /// so nothing stored can disagree with what is held), appended to, with at most HOLD
    /// bytes held in all, bounded by the requests that brought them. Writing them then
    /// needs no storage: no extent, no copy from a shared blob, no truncation.
    pub fn can_hold(&self, offset: i64, len: usize) -> bool {
        self.guard.as_ref().is_some_and(|st| {
            !st.saved
                && !st.unlogged
                && st.rec.shared.is_empty()
                && st.rec.offset == offset
                && self.chunk_bytes.saturating_add(len) <= HOLD
                && self
                    .store
                    .held_bytes
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .saturating_add(len)
                    <= HOLD_TOTAL
        })
    }

    /// After a step that stored nothing: counts what is queued as held, and shows the
    /// progress of an ingest not stored yet to Status and ListStatuses.
    pub(super) fn hold_queued(&mut self) {
        if let Some(more) = self.chunk_bytes.checked_sub(self.held)
            && more > 0
        {
            self.store
                .held_bytes
                .fetch_add(more, std::sync::atomic::Ordering::Relaxed);
            self.held = self.chunk_bytes;
        }
        if let Some(st) = self.guard.as_ref()
            && !st.saved
        {
            *self.unsaved.lock() = Some(st.rec.clone());
        }
    }

    /// The queued chunk puts and their byte count, leaving none queued: the one way chunks
    /// leave the queue (written, committed or dropped), so it also gives back what was held.
    fn take_chunks(&mut self) -> (Batch, usize) {
        if self.held > 0 {
            self.store.held_bytes.fetch_sub(
                std::mem::take(&mut self.held),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        (
            std::mem::take(&mut self.chunks),
            std::mem::take(&mut self.chunk_bytes),
        )
    }

    /// Whether anything is queued for the next [`Writer::flush`] to write.
    pub fn has_queued(&self) -> bool {
        let saved = self.guard.as_ref().is_none_or(|st| st.saved);
        (saved && !self.pending.is_empty()) || !self.chunks.is_empty()
    }

    /// Drops all data and restarts the ingest at offset zero (in a fresh extent).
    pub(super) fn truncate(&mut self) -> Result<()> {
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
        // Chunks still queued (a small upload's held WRITE) belong to the old extent: put
        // after its range delete, they would outlive it, referenced by nothing.
        self.take_chunks();
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
    pub(super) fn unshare(&mut self) -> Result<()> {
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
        self.write_bytes(offset, Bytes::copy_from_slice(data))
    }

    /// [`Writer::write`] of bytes the caller already holds shared (a request's payload): the
    /// queued chunks are slices of `data`, not copies.
    pub fn write_bytes(&mut self, offset: i64, data: Bytes) -> Result<()> {
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
        if !data.is_empty() {
            self.store.check_disk_reserve(data.len())?;
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
        let end = i64::try_from(data.len())
            .ok()
            .and_then(|n| st.rec.offset.checked_add(n))
            .ok_or_else(|| Error::out_of_range("write would pass the largest blob size"))?;
        st.hasher.update(&data);
        st.rec.offset = end;
        st.rec.updated_ns = now_ns();
        // Chunks end on the blob's CHUNK_SIZE boundaries whatever the write's offset, so a
        // stream whose writes end on them (`Gather`) is stored in whole, aligned chunks.
        let mut from = 0;
        while from < data.len() {
            let room = CHUNK_SIZE - (pos % CHUNK_SIZE as u64) as usize;
            let n = room.min(data.len() - from);
            self.chunks.put(
                Cf::Chunks,
                chunk_key(extent, pos).to_vec(),
                data.slice(from..from + n),
            );
            pos += n as u64;
            from += n;
        }
        self.chunk_bytes += data.len();
        crate::metrics::get().bytes_in.inc_by(data.len() as u64);
        self.persist(Batch::new())
    }

    /// The ingest's bytes when they may be a JSON document worth classifying: small enough,
    /// and starting like a JSON object. Queued chunks not yet written are included.
    pub(super) fn document(&mut self) -> Result<Option<Vec<u8>>> {
        let (extent, offset) = {
            let st = self.state()?;
            (st.rec.extent, st.rec.offset)
        };
        if offset == 0 || offset as usize > self.store.max_document {
            return Ok(None);
        }
        // Queued chunk puts of this extent (copied shared bytes sit in `pending`, new
        // request data in `chunks`); everything before the first of them is stored.
        let mut queued: Vec<(u64, &bytes::Bytes)> = self
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
    pub(super) fn discard(&mut self) -> Result<()> {
        let b = std::mem::take(&mut self.pending);
        self.take_chunks();
        let Some(st) = self.guard.as_ref() else {
            return Ok(());
        };
        self.store.drop_ingest(b, &self.key, &st.rec, true)?;
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
            // The lease's stripe (before the gate, see `Store::record_locks`), held until the
            // batch lands: a lease deleted while this commit runs gets no content resource
            // left behind it. A commit under a lease that is gone fails, as containerd's
            // does, and the ingest stays for a retry.
            let _lease = self
                .lease
                .as_ref()
                .map(|l| store.record_lock(&super::keys::lease_key(&scope, l)));
            if let Some(l) = &self.lease
                && store.lease(&scope, l)?.is_none()
            {
                return Err(Error::not_found(format!(
                    "lease {l:?}: not found; nothing was committed"
                )));
            }
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
            b.ops.append(&mut self.take_chunks().0.ops);
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
                    if let (None, Some(r)) = (&linked, reservation) {
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
            let (at, n) = (w.status()?.offset, data.len() as i64);
            w.write_bytes(at, data)?;
            Ok(at + n)
        })
        .await
    }
}
