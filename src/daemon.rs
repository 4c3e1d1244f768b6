//! The daemon: opens the store, serves every configured listener (client-mode socket,
//! backend-mode sockets, TCP) with health and reflection, and shuts down cleanly on
//! SIGTERM/SIGINT so RocksDB closes with everything flushed to its WAL.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::api::blobs::BlobsService;
use crate::api::content::ContentService;
use crate::api::gc::GcService;
use crate::api::graph::GraphService;
use crate::api::images::ImagesService;
use crate::api::leases::LeasesService;
use crate::api::registry::RegistryService;
use crate::api::{Mode, pb};
use crate::config::Config;
use crate::kv::rocks::{RocksKv, Tuning};
use crate::store::{Store, StoreConfig};

pub use crate::client::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};

const CONTENT_SERVICE: &str = "containerd.services.content.v1.Content";

/// Who may use the sockets: mode bits, and optionally owner and group.
#[derive(Clone, Copy)]
struct SocketPerms {
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
}

impl SocketPerms {
    fn of(c: &Config) -> anyhow::Result<SocketPerms> {
        Ok(SocketPerms {
            mode: c.socket_mode_bits()?,
            uid: c
                .socket_owner
                .as_deref()
                .map(|o| crate::config::resolve_id(o, "/etc/passwd", "user"))
                .transpose()?,
            gid: c
                .socket_group
                .as_deref()
                .map(|g| crate::config::resolve_id(g, "/etc/group", "group"))
                .transpose()?,
        })
    }
}

/// Binds a unix socket, replacing a stale socket file but never a live one or a non-socket.
fn bind_unix(path: &Path, perms: SocketPerms) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use by another process", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(perms.mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    if perms.uid.is_some() || perms.gid.is_some() {
        std::os::unix::fs::chown(path, perms.uid, perms.gid)
            .with_context(|| format!("setting the owner of {}", path.display()))?;
    }
    Ok(l)
}

