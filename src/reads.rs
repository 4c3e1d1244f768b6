//! The read path of one blob, wherever its bytes are: stored, still arriving (a live
//! ingest), or only upstream (a lazy blob from a pull).
//!
//! Every path yields pieces of at most `piece` bytes through a bounded channel, so a
//! stream's memory is a few pieces whatever the blob's size, and a slow reader slows only
//! itself. A blob one chunk holds is one point lookup, with no task at all. A lazy blob is
//! fetched once (see `upstream::pull`, single flight) and its readers take the fetch's frames
//! from its tee (`upstream::tee`) as they come off the network, or stored bytes when they are
//! behind it; a read far ahead of what has arrived is served at once by an upstream Range
//! request while the whole blob fills in behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::digest::Digest;
use crate::error::{Error, Kind, Result};
use crate::store::{LiveState, Scope, Store};
use crate::upstream::Source;
use crate::upstream::pull::{FetchPhase, Puller};
use crate::upstream::tee::{At, Tee};

/// Pieces queued per stream.
const DEPTH: usize = 2;
/// A stored read whose client takes no piece for this long gives its thread back.
const STALL: std::time::Duration = std::time::Duration::from_millis(50);
/// Blobs up to this size are read with one point lookup on the async worker when one chunk
/// holds them (a lookup of this size is a few microseconds from the block or blob cache).
const SMALL: usize = 64 << 10;
/// A read starting this far beyond what a fetch has landed goes to the upstream directly.
const AHEAD: i64 = 4 << 20;
/// Longest a delete waits for a fetch of the same blob to commit (a crawling upstream must
/// not hold a delete for as long as its fetch takes).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Reads {
    store: Arc<Store>,
    puller: Option<Arc<Puller>>,
    /// Read-ahead shared by every stored read, in pieces (see [`Flight`]).
    ahead: Arc<Semaphore>,
    damage: Arc<Damage>,
}

/// Damage a read ran into, taken out of service. A checksum failure under a stored blob
/// (RocksDB's CRC of a blob record or block: DataLoss) broke that read, and would break
/// every later one the same way, mid-body, with nothing logged but the failed call; a
/// mirror would keep serving the broken blob rather than fetch it again. So the first read
/// to meet it has the whole blob re-verified against its digest, as the scrubber does, and
/// quarantined when it fails (`Store::scrub`): then readers get NotFound, or in a scope
/// with an upstream source the blob is fetched again.
struct Damage {
    store: Arc<Store>,
    puller: Option<Arc<Puller>>,
    /// When each digest was last sent for re-verification: at most once per [`RECHECK`],
    /// so an error that is not the bytes' (the check passes) cannot make every read of a
    /// large blob cost a full re-read.
    checked: parking_lot::Mutex<std::collections::HashMap<Digest, std::time::Instant>>,
}

/// Least time between two re-verifications of one digest after failed reads.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

impl Damage {
    /// What a stored read's error means. Chunks are read as they are due, so a collection
    /// can remove the rest of a blob under a slow reader: DataLoss under a blob no longer
    /// stored (in that extent) is that, NotFound, not lost data. Under a stored one it is
    /// damage, and is reported.
    fn classify(self: &Arc<Self>, d: &Digest, extent: u64, e: Error) -> Error {
        if !e.is(Kind::DataLoss) {
            return e;
        }
        if !self.store.stored_in(d, extent) {
            return Error::not_found(format!("content {d}: deleted while it was being read"));
        }
        self.report(d, &e);
        e
    }

    fn report(self: &Arc<Self>, d: &Digest, e: &Error) {
        let now = std::time::Instant::now();
        {
            let mut checked = self.checked.lock();
            if checked
                .get(d)
                .is_some_and(|t| now.duration_since(*t) < RECHECK)
            {
                return;
            }
            checked.retain(|_, t| now.duration_since(*t) < RECHECK);
            checked.insert(d.clone(), now);
        }
        tracing::error!(digest = %d, error = %e, "a read found stored bytes damaged; re-verifying the blob");
        let (this, d) = (self.clone(), d.clone());
        tokio::task::spawn_blocking(
            move || match this.store.scrub(std::slice::from_ref(&d), 0) {
                Ok(r) => {
                    for c in &r.corrupt {
                        let refetching = this
                            .puller
                            .as_ref()
                            .map(|p| p.refetch(c))
                            .unwrap_or_default();
                        tracing::warn!(digest = %c.digest, refetching = ?refetching, "damaged blob quarantined after a failed read");
                    }
                    if r.corrupt.is_empty() && r.failed.is_empty() {
                        tracing::warn!(digest = %d, "re-verified after a failed read: the stored bytes match their digest");
                    }
                }
                Err(e) => {
                    tracing::error!(digest = %d, error = %e, "cannot re-verify a blob after a failed read")
                }
            },
        );
    }
}

