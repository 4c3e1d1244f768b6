//! `containerd.services.images.v1.Images`, translated to and from the store.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::containerd::services::images::v1 as pb;
use super::pb::containerd::types::Descriptor;
use super::{Mode, blocking, status, timestamp};
use crate::error::Error;
use crate::filter::Filter;
use crate::store::{ImageRecord, Store};

pub struct ImagesService {
    store: Arc<Store>,
    mode: Mode,
}

impl ImagesService {
    pub fn new(store: Arc<Store>, mode: Mode) -> Self {
        ImagesService { store, mode }
    }
    pub fn into_server(self) -> pb::images_server::ImagesServer<Self> {
        pb::images_server::ImagesServer::new(self)
    }
}

fn to_pb(r: ImageRecord) -> pb::Image {
    pb::Image {
        name: r.name,
        labels: r.labels,
        target: Some(Descriptor {
            media_type: r.media_type,
            digest: r.digest,
            size: r.size,
            annotations: r.annotations,
        }),
        created_at: timestamp(r.created_ns),
        updated_at: timestamp(r.updated_ns),
    }
}

fn from_pb(i: pb::Image) -> ImageRecord {
    let t = i.target.unwrap_or_default();
    ImageRecord {
        name: i.name,
        labels: i.labels,
        media_type: t.media_type,
        digest: t.digest,
        size: t.size,
        annotations: t.annotations,
        created_ns: 0,
        updated_ns: 0,
    }
}

#[tonic::async_trait]
impl pb::images_server::Images for ImagesService {
    async fn get(
        &self,
        req: Request<pb::GetImageRequest>,
    ) -> Result<Response<pb::GetImageResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let img = self
            .store
            .image(&scope, &req.get_ref().name)
            .map_err(status)?;
        Ok(Response::new(pb::GetImageResponse {
            image: Some(to_pb(img)),
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let f = Filter::parse_all(&req.get_ref().filters).map_err(status)?;
        let store = self.store.clone();
        let images = blocking(move || store.list_images(&scope, &f)).await?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images.into_iter().map(to_pb).collect(),
        }))
    }

    async fn create(
        &self,
        req: Request<pb::CreateImageRequest>,
    ) -> Result<Response<pb::CreateImageResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let img = req
            .into_inner()
            .image
            .ok_or_else(|| status(Error::invalid("create needs an image")))?;
        let store = self.store.clone();
        let img = blocking(move || store.create_image(&scope, from_pb(img))).await?;
        Ok(Response::new(pb::CreateImageResponse {
            image: Some(to_pb(img)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateImageRequest>,
    ) -> Result<Response<pb::UpdateImageResponse>, Status> {
        let scope = self.mode.scope(&req)?;
        let req = req.into_inner();
        let img = req
            .image
            .ok_or_else(|| status(Error::invalid("update needs an image")))?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let store = self.store.clone();
        let img = blocking(move || store.update_image(&scope, from_pb(img), &paths)).await?;
        Ok(Response::new(pb::UpdateImageResponse {
            image: Some(to_pb(img)),
        }))
    }

    async fn delete(&self, req: Request<pb::DeleteImageRequest>) -> Result<Response<()>, Status> {
        let scope = self.mode.scope(&req)?;
        let req = req.into_inner();
        let store = self.store.clone();
        blocking(move || {
            store.delete_image(&scope, &req.name)?;
            // With sync, the caller waits for the collection that the deletion allows.
            if req.sync {
                store.collect(false)?;
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(()))
    }
}
