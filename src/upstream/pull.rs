//! Pulling images from upstream registries, and fetching lazy blobs on demand.
//!
//! A pull resolves a reference, stores the index, manifests and configs, records every
//! blob's source (registry + repository, per scope), creates the image root, and either
//! fetches the layers or leaves them lazy. Everything enters the store through the one write
//! path ([`crate::store::Writer`]), which verifies the digest before commit: bytes from an
//! upstream are never trusted.
//!
//! Single flight. On-demand fetches are keyed by (scope, digest): however many readers ask
//! for a lazy blob, one fetch runs, and readers follow its live ingest. An interrupted fetch
//! leaves its ingest (ref `fetch-DIGEST`) to be resumed with a Range request, by a retry in
//! the same fetch or by the next one; bytes that fail verification are discarded, never
//! resumed from.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::tee::Tee;
use super::{Source, Upstream, parse_reference};
use crate::digest::Digest;
use crate::error::{Error, Kind, Result};
use crate::graph::{self, Kind as DocKind, Role};
use crate::store::{
    AsyncWriter, Gather, ImageRecord, Scope, SourceRecord, Store, blocking, is_exists, now_ns,
};

/// What happened to one blob of a pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobState {
    /// The reference resolved to this root.
    Resolved,
    /// Fetched and stored.
    Stored,
    /// Already stored: nothing fetched.
    Exists,
    /// Left upstream; a read fetches it.
    Lazy,
}

/// What a pull reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Blob {
        state: BlobState,
        digest: Digest,
        media_type: String,
        size: i64,
    },
    /// Not fetched, with the reason (foreign layers, platforms not asked for).
    Skipped {
        digest: Digest,
        media_type: String,
        size: i64,
        reason: String,
    },
    /// Bytes of a blob so far.
    Fetching {
        digest: Digest,
        offset: i64,
        size: i64,
    },
    /// The image record now points at the root.
    Done { image: String, digest: Digest },
}

/// How a pull treats layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Eager,
    Lazy,
}

#[derive(Debug, Clone)]
pub struct PullRequest {
    pub reference: String,
    /// `os/arch[/variant]`; empty means every platform.
    pub platforms: Vec<String>,
    pub mode: Mode,
    /// The image record's name; defaults to the reference.
    pub image_name: Option<String>,
}

/// Where an on-demand fetch is.
#[derive(Debug, Clone)]
pub enum FetchPhase {
    /// Under way: readers take arriving bytes from the fetch's [`Tee`].
    Running,
    /// Finished: committed, or failed with this error.
    Done(std::result::Result<(), Error>),
}

/// An on-demand fetch in progress: its phase, and its window of arriving bytes.
type Fetching = (watch::Receiver<FetchPhase>, Arc<Tee>);

pub struct Puller {
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    fetching: Mutex<HashMap<(Scope, Digest), Fetching>>,
}

/// How long a pull's temporary lease lives if the daemon dies mid-pull.
const PULL_LEASE_SECS: i64 = 3600;
/// Upstream body pieces are gathered up to this size before each store write.
const GATHER: usize = 1 << 20;
/// Bytes read off the network ahead of the store writes, so the network keeps going while a
/// write (or a flush beside it) holds the store up. Bounded in bytes, not frames: an
/// upstream's frames vary (a loopback registry's average 340 KiB, measured), and the 64
/// frames this once allowed, plus as many taken into the store loop, let about 43 MiB wait.
/// Measured on loopback, where the network outruns the store: a 50 MiB miss through the
/// registry API took 89 ms at 4 MiB, 81 at 16, 56 at 32, 62-66 with the frame bound.
const AHEAD: usize = 32 << 20;

impl Event {
    fn blob(state: BlobState, digest: Digest, media_type: impl Into<String>, size: i64) -> Event {
        Event::Blob {
            state,
            digest,
            media_type: media_type.into(),
            size,
        }
    }
}