/// The pieces of one stored read that are still alive: queued for the client, or in the
/// transport until it has written them (a piece is the chunk buffer RocksDB read, sent
/// without a copy, so it lives until the socket took it).
///
/// Memory bound: a stream may always have one piece alive, so every stream makes progress
/// whatever the others do; every further piece (the read-ahead that keeps one fast stream
/// busy) takes a permit from one pool all stored reads share. Without the pool each stream
/// held up to five 256 KiB chunks (channel, framing, HTTP/2's send queue; heaptrack under
/// 64 streams: 58 MiB of chunk buffers at the peak), so memory followed the number of
/// streams. With it, n streams hold at most n pieces plus the pool, and a client that stops
/// reading pins one piece, or permits only until its stream is dropped.
#[derive(Default)]
struct Flight {
    alive: AtomicUsize,
    freed: Notify,
}

/// A piece handed to the client, with what it holds until it is dropped.
struct Tracked {
    bytes: Bytes,
    flight: Arc<Flight>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.flight.alive.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.flight.freed.notify_one();
        }
    }
}

impl Flight {
    /// Waits until this stream may read one more piece: at once when it has none alive,
    /// else once a read-ahead permit is free or its pieces are gone. Only the stream's one
    /// reading task calls this, so nothing else can make a piece alive in between.
    async fn credit(&self, pool: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        loop {
            let freed = self.freed.notified();
            if self.alive.load(Ordering::Acquire) == 0 {
                return None;
            }
            tokio::select! {
                p = pool.clone().acquire_owned() => return p.ok(),
                _ = freed => {}
            }
        }
    }

    /// What the next piece needs, both taken before its chunk is read: a slot in the
    /// stream's channel, then this stream's credit. None when the client went away.
    async fn due(
        &self,
        tx: mpsc::Sender<Result<Bytes>>,
        pool: &Arc<Semaphore>,
    ) -> Option<(
        mpsc::OwnedPermit<Result<Bytes>>,
        Option<OwnedSemaphorePermit>,
    )> {
        let slot = tx.reserve_owned().await.ok()?;
        Some((slot, self.credit(pool).await))
    }

    fn track(self: &Arc<Self>, bytes: Bytes, permit: Option<OwnedSemaphorePermit>) -> Bytes {
        self.alive.fetch_add(1, Ordering::AcqRel);
        Bytes::from_owner(Tracked {
            bytes,
            flight: self.clone(),
            _permit: permit,
        })
    }
}

/// An open read: the blob's size when known, and its bytes from the requested offset.
///
/// Pieces are meant to be sent on and dropped (a transport): a stored read counts the pieces
/// it handed out that are still alive, and reads ahead beyond one only with permits from a
/// pool every stored read shares (see [`Flight`]). A consumer that keeps pieces while it
/// waits for the next would, once that pool is spent, wait for ever; copy out instead.
pub struct Opened {
    pub size: Option<i64>,
    pub rx: mpsc::Receiver<Result<Bytes>>,
}

impl Reads {
    /// `read_ahead`: bytes of pieces all stored reads together may read ahead of their
    /// clients (see [`Flight`]; at least two chunks).
    pub fn new(store: Arc<Store>, puller: Option<Arc<Puller>>, read_ahead: usize) -> Arc<Reads> {
        let pieces = (read_ahead / crate::store::CHUNK_SIZE).max(2);
        Arc::new(Reads {
            damage: Arc::new(Damage {
                store: store.clone(),
                puller: puller.clone(),
                checked: Default::default(),
            }),
            store,
            puller,
            ahead: Arc::new(Semaphore::new(pieces)),
        })
    }

