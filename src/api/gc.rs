//! `contentd.v1.GC`: run, dry-run, status and explain, translated to and from the store.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::contentd::v1 as pb;
use super::{Mode, blocking, status, timestamp};
use crate::digest::Digest;
use crate::store::{Explanation, GcReport, Store};

pub struct GcService {
    store: Arc<Store>,
    mode: Mode,
}

impl GcService {
    pub fn new(store: Arc<Store>, mode: Mode) -> Self {
        GcService { store, mode }
    }
    pub fn into_server(self) -> pb::gc_server::GcServer<Self> {
        pb::gc_server::GcServer::new(self)
    }
}

fn report_pb(r: GcReport) -> pb::Report {
    pb::Report {
        dry_run: r.dry_run,
        started_at: timestamp(r.started_ns),
        duration_ms: r.duration_ms,
        marked: r.marked,
        blobs_swept: r.blobs_swept,
        bytes_swept: r.bytes_swept,
        links_swept: r.links_swept,
        swept: r.swept.iter().map(|d| d.to_string()).collect(),
        max_pause_us: r.max_pause_us,
        ingests_expired: r.ingests_expired,
        sources_swept: r.sources_swept,
        mark_spills: r.mark_spills,
    }
}

/// Most digests an explanation's path carries.
const MAX_PATH: usize = 64;

#[tonic::async_trait]
impl pb::gc_server::Gc for GcService {
    async fn run(&self, req: Request<pb::RunRequest>) -> Result<Response<pb::Report>, Status> {
        let dry_run = req.get_ref().dry_run;
        let store = self.store.clone();
        let r = blocking(move || store.collect(dry_run)).await?;
        Ok(Response::new(report_pb(r)))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let (running, last, runs) = self.store.gc_status();
        Ok(Response::new(pb::StatusResponse {
            running,
            last: last.map(report_pb),
            runs: runs as i64,
        }))
    }

    async fn explain(
        &self,
        req: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let d = Digest::parse(&req.get_ref().digest).map_err(status)?;
        let store = self.store.clone();
        let e = blocking(move || store.explain(&scope, &d)).await?;
        Ok(Response::new(match e {
            Explanation::Alive { root, path } => {
                // A path is as long as the stored graph makes it: the answer keeps the ends
                // (the root's side and the blob's) within a fixed size.
                let edges = path.len().saturating_sub(1);
                let shown: Vec<String> = if path.len() > MAX_PATH {
                    let head = path.iter().take(MAX_PATH / 4);
                    let tail = path.iter().skip(path.len() - (MAX_PATH - MAX_PATH / 4));
                    head.chain(tail).map(|d| d.to_string()).collect()
                } else {
                    path.iter().map(|d| d.to_string()).collect()
                };
                let elided = path.len() - shown.len();
                pb::ExplainResponse {
                    alive: true,
                    message: if elided > 0 {
                        format!(
                            "alive: {root}, via {edges} edge(s) ({elided} nodes in the middle of the path not shown)"
                        )
                    } else {
                        format!("alive: {root}, via {edges} edge(s)")
                    },
                    root,
                    path: shown,
                    collectable_after: None,
                }
            }
            Explanation::Unreachable {
                collectable_after_ns,
            } => pb::ExplainResponse {
                alive: false,
                root: String::new(),
                path: Vec::new(),
                collectable_after: timestamp(collectable_after_ns),
                message: "unreachable from every root: collectable after the grace period".into(),
            },
        }))
    }
}
