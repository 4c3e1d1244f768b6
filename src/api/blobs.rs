//! `contentd.v1.Blobs`: one-stream writes that carry a declared media type, translated onto
//! the store's single write path ([`crate::store::Writer`]).

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::pb::contentd::v1 as pb;
use super::{Mode, status};
use crate::digest::Digest;
use crate::error::Error;
use crate::store::{AsyncWriter, Store, is_exists};

pub struct BlobsService {
    store: Arc<Store>,
    mode: Mode,
}

impl BlobsService {
    pub fn new(store: Arc<Store>, mode: Mode) -> Self {
        BlobsService { store, mode }
    }
    pub fn into_server(self) -> pb::blobs_server::BlobsServer<Self> {
        pb::blobs_server::BlobsServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::blobs_server::Blobs for BlobsService {
    async fn put(
        &self,
        req: Request<Streaming<pb::PutRequest>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let lease = self.mode.lease(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| status(Error::invalid("Put stream ended before its first message")))?;
        if first.digest.is_empty() {
            return Err(status(Error::invalid(
                "the first Put message must name the blob's digest",
            )));
        }
        let digest = Digest::parse(&first.digest).map_err(status)?;
        if first.size < 0 || first.offset < 0 {
            return Err(status(Error::invalid(format!(
                "size {} and offset {} must not be negative",
                first.size, first.offset
            ))));
        }
        let existing = |size: i64| {
            Response::new(pb::PutResponse {
                digest: digest.to_string(),
                size,
                created: false,
            })
        };
        let r = if first.r#ref.is_empty() {
            format!("put-{digest}")
        } else {
            first.r#ref.clone()
        };
        let writer = match self
            .store
            .open_writer(scope.clone(), &r, first.size, Some(digest.clone()), lease)
            .await
        {
            Ok(w) => w,
            Err(e) if is_exists(&e) => {
                let size = self.store.info(&scope, &digest).map_err(status)?.size;
                return Ok(existing(size));
            }
            Err(e) => return Err(status(e)),
        };
        let mut w = AsyncWriter::new(writer);
        let media_type = (!first.media_type.is_empty()).then_some(first.media_type);
        let (offset, data) = (first.offset, first.data);
        let (size, labels) = (first.size, first.labels);
        let labels = (!labels.is_empty()).then_some(labels);
        let d = digest.clone();
        // A blob sent in one message (a manifest, a config: most of an import) is written
        // and committed in one step, one synced batch; a longer one is written as it comes.
        let committed = match inbound.message().await? {
            None => {
                w.step(move |w| {
                    w.set_media_type(media_type);
                    w.write_bytes(offset, data)?;
                    w.commit(size, Some(d), labels)
                })
                .await
            }
            Some(second) => {
                w.step(move |w| {
                    w.set_media_type(media_type);
                    w.write_bytes(offset, data)
                })
                .await
                .map_err(status)?;
                w.append(second.data).await.map_err(status)?;
                while let Some(m) = inbound.message().await? {
                    w.append(m.data).await.map_err(status)?;
                }
                w.step(move |w| w.commit(size, Some(d), labels)).await
            }
        };
        match committed {
            Ok(info) => Ok(Response::new(pb::PutResponse {
                digest: info.digest.to_string(),
                size: info.size,
                created: true,
            })),
            Err(e) if is_exists(&e) => {
                let size = self.store.info(&scope, &digest).map_err(status)?.size;
                Ok(existing(size))
            }
            Err(e) => Err(status(e)),
        }
    }
}
