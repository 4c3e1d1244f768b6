//! `containerd.services.content.v1.Content` over the store, with containerd 1.6's wire
//! behaviour: Read in ≤ 1 MiB messages, List in batches of ≤ 100, and one Write response per
//! request message, each carrying the running digest.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::pb::containerd::services::content::v1 as pb;
use super::{Mode, blocking, status, timestamp};
use crate::digest::Digest;
use crate::error::Error;
use crate::filter::Filter;
use crate::reads::Reads;
use crate::store::{self, Scope, Store, WriteAction, WriteRequest, WriteResponse, WriteSession};

/// Largest Read message payload. containerd's server sends 1 MiB; a quarter of that keeps a
/// stream's memory (one piece queued, one in the transport) small under many concurrent
/// readers, and is one stored chunk. Clients accept any size.
pub const READ_CHUNK: usize = 256 << 10;
const LIST_BATCH: usize = 100;

pub struct ContentService {
    store: Arc<Store>,
    reads: Arc<Reads>,
    mode: Mode,
}

impl ContentService {
    pub fn new(store: Arc<Store>, reads: Arc<Reads>, mode: Mode) -> Self {
        ContentService { store, reads, mode }
    }
}

fn parse_digest(s: &str) -> Result<Digest, Status> {
    Digest::parse(s).map_err(status)
}

fn info_pb(i: store::Info) -> pb::Info {
    pb::Info {
        digest: i.digest.to_string(),
        size: i.size,
        created_at: timestamp(i.created_ns),
        updated_at: timestamp(i.updated_ns),
        labels: i.labels,
    }
}

