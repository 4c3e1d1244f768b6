//! The OCI distribution API over HTTP, served from the same store as the gRPC services, so
//! every runtime (containerd's hosts.toml, CRI-O and podman's registries.conf, docker's
//! registry-mirrors) can use contentd as a registry and as a pull-through mirror.
//!
//! This module owns the listener (plain HTTP on loopback, TLS elsewhere, optional htpasswd
//! basic auth, a read-only switch), request admission, the access log and the per-route
//! metrics; [`api`] owns what each route does, [`routes`] the URL grammar.
//!
//! One model for both APIs: repositories and tags are image records (`images.v1`) in the
//! configured namespace, named `<canonical repository>:<tag>`, so `ctr images ls` and
//! `contentd images ls` show what the registry holds, and tags are garbage-collection roots.
//! Every byte a client pushes or an upstream serves goes through the store's one write path.

// A handler's early answer is the HTTP response itself (128 bytes), made once per request.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod evict;
pub mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::reads::Reads;
use crate::store::{Scope, Store};
use crate::upstream::pull::Puller;

/// `[registry]` in the configuration file (the listener address is `registry_addr`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// The namespace whose image records are the registry's repositories and tags.
    pub namespace: String,
    /// Refuse every push and delete (a pure mirror).
    pub read_only: bool,
    /// An htpasswd file of bcrypt entries: when set, every request needs basic auth.
    pub htpasswd: Option<PathBuf>,
    /// A mirrored tag is served from the store for this long before it is checked upstream
    /// again (and served stale while the upstream is unreachable). Digests never are.
    pub tag_ttl_secs: u64,
    /// The upstream for repositories that name none (docker's registry-mirrors): one-part
    /// names get `library/`. Empty: such repositories are only what clients push.
    pub default_upstream: String,
    /// Bytes (MiB) the registry's namespace may hold: past it, mirrored images are evicted
    /// least recently used first (checked every `eviction_check_secs`; pushed images are
    /// never evicted, and a blob a kept image needs always stays). 0: no limit. Mirrored
    /// images are also evicted this way while the disk is past its high watermark.
    pub max_mib: u64,
    /// Seconds a connection may stay silent where the client must speak first: the TLS
    /// handshake, a request's headers, the next request on a kept-alive connection (see
    /// [`IDLE_DEFAULT`]). At least 1.
    pub idle_timeout_secs: u64,
    /// Connections served at once; past it, new ones wait in the listen queue until one
    /// ends. This is what bounds the listener's memory against clients that connect and
    /// stall (up to ~330 KiB each while a stalled download lasts). At least 1.
    pub max_connections: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            namespace: "default".into(),
            read_only: false,
            htpasswd: None,
            tag_ttl_secs: 300,
            default_upstream: "docker.io".into(),
            max_mib: 0,
            idle_timeout_secs: IDLE_DEFAULT.as_secs(),
            max_connections: 256,
        }
    }
}

/// The response body type of every route.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, crate::error::Error>;

/// An upstream tag list and when it was fetched.
type TagList = (Instant, Arc<Vec<String>>);

/// The shared state of the registry listener.
pub struct Registry {
    store: Arc<Store>,
    reads: Arc<Reads>,
    puller: Option<Arc<Puller>>,
    scope: Scope,
    config: RegistryConfig,
    max_manifest: usize,
    users: Option<Users>,
    /// One upstream check per mirrored tag at a time; the others wait and then find it fresh.
    tag_checks: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Mirrored repositories' upstream tag lists, each fresh for `tag_ttl_secs` (at most
    /// [`api::TAG_LISTS`] repositories are held).
    tag_lists: parking_lot::Mutex<HashMap<String, TagList>>,
}

impl Registry {
    pub fn new(
        store: Arc<Store>,
        reads: Arc<Reads>,
        puller: Option<Arc<Puller>>,
        config: RegistryConfig,
        max_manifest: usize,
    ) -> anyhow::Result<Arc<Registry>> {
        let scope = Scope::namespace(&config.namespace)
            .map_err(|e| anyhow::anyhow!("registry namespace: {e}"))?;
        let users = match &config.htpasswd {
            Some(p) => Some(Users::load(p)?),
            None => None,
        };
        Ok(Arc::new(Registry {
            store,
            reads,
            puller,
            scope,
            config,
            max_manifest,
            users,
            tag_checks: Default::default(),
            tag_lists: Default::default(),
        }))
    }