    /// Waits (at most SETTLE) for an on-demand fetch of `d` under way in `scope` to end. A
    /// reader of a fetch finishes once every byte is verified, before the fetch commits: a
    /// delete that follows at once must wait for the commit, or it finds nothing to delete
    /// and the blob is linked just after it, as if the delete never happened.
    pub async fn settle(&self, scope: &Scope, d: &Digest) {
        let Some((mut phase, _)) = self
            .puller
            .as_ref()
            .and_then(|p| p.fetch_under_way(scope, d))
        else {
            return;
        };
        let done = phase.wait_for(|p| matches!(p, FetchPhase::Done(_)));
        let _ = tokio::time::timeout(SETTLE, done).await;
    }

    /// `[offset, offset+size)` of `d` (`size` ≤ 0: to the end).
    pub async fn open(
        &self,
        scope: &Scope,
        d: &Digest,
        offset: i64,
        size: i64,
        piece: usize,
    ) -> Result<Opened> {
        let offset = offset.max(0);
        // The common case, a linked blob, is one point lookup on this worker; a tenant's
        // first read of a blob writes its hold (synced), on the blocking pool.
        let located = match self.store.locate_linked(scope, d)? {
            Some(loc) => Ok(loc),
            None => {
                let (store, s, d2) = (self.store.clone(), scope.clone(), d.clone());
                tokio::task::spawn_blocking(move || store.locate(&s, &d2))
                    .await
                    .map_err(|e| Error::internal(format!("storage task failed: {e}")))?
            }
        };
        match located {
            Ok(loc) => return self.stored(d, loc.extent, loc.size, offset, size, piece),
            Err(e) if e.is(Kind::NotFound) => {}
            Err(e) => return Err(e),
        }
        // A fetch under way has a live ingest too, but its readers are fed from its tee:
        // following the ingest, a reader would get bytes only as each store write lands.
        let under_way = self
            .puller
            .as_ref()
            .and_then(|p| p.fetch_under_way(scope, d));
        if under_way.is_none()
            && let Some(rx) = self.store.live(scope, d)
        {
            return self.follow(scope, d, rx, offset, size, piece);
        }
        let Some(puller) = &self.puller else {
            return Err(Error::not_found(format!("content {d}: not found")));
        };
        let src = self
            .store
            .source(scope, d)?
            .ok_or_else(|| Error::not_found(format!("content {d}: not found")))?;
        if src.size > 0 && offset > src.size {
            return Err(out_of_range(offset, src.size));
        }
        let (phase, tee) = match under_way {
            Some(f) => f,
            None => puller.ensure_fetch(scope, d)?,
        };
        // A read far beyond what has arrived is served at once by a Range request while the
        // whole blob fills in behind it.
        if offset > tee.received().unwrap_or(0).max(0) + AHEAD {
            return self
                .ranged(puller, &src_of(&src), d, offset, size, src.size, piece)
                .await;
        }
        Ok(self.follow_fetch(scope, d, tee, phase, offset, size, src.size, piece))
    }

