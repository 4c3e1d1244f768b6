//! What each distribution-spec route does, over the store: pulls (manifests, blobs with
//! ranges, tags, referrers), pushes (uploads are ingests, so they survive a restart;
//! manifests are checked and committed through the one write path; tags are image records),
//! deletes, and the pull-through mirror (a miss goes to the upstream named by `?ns=`, by a
//! host as the first path component, or by `default_upstream`).
//!
//! Errors are the spec's JSON bodies; the mapping of store error kinds to HTTP statuses is
//! [`from_store`], the only one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;

use super::evict::{USED_GRANULARITY_SECS, USED_LABEL};
use super::routes::{self, Ranges, Reference, Route};
use super::{Body, Registry, read_body};
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, Kind};
use crate::graph::{self, Kind as DocKind, Role};
use crate::store::{ImageRecord, blocking, is_exists, now_ns};
use crate::upstream::Source;
use crate::upstream::pull::FetchPhase;

/// What the access log and metrics learn about a request.
pub struct Outcome {
    pub route: &'static str,
    /// hit (served from the store), miss (fetched upstream), stale (upstream unreachable,
    /// served from the store), "-" (not a read).
    pub cache: &'static str,
    pub user: Option<String>,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            route: "other",
            cache: "-",
            user: None,
        }
    }
}

/// Label on a mirrored tag's image record: when the upstream last confirmed it (Unix secs).
pub const CHECKED_LABEL: &str = "contentd.io/registry.checked";
/// Label on a pushed tag's image record: it is ours, never revalidated upstream.
pub const ORIGIN_LABEL: &str = "contentd.io/registry.origin";

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Mirrored repositories whose upstream tag lists are held at once.
pub const TAG_LISTS: usize = 64;
/// Blob bytes per body frame.
const PIECE: usize = 256 << 10;
/// Upload bodies are gathered to this size before each store write.
const GATHER: usize = 1 << 20;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    full(Bytes::new())
}

fn stream_body(rx: mpsc::Receiver<crate::error::Result<Bytes>>) -> Body {
    let s = tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| r.map(Frame::data));
    StreamBody::new(s).boxed_unsync()
}

/// The spec's error body.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    let body = serde_json::json!({
        "errors": [{ "code": code, "message": message.into() }]
    });
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The one mapping of store errors to HTTP: `not_found` is the spec code for this route.
fn from_store(e: &Error, not_found: &str) -> Response<Body> {
    let (status, code) = match e.kind() {
        Kind::NotFound => (StatusCode::NOT_FOUND, not_found),
        Kind::InvalidArgument => (StatusCode::BAD_REQUEST, "UNSUPPORTED"),
        Kind::FailedPrecondition | Kind::OutOfRange => {
            (StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID")
        }
        Kind::AlreadyExists => (StatusCode::CONFLICT, "UNSUPPORTED"),
        Kind::PermissionDenied => (StatusCode::FORBIDDEN, "DENIED"),
        Kind::ResourceExhausted => (StatusCode::INSUFFICIENT_STORAGE, "DENIED"),
        Kind::Unavailable | Kind::Aborted => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Kind::Unimplemented => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        Kind::DataLoss | Kind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
    };
    error(status, code, e.message())
}

fn set(r: &mut Response<Body>, name: &'static str, v: impl AsRef<str>) {
    if let Ok(v) = HeaderValue::from_str(v.as_ref()) {
        r.headers_mut().insert(name, v);
    }
}

fn status_only(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    r
}

/// Where a repository's content comes from on a miss.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Repo {
    /// The image-record name prefix: `<host>/<path>` for a mirrorable repository, else the
    /// name as pushed.
    canonical: String,
    /// The upstream to fetch misses from, when there is one contentd may use.
    upstream: Option<Source>,
    /// The `?ns=` the client sent, echoed as `OCI-Namespace`.
    ns: Option<String>,
}

fn host_like(c: &str) -> bool {
    c.contains('.') || c.contains(':') || c == "localhost"
}

/// `host[:port]` as containerd's `?ns=` names an upstream: a DNS name or IPv4 address, or a
/// bracketed IPv6 address, and a port of at most five digits.
fn registry_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => (host, Some(port)),
        _ => (h, None),
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    port_ok && host_ok
}

/// A registry host as a path component: `registry.example.com`, `localhost:5000`, or
/// `127.0.0.1_5000` (registries.conf locations cannot carry a second `:`, so a port may be
/// written after `_`).
fn host_of_component(c: &str) -> String {
    if let Some((h, p)) = c.rsplit_once('_')
        && !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && !h.contains(':')
    {
        return format!("{h}:{p}");
    }
    c.to_string()
}

/// docker.io's one-part names live under `library/`.
fn upstream_path(host: &str, path: &str) -> String {
    if host == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    }
}

impl Registry {
    fn repo(&self, name: &str, query: Option<&str>) -> Repo {
        // Anything but a registry host is not an upstream name: ignored, as if absent, so
        // it never becomes part of a repository's canonical name (an image record).
        let ns = routes::query_param(query, "ns").filter(|h| registry_host(h));
        let (host, path) = match (&ns, name.split_once('/')) {
            (Some(h), _) => (Some(h.clone()), name.to_string()),
            (None, Some((first, rest))) if host_like(first) => {
                (Some(host_of_component(first)), rest.to_string())
            }
            (None, _) if !self.config.default_upstream.is_empty() => {
                (Some(self.config.default_upstream.clone()), name.to_string())
            }
            (None, _) => (None, name.to_string()),
        };
        match host {
            None => Repo {
                canonical: name.to_string(),
                upstream: None,
                ns,
            },
            Some(host) => {
                let path = upstream_path(&host, &path);
                // Least privilege: a client may only name an upstream the operator named
                // (default_upstream, a [upstream.registries] table, allowed_registries), so
                // the registry never becomes an open fetcher of whatever host a client asks.
                let upstream = self
                    .puller
                    .as_ref()
                    .filter(|p| {
                        let c = p.upstream().config();
                        p.upstream().check_allowed(&host).is_ok()
                            && (host == self.config.default_upstream
                                || c.registries.contains_key(&host)
                                || c.allowed_registries.contains(&host))
                    })
                    .map(|_| Source {
                        registry: host.clone(),
                        repository: path.clone(),
                    });
                Repo {
                    canonical: format!("{host}/{path}"),
                    upstream,
                    ns,
                }
            }
        }
    }

