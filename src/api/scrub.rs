//! `contentd.v1.Scrub`: on-demand verification and the quarantine list, translated to and
//! from [`crate::store::Store::scrub`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::contentd::v1 as pb;
use super::{Mode, blocking, status, timestamp};
use crate::digest::Digest;
use crate::store::{Corrupt, Scope, Store};
use crate::upstream::pull::Puller;

pub struct ScrubService {
    store: Arc<Store>,
    puller: Option<Arc<Puller>>,
    mode: Mode,
}

impl ScrubService {
    pub fn new(store: Arc<Store>, puller: Option<Arc<Puller>>, mode: Mode) -> Self {
        ScrubService {
            store,
            puller,
            mode,
        }
    }
    pub fn into_server(self) -> pb::scrub_server::ScrubServer<Self> {
        pb::scrub_server::ScrubServer::new(self)
    }
}

fn scope_name(s: &Scope) -> String {
    match s {
        Scope::Namespace(n) => format!("n:{n}"),
        Scope::Tenant(t) => format!("t:{t}"),
    }
}

/// Starts fetching a quarantined blob again wherever its source is known; the scopes'
/// names, for the answer.
fn refetch(puller: Option<&Arc<Puller>>, c: &Corrupt) -> Vec<String> {
    puller
        .map(|p| p.refetch(c).iter().map(scope_name).collect())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl pb::scrub_server::Scrub for ScrubService {
    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let _ = self.mode.scope(&req)?;
        let digests = req
            .into_inner()
            .digests
            .iter()
            .map(|d| Digest::parse(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(status)?;
        let store = self.store.clone();
        let r = blocking(move || store.scrub(&digests, 0)).await?;
        let corrupt = r
            .corrupt
            .iter()
            .map(|c| pb::CorruptBlob {
                digest: c.digest.to_string(),
                reason: c.reason.clone(),
                refetching: refetch(self.puller.as_ref(), c),
            })
            .collect();
        Ok(Response::new(pb::VerifyResponse {
            checked: r.checked as i64,
            bytes: r.bytes as i64,
            corrupt,
        }))
    }

    async fn quarantined(
        &self,
        req: Request<pb::QuarantinedRequest>,
    ) -> Result<Response<pb::QuarantinedResponse>, Status> {
        let _ = self.mode.scope(&req)?;
        let store = self.store.clone();
        let q = blocking(move || store.quarantined()).await?;
        Ok(Response::new(pb::QuarantinedResponse {
            blobs: q
                .into_iter()
                .map(|(d, r)| pb::QuarantinedBlob {
                    digest: d.to_string(),
                    size: r.size,
                    detected_at: timestamp(r.detected_ns),
                    reason: r.reason,
                    scopes: r.scopes,
                })
                .collect(),
        }))
    }
}
