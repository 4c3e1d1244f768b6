//! Daemon configuration: built-in defaults, an optional TOML file, then command-line flags
//! (flags win). Every field is documented here, and validated before anything starts.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// A backend-mode listener: the raw content store one containerd expects behind its
/// `[proxy_plugins]` entry. Each is its own tenant.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Tenant name; defaults to the socket's file stem.
    pub name: Option<String>,
    pub socket: PathBuf,
}

impl Backend {
    /// Parses `PATH` or `NAME=PATH` from the command line.
    pub fn parse(s: &str) -> Result<Backend> {
        match s.split_once('=') {
            Some((name, path)) if !name.contains('/') => Ok(Backend {
                name: Some(name.to_string()),
                socket: PathBuf::from(path),
            }),
            _ => Ok(Backend {
                name: None,
                socket: PathBuf::from(s),
            }),
        }
    }

    pub fn tenant(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.socket
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "backend".into())
        })
    }
}

/// TLS for the TCP listener. With `client_ca`, clients must present a certificate that CA
/// signed (mutual TLS).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to (enables mTLS).
    pub client_ca: Option<PathBuf>,
}

/// Byte quotas: the bytes of the blobs a namespace links. A write that would pass its
/// namespace's quota is refused with ResourceExhausted and nothing is stored.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Quota of every namespace not listed below (0: unlimited).
    pub default_bytes: u64,
    /// Per-namespace quotas, bytes.
    pub namespaces: std::collections::HashMap<String, u64>,
}

/// Who may call the admin RPCs (`contentd.v1.GC/Run`, `Scrub/Verify`, `Registry/Pull`):
/// they collect, read every blob, or make the daemon fetch from the network. With neither
/// option set, every client listener may; with either, only the admin socket and the
/// listed namespaces may, and everyone else gets PermissionDenied.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// A client-mode unix socket on which admin calls are allowed (give it a tighter
    /// `socket_mode` by keeping it in a directory only operators can reach).
    pub socket: Option<PathBuf>,
    /// Namespaces allowed admin calls on every client listener.
    pub namespaces: Vec<String>,
}

