//! The descriptor graph, from bytes: which blob a document is and what it points to.
//!
//! Pure code (no I/O): `parse` classifies a blob by the media type a client gave, else by
//! sniffing its JSON, and returns its outgoing edges in document order — image index and
//! Docker manifest list → manifests; OCI and Docker schema2 manifests → config + layers
//! (non-distributable and foreign layers included: they are edges even when the blob is
//! legitimately absent); `subject` → a referrer edge. Anything else, and any malformed or
//! hostile document, is an opaque leaf: never an error, never a panic. containerd's
//! `containerd.io/gc.ref.content*` labels add edges through [`label_refs`].

use std::collections::HashMap;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::digest::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Documents larger than this are not parsed (the distribution spec's manifest limit).
pub const MAX_DOCUMENT: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Index,
    Manifest,
    Opaque,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Manifest,
    Config,
    Layer,
    /// From a referrer (artifact) to its subject.
    Subject,
    /// From containerd's `containerd.io/gc.ref.content*` labels.
    Label,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Manifest => "manifest",
            Role::Config => "config",
            Role::Layer => "layer",
            Role::Subject => "subject",
            Role::Label => "label",
        }
    }
    pub fn code(self) -> u8 {
        self as u8
    }
    pub fn from_code(c: u8) -> Option<Role> {
        [
            Role::Manifest,
            Role::Config,
            Role::Layer,
            Role::Subject,
            Role::Label,
        ]
        .get(c as usize)
        .copied()
    }
    /// Whether the child stays alive because the parent is (a subject does not).
    pub fn keeps_alive(self) -> bool {
        !matches!(self, Role::Subject)
    }
}

/// One outgoing edge with what the parent says about the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub role: Role,
    /// Position among edges of the same role (layers, manifests), in document order.
    pub index: u32,
    pub digest: Digest,
    pub media_type: String,
    pub size: i64,
    pub artifact_type: Option<String>,
    /// `os/architecture[/variant]` for index entries.
    pub platform: Option<String>,
    pub urls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub kind: Kind,
    /// The document's own media type: as given, as written in it, or as sniffed.
    pub media_type: Option<String>,
    pub artifact_type: Option<String>,
    pub edges: Vec<Edge>,
}

