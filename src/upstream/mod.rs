//! Upstream OCI registries: per-host configuration (endpoint, mirrors, plain HTTP, CA/TLS,
//! basic auth; the distribution-spec bearer-token flow is negotiated per request) and a
//! distribution-spec client for what contentd needs — resolving a reference to a manifest
//! and fetching blobs, whole or by range.
//!
//! Every request to a registry goes through one function (`Upstream::get`): credentials as
//! the endpoint asks for them, a bearer token from the 401's own challenge, one retry.
//! Everything leaves here as domain types and [`Error`]s with a kind: 404s are NotFound,
//! refused credentials PermissionDenied, a dead or crawling upstream Unavailable, wrong bytes
//! DataLoss (caught at commit by the store).
//!
//! Memory is bounded by what contentd asks for, never by what an upstream sends: blobs
//! stream, and what is read whole (manifests, tag-list pages, token responses, error bodies)
//! goes through one reader that stops at a size limit (`read_bounded`). That is why this is
//! contentd's own client on reqwest, not a registry client crate: the ones available read
//! token responses and error bodies whole, from whatever host a challenge's realm names.

pub mod pull;
pub mod tee;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use oci_spec::distribution::Reference;
use parking_lot::Mutex;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{Error, Kind, Result};

/// Every manifest type contentd understands, in order of preference.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Tags asked of an upstream per tag-list request.
pub const TAG_PAGE: usize = 1000;
/// The most tags contentd takes from one upstream repository's list.
pub const MAX_TAGS: usize = 100_000;
/// The largest tag-list page read (enough for a registry that ignores `n` and sends
/// [`MAX_TAGS`] names of the spec's 128-character maximum).
const MAX_TAG_PAGE: usize = 16 << 20;
/// Bearer tokens remembered (per endpoint and repository) before the cache starts over.
const MAX_TOKENS: usize = 1024;
/// Most of a token response read (tokens are JWTs of a few KiB).
const MAX_TOKEN_BODY: usize = 256 << 10;

/// How to reach one registry host (the `[upstream.registries."HOST"]` table).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryHost {
    /// Where the registry really answers, e.g. "https://registry.example.com" or
    /// "http://127.0.0.1:5000". Default: https://HOST (http:// for loopback hosts).
    pub endpoint: Option<String>,
    /// Tried in order before the endpoint; a mirror that fails or lacks the content is
    /// skipped. Same URL form as `endpoint`.
    pub mirrors: Vec<String>,
    /// PEM file of extra CA certificates trusted for this host's endpoints.
    pub ca_file: Option<PathBuf>,
    /// Skip TLS certificate verification (testing only).
    pub insecure_skip_verify: bool,
    /// Basic credentials, sent directly or exchanged for a bearer token as the registry asks.
    pub username: Option<String>,
    pub password: Option<String>,
}

/// The `[upstream]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub registries: HashMap<String, RegistryHost>,
    /// Seconds to wait for a connection.
    pub connect_timeout_secs: u64,
    /// Seconds without a byte from the upstream before a fetch is abandoned (a crawling
    /// upstream is an error, not a hang).
    pub read_timeout_secs: u64,
    /// Layers fetched at once by one eager pull.
    pub max_concurrent_downloads: usize,
    /// Attempts per blob when the upstream fails mid-stream (each resumes with Range).
    pub fetch_attempts: u32,
    /// When not empty, the only registry hosts (as named in references, e.g. "docker.io",
    /// "127.0.0.1:5000") contentd fetches from: a node's daemon must not become an open HTTP
    /// fetcher for whoever can reach its socket. Anything else is PermissionDenied.
    pub allowed_registries: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            registries: HashMap::new(),
            connect_timeout_secs: 10,
            read_timeout_secs: 30,
            max_concurrent_downloads: 3,
            fetch_attempts: 4,
            allowed_registries: Vec::new(),
        }
    }
}

impl UpstreamConfig {
    pub fn validate(&self) -> Result<()> {
        for (host, h) in &self.registries {
            for url in h.endpoint.iter().chain(h.mirrors.iter()) {
                Endpoint::parse(url)
                    .map_err(|e| Error::invalid(format!("upstream registry {host:?}: {e}")))?;
            }
            if let Some(f) = &h.ca_file {
                std::fs::read(f).map_err(|e| {
                    Error::invalid(format!(
                        "upstream registry {host:?}: ca_file {}: {e}",
                        f.display()
                    ))
                })?;
            }
            if h.username.is_some() != h.password.is_some() {
                return Err(Error::invalid(format!(
                    "upstream registry {host:?}: username and password go together"
                )));
            }
            if h.username.is_some() {
                let ep = match &h.endpoint {
                    Some(url) => Endpoint::parse(url).map_err(Error::invalid)?,
                    None => Endpoint::default_for(host),
                };
                if !ep.may_carry_credentials() {
                    return Err(Error::invalid(format!(
                        "upstream registry {host:?}: credentials would go over plain HTTP to \
                         {}, which is not a loopback host; use https://",
                        ep.host
                    )));
                }
            }
        }
        if self.max_concurrent_downloads == 0 || self.fetch_attempts == 0 {
            return Err(Error::invalid(
                "upstream max_concurrent_downloads and fetch_attempts must be at least 1",
            ));
        }
        Ok(())
    }
}

/// One place a registry answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Endpoint {
    plain_http: bool,
    /// host[:port], as the HTTP client addresses it.
    host: String,
}

