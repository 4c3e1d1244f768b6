//! The read path of one blob, wherever its bytes are: stored, still arriving (a live
//! ingest), or only upstream (a lazy blob from a pull).
//!
//! Every path yields pieces of at most `piece` bytes through a bounded channel, so a
//! stream's memory is a few pieces whatever the blob's size, and a slow reader slows only
//! itself. A lazy blob is fetched once (see `upstream::pull`, single flight) and readers
//! follow the fetch as it lands; a read far ahead of what has landed is served at once by an
//! upstream Range request while the whole blob fills in behind it.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::digest::Digest;
use crate::error::{Error, Kind, Result};
use crate::store::{LiveState, Scope, Store};
use crate::upstream::Source;
use crate::upstream::pull::{FetchPhase, Puller};

/// Messages in flight per stream.
const DEPTH: usize = 4;
/// A read starting this far beyond what a fetch has landed goes to the upstream directly.
const AHEAD: i64 = 4 << 20;

pub struct Reads {
    store: Arc<Store>,
    puller: Option<Arc<Puller>>,
}

/// An open read: the blob's size when known, and its bytes from the requested offset.
pub struct Opened {
    pub size: Option<i64>,
    pub rx: mpsc::Receiver<Result<Bytes>>,
}

impl Reads {
    pub fn new(store: Arc<Store>, puller: Option<Arc<Puller>>) -> Arc<Reads> {
        Arc::new(Reads { store, puller })
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
            Ok(loc) => return self.stored(loc.extent, loc.size, offset, size, piece),
            Err(e) if e.is(Kind::NotFound) => {}
            Err(e) => return Err(e),
        }
        if let Some(rx) = self.store.live(scope, d) {
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
        let mut phase = puller.ensure_fetch(scope, d)?;
        loop {
            let now = phase.borrow_and_update().clone();
            match now {
                FetchPhase::Starting => {}
                FetchPhase::Live => {
                    if let Some(rx) = self.store.live(scope, d) {
                        let landed = rx.borrow().offset;
                        if offset > landed + AHEAD {
                            return self
                                .ranged(puller, &src_of(&src), d, offset, size, src.size, piece)
                                .await;
                        }
                        return self.follow(scope, d, rx, offset, size, piece);
                    }
                    if let Ok(loc) = self.store.locate(scope, d) {
                        return self.stored(loc.extent, loc.size, offset, size, piece);
                    }
                }
                FetchPhase::Done(Ok(())) => {
                    let loc = self.store.locate(scope, d)?;
                    return self.stored(loc.extent, loc.size, offset, size, piece);
                }
                FetchPhase::Done(Err(e)) => return Err(e),
            }
            if offset > AHEAD {
                // Nothing has landed yet and the read is well into the blob.
                return self
                    .ranged(puller, &src_of(&src), d, offset, size, src.size, piece)
                    .await;
            }
            if phase.changed().await.is_err() {
                // The fetch task ended without a final word; whatever it left is stored or not.
                let loc = self.store.locate(scope, d)?;
                return self.stored(loc.extent, loc.size, offset, size, piece);
            }
        }
    }

    fn stored(
        &self,
        extent: u64,
        blob_size: i64,
        offset: i64,
        size: i64,
        piece: usize,
    ) -> Result<Opened> {
        if offset > blob_size {
            return Err(out_of_range(offset, blob_size));
        }
        let (tx, rx) = mpsc::channel(DEPTH);
        let end = end_of(offset, size, blob_size);
        let store = self.store.clone();
        // One storage iterator serves the whole stream from a blocking thread; the bounded
        // channel is the backpressure.
        tokio::task::spawn_blocking(move || {
            let r = store.stream_extent(extent, offset as u64, end as u64, piece, &mut |data| {
                tx.blocking_send(Ok(data)).is_ok()
            });
            if let Err(e) = r {
                let _ = tx.blocking_send(Err(e));
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