    /// Admission, dispatch, access log and metrics of one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: String) -> Response<Body> {
        let t0 = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let mut out = api::Outcome::default();
        let mut resp = match self.admit(&req) {
            Err(r) => r,
            Ok(user) => {
                out.user = user;
                self.clone().route(req, &mut out).await
            }
        };
        let status = resp.status().as_u16();
        let h = resp.headers_mut();
        h.insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
        if status >= 400 && matches!(method.as_str(), "PUT" | "POST" | "PATCH") {
            // A refusal may come before the request body was read (an unknown upload, a
            // gap, an oversize manifest): the connection cannot carry another request, and
            // saying so keeps a client from reusing it.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let m = crate::metrics::get();
        let method_label = match method.as_str() {
            "GET" | "HEAD" | "PUT" | "POST" | "PATCH" | "DELETE" => method.as_str(),
            _ => "other",
        };
        m.registry_requests.add(
            &[out.route, method_label, status_label(status), out.cache],
            1,
        );
        m.registry_seconds
            .observe(&[out.route], t0.elapsed().as_secs_f64());
        tracing::info!(
            target: "contentd::access",
            peer = %peer,
            user = out.user.as_deref().unwrap_or("-"),
            method = %method,
            path = %path,
            status,
            route = out.route,
            cache = out.cache,
            ms = t0.elapsed().as_millis() as u64,
            "registry request"
        );
        resp
    }

    /// Basic auth against the htpasswd file, when one is configured.
    fn admit(&self, req: &Request<Incoming>) -> Result<Option<String>, Response<Body>> {
        let Some(users) = &self.users else {
            return Ok(None);
        };
        let creds = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|b| String::from_utf8(b).ok());
        if let Some(c) = creds
            && let Some((user, pass)) = c.split_once(':')
            && users.check(user, pass)
        {
            return Ok(Some(user.to_string()));
        }
        let mut r = api::error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "authentication required",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"contentd\""),
        );
        Err(r)
    }
}

fn status_label(s: u16) -> &'static str {
    match s {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        206 => "206",
        307 => "307",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        413 => "413",
        416 => "416",
        500 => "500",
        502 => "502",
        503 => "503",
        507 => "507",
        _ => "other",
    }
}

/// htpasswd users (bcrypt only). bcrypt is deliberately slow (~0.1 s per check at cost 10),
/// so a password that verified once is remembered by its SHA-256 and the next request with
/// the same credentials costs a hash, not a bcrypt.
struct Users {
    hashes: HashMap<String, String>,
    verified: parking_lot::Mutex<HashMap<String, [u8; 32]>>,
}

impl Users {
    fn load(path: &Path) -> anyhow::Result<Users> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading htpasswd {}", path.display()))?;
        let mut hashes = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').with_context(|| {
                format!(
                    "htpasswd {} line {}: expected user:hash",
                    path.display(),
                    n + 1
                )
            })?;
            if !(hash.starts_with("$2y$") || hash.starts_with("$2a$") || hash.starts_with("$2b$")) {
                anyhow::bail!(
                    "htpasswd {} line {}: user {user:?} is not bcrypt (make it with `htpasswd -B`)",
                    path.display(),
                    n + 1
                );
            }
            hashes.insert(user.to_string(), hash.to_string());
        }
        Ok(Users {
            hashes,
            verified: Default::default(),
        })
    }

    fn check(&self, user: &str, pass: &str) -> bool {
        let Some(hash) = self.hashes.get(user) else {
            return false;
        };
        use sha2::Digest as _;
        let fp: [u8; 32] = sha2::Sha256::digest(pass.as_bytes()).into();
        if self.verified.lock().get(user) == Some(&fp) {
            return true;
        }
        let ok = bcrypt::verify(pass, hash).unwrap_or(false);
        if ok {
            self.verified.lock().insert(user.to_string(), fp);
        }
        ok
    }
}

