//! Value encodings of the metadata column families (prost messages: compact, and new fields
//! can be added without a migration).

use std::collections::HashMap;

/// `blobs[dk]`: a committed blob. Its bytes live in `chunks` under `extent`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobRecord {
    #[prost(uint64, tag = "1")]
    pub extent: u64,
    #[prost(int64, tag = "2")]
    pub size: i64,
    #[prost(int64, tag = "3")]
    pub created_ns: i64,
    /// The blob's own media type when it is an index or manifest (as classified at commit).
    #[prost(string, tag = "4")]
    pub media_type: String,
    #[prost(string, tag = "5")]
    pub artifact_type: String,
}

/// `edges[parent ‖ role ‖ index ‖ child]` and `parents[child ‖ parent ‖ role]`: a descriptor
/// as the document that holds it describes it (for `parents`, the parent's own description).
#[derive(Clone, PartialEq, prost::Message)]
pub struct EdgeRecord {
    #[prost(string, tag = "1")]
    pub media_type: String,
    #[prost(int64, tag = "2")]
    pub size: i64,
    #[prost(string, tag = "3")]
    pub artifact_type: String,
    #[prost(string, tag = "4")]
    pub platform: String,
    #[prost(string, repeated, tag = "5")]
    pub urls: Vec<String>,
}

/// `links[scope ‖ 0 ‖ dk]`: a blob as one namespace (or backend tenant) sees it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkRecord {
    #[prost(int64, tag = "1")]
    pub created_ns: i64,
    #[prost(int64, tag = "2")]
    pub updated_ns: i64,
    #[prost(map = "string, string", tag = "3")]
    pub labels: HashMap<String, String>,
    /// Copies of the blob's immutable size and extent, so Info, Read and List need one
    /// lookup, not two.
    #[prost(int64, tag = "4")]
    pub size: i64,
    #[prost(uint64, tag = "5")]
    pub extent: u64,
}

/// `ingests[scope ‖ 0 ‖ ref]`: an ingest in progress; its bytes so far live in `chunks` under
/// `extent` at `[0, offset)`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IngestRecord {
    #[prost(uint64, tag = "1")]
    pub extent: u64,
    #[prost(int64, tag = "2")]
    pub offset: i64,
    #[prost(int64, tag = "3")]
    pub total: i64,
    #[prost(string, tag = "4")]
    pub expected: String,
    #[prost(int64, tag = "5")]
    pub started_ns: i64,
    #[prost(int64, tag = "6")]
    pub updated_ns: i64,
    /// Set while the ingest only shadows an existing blob (containerd's "shared ingest"): it
    /// has no bytes of its own until the client writes.
    #[prost(string, tag = "7")]
    pub shared: String,
}

/// `images[scope ‖ 0 ‖ name]`: a named image; its target is a garbage-collection root.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(map = "string, string", tag = "2")]
    pub labels: HashMap<String, String>,
    #[prost(string, tag = "3")]
    pub media_type: String,
    #[prost(string, tag = "4")]
    pub digest: String,
    #[prost(int64, tag = "5")]
    pub size: i64,
    #[prost(map = "string, string", tag = "6")]
    pub annotations: HashMap<String, String>,
    #[prost(int64, tag = "7")]
    pub created_ns: i64,
    #[prost(int64, tag = "8")]
    pub updated_ns: i64,
}

/// `leases[scope ‖ 0 ‖ id]`: a lease; its resources are roots until it expires.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(int64, tag = "2")]
    pub created_ns: i64,
    #[prost(map = "string, string", tag = "3")]
    pub labels: HashMap<String, String>,
}

/// `sources[scope ‖ 0 ‖ dk]`: where a blob this scope pulled (lazily or not yet) can be
/// fetched from. A read of a blob that is not stored fetches it from here.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SourceRecord {
    #[prost(string, tag = "1")]
    pub registry: String,
    #[prost(string, tag = "2")]
    pub repository: String,
    #[prost(string, tag = "3")]
    pub media_type: String,
    #[prost(int64, tag = "4")]
    pub size: i64,
    #[prost(int64, tag = "5")]
    pub created_ns: i64,
}

/// `quarantine[dk]`: a blob the scrubber found corrupt. It is out of service (no blob record,
/// no links); its bytes stay in `extent` for inspection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QuarantineRecord {
    #[prost(uint64, tag = "1")]
    pub extent: u64,
    #[prost(int64, tag = "2")]
    pub size: i64,
    #[prost(int64, tag = "3")]
    pub detected_ns: i64,
    #[prost(string, tag = "4")]
    pub reason: String,
    /// Scopes that saw the blob (`n:NAMESPACE` or `t:TENANT`).
    #[prost(string, repeated, tag = "5")]
    pub scopes: Vec<String>,
}