impl Admin {
    /// Whether admin calls are limited at all.
    pub fn restricted(&self) -> bool {
        self.socket.is_some() || !self.namespaces.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// RocksDB data directory.
    pub root: PathBuf,
    /// Client-mode unix socket (containerd content-service semantics; namespace required).
    /// Empty string disables it.
    pub socket: PathBuf,
    /// Backend-mode unix sockets, one tenant each.
    pub backend: Vec<Backend>,
    /// Optional client-mode TCP listener, e.g. "0.0.0.0:7070". It requires `[tls]`.
    pub tcp: Option<String>,
    /// TLS for the TCP listener (`[tls]`): required when `tcp` is set.
    pub tls: Option<Tls>,
    /// Log format: "text" or "json".
    pub log_format: String,
    /// Seconds between background garbage collections (0 disables the timer).
    pub gc_interval_secs: u64,
    /// Content linked within this many seconds is a GC root (it may still be being
    /// assembled into an image by a client that uses no lease).
    pub gc_grace_secs: u64,
    /// A collection also starts once this many deletions (content, images) accumulate.
    pub gc_deletion_threshold: u64,
    /// A collection also starts once this many mutations (new blobs, image creates and
    /// updates, lease resources added) accumulate; 0 disables this trigger.
    pub gc_mutation_threshold: u64,
    /// Collections started by those counts take at most this percent of wall time: after
    /// one that took T, the next waits T·100/percent (at most the interval). 0: no spacing.
    pub gc_pause_percent: u64,
    /// An ingest no lease holds is dropped after this many seconds without a write.
    pub ingest_expiry_secs: u64,
    /// Permission bits of every unix socket contentd creates (octal, e.g. "0660").
    pub socket_mode: String,
    /// Owner of the sockets: a user name or numeric uid (default: the daemon's user).
    pub socket_owner: Option<String>,
    /// Group of the sockets: a group name or numeric gid (default: the daemon's group).
    pub socket_group: Option<String>,
    /// Address of a TCP listener serving only gRPC health checks (for Kubernetes probes),
    /// e.g. "0.0.0.0:7071". It exposes nothing else.
    pub health_tcp: Option<String>,
    /// Address of the Prometheus metrics endpoint (HTTP, path /metrics), e.g. "127.0.0.1:9105".
    pub metrics_addr: Option<String>,
    /// The OCI distribution API (HTTP registry and pull-through mirror), e.g.
    /// "127.0.0.1:5000". Plain HTTP on loopback, TLS (`[tls]`) on any other address.
    pub registry_addr: Option<String>,
    /// RocksDB's memory (memtables and block cache), MiB: see `kv::rocks::Tuning`; a quarter
    /// of it again is the read-ahead all stored reads share (`reads::Flight`), and a
    /// collection's mark table may take it again (`store::marks`).
    pub memory_budget_mib: u64,
    /// Threads running the async side of every request (HTTP/2, protobuf, point lookups);
    /// hashing and storage I/O run on the blocking pool whatever this is. 0: see
    /// [`Config::workers`].
    pub worker_threads: usize,
    /// Registry settings (`[registry]`).
    pub registry: crate::registry::RegistryConfig,
    /// OpenTelemetry collector to export traces to over OTLP/gRPC, e.g.
    /// "http://127.0.0.1:4317" (a span per RPC with namespace, digest and ref).
    pub otlp_endpoint: Option<String>,
    /// Seconds between background re-verifications of every stored blob (0 disables).
    pub scrub_interval_secs: u64,
    /// Read rate of the background scrub, MiB/s (it competes with clients for the disk).
    pub scrub_rate_mib_s: u64,
    /// Free disk space (MiB) new bytes may not use, at most a quarter of the filesystem:
    /// writes are refused (ResourceExhausted) before RocksDB meets a full disk, which would
    /// stop it taking deletes too.
    pub disk_reserve_mib: u64,
    /// When the filesystem holding `root` is fuller than this (percent), unreachable content
    /// is evicted at once, grace period or not (never reachable, leased or held content).
    /// 0 disables.
    pub eviction_high_watermark_percent: u8,
    /// Seconds between disk-usage checks for eviction.
    pub eviction_check_secs: u64,
    /// Largest gRPC message accepted or sent, bytes (a Write message carries at most this
    /// much data; containerd uses 16 MiB).
    pub max_message_bytes: usize,
    /// Concurrent gRPC streams per client connection.
    pub max_concurrent_streams: u32,
    /// Largest manifest or index the descriptor-graph parser reads; a larger blob is stored
    /// but opaque (no edges).
    pub max_manifest_bytes: usize,
    /// Byte quotas per namespace (`[quotas]`).
    pub quotas: Quotas,
    /// Who may call the admin RPCs (`[admin]`).
    pub admin: Admin,
    /// Upstream registries for pulls and on-demand fetches (`[upstream]`,
    /// `[upstream.registries."HOST"]`).
    pub upstream: crate::upstream::UpstreamConfig,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Default for Config {
    fn default() -> Self {
        let (root, socket) = if is_root() {
            (
                PathBuf::from("/var/lib/contentd"),
                PathBuf::from("/run/contentd/contentd.sock"),
            )
        } else {
            let data = std::env::var_os("XDG_DATA_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
                .unwrap_or_else(|| PathBuf::from("."));
            let run = std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            (data.join("contentd"), run.join("contentd/contentd.sock"))
        };
        Config {
            root,
            socket,
            backend: Vec::new(),
            tcp: None,
            tls: None,
            log_format: "text".into(),
            gc_interval_secs: 600,
            gc_grace_secs: 3600,
            gc_deletion_threshold: 100,
            gc_mutation_threshold: 1000,
            gc_pause_percent: 2,
            ingest_expiry_secs: 24 * 3600,
            socket_mode: "0660".into(),
            socket_owner: None,
            socket_group: None,
            health_tcp: None,
            metrics_addr: None,
            registry_addr: None,
            memory_budget_mib: 48,
            worker_threads: 0,
            registry: Default::default(),
            otlp_endpoint: None,
            scrub_interval_secs: 24 * 3600,
            scrub_rate_mib_s: 32,
            max_message_bytes: 16 << 20,
            max_concurrent_streams: 1024,
            max_manifest_bytes: 4 << 20,
            disk_reserve_mib: crate::store::DISK_RESERVE_DEFAULT >> 20,
            eviction_high_watermark_percent: 90,
            eviction_check_secs: 30,
            quotas: Quotas::default(),
            admin: Admin::default(),
            upstream: Default::default(),
        }
    }
}

/// The default configuration as a commented TOML file: every option, its default, and what
/// it means. Parsing it gives `Config::default()`.
pub fn default_toml() -> String {
    let c = Config::default();
    let u = crate::upstream::UpstreamConfig::default();
    let q = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    format!(
        r#"# contentd configuration (TOML). Every option is shown with its default.
# Command-line flags and CONTENTD_* environment variables override this file.

# RocksDB data directory (created if missing).
root = {root}

# Client-mode unix socket: containerd's content service semantics, a containerd-namespace
# header on every call. "" disables it.
socket = {socket}

# Permission bits, owner and group of every unix socket contentd creates.
socket_mode = "{mode}"
# socket_owner = "root"          # user name or uid
# socket_group = "containerd"    # group name or gid

# Backend-mode sockets: one per containerd using contentd through a proxy_plugins entry;
# each is a tenant whose deletes release only its own holds.
# [[backend]]
# name = "containerd"
# socket = "/run/contentd/containerd.sock"

# Client-mode TCP listener; TCP is served only over TLS, mutual when client_ca is set.
# tcp = "0.0.0.0:7070"
# [tls]
# cert = "/etc/contentd/tls/server.pem"
# key = "/etc/contentd/tls/server.key"
# client_ca = "/etc/contentd/tls/clients-ca.pem"

# TCP listener serving only gRPC health checks, for Kubernetes probes.
# health_tcp = "0.0.0.0:7071"

# Prometheus metrics endpoint (HTTP, GET /metrics).
# metrics_addr = "127.0.0.1:9105"

# The OCI distribution API: contentd as a registry and a pull-through mirror for
# containerd, CRI-O, podman and docker. Plain HTTP on loopback; any other address is served
# over TLS with the [tls] settings (mutual when client_ca is set).
# registry_addr = "127.0.0.1:5000"

# Export traces (a span per RPC) to an OpenTelemetry collector over OTLP/gRPC.
# otlp_endpoint = "http://127.0.0.1:4317"

# Log format: "text" or "json" (level: RUST_LOG, default info).
log_format = "{log}"

# Garbage collection: every gc_interval_secs (0: only on demand and by count), and once
# gc_deletion_threshold deletions or gc_mutation_threshold mutations (0: off) accumulate.
gc_interval_secs = {gi}
gc_deletion_threshold = {gd}
gc_mutation_threshold = {gm}
# Collections started by those counts take at most this percent of the time (after one that
# took T, the next waits T*100/percent, at most gc_interval_secs); 0: no spacing.
gc_pause_percent = {gp}
# Content linked more recently than this is kept even without a root (a client may still
# be assembling an image without a lease).
gc_grace_secs = {gg}
# An ingest no lease holds is dropped after this long without a write.
ingest_expiry_secs = {ie}

# Memory RocksDB may use, MiB: two thirds for write buffers (memtables of all column
# families together), a sixth for the metadata block cache (which holds the tables' index and
# filter blocks too, so a store of millions of blobs stays inside it). Blob bytes are read through
# the page cache, not cached here. A quarter of it again is the read-ahead all streams
# being read share: each stream has one 256 KiB piece on its way to the client, and more
# only from that pool. Beyond these (measured with heaptrack): ~22 MiB resident when idle,
# most of it the binary's code; about 3 MiB per stream writing 1 MiB messages (the message
# being decoded, and its write batch). Memory freed after a burst goes back to the kernel
# within a second. Outside the daemon's RSS, the kernel holds up to 1 MiB per unix-socket
# client connection of bytes sent and not yet read (its send buffer). A garbage collection
# may take the budget again for its marks (~21 bytes per live blob, so ~1.8M blobs at 48);
# marks beyond that go to unnamed scratch files in `root`, read back through the page cache.
memory_budget_mib = {mb}

# Threads that run the protocol side of every request (HTTP/2, protobuf, point lookups).
# Hashing and storage I/O run on a pool of their own whatever this is. 0: one per CPU less
# one, at least one: every client of the unix sockets runs on this node and needs a CPU for
# its side of each call (measured on 2 CPUs, 1 thread against 2: small reads at concurrency
# 16 +69%, Info +18%, one 1 GiB stream -11 to -16%).
worker_threads = {wt}

# Limits: the largest gRPC message, concurrent streams per connection, and the largest
# manifest the descriptor-graph parser reads (larger blobs are stored, without edges).
# Label keys plus values are limited to 4096 bytes each, as in containerd.
max_message_bytes = {mm}
max_concurrent_streams = {ms}
max_manifest_bytes = {mf}

# When the filesystem holding root is fuller than this (percent; 0 disables), unreachable
# content is evicted at once, grace period or not; checked every eviction_check_secs.
eviction_high_watermark_percent = {ew}
eviction_check_secs = {ec}
# Free disk space (MiB, at most a quarter of the filesystem) that new bytes may not use: a
# write that would is refused with ResourceExhausted. RocksDB stops taking any write, deletes
# included, once it meets a full disk, until there is room again; the reserve keeps room for
# deletes, collections and the flush of bytes already written. (A daemon started on a full
# disk serves reads, takes deletes when it can, and new bytes again once there is room.)
disk_reserve_mib = {dr}

# Background re-verification of every stored blob (0 disables), and its read rate.
scrub_interval_secs = {si}
scrub_rate_mib_s = {sr}

[quotas]
# Bytes of blobs a namespace may link; writes past it get ResourceExhausted (0: unlimited).
default_bytes = 0
# [quotas.namespaces]
# "team-a" = 107374182400

[admin]
# Admin calls (GC/Run, Scrub/Verify, Registry/Pull) collect, read every blob or fetch from
# the network. Unset: any client listener may make them. Set either option and only this
# socket and these namespaces may; everyone else gets PermissionDenied.
# socket = "/run/contentd/admin/admin.sock"
namespaces = []

[registry]
# The namespace whose images are the registry's repositories and tags.
namespace = "{rns}"
# Refuse pushes and deletes (a pure mirror).
read_only = false
# bcrypt htpasswd file (`htpasswd -B`): when set, every request needs basic auth.
# htpasswd = "/etc/contentd/htpasswd"
# A mirrored tag is re-checked upstream after this long (served stale if the upstream is
# unreachable); digests never are.
tag_ttl_secs = {rttl}
# Repositories whose path names no registry host (docker's registry-mirrors) mirror this
# one ("" = only what clients push).
default_upstream = "{rdu}"
# MiB the registry's namespace may hold; past it, mirrored images are evicted least recently
# used first (pushed images never are). 0 = no limit.
max_mib = {rmax}
# Seconds a connection may stay silent while the client should be talking: TLS handshake,
# request headers, the next request on a kept-alive connection.
idle_timeout_secs = {ridle}
# Connections served at once (more wait to be accepted): bounds the listener's memory.
max_connections = {rconn}

[upstream]
# Seconds to connect, and without a byte before a fetch is abandoned.
connect_timeout_secs = {ct}
read_timeout_secs = {rt}
# Layers one eager pull fetches at once; attempts per blob (each resumes with Range).
max_concurrent_downloads = {md}
fetch_attempts = {fa}
# When not empty, the only registry hosts contentd fetches from (PermissionDenied for any
# other): a node's daemon must not become an open HTTP fetcher.
allowed_registries = []

# Per registry host (as written in image references). Loopback hosts default to plain HTTP,
# others to HTTPS.
# [upstream.registries."registry.example.com"]
# endpoint = "https://registry.example.com"
# mirrors = ["https://mirror.example.com"]
# ca_file = "/etc/contentd/registry-ca.pem"
# insecure_skip_verify = false
# username = "puller"              # sent only to this host's endpoint, never to a mirror
# password = "secret"              # (a mirror gets its own host's table), never in the
#                                  # clear to a non-loopback host
"#,
        root = q(&c.root),
        socket = q(&c.socket),
        mode = c.socket_mode,
        log = c.log_format,
        gi = c.gc_interval_secs,
        gd = c.gc_deletion_threshold,
        gm = c.gc_mutation_threshold,
        gp = c.gc_pause_percent,
        gg = c.gc_grace_secs,
        ie = c.ingest_expiry_secs,
        si = c.scrub_interval_secs,
        ew = c.eviction_high_watermark_percent,
        dr = c.disk_reserve_mib,
        mm = c.max_message_bytes,
        ms = c.max_concurrent_streams,
        mf = c.max_manifest_bytes,
        ec = c.eviction_check_secs,
        sr = c.scrub_rate_mib_s,
        ct = u.connect_timeout_secs,
        rt = u.read_timeout_secs,
        md = u.max_concurrent_downloads,
        fa = u.fetch_attempts,
        mb = c.memory_budget_mib,
        wt = c.worker_threads,
        rns = c.registry.namespace,
        rttl = c.registry.tag_ttl_secs,
        rdu = c.registry.default_upstream,
        rmax = c.registry.max_mib,
        ridle = c.registry.idle_timeout_secs,
        rconn = c.registry.max_connections,
    )
}

/// A user or group given by name or number, resolved through /etc/passwd or /etc/group.
pub fn resolve_id(name: &str, file: &str, what: &str) -> Result<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(file).map_err(|e| {
        Error::invalid(format!(
            "cannot read {file} to resolve {what} {name:?}: {e}"
        ))
    })?;
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[0] == name).then(|| f[2].parse::<u32>().ok())?
        })
        .next()
        .ok_or_else(|| Error::invalid(format!("no {what} named {name:?} in {file}")))
}

