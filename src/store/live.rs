//! Live ingests: readers of a blob that is still arriving.
//!
//! A writer that knows the digest it will commit (an expected digest from the client, or an
//! upstream fetch) registers a [`LiveIngest`] and publishes its progress after every flush:
//! bytes up to the published offset are in the store and readable from the published extent.
//! The entry ends exactly once — committed (readers continue from the blob), or failed with
//! the error a reader should see (aborted, failed verification, writer gone).
//!
//! Visibility follows the content rules: a namespace reads live ingests of its own namespace;
//! a backend tenant reads any (it can read every stored blob too).

use std::sync::Arc;

use tokio::sync::watch;

use super::{Scope, Store};
use crate::digest::Digest;
use crate::error::Error;

/// What a reader of a live ingest sees.
#[derive(Debug, Clone)]
pub struct LiveState {
    /// Where the ingest's bytes are stored.
    pub extent: u64,
    /// Bytes `[0, offset)` are stored and readable.
    pub offset: i64,
    /// The expected size, when known (0 otherwise).
    pub total: i64,
    /// Set once: `Ok` when the blob committed, else what went wrong.
    pub end: Option<Result<(), Error>>,
}

pub struct LiveIngest {
    scope: Scope,
    digest: Digest,
    tx: watch::Sender<LiveState>,
}

impl LiveIngest {
    pub(super) fn publish(&self, extent: u64, offset: i64, total: i64) {
        self.tx.send_if_modified(|s| {
            let changed = s.extent != extent || s.offset != offset || s.total != total;
            (s.extent, s.offset, s.total) = (extent, offset, total);
            changed
        });
    }
}

impl Store {
    /// Registers the live ingest of `d` in `scope`, unless one is already live (a second
    /// upload of the same digest then simply is not followed by readers).
    pub(super) fn live_register(
        &self,
        scope: &Scope,
        d: &Digest,
        extent: u64,
        offset: i64,
        total: i64,
    ) -> Option<Arc<LiveIngest>> {
        let mut live = self.live.lock();
        let entries = live.entry(d.clone()).or_default();
        if entries.iter().any(|e| e.scope == *scope) {
            return None;
        }
        let (tx, _) = watch::channel(LiveState {
            extent,
            offset,
            total,
            end: None,
        });
        let e = Arc::new(LiveIngest {
            scope: scope.clone(),
            digest: d.clone(),
            tx,
        });
        entries.push(e.clone());
        Some(e)
    }

    /// Ends a live ingest: readers see `result` and no new reader attaches.
    pub(super) fn live_end(&self, e: &Arc<LiveIngest>, result: Result<(), Error>) {
        {
            let mut live = self.live.lock();
            if let Some(entries) = live.get_mut(&e.digest) {
                entries.retain(|x| !Arc::ptr_eq(x, e));
                if entries.is_empty() {
                    live.remove(&e.digest);
                }
            }
        }
        e.tx.send_modify(|s| {
            if s.end.is_none() {
                s.end = Some(result);
            }
        });
    }

    /// Follows the live ingest of `d` that `scope` may read, if any.
    pub fn live(&self, scope: &Scope, d: &Digest) -> Option<watch::Receiver<LiveState>> {
        let live = self.live.lock();
        let entries = live.get(d)?;
        entries
            .iter()
            .find(|e| e.scope == *scope)
            .or_else(|| entries.iter().find(|_| scope.is_tenant()))
            .map(|e| e.tx.subscribe())
    }
}