/// The span every RPC runs in, at the level `$span` names; a disabled span's fields are never
/// evaluated.
macro_rules! rpc_span {
    ($span:ident, $req:expr) => {
        tracing::$span!(
            "rpc",
            path = %$req.uri().path(),
            namespace = %$req
                .headers()
                .get(crate::api::NAMESPACE_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            digest = tracing::field::Empty,
            r#ref = tracing::field::Empty,
        )
    };
}

/// One listener's services: content (in the listener's mode), health, reflection v1 and v1alpha.
/// A macro because the health service's type is unnameable.
macro_rules! router {
    ($limits:expr, $store:expr, $reads:expr, $puller:expr, $mode:expr, $policy:expr, $health:expr) => {
        router!(
            Server::builder(),
            $limits,
            $store,
            $reads,
            $puller,
            $mode,
            $policy,
            $health
        )
    };
    ($builder:expr, $limits:expr, $store:expr, $reads:expr, $puller:expr, $mode:expr, $policy:expr, $health:expr) => {{
        let mode: Mode = $mode;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        // Large flow-control windows: with h2's defaults a stream of 1 MiB Write messages
        // waits a round trip for window updates after every message.
        $builder
            .max_concurrent_streams(Some($limits.1))
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .trace_fn(|req| {
                // Info level only while exported (see `telemetry`).
                if crate::telemetry::exporting_spans() {
                    rpc_span!(info_span, req)
                } else {
                    rpc_span!(debug_span, req)
                }
            })
            .layer(crate::api::observe::ObserveLayer)
            .layer($policy)
            .add_service($health)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(crate::api::frames::ContentRoutes::new(
                ContentService::new($store.clone(), $reads.clone(), mode.clone()),
                $limits.0,
            ))
            .add_service(RegistryService::new($puller.clone(), mode.clone()).into_server())
            .add_service(
                crate::api::scrub::ScrubService::new($store.clone(), $puller.clone(), mode.clone())
                    .into_server(),
            )
            .add_service(
                BlobsService::new($store.clone(), mode.clone())
                    .into_server()
                    .max_decoding_message_size($limits.0),
            )
            .add_service(GraphService::new($store.clone(), mode.clone()).into_server())
            .add_service(GcService::new($store.clone(), mode.clone()).into_server())
            .add_service(ImagesService::new($store.clone(), mode.clone()).into_server())
            .add_service(LeasesService::new($store.clone(), mode).into_server())
    }};
}

/// SIGTERM/SIGINT handlers, installed before any socket accepts: a signal that arrives as
/// soon as a client can connect still shuts down cleanly instead of killing the process.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Resolves when SIGTERM or SIGINT arrives.
    async fn received(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
}

pub use crate::dates::expiry_wait;

/// Logs and counts a background step that panicked on the blocking pool (the loop goes on).
fn step_failed(task: &'static str, e: tokio::task::JoinError) {
    if e.is_panic() {
        crate::metrics::get().task_restarts.add(&[task], 1);
    }
    tracing::error!(task, error = %e, "background step failed");
}

/// Longest a TCP client may take to finish its TLS handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// The first and the longest pause before accepting again after an accept failed.
const ACCEPT_PAUSE: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// Send buffer asked for on every accepted unix connection (Linux doubles it for its own
/// bookkeeping, so a connection may hold up to 1 MiB of sent bytes the client has not read,
/// against 208 KiB by default).
///
/// Why: a Read piece is a 256 KiB chunk, larger than the default buffer, so each piece took
/// at least two writes with a wake-up of the client between them. Measured with `contentd
/// bench` (3 endpoints, 5 rounds, medians): ranged 1 MiB reads c=16 825 → 991/s, large
/// read 916 → 1035 MiB/s. The memory is the kernel's, per connection (gRPC multiplexes a
/// client's streams over one), not per stream, so it does not grow with concurrent reads.
///
/// `SO_SNDBUF` is capped by `net.core.wmem_max` (208 KiB on a stock kernel), so the daemon
/// asks with `SO_SNDBUFFORCE` first, which a daemon with CAP_NET_ADMIN (root) may.
const UNIX_SEND_BUFFER: libc::c_int = 512 << 10;

fn widen_send_buffer(s: tokio::net::UnixStream) -> tokio::net::UnixStream {
    use std::os::fd::AsRawFd;
    let set = |opt| {
        // SAFETY: setsockopt reads one c_int from the pointer it is given, for the given
        // length, on a descriptor this stream owns for the call's duration.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&UNIX_SEND_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    #[cfg(target_os = "linux")]
    let forced = set(libc::SO_SNDBUFFORCE);
    #[cfg(not(target_os = "linux"))]
    let forced = false;
    if !forced && !set(libc::SO_SNDBUF) {
        // Only a speed loss: the connection works with the default buffer.
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot widen a connection's send buffer");
    }
    s
}

/// [`accepting`] on a unix listener (client and backend sockets), each connection with the
/// wider send buffer.
fn accepting_unix(
    l: tokio::net::UnixListener,
) -> impl Stream<Item = std::io::Result<tokio::net::UnixStream>> + Send {
    accepting(UnixListenerStream::new(l).map(|r| r.map(widen_send_buffer)))
}

/// Connections from a listener, retrying failed accepts after a pause that doubles from 5 ms
/// to a second (Go's net/http does the same). An accept fails when the process is out of
/// descriptors (EMFILE) or the system is (ENFILE), and the connection it could not take stays
/// queued, so the listener is ready again at once: retried at once, as tonic's server loop
/// does, a daemon out of descriptors spins a core until one is freed (measured under a
/// 64-descriptor limit with 80 clients queued: 199 of 200 clock ticks in 2 s; 0 with the
/// pause). One warning per run of failures.
pub fn accepting<S, T>(incoming: S) -> impl Stream<Item = std::io::Result<T>> + Send
where
    S: Stream<Item = std::io::Result<T>> + Send + Unpin,
    T: Send,
{
    futures::stream::unfold(
        (incoming, Duration::ZERO),
        |(mut incoming, mut pause)| async move {
            loop {
                match incoming.next().await? {
                    Ok(conn) => return Some((Ok(conn), (incoming, Duration::ZERO))),
                    Err(e) => {
                        if pause.is_zero() {
                            tracing::warn!(error = %e, "cannot accept connections; retrying with backoff");
                        }
                        pause = (pause * 2).clamp(ACCEPT_PAUSE.0, ACCEPT_PAUSE.1);
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        },
    )
}

/// The TLS connections of the gRPC TCP listener, each accepted on a task of its own (a slow
/// handshake holds up no other) and bounded twice: the handshake must finish within
/// [`TLS_HANDSHAKE`], and then the client's HTTP/2 preface must arrive within it too. Without
/// the second, a client that finished its handshake and sent nothing held its connection and
/// task for good: hyper's HTTP/2 server waits for the preface for ever, before any keepalive
/// ping can be sent.
fn tls_incoming(
    l: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> impl Stream<Item = std::io::Result<TlsConn>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let conns = accepting(TcpListenerStream::new(l));
        tokio::pin!(conns);
        loop {
            let tcp = tokio::select! {
                c = conns.next() => match c {
                    Some(Ok(c)) => c,
                    _ => return,
                },
                // The server stopped taking connections.
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                if let Some(s) = crate::net::handshake(&acceptor, tcp, TLS_HANDSHAKE, "grpc").await
                {
                    let _ = tx
                        .send(Ok(crate::net::Guarded::opening(s, TLS_HANDSHAKE)))
                        .await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

type TlsConn = crate::net::Guarded<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().get_ref().0.connect_info()
    }
}

/// Lifts the soft limit on open files to the hard one, as Go's runtime does for containerd
/// and every Go program: the soft limit is a compatibility default for `select(2)` users
/// (1024 from a shell), and a store of many blob files plus many client connections passes
/// it long before the hard limit an operator chose. RocksDB sizes its table cache from the
/// result (`kv::rocks`).
pub fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Hands memory the allocator holds but nobody uses back to the kernel, once a second.
///
/// glibc keeps freed memory in its arenas for reuse and returns only the top of a heap: after
/// a large write (flushed memtables, 1 MiB messages, write batches) tens of MiB stay resident
/// though nothing live needs them (measured: 33 MiB of anonymous RSS, 6 MiB after a trim).
/// `malloc_trim` releases every whole free page; the cost is a walk of the free lists under
/// each arena's lock and page faults when that memory is used again, a few ms a second at
/// most under full streaming load.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned = std::thread::Builder::new()
            .name("contentd-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    // SAFETY: malloc_trim only returns free pages to the kernel; it takes the
                    // allocator's own locks and is safe to call from any thread at any time.
                    unsafe { libc::malloc_trim(0) };
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the memory trimming thread");
        }
    }
}

/// Runs a background loop for the daemon's whole life. A panic in it is logged, counted
/// (`contentd_task_restarts_total{task}`) and the loop starts again after a backoff that
/// doubles from one second to a minute: one bad record must never stop collection, eviction
/// or scrubbing for good. The loop itself returns only once `stop` is cancelled.
pub fn supervise<F, Fut>(
    task: &'static str,
    stop: CancellationToken,
    mut start: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            match tokio::spawn(start()).await {
                Ok(()) => return,
                Err(e) => {
                    crate::metrics::get().task_restarts.add(&[task], 1);
                    tracing::error!(task, error = %e, ?backoff, "background loop failed; restarting it");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    })
}

/// Background garbage collection: on the interval, when a lease expires, and once enough
/// deletions or mutations accumulate.
async fn collector(store: Arc<Store>, config: Config, stop: CancellationToken) {
    let interval = std::time::Duration::from_secs(config.gc_interval_secs.max(1));
    let mut next = tokio::time::Instant::now() + interval;
    // When the counts may next start a collection, and whether they asked for one before.
    let mut earliest = tokio::time::Instant::now();
    let mut deferred = false;
    loop {
        // Leases expire by the clock: wake when the next one does, not only on the interval.
        let s = store.clone();
        let expiry = match tokio::task::spawn_blocking(move || s.next_lease_expiry()).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                // A damaged lease record: the interval still runs (and the collection itself
                // refuses to sweep on a view of the roots it cannot read).
                tracing::error!(error = %e, "cannot read lease expiry times");
                None
            }
            Err(e) => {
                step_failed("collector", e);
                None
            }
        };
        let expiry_at =
            expiry.map(|ns| tokio::time::Instant::now() + expiry_wait(ns, crate::store::now_ns()));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next), if config.gc_interval_secs > 0 => {}
            _ = tokio::time::sleep_until(expiry_at.unwrap_or(next)), if expiry_at.is_some() => {}
            _ = tokio::time::sleep_until(earliest), if deferred => {}
            _ = store.changes_noted(), if !deferred => {
                if !store.collection_due() {
                    continue;
                }
                if tokio::time::Instant::now() < earliest {
                    deferred = true;
                    continue;
                }
            }
        }
        deferred = false;
        let s = store.clone();
        let t = tokio::time::Instant::now();
        match tokio::task::spawn_blocking(move || s.collect(false)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "garbage collection failed"),
            Err(e) => step_failed("collector", e),
        }
        let now = tokio::time::Instant::now();
        earliest = now + count_trigger_spacing(now - t, config.gc_pause_percent, interval);
        next = now + interval;
    }
}