impl Endpoint {
    /// `scheme://host/v2/` followed by `path`.
    fn v2(&self, path: &str) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        format!("{scheme}://{}/v2/{path}", self.host)
    }

    fn parse(url: &str) -> std::result::Result<Endpoint, String> {
        let (plain_http, rest) = if let Some(r) = url.strip_prefix("http://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (false, r)
        } else {
            return Err(format!(
                "endpoint {url:?} must start with http:// or https://"
            ));
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(format!(
                "endpoint {url:?} must be a scheme and host[:port], without a path"
            ));
        }
        Ok(Endpoint {
            plain_http,
            host: host.to_string(),
        })
    }

    /// Credentials go over TLS, or in the clear only to this machine.
    fn may_carry_credentials(&self) -> bool {
        !self.plain_http || is_loopback(&self.host)
    }

    fn default_for(host: &str) -> Endpoint {
        Endpoint {
            plain_http: is_loopback(host),
            host: if host == "docker.io" {
                "index.docker.io".to_string()
            } else {
                host.to_string()
            },
        }
    }
}

/// Whether `host[:port]` names this machine.
fn is_loopback(host: &str) -> bool {
    let name = if host.starts_with('[') {
        host.split_once(']').map(|(h, _)| &h[1..]).unwrap_or(host)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where a blob can be fetched from: the registry host as named in the reference (its
/// configuration picks endpoints and credentials) and the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub registry: String,
    pub repository: String,
}

/// A blob body from the upstream.
pub struct BlobBody {
    /// Bytes from the requested offset on.
    pub stream: futures::stream::BoxStream<'static, Result<Bytes>>,
    /// Content-Length of this response, when sent.
    pub length: Option<u64>,
}

/// The credentials configured for one endpoint.
#[derive(Debug, Clone, PartialEq)]
enum Auth {
    Anonymous,
    Basic(String, String),
}

/// The distribution-spec client.
pub struct Upstream {
    config: UpstreamConfig,
    /// The largest manifest or index read from an upstream (`max_manifest_bytes`).
    max_document: usize,
    /// One HTTP client (connection pool, CA roots) per endpoint.
    clients: Mutex<HashMap<Endpoint, reqwest::Client>>,
    /// Bearer tokens, per (endpoint, repository).
    tokens: Mutex<HashMap<(Endpoint, String), String>>,
}

impl Upstream {
    /// `max_document`: the largest manifest or index taken from an upstream.
    pub fn new(config: UpstreamConfig, max_document: usize) -> Result<Upstream> {
        config.validate()?;
        // reqwest is built without a bundled TLS provider; ring is the one rustls uses here.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Upstream {
            config,
            max_document,
            clients: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    fn host(&self, registry: &str) -> RegistryHost {
        self.config
            .registries
            .get(registry)
            .cloned()
            .unwrap_or_default()
    }

    /// Mirrors first, then the endpoint.
    fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let h = self.host(registry);
        let mut out: Vec<Endpoint> = h
            .mirrors
            .iter()
            .filter_map(|m| Endpoint::parse(m).ok())
            .collect();
        out.push(
            h.endpoint
                .as_deref()
                .and_then(|e| Endpoint::parse(e).ok())
                .unwrap_or_else(|| Endpoint::default_for(registry)),
        );
        out
    }

    /// The credentials for one endpoint of `registry`. A registry's credentials go only to
    /// its own endpoint; a mirror gets the credentials configured for the mirror's own host
    /// (its `[upstream.registries."MIRROR-HOST"]` table), else none. Nothing goes in the
    /// clear to another machine.
    fn auth(&self, registry: &str, ep: &Endpoint, mirror: bool) -> Auth {
        let h = if mirror {
            match self.config.registries.get(&ep.host) {
                Some(h) => h.clone(),
                None => return Auth::Anonymous,
            }
        } else {
            self.host(registry)
        };
        match (h.username, h.password) {
            (Some(u), Some(p)) if ep.may_carry_credentials() => Auth::Basic(u, p),
            (Some(_), Some(_)) => {
                tracing::warn!(registry, endpoint = %ep.host, "not sending credentials over plain HTTP to a non-loopback host");
                Auth::Anonymous
            }
            _ => Auth::Anonymous,
        }
    }

    /// The metrics label for `registry`: its name when the configuration names it, else
    /// "other", so references from clients can never grow the label set without bound.
    pub fn metric_label<'a>(&self, registry: &'a str) -> &'a str {
        if self.config.registries.contains_key(registry)
            || self.config.allowed_registries.iter().any(|a| a == registry)
        {
            registry
        } else {
            "other"
        }
    }

    /// Refuses a registry outside `allowed_registries` (when that list is set).
    pub fn check_allowed(&self, registry: &str) -> Result<()> {
        let allowed = &self.config.allowed_registries;
        if allowed.is_empty() || allowed.iter().any(|a| a == registry) {
            return Ok(());
        }
        Err(Error::new(
            Kind::PermissionDenied,
            format!(
                "registry {registry:?} is not in upstream.allowed_registries ({}); contentd \
                 fetches only from the registries it is configured to trust",
                allowed.join(", ")
            ),
        ))
    }

    fn client(&self, registry: &str, ep: &Endpoint) -> Result<reqwest::Client> {
        if let Some(c) = self.clients.lock().get(ep) {
            return Ok(c.clone());
        }
        let h = self.host(registry);
        // Redirects are followed (registries send blob GETs to a CDN); reqwest drops
        // Authorization when one leaves the host, so credentials never follow them.
        let mut http = reqwest::Client::builder()
            .user_agent(concat!("contentd/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(self.config.connect_timeout_secs))
            .read_timeout(Duration::from_secs(self.config.read_timeout_secs))
            .tls_danger_accept_invalid_certs(h.insecure_skip_verify);
        if let Some(f) = &h.ca_file {
            let data = std::fs::read(f).map_err(|e| {
                Error::invalid(format!("ca_file {} for {registry}: {e}", f.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&data).map_err(|e| {
                Error::invalid(format!("upstream {registry}: ca_file certificate: {e}"))
            })?;
            http = http.tls_certs_merge(certs);
        }
        let http = http
            .build()
            .map_err(|e| Error::invalid(format!("upstream client for {registry}: {e}")))?;
        self.clients.lock().insert(ep.clone(), http.clone());
        Ok(http)
    }

    /// Sends `method` for `/v2/REPOSITORY/PATH` to `ep` with `headers`. Credentials: a
    /// bearer token remembered for the repository, else the configured basic credentials; a
    /// 401 gets a fresh token from its own challenge (`token`) and one retry. Returns a
    /// success response; an error status is an error.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        method: reqwest::Method,
        c: &reqwest::Client,
        ep: &Endpoint,
        auth: &Auth,
        repository: &str,
        path: &str,
        headers: HeaderMap,
    ) -> Result<(String, reqwest::Response)> {
        let url = ep.v2(&format!("{repository}/{path}"));
        let key = (ep.clone(), repository.to_string());
        let mut refreshed = false;
        loop {
            let mut req = c.request(method.clone(), &url).headers(headers.clone());
            let token = self.tokens.lock().get(&key).cloned();
            req = match (&token, auth) {
                (Some(t), _) => req.bearer_auth(t),
                (None, Auth::Basic(u, p)) => req.basic_auth(u, Some(p)),
                (None, Auth::Anonymous) => req,
            };
            let res = req.send().await.map_err(|e| send_failed(&url, e))?;
            let status = res.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && !refreshed {
                refreshed = true;
                if let Some(challenge) = res.headers().get(reqwest::header::WWW_AUTHENTICATE) {
                    let t = self.token(c, ep, auth, repository, challenge).await?;
                    self.remember(key.clone(), t);
                    continue;
                }
            }
            if !status.is_success() {
                return Err(status_error(&url, res).await);
            }
            return Ok((url, res));
        }
    }

    /// GETs `doc` from `ep` (see `get`), reading at most its `max` bytes of body (more is
    /// an error, and the rest is never read). Returns the response headers and body.
    async fn get_small(
        &self,
        c: &reqwest::Client,
        ep: &Endpoint,
        auth: &Auth,
        doc: &DocRequest<'_>,
    ) -> Result<(HeaderMap, Bytes)> {
        let mut h = HeaderMap::new();
        let accept = HeaderValue::from_str(doc.accept)
            .map_err(|e| Error::internal(format!("Accept {:?}: {e}", doc.accept)))?;
        h.insert(reqwest::header::ACCEPT, accept);
        let (url, res) = self
            .send(
                reqwest::Method::GET,
                c,
                ep,
                auth,
                doc.repository,
                doc.path,
                h,
            )
            .await?;
        let headers = res.headers().clone();
        Ok((headers, read_bounded(&url, res, doc.max).await?))
    }

    /// Remembers (or, with None, forgets) the bearer token of an (endpoint, repository).
    fn remember(&self, key: (Endpoint, String), token: Option<String>) {
        let mut tokens = self.tokens.lock();
        match token {
            Some(t) => {
                if tokens.len() >= MAX_TOKENS {
                    tokens.clear();
                }
                tokens.insert(key, t);
            }
            // No token to be had: the configured credentials are all there is.
            None => {
                tokens.remove(&key);
            }
        }
    }

    /// A pull token for `repository` on `ep` by the distribution token flow, from the
    /// `WWW-Authenticate` of a 401, or None when it is no Bearer challenge.
    ///
    /// The response is read up to MAX_TOKEN_BODY, whatever host the realm names, and a TLS
    /// endpoint's credentials never go to a plain-HTTP realm.
    async fn token(
        &self,
        c: &reqwest::Client,
        ep: &Endpoint,
        auth: &Auth,
        repository: &str,
        challenge: &HeaderValue,
    ) -> Result<Option<String>> {
        let Some((realm, service)) = bearer_challenge(challenge) else {
            return Ok(None);
        };
        let bad =
            |why: String| Error::unavailable(format!("{}: token realm {realm:?} {why}", ep.host));
        let mut url = reqwest::Url::parse(&realm).map_err(|e| bad(format!("is not a URL: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if ep.plain_http => {}
            "http" => return Err(bad("is plain HTTP for a TLS registry".into())),
            s => return Err(bad(format!("has scheme {s:?}"))),
        }
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("scope", &format!("repository:{repository}:pull"));
            if let Some(s) = &service {
                q.append_pair("service", s);
            }
        }
        let shown = format!("token realm {realm}");
        let mut req = c.get(url);
        if let Auth::Basic(u, p) = auth {
            req = req.basic_auth(u, Some(p));
        }
        let res = req.send().await.map_err(|e| send_failed(&shown, e))?;
        let body = read_bounded(&shown, res, MAX_TOKEN_BODY).await?;
        // The spec's `token`, or OAuth2's `access_token` that some registries send instead.
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::unavailable(format!("{shown}: not a token response: {e}")))?;
        match t.token.or(t.access_token) {
            Some(t) if !t.is_empty() => Ok(Some(t)),
            _ => Err(Error::unavailable(format!(
                "{shown}: the response holds no token"
            ))),
        }
    }

    /// Tries each endpoint of `registry` in turn; the first success wins. The error returned
    /// is the endpoint's own (mirrors are best effort), else the last mirror's.
    async fn each_endpoint<T, F, Fut>(&self, registry: &str, what: &str, f: F) -> Result<T>
    where
        F: Fn(reqwest::Client, Endpoint, Auth) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.check_allowed(registry)?;
        let eps = self.endpoints(registry);
        let n = eps.len();
        let mut last = None;
        for (i, ep) in eps.into_iter().enumerate() {
            let c = self.client(registry, &ep)?;
            let auth = self.auth(registry, &ep, i + 1 < n);
            match f(c, ep.clone(), auth).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let e = Error::new(
                        e.kind(),
                        format!("{what}: upstream {}: {}", ep.host, e.message()),
                    );
                    if i + 1 < n {
                        tracing::debug!(mirror = %ep.host, error = %e, "mirror failed; trying the next endpoint");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::internal("no endpoint")))
    }

    /// Fetches a manifest (or index) by tag or digest, with the Accept list of every
    /// manifest type contentd understands, reading at most `max_manifest_bytes`. Returns its
    /// bytes and digest: by digest, the bytes must hash to it; by tag, the digest the
    /// registry names (`Docker-Content-Digest`) must match the bytes, else it is their
    /// sha256.
    pub async fn manifest(&self, src: &Source, tag_or_digest: &str) -> Result<(Bytes, Digest)> {
        let what = format!(
            "manifest {}/{}:{tag_or_digest}",
            src.registry, src.repository
        );
        let wanted = if tag_or_digest.contains(':') {
            Some(Digest::parse(tag_or_digest).map_err(|e| Error::invalid(format!("{what}: {e}")))?)
        } else if is_tag(tag_or_digest) {
            None
        } else {
            return Err(Error::invalid(format!("{what}: not a valid tag or digest")));
        };
        let accept = MANIFEST_TYPES.join(", ");
        let path = format!("manifests/{tag_or_digest}");
        let doc = &DocRequest {
            repository: &src.repository,
            path: &path,
            accept: &accept,
            max: self.max_document,
        };
        let (headers, body) = self
            .each_endpoint(&src.registry, &what, |c, ep, auth| async move {
                self.get_small(&c, &ep, &auth, doc).await
            })
            .await?;
        let named = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v.trim()).ok());
        let claimed = wanted.or(named);
        let digest = match claimed {
            Some(d) => {
                let got = Digest::of(d.algorithm(), &body);
                if got != d {
                    return Err(Error::data_loss(format!(
                        "{what}: upstream {} served bytes that hash to {got}, not {d}",
                        src.registry
                    )));
                }
                d
            }
            None => Digest::of(crate::digest::Algorithm::Sha256, &body),
        };
        Ok((body, digest))
    }

    /// The repository's tags, in pages of [`TAG_PAGE`] (`n`/`last`), at most [`MAX_TAGS`]:
    /// past that the list is cut short rather than held whole (a warning says so). Names
    /// that are not valid tags are dropped.
    pub async fn tags(&self, src: &Source) -> Result<Vec<String>> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let what = format!("tag list of {}/{}", src.registry, src.repository);
        let mut all: Vec<String> = Vec::new();
        loop {
            let last = all.last().cloned();
            // Tags are [A-Za-z0-9_.-]: nothing in one needs escaping in a query.
            let path = match &last {
                Some(l) => format!("tags/list?n={TAG_PAGE}&last={l}"),
                None => format!("tags/list?n={TAG_PAGE}"),
            };
            let doc = &DocRequest {
                repository: &src.repository,
                path: &path,
                accept: "application/json",
                max: MAX_TAG_PAGE,
            };
            let (_, body) = self
                .each_endpoint(&src.registry, &what, |c, ep, auth| async move {
                    self.get_small(&c, &ep, &auth, doc).await
                })
                .await?;
            let page: Page = serde_json::from_slice(&body).map_err(|e| {
                Error::precondition(format!("{what}: upstream {}: {e}", src.registry))
            })?;
            // A registry that ignores `last` would repeat its first page forever: only tags
            // past the previous page count as progress.
            let before = all.len();
            all.extend(
                page.tags
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| is_tag(t) && last.as_ref().is_none_or(|l| t > l)),
            );
            all.sort_unstable();
            all.dedup();
            if all.len() == before {
                return Ok(all);
            }
            if all.len() >= MAX_TAGS {
                tracing::warn!(registry = %src.registry, repository = %src.repository, "the upstream lists more than {MAX_TAGS} tags; the list is cut there");
                all.truncate(MAX_TAGS);
                return Ok(all);
            }
        }
    }

    /// The descriptors of the manifests whose subject is `d`, as the upstream lists them:
    /// its referrers API, or, where it has none (a 404), the referrers tag schema's index
    /// (`<alg>-<hex>`, the algorithm cut to 32 and the hex to 64 characters), which is what
    /// clients of such a registry push. Neither: an empty list. The list is read up to the
    /// manifest size limit; its entries are returned as the upstream wrote them.
    pub async fn referrers(&self, src: &Source, d: &Digest) -> Result<Vec<serde_json::Value>> {
        #[derive(Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<serde_json::Value>,
        }
        let what = format!("referrers of {d} in {}/{}", src.registry, src.repository);
        let path = format!("referrers/{d}");
        let doc = &DocRequest {
            repository: &src.repository,
            path: &path,
            accept: "application/vnd.oci.image.index.v1+json",
            max: self.max_document,
        };
        let body = match self
            .each_endpoint(&src.registry, &what, |c, ep, auth| async move {
                self.get_small(&c, &ep, &auth, doc).await
            })
            .await
        {
            Ok((_, body)) => body,
            Err(e) if e.is(Kind::NotFound) => match self.manifest(src, &referrers_tag(d)).await {
                Ok((body, _)) => body,
                Err(e) if e.is(Kind::NotFound) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let index: Index = serde_json::from_slice(&body).map_err(|e| {
            Error::precondition(format!(
                "{what}: upstream {}: not an index: {e}",
                src.registry
            ))
        })?;
        Ok(index.manifests)
    }

    /// A blob's size as the upstream states it, by a HEAD: no body is fetched. A blob the
    /// upstream does not hold is NotFound; a HEAD answer without a length is Unavailable (a
    /// size is what was asked for).
    pub async fn blob_size(&self, src: &Source, d: &Digest) -> Result<u64> {
        let what = format!("blob {d} from {}/{}", src.registry, src.repository);
        let path = format!("blobs/{d}");
        self.each_endpoint(&src.registry, &what, |c, ep, auth| {
            let path = &path;
            async move {
                let (url, res) = self
                    .send(
                        reqwest::Method::HEAD,
                        &c,
                        &ep,
                        &auth,
                        &src.repository,
                        path,
                        HeaderMap::new(),
                    )
                    .await?;
                // The header itself: a HEAD response has no body, so its size hint is 0.
                res.headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        Error::unavailable(format!("{url}: HEAD answered without a Content-Length"))
                    })
            }
        })
        .await
    }

    /// Opens a blob body from `offset` (to the end, or for `length` bytes). A registry that
    /// ignores Range is handled here: the bytes before `offset` are skipped, and those past
    /// the range are not passed on.
    pub async fn blob(
        &self,
        src: &Source,
        d: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobBody> {
        let what = format!("blob {d} from {}/{}", src.registry, src.repository);
        let range = match length {
            Some(0) => {
                return Ok(BlobBody {
                    stream: Box::pin(futures::stream::empty()),
                    length: Some(0),
                });
            }
            Some(n) => {
                let last = offset.checked_add(n - 1).ok_or_else(|| {
                    Error::out_of_range(format!("{what}: {n} bytes from {offset} overflow"))
                })?;
                Some(format!("bytes={offset}-{last}"))
            }
            None if offset > 0 => Some(format!("bytes={offset}-")),
            None => None,
        };
        let path = format!("blobs/{d}");
        let (res, skip) = self
            .each_endpoint(&src.registry, &what, |c, ep, auth| {
                let (path, range) = (&path, &range);
                async move {
                    let mut h = HeaderMap::new();
                    if let Some(r) = range {
                        // Digits, '=' and '-' only: always a valid header value.
                        h.insert(
                            reqwest::header::RANGE,
                            HeaderValue::from_str(r)
                                .map_err(|e| Error::internal(format!("Range {r:?}: {e}")))?,
                        );
                    }
                    let (url, res) = self
                        .send(
                            reqwest::Method::GET,
                            &c,
                            &ep,
                            &auth,
                            &src.repository,
                            path,
                            h,
                        )
                        .await?;
                    if res.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                        return Ok((res, offset));
                    }
                    // A 206 must say where its bytes start; one that starts past the
                    // offset cannot serve it.
                    match content_range_start(res.headers()) {
                        Some(start) if start <= offset => Ok((res, offset - start)),
                        _ => Err(Error::unavailable(format!(
                            "{url}: answered bytes from {offset} with a 206 whose \
                             Content-Range is {:?}",
                            res.headers().get(reqwest::header::CONTENT_RANGE)
                        ))),
                    }
                }
            })
            .await?;
        let expected = match (res.content_length().map(|l| l.saturating_sub(skip)), length) {
            (Some(sent), Some(n)) => Some(sent.min(n)),
            (sent, n) => sent.or(n),
        };
        // One pass over the body: skip to the offset, stop at the range's end, and turn an
        // early end into an error (a body that ends short is not a short blob).
        struct Body<S> {
            frames: S,
            skip: u64,
            left: u64,
            seen: u64,
            expected: Option<u64>,
            what: String,
            host: String,
            done: bool,
        }
        let state = Body {
            frames: res.bytes_stream(),
            skip,
            left: length.unwrap_or(u64::MAX),
            seen: 0,
            expected,
            what,
            host: src.registry.clone(),
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            while st.left > 0 {
                let Some(frame) = st.frames.next().await else {
                    break;
                };
                let mut b = match frame {
                    Ok(b) => b,
                    Err(e) => {
                        st.done = true;
                        let e = Error::unavailable(format!(
                            "{}: the upstream {} failed mid-stream: {e}",
                            st.what, st.host
                        ));
                        return Some((Err(e), st));
                    }
                };
                let n = (b.len() as u64).min(st.skip);
                st.skip -= n;
                let _ = b.split_to(n as usize);
                b.truncate(usize::try_from(st.left).unwrap_or(usize::MAX).min(b.len()));
                st.left -= b.len() as u64;
                st.seen += b.len() as u64;
                if !b.is_empty() {
                    return Some((Ok(b), st));
                }
            }
            st.done = true;
            match st.expected {
                Some(len) if st.seen < len => {
                    let e = Error::unavailable(format!(
                        "{}: the upstream closed the body after {} of {len} bytes",
                        st.what, st.seen
                    ));
                    Some((Err(e), st))
                }
                _ => None,
            }
        });
        let stream: futures::stream::BoxStream<'static, Result<Bytes>> = Box::pin(stream);
        Ok(BlobBody {
            stream,
            length: expected,
        })
    }
}