impl Puller {
    pub fn new(store: Arc<Store>, upstream: Arc<Upstream>) -> Arc<Puller> {
        Arc::new(Puller {
            store,
            upstream,
            fetching: Mutex::new(HashMap::new()),
        })
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// A lease that expires on its own after `PULL_LEASE_SECS` (if we die before
    /// [`Self::end_lease`]), holding what a pull or mirror fetch stores until its image
    /// record exists.
    async fn temp_lease(&self, scope: &Scope, what: &str) -> Result<String> {
        let lease = format!("{what}-{}", now_ns());
        let labels = HashMap::from([(
            "containerd.io/gc.expire".to_string(),
            rfc3339(now_ns() / 1_000_000_000 + PULL_LEASE_SECS),
        )]);
        let (store, sc, l) = (self.store.clone(), scope.clone(), lease.clone());
        blocking(move || store.create_lease(&sc, &l, labels).map(|_| ())).await?;
        Ok(lease)
    }

    async fn end_lease(&self, scope: &Scope, lease: String) {
        let (store, sc, l) = (self.store.clone(), scope.clone(), lease.clone());
        if let Err(e) = blocking(move || store.delete_lease(&sc, &l)).await {
            tracing::warn!(lease, error = %e, "could not delete a temporary lease");
        }
    }

    /// Pulls `req` into `scope`, reporting progress on `events`.
    pub async fn pull(
        self: &Arc<Self>,
        scope: &Scope,
        req: PullRequest,
        events: mpsc::Sender<Event>,
    ) -> Result<ImageRecord> {
        let (src, at) = parse_reference(&req.reference)?;
        for p in &req.platforms {
            if p.split('/').count() < 2 || p.split('/').any(str::is_empty) {
                return Err(Error::invalid(format!(
                    "platform {p:?}: expected os/architecture[/variant]"
                )));
            }
        }
        // Everything this pull stores is held by a lease until the image record exists, so a
        // collection in between cannot take it (the lease expires on its own if we die).
        let lease = self.temp_lease(scope, "pull").await?;
        let r = self
            .pull_leased(scope, &req, &src, &at, &lease, &events)
            .await;
        self.end_lease(scope, lease).await;
        r
    }

    async fn pull_leased(
        self: &Arc<Self>,
        scope: &Scope,
        req: &PullRequest,
        src: &Source,
        at: &str,
        lease: &str,
        events: &mpsc::Sender<Event>,
    ) -> Result<ImageRecord> {
        let (root_bytes, root) = self.upstream.manifest(src, at).await?;
        let root_doc = graph::parse(None, &root_bytes);
        let root_type = root_doc.media_type.clone().unwrap_or_default();
        let root_size = root_bytes.len() as i64;
        let _ = events
            .send(Event::blob(
                BlobState::Resolved,
                root.clone(),
                root_type.clone(),
                root_size,
            ))
            .await;
        self.store_document(
            scope,
            src,
            lease,
            &root,
            &root_type,
            root_bytes.clone(),
            events,
        )
        .await?;

        let mut layers: Vec<(Digest, String, i64)> = Vec::new();
        let mut seen = HashSet::from([root.clone()]);
        let mut docs = vec![(root.clone(), root_doc)];
        while let Some((_, doc)) = docs.pop() {
            match doc.kind {
                DocKind::Index => {
                    for e in doc.edges.iter().filter(|e| e.role == Role::Manifest) {
                        if !seen.insert(e.digest.clone()) {
                            continue;
                        }
                        if !platform_wanted(&req.platforms, e.platform.as_deref()) {
                            let _ = events
                                .send(Event::Skipped {
                                    digest: e.digest.clone(),
                                    media_type: e.media_type.clone(),
                                    size: e.size,
                                    reason: format!(
                                        "platform {} not requested",
                                        e.platform.as_deref().unwrap_or("(none)")
                                    ),
                                })
                                .await;
                            continue;
                        }
                        let bytes = self
                            .document(scope, src, lease, &e.digest, &e.media_type, events)
                            .await?;
                        docs.push((e.digest.clone(), graph::parse(Some(&e.media_type), &bytes)));
                    }
                }
                DocKind::Manifest => {
                    for e in &doc.edges {
                        if e.role == Role::Subject || !seen.insert(e.digest.clone()) {
                            continue;
                        }
                        let rec = SourceRecord {
                            registry: src.registry.clone(),
                            repository: src.repository.clone(),
                            media_type: e.media_type.clone(),
                            size: e.size,
                            created_ns: now_ns(),
                        };
                        let foreign = !e.urls.is_empty()
                            || e.media_type.contains("nondistributable")
                            || e.media_type.contains("foreign");
                        if foreign {
                            let _ = events
                                .send(Event::Skipped {
                                    digest: e.digest.clone(),
                                    media_type: e.media_type.clone(),
                                    size: e.size,
                                    reason: "non-distributable layer".into(),
                                })
                                .await;
                            continue;
                        }
                        let (store, sc, d) = (self.store.clone(), scope.clone(), e.digest.clone());
                        blocking(move || store.put_source(&sc, &d, &rec)).await?;
                        if e.role == Role::Config {
                            self.fetch_blob(
                                scope,
                                src,
                                lease,
                                &e.digest,
                                e.size,
                                &e.media_type,
                                events,
                            )
                            .await?;
                        } else if req.mode == Mode::Lazy {
                            let (store, sc, d) =
                                (self.store.clone(), scope.clone(), e.digest.clone());
                            let exists = blocking(move || Ok(store.info(&sc, &d).is_ok())).await?;
                            let state = if exists {
                                BlobState::Exists
                            } else {
                                BlobState::Lazy
                            };
                            let _ = events
                                .send(Event::blob(
                                    state,
                                    e.digest.clone(),
                                    e.media_type.clone(),
                                    e.size,
                                ))
                                .await;
                        } else {
                            layers.push((e.digest.clone(), e.media_type.clone(), e.size));
                        }
                    }
                }
                DocKind::Opaque => {}
            }
        }

        let n = self.upstream.config().max_concurrent_downloads;
        let mut fetches = futures::stream::iter(layers.into_iter().map(|(d, mt, size)| {
            let me = self.clone();
            let (scope, src, lease, events) = (
                scope.clone(),
                src.clone(),
                lease.to_string(),
                events.clone(),
            );
            async move {
                me.fetch_blob(&scope, &src, &lease, &d, size, &mt, &events)
                    .await
            }
        }))
        .buffer_unordered(n);
        while let Some(r) = fetches.next().await {
            r?;
        }

        let name = req
            .image_name
            .clone()
            .unwrap_or_else(|| req.reference.clone());
        let img = ImageRecord {
            name: name.clone(),
            media_type: root_type,
            digest: root.to_string(),
            size: root_size,
            ..Default::default()
        };
        let (store, sc) = (self.store.clone(), scope.clone());
        let img = blocking(move || store.create_or_move_image(&sc, img, false)).await?;
        let _ = events
            .send(Event::Done {
                image: name,
                digest: root,
            })
            .await;
        Ok(img)
    }

    /// Fetches one manifest or index (by tag or digest) for a registry mirror and stores it
    /// through the write path, recording where each of its children can be fetched, so they
    /// are fetched when (and only when) a client asks. With `hold_as`, the image record of
    /// that name points at it (created or moved), labelled with the time it was checked.
    /// Nothing else is fetched: a mirror serves the manifest at once.
    pub async fn mirror_manifest(
        self: &Arc<Self>,
        scope: &Scope,
        src: &Source,
        reference: &str,
        hold_as: Option<(String, HashMap<String, String>)>,
    ) -> Result<(Digest, String, Bytes)> {
        let (bytes, d) = self.upstream.manifest(src, reference).await?;
        if reference.contains(':') && d.to_string() != reference {
            return Err(Error::data_loss(format!(
                "upstream {} served manifest {d} for {reference}",
                src.registry
            )));
        }
        let doc = graph::parse(None, &bytes);
        if doc.kind == DocKind::Opaque {
            return Err(Error::invalid(format!(
                "upstream {}/{}:{reference} is not a manifest or index contentd understands",
                src.registry, src.repository
            )));
        }
        let media_type = doc.media_type.clone().unwrap_or_default();
        let lease = self.temp_lease(scope, "mirror").await?;
        let r = async {
            let (events, _) = mpsc::channel(1);
            self.store_document(scope, src, &lease, &d, &media_type, bytes.clone(), &events)
                .await?;
            let records: Vec<(Digest, SourceRecord)> = doc
                .edges
                .iter()
                .filter(|e| e.role != Role::Subject && e.urls.is_empty())
                .map(|e| {
                    let rec = SourceRecord {
                        registry: src.registry.clone(),
                        repository: src.repository.clone(),
                        media_type: e.media_type.clone(),
                        size: e.size,
                        created_ns: now_ns(),
                    };
                    (e.digest.clone(), rec)
                })
                .collect();
            let (store, sc) = (self.store.clone(), scope.clone());
            let img = hold_as.map(|(name, labels)| ImageRecord {
                name,
                media_type: media_type.clone(),
                digest: d.to_string(),
                size: bytes.len() as i64,
                labels,
                ..Default::default()
            });
            blocking(move || {
                // Refreshed even when known: the collector drops a source only once it is
                // old and nothing reaches it, and this image is about to reach it.
                store.put_sources(&sc, &records)?;
                if let Some(img) = img {
                    store.create_or_move_image(&sc, img, true)?;
                }
                Ok(())
            })
            .await
        }
        .await;
        self.end_lease(scope, lease).await;
        r.map(|()| (d, media_type, bytes))
    }

    /// A manifest or index by digest: from the store when present, else from upstream.
    async fn document(
        &self,
        scope: &Scope,
        src: &Source,
        lease: &str,
        d: &Digest,
        media_type: &str,
        events: &mpsc::Sender<Event>,
    ) -> Result<Bytes> {
        if let Ok(Some(loc)) = self.store.locate_linked(scope, d)
            && loc.size as usize <= graph::MAX_DOCUMENT
        {
            let (store, sc, l, d2) = (
                self.store.clone(),
                scope.clone(),
                lease.to_string(),
                d.to_string(),
            );
            let bytes = blocking(move || {
                let bytes = store.read_extent(loc.extent, 0, loc.size as usize)?;
                store.add_lease_resource(&sc, &l, "content", &d2)?;
                Ok(bytes)
            })
            .await?;
            let _ = events
                .send(Event::blob(
                    BlobState::Exists,
                    d.clone(),
                    media_type.to_string(),
                    loc.size,
                ))
                .await;
            return Ok(bytes);
        }
        let (bytes, got) = self.upstream.manifest(src, &d.to_string()).await?;
        if got != *d {
            return Err(Error::data_loss(format!(
                "upstream {} served manifest {got} for {d}",
                src.registry
            )));
        }
        self.store_document(scope, src, lease, d, media_type, bytes.clone(), events)
            .await?;
        Ok(bytes)
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_document(
        &self,
        scope: &Scope,
        src: &Source,
        lease: &str,
        d: &Digest,
        media_type: &str,
        bytes: Bytes,
        events: &mpsc::Sender<Event>,
    ) -> Result<()> {
        let rec = SourceRecord {
            registry: src.registry.clone(),
            repository: src.repository.clone(),
            media_type: media_type.to_string(),
            size: bytes.len() as i64,
            created_ns: now_ns(),
        };
        let (store, sc, d2) = (self.store.clone(), scope.clone(), d.clone());
        blocking(move || store.put_source(&sc, &d2, &rec)).await?;
        let size = bytes.len() as i64;
        let r = format!("fetch-{d}");
        let w = self
            .store
            .open_writer(
                scope.clone(),
                &r,
                size,
                Some(d.clone()),
                Some(lease.to_string()),
            )
            .await;
        let event = match w {
            Err(e) if is_exists(&e) => {
                Event::blob(BlobState::Exists, d.clone(), media_type.to_string(), size)
            }
            Err(e) => return Err(e),
            Ok(w) => {
                let mut w = AsyncWriter::new(w);
                let mt = (!media_type.is_empty()).then(|| media_type.to_string());
                let d2 = d.clone();
                match w
                    .step(move |w| {
                        w.set_media_type(mt);
                        w.write_bytes(0, bytes)?;
                        w.commit(size, Some(d2), None)
                    })
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_exists(&e) => {}
                    Err(e) => return Err(e),
                }
                Event::blob(BlobState::Stored, d.clone(), media_type.to_string(), size)
            }
        };
        let _ = events.send(event).await;
        Ok(())
    }

    /// Fetches a blob into the store through the write path, resuming with Range after an
    /// interruption, and verifying before commit.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_blob(
        &self,
        scope: &Scope,
        src: &Source,
        lease: &str,
        d: &Digest,
        size: i64,
        media_type: &str,
        events: &mpsc::Sender<Event>,
    ) -> Result<()> {
        let lease = (!lease.is_empty()).then(|| lease.to_string());
        let stored = self
            .fetch_into(scope, src, lease, d, size, media_type, Some(events), None)
            .await?;
        let _ = events
            .send(Event::blob(
                if stored {
                    BlobState::Stored
                } else {
                    BlobState::Exists
                },
                d.clone(),
                media_type.to_string(),
                size,
            ))
            .await;
        Ok(())
    }

