//! gRPC services: translation between wire messages and the domain, nothing else.
//!
//! Owns the generated protobuf modules, the listener modes (what a request's metadata means
//! on a client or a backend listener), and the single mapping from domain errors to gRPC
//! status codes.

pub mod access;
pub mod blobs;
pub mod content;
pub mod frames;
pub mod gc;
pub mod graph;
pub mod images;
pub mod leases;
pub mod observe;
pub mod registry;
pub mod scrub;

use tonic::{Code, Status};

use crate::error::{Error, Kind};
use crate::store::Scope;

pub mod pb {
    pub mod containerd {
        pub mod services {
            pub mod content {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
            pub mod images {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.images.v1");
                }
            }
            pub mod leases {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.leases.v1");
                }
            }
        }
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
    }
    pub mod contentd {
        pub mod v1 {
            tonic::include_proto!("contentd.v1");
        }
    }
    /// Every service and message contentd serves, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");
}

/// containerd's namespace header.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// containerd's lease header.
pub const LEASE_HEADER: &str = "containerd-lease";

/// What a listener is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// containerd's own content service semantics: a namespace is required on every call.
    Client,
    /// The raw store containerd expects behind a `proxy_plugins` content entry, as one tenant.
    Backend { tenant: String },
}

impl Mode {
    /// The scope a request acts in.
    pub fn scope<T>(&self, req: &tonic::Request<T>) -> Result<Scope, Status> {
        match self {
            Mode::Backend { tenant } => Scope::tenant(tenant).map_err(status),
            Mode::Client => {
                let Some(ns) = req.metadata().get(NAMESPACE_HEADER) else {
                    return Err(status(Error::precondition(
                        "namespace is required: set the containerd-namespace request header",
                    )));
                };
                let ns = ns
                    .to_str()
                    .map_err(|_| status(Error::invalid("namespace header is not valid ASCII")))?;
                Scope::namespace(ns).map_err(status)
            }
        }
    }

    /// The `containerd-lease` a request works under (client listeners only: containerd never
    /// forwards leases to a backend).
    pub fn lease<T>(&self, req: &tonic::Request<T>) -> Result<Option<String>, Status> {
        if self.is_backend() {
            return Ok(None);
        }
        match req.metadata().get(LEASE_HEADER) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.to_string()))
                .map_err(|_| status(Error::invalid("lease header is not valid ASCII"))),
        }
    }

    pub fn is_backend(&self) -> bool {
        matches!(self, Mode::Backend { .. })
    }
}

/// The one place domain errors become gRPC statuses.
pub fn status(e: Error) -> Status {
    let code = match e.kind() {
        Kind::InvalidArgument => Code::InvalidArgument,
        Kind::NotFound => Code::NotFound,
        Kind::AlreadyExists => Code::AlreadyExists,
        Kind::FailedPrecondition => Code::FailedPrecondition,
        Kind::Unavailable => Code::Unavailable,
        Kind::OutOfRange => Code::OutOfRange,
        Kind::DataLoss => Code::DataLoss,
        Kind::ResourceExhausted => Code::ResourceExhausted,
        Kind::Unimplemented => Code::Unimplemented,
        Kind::Internal => Code::Internal,
        Kind::Aborted => Code::Aborted,
        Kind::PermissionDenied => Code::PermissionDenied,
    };
    // Not logged here: `observe` logs every INTERNAL and DATA_LOSS call once, with its
    // method and namespace.
    Status::new(code, e.message().to_string())
}

pub(crate) fn timestamp(ns: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    })
}

/// Runs blocking storage work off the async workers ([`crate::store::blocking`]), as a
/// gRPC status.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, Status> {
    crate::store::blocking(f).await.map_err(status)
}