/// How long after a collection that took `took` the counts may start the next one, so that
/// collecting takes at most `pause_percent` of wall time (containerd's scheduler keeps the
/// same bound, 2%). Without it, a steady stream of new blobs (a node pulling images) passes
/// the mutation threshold every fraction of a second, and back-to-back collections, each
/// flushing and compacting what it swept, took half a core from the writes that triggered
/// them (measured: 30 ms collections every 65 ms during a 4 KiB write benchmark). At most
/// `cap` (the interval), so a slow collection never postpones the next beyond the timer.
pub fn count_trigger_spacing(took: Duration, pause_percent: u64, cap: Duration) -> Duration {
    if pause_percent == 0 {
        return Duration::ZERO;
    }
    let percent = pause_percent.min(100) as u32;
    took.checked_mul(100).map_or(cap, |t| t / percent).min(cap)
}

/// Percent of the filesystem holding `path` in use.
fn disk_used_percent(path: &Path) -> Option<f64> {
    // As df reports it: used / (used + available to unprivileged users).
    let fs = crate::kv::FsSpace::of(path)?;
    Some(100.0 * fs.used as f64 / (fs.used as f64 + fs.avail as f64).max(1.0))
}

/// Evicts whenever the disk is past its high watermark: unreachable content first, then, if
/// that was not enough, mirrored images least recently used first. Mirrored images also go
/// that way while the registry's namespace holds more than `[registry] max_mib`.
async fn evictor(store: Arc<Store>, config: Config, stop: CancellationToken) {
    let every = std::time::Duration::from_secs(config.eviction_check_secs.max(1));
    let high = f64::from(config.eviction_high_watermark_percent);
    let quota = i64::try_from(config.registry.max_mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX);
    let mirror = crate::store::Scope::namespace(&config.registry.namespace).ok();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let root = config.root.clone();
        let disk_full = move || high > 0.0 && disk_used_percent(&root).is_some_and(|u| u >= high);
        if disk_full() {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.evict()).await {
                Ok(Ok(r)) => tracing::warn!(
                    blobs = r.blobs_swept,
                    bytes = r.bytes_swept,
                    "disk past its high watermark: evicted unreachable content"
                ),
                Ok(Err(e)) => tracing::error!(error = %e, "eviction failed"),
                Err(e) => step_failed("evictor", e),
            }
        }
        let Some(scope) = mirror.clone() else {
            continue;
        };
        let over = move |s: &Store, scope: &crate::store::Scope| {
            (quota > 0 && s.usage_of(scope) > quota) || disk_full()
        };
        if !over(&store, &scope) {
            continue;
        }
        let s = store.clone();
        let ran = tokio::task::spawn_blocking(move || {
            crate::registry::evict::evict_lru(&s, &scope, |s| over(s, &scope))
        })
        .await;
        match ran {
            Ok(Ok(names)) if !names.is_empty() => tracing::warn!(
                images = names.len(),
                "evicted mirrored images, least recently used first"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "eviction of mirrored images failed"),
            Err(e) => step_failed("evictor", e),
        }
    }
}