    fn writable(&self) -> Result<(), Response<Body>> {
        if self.config.read_only {
            Err(error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "this registry is read-only",
            ))
        } else {
            Ok(())
        }
    }

    pub(super) async fn route(
        self: Arc<Self>,
        req: Request<Incoming>,
        out: &mut Outcome,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let route = match routes::parse(&path) {
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    format!("no such API path {path:?}"),
                );
            }
            Some(Err(refused)) => {
                out.route = "invalid";
                let status = if refused.code == "BLOB_UPLOAD_UNKNOWN" {
                    StatusCode::NOT_FOUND
                } else {
                    StatusCode::BAD_REQUEST
                };
                return error(status, refused.code, refused.message);
            }
            Some(Ok(r)) => r,
        };
        let method = req.method().clone();
        let q = query.as_deref();
        let mut resp = match route {
            Route::Base if method != Method::GET && method != Method::HEAD => {
                out.route = "base";
                not_allowed()
            }
            Route::Base => {
                out.route = "base";
                let mut r = status_only(StatusCode::OK);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                *r.body_mut() = full("{}");
                r
            }
            Route::Manifest { name, reference } => {
                out.route = "manifest";
                let repo = self.repo(&name, q);
                let r = match method {
                    Method::GET | Method::HEAD => {
                        self.get_manifest(&repo, &reference, &req, method == Method::HEAD, out)
                            .await
                    }
                    Method::PUT => match self.writable() {
                        Err(r) => r,
                        Ok(()) => self.put_manifest(&name, &repo, &reference, req).await,
                    },
                    Method::DELETE => match self.writable() {
                        Err(r) => r,
                        Ok(()) => self.delete_manifest(&repo, &reference).await,
                    },
                    _ => not_allowed(),
                };
                echo_ns(r, &repo)
            }
            Route::Blob { name, digest } => {
                out.route = "blob";
                let repo = self.repo(&name, q);
                let r = match method {
                    Method::GET | Method::HEAD => {
                        self.get_blob(&repo, &digest, &req, method == Method::HEAD, out)
                            .await
                    }
                    Method::DELETE => match self.writable() {
                        Err(r) => r,
                        Ok(()) => self.delete_blob(&digest).await,
                    },
                    _ => not_allowed(),
                };
                echo_ns(r, &repo)
            }
            Route::Upload { name, id } => {
                out.route = "upload";
                match self.writable() {
                    Err(r) => r,
                    Ok(()) => self.upload(&name, id, method.clone(), q, req).await,
                }
            }
            Route::Tags { name } => {
                out.route = "tags";
                match method {
                    Method::GET => self.tags(&name, &self.repo(&name, q), q, out).await,
                    _ => not_allowed(),
                }
            }
            Route::Referrers { name, digest } => {
                out.route = "referrers";
                match method {
                    Method::GET => self.referrers(&self.repo(&name, q), &digest, q, out).await,
                    _ => not_allowed(),
                }
            }
        };
        if method == Method::HEAD {
            // A HEAD answer keeps its headers (Content-Length included) without a body.
            *resp.body_mut() = empty();
        }
        resp
    }

    // ---- manifests ------------------------------------------------------------------------

    async fn get_manifest(
        &self,
        repo: &Repo,
        reference: &Reference,
        req: &Request<Incoming>,
        head: bool,
        out: &mut Outcome,
    ) -> Response<Body> {
        let (store, scope) = (self.store.clone(), self.scope.clone());
        let found = match reference {
            Reference::Tag(tag) => self.resolve_tag(repo, tag, out).await,
            Reference::Digest(d) => {
                let d2 = d.clone();
                match blocking(move || store.visible(&scope, &d2)).await {
                    Ok(true) => {
                        out.cache = "hit";
                        if repo.upstream.is_some() {
                            self.touch(format!("{}@{d}", repo.canonical), None);
                        }
                        Ok(d.clone())
                    }
                    Ok(false) => match (&repo.upstream, &self.puller) {
                        (Some(src), Some(p)) => {
                            out.cache = "miss";
                            self.mirror_digest(p, src, repo, d).await
                        }
                        _ => Err(Error::not_found(format!("manifest {d} is unknown"))),
                    },
                    Err(e) => Err(e),
                }
            }
        };
        let d = match found {
            Ok(d) => d,
            Err(e) => return from_store(&e, "MANIFEST_UNKNOWN"),
        };
        let (store, scope, d2, max) = (
            self.store.clone(),
            self.scope.clone(),
            d.clone(),
            self.max_manifest,
        );
        let doc = blocking(move || {
            let (mt, size) = store
                .blob_media_type(&d2)?
                .ok_or_else(|| Error::not_found(format!("manifest {d2} is unknown")))?;
            if size as usize > max {
                return Err(Error::invalid(format!(
                    "manifest {d2} is {size} bytes, over the {max}-byte manifest limit"
                )));
            }
            let loc = store.locate(&scope, &d2)?;
            let bytes = store.read_extent(loc.extent, 0, loc.size as usize)?;
            Ok((mt, bytes))
        })
        .await;
        let (mut mt, bytes) = match doc {
            Ok(v) => v,
            Err(e) => return from_store(&e, "MANIFEST_UNKNOWN"),
        };
        if mt.is_empty() {
            mt = graph::parse(None, &bytes)
                .media_type
                .unwrap_or_else(|| OCI_MANIFEST.to_string());
        }
        if !accepts(req.headers().get_all(header::ACCEPT).iter(), &mt) {
            return error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                format!("manifest {d} is {mt}, which the request's Accept header does not list"),
            );
        }
        let len = bytes.len();
        let mut r = Response::new(if head { empty() } else { full(bytes) });
        set(&mut r, "Content-Type", &mt);
        set(&mut r, "Content-Length", len.to_string());
        set(&mut r, "Docker-Content-Digest", d.to_string());
        set(&mut r, "ETag", format!("\"{d}\""));
        r
    }

    /// The digest a tag names: the store's record when it is ours or fresh; otherwise the
    /// upstream's answer (stored), or the stored record when the upstream cannot answer.
    async fn resolve_tag(
        &self,
        repo: &Repo,
        tag: &str,
        out: &mut Outcome,
    ) -> crate::error::Result<Digest> {
        let name = format!("{}:{tag}", repo.canonical);
        let local = self.image(&name).await?;
        let fresh = |img: &ImageRecord| {
            img.labels.contains_key(ORIGIN_LABEL)
                || img
                    .labels
                    .get(CHECKED_LABEL)
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|t| now_ns() / 1_000_000_000 - t < self.config.tag_ttl_secs as i64)
        };
        let (Some(src), Some(puller)) = (&repo.upstream, &self.puller) else {
            return match local {
                Some(img) => {
                    out.cache = "hit";
                    Digest::parse(&img.digest)
                }
                None => Err(Error::not_found(format!("manifest {name} is unknown"))),
            };
        };
        if let Some(img) = &local
            && fresh(img)
        {
            out.cache = "hit";
            self.touch(name.clone(), Some(img));
            return Digest::parse(&img.digest);
        }
        // Single flight: one upstream check per tag; whoever waited finds it fresh.
        self.single_flight(&name, async {
            if let Some(img) = self.image(&name).await?
                && fresh(&img)
            {
                out.cache = "hit";
                return Digest::parse(&img.digest);
            }
            let labels = HashMap::from([(
                CHECKED_LABEL.to_string(),
                (now_ns() / 1_000_000_000).to_string(),
            )]);
            match puller
                .mirror_manifest(&self.scope, src, tag, Some((name.clone(), labels)))
                .await
            {
                Ok((d, _, _)) => {
                    out.cache = "miss";
                    Ok(d)
                }
                Err(e) if e.is(Kind::NotFound) => Err(e),
                Err(e) => match &local {
                    Some(img) => {
                        tracing::warn!(image = %name, error = %e, "upstream unreachable: serving the stored tag");
                        out.cache = "stale";
                        Digest::parse(&img.digest)
                    }
                    None => Err(e),
                },
            }
        })
        .await
    }

    /// Runs `f` while holding the single-flight gate of `key` (one upstream check per key at
    /// a time), then forgets the gate if nobody else holds or waits on it.
    async fn single_flight<T>(&self, key: &str, f: impl std::future::Future<Output = T>) -> T {
        let gate = self
            .tag_checks
            .lock()
            .entry(key.to_string())
            .or_default()
            .clone();
        let r = {
            let _held = gate.lock().await;
            f.await
        };
        drop(gate);
        let mut checks = self.tag_checks.lock();
        // The map's `Arc` is the last one: nobody holds or waits on it.
        if checks.get(key).is_some_and(|g| Arc::strong_count(g) <= 1) {
            checks.remove(key);
        }
        r
    }

    /// A manifest by digest from upstream. It is held by an image record `<repo>@<digest>`
    /// unless a stored document already refers to it (a child of a mirrored index is held
    /// through its index).
    async fn mirror_digest(
        &self,
        puller: &Arc<crate::upstream::pull::Puller>,
        src: &Source,
        repo: &Repo,
        d: &Digest,
    ) -> crate::error::Result<Digest> {
        let (store, d2) = (self.store.clone(), d.clone());
        let has_parent = blocking(move || Ok(!store.parents(&d2)?.is_empty())).await?;
        let hold = (!has_parent).then(|| {
            (
                format!("{}@{d}", repo.canonical),
                HashMap::from([(
                    CHECKED_LABEL.to_string(),
                    (now_ns() / 1_000_000_000).to_string(),
                )]),
            )
        });
        puller
            .mirror_manifest(&self.scope, src, &d.to_string(), hold)
            .await
            .map(|(d, _, _)| d)
    }

    /// Records that a client asked for mirrored image `name` (its LRU recency, see
    /// `registry::evict`): at most one write per image a minute, off the request path.
    fn touch(&self, name: String, known: Option<&ImageRecord>) {
        let now = now_ns() / 1_000_000_000;
        let stale = move |img: &ImageRecord| {
            img.labels.contains_key(CHECKED_LABEL)
                && !img.labels.contains_key(ORIGIN_LABEL)
                && img
                    .labels
                    .get(USED_LABEL)
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_none_or(|t| now - t >= USED_GRANULARITY_SECS)
        };
        if known.is_some_and(|img| !stale(img)) {
            return;
        }
        let (store, scope) = (self.store.clone(), self.scope.clone());
        tokio::task::spawn_blocking(move || {
            let Ok(img) = store.image(&scope, &name) else {
                return;
            };
            if stale(&img) {
                let update = ImageRecord {
                    name,
                    labels: HashMap::from([(USED_LABEL.to_string(), now.to_string())]),
                    ..Default::default()
                };
                if let Err(e) =
                    store.update_image(&scope, update, &[format!("labels.{USED_LABEL}")])
                {
                    tracing::debug!(error = %e, "could not record a mirrored image's use");
                }
            }
        });
    }

    async fn image(&self, name: &str) -> crate::error::Result<Option<ImageRecord>> {
        let (store, scope, name) = (self.store.clone(), self.scope.clone(), name.to_string());
        blocking(move || match store.image(&scope, &name) {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.is(Kind::NotFound) => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn put_manifest(
        &self,
        name: &str,
        repo: &Repo,
        reference: &Reference,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
            .filter(|s| !s.is_empty());
        let bytes = match read_body(req.into_body(), self.max_manifest).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let alg = match reference {
            Reference::Digest(d) => d.algorithm(),
            Reference::Tag(_) => Algorithm::Sha256,
        };
        let d = Digest::of(alg, &bytes);
        if let Reference::Digest(want) = reference
            && *want != d
        {
            return error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                format!("manifest body has digest {d}, not {want}"),
            );
        }
        let doc = graph::parse_limited(content_type.as_deref(), &bytes, self.max_manifest);
        if doc.kind == DocKind::Opaque {
            return error(
                StatusCode::BAD_REQUEST,
                "MANIFEST_INVALID",
                format!(
                    "not an image manifest or index ({})",
                    content_type.as_deref().unwrap_or("no Content-Type")
                ),
            );
        }
        let media_type = doc
            .media_type
            .clone()
            .or(content_type)
            .unwrap_or_else(|| OCI_MANIFEST.to_string());
        // Everything the manifest names (but its subject) must be here first.
        // A descriptor whose size is not its blob's would make every pull of this manifest
        // fail its size check; refuse it here, where the pusher can still fix it.
        let children: Vec<(Digest, i64)> = doc
            .edges
            .iter()
            .filter(|e| e.role != Role::Subject && e.urls.is_empty())
            .map(|e| (e.digest.clone(), e.size))
            .collect();
        let (store, scope) = (self.store.clone(), self.scope.clone());
        let fetchable = self.puller.is_some();
        let missing = blocking(move || {
            // Blobs not stored but known upstream at this size (a blob HEAD of a mirrored
            // repository answered 200 from the upstream, so the client did not upload it).
            let mut upstream = Vec::new();
            for (c, size) in children {
                match store.visible_size(&scope, &c)? {
                    None if fetchable
                        && size > 0
                        && store.source(&scope, &c)?.is_some_and(|s| s.size == size) =>
                    {
                        upstream.push(c);
                    }
                    None => return Ok((upstream, Some((c, size, None)))),
                    Some(stored) if stored != size => {
                        return Ok((upstream, Some((c, size, Some(stored)))));
                    }
                    Some(_) => {}
                }
            }
            Ok((upstream, None))
        })
        .await;
        match missing {
            Ok((upstream, None)) => {
                if let Err((c, e)) = self.fetch_all(&upstream).await {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "MANIFEST_BLOB_UNKNOWN",
                        format!(
                            "manifest refers to {c}, which is neither here nor fetchable from \
                             the upstream now: {e}"
                        ),
                    );
                }
            }
            Ok((_, Some((c, _, None)))) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "MANIFEST_BLOB_UNKNOWN",
                    format!("manifest refers to {c}, which this repository does not have"),
                );
            }
            Ok((_, Some((c, size, Some(stored))))) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "MANIFEST_INVALID",
                    format!(
                        "manifest gives {c} a size of {size} bytes, but that blob has {stored}"
                    ),
                );
            }
            Err(e) => return from_store(&e, "MANIFEST_BLOB_UNKNOWN"),
        }
        if let Err(e) = self
            .write_blob(
                &format!("manifest-{}", d.hex()),
                &d,
                bytes.clone(),
                Some(media_type.clone()),
            )
            .await
        {
            return from_store(&e, "MANIFEST_INVALID");
        }
        if let Reference::Tag(tag) = reference {
            let img = ImageRecord {
                name: format!("{}:{tag}", repo.canonical),
                media_type: media_type.clone(),
                digest: d.to_string(),
                size: bytes.len() as i64,
                labels: HashMap::from([(ORIGIN_LABEL.to_string(), "push".to_string())]),
                ..Default::default()
            };
            let (store, scope) = (self.store.clone(), self.scope.clone());
            let r = blocking(move || store.create_or_move_image(&scope, img, true)).await;
            if let Err(e) = r {
                return from_store(&e, "MANIFEST_INVALID");
            }
        }
        let mut r = status_only(StatusCode::CREATED);
        set(&mut r, "Location", format!("/v2/{name}/manifests/{d}"));
        set(&mut r, "Docker-Content-Digest", d.to_string());
        if let Some(s) = doc.edges.iter().find(|e| e.role == Role::Subject) {
            set(&mut r, "OCI-Subject", s.digest.to_string());
        }
        r
    }

    /// Stores `bytes` (whose digest is `d`) through the write path; a blob already stored is
    /// only linked.
    async fn write_blob(
        &self,
        r: &str,
        d: &Digest,
        bytes: Bytes,
        media_type: Option<String>,
    ) -> crate::error::Result<()> {
        let size = bytes.len() as i64;
        let w = self
            .store
            .open_writer(self.scope.clone(), r, size, Some(d.clone()), None)
            .await;
        match w {
            Err(e) if is_exists(&e) => Ok(()),
            Err(e) => Err(e),
            Ok(w) => {
                let mut w = crate::store::AsyncWriter::new(w);
                let d2 = d.clone();
                match w
                    .step(move |w| {
                        w.set_media_type(media_type);
                        w.write_bytes(0, bytes)?;
                        w.commit(size, Some(d2), None)
                    })
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if is_exists(&e) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        }
    }

    async fn delete_manifest(&self, repo: &Repo, reference: &Reference) -> Response<Body> {
        let (store, scope) = (self.store.clone(), self.scope.clone());
        let prefix = format!("{}:", repo.canonical);
        let at = format!("{}@", repo.canonical);
        let reference = reference.clone();
        let r = blocking(move || match &reference {
            Reference::Tag(tag) => store
                .delete_image(&scope, &format!("{prefix}{tag}"))
                .map(|_| true),
            Reference::Digest(d) => {
                // Untag every tag of this repository that points at it, then drop the blob
                // from the namespace.
                let none = crate::filter::Filter::default();
                let mut named = store.list_images_named(&scope, &prefix, &none)?;
                named.extend(store.list_images_named(&scope, &at, &none)?);
                for img in named.iter().filter(|i| i.digest == d.to_string()) {
                    store.delete_image(&scope, &img.name)?;
                }
                store.delete(&scope, d)
            }
        })
        .await;
        match r {
            Ok(true) => status_only(StatusCode::ACCEPTED),
            Ok(false) => error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown",
            ),
            Err(e) => from_store(&e, "MANIFEST_UNKNOWN"),
        }
    }

    /// Fetches each blob of `ds` from the upstream its source record names (one fetch per
    /// blob, shared with any reader), waiting until each is stored and verified: what a
    /// pushed manifest names must be here before the manifest is.
    async fn fetch_all(&self, ds: &[Digest]) -> Result<(), (Digest, crate::error::Error)> {
        let Some(puller) = &self.puller else {
            return Ok(());
        };
        for d in ds {
            let (mut phase, _) = puller
                .ensure_fetch(&self.scope, d)
                .map_err(|e| (d.clone(), e))?;
            let done = phase
                .wait_for(|p| matches!(p, FetchPhase::Done(_)))
                .await
                .map(|p| p.clone());
            match done {
                Ok(FetchPhase::Done(Ok(()))) => {}
                Ok(FetchPhase::Done(Err(e))) => return Err((d.clone(), e)),
                _ => {
                    return Err((
                        d.clone(),
                        crate::error::Error::unavailable("the fetch ended without a verdict"),
                    ));
                }
            }
        }
        Ok(())
    }

    // ---- blobs ----------------------------------------------------------------------------

    async fn get_blob(
        &self,
        repo: &Repo,
        d: &Digest,
        req: &Request<Incoming>,
        head: bool,
        out: &mut Outcome,
    ) -> Response<Body> {
        let (store, scope, d2) = (self.store.clone(), self.scope.clone(), d.clone());
        let known = blocking(move || {
            if store.visible(&scope, &d2)? {
                return Ok((Some(store.info(&scope, &d2)?.size), true));
            }
            Ok((
                store
                    .source(&scope, &d2)?
                    .map(|s| s.size)
                    .filter(|s| *s > 0),
                false,
            ))
        })
        .await;
        let (size, stored) = match known {
            Ok(v) => v,
            Err(e) => return from_store(&e, "BLOB_UNKNOWN"),
        };
        let live = !stored && self.store.live(&self.scope, d).is_some();
        out.cache = if stored || live { "hit" } else { "miss" };
        let size = if !stored && !live && size.is_none() {
            // Neither here nor recorded by any manifest: only a mirror can ask the upstream.
            let (Some(src), Some(puller)) = (&repo.upstream, &self.puller) else {
                return error(
                    StatusCode::NOT_FOUND,
                    "BLOB_UNKNOWN",
                    format!("blob {d} is unknown"),
                );
            };
            // A HEAD upstream first, so the status is the upstream's before any body is
            // promised (a 200 whose body then broke off would be a wrong answer to a blob
            // the upstream does not have), a HEAD fetches no body, and a GET is sized and
            // served like any recorded blob, ranges included. Only a blob the upstream says
            // it holds is recorded, so clients cannot fill the store with source records.
            // Single flight per upstream blob: of many clients asking at once (a node's pulls
            // of one image, 64 mirrors' clients), one HEAD goes out; the rest find its record.
            let key = format!("{} {}/{} blob", d, src.registry, src.repository);
            let n = self
                .single_flight(&key, async {
                    let (store, scope, d2) = (self.store.clone(), self.scope.clone(), d.clone());
                    let recorded = blocking(move || store.source(&scope, &d2)).await?;
                    if let Some(s) = recorded.filter(|s| s.size > 0) {
                        return Ok(s.size);
                    }
                    let n = puller.upstream().blob_size(src, d).await?;
                    let n = i64::try_from(n).map_err(|_| {
                        Error::unavailable(format!(
                            "the upstream states a size of {n} bytes for {d}"
                        ))
                    })?;
                    let rec = crate::store::SourceRecord {
                        registry: src.registry.clone(),
                        repository: src.repository.clone(),
                        media_type: String::new(),
                        size: n,
                        created_ns: now_ns(),
                    };
                    let (store, scope, d2) = (self.store.clone(), self.scope.clone(), d.clone());
                    blocking(move || store.put_source(&scope, &d2, &rec)).await?;
                    Ok::<i64, Error>(n)
                })
                .await;
            let n = match n {
                Ok(n) => n,
                Err(e) => return from_store(&e, "BLOB_UNKNOWN"),
            };
            Some(n)
        } else {
            size
        };
        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok());
        let ranges = match size {
            Some(s) => routes::ranges(range, s as u64),
            None => Ranges::Whole,
        };
        let mut r = match ranges {
            Ranges::Unsatisfiable => {
                let mut r = error(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "BLOB_UNKNOWN",
                    format!(
                        "no requested range overlaps the {} bytes of {d}",
                        size.unwrap_or(0)
                    ),
                );
                set(
                    &mut r,
                    "Content-Range",
                    format!("bytes */{}", size.unwrap_or(0)),
                );
                return r;
            }
            Ranges::Whole => {
                let mut r = if head {
                    Response::new(empty())
                } else {
                    match self.reads.open(&self.scope, d, 0, 0, PIECE).await {
                        Ok(o) => Response::new(stream_body(o.rx)),
                        Err(e) => return from_store(&e, "BLOB_UNKNOWN"),
                    }
                };
                if let Some(s) = size {
                    set(&mut r, "Content-Length", s.to_string());
                }
                r
            }
            Ranges::Parts(parts) if parts.len() == 1 => {
                let (a, b) = parts[0];
                let mut r = if head {
                    Response::new(empty())
                } else {
                    match self
                        .reads
                        .open(&self.scope, d, a as i64, (b - a) as i64, PIECE)
                        .await
                    {
                        Ok(o) => Response::new(stream_body(o.rx)),
                        Err(e) => return from_store(&e, "BLOB_UNKNOWN"),
                    }
                };
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                set(&mut r, "Content-Length", (b - a).to_string());
                set(
                    &mut r,
                    "Content-Range",
                    format!("bytes {a}-{}/{}", b - 1, size.unwrap_or(0)),
                );
                r
            }
            Ranges::Parts(parts) => self.multipart(d, parts, size.unwrap_or(0) as u64, head),
        };
        if r.status().is_success() {
            set(&mut r, "Docker-Content-Digest", d.to_string());
            set(&mut r, "ETag", format!("\"{d}\""));
            r.headers_mut()
                .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            if !r.headers().contains_key(header::CONTENT_TYPE) {
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
            }
        }
        r
    }

    /// A `multipart/byteranges` answer: the parts are read one after another into one body.
    fn multipart(
        &self,
        d: &Digest,
        parts: Vec<(u64, u64)>,
        size: u64,
        head: bool,
    ) -> Response<Body> {
        let boundary = format!("contentd-{:016x}", rand::random::<u64>());
        let heads: Vec<String> = parts
            .iter()
            .map(|(a, b)| {
                format!(
                    "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{}/{size}\r\n\r\n",
                    b - 1
                )
            })
            .collect();
        let tail = format!("\r\n--{boundary}--\r\n");
        let len: u64 = heads.iter().map(|h| h.len() as u64).sum::<u64>()
            + parts.iter().map(|(a, b)| b - a).sum::<u64>()
            + tail.len() as u64;
        let mut r = if head {
            Response::new(empty())
        } else {
            let (tx, rx) = mpsc::channel(4);
            let (reads, scope, d) = (self.reads.clone(), self.scope.clone(), d.clone());
            tokio::spawn(async move {
                for ((a, b), h) in parts.into_iter().zip(heads) {
                    if tx.send(Ok(Bytes::from(h))).await.is_err() {
                        return;
                    }
                    match reads
                        .open(&scope, &d, a as i64, (b - a) as i64, PIECE)
                        .await
                    {
                        Ok(mut o) => {
                            while let Some(piece) = o.rx.recv().await {
                                let fail = piece.is_err();
                                if tx.send(piece).await.is_err() || fail {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok(Bytes::from(tail))).await;
            });
            Response::new(stream_body(rx))
        };
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        set(&mut r, "Content-Length", len.to_string());
        set(
            &mut r,
            "Content-Type",
            format!("multipart/byteranges; boundary={boundary}"),
        );
        r
    }

    async fn delete_blob(&self, d: &Digest) -> Response<Body> {
        self.reads.settle(&self.scope, d).await;
        let (store, scope, d2) = (self.store.clone(), self.scope.clone(), d.clone());
        match blocking(move || store.delete(&scope, &d2)).await {
            Ok(true) => status_only(StatusCode::ACCEPTED),
            Ok(false) => error(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                format!("blob {d} is unknown"),
            ),
            Err(e) => from_store(&e, "BLOB_UNKNOWN"),
        }
    }

    // ---- uploads --------------------------------------------------------------------------

    async fn upload(
        &self,
        name: &str,
        id: Option<String>,
        method: Method,
        q: Option<&str>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let digest = match routes::query_param(q, "digest").map(|s| Digest::parse(&s)) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.message()),
        };
        match (method, id) {
            (Method::POST, None) => {
                if let Some(m) = routes::query_param(q, "mount") {
                    // Cross-repository and anonymous mounts: every repository of the
                    // registry shares one namespace, so a blob it has can be mounted.
                    if let Ok(d) = Digest::parse(&m) {
                        let (store, scope, d2) =
                            (self.store.clone(), self.scope.clone(), d.clone());
                        if let Ok(true) = blocking(move || store.visible(&scope, &d2)).await {
                            return created_blob(name, &d);
                        }
                    }
                }
                let id = format!("{:032x}", rand::random::<u128>());
                match digest {
                    // Monolithic: the body is the blob.
                    Some(d) => self.append_and_commit(name, &id, None, Some(d), req).await,
                    None => match self.open_upload(&id, true).await {
                        Ok(w) => {
                            drop(w);
                            upload_status(name, &id, 0, StatusCode::ACCEPTED)
                        }
                        Err(e) => from_store(&e, "BLOB_UPLOAD_UNKNOWN"),
                    },
                }
            }
            (Method::PATCH, Some(id)) => {
                let range = req
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| routes::content_range(v).ok_or(v.to_string()));
                let start = match range {
                    None => None,
                    Some(Ok((a, _))) => Some(a),
                    Some(Err(v)) => {
                        discard(req.into_body()).await;
                        return error(
                            StatusCode::RANGE_NOT_SATISFIABLE,
                            "BLOB_UPLOAD_INVALID",
                            format!("Content-Range {v:?} is not start-end"),
                        );
                    }
                };
                let mut w = match self.open_upload(&id, false).await {
                    Ok(w) => w,
                    Err(e) => {
                        discard(req.into_body()).await;
                        return from_store(&e, "BLOB_UPLOAD_UNKNOWN");
                    }
                };
                match self.append(&mut w, start, req.into_body()).await {
                    Ok(offset) => upload_status(name, &id, offset, StatusCode::ACCEPTED),
                    Err(r) => r,
                }
            }
            (Method::PUT, Some(id)) => {
                let Some(d) = digest else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "DIGEST_INVALID",
                        "closing an upload needs ?digest=",
                    );
                };
                let start = req
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(routes::content_range)
                    .map(|(a, _)| a);
                self.append_and_commit(name, &id, start, Some(d), req).await
            }
            (Method::GET, Some(id)) => {
                let (store, scope, r) = (self.store.clone(), self.scope.clone(), upload_ref(&id));
                match blocking(move || store.status(&scope, &r)).await {
                    Ok(st) => upload_status(name, &id, st.offset as u64, StatusCode::NO_CONTENT),
                    Err(e) => from_store(&e, "BLOB_UPLOAD_UNKNOWN"),
                }
            }
            (Method::DELETE, Some(id)) => {
                match self.store.abort(&self.scope, &upload_ref(&id)).await {
                    Ok(true) => status_only(StatusCode::NO_CONTENT),
                    Ok(false) => error(
                        StatusCode::NOT_FOUND,
                        "BLOB_UPLOAD_UNKNOWN",
                        format!("upload {id} is unknown"),
                    ),
                    Err(e) => from_store(&e, "BLOB_UPLOAD_UNKNOWN"),
                }
            }
            _ => not_allowed(),
        }
    }

    /// Opens an upload's ingest. `known`: the id is a new upload's or was just checked;
    /// otherwise it is checked here, so an id a client made up is BLOB_UPLOAD_UNKNOWN rather
    /// than a new upload.
    async fn open_upload(
        &self,
        id: &str,
        known: bool,
    ) -> crate::error::Result<crate::store::AsyncWriter> {
        let r = upload_ref(id);
        if !known {
            self.upload_known(id).await?;
        }
        let w = self
            .store
            .open_writer(self.scope.clone(), &r, 0, None, None)
            .await?;
        let mut w = crate::store::AsyncWriter::new(w);
        // Store the ingest at once, so the upload survives a restart before any byte.
        w.step(|w| w.save()).await?;
        Ok(w)
    }

    /// NotFound unless upload `id` is open.
    async fn upload_known(&self, id: &str) -> crate::error::Result<()> {
        let (store, scope, r) = (self.store.clone(), self.scope.clone(), upload_ref(id));
        blocking(move || store.status(&scope, &r).map(|_| ()))
            .await
            .map_err(|e| {
                if e.is(Kind::NotFound) {
                    Error::not_found(format!("upload {id} is unknown"))
                } else {
                    e
                }
            })
    }

    /// Streams a request body onto the end of an upload (checking a client's `start`), in
    /// gathered pieces. Returns the new offset.
    async fn append(
        &self,
        w: &mut crate::store::AsyncWriter,
        start: Option<u64>,
        mut body: Incoming,
    ) -> Result<u64, Response<Body>> {
        let at = w
            .step(|w| w.status().map(|s| s.offset))
            .await
            .map_err(|e| from_store(&e, "BLOB_UPLOAD_UNKNOWN"))?;
        if let Some(s) = start
            && s != at as u64
        {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UPLOAD_INVALID",
                format!("chunk starts at {s}, but the upload has {at} bytes"),
            );
            if at > 0 {
                set(&mut r, "Range", format!("0-{}", at - 1));
            }
            discard(body).await;
            return Err(r);
        }
        let mut offset = at;
        // Writes that keep the blob's chunks whole; a request's last bytes are written before
        // it is answered (an upload's acknowledged offset is stored).
        let mut gather = crate::store::Gather::new(at.max(0) as u64, GATHER);
        loop {
            let frame = body.frame().await;
            let done = frame.is_none();
            let mut piece = None;
            if let Some(f) = frame {
                let f = f.map_err(|e| {
                    error(
                        StatusCode::BAD_REQUEST,
                        "BLOB_UPLOAD_INVALID",
                        format!("reading the upload body: {e}"),
                    )
                })?;
                if let Ok(data) = f.into_data() {
                    piece = gather.push(&data);
                }
            } else {
                piece = gather.rest();
            }
            if let Some(p) = piece {
                offset = w
                    .append(p)
                    .await
                    .map_err(|e| from_store(&e, "BLOB_UPLOAD_INVALID"))?;
            }
            if done {
                return Ok(offset as u64);
            }
        }
    }

    async fn append_and_commit(
        &self,
        name: &str,
        id: &str,
        start: Option<u64>,
        d: Option<Digest>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let Some(d) = d else {
            return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "no digest given");
        };
        let monolithic = start.is_none() && req.method() == Method::POST;
        // An id the client made up is unknown even when its digest is stored here (as in
        // distribution): answering 201 would tell a client its upload landed when it never
        // had one.
        if !monolithic && let Err(e) = self.upload_known(id).await {
            discard(req.into_body()).await;
            return from_store(&e, "BLOB_UPLOAD_UNKNOWN");
        }
        // A blob already here needs no bytes (a client may still send them).
        let (store, scope, d2) = (self.store.clone(), self.scope.clone(), d.clone());
        if let Ok(true) = blocking(move || store.visible(&scope, &d2)).await {
            let _ = self.store.abort(&self.scope, &upload_ref(id)).await;
            discard(req.into_body()).await;
            return created_blob(name, &d);
        }
        // Known: new (monolithic) or checked above.
        let mut w = match self.open_upload(id, true).await {
            Ok(w) => w,
            Err(e) => {
                discard(req.into_body()).await;
                return if is_exists(&e) {
                    created_blob(name, &d)
                } else {
                    from_store(&e, "BLOB_UPLOAD_UNKNOWN")
                };
            }
        };
        if let Err(r) = self.append(&mut w, start, req.into_body()).await {
            return r;
        }
        let d2 = d.clone();
        match w.step(move |w| w.commit(0, Some(d2), None)).await {
            Ok(_) => created_blob(name, &d),
            Err(e) if is_exists(&e) => created_blob(name, &d),
            Err(e) => {
                // A digest mismatch leaves bytes nobody can use: drop the upload.
                drop(w);
                let _ = self.store.abort(&self.scope, &upload_ref(id)).await;
                if e.is(Kind::FailedPrecondition) || e.is(Kind::InvalidArgument) {
                    error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.message())
                } else {
                    from_store(&e, "BLOB_UPLOAD_INVALID")
                }
            }
        }
    }

    // ---- tags and referrers ---------------------------------------------------------------

    async fn tags(
        &self,
        name: &str,
        repo: &Repo,
        q: Option<&str>,
        out: &mut Outcome,
    ) -> Response<Body> {
        let n = match routes::query_param(q, "n").map(|v| v.parse::<usize>()) {
            None => None,
            Some(Ok(n)) => Some(n),
            Some(Err(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "PAGINATION_NUMBER_INVALID",
                    "n must be a number",
                );
            }
        };
        let last = routes::query_param(q, "last");
        let (store, scope) = (self.store.clone(), self.scope.clone());
        let prefix = format!("{}:", repo.canonical);
        let listed = blocking(move || {
            let mut pushed = false;
            let tags = store
                .list_images_named(&scope, &prefix, &crate::filter::Filter::default())?
                .into_iter()
                .filter_map(|i| {
                    pushed |= i.labels.contains_key(ORIGIN_LABEL);
                    i.name.strip_prefix(&prefix).map(str::to_string)
                })
                .filter(|t| routes::tag_ok(t))
                .collect::<Vec<_>>();
            Ok((tags, pushed))
        })
        .await;
        let (mut tags, pushed) = match listed {
            Ok(t) => t,
            Err(e) => return from_store(&e, "NAME_UNKNOWN"),
        };
        // A mirrored repository lists what the upstream has, not only what is cached here;
        // a repository clients pushed to is ours alone.
        out.cache = "hit";
        if let (Some(src), Some(puller), false) = (&repo.upstream, &self.puller, pushed) {
            match self.upstream_tags(&repo.canonical, src, puller).await {
                Ok((up, fetched)) => {
                    if fetched {
                        out.cache = "miss";
                    }
                    tags.extend(up.iter().filter(|t| routes::tag_ok(t)).cloned());
                }
                Err(e) if e.is(Kind::NotFound) => {}
                Err(e) => {
                    tracing::warn!(repository = %repo.canonical, error = %e, "upstream unreachable: listing the stored tags");
                    out.cache = "stale";
                }
            }
        }
        if tags.is_empty() {
            return error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                format!("repository {name} has no tags here"),
            );
        }
        tags.sort();
        tags.dedup();
        if let Some(l) = &last {
            tags.retain(|t| t > l);
        }
        let mut next = None;
        if let Some(n) = n
            && tags.len() > n
        {
            tags.truncate(n);
            next = tags.last().cloned();
        }
        let body = serde_json::json!({ "name": name, "tags": tags });
        let mut r = Response::new(full(body.to_string()));
        set(&mut r, "Content-Type", "application/json");
        if let (Some(n), Some(l)) = (n, next) {
            set(
                &mut r,
                "Link",
                format!("</v2/{name}/tags/list?n={n}&last={l}>; rel=\"next\""),
            );
        }
        r
    }

    /// A mirrored repository's upstream tag list, from the cache while younger than
    /// `tag_ttl_secs`; `true` when it was fetched now. One fetch per repository at a time.
    async fn upstream_tags(
        &self,
        canonical: &str,
        src: &Source,
        puller: &Arc<crate::upstream::pull::Puller>,
    ) -> crate::error::Result<(Arc<Vec<String>>, bool)> {
        let ttl = std::time::Duration::from_secs(self.config.tag_ttl_secs);
        let cached = || {
            self.tag_lists
                .lock()
                .get(canonical)
                .filter(|(at, _)| at.elapsed() < ttl)
                .map(|(_, l)| l.clone())
        };
        if let Some(l) = cached() {
            return Ok((l, false));
        }
        // The gate's key cannot be an image name (those have no space).
        let key = format!("{canonical} tags");
        self.single_flight(&key, async {
            match cached() {
                Some(l) => Ok((l, false)),
                None => puller.upstream().tags(src).await.map(|l| {
                    let l = Arc::new(l);
                    let mut lists = self.tag_lists.lock();
                    lists.retain(|_, (at, _)| at.elapsed() < ttl);
                    if lists.len() >= TAG_LISTS
                        && let Some(oldest) = lists
                            .iter()
                            .min_by_key(|(_, (at, _))| *at)
                            .map(|(k, _)| k.clone())
                    {
                        lists.remove(&oldest);
                    }
                    lists.insert(canonical.to_string(), (Instant::now(), l.clone()));
                    (l, true)
                }),
            }
        })
        .await
    }

    /// The manifests whose subject is `d`: those stored here, and for a mirrored repository
    /// also those the upstream lists (stored ones first; an unreachable upstream leaves the
    /// stored ones, as a stale tag is served). The artifactType filter is applied here to
    /// both.
    async fn referrers(
        &self,
        repo: &Repo,
        d: &Digest,
        q: Option<&str>,
        out: &mut Outcome,
    ) -> Response<Body> {
        let want = routes::query_param(q, "artifactType");
        let (store, scope, d2, max) = (
            self.store.clone(),
            self.scope.clone(),
            d.clone(),
            self.max_manifest,
        );
        let listed = blocking(move || {
            let mut out = Vec::new();
            for e in store.visible_parents(&scope, &d2)? {
                if e.role != Role::Subject {
                    continue;
                }
                let Some((mt, size)) = store.blob_media_type(&e.from)? else {
                    continue;
                };
                if size as usize > max {
                    continue;
                }
                let loc = store.locate(&scope, &e.from)?;
                let bytes = store.read_extent(loc.extent, 0, loc.size as usize)?;
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let artifact = v
                    .get("artifactType")
                    .and_then(|a| a.as_str())
                    .or_else(|| v.pointer("/config/mediaType").and_then(|a| a.as_str()))
                    .unwrap_or("")
                    .to_string();
                let mut desc = serde_json::json!({
                    "mediaType": if mt.is_empty() { v.get("mediaType").and_then(|m| m.as_str()).unwrap_or(OCI_MANIFEST).to_string() } else { mt },
                    "digest": e.from.to_string(),
                    "size": size,
                    "artifactType": artifact,
                });
                if let Some(a) = v.get("annotations") {
                    desc["annotations"] = a.clone();
                }
                out.push((artifact, desc));
            }
            Ok(out)
        })
        .await;
        let mut all = match listed {
            Ok(v) => v,
            Err(e) => return from_store(&e, "MANIFEST_UNKNOWN"),
        };
        out.cache = "hit";
        if let (Some(src), Some(puller)) = (&repo.upstream, &self.puller) {
            match puller.upstream().referrers(src, d).await {
                Ok(up) => {
                    out.cache = "miss";
                    let mut seen: std::collections::HashSet<String> = all
                        .iter()
                        .filter_map(|(_, v)| v["digest"].as_str().map(str::to_string))
                        .collect();
                    for v in up {
                        // Only well-formed descriptors, each once.
                        let Some(digest) =
                            v["digest"].as_str().filter(|s| Digest::parse(s).is_ok())
                        else {
                            continue;
                        };
                        if !v["size"].is_u64() || !v["mediaType"].is_string() {
                            continue;
                        }
                        if !seen.insert(digest.to_string()) {
                            continue;
                        }
                        let artifact = v["artifactType"].as_str().unwrap_or("").to_string();
                        all.push((artifact, v));
                    }
                }
                Err(e) => {
                    tracing::warn!(repository = %repo.canonical, error = %e, "upstream referrers unavailable: listing the stored ones");
                    out.cache = "stale";
                }
            }
        }
        let manifests: Vec<serde_json::Value> = all
            .into_iter()
            .filter(|(a, _)| want.as_ref().is_none_or(|w| w == a))
            .map(|(_, d)| d)
            .collect();
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        let mut r = Response::new(full(body.to_string()));
        set(&mut r, "Content-Type", OCI_INDEX);
        if want.is_some() {
            set(&mut r, "OCI-Filters-Applied", "artifactType");
        }
        r
    }
}