    /// Counts a fetch and its bytes (by registry) for metrics.
    fn count_fetch(&self, src: &Source, r: &Result<bool>, bytes: i64) {
        let m = crate::metrics::get();
        let result = match r {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{:?}", e.kind()),
        };
        let registry = self.upstream.metric_label(&src.registry);
        m.upstream_fetches.add(&[registry, &result], 1);
        if bytes > 0 {
            m.upstream_bytes.add(&[registry], bytes as u64);
        }
    }

    /// The one upstream fetch loop. Returns false when the blob was already stored.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_into(
        &self,
        scope: &Scope,
        src: &Source,
        lease: Option<String>,
        d: &Digest,
        size: i64,
        media_type: &str,
        events: Option<&mpsc::Sender<Event>>,
        tee: Option<&Arc<Tee>>,
    ) -> Result<bool> {
        let r: Result<bool> = async {
            let r = format!("fetch-{d}");
            // With nothing stored yet the fetch starts at offset 0: the request goes out now,
            // overlapping the registry's latency with opening the ingest. Bytes another
            // namespace stored are linked by opening the writer, with no request at all.
            let early = match self.store.status(scope, &r) {
                Err(e) if e.is(Kind::NotFound) && !self.store.holds(d).unwrap_or(true) => {
                    let (up, src2, d2) = (self.upstream.clone(), src.clone(), d.clone());
                    Some(tokio::spawn(
                        async move { up.blob(&src2, &d2, 0, None).await },
                    ))
                }
                _ => None,
            };
            let w = match self
                .store
                .open_writer(scope.clone(), &r, size.max(0), Some(d.clone()), lease)
                .await
            {
                Ok(w) => w,
                Err(e) => {
                    if let Some(h) = early {
                        h.abort();
                    }
                    return if is_exists(&e) { Ok(false) } else { Err(e) };
                }
            };
            let mut w = AsyncWriter::new(w);
            let mt = (!media_type.is_empty()).then(|| media_type.to_string());
            w.step(move |w| {
                w.set_media_type(mt);
                Ok(())
            })
            .await?;
            let attempts = self.upstream.config().fetch_attempts;
            let mut attempt = 0;
            let mut early = early;
            loop {
                attempt += 1;
                let offset = w.step(|w| Ok(w.status()?.offset)).await?;
                let body = match early.take() {
                    Some(h) if offset == 0 => Some(
                        h.await
                            .map_err(|e| Error::internal(format!("fetch task failed: {e}")))?,
                    ),
                    Some(h) => {
                        h.abort();
                        None
                    }
                    None => None,
                };
                let r = if size > 0 && offset >= size {
                    Ok(())
                } else {
                    self.copy_body(&mut w, src, d, offset, size, events, body, tee)
                        .await
                };
                match r {
                    Ok(()) => break,
                    Err(e) if e.is(Kind::Unavailable) && attempt < attempts => {
                        let pause = Duration::from_millis(200 << attempt.min(5));
                        tracing::warn!(digest = %d, offset, attempt, error = %e, "upstream fetch interrupted; resuming");
                        tokio::time::sleep(pause).await;
                    }
                    // The ingest stays: the next fetch resumes where this one stopped. Readers
                    // following it learn why it stopped.
                    Err(e) => {
                        let e2 = e.clone();
                        let _ = w
                            .step(move |w| {
                                w.fail_live(e2);
                                Ok(())
                            })
                            .await;
                        return Err(e);
                    }
                }
            }
            // Every byte is here: if they hash to the digest, readers of the fetch may finish
            // now, while the commit makes the blob durable.
            if let Some(t) = tee {
                let st = w.step(|w| w.status()).await?;
                if st.offset == size && st.digest == *d {
                    t.verified();
                }
            }
            let d2 = d.clone();
            match w.step(move |w| w.commit(size, Some(d2), None)).await {
                Ok(_) => Ok(true),
                Err(e) if is_exists(&e) => Ok(false),
                Err(e) if e.is(Kind::FailedPrecondition) => {
                    // Wrong bytes: nothing of them may be resumed from.
                    let _ = w.step(|w| w.abort()).await;
                    Err(Error::data_loss(format!(
                        "upstream {}/{} served wrong bytes for {d}: {e}",
                        src.registry, src.repository
                    )))
                }
                Err(e) => Err(e),
            }
        }
        .await;
        self.count_fetch(src, &r, if matches!(r, Ok(true)) { size } else { 0 });
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy_body(
        &self,
        w: &mut AsyncWriter,
        src: &Source,
        d: &Digest,
        offset: i64,
        size: i64,
        events: Option<&mpsc::Sender<Event>>,
        body: Option<Result<super::BlobBody>>,
        tee: Option<&Arc<Tee>>,
    ) -> Result<()> {
        let body = match body {
            Some(b) => b?,
            None => self.upstream.blob(src, d, offset as u64, None).await?,
        };
        // Readers of this fetch take frames from the tee as they arrive off the network.
        let tee = tee.cloned();
        let generation = tee.as_ref().map(|t| t.start(offset));
        let tee_net = tee.clone().zip(generation);
        // The network is read by its own task, so bytes keep arriving while a store write
        // runs (the fetch takes the longer of the two, not their sum), at most AHEAD bytes
        // ahead of what the store loop has landed (`ReadAhead`).
        let ahead = Arc::new(ReadAhead::new(AHEAD));
        let (tx, rx) = mpsc::unbounded_channel::<Result<Bytes>>();
        let mut stream = body.stream;
        let ahead_net = ahead.clone();
        let net = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let fail = item.is_err();
                if let Ok(b) = &item {
                    ahead_net.take(b.len()).await;
                    if let Some((t, g)) = &tee_net {
                        t.push(*g, b.clone());
                    }
                }
                if tx.send(item).is_err() || fail {
                    return;
                }
            }
        });
        // The task must not outlive this attempt: a frame it read late would belong to no
        // one (the tee ignores it anyway, by its generation).
        let _net = tokio_util::task::AbortOnDropHandle::new(net);
        // Stored in writes of GATHER bytes that keep the blob's chunks whole (`Gather`).
        // Readers of this fetch are fed from the tee, which holds every frame until it has
        // landed, so holding bytes back from the store delays no one; readers of an eager
        // pull (no tee) follow the ingest a write behind. What is gathered when the body
        // fails is still written, for a retry to resume after (the commit verifies it all).
        let mut frames = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).ready_chunks(64);
        let mut gather = Gather::new(offset.max(0) as u64, GATHER);
        let mut pos = offset;
        let mut reported = pos;
        while let Some(items) = frames.next().await {
            let mut failed = None;
            for it in items {
                let piece = match it {
                    Ok(b) => gather.push(&b),
                    Err(e) => {
                        failed = Some(e);
                        gather.rest()
                    }
                };
                if let Some(p) = piece {
                    let before = pos;
                    pos = land(w, tee.as_ref(), p).await?;
                    ahead.landed(usize::try_from(pos - before).unwrap_or(0));
                }
                if failed.is_some() {
                    break;
                }
            }
            let held = i64::try_from(gather.pending()).unwrap_or(i64::MAX);
            if size > 0 && pos.saturating_add(held) > size {
                return Err(Error::data_loss(format!(
                    "upstream {} sent more than the {size} bytes of {d}",
                    src.registry
                )));
            }
            if let Some(ev) = events
                && pos - reported >= 8 << 20
            {
                reported = pos;
                let _ = ev.try_send(Event::Fetching {
                    digest: d.clone(),
                    offset: pos,
                    size,
                });
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        if let Some(p) = gather.rest() {
            pos = land(w, tee.as_ref(), p).await?;
        }
        if size > 0 && pos < size {
            return Err(Error::unavailable(format!(
                "upstream {} ended {d} at {pos} of {size} bytes",
                src.registry
            )));
        }
        Ok(())
    }

    /// The on-demand fetch of `d` for `scope` under way, if there is one (never starts one).
    pub fn fetch_under_way(
        &self,
        scope: &Scope,
        d: &Digest,
    ) -> Option<(watch::Receiver<FetchPhase>, Arc<Tee>)> {
        self.fetching
            .lock()
            .get(&(scope.clone(), d.clone()))
            .cloned()
    }

    /// Starts fetching a quarantined blob again in every scope that records its source
    /// (the scrubber's, a damaged read's, and Verify's quarantines all end here); returns
    /// the scopes whose fetch started.
    pub fn refetch(self: &Arc<Self>, c: &crate::store::Corrupt) -> Vec<Scope> {
        c.refetchable
            .iter()
            .filter(|s| match self.ensure_fetch(s, &c.digest) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(digest = %c.digest, error = %e, "could not fetch a quarantined blob again");
                    false
                }
            })
            .cloned()
            .collect()
    }

    /// Starts (or joins) the on-demand fetch of `d` for `scope` from its recorded source.
    /// NotFound when `d` has no source.
    pub fn ensure_fetch(
        self: &Arc<Self>,
        scope: &Scope,
        d: &Digest,
    ) -> Result<(watch::Receiver<FetchPhase>, Arc<Tee>)> {
        let key = (scope.clone(), d.clone());
        let mut fetching = self.fetching.lock();
        if let Some((rx, tee)) = fetching.get(&key) {
            return Ok((rx.clone(), tee.clone()));
        }
        let src = self
            .store
            .source(scope, d)?
            .ok_or_else(|| Error::not_found(format!("content {d}: not found")))?;
        let (tx, rx) = watch::channel(FetchPhase::Running);
        let tee = Arc::new(Tee::default());
        fetching.insert(key.clone(), (rx.clone(), tee.clone()));
        drop(fetching);
        let tee2 = tee.clone();
        let me = self.clone();
        tokio::spawn(async move {
            let (scope, d) = key.clone();
            let source = Source {
                registry: src.registry.clone(),
                repository: src.repository.clone(),
            };
            tracing::info!(digest = %d, registry = %source.registry, repository = %source.repository, "fetching on demand");
            let r = me
                .fetch_into(
                    &scope,
                    &source,
                    None,
                    &d,
                    src.size,
                    &src.media_type,
                    None,
                    Some(&tee2),
                )
                .await
                .map(|_| ());
            if let Err(e) = &r {
                tracing::warn!(digest = %d, error = %e, "on-demand fetch failed");
            }
            me.fetching.lock().remove(&key);
            let _ = tx.send(FetchPhase::Done(r));
        });
        Ok((rx, tee))
    }
}

