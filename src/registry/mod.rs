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

/// TLS for a non-loopback registry listener, from the daemon's `[tls]` settings.
fn tls_acceptor(tls: &crate::config::Tls) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("reading {}", tls.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("reading key {}", tls.key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading {}", ca.display()))?
            {
                roots.add(c.with_context(|| format!("parsing {}", ca.display()))?)?;
            }
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("registry TLS certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
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
        Some(tls_acceptor(tls)?)
    };
    tracing::info!(addr = %local, tls = acceptor.is_some(), read_only = registry.config.read_only, "registry listening");
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(crate::daemon::accepting(
            tokio_stream::wrappers::TcpListenerStream::new(l)
        ));
        loop {
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
                let peer_s = peer.to_string();
                let svc = hyper::service::service_fn(move |req| {
                    let (reg, peer) = (reg.clone(), peer_s.clone());
                    async move { Ok::<_, std::convert::Infallible>(reg.handle(req, peer).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let r = match acceptor {
                    None => {
                        let io = hyper_util::rt::TokioIo::new(conn);
                        tokio::select! {
                            r = builder.serve_connection(io, svc) => r,
                            _ = stop.cancelled() => Ok(()),
                        }
                    }
                    Some(a) => match a.accept(conn).await {
                        Ok(s) => {
                            let io = hyper_util::rt::TokioIo::new(s);
                            tokio::select! {
                                r = builder.serve_connection(io, svc) => r,
                                _ = stop.cancelled() => Ok(()),
                            }
                        }
                        Err(e) => {
                            tracing::debug!(peer = %peer, error = %e, "registry TLS handshake failed");
                            return;
                        }
                    },
                };
                if let Err(e) = r {
                    tracing::debug!(peer = %peer, error = %e, "registry connection ended");
                }
            });
        }
    });
    Ok(local)
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