/// Serves the registry on `addr` until `stop`: plain HTTP on a loopback address, TLS (from
/// `[tls]`) on any other.
pub async fn serve(
    registry: Arc<Registry>,
    addr: &str,
    tls: Option<&crate::config::Tls>,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding registry {addr}"))?;
    let local = l.local_addr()?;
    let acceptor = if local.ip().is_loopback() {
        None
    } else {
        let tls = tls.with_context(|| {
            format!("registry_addr {addr} is not loopback: it needs [tls] (cert and key)")
        })?;
        Some(crate::net::tls_acceptor(tls, &[b"h2", b"http/1.1"])?)
    };
    tracing::info!(addr = %local, tls = acceptor.is_some(), read_only = registry.config.read_only, "registry listening");
    let idle = std::time::Duration::from_secs(registry.config.idle_timeout_secs.max(1));
    let slots = Arc::new(tokio::sync::Semaphore::new(
        registry.config.max_connections.max(1),
    ));
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(crate::daemon::accepting(
            tokio_stream::wrappers::TcpListenerStream::new(l)
        ));
        loop {
            // Taken before the accept, so past the cap connections wait in the kernel's
            // listen queue, holding nothing here.
            let slot = tokio::select! {
                _ = stop.cancelled() => return,
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => return,
                },
            };
            let conn = tokio::select! {
                _ = stop.cancelled() => return,
                c = futures::StreamExt::next(&mut incoming) => match c {
                    Some(Ok(c)) => c,
                    // `accepting` retries failed accepts itself; this is the listener's end.
                    _ => return,
                },
            };
            let Ok(peer) = conn.peer_addr() else {
                continue;
            };
            let _ = conn.set_nodelay(true);
            let (reg, acceptor, stop) = (registry.clone(), acceptor.clone(), stop.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let peer_s = peer.to_string();
                let sending = Arc::new(Sending::default());
                let sending_svc = sending.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let (reg, peer, sending) = (reg.clone(), peer_s.clone(), sending_svc.clone());
                    async move {
                        let r = reg.handle(req, peer).await;
                        Ok::<_, std::convert::Infallible>(r.map(|b| sending.watch(b)))
                    }
                });
                let stalled = sending.stalled(idle);
                let mut builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                // hyper's header timeout also bounds the wait for a keep-alive connection's
                // next request (see `IDLE_DEFAULT`).
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(idle);
                builder
                    .http2()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive_interval(Some(idle))
                    .keep_alive_timeout(PING_WAIT)
                    .max_concurrent_streams(H2_STREAMS);
                let r = match acceptor {
                    None => {
                        let io = hyper_util::rt::TokioIo::new(crate::net::Guarded::new(conn, idle));
                        tokio::select! {
                            r = builder.serve_connection(io, svc) => r,
                            _ = stop.cancelled() => Ok(()),
                            _ = stalled => Ok(()),
                        }
                    }
                    Some(a) => {
                        let Some(s) = crate::net::handshake(&a, conn, idle, "registry").await
                        else {
                            return;
                        };
                        let io = hyper_util::rt::TokioIo::new(crate::net::Guarded::new(s, idle));
                        tokio::select! {
                            r = builder.serve_connection(io, svc) => r,
                            _ = stop.cancelled() => Ok(()),
                            _ = stalled => Ok(()),
                        }
                    }
                };
                if let Err(e) = r {
                    tracing::debug!(peer = %peer, error = %e, "registry connection ended");
                }
            });
        }
    });
    Ok(local)
}

/// How long a connection may wait, by default, for what a client must send first: the TLS
/// handshake, the bytes that say which HTTP it speaks, a request's headers, and (HTTP/1.1)
/// the next request on a kept-alive connection (hyper bounds both with one timer). Without
/// these bounds every connection a client opened and left silent held a descriptor and its
/// buffers for good (2,000 silent or half-sent connections: +29 MiB RSS, all still open
/// minutes later). nginx's header timeout; clients that keep idle connections longer (Go's
/// transport: 90 s) see the close and open another.
pub const IDLE_DEFAULT: std::time::Duration = std::time::Duration::from_secs(60);
/// An HTTP/2 connection whose peer does not answer a keep-alive ping this fast is closed.
const PING_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// Streams one HTTP/2 connection may have open at once. Each response stream can hold a
/// piece (up to 256 KiB) in the transport, so this times `max_connections` bounds what
/// stalled HTTP/2 clients can pin until the idle timeout closes them (hyper's default, 200,
/// let 4 connections of 100 stalled GETs take the daemon from 29 to 145 MiB RSS). Runtimes
/// pull a few layers at a time (containerd and docker: 3), and Go's HTTP/2 client opens
/// another connection when a server's limit is reached.
const H2_STREAMS: u32 = 16;