/// How many bytes a fetch's network task may hold beyond what its store loop has landed.
///
/// Deadlock-free with a gathering store loop: what is taken and not given back sits in the
/// channel between them or in the loop's gather (under one GATHER), and no frame takes more
/// than the limit less two GATHERs, so a loop waiting for frames always leaves room for the
/// next one. A frame larger than that takes only the cap; what the loop gives back is capped
/// by what is out, so the allowance never grows past its limit.
struct ReadAhead {
    room: tokio::sync::Semaphore,
    limit: usize,
}

impl ReadAhead {
    fn new(limit: usize) -> ReadAhead {
        assert!(limit > 2 * GATHER, "read-ahead must exceed two gathers");
        ReadAhead {
            room: tokio::sync::Semaphore::new(limit),
            limit,
        }
    }

    /// Waits until a frame of `len` bytes fits.
    async fn take(&self, len: usize) {
        let n = len.min(self.limit - 2 * GATHER);
        // The semaphore is never closed, so this only waits.
        if let Ok(p) = self.room.acquire_many(n as u32).await {
            p.forget();
        }
    }

    /// The store loop landed `n` more bytes.
    fn landed(&self, n: usize) {
        let out = self.limit - self.room.available_permits();
        self.room.add_permits(n.min(out));
    }