/// The referrers tag schema's tag for subject `d`: `<alg>-<hex>`, the algorithm cut to 32
/// and the hex to 64 characters (a tag holds at most 128).
fn referrers_tag(d: &Digest) -> String {
    let (alg, hex) = (d.algorithm().name(), d.hex());
    format!(
        "{}-{}",
        &alg[..alg.len().min(32)],
        &hex[..hex.len().min(64)]
    )
}

/// Where the bytes of a 206 start: `Content-Range: bytes START-END/TOTAL`.
fn content_range_start(h: &HeaderMap) -> Option<u64> {
    let v = h.get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    let (first, _) = v.trim().strip_prefix("bytes ")?.split_once('-')?;
    first.trim().parse().ok()
}

/// Splits "host/repo[:tag][@digest]" into its source and the tag or digest to resolve.
pub fn parse_reference(s: &str) -> Result<(Source, String)> {
    let r: Reference = s
        .parse()
        .map_err(|e| Error::invalid(format!("reference {s:?}: {e}")))?;
    let at = r
        .digest()
        .map(str::to_string)
        .or_else(|| r.tag().map(str::to_string))
        .unwrap_or_else(|| "latest".to_string());
    Ok((
        Source {
            registry: r.registry().to_string(),
            repository: r.repository().to_string(),
        },
        at,
    ))
}