fn upload_ref(id: &str) -> String {
    format!("registry-upload-{id}")
}

fn upload_status(name: &str, id: &str, offset: u64, status: StatusCode) -> Response<Body> {
    let mut r = status_only(status);
    set(&mut r, "Location", format!("/v2/{name}/blobs/uploads/{id}"));
    set(&mut r, "Docker-Upload-UUID", id);
    set(&mut r, "Range", format!("0-{}", offset.saturating_sub(1)));
    set(&mut r, "Content-Length", "0");
    r
}

fn created_blob(name: &str, d: &Digest) -> Response<Body> {
    let mut r = status_only(StatusCode::CREATED);
    set(&mut r, "Location", format!("/v2/{name}/blobs/{d}"));
    set(&mut r, "Docker-Content-Digest", d.to_string());
    set(&mut r, "Content-Length", "0");
    r
}

fn not_allowed() -> Response<Body> {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "UNSUPPORTED",
        "method not allowed on this route",
    )
}

fn echo_ns(mut r: Response<Body>, repo: &Repo) -> Response<Body> {
    if let Some(ns) = &repo.ns {
        set(&mut r, "OCI-Namespace", ns);
    }
    r
}

/// Whether an Accept header list allows `mt` (no header, or a wildcard, allows anything).
fn accepts<'a>(values: impl Iterator<Item = &'a HeaderValue>, mt: &str) -> bool {
    let mut any = false;
    for v in values {
        for item in v.to_str().unwrap_or("").split(',') {
            let t = item.split(';').next().unwrap_or("").trim();
            if t.is_empty() {
                continue;
            }
            any = true;
            if t == mt || t == "*/*" || t == "application/*" {
                return true;
            }
        }
    }
    !any
}