impl Parsed {
    pub fn opaque(media_type: Option<&str>) -> Parsed {
        Parsed {
            kind: Kind::Opaque,
            media_type: media_type.map(str::to_string),
            artifact_type: None,
            edges: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
struct Sniff {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<IgnoredAny>,
    config: Option<IgnoredAny>,
    layers: Option<IgnoredAny>,
    #[serde(rename = "fsLayers")]
    fs_layers: Option<IgnoredAny>,
}

fn is_index_type(t: &str) -> bool {
    t == OCI_INDEX || t == DOCKER_LIST
}

/// Whether a declared media type names a document that can have edges (an index, a manifest
/// list or a manifest): only such a type may break a tie the bytes leave.
pub fn is_document_type(t: &str) -> bool {
    is_index_type(t) || is_manifest_type(t)
}

fn is_manifest_type(t: &str) -> bool {
    t == OCI_MANIFEST || t == DOCKER_MANIFEST
}

fn edge(role: Role, index: u32, d: &Descriptor) -> Option<Edge> {
    let digest = Digest::parse(d.digest().as_ref()).ok()?;
    Some(Edge {
        role,
        index,
        digest,
        media_type: d.media_type().to_string(),
        size: i64::try_from(d.size()).ok()?,
        artifact_type: d.artifact_type().as_ref().map(|t| t.to_string()),
        platform: d.platform().as_ref().map(|p| {
            let mut s = format!("{}/{}", p.os(), p.architecture());
            if let Some(v) = p.variant() {
                s.push('/');
                s.push_str(v);
            }
            s
        }),
        urls: d.urls().clone().unwrap_or_default(),
    })
}

/// Classifies `bytes` and lists its outgoing edges. `hint` is a media type supplied by the
/// writer; without one the JSON is sniffed (umoci writes manifests without `mediaType`).
pub fn parse(hint: Option<&str>, bytes: &[u8]) -> Parsed {
    parse_limited(hint, bytes, MAX_DOCUMENT)
}

/// [`parse`] with an operator-set size limit: a larger document is opaque.
pub fn parse_limited(hint: Option<&str>, bytes: &[u8], limit: usize) -> Parsed {
    if bytes.len() > limit
        || bytes
            .first()
            .map(|b| !matches!(b, b'{' | b' ' | b'\n' | b'\r' | b'\t'))
            .unwrap_or(true)
    {
        return Parsed::opaque(hint);
    }
    // serde_json refuses nesting deeper than 128 levels, so hostile depth is a parse error.
    let Ok(sniff) = serde_json::from_slice::<Sniff>(bytes) else {
        return Parsed::opaque(hint);
    };
    if sniff.fs_layers.is_some() {
        return Parsed::opaque(hint.or(sniff.media_type.as_deref()));
    }
    // The bytes decide what a document is: its own `mediaType` wins, and a declared type
    // only breaks the tie the bytes leave (umoci writes manifests without one). A client
    // calling a manifest "application/octet-stream" must not make it opaque, or another
    // namespace's pull of the same image would keep none of its layers.
    let declared = match (sniff.media_type.as_deref(), hint) {
        (Some(own), _) => Some(own.to_string()),
        (None, Some(h)) if is_document_type(h) => Some(h.to_string()),
        _ => None,
    };
    let has_manifests = sniff.manifests.is_some();
    let has_image = sniff.config.is_some() && sniff.layers.is_some();
    let kind = match declared.as_deref() {
        Some(t) if is_index_type(t) && sniff.config.is_none() => Kind::Index,
        Some(t) if is_manifest_type(t) && !has_manifests => Kind::Manifest,
        Some(t) if is_index_type(t) || is_manifest_type(t) => Kind::Opaque,
        _ if has_manifests && sniff.config.is_none() => Kind::Index,
        _ if has_image && !has_manifests => Kind::Manifest,
        _ => Kind::Opaque,
    };
    match kind {
        Kind::Index => match serde_json::from_slice::<ImageIndex>(bytes) {
            Ok(ix) => {
                let mut edges: Vec<Edge> = ix
                    .manifests()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, d)| edge(Role::Manifest, i as u32, d))
                    .collect();
                edges.extend(
                    ix.subject()
                        .as_ref()
                        .and_then(|d| edge(Role::Subject, 0, d)),
                );
                Parsed {
                    kind,
                    media_type: Some(declared.unwrap_or_else(|| OCI_INDEX.to_string())),
                    artifact_type: ix.artifact_type().as_ref().map(|t| t.to_string()),
                    edges,
                }
            }
            Err(_) => Parsed::opaque(hint),
        },
        Kind::Manifest => match serde_json::from_slice::<ImageManifest>(bytes) {
            Ok(m) => {
                let mut edges: Vec<Edge> = edge(Role::Config, 0, m.config()).into_iter().collect();
                edges.extend(
                    m.layers()
                        .iter()
                        .enumerate()
                        .filter_map(|(i, d)| edge(Role::Layer, i as u32, d)),
                );
                edges.extend(m.subject().as_ref().and_then(|d| edge(Role::Subject, 0, d)));
                // OCI 1.1: an artifact's type is artifactType, else its config's media type.
                let artifact_type = m.artifact_type().as_ref().map(|t| t.to_string());
                Parsed {
                    kind,
                    media_type: Some(declared.unwrap_or_else(|| OCI_MANIFEST.to_string())),
                    artifact_type,
                    edges,
                }
            }
            Err(_) => Parsed::opaque(hint),
        },
        Kind::Opaque => Parsed::opaque(hint.or(sniff.media_type.as_deref())),
    }
}

/// Digests named by containerd's GC reference labels: `containerd.io/gc.ref.content` itself,
/// or followed by `.` or `/` and any suffix. Values that are not digests are ignored.
pub fn label_refs(labels: &HashMap<String, String>) -> Vec<Digest> {
    const PREFIX: &str = "containerd.io/gc.ref.content";
    let mut out: Vec<Digest> = labels
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix(PREFIX)
                .map(|rest| rest.is_empty() || rest.starts_with(['.', '/']))
                .unwrap_or(false)
        })
        .filter_map(|(_, v)| Digest::parse(v).ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether containerd's `containerd.io/gc.root` label makes a blob a root.
pub fn is_gc_root(labels: &HashMap<String, String>) -> bool {
    labels
        .get("containerd.io/gc.root")
        .map(|v| !v.is_empty())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    fn manifest(media: Option<&str>, subject: bool) -> String {
        format!(
            r#"{{"schemaVersion":2,{}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":7}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D2}","size":9}},
                         {{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"{D3}","size":11,"urls":["http://x/y"]}}]{}}}"#,
            media
                .map(|m| format!(r#""mediaType":"{m}","#))
                .unwrap_or_default(),
            if subject {
                format!(r#","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{D3}","size":5}}"#)
            } else {
                String::new()
            }
        )
    }

    #[test]
    fn manifests_without_media_type_are_sniffed() {
        let p = parse(None, manifest(None, false).as_bytes());
        assert_eq!(p.kind, Kind::Manifest);
        assert_eq!(p.media_type.as_deref(), Some(OCI_MANIFEST));
        let roles: Vec<_> = p
            .edges
            .iter()
            .map(|e| (e.role, e.index, e.digest.to_string()))
            .collect();
        assert_eq!(
            roles,
            vec![
                (Role::Config, 0, D1.into()),
                (Role::Layer, 0, D2.into()),
                (Role::Layer, 1, D3.into())
            ]
        );
        assert_eq!(p.edges[2].urls, vec!["http://x/y".to_string()]);
    }

    #[test]
    fn docker_manifest_and_subject() {
        let p = parse(None, manifest(Some(DOCKER_MANIFEST), true).as_bytes());
        assert_eq!(p.kind, Kind::Manifest);
        assert_eq!(p.media_type.as_deref(), Some(DOCKER_MANIFEST));
        assert_eq!(p.edges.last().unwrap().role, Role::Subject);
    }

    #[test]
    fn index_with_platforms() {
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
                {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D1}","size":3,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
                {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D2}","size":4,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let p = parse(None, doc.as_bytes());
        assert_eq!(p.kind, Kind::Index);
        assert_eq!(p.edges.len(), 2);
        assert_eq!(p.edges[0].platform.as_deref(), Some("linux/arm64/v8"));
        assert_eq!(p.edges[1].index, 1);
    }

    #[test]
    fn contradictions_and_junk_are_opaque() {
        // A manifest media type on a document with manifests is rejected, as containerd does.
        let doc = format!(r#"{{"mediaType":"{OCI_MANIFEST}","manifests":[]}}"#);
        assert_eq!(parse(None, doc.as_bytes()).kind, Kind::Opaque);
        for junk in [
            &b""[..],
            b"null",
            b"[1,2]",
            b"{\"config\":5,\"layers\":\"x\"}",
            b"{\"manifests\":[{\"digest\":\"nope\"}]}",
            b"{\"schemaVersion\":1,\"fsLayers\":[]}",
            b"\xff\xfe",
        ] {
            assert_eq!(parse(None, junk).kind, Kind::Opaque);
        }
        let deep = format!(
            "{{\"manifests\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(parse(None, deep.as_bytes()).kind, Kind::Opaque);
        let huge = vec![b' '; MAX_DOCUMENT + 1];
        assert_eq!(parse(None, &huge).kind, Kind::Opaque);
        // `{}` is opaque whatever it is declared as: there is nothing to tie-break.
        assert_eq!(
            parse(Some("application/vnd.oci.image.layer.v1.tar"), b"{}").kind,
            Kind::Opaque
        );
    }

    #[test]
    fn the_bytes_decide_and_a_declared_type_only_breaks_ties() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"a","digest":"{D1}","size":1}},"layers":[{{"mediaType":"b","digest":"{D2}","size":2}}]}}"#
        );
        for hint in [
            None,
            Some("application/octet-stream"),
            Some("application/vnd.oci.image.layer.v1.tar"),
            Some(OCI_INDEX),
        ] {
            let p = parse(hint, manifest.as_bytes());
            assert_eq!(p.kind, Kind::Manifest, "{hint:?}");
            assert_eq!(p.edges.len(), 2, "{hint:?}");
        }
        // Without its own mediaType, a declared document type breaks the tie; a declared
        // non-document type does not stop the structural sniff either.
        let bare = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"a","digest":"{D1}","size":1}},"layers":[]}}"#
        );
        assert_eq!(
            parse(Some(DOCKER_MANIFEST), bare.as_bytes()).kind,
            Kind::Manifest
        );
        assert_eq!(
            parse(Some(DOCKER_MANIFEST), bare.as_bytes())
                .media_type
                .as_deref(),
            Some(DOCKER_MANIFEST)
        );
        assert_eq!(
            parse(Some("application/octet-stream"), bare.as_bytes()).kind,
            Kind::Manifest
        );
    }

    #[test]
    fn gc_labels() {
        let l: HashMap<String, String> = [
            ("containerd.io/gc.ref.content.config", D1),
            ("containerd.io/gc.ref.content.l.0", D2),
            ("containerd.io/gc.ref.content/x", D3),
            ("containerd.io/gc.ref.contentx", D1),
            ("containerd.io/gc.ref.content.m.0", "not a digest"),
            ("containerd.io/gc.root", "yes"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let refs: Vec<String> = label_refs(&l).iter().map(|d| d.to_string()).collect();
        assert_eq!(refs, vec![D1, D2, D3]);
        assert!(is_gc_root(&l));
    }

    /// Replays the fuzz corpus on stable, so the fuzz target's inputs stay covered in CI.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/graph_parse");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            for hint in [None, Some(OCI_MANIFEST), Some(DOCKER_LIST)] {
                let _ = parse(hint, &bytes);
            }
            n += 1;
        }
        assert!(n >= 5, "corpus missing at {}", dir.display());
        let artifact = std::fs::read(dir.join("oci-artifact.json")).unwrap();
        let p = parse(None, &artifact);
        assert_eq!(p.artifact_type.as_deref(), Some("application/spdx+json"));
        assert_eq!(p.edges.last().unwrap().role, Role::Subject);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(None, &bytes);
        }

        #[test]
        fn never_panics_on_mutated_manifests(cut in 0usize..600, byte in any::<u8>()) {
            let mut doc = manifest(None, true).into_bytes();
            let i = cut % doc.len();
            doc[i] = byte;
            let _ = parse(None, &doc);
            doc.truncate(i);
            let _ = parse(None, &doc);
        }
    }
}
