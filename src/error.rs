//! The one error type of contentd's domain. Every failure carries a [`Kind`] that says what
//! the caller did wrong (or what went wrong inside), and a message that names the problem.
//! The single mapping of kinds to gRPC codes lives in `api::status`.

use std::fmt;

/// What class of failure an [`Error`] is. Mirrors containerd's errdefs classes plus the two
/// codes its content server emits directly (OutOfRange, DataLoss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Unavailable,
    OutOfRange,
    DataLoss,
    ResourceExhausted,
    Unimplemented,
    Internal,
    /// The operation was cut short by another (an ingest aborted under a reader).
    Aborted,
    /// An upstream registry refused the credentials contentd holds.
    PermissionDenied,
}

#[derive(Debug, Clone, thiserror::Error)]
pub struct Error {
    kind: Kind,
    message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, message)
    }
    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(Kind::AlreadyExists, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(Kind::FailedPrecondition, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, message)
    }
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(Kind::OutOfRange, message)
    }
    pub fn data_loss(message: impl Into<String>) -> Self {
        Self::new(Kind::DataLoss, message)
    }
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(Kind::ResourceExhausted, message)
    }
    pub fn aborted(message: impl Into<String>) -> Self {
        Self::new(Kind::Aborted, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }
    pub fn is(&self, kind: Kind) -> bool {
        self.kind == kind
    }
}