/// The most of a refused request's body read (and dropped) before answering.
const DISCARD_MAX: usize = 8 << 20;

/// Reads and drops what is left of a body whose request is refused (or needs none of it),
/// up to DISCARD_MAX bytes within two seconds. An HTTP/1.1 server that answers without
/// reading the body closes the connection on the unread bytes, and a client still sending
/// them then sees a reset, not the answer (a 416 for a chunk with a gap was lost this way).
/// A larger or slower body still gets the answer, on a connection then closed.
async fn discard(mut body: Incoming) {
    let drain = async {
        let mut n = 0usize;
        while let Some(Ok(f)) = body.frame().await {
            n = n.saturating_add(f.data_ref().map_or(0, |d| d.len()));
            if n > DISCARD_MAX {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_hosts_from_ns() {
        for ok in [
            "docker.io",
            "registry-1.docker.io",
            "localhost:5000",
            "127.0.0.1:5067",
            "[::1]:5000",
            "quay.io",
            "a-b.example",
        ] {
            assert!(registry_host(ok), "{ok}");
        }
        for bad in [
            "",
            "../../x",
            "a/b",
            "-a.io",
            "a..io",
            "host:",
            "host:123456",
            "host:x",
            "[zz]:1",
            "a b",
            "a\u{0}b",
            ":80",
        ] {
            assert!(!registry_host(bad), "{bad:?}");
        }
    }

    #[test]
    fn accept_lists() {
        let h = |s: &'static str| vec![HeaderValue::from_static(s)];
        assert!(accepts(h("").iter(), OCI_MANIFEST));
        assert!(accepts(std::iter::empty(), OCI_MANIFEST));
        assert!(accepts(
            h("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json;q=0.5").iter(),
            OCI_MANIFEST
        ));
        assert!(!accepts(
            h("application/vnd.docker.distribution.manifest.v2+json").iter(),
            OCI_INDEX
        ));
        assert!(accepts(h("*/*").iter(), OCI_INDEX));
    }

    #[test]
    fn docker_library_names() {
        assert_eq!(upstream_path("docker.io", "alpine"), "library/alpine");
        assert_eq!(upstream_path("docker.io", "x/alpine"), "x/alpine");
        assert_eq!(upstream_path("quay.io", "alpine"), "alpine");
        assert!(host_like("localhost"));
        assert!(host_like("127.0.0.1:5000"));
        assert!(host_like("docker.io"));
        assert!(!host_like("library"));
        assert_eq!(host_of_component("127.0.0.1_5001"), "127.0.0.1:5001");
        assert_eq!(host_of_component("localhost:5000"), "localhost:5000");
        assert_eq!(host_of_component("quay.io"), "quay.io");
    }
}