    #[cfg(test)]
    fn out(&self) -> usize {
        self.limit - self.room.available_permits()
    }
}

/// Stores a fetch's next bytes and tells its tee they have landed. Returns the new offset.
async fn land(w: &mut AsyncWriter, tee: Option<&Arc<Tee>>, bytes: Bytes) -> Result<i64> {
    let pos = w.append(bytes).await?;
    if let Some(t) = tee {
        t.landed(pos);
    }
    Ok(pos)
}

fn platform_wanted(wanted: &[String], platform: Option<&str>) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let Some(p) = platform else { return false };
    wanted.iter().any(|w| {
        let (w, p): (Vec<&str>, Vec<&str>) = (w.split('/').collect(), p.split('/').collect());
        w.len() >= 2
            && p.len() >= 2
            && w[0] == p[0]
            && w[1] == p[1]
            && (w.len() < 3 || p.get(2) == w.get(2))
    })
}

pub use crate::dates::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_ahead_bounds_bytes_not_frames() {
        let limit = 4 << 20;
        let a = Arc::new(ReadAhead::new(limit));
        // Frames up to the limit go at once; the next waits for the store.
        for _ in 0..4 {
            a.take(1 << 20).await;
        }
        assert_eq!(a.out(), limit);
        let a2 = a.clone();
        let next = tokio::spawn(async move { a2.take(300 << 10).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!next.is_finished(), "a frame past the limit must wait");
        a.landed(1 << 20);
        next.await.unwrap();
        assert_eq!(a.out(), limit - (1 << 20) + (300 << 10));
        // Giving back more than is out never grows the allowance.
        a.landed(usize::MAX);
        assert_eq!(a.out(), 0);
    }

    #[tokio::test]
    async fn read_ahead_never_stalls_a_store_loop_waiting_for_frames() {
        // The loop holds just under a gather it cannot land yet; whatever the frame's size
        // (even one larger than the whole allowance), it must be let through.
        for frame in [1usize, 340 << 10, AHEAD - 2 * GATHER, AHEAD, 64 << 20] {
            let a = ReadAhead::new(AHEAD);
            a.take(GATHER - 1).await;
            tokio::time::timeout(Duration::from_secs(1), a.take(frame))
                .await
                .unwrap_or_else(|_| panic!("a {frame}-byte frame stalled the fetch"));
            assert!(a.out() <= AHEAD);
        }
    }

    #[test]
    fn platforms() {
        let w = vec!["linux/arm64".to_string()];
        assert!(platform_wanted(&w, Some("linux/arm64/v8")));
        assert!(!platform_wanted(&w, Some("linux/amd64")));
        assert!(!platform_wanted(&w, None));
        assert!(platform_wanted(&[], None));
        let v = vec!["linux/arm/v7".to_string()];
        assert!(!platform_wanted(&v, Some("linux/arm/v6")));
    }
}
