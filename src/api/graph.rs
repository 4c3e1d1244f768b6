//! `contentd.v1.Graph`: queries over the descriptor graph, translated to and from the store.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::contentd::v1 as pb;
use super::{Mode, blocking, status};
use crate::digest::Digest;
use crate::error::Error;
use crate::store::{GraphEdge, Store};

pub struct GraphService {
    store: Arc<Store>,
    mode: Mode,
}

impl GraphService {
    pub fn new(store: Arc<Store>, mode: Mode) -> Self {
        GraphService { store, mode }
    }
    pub fn into_server(self) -> pb::graph_server::GraphServer<Self> {
        pb::graph_server::GraphServer::new(self)
    }
}

fn edge_pb(e: GraphEdge) -> pb::Edge {
    pb::Edge {
        from: e.from.to_string(),
        to: e.to.to_string(),
        role: e.role.name().to_string(),
        index: e.index,
        media_type: e.rec.media_type,
        size: e.rec.size,
        artifact_type: e.rec.artifact_type,
        platform: e.rec.platform,
        urls: e.rec.urls,
    }
}

fn digest(s: &str) -> Result<Digest, Status> {
    Digest::parse(s).map_err(status)
}

#[tonic::async_trait]
impl pb::graph_server::Graph for GraphService {
    async fn children(
        &self,
        req: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::EdgesResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let d = digest(&req.get_ref().digest)?;
        let store = self.store.clone();
        let edges = blocking(move || {
            if !store.visible(&scope, &d)? {
                return Err(Error::not_found(format!("content {d}: not found")));
            }
            store.children(&d)
        })
        .await?;
        Ok(Response::new(pb::EdgesResponse {
            edges: edges.into_iter().map(edge_pb).collect(),
        }))
    }

    async fn parents(
        &self,
        req: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::EdgesResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let d = digest(&req.get_ref().digest)?;
        let store = self.store.clone();
        let edges = blocking(move || store.visible_parents(&scope, &d)).await?;
        Ok(Response::new(pb::EdgesResponse {
            edges: edges.into_iter().map(edge_pb).collect(),
        }))
    }

    async fn referrers(
        &self,
        req: Request<pb::ReferrersRequest>,
    ) -> Result<Response<pb::ReferrersResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let d = digest(&req.get_ref().digest)?;
        let want = req.into_inner().artifact_type;
        let store = self.store.clone();
        let referrers = blocking(move || {
            let mut out = Vec::new();
            for e in store.visible_parents(&scope, &d)? {
                if e.role != crate::graph::Role::Subject
                    || (!want.is_empty() && e.rec.artifact_type != want)
                {
                    continue;
                }
                let size = store.info_size(&e.from)?;
                out.push(pb::Descriptor {
                    media_type: e.rec.media_type,
                    digest: e.from.to_string(),
                    size,
                    artifact_type: e.rec.artifact_type,
                });
            }
            Ok(out)
        })
        .await?;
        Ok(Response::new(pb::ReferrersResponse { referrers }))
    }

    async fn walk(
        &self,
        req: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::WalkResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let d = digest(&req.get_ref().digest)?;
        let store = self.store.clone();
        let w = blocking(move || store.walk(&scope, &d)).await?;
        let present_bytes = w.nodes.iter().filter(|n| n.present).map(|n| n.size).sum();
        let absent = w
            .nodes
            .iter()
            .filter(|n| !n.present)
            .map(|n| n.digest.to_string())
            .collect();
        Ok(Response::new(pb::WalkResponse {
            nodes: w
                .nodes
                .into_iter()
                .map(|n| pb::Node {
                    digest: n.digest.to_string(),
                    media_type: n.media_type,
                    size: n.size,
                    present: n.present,
                })
                .collect(),
            edges: w.edges.into_iter().map(edge_pb).collect(),
            present_bytes,
            absent,
        }))
    }
}
