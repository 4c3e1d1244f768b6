//! `containerd.services.leases.v1.Leases`, translated to and from the store.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::containerd::services::leases::v1 as pb;
use super::{Mode, blocking, status, timestamp};
use crate::error::Error;
use crate::filter::Filter;
use crate::store::{LeaseRecord, Store};

pub struct LeasesService {
    store: Arc<Store>,
    mode: Mode,
}

impl LeasesService {
    pub fn new(store: Arc<Store>, mode: Mode) -> Self {
        LeasesService { store, mode }
    }
    pub fn into_server(self) -> pb::leases_server::LeasesServer<Self> {
        pb::leases_server::LeasesServer::new(self)
    }
}

fn to_pb(l: LeaseRecord) -> pb::Lease {
    pb::Lease {
        id: l.id,
        created_at: timestamp(l.created_ns),
        labels: l.labels,
    }
}

fn resource(r: Option<pb::Resource>) -> Result<pb::Resource, Status> {
    r.ok_or_else(|| status(Error::invalid("a resource is required")))
}

#[tonic::async_trait]
impl pb::leases_server::Leases for LeasesService {
    async fn create(
        &self,
        req: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::CreateResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let req = req.into_inner();
        let store = self.store.clone();
        let l = blocking(move || store.create_lease(&scope, &req.id, req.labels)).await?;
        Ok(Response::new(pb::CreateResponse {
            lease: Some(to_pb(l)),
        }))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<()>, Status> {
        let scope = self.mode.scope(&req)?;
        let req = req.into_inner();
        let store = self.store.clone();
        blocking(move || {
            store.delete_lease(&scope, &req.id)?;
            if req.sync {
                store.collect(false)?;
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let f = Filter::parse_all(&req.get_ref().filters).map_err(status)?;
        let store = self.store.clone();
        let leases = blocking(move || store.list_leases(&scope, &f)).await?;
        Ok(Response::new(pb::ListResponse {
            leases: leases.into_iter().map(to_pb).collect(),
        }))
    }

    async fn add_resource(
        &self,
        req: Request<pb::AddResourceRequest>,
    ) -> Result<Response<()>, Status> {
        let scope = self.mode.scope(&req)?;
        let req = req.into_inner();
        let r = resource(req.resource)?;
        let store = self.store.clone();
        blocking(move || store.add_lease_resource(&scope, &req.id, &r.r#type, &r.id)).await?;
        Ok(Response::new(()))
    }

    async fn delete_resource(
        &self,
        req: Request<pb::DeleteResourceRequest>,
    ) -> Result<Response<()>, Status> {
        let scope = self.mode.scope(&req)?;
        let req = req.into_inner();
        let r = resource(req.resource)?;
        let store = self.store.clone();
        blocking(move || store.delete_lease_resource(&scope, &req.id, &r.r#type, &r.id)).await?;
        Ok(Response::new(()))
    }

    async fn list_resources(
        &self,
        req: Request<pb::ListResourcesRequest>,
    ) -> Result<Response<pb::ListResourcesResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let id = req.into_inner().id;
        let store = self.store.clone();
        let list = blocking(move || store.list_lease_resources(&scope, &id)).await?;
        Ok(Response::new(pb::ListResourcesResponse {
            resources: list
                .into_iter()
                .map(|(t, id)| pb::Resource { id, r#type: t })
                .collect(),
        }))
    }
}
