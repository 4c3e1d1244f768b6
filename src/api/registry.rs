//! `contentd.v1.Registry`: pulls from upstream registries, translated to and from
//! [`crate::upstream::pull`].

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::pb::contentd::v1 as pb;
use super::{Mode, status};
use crate::error::Error;
use crate::upstream::pull::{self, BlobState, Event, Puller};

pub struct RegistryService {
    puller: Option<Arc<Puller>>,
    mode: Mode,
}

impl RegistryService {
    pub fn new(puller: Option<Arc<Puller>>, mode: Mode) -> Self {
        RegistryService { puller, mode }
    }
    pub fn into_server(self) -> pb::registry_server::RegistryServer<Self> {
        pb::registry_server::RegistryServer::new(self)
    }
}

fn event_pb(e: Event) -> pb::PullEvent {
    use pb::pull_event::State;
    let mk = |state: State, d: &crate::digest::Digest, mt: &str, size: i64| pb::PullEvent {
        state: state as i32,
        digest: d.to_string(),
        media_type: mt.to_string(),
        size,
        ..Default::default()
    };
    match e {
        Event::Blob {
            state,
            digest,
            media_type,
            size,
        } => {
            let state = match state {
                BlobState::Resolved => State::Resolved,
                BlobState::Stored => State::Stored,
                BlobState::Exists => State::Exists,
                BlobState::Lazy => State::Lazy,
            };
            mk(state, &digest, &media_type, size)
        }
        Event::Skipped {
            digest,
            media_type,
            size,
            reason,
        } => pb::PullEvent {
            detail: reason,
            ..mk(State::Skipped, &digest, &media_type, size)
        },
        Event::Fetching {
            digest,
            offset,
            size,
        } => pb::PullEvent {
            offset,
            ..mk(State::Fetching, &digest, "", size)
        },
        Event::Done { image, digest } => pb::PullEvent {
            detail: image,
            ..mk(State::Done, &digest, "", 0)
        },
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::PullEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    type PullStream = EventStream;

    async fn pull(
        &self,
        req: Request<pb::PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let scope = self.mode.scope(&req)?;
        let Some(puller) = self.puller.clone() else {
            return Err(status(Error::new(
                crate::error::Kind::Unimplemented,
                "pulls are not enabled on this daemon",
            )));
        };
        let req = req.into_inner();
        if req.reference.is_empty() {
            return Err(status(Error::invalid("pull needs a reference")));
        }
        let mode = match pb::pull_request::Mode::try_from(req.mode) {
            Ok(pb::pull_request::Mode::Eager) => pull::Mode::Eager,
            Ok(pb::pull_request::Mode::Lazy) => pull::Mode::Lazy,
            Err(_) => {
                return Err(status(Error::invalid(format!(
                    "unknown pull mode {}",
                    req.mode
                ))));
            }
        };
        let request = pull::PullRequest {
            reference: req.reference,
            platforms: req.platforms,
            mode,
            image_name: (!req.image_name.is_empty()).then_some(req.image_name),
        };
        let (tx, rx) = mpsc::channel(64);
        let (etx, mut erx) = mpsc::channel(64);
        // The pull runs to completion even if the client goes away: what it stored stays
        // consistent and the image record is written.
        let task = tokio::spawn(async move { puller.pull(&scope, request, etx).await });
        tokio::spawn(async move {
            while let Some(e) = erx.recv().await {
                let _ = tx.send(Ok(event_pb(e))).await;
            }
            match task.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let _ = tx.send(Err(status(e))).await;
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("pull task failed: {e}"))))
                        .await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