/// Background re-verification of every stored blob, once per interval, throttled.
async fn scrubber(
    store: Arc<Store>,
    puller: Option<Arc<crate::upstream::pull::Puller>>,
    config: Config,
    stop: CancellationToken,
) {
    let interval = std::time::Duration::from_secs(config.scrub_interval_secs);
    let rate = config.scrub_rate_mib_s.saturating_mul(1 << 20);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.scrub(&[], rate)).await {
            Ok(Ok(r)) => {
                tracing::info!(
                    checked = r.checked,
                    bytes = r.bytes,
                    corrupt = r.corrupt.len(),
                    "scrub finished"
                );
                if let Some(p) = &puller {
                    for c in &r.corrupt {
                        p.refetch(c);
                    }
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "scrub failed"),
            Err(e) => step_failed("scrubber", e),
        }
    }
}

/// The Prometheus endpoint: a minimal HTTP/1.1 responder for `GET /metrics`.
async fn serve_metrics(l: tokio::net::TcpListener, store: Arc<Store>, stop: CancellationToken) {
    let mut incoming = std::pin::pin!(accepting(TcpListenerStream::new(l)));
    loop {
        let mut conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                // `accepting` retries failed accepts itself; this is the listener's end.
                _ => return,
            },
        };
        let store = store.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let line = String::from_utf8_lossy(&head);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = if method != "GET" {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_string(),
                )
            } else if path == "/metrics" || path.starts_with("/metrics?") {
                let s = store.clone();
                let usage = tokio::task::spawn_blocking(move || s.usage()).await;
                let (blobs, bytes, ingests) = match usage {
                    Ok(Ok(u)) => u,
                    _ => (0, 0, 0),
                };
                let g = crate::metrics::Gauges {
                    store_bytes: bytes,
                    store_blobs: blobs,
                    ingests,
                    quarantined: store.quarantined_count(),
                };
                (
                    "200 OK",
                    crate::metrics::CONTENT_TYPE,
                    crate::metrics::render(&g),
                )
            } else {
                (
                    "404 Not Found",
                    "text/plain",
                    "metrics are at /metrics\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let mut signals = Signals::install()?;
    let kv = RocksKv::open(
        &config.root,
        &Tuning::from_budget_mib(config.memory_budget_mib),
    )?;
    let store = Store::open_with(
        Arc::new(kv),
        StoreConfig {
            gc_grace: std::time::Duration::from_secs(config.gc_grace_secs),
            ingest_expiry: std::time::Duration::from_secs(config.ingest_expiry_secs),
            gc_deletion_threshold: config.gc_deletion_threshold,
            gc_mutation_threshold: config.gc_mutation_threshold,
            quotas: config.quotas.namespaces.clone(),
            default_quota: config.quotas.default_bytes,
            max_document: config.max_manifest_bytes,
            disk_reserve: config.disk_reserve_mib.saturating_mul(1 << 20),
            // The collector's marks get the budget again: a collection then runs in memory
            // up to ~1.8M live blobs at the default, and on disk past that.
            gc_mark_memory: usize::try_from(config.memory_budget_mib << 20).unwrap_or(usize::MAX),
            scratch_dir: Some(config.root.clone()),
        },
    )?;
    tracing::info!(root = %config.root.display(), workers = config.workers(), "store open");
    release_free_memory();
    let upstream = Arc::new(crate::upstream::Upstream::new(
        config.upstream.clone(),
        config.max_manifest_bytes,
    )?);
    let puller = Some(crate::upstream::pull::Puller::new(store.clone(), upstream));
    // Read-ahead for all streams together: a quarter of the memory budget again.
    let read_ahead = usize::try_from(config.memory_budget_mib << 20).unwrap_or(usize::MAX) / 4;
    let reads = crate::reads::Reads::new(store.clone(), puller.clone(), read_ahead);

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(CONTENT_SERVICE, tonic_health::ServingStatus::Serving)
        .await;

    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let perms = SocketPerms::of(&config)?;
    let limits = (config.max_message_bytes, config.max_concurrent_streams);
    if let Some(addr) = &config.health_tcp {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(addr = %addr, "health checks listening");
        let r = Server::builder().add_service(health.clone());
        let s = stop.clone();
        tasks.spawn(async move {
            r.serve_with_incoming_shutdown(
                accepting(TcpListenerStream::new(l)),
                s.cancelled_owned(),
            )
            .await
        });
    }
    if let Some(addr) = &config.metrics_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(addr = %addr, "metrics listening on /metrics");
        tokio::spawn(serve_metrics(l, store.clone(), stop.clone()));
    }
    if let Some(addr) = &config.registry_addr {
        let registry = crate::registry::Registry::new(
            store.clone(),
            reads.clone(),
            puller.clone(),
            config.registry.clone(),
            config.max_manifest_bytes,
        )?;
        crate::registry::serve(registry, addr, config.tls.as_ref(), stop.clone()).await?;
    }
    let mut sockets = Vec::new();
    let admin_namespaces = Arc::new(config.admin.namespaces.clone());
    let policy = |admin_listener: bool| crate::api::access::AdminPolicy {
        restricted: config.admin.restricted(),
        admin_listener,
        namespaces: admin_namespaces.clone(),
    };

    // Client-mode unix sockets: the admin socket (if any) and the ordinary one.
    let client_sockets = config
        .admin
        .socket
        .iter()
        .map(|p| (p, true))
        .chain((!config.socket.as_os_str().is_empty()).then_some((&config.socket, false)));
    for (path, admin) in client_sockets {
        let l = bind_unix(path, perms)?;
        sockets.push(path.clone());
        tracing::info!(socket = %path.display(), mode = "client", admin, "listening");
        let r = router!(
            limits,
            store,
            reads,
            puller,
            Mode::Client,
            policy(admin),
            health.clone()
        );
        let s = stop.clone();
        tasks.spawn(async move {
            r.serve_with_incoming_shutdown(accepting_unix(l), s.cancelled_owned())
                .await
        });
    }
    for b in &config.backend {
        let l = bind_unix(&b.socket, perms)?;
        sockets.push(b.socket.clone());
        let tenant = b.tenant();
        tracing::info!(socket = %b.socket.display(), mode = "backend", tenant = %tenant, "listening");
        let r = router!(
            limits,
            store,
            reads,
            puller,
            Mode::Backend { tenant },
            policy(false),
            health.clone()
        );
        let s = stop.clone();
        tasks.spawn(async move {
            r.serve_with_incoming_shutdown(accepting_unix(l), s.cancelled_owned())
                .await
        });
    }
    if let Some(addr) = &config.tcp {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let tls = config
            .tls
            .as_ref()
            .context("tcp needs [tls]: contentd serves TCP only over TLS")?;
        // With a client CA, a client without a certificate that CA signed is refused in the
        // handshake.
        let acceptor = crate::net::tls_acceptor(tls, &[b"h2"])?;
        // Pings find peers that went away without a FIN (a crashed node, a dropped route),
        // whose streams would otherwise hold their pieces until TCP gives up, hours later.
        let builder = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(60)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        tracing::info!(addr = %addr, mode = "client", mtls = tls.client_ca.is_some(), "listening (TLS)");
        let r = router!(
            builder,
            limits,
            store,
            reads,
            puller,
            Mode::Client,
            policy(false),
            health.clone()
        );
        let s = stop.clone();
        tasks.spawn(async move {
            r.serve_with_incoming_shutdown(tls_incoming(l, acceptor), s.cancelled_owned())
                .await
        });
    }

    let collector = {
        let (s, c, t) = (store.clone(), config.clone(), stop.clone());
        supervise("collector", stop.clone(), move || {
            collector(s.clone(), c.clone(), t.clone())
        })
    };
    if config.eviction_high_watermark_percent > 0 || config.registry.max_mib > 0 {
        let (s, c, t) = (store.clone(), config.clone(), stop.clone());
        supervise("evictor", stop.clone(), move || {
            evictor(s.clone(), c.clone(), t.clone())
        });
    }
    if config.scrub_interval_secs > 0 {
        let (s, p, c, t) = (store.clone(), puller.clone(), config.clone(), stop.clone());
        supervise("scrubber", stop.clone(), move || {
            scrubber(s.clone(), p.clone(), c.clone(), t.clone())
        });
    }

    tokio::select! {
        _ = signals.received() => {}
        Some(res) = tasks.join_next() => {
            res.context("listener task")?.context("listener failed")?;
        }
    }
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    stop.cancel();
    // In-flight RPCs get a bounded time to finish before the store closes.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("listeners did not drain within 10s");
    }
    let _ = collector.await;
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
    drop(store);
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[test]
    fn count_triggered_collections_keep_to_their_share_of_time() {
        let (ms, cap) = (Duration::from_millis, Duration::from_secs(600));
        // 2%: fifty times what the last one took.
        assert_eq!(count_trigger_spacing(ms(30), 2, cap), ms(1500));
        assert_eq!(count_trigger_spacing(ms(30), 3, cap), ms(1000));
        assert_eq!(count_trigger_spacing(ms(30), 100, cap), ms(30));
        // Off, and clamped to a percentage.
        assert_eq!(count_trigger_spacing(ms(30), 0, cap), Duration::ZERO);
        assert_eq!(count_trigger_spacing(ms(30), 1000, cap), ms(30));
        // Never past the interval, however long the last one took.
        assert_eq!(count_trigger_spacing(Duration::from_secs(60), 2, cap), cap);
        assert_eq!(count_trigger_spacing(Duration::MAX, 2, cap), cap);
    }

    #[test]
    fn expiry_waits_never_overflow() {
        let now = 1_800_000_000_000_000_000;
        for (expiry, at_most) in [
            (i64::MIN, Duration::from_millis(10)),
            (-8_520_336_000_000_000_000, Duration::from_millis(10)), // 1700-01-01
            (0, Duration::from_millis(10)),
            (now, Duration::from_millis(10)),
            (now + 5_000_000_000, Duration::from_millis(5_010)),
            (
                i64::MAX,
                Duration::from_secs(86_400) + Duration::from_millis(10),
            ),
        ] {
            let w = expiry_wait(expiry, now);
            assert!(w <= at_most, "{expiry}: {w:?}");
            assert!(w >= Duration::from_millis(10));
        }
        assert_eq!(expiry_wait(0, i64::MIN), expiry_wait(i64::MAX, 0));
    }

    /// A loop that panics is restarted (and counted); once it returns normally it stays done.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_loop_is_restarted() {
        let runs = Arc::new(AtomicU32::new(0));
        let before = crate::metrics::get().task_restarts.get(&["test-loop"]);
        let stop = CancellationToken::new();
        let r = runs.clone();
        let h = supervise("test-loop", stop.clone(), move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("simulated bug in a background loop");
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(3600), h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(
            crate::metrics::get().task_restarts.get(&["test-loop"]) - before,
            2
        );
    }

    /// A stop during the backoff ends the supervisor without another run.
    #[tokio::test(start_paused = true)]
    async fn a_stop_during_backoff_ends_supervision() {
        let runs = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        let r = runs.clone();
        let h = supervise("test-stop", stop.clone(), move || {
            r.fetch_add(1, Ordering::SeqCst);
            async { panic!("always") }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        h.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// Accepted connections get the wider send buffer (the kernel reports it doubled; without
    /// CAP_NET_ADMIN it is capped at `net.core.wmem_max`).
    #[tokio::test]
    async fn accepted_unix_connections_get_the_wider_send_buffer() {
        use std::os::fd::AsRawFd;
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let sndbuf = |s: &tokio::net::UnixStream| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `v`.
            let r = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            v
        };
        let before = sndbuf(&a);
        let a = widen_send_buffer(a);
        let after = sndbuf(&a);
        let cap: libc::c_int = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(libc::c_int::MAX);
        // Forced (CAP_NET_ADMIN) or capped.
        assert!(
            after == 2 * UNIX_SEND_BUFFER || after == 2 * UNIX_SEND_BUFFER.min(cap),
            "{before} -> {after}"
        );
        assert!(after > before, "{before} -> {after}");
    }
}
