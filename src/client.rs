//! Client-side connection helpers shared by the CLI verbs, the benchmark and the tests.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// HTTP/2 flow-control windows and frame size for every listener and the bundled clients:
/// with h2's defaults a stream of 1 MiB messages waits a round trip for window updates
/// after every message.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;
pub const MAX_FRAME: u32 = 1 << 20;

/// A gRPC channel over a unix socket.
pub async fn connect_unix(path: impl Into<PathBuf>) -> anyhow::Result<Channel> {
    let path: PathBuf = path.into();
    let shown = path.display().to_string();
    let ch = Endpoint::try_from("http://contentd.local")?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
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

type Header = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

/// Adds containerd's namespace (and optionally lease) header to every request on a channel.
#[derive(Clone)]
pub struct Namespace {
    ns: Option<Header>,
    lease: Option<Header>,
}

impl Namespace {
    pub fn new(ns: Option<&str>) -> anyhow::Result<Self> {
        Ok(Namespace {
            ns: ns.map(|n| n.parse()).transpose()?,
            lease: None,
        })
    }

    /// Also sends `containerd-lease: lease`.
    pub fn with_lease(mut self, lease: &str) -> anyhow::Result<Self> {
        self.lease = Some(lease.parse()?);
        Ok(self)
    }
}

impl tonic::service::Interceptor for Namespace {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(ns) = &self.ns {
            req.metadata_mut()
                .insert(crate::api::NAMESPACE_HEADER, ns.clone());
        }
        if let Some(l) = &self.lease {
            req.metadata_mut()
                .insert(crate::api::LEASE_HEADER, l.clone());
        }
        Ok(req)
    }
}