    fn stored(
        &self,
        d: &Digest,
        extent: u64,
        blob_size: i64,
        offset: i64,
        size: i64,
        piece: usize,
    ) -> Result<Opened> {
        if offset > blob_size {
            return Err(out_of_range(offset, blob_size));
        }
        let end = end_of(offset, size, blob_size);
        // A range one message and one chunk hold (configs, manifests, small files) is one
        // point lookup on this worker: a Read's fixed cost is then that of an Info, with no
        // blocking-pool hand-off and no iterator.
        if end - offset <= piece as i64
            && blob_size <= SMALL as i64
            && let Some(data) = self
                .store
                .read_in_first_chunk(extent, offset as u64, end as u64)
                .map_err(|e| self.damage.classify(d, extent, e))?
        {
            let (tx, rx) = mpsc::channel(1);
            if !data.is_empty() {
                let _ = tx.try_send(Ok(data));
            }
            return Ok(Opened {
                size: Some(blob_size),
                rx,
            });
        }
        // One blocking task streams the extent (`Store::stream_extent`: the store's own chunk
        // buffers, no copy) while the client keeps up; the bounded channel is the
        // backpressure. A piece's slot in the channel is taken before its chunk is read, so a
        // reader waiting for its client holds no chunk (a stream holds what is queued and
        // what the transport has, and beyond its first piece only what the shared read-ahead
        // lets it: see `Flight`). A client that stops reading for STALL gets its thread taken
        // back: the task ends, and a fresh one resumes once there is room.
        let (tx, rx) = mpsc::channel(DEPTH);
        let store = self.store.clone();
        let handle = tokio::runtime::Handle::current();
        let d = d.clone();
        let (pool, flight) = (self.ahead.clone(), Arc::new(Flight::default()));
        let damage = self.damage.clone();
        tokio::spawn(async move {
            let (mut pos, end) = (offset as u64, end as u64);
            while pos < end {
                let Some((slot, credit)) = flight.due(tx.clone(), &pool).await else {
                    return;
                };
                let (s, h, from) = (store.clone(), handle.clone(), pos);
                let (pool, flight) = (pool.clone(), flight.clone());
                let ran = tokio::task::spawn_blocking(move || {
                    let (mut at, mut next) = (from, Some((slot, credit)));
                    let r = s.stream_extent(extent, from, end, piece, &mut |b| {
                        let Some((permit, credit)) = next.take() else {
                            return false;
                        };
                        at += b.len() as u64;
                        let tx = permit.send(Ok(flight.track(b, credit)));
                        if at >= end {
                            return true;
                        }
                        match h.block_on(tokio::time::timeout(STALL, flight.due(tx, &pool))) {
                            Ok(Some(n)) => {
                                next = Some(n);
                                true
                            }
                            // Closed, or stalled: either way this thread goes back.
                            _ => false,
                        }
                    });
                    (at, r)
                })
                .await;
                match ran {
                    Ok((at, Ok(()))) => pos = at,
                    Ok((_, Err(e))) => {
                        let _ = tx.send(Err(damage.classify(&d, extent, e))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Error::internal(format!("read task failed: {e}"))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Opened {
            size: Some(blob_size),
            rx,
        })
    }

    /// Streams a live ingest as it lands, then the committed blob.
    fn follow(
        &self,
        scope: &Scope,
        d: &Digest,
        mut live: tokio::sync::watch::Receiver<LiveState>,
        offset: i64,
        size: i64,
        piece: usize,
    ) -> Result<Opened> {
        let total = live.borrow().total;
        if total > 0 && offset > total {
            return Err(out_of_range(offset, total));
        }
        let (tx, rx) = mpsc::channel(DEPTH);
        let store = self.store.clone();
        let (scope, d) = (scope.clone(), d.clone());
        tokio::spawn(async move {
            let mut pos = offset;
            let want_end = if size > 0 {
                Some(offset.saturating_add(size))
            } else {
                None
            };
            loop {
                let st = live.borrow_and_update().clone();
                let end = match (want_end, st.total) {
                    (Some(w), t) if t > 0 => w.min(t),
                    (Some(w), _) => w,
                    (None, t) if t > 0 => t,
                    (None, _) => i64::MAX,
                };
                // A read to the end of the blob ends only with the upload's verdict, so a
                // reader never takes unverified bytes for the blob. (A read of a range that
                // ends earlier is served as it lands, like an upstream Range read.)
                if pos >= end && (want_end.is_some_and(|w| st.total <= 0 || w < st.total)) {
                    return;
                }
                if let Some(result) = st.end {
                    match result {
                        // Committed: the rest comes from the blob (its extent may differ
                        // when another upload of the same digest committed first).
                        Ok(()) => match store.locate(&scope, &d) {
                            Ok(loc) => {
                                let end = want_end.map_or(loc.size, |w| w.min(loc.size));
                                if let Err(e) = pump(&store, loc.extent, pos, end, piece, &tx).await
                                {
                                    let _ = tx.send(Err(e)).await;
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                            }
                        },
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                        }
                    }
                    return;
                }
                let upto = st.offset.min(end);
                if upto > pos && pos < end {
                    match pump(&store, st.extent, pos, upto, piece, &tx).await {
                        Ok(n) => pos = n,
                        Err(e) => {
                            // Bytes vanished under us: the ingest restarted or was aborted,
                            // and its end says which.
                            let _ = live.changed().await;
                            let end = live.borrow().end.clone();
                            let _ = tx
                                .send(Err(match end {
                                    Some(Err(e2)) => e2,
                                    _ => e,
                                }))
                                .await;
                            return;
                        }
                    }
                    continue;
                }
                if live.changed().await.is_err() {
                    let _ = tx
                        .send(Err(Error::unavailable(format!(
                            "the upload of {d} went away at offset {pos}; retry"
                        ))))
                        .await;
                    return;
                }
            }
        });
        Ok(Opened {
            size: (total > 0).then_some(total),
            rx,
        })
    }

    /// Streams a blob an on-demand fetch is bringing in: frames from the fetch's tee as they
    /// come off the network, stored bytes for a reader behind the tee, and the committed blob
    /// once the fetch has finished. A read to the end of the blob ends only with the fetch's
    /// verified commit (an error if the bytes were wrong), like [`Reads::follow`].
    #[allow(clippy::too_many_arguments)]
    fn follow_fetch(
        &self,
        scope: &Scope,
        d: &Digest,
        tee: Arc<Tee>,
        mut phase: tokio::sync::watch::Receiver<FetchPhase>,
        offset: i64,
        size: i64,
        blob_size: i64,
        piece: usize,
    ) -> Opened {
        let (tx, rx) = mpsc::channel(1);
        let store = self.store.clone();
        let (scope, d) = (scope.clone(), d.clone());
        let mut window = tee.changed();
        tokio::spawn(async move {
            let mut pos = offset;
            let want_end = (size > 0).then(|| offset.saturating_add(size));
            loop {
                // Seen before anything is looked at, so no change is missed.
                window.borrow_and_update();
                let known_end = match (want_end, blob_size) {
                    (Some(w), b) if b > 0 => Some(w.min(b)),
                    (w, b) => w.or((b > 0).then_some(b)),
                };
                // A range ending before the blob's end is done when its bytes are; a read to
                // the end, once every byte arrived and hashed to the digest (or on the fetch's
                // verdict below).
                if let Some(e) = known_end
                    && pos >= e
                    && (e < blob_size || tee.is_verified())
                {
                    return;
                }
                let done = phase.borrow_and_update().clone();
                if let FetchPhase::Done(verdict) = done {
                    // Finished: whatever is left comes from the committed blob.
                    let r = match verdict {
                        Ok(()) => match store.locate(&scope, &d) {
                            Ok(loc) => {
                                let end = want_end.map_or(loc.size, |w| w.min(loc.size));
                                pump(&store, loc.extent, pos, end, piece, &tx)
                                    .await
                                    .map(|_| ())
                            }
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    };
                    if let Err(e) = r {
                        let _ = tx.send(Err(e)).await;
                    }
                    return;
                }
                let cap = known_end.map_or(piece, |e| (e - pos).clamp(0, piece as i64) as usize);
                if cap > 0 {
                    match tee.at(pos, cap) {
                        At::Data(b) => {
                            pos += b.len() as i64;
                            if tx.send(Ok(b)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        At::Behind => {
                            // Stored already: the fetch's ingest holds it.
                            if let Some(live) = store.live(&scope, &d) {
                                let st = live.borrow().clone();
                                let upto = known_end.map_or(st.offset, |e| e.min(st.offset));
                                // An error means the ingest moved (committed or restarted):
                                // look again.
                                if upto > pos
                                    && let Ok(n) =
                                        pump(&store, st.extent, pos, upto, piece, &tx).await
                                {
                                    pos = n;
                                    continue;
                                }
                            }
                        }
                        At::Wait => {}
                    }
                }
                tokio::select! {
                    r = window.changed() => { let _ = r; }
                    r = phase.changed() => {
                        if r.is_err() {
                            let _ = tx.send(Err(Error::unavailable(format!(
                                "the fetch of {d} went away at offset {pos}; retry"
                            )))).await;
                            return;
                        }
                    }
                    // A reader behind the window waits on the store, which the tee does
                    // not announce.
                    _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                }
            }
        });
        Opened {
            size: (blob_size > 0).then_some(blob_size),
            rx,
        }
    }

    /// A read served straight from the upstream with a Range request.
    #[allow(clippy::too_many_arguments)]
    async fn ranged(
        &self,
        puller: &Arc<Puller>,
        src: &Source,
        d: &Digest,
        offset: i64,
        size: i64,
        blob_size: i64,
        piece: usize,
    ) -> Result<Opened> {
        let len = if size > 0 {
            let s = if blob_size > 0 {
                size.min(blob_size - offset)
            } else {
                size
            };
            Some(s.max(0) as u64)
        } else if blob_size > 0 {
            Some((blob_size - offset) as u64)
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(DEPTH);
        if len == Some(0) {
            return Ok(Opened {
                size: Some(blob_size),
                rx,
            });
        }
        let body = puller.upstream().blob(src, d, offset as u64, len).await?;
        tokio::spawn(async move {
            let mut s = body.stream;
            let mut buf = bytes::BytesMut::new();
            while let Some(item) = s.next().await {
                match item {
                    Ok(b) => {
                        buf.extend_from_slice(&b);
                        while buf.len() >= piece {
                            if tx.send(Ok(buf.split_to(piece).freeze())).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            if !buf.is_empty() {
                let _ = tx.send(Ok(buf.freeze())).await;
            }
        });
        Ok(Opened {
            size: (blob_size > 0).then_some(blob_size),
            rx,
        })
    }
}

fn src_of(r: &crate::store::SourceRecord) -> Source {
    Source {
        registry: r.registry.clone(),
        repository: r.repository.clone(),
    }
}

fn end_of(offset: i64, size: i64, blob_size: i64) -> i64 {
    if size <= 0 || offset.saturating_add(size) > blob_size {
        blob_size
    } else {
        offset + size
    }
}

fn out_of_range(offset: i64, size: i64) -> Error {
    Error::out_of_range(format!(
        "read past object length: offset {offset}, size {size}"
    ))
}

/// Streams `[from, to)` of an extent into `tx` from a blocking thread; returns where it
/// stopped.
async fn pump(
    store: &Arc<Store>,
    extent: u64,
    from: i64,
    to: i64,
    piece: usize,
    tx: &mpsc::Sender<Result<Bytes>>,
) -> Result<i64> {
    let store = store.clone();
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let mut pos = from;
        store.stream_extent(extent, from as u64, to as u64, piece, &mut |data| {
            pos += data.len() as i64;
            tx.blocking_send(Ok(data)).is_ok()
        })?;
        Ok(pos)
    })
    .await
    .map_err(|e| Error::internal(format!("read task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Algorithm;
    use crate::kv::mem::MemKv;

    async fn put_in_pieces(store: &Arc<Store>, scope: &Scope, data: &[u8], piece: usize) -> Digest {
        let d = Digest::of(Algorithm::Sha256, data);
        let mut w = store
            .open_writer(scope.clone(), "r", data.len() as i64, Some(d.clone()), None)
            .await
            .unwrap();
        let mut off = 0;
        for p in data.chunks(piece) {
            w.write(off as i64, p).unwrap();
            off += p.len();
        }
        w.commit(data.len() as i64, Some(d.clone()), None).unwrap();
        d
    }

    async fn read(
        reads: &Reads,
        scope: &Scope,
        d: &Digest,
        off: i64,
        size: i64,
        piece: usize,
    ) -> Vec<Vec<u8>> {
        let mut o = reads.open(scope, d, off, size, piece).await.unwrap();
        let mut got = Vec::new();
        // Copied, so each piece is let go of as a transport would (see `Opened`).
        while let Some(b) = o.rx.recv().await {
            got.push(b.unwrap().to_vec());
        }
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_shape_of_blob_and_range_reads_back_exactly() {
        let store = Store::open(Arc::new(MemKv::default())).unwrap();
        let reads = Reads::new(store.clone(), None, 4 * CHUNK);
        let scope = Scope::namespace("n").unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        // One chunk (the point-lookup path) and the same bytes in many chunks (streamed).
        let one = put_in_pieces(&store, &scope, &data, data.len()).await;
        let other: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
        let many = put_in_pieces(&store, &scope, &other, 100).await;
        for (d, bytes) in [(&one, &data), (&many, &other)] {
            for (off, size) in [(0, 0), (0, 3000), (7, 0), (100, 250), (2999, 5), (3000, 0)] {
                let got: Vec<u8> = read(&reads, &scope, d, off, size, 1 << 20).await.concat();
                let end = if size == 0 {
                    3000
                } else {
                    (off + size).min(3000)
                } as usize;
                assert_eq!(got, &bytes[off as usize..end], "{d} @{off}+{size}");
            }
        }
        assert!(
            reads
                .open(&scope, &one, 3001, 0, 1 << 20)
                .await
                .err()
                .unwrap()
                .is(Kind::OutOfRange)
        );
        // A large blob arrives in pieces of the requested size, shorter only where a stored
        // chunk ends (those are handed out without a copy) or at the end.
        let big: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i % 253) as u8).collect();
        let d = put_in_pieces(&store, &scope, &big, 1 << 20).await;
        let got = read(&reads, &scope, &d, 5, 0, 100_000).await;
        let mut at = 5;
        for p in &got {
            assert!(p.len() <= 100_000);
            at += p.len();
            assert!(
                p.len() == 100_000 || at % CHUNK == 0 || at == big.len(),
                "{at}"
            );
        }
        assert_eq!(got.concat(), &big[5..]);
        // Small chunks are gathered into full pieces.
        let small = put_in_pieces(&store, &scope, &other.repeat(40), 1000).await;
        let got = read(&reads, &scope, &small, 3, 0, 10_000).await;
        assert!(got[..got.len() - 1].iter().all(|p| p.len() == 10_000));
        assert_eq!(got.concat(), &other.repeat(40)[3..]);
        // A reader that stalls past STALL twice (its thread is taken back each time) still
        // gets every byte, in order.
        let mut o = reads.open(&scope, &d, 0, 0, 50_000).await.unwrap();
        let mut all = Vec::new();
        for i in 0.. {
            if i == 1 || i == 9 {
                tokio::time::sleep(STALL * 2).await;
            }
            match o.rx.recv().await {
                Some(b) => all.extend_from_slice(&b.unwrap()),
                None => break,
            }
        }
        assert_eq!(all, big);
        // A reader that goes away ends the stream's work.
        let o = reads.open(&scope, &d, 0, 0, 1000).await.unwrap();
        drop(o);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blob_collected_under_its_reader_ends_the_stream_not_found() {
        let config = crate::store::StoreConfig {
            gc_grace: std::time::Duration::ZERO,
            ..Default::default()
        };
        let store = Store::open_with(Arc::new(MemKv::default()), config).unwrap();
        let reads = Reads::new(store.clone(), None, 4 * CHUNK);
        let scope = Scope::namespace("n").unwrap();
        let big: Vec<u8> = (0..(16 * CHUNK)).map(|i| (i % 249) as u8).collect();
        let d = put_in_pieces(&store, &scope, &big, 1 << 20).await;
        let mut o = reads.open(&scope, &d, 0, 0, CHUNK).await.unwrap();
        let first = o.rx.recv().await.unwrap().unwrap();
        assert_eq!(first, &big[..CHUNK]);
        // The reader holds the stream open while the blob is deleted and collected.
        assert!(store.delete(&scope, &d).unwrap());
        let s = store.clone();
        let run = tokio::task::spawn_blocking(move || s.collect(false))
            .await
            .unwrap()
            .unwrap();
        assert!(run.swept.contains(&d));
        let mut got = first.len();
        let err = loop {
            match o.rx.recv().await {
                Some(Ok(b)) => got += b.len(),
                Some(Err(e)) => break e,
                None => panic!("the stream ended without an error after {got} bytes"),
            }
        };
        assert!(got < big.len());
        assert!(err.is(Kind::NotFound), "{err}");
        assert!(
            err.to_string().contains("deleted while it was being read"),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_that_stop_reading_hold_one_piece_each_and_the_pool() {
        let store = Store::open(Arc::new(MemKv::default())).unwrap();
        let reads = Reads::new(store.clone(), None, 2 * CHUNK);
        let scope = Scope::namespace("n").unwrap();
        let big: Vec<u8> = (0..(12 * CHUNK)).map(|i| (i % 241) as u8).collect();
        let d = put_in_pieces(&store, &scope, &big, 1 << 20).await;
        // Six clients open a read and take nothing: each gets its own first piece, and the
        // pool's two pieces go to whichever asks first; nothing more is read for them.
        let mut idle = Vec::new();
        for _ in 0..6 {
            idle.push(reads.open(&scope, &d, 0, 0, CHUNK).await.unwrap());
        }
        tokio::time::sleep(STALL * 3).await;
        let queued: usize = idle.iter().map(|o| o.rx.len()).sum();
        assert_eq!(
            queued,
            6 + 2,
            "pieces read ahead for clients that take nothing"
        );
        assert_eq!(reads.ahead.available_permits(), 0);
        // With the pool used up, another client still reads its whole blob, in order.
        let got = read(&reads, &scope, &d, 0, 0, CHUNK).await.concat();
        assert_eq!(got, big);
        // The idle ones resume and finish; every permit comes back.
        for mut o in idle {
            let mut all = Vec::new();
            while let Some(b) = o.rx.recv().await {
                all.extend_from_slice(&b.unwrap());
            }
            assert_eq!(all, big);
        }
        assert_eq!(reads.ahead.available_permits(), 2);
    }

    const CHUNK: usize = crate::store::CHUNK_SIZE;
}