impl Config {
    /// Async worker threads: `worker_threads`, or when 0 one per CPU the daemon may run on
    /// less one (at least one), leaving a CPU for the clients on the same node.
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .saturating_sub(1)
                .max(1),
            n => n,
        }
    }

    /// The socket permission bits.
    pub fn socket_mode_bits(&self) -> Result<u32> {
        let m =
            u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8).map_err(|_| {
                Error::invalid(format!(
                    "socket_mode {:?}: expected octal like \"0660\"",
                    self.socket_mode
                ))
            })?;
        if m > 0o777 {
            return Err(Error::invalid(format!(
                "socket_mode {:?}: at most 0777",
                self.socket_mode
            )));
        }
        Ok(m)
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid(format!("cannot read config file {}: {e}", path.display()))
        })?;
        Config::parse(&text)
            .map_err(|e| Error::invalid(format!("config file {}: {}", path.display(), e.message())))
    }

    /// Parses a configuration file's text (not yet validated: see [`Config::validate`]).
    pub fn parse(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| Error::invalid(e.to_string()))
    }

    pub fn validate(&self) -> Result<()> {
        if self.root.as_os_str().is_empty() {
            return Err(Error::invalid("root must not be empty"));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(Error::invalid(format!(
                "log_format {:?}: expected \"text\" or \"json\"",
                self.log_format
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for b in &self.backend {
            let t = b.tenant();
            crate::store::Scope::tenant(&t)?;
            if !seen.insert(t.clone()) {
                return Err(Error::invalid(format!(
                    "backend tenant {t:?} is configured twice"
                )));
            }
            if b.socket == self.socket {
                return Err(Error::invalid(format!(
                    "{} is both the client and a backend socket",
                    b.socket.display()
                )));
            }
        }
        if let Some(addr) = &self.tcp {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| Error::invalid(format!("tcp address {addr:?}: {e}")))?;
            let Some(tls) = &self.tls else {
                return Err(Error::invalid(format!(
                    "tcp {addr:?} needs [tls] (cert and key): contentd serves TCP only over TLS"
                )));
            };
            for (what, p) in [
                ("cert", Some(&tls.cert)),
                ("key", Some(&tls.key)),
                ("client_ca", tls.client_ca.as_ref()),
            ] {
                if let Some(p) = p {
                    std::fs::metadata(p)
                        .map_err(|e| Error::invalid(format!("tls {what} {}: {e}", p.display())))?;
                }
            }
        }
        self.upstream.validate()?;
        for ns in &self.admin.namespaces {
            crate::store::Scope::namespace(ns)
                .map_err(|e| Error::invalid(format!("admin.namespaces: {}", e.message())))?;
        }
        if let Some(a) = &self.admin.socket
            && (*a == self.socket || self.backend.iter().any(|b| b.socket == *a))
        {
            return Err(Error::invalid(format!(
                "admin.socket {} is also another listener's socket",
                a.display()
            )));
        }
        if self.max_message_bytes < (64 << 10) || self.max_concurrent_streams == 0 {
            return Err(Error::invalid(
                "max_message_bytes must be at least 65536 and max_concurrent_streams at least 1",
            ));
        }
        if self.gc_pause_percent > 100 {
            return Err(Error::invalid("gc_pause_percent is a percentage (0-100)"));
        }
        if self.eviction_high_watermark_percent > 100 {
            return Err(Error::invalid(
                "eviction_high_watermark_percent is a percentage (0-100)",
            ));
        }
        // Durations are added to the clock: a century is already "never", and more would
        // overflow an Instant.
        const CENTURY_SECS: u64 = 100 * 366 * 86_400;
        for (name, v) in [
            ("gc_interval_secs", self.gc_interval_secs),
            ("gc_grace_secs", self.gc_grace_secs),
            ("ingest_expiry_secs", self.ingest_expiry_secs),
            ("scrub_interval_secs", self.scrub_interval_secs),
            ("eviction_check_secs", self.eviction_check_secs),
            (
                "upstream.connect_timeout_secs",
                self.upstream.connect_timeout_secs,
            ),
            (
                "upstream.read_timeout_secs",
                self.upstream.read_timeout_secs,
            ),
        ] {
            if v > CENTURY_SECS {
                return Err(Error::invalid(format!(
                    "{name} = {v}: more than a century; use 0 where it means \"never\""
                )));
            }
        }
        self.socket_mode_bits()?;
        if let Some(o) = &self.socket_owner {
            resolve_id(o, "/etc/passwd", "user")?;
        }
        if let Some(g) = &self.socket_group {
            resolve_id(g, "/etc/group", "group")?;
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(Error::invalid(format!(
                "otlp_endpoint {e:?}: expected http://HOST:PORT or https://HOST:PORT"
            )));
        }
        for (what, addr) in [
            ("health_tcp", &self.health_tcp),
            ("metrics_addr", &self.metrics_addr),
            ("registry_addr", &self.registry_addr),
        ] {
            if let Some(a) = addr {
                a.parse::<std::net::SocketAddr>()
                    .map_err(|e| Error::invalid(format!("{what} {a:?}: {e}")))?;
            }
        }
        if self.worker_threads > 1024 {
            return Err(Error::invalid(format!(
                "worker_threads {}: expected 0 (automatic) to 1024",
                self.worker_threads
            )));
        }
        if !(8..=1 << 20).contains(&self.memory_budget_mib) {
            return Err(Error::invalid(format!(
                "memory_budget_mib {}: expected 8 to 1048576",
                self.memory_budget_mib
            )));
        }
        if let Some(a) = &self.registry_addr {
            let loopback = a
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|s| s.ip().is_loopback());
            if !loopback && self.tls.is_none() {
                return Err(Error::invalid(format!(
                    "registry_addr {a:?} is not loopback: it needs [tls] (cert and key)"
                )));
            }
        }
        crate::store::Scope::namespace(&self.registry.namespace)
            .map_err(|e| Error::invalid(format!("registry namespace: {}", e.message())))?;
        if self.socket.as_os_str().is_empty() && self.backend.is_empty() && self.tcp.is_none() {
            return Err(Error::invalid("no listener configured"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_validation() {
        let c: Config = toml::from_str(
            r#"root = "/tmp/x"
               socket = "/tmp/x.sock"
               tcp = "127.0.0.1:7070"
               [[backend]]
               socket = "/run/a/ctrd.sock"
               [[backend]]
               name = "other"
               socket = "/run/b.sock""#,
        )
        .unwrap();
        // TCP only with TLS.
        assert!(c.validate().unwrap_err().message().contains("needs [tls]"));
        let mut c = c;
        let here = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        c.tls = Some(Tls {
            cert: here.clone(),
            key: here.clone(),
            client_ca: None,
        });
        c.validate().unwrap();
        assert_eq!(c.backend[0].tenant(), "ctrd");
        assert_eq!(c.backend[1].tenant(), "other");
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        let mut bad = c.clone();
        bad.tcp = Some("nope".into());
        assert!(
            bad.validate()
                .unwrap_err()
                .message()
                .contains("tcp address")
        );
        let mut dup = c.clone();
        dup.backend[1].name = Some("ctrd".into());
        assert!(dup.validate().is_err());
    }

    #[test]
    fn the_printed_default_is_the_default() {
        let c: Config = toml::from_str(&default_toml()).unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
        let bad: Config = toml::from_str("socket_mode = \"0999\"").unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .message()
                .contains("socket_mode")
        );
        let bad: Config = toml::from_str("socket_group = \"no-such-group-here\"").unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .message()
                .contains("no group named")
        );
    }

    #[test]
    fn backend_flag_forms() {
        assert_eq!(Backend::parse("/a/b.sock").unwrap().tenant(), "b");
        assert_eq!(Backend::parse("t1=/a/b.sock").unwrap().tenant(), "t1");
    }

    /// Replays the fuzz corpus on stable: whatever parses validates without panicking.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config_parse");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            if let Ok(s) = std::str::from_utf8(&bytes)
                && let Ok(c) = Config::parse(s)
            {
                let _ = c.validate();
                let _ = c.socket_mode_bits();
            }
            n += 1;
        }
        assert!(n >= 3, "corpus missing at {}", dir.display());
    }

    #[test]
    fn the_default_file_parses_to_the_defaults() {
        assert_eq!(Config::parse(&default_toml()).unwrap(), Config::default());
    }

    #[test]
    fn worker_threads_are_automatic_or_as_set() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(Config::default().workers(), (cpus - 1).max(1));
        let c = Config::parse("worker_threads = 3\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.workers(), 3);
        let e = Config::parse("worker_threads = 5000\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.message().contains("worker_threads"), "{e}");
    }

    #[test]
    fn durations_past_a_century_are_refused() {
        let c = Config::parse("gc_interval_secs = 18446744073709551615\n").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.message().contains("gc_interval_secs"), "{e}");
    }
}
