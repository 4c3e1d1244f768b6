//! Client-side connection helpers shared by the CLI verbs, the benchmark and the tests.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// A gRPC channel over a unix socket.
pub async fn connect_unix(path: impl Into<PathBuf>) -> anyhow::Result<Channel> {
    let path: PathBuf = path.into();
    let shown = path.display().to_string();
    let ch = Endpoint::try_from("http://contentd.local")?
        .initial_stream_window_size(crate::daemon::STREAM_WINDOW)
        .initial_connection_window_size(crate::daemon::CONNECTION_WINDOW)
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {shown}: {e} (is the daemon running?)"))?;
    Ok(ch)
}

/// Adds containerd's namespace header to every request on a channel.
#[derive(Clone)]
pub struct Namespace(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Namespace {
    pub fn new(ns: Option<&str>) -> anyhow::Result<Self> {
        Ok(Namespace(ns.map(|n| n.parse()).transpose()?))
    }
}

impl tonic::service::Interceptor for Namespace {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(ns) = &self.0 {
            req.metadata_mut()
                .insert(crate::api::NAMESPACE_HEADER, ns.clone());
        }
        Ok(req)
    }
}