/// The response bodies of one connection that are still sending, for its stall watchdog.
///
/// HTTP/2 lets a client keep a connection busy (reading other streams, answering pings, so
/// no write ever blocks and `Guarded` never fires) while it never opens one stream's flow
/// control window: hyper has handed that stream's next piece to h2, which holds it until the
/// window opens, and stops polling the body. Measured with an h2 client that set a 1-byte
/// stream window: 4 connections of 100 such GETs of a 3 MB blob took the daemon from 29 to
/// 145 MiB RSS, held until the client left; hyper allows 200 streams a connection, so 256
/// connections could pin about 13 GiB. hyper cannot reset one stream from outside, so a
/// connection with a body that has waited `idle` for hyper to come back for more (the
/// client took none of its last piece) is closed, like an HTTP/1.1 connection whose write
/// blocked that long. A client must therefore take each piece (at most 256 KiB) within the
/// idle timeout.
#[derive(Default)]
struct Sending {
    bodies: parking_lot::Mutex<Vec<std::sync::Weak<Progress>>>,
}

/// One response body's progress: when it last handed hyper a frame, and whether hyper has
/// not come back for another since (the frame is still in the transport).
struct Progress(parking_lot::Mutex<(Instant, bool)>);

impl Sending {
    fn watch(&self, inner: Body) -> Body {
        let progress = Arc::new(Progress(parking_lot::Mutex::new((Instant::now(), false))));
        let mut bodies = self.bodies.lock();
        bodies.retain(|w| w.strong_count() > 0);
        bodies.push(Arc::downgrade(&progress));
        http_body_util::BodyExt::boxed_unsync(Watched {
            inner,
            progress,
            sent: false,
        })
    }

    /// Resolves once a body has waited `idle` for the client to take its last frame.
    async fn stalled(self: Arc<Self>, idle: std::time::Duration) {
        let tick = (idle / 4).max(std::time::Duration::from_millis(100));
        loop {
            tokio::time::sleep(tick).await;
            let stuck = self.bodies.lock().iter().any(|w| {
                w.upgrade().is_some_and(|p| {
                    let (at, waiting) = *p.0.lock();
                    waiting && at.elapsed() >= idle
                })
            });
            if stuck {
                tracing::warn!(
                    idle_secs = idle.as_secs_f64(),
                    "registry connection closed: a response took none of its data within the idle timeout"
                );
                return;
            }
        }
    }
}

struct Watched {
    inner: Body,
    progress: Arc<Progress>,
    sent: bool,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = crate::error::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Bytes>, Self::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let handed = matches!(&r, std::task::Poll::Ready(Some(Ok(f))) if f.is_data());
        // hyper came back for more: whatever it took last is out of the transport.
        let mut p = self.progress.0.lock();
        *p = if handed {
            (Instant::now(), true)
        } else {
            (p.0, false)
        };
        drop(p);
        self.sent |= handed;
        r
    }

    /// Once a frame went out the end is only ever learnt by polling again: a body that said
    /// it had ended with its last frame would be dropped while h2 still held that frame,
    /// out of the watchdog's sight. A body that sent nothing holds nothing.
    fn is_end_stream(&self) -> bool {
        !self.sent && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a request body of at most `limit` bytes.
pub(crate) async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Response<Body>> {
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            api::error(
                StatusCode::BAD_REQUEST,
                "BLOB_UPLOAD_INVALID",
                format!("reading the request body: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(api::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "SIZE_INVALID",
                    format!("request body over the {limit}-byte limit"),
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}