/// A tag as the distribution spec allows it: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A document read whole from an upstream: `/v2/REPOSITORY/PATH`, at most `max` bytes.
#[derive(Clone, Copy)]
struct DocRequest<'a> {
    repository: &'a str,
    path: &'a str,
    accept: &'a str,
    max: usize,
}

/// A request that got no response (refused, reset, timed out), with the cause reqwest
/// keeps underneath.
fn send_failed(url: &str, e: reqwest::Error) -> Error {
    Error::unavailable(format!("{url}: {e} ({:?})", std::error::Error::source(&e)))
}

/// An error status as an error of its kind, carrying the start of its body (only that is
/// read).
async fn status_error(url: &str, mut res: reqwest::Response) -> Error {
    let mut msg = Vec::new();
    while msg.len() < 1024
        && let Ok(Some(b)) = res.chunk().await
    {
        msg.extend_from_slice(&b[..b.len().min(1024 - msg.len())]);
    }
    let code = res.status().as_u16();
    Error::new(
        kind_of_status(code),
        format!(
            "{url}: HTTP {code}: {}",
            String::from_utf8_lossy(&msg).trim()
        ),
    )
}

/// The body of a response, read up to `max` bytes: more is an error, and the rest is never
/// read. An error status is an error carrying the start of its body.
async fn read_bounded(url: &str, mut res: reqwest::Response, max: usize) -> Result<Bytes> {
    if !res.status().is_success() {
        return Err(status_error(url, res).await);
    }
    let too_big = |how: String| {
        Error::precondition(format!(
            "{url}: the upstream sent more than the {max} bytes contentd reads for this ({how})"
        ))
    };
    if let Some(n) = res.content_length()
        && n > max as u64
    {
        return Err(too_big(format!("Content-Length {n}")));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(b) = res
        .chunk()
        .await
        .map_err(|e| Error::unavailable(format!("{url}: the upstream failed mid-body: {e}")))?
    {
        if body.len() + b.len() > max {
            return Err(too_big("it kept sending".into()));
        }
        body.extend_from_slice(&b);
    }
    Ok(body.freeze())
}

/// The realm and service of a `WWW-Authenticate` header's Bearer challenge.
fn bearer_challenge(h: &reqwest::header::HeaderValue) -> Option<(String, Option<String>)> {
    let challenges = http_auth::parse_challenges(h.to_str().ok()?).ok()?;
    let c = challenges
        .iter()
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))?;
    let param = |name: &str| {
        c.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_unescaped())
    };
    Some((param("realm")?, param("service")))
}