fn status_pb(s: store::IngestStatus) -> pb::Status {
    pb::Status {
        started_at: timestamp(s.started_ns),
        updated_at: timestamp(s.updated_ns),
        r#ref: s.reference,
        offset: s.offset,
        total: s.total,
        expected: s.expected.map(|d| d.to_string()).unwrap_or_default(),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::content_server::Content for ContentService {
    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        tracing::Span::current().record("digest", req.get_ref().digest.as_str());
        let d = parse_digest(&req.get_ref().digest)?;
        // A linked blob is one point lookup (microseconds): answered inline. Anything else may
        // write a tenant's hold (a synced write), so it goes through the blocking pool.
        let info = match self.store.info_linked(&scope, &d).map_err(status)? {
            Some(info) => info,
            None => {
                let store = self.store.clone();
                blocking(move || store.info_or_lazy(&scope, &d)).await?
            }
        };
        Ok(Response::new(pb::InfoResponse {
            info: Some(info_pb(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let req = req.into_inner();
        let info = req
            .info
            .ok_or_else(|| status(Error::invalid("update needs info")))?;
        let d = parse_digest(&info.digest)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let store = self.store.clone();
        let info = blocking(move || store.update(&scope, &d, info.labels, &paths)).await?;
        Ok(Response::new(pb::UpdateResponse {
            info: Some(info_pb(info)),
        }))
    }

    type ListStream = BoxStream<pb::ListContentResponse>;

    async fn list(
        &self,
        req: Request<pb::ListContentRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let scope = self.mode.scope(&req)?;
        let filter = Filter::parse_all(&req.get_ref().filters).map_err(status)?;
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut after: Option<Digest> = None;
            loop {
                let (s, f, st, a) = (scope.clone(), filter.clone(), store.clone(), after.clone());
                let batch = blocking(move || st.list(&s, &f, a.as_ref(), LIST_BATCH)).await;
                match batch {
                    Ok(batch) if batch.is_empty() => break,
                    Ok(batch) => {
                        let last = batch.len() < LIST_BATCH;
                        after = batch.last().map(|i| i.digest.clone());
                        let msg = pb::ListContentResponse {
                            info: batch.into_iter().map(info_pb).collect(),
                        };
                        if tx.send(Ok(msg)).await.is_err() || last {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delete(&self, req: Request<pb::DeleteContentRequest>) -> Result<Response<()>, Status> {
        let scope = self.mode.scope(&req)?;
        tracing::Span::current().record("digest", req.get_ref().digest.as_str());
        let d = parse_digest(&req.get_ref().digest)?;
        self.reads.settle(&scope, &d).await;
        let store = self.store.clone();
        let d2 = d.clone();
        let existed = blocking(move || store.delete(&scope, &d2)).await?;
        // A backend is deleted from by containerd's GC, which expects unknown digests to be fine.
        if !existed && !self.mode.is_backend() {
            return Err(status(Error::not_found(format!("content {d}: not found"))));
        }
        Ok(Response::new(()))
    }

    type ReadStream = BoxStream<pb::ReadContentResponse>;

    async fn read(
        &self,
        req: Request<pb::ReadContentRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let scope = self.mode.scope(&req)?;
        let req = req.into_inner();
        tracing::Span::current().record("digest", req.digest.as_str());
        let d = parse_digest(&req.digest)?;
        let opened = self
            .reads
            .open(&scope, &d, req.offset, req.size, READ_CHUNK)
            .await
            .map_err(status)?;
        // containerd 1.6 numbers messages from the requested offset.
        let mut pos = 0i64;
        let stream = ReceiverStream::new(opened.rx).map(move |item| {
            item.map(|data| {
                crate::metrics::get().bytes_out.inc_by(data.len() as u64);
                let m = pb::ReadContentResponse { offset: pos, data };
                pos += m.data.len() as i64;
                m
            })
            .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let r = req.into_inner().r#ref;
        let st = self.store.status(&scope, &r).map_err(status)?;
        Ok(Response::new(pb::StatusResponse {
            status: Some(status_pb(st)),
        }))
    }

    async fn list_statuses(
        &self,
        req: Request<pb::ListStatusesRequest>,
    ) -> Result<Response<pb::ListStatusesResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let filter = Filter::parse_all(&req.get_ref().filters).map_err(status)?;
        let store = self.store.clone();
        let list = blocking(move || store.list_statuses(&scope, &filter)).await?;
        Ok(Response::new(pb::ListStatusesResponse {
            statuses: list.into_iter().map(status_pb).collect(),
        }))
    }

    type WriteStream = BoxStream<pb::WriteContentResponse>;

    async fn write(
        &self,
        req: Request<Streaming<pb::WriteContentRequest>>,
    ) -> Result<Response<Self::WriteStream>, Status> {
        self.write_stream(req).await.map(Response::new)
    }

    async fn abort(&self, req: Request<pb::AbortRequest>) -> Result<Response<()>, Status> {
        let scope = self.mode.scope(&req)?;
        let r = req.into_inner().r#ref;
        let existed = self.store.abort(&scope, &r).await.map_err(status)?;
        if !existed && !self.mode.is_backend() {
            return Err(status(Error::not_found(format!("ingest {r:?}: not found"))));
        }
        Ok(Response::new(()))
    }
}

impl ContentService {
    /// Write, its request messages from any decoder: tonic's, or [`super::frames`]'s.
    pub(crate) async fn write_stream<S>(
        &self,
        req: Request<S>,
    ) -> Result<BoxStream<pb::WriteContentResponse>, Status>
    where
        S: Stream<Item = Result<pb::WriteContentRequest, Status>> + Send + Unpin + 'static,
    {
        let scope = self.mode.scope(&req)?;
        let lease = self.mode.lease(&req)?;
        let inbound = req.into_inner();
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            if let Err(e) = write_session(store, scope, lease, inbound, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// One Write stream: bound to the ref of its first message, one response per message. The
/// state machine is the store's [`WriteSession`]; this only translates messages.
async fn write_session(
    store: Arc<Store>,
    scope: Scope,
    lease: Option<String>,
    mut inbound: impl Stream<Item = Result<pb::WriteContentRequest, Status>> + Unpin,
    tx: &mpsc::Sender<Result<pb::WriteContentResponse, Status>>,
) -> Result<(), Status> {
    let Some(first) = inbound.next().await.transpose()? else {
        return Ok(());
    };
    tracing::Span::current().record("ref", first.r#ref.as_str());
    if !first.expected.is_empty() {
        tracing::Span::current().record("digest", first.expected.as_str());
    }
    let expected = if first.expected.is_empty() {
        None
    } else {
        Some(parse_digest(&first.expected)?)
    };
    let (reference, total) = (first.r#ref.clone(), first.total);
    let first = request(first).map_err(status)?;
    let (session, resp) =
        WriteSession::start(&store, scope, &reference, total, expected, lease, first)
            .await
            .map_err(status)?;
    let mut held = Some(session);
    let r = drive(&mut held, response(resp), inbound, tx).await;
    // A session that ends holding what it has not stored (a WRITE held for a COMMIT that
    // never came) stores it as it drops: a write, so on the blocking pool.
    if let Some(s) = held.take().filter(WriteSession::has_queued) {
        let _ = tokio::task::spawn_blocking(move || drop(s)).await;
    }
    r
}

/// The requests after the first, each answered before the next is read. `held` is empty
/// only after a blocking-pool task lost the session (it panicked).
async fn drive(
    held: &mut Option<WriteSession>,
    mut resp: pb::WriteContentResponse,
    mut inbound: impl Stream<Item = Result<pb::WriteContentRequest, Status>> + Unpin,
    tx: &mpsc::Sender<Result<pb::WriteContentResponse, Status>>,
) -> Result<(), Status> {
    loop {
        let Some(session) = held.as_mut() else {
            return Ok(());
        };
        if tx.send(Ok(resp)).await.is_err() || session.is_done() {
            return Ok(());
        }
        let req = match inbound.next().await.transpose()? {
            Some(m) => request(m).map_err(status)?,
            // Client EOF: the ingest stays for a later resume.
            None => return Ok(()),
        };
        // What needs no storage (a STAT between writes, which containerd's client sends
        // before each copy; a small new blob's WRITE, held for its COMMIT) is answered here;
        // anything that touches storage runs on the blocking pool.
        let result = if session.in_memory(&req) {
            session.step_in_memory(req)
        } else {
            let mut session = held.take().expect("checked above");
            let (s, r) = tokio::task::spawn_blocking(move || {
                let r = session.step(req);
                (session, r)
            })
            .await
            .map_err(|e| Status::internal(format!("write task failed: {e}")))?;
            *held = Some(s);
            r
        };
        resp = response(result.map_err(status)?);
    }
}

fn request(msg: pb::WriteContentRequest) -> crate::error::Result<WriteRequest> {
    let action = match pb::WriteAction::try_from(msg.action) {
        Ok(pb::WriteAction::Stat) => WriteAction::Stat,
        Ok(pb::WriteAction::Write) => WriteAction::Write,
        Ok(pb::WriteAction::Commit) => WriteAction::Commit,
        Err(_) => {
            return Err(Error::invalid(format!(
                "unknown write action {}",
                msg.action
            )));
        }
    };
    Ok(WriteRequest {
        action: Some(action),
        offset: msg.offset,
        total: msg.total,
        expected: if msg.expected.is_empty() {
            None
        } else {
            Some(Digest::parse(&msg.expected)?)
        },
        data: msg.data,
        labels: (!msg.labels.is_empty()).then_some(msg.labels),
    })
}

fn response(r: WriteResponse) -> pb::WriteContentResponse {
    pb::WriteContentResponse {
        action: match r.action {
            WriteAction::Stat => pb::WriteAction::Stat,
            WriteAction::Write => pb::WriteAction::Write,
            WriteAction::Commit => pb::WriteAction::Commit,
        } as i32,
        started_at: timestamp(r.started_ns),
        updated_at: timestamp(r.updated_ns),
        offset: r.offset,
        total: r.total,
        digest: r.digest.to_string(),
    }
}