/// The kind of an upstream's HTTP error status.
fn kind_of_status(code: u16) -> Kind {
    match code {
        404 => Kind::NotFound,
        401 | 403 => Kind::PermissionDenied,
        400 | 405 | 406 | 416 => Kind::FailedPrecondition,
        _ => Kind::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_referrers_tag_is_the_digest_cut_to_a_tag() {
        let d = Digest::of(crate::digest::Algorithm::Sha256, b"x");
        assert_eq!(referrers_tag(&d), format!("sha256-{}", d.hex()));
        let d = Digest::of(crate::digest::Algorithm::Sha512, b"x");
        let t = referrers_tag(&d);
        assert_eq!(t, format!("sha512-{}", &d.hex()[..64]));
        assert!(is_tag(&t));
    }

    fn host(endpoint: &str, mirrors: &[&str], creds: bool) -> RegistryHost {
        RegistryHost {
            endpoint: Some(endpoint.to_string()),
            mirrors: mirrors.iter().map(|m| m.to_string()).collect(),
            username: creds.then(|| "u".to_string()),
            password: creds.then(|| "p".to_string()),
            ..Default::default()
        }
    }

    fn basic(a: &Auth) -> bool {
        matches!(a, Auth::Basic(..))
    }

    #[test]
    fn credentials_go_only_to_their_own_endpoint() {
        let mut config = UpstreamConfig::default();
        config.registries.insert(
            "registry.example.com".into(),
            host(
                "https://registry.example.com",
                &[
                    "https://mirror.example.net",
                    "https://trusted-mirror.example.net",
                ],
                true,
            ),
        );
        // The second mirror has credentials of its own.
        config.registries.insert(
            "trusted-mirror.example.net".into(),
            host("https://trusted-mirror.example.net", &[], true),
        );
        let up = Upstream::new(config, 4 << 20).unwrap();
        let eps = up.endpoints("registry.example.com");
        assert_eq!(eps.len(), 3);
        assert!(!basic(&up.auth("registry.example.com", &eps[0], true)));
        assert!(basic(&up.auth("registry.example.com", &eps[1], true)));
        assert!(basic(&up.auth("registry.example.com", &eps[2], false)));
    }

    #[test]
    fn credentials_never_go_in_the_clear_to_another_machine() {
        let mut config = UpstreamConfig::default();
        config.registries.insert(
            "registry.example.com".into(),
            host("http://registry.example.com", &[], true),
        );
        let e = config.validate().unwrap_err();
        assert!(e.message().contains("plain HTTP"), "{e}");
        // Loopback in the clear is fine (a local registry or mirror).
        let mut config = UpstreamConfig::default();
        config.registries.insert(
            "127.0.0.1:5000".into(),
            host("http://127.0.0.1:5000", &[], true),
        );
        config
            .registries
            .insert("[::1]:5000".into(), host("http://[::1]:5000", &[], true));
        config.validate().unwrap();
        let up = Upstream::new(config, 4 << 20).unwrap();
        let ep = &up.endpoints("127.0.0.1:5000")[0];
        assert!(basic(&up.auth("127.0.0.1:5000", ep, false)));
        // And at run time too: a plain-HTTP endpoint elsewhere gets nothing.
        let ep = Endpoint::parse("http://10.0.0.1:5000").unwrap();
        assert!(!ep.may_carry_credentials());
    }

    #[test]
    fn only_allowed_registries_are_fetched_from() {
        let up = Upstream::new(UpstreamConfig::default(), 4 << 20).unwrap();
        up.check_allowed("anything.example.com").unwrap();
        let up = Upstream::new(
            UpstreamConfig {
                allowed_registries: vec!["docker.io".into(), "127.0.0.1:5000".into()],
                ..Default::default()
            },
            4 << 20,
        )
        .unwrap();
        up.check_allowed("docker.io").unwrap();
        let e = up.check_allowed("169.254.169.254").unwrap_err();
        assert!(e.is(Kind::PermissionDenied), "{e}");
        assert!(e.message().contains("allowed_registries"), "{e}");
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.0.0.2:80",
            "[::1]:5000",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "10.0.0.1:5000",
            "registry.example.com",
            "[fe80::1]:5000",
            "localhost.evil.com",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    /// A registry on loopback that answers from a table: path prefix → response. It asks for
    /// a bearer token (from its own /token) before anything else, and counts the body bytes
    /// it manages to send.
    struct Hostile {
        addr: String,
        sent: Arc<std::sync::atomic::AtomicU64>,
    }

    enum Answer {
        Body(&'static str, Vec<u8>),
        /// An endless chunked body.
        Endless,
        /// A Content-Length far beyond any limit, and a few bytes.
        Claims(u64),
        /// 404 with the spec's error body.
        Missing,
        /// A 206 of these bytes, said to start at this offset (whatever was asked).
        Partial(u64, Vec<u8>),
    }

    impl Hostile {
        /// `realm`: the token path its challenges name; `/token` grants "tok", and
        /// `/endless-token` answers with an endless body.
        async fn start(answer: fn(&str) -> Answer, realm: &'static str) -> Hostile {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let (a2, sent2) = (addr.clone(), sent.clone());
            tokio::spawn(async move {
                loop {
                    let (mut s, _) = l.accept().await.unwrap();
                    let (addr, sent) = (a2.clone(), sent2.clone());
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut b = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&b[..n]),
                            }
                        }
                        let head = String::from_utf8_lossy(&head).to_string();
                        let path = head.split(' ').nth(1).unwrap_or("").to_string();
                        let authorized = head.lines().any(|l| {
                            l.to_ascii_lowercase()
                                .starts_with("authorization: bearer tok")
                        });
                        let (status, headers, body) = if path.starts_with("/endless-token") {
                            ("200 OK", String::new(), Answer::Endless)
                        } else if path.starts_with("/token") {
                            (
                                "200 OK",
                                String::new(),
                                Answer::Body("", br#"{"token":"tok"}"#.to_vec()),
                            )
                        } else if !authorized {
                            (
                                "401 Unauthorized",
                                format!(
                                    "WWW-Authenticate: Bearer realm=\"http://{addr}{realm}\",service=\"t\"\r\n"
                                ),
                                Answer::Body("", b"{}".to_vec()),
                            )
                        } else {
                            match answer(&path) {
                                Answer::Missing => (
                                    "404 Not Found",
                                    String::new(),
                                    Answer::Body(
                                        "",
                                        br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#.to_vec(),
                                    ),
                                ),
                                Answer::Partial(at, b) => (
                                    "206 Partial Content",
                                    format!(
                                        "Content-Range: bytes {at}-{}/*\r\n",
                                        at + b.len() as u64 - 1
                                    ),
                                    Answer::Body("", b),
                                ),
                                a => ("200 OK", String::new(), a),
                            }
                        };
                        let head = match &body {
                            Answer::Body(digest, b) => format!(
                                "HTTP/1.1 {status}\r\n{headers}{}Content-Length: {}\r\nConnection: close\r\n\r\n",
                                if digest.is_empty() {
                                    String::new()
                                } else {
                                    format!("Docker-Content-Digest: {digest}\r\n")
                                },
                                b.len()
                            ),
                            Answer::Missing | Answer::Partial(..) => String::new(),
                            Answer::Endless => format!(
                                "HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            ),
                            Answer::Claims(n) => format!(
                                "HTTP/1.1 {status}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
                            ),
                        };
                        if s.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        match body {
                            Answer::Missing | Answer::Partial(..) => {}
                            Answer::Body(_, b) => {
                                let _ = s.write_all(&b).await;
                            }
                            Answer::Claims(_) => {
                                let _ = s.write_all(b"{\"a\":").await;
                            }
                            Answer::Endless => {
                                let chunk = [b' '; 64 << 10];
                                let frame =
                                    [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"]
                                        .concat();
                                while s.write_all(&frame).await.is_ok() {
                                    sent.fetch_add(
                                        chunk.len() as u64,
                                        std::sync::atomic::Ordering::Relaxed,
                                    );
                                }
                            }
                        }
                    });
                }
            });
            Hostile { addr, sent }
        }

        fn src(&self) -> Source {
            Source {
                registry: self.addr.clone(),
                repository: "r".into(),
            }
        }
    }

    const DOC: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

    /// Manifests, tag pages and token responses are read up to a limit, never whole: an
    /// upstream that sends an endless or oversized body gets a named error while contentd
    /// has read only the limit; digests are checked; tags that are not tags are dropped; the
    /// token flow works for documents and blobs.
    #[tokio::test(flavor = "multi_thread")]
    async fn documents_from_an_upstream_are_bounded_and_checked() {
        let h = Hostile::start(
            |path| {
                let doc_digest: &'static str = Box::leak(
                    Digest::of(crate::digest::Algorithm::Sha256, DOC)
                        .to_string()
                        .into_boxed_str(),
                );
                match path {
                    "/v2/r/manifests/good" => Answer::Body(doc_digest, DOC.to_vec()),
                    "/v2/r/manifests/plain" => Answer::Body("", DOC.to_vec()),
                    "/v2/r/manifests/lies" => Answer::Body(
                        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
                        DOC.to_vec(),
                    ),
                    "/v2/r/manifests/endless" => Answer::Endless,
                    "/v2/r/manifests/claims" => Answer::Claims(1 << 40),
                    "/v2/r/tags/list?n=1000" => Answer::Body(
                        "",
                        br#"{"name":"r","tags":["b","a","../x","c&d=e"]}"#.to_vec(),
                    ),
                    "/v2/r/tags/list?n=1000&last=b" => {
                        Answer::Body("", br#"{"name":"r","tags":null}"#.to_vec())
                    }
                    p if p.starts_with("/v2/endless/tags/list") => Answer::Endless,
                    p if p.starts_with("/v2/r/manifests/sha256:") => Answer::Body("", DOC.to_vec()),
                    p if p.starts_with("/v2/r/blobs/sha256:") => Answer::Body("", DOC.to_vec()),
                    p if p.starts_with("/v2/short/blobs/sha256:") => Answer::Claims(1 << 20),
                    p if p.starts_with("/v2/shifted/blobs/sha256:") => {
                        Answer::Partial(3, DOC[3..].to_vec())
                    }
                    _ => Answer::Missing,
                }
            },
            "/token",
        )
        .await;
        let up = Upstream::new(UpstreamConfig::default(), 1 << 20).unwrap();
        let src = h.src();
        let want = Digest::of(crate::digest::Algorithm::Sha256, DOC);

        let (b, d) = up.manifest(&src, "good").await.unwrap();
        assert_eq!((&b[..], &d), (DOC, &want));
        // No digest header: the bytes' sha256. By digest: checked against the bytes.
        assert_eq!(up.manifest(&src, "plain").await.unwrap().1, want);
        assert_eq!(up.manifest(&src, &want.to_string()).await.unwrap().1, want);
        let other = Digest::of(crate::digest::Algorithm::Sha256, b"other");
        let e = up.manifest(&src, &other.to_string()).await.unwrap_err();
        assert!(e.is(Kind::DataLoss), "{e}");
        let e = up.manifest(&src, "lies").await.unwrap_err();
        assert!(e.is(Kind::DataLoss), "{e}");
        let e = up.manifest(&src, "../../etc").await.unwrap_err();
        assert!(e.is(Kind::InvalidArgument), "{e}");

        let e = up.manifest(&src, "endless").await.unwrap_err();
        assert!(e.is(Kind::FailedPrecondition), "{e}");
        assert!(e.message().contains("1048576 bytes"), "{e}");
        let e = up.manifest(&src, "claims").await.unwrap_err();
        assert!(e.is(Kind::FailedPrecondition), "{e}");
        assert!(e.message().contains(&(1u64 << 40).to_string()), "{e}");
        let e = up.manifest(&src, "missing").await.unwrap_err();
        assert!(e.is(Kind::NotFound), "{e}");

        assert_eq!(up.tags(&src).await.unwrap(), ["a", "b"]);
        let e = up
            .tags(&Source {
                registry: h.addr.clone(),
                repository: "endless".into(),
            })
            .await
            .unwrap_err();
        assert!(e.is(Kind::FailedPrecondition), "{e}");

        // Blobs go through the same token flow.
        let body = up.blob(&src, &want, 0, None).await.unwrap();
        let got: Vec<Bytes> = body.stream.map(|b| b.unwrap()).collect().await;
        assert_eq!(got.concat(), DOC);
        // A registry that ignores Range: the bytes before the offset are skipped and those
        // past the range never passed on.
        let body = up.blob(&src, &want, 5, Some(10)).await.unwrap();
        assert_eq!(body.length, Some(10));
        let got: Vec<Bytes> = body.stream.map(|b| b.unwrap()).collect().await;
        assert_eq!(got.concat(), &DOC[5..15]);
        // A 206 that starts before the offset is trimmed; one that starts after it cannot
        // serve the read.
        let shifted = Source {
            registry: h.addr.clone(),
            repository: "shifted".into(),
        };
        let body = up.blob(&shifted, &want, 5, None).await.unwrap();
        let got: Vec<Bytes> = body.stream.map(|b| b.unwrap()).collect().await;
        assert_eq!(got.concat(), &DOC[5..]);
        let e = up.blob(&shifted, &want, 1, None).await.err().unwrap();
        assert!(e.is(Kind::Unavailable), "{e}");
        assert!(e.message().contains("Content-Range"), "{e}");
        // A body that ends before its Content-Length: the bytes that came, then an error.
        let short = Source {
            registry: h.addr.clone(),
            repository: "short".into(),
        };
        let body = up.blob(&short, &want, 0, None).await.unwrap();
        assert_eq!(body.length, Some(1 << 20));
        let got: Vec<Result<Bytes>> = body.stream.collect().await;
        let e = got.last().unwrap().as_ref().unwrap_err();
        assert!(e.is(Kind::Unavailable), "{e}");
        // reqwest notices the short body itself; either way the read fails, never ends short.
        assert!(
            e.message().contains("failed mid-stream") || e.message().contains("closed the body"),
            "{e}"
        );
        assert!(got[..got.len() - 1].iter().all(|r| r.is_ok()));

        // A token realm that never stops sending: a named error for documents and blobs,
        // with only the token limit read.
        let t = Hostile::start(|_| Answer::Body("", DOC.to_vec()), "/endless-token").await;
        let e = up.manifest(&t.src(), "good").await.unwrap_err();
        assert!(e.is(Kind::FailedPrecondition), "{e}");
        assert!(e.message().contains("token realm"), "{e}");
        let e = up.blob(&t.src(), &want, 0, None).await.err().unwrap();
        assert!(e.is(Kind::FailedPrecondition), "{e}");
        assert!(e.message().contains("token realm"), "{e}");
        // With basic credentials configured too: they go to the realm, whose answer is read
        // with the same bound (no other client runs a token flow of its own).
        let mut config = UpstreamConfig::default();
        config.registries.insert(
            t.addr.clone(),
            host(&format!("http://{}", t.addr), &[], true),
        );
        let with_creds = Upstream::new(config, 1 << 20).unwrap();
        let e = with_creds
            .blob(&t.src(), &want, 0, None)
            .await
            .err()
            .unwrap();
        assert!(e.is(Kind::FailedPrecondition), "{e}");
        assert!(e.message().contains("token realm"), "{e}");

        // Give the servers a moment to see the connections close: what they sent is the
        // limit plus what the sockets buffer, not the endless bodies.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for server in [&h, &t] {
            let sent = server.sent.load(std::sync::atomic::Ordering::Relaxed);
            assert!(sent < 64 << 20, "the server sent {sent} bytes");
        }
    }
}
