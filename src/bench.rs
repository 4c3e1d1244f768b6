//! `contentd bench`: drives any `containerd.services.content.v1.Content` endpoint (contentd or
//! containerd itself) through the same scenarios, so both can be measured in one run.
//!
//! Scenarios: large-blob write (pipelined 1 MiB messages) and read (MiB/s); 4 KiB blob writes
//! in containerd's lockstep Stat/Write/Commit pattern and full reads of them, each at
//! concurrency 1 and 16 (ops/s, p50/p99); random 1 MiB ranged reads at concurrency 16; Info/s
//! with p99; a full List; and the server's RSS sampled during each scenario when its pid is
//! known, also with one large write beside one large read and under 64 concurrent streams.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use crate::api::pb::containerd::services::content::v1 as pb;
use crate::client::{Namespace, connect_unix};
use crate::digest::{Algorithm, Digest};

type Client = pb::content_client::ContentClient<InterceptedService<Channel, Namespace>>;

#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub namespace: Option<String>,
    pub pid: Option<u32>,
    pub large_mib: u64,
    /// How many times the large write and read are repeated (the median is reported).
    pub runs: usize,
    pub small_count: usize,
    pub ranged_reads: usize,
    pub info_calls: usize,
    pub label: Option<String>,
}

#[derive(Debug, Serialize, serde::Deserialize, Default, Clone)]
pub struct Report {
    pub target: String,
    pub large_write_mib_s: f64,
    /// The same write in lockstep: each 1 MiB WRITE sent once the previous one is answered,
    /// as containerd's client (`content.Copy`) writes.
    #[serde(default)]
    pub large_write_lockstep_mib_s: f64,
    pub large_read_mib_s: f64,
    pub small_writes_c1_per_s: f64,
    pub small_writes_c1_p50_ms: f64,
    pub small_writes_c1_p99_ms: f64,
    pub small_writes_c16_per_s: f64,
    pub small_writes_c16_p50_ms: f64,
    pub small_writes_c16_p99_ms: f64,
    pub small_reads_c1_per_s: f64,
    pub small_reads_c1_p99_ms: f64,
    pub small_reads_c16_per_s: f64,
    pub small_reads_c16_p99_ms: f64,
    /// Random 1 MiB ranged reads of the large blob at concurrency 16.
    pub ranged_reads_per_s: f64,
    pub ranged_read_p50_ms: f64,
    pub ranged_read_p99_ms: f64,
    pub info_per_s: f64,
    pub info_p99_ms: f64,
    pub list_ms: f64,
    pub list_entries: usize,
    pub rss_large_write_mib: Option<f64>,
    pub rss_large_read_mib: Option<f64>,
    pub rss_peak_mib: Option<f64>,
    /// Peak server RSS while one stream writes a large blob and another reads one.
    pub rss_in_and_out_mib: Option<f64>,
    /// Peak server RSS under 64 concurrent streams (48 ranged readers, 16 writers).
    pub rss_64_streams_mib: Option<f64>,
    pub streams_64_mib_s: f64,
    /// Info c=4 while a large blob is written and (where the endpoint has contentd.v1.GC)
    /// collections run: calls answered, and their p99.
    pub info_under_load_calls: usize,
    pub info_under_load_p99_ms: f64,
    pub collections_under_load: usize,
    /// The hostile workload: another namespace opens a shared ingest of the large blob and
    /// appends one byte. Peak server RSS while it is answered, and RSS before it.
    pub rss_before_hostile_mib: Option<f64>,
    pub rss_shared_append_mib: Option<f64>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// Finds the pid serving a unix socket path, through /proc.
pub fn pid_of_socket(path: &Path) -> Option<u32> {
    let want = std::fs::canonicalize(path).ok()?;
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && Path::new(f[7]) == want).then(|| f[6].to_string())
        })
        .collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if inodes.iter().any(|i| t == format!("socket:[{i}]")) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Samples a process's RSS every 20 ms until dropped; reports the maximum in MiB.
pub(crate) struct RssSampler {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    pub(crate) fn start(pid: Option<u32>) -> Option<RssSampler> {
        let pid = pid?;
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(async move {
            let mut max = 0;
            loop {
                max = max.max(status_kib(pid, "VmRSS:").unwrap_or(0));
                tokio::select! {
                    _ = &mut rx => return max,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        });
        Some(RssSampler {
            stop: Some(tx),
            handle,
        })
    }
    pub(crate) async fn finish(mut self) -> f64 {
        let _ = self.stop.take().map(|s| s.send(()));
        self.handle.await.unwrap_or(0) as f64 / 1024.0
    }
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

async fn finish(s: Option<RssSampler>) -> Option<f64> {
    match s {
        Some(s) => Some(s.finish().await),
        None => None,
    }
}

const GC_ROOT: &str = "containerd.io/gc.root";

/// Writes one blob the way containerd's client does: STAT, WRITE and COMMIT on one stream,
/// each sent only after the previous one is answered (lockstep).
async fn write_small(client: &mut Client, r: String, data: Vec<u8>) -> anyhow::Result<Digest> {
    let d = Digest::of(Algorithm::Sha256, &data);
    let total = data.len() as i64;
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::WriteContentRequest {
        action: pb::WriteAction::Stat as i32,
        r#ref: r,
        ..Default::default()
    })
    .await?;
    let mut resp = client
        .write(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    resp.message().await?.context("no STAT response")?;
    tx.send(pb::WriteContentRequest {
        action: pb::WriteAction::Write as i32,
        offset: 0,
        data: data.into(),
        ..Default::default()
    })
    .await?;
    resp.message().await?.context("no WRITE response")?;
    tx.send(pb::WriteContentRequest {
        action: pb::WriteAction::Commit as i32,
        total,
        offset: total,
        expected: d.to_string(),
        labels: [(GC_ROOT.to_string(), "bench".to_string())].into(),
        ..Default::default()
    })
    .await?;
    let m = resp.message().await?.context("no COMMIT response")?;
    if m.digest != d.to_string() {
        bail!("server reported digest {} for {d}", m.digest);
    }
    drop(tx);
    while resp.message().await?.is_some() {}
    Ok(d)
}

/// A blob's WRITE messages, one per buffer.
fn write_messages(chunks: &[Vec<u8>]) -> impl Iterator<Item = pb::WriteContentRequest> + '_ {
    chunks.iter().scan(0i64, |off, c| {
        let m = pb::WriteContentRequest {
            action: pb::WriteAction::Write as i32,
            offset: *off,
            data: c.clone().into(),
            ..Default::default()
        };
        *off += c.len() as i64;
        Some(m)
    })
}

/// Writes `chunks` as one blob under `r` (pipelined or in lockstep): its digest and MiB/s.
async fn timed_write(
    client: &Client,
    chunks: &mut Vec<Vec<u8>>,
    r: String,
    lockstep: bool,
) -> anyhow::Result<(Digest, f64)> {
    let mut h = Algorithm::Sha256.hasher();
    chunks.iter().for_each(|c| h.update(c));
    let d = h.digest();
    let mib = chunks.iter().map(|c| c.len()).sum::<usize>() as f64 / (1u64 << 20) as f64;
    let shared = Arc::new(std::mem::take(chunks));
    let t = Instant::now();
    write_large(&mut client.clone(), r, shared.clone(), d.clone(), lockstep).await?;
    let rate = mib / t.elapsed().as_secs_f64();
    *chunks = Arc::try_unwrap(shared).map_err(|_| anyhow::anyhow!("chunk buffers still shared"))?;
    Ok((d, rate))
}

/// Streams a large blob in 1 MiB WRITE messages, then commits: pipelined, or in lockstep.
async fn write_large(
    client: &mut Client,
    r: String,
    chunks: Arc<Vec<Vec<u8>>>,
    d: Digest,
    lockstep: bool,
) -> anyhow::Result<()> {
    let total: i64 = chunks.iter().map(|c| c.len() as i64).sum();
    let (tx, rx) = mpsc::channel(4);
    // The first message must be queued before the call: a Go server sends its response
    // headers only with its first response, which it sends only after the first request.
    tx.send(pb::WriteContentRequest {
        action: pb::WriteAction::Stat as i32,
        r#ref: r,
        total,
        ..Default::default()
    })
    .await?;
    let mut resp = client
        .write(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    resp.message().await?.context("no STAT response")?;
    let commit = pb::WriteContentRequest {
        action: pb::WriteAction::Commit as i32,
        offset: total,
        total,
        expected: d.to_string(),
        labels: [(GC_ROOT.to_string(), "bench".to_string())].into(),
        ..Default::default()
    };
    let last = if lockstep {
        for m in write_messages(&chunks) {
            tx.send(m).await?;
            resp.message().await?.context("no WRITE response")?;
        }
        tx.send(commit).await?;
        resp.message().await?.context("no COMMIT response")?
    } else {
        // Pipelined: keep a few messages in flight, as a streaming client does.
        let producer = tokio::spawn(async move {
            for m in write_messages(&chunks).chain([commit]) {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
        });
        let mut last = None;
        while let Some(m) = resp.message().await? {
            last = Some(m);
        }
        producer.await?;
        last.context("no response")?
    };
    if last.action != pb::WriteAction::Commit as i32 || last.offset != total {
        bail!("large write did not commit: {last:?}");
    }
    Ok(())
}

async fn read_all(client: &mut Client, d: &Digest, offset: i64, size: i64) -> anyhow::Result<u64> {
    let mut s = client
        .read(pb::ReadContentRequest {
            digest: d.to_string(),
            offset,
            size,
        })
        .await?
        .into_inner();
    let mut n = 0u64;
    while let Some(m) = s.message().await? {
        n += m.data.len() as u64;
    }
    Ok(n)
}

/// Runs `total` operations over `conc` workers; returns elapsed time and sorted latencies.
async fn concurrent<F, Fut>(
    conc: usize,
    total: usize,
    op: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conc {
        let (op, next) = (op.clone(), next.clone());
        set.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t = Instant::now();
                op(i).await?;
                lat.push(t.elapsed());
            }
        });
    }
    let mut all = Vec::with_capacity(total);
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    let elapsed = start.elapsed();
    all.sort();
    Ok((elapsed, all))
}

pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let channel = connect_unix(&opts.socket).await?;
    let ns = Namespace::new(opts.namespace.as_deref())?;
    let client: Client = pb::content_client::ContentClient::with_interceptor(channel, ns)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let pid = opts.pid.or_else(|| pid_of_socket(&opts.socket));
    let target = opts
        .label
        .clone()
        .unwrap_or_else(|| opts.socket.display().to_string());
    eprintln!(
        "bench: {target} (server pid {})",
        pid.map(|p| p.to_string())
            .unwrap_or_else(|| "unknown".into())
    );
    let mut report = Report {
        target,
        ..Default::default()
    };
    let run_id: u64 = rand::rng().random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(run_id);
    let mut written: Vec<Digest> = Vec::new();

    // Large blob, `runs` times with unique content each time (digest computed before
    // timing); the median rate is reported, and the highest RSS seen.
    let mut chunks: Vec<Vec<u8>> = (0..opts.large_mib)
        .map(|i| {
            let mut c = vec![0u8; 1 << 20];
            rng.fill_bytes(&mut c[..4096]);
            c[..8].copy_from_slice(&(run_id ^ i).to_le_bytes());
            for j in 1..256 {
                c.copy_within(0..4096, j * 4096);
                c[j * 4096] ^= j as u8;
            }
            c
        })
        .collect();
    let bytes = opts.large_mib as f64;
    let (mut writes, mut reads, mut lockstep) = (Vec::new(), Vec::new(), Vec::new());
    let mut big = Digest::of(Algorithm::Sha256, b"");
    for run in 0..opts.runs.max(1) {
        for c in chunks.iter_mut() {
            c[8..16].copy_from_slice(&(run as u64).to_le_bytes());
        }
        let s = RssSampler::start(pid);
        let (d, rate) = timed_write(
            &client,
            &mut chunks,
            format!("bench-large-{run_id}-{run}"),
            false,
        )
        .await?;
        big = d;
        writes.push(rate);
        report.rss_large_write_mib = max_opt(report.rss_large_write_mib, finish(s).await);
        written.push(big.clone());

        // The same size in lockstep, as other bytes (a blob of its own). A flipped bit, not
        // a set byte: the byte is random, and set to a value it already had (1 run in 256)
        // the blob was the one just written, and the write failed AlreadyExists.
        chunks[0][16] ^= 1;
        let (other, rate) = timed_write(
            &client,
            &mut chunks,
            format!("bench-lockstep-{run_id}-{run}"),
            true,
        )
        .await?;
        lockstep.push(rate);
        written.push(other);
        chunks[0][16] ^= 1;

        let s = RssSampler::start(pid);
        let t = Instant::now();
        let n = read_all(&mut client.clone(), &big, 0, 0).await?;
        reads.push(bytes / t.elapsed().as_secs_f64());
        report.rss_large_read_mib = max_opt(report.rss_large_read_mib, finish(s).await);
        if n != opts.large_mib << 20 {
            bail!("large read returned {n} bytes");
        }
        eprintln!(
            "  large write {:.0} MiB/s ({:.0} in lockstep), read {:.0} MiB/s",
            writes[run], lockstep[run], reads[run]
        );
    }
    report.large_write_mib_s = median(&mut writes);
    report.large_write_lockstep_mib_s = median(&mut lockstep);
    report.large_read_mib_s = median(&mut reads);

    // 4 KiB blobs.
    let small = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    for conc in [1usize, 16] {
        let count = if conc == 1 {
            opts.small_count / 4
        } else {
            opts.small_count
        };
        let (c, sm) = (client.clone(), small.clone());
        let (el, lat) = concurrent(conc, count, move |i| {
            let mut c = c.clone();
            let sm = sm.clone();
            async move {
                let mut data = vec![0u8; 4096];
                rand::rng().fill_bytes(&mut data);
                let d =
                    write_small(&mut c, format!("bench-small-{run_id}-{conc}-{i}"), data).await?;
                sm.lock().await.push(d);
                Ok(())
            }
        })
        .await?;
        let rate = count as f64 / el.as_secs_f64();
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        if conc == 1 {
            (
                report.small_writes_c1_per_s,
                report.small_writes_c1_p50_ms,
                report.small_writes_c1_p99_ms,
            ) = (rate, p50, p99);
        } else {
            (
                report.small_writes_c16_per_s,
                report.small_writes_c16_p50_ms,
                report.small_writes_c16_p99_ms,
            ) = (rate, p50, p99);
        }
        eprintln!("  4 KiB writes c={conc}: {rate:.0}/s p50 {p50:.2} ms p99 {p99:.2} ms");
    }
    let small: Vec<Digest> = std::mem::take(&mut *small.lock().await);

    // Full reads of the 4 KiB blobs, one Read call each (what a client's ReaderAt does for a
    // config or a small manifest).
    let ds = Arc::new(small.clone());
    for conc in [1usize, 16] {
        let count = if conc == 1 {
            opts.small_count
        } else {
            opts.small_count * 4
        };
        let (c, ds) = (client.clone(), ds.clone());
        let (el, lat) = concurrent(conc, count, move |i| {
            let (mut c, ds) = (c.clone(), ds.clone());
            async move {
                let n = read_all(&mut c, &ds[i % ds.len()], 0, 0).await?;
                if n != 4096 {
                    bail!("small read returned {n} bytes");
                }
                Ok(())
            }
        })
        .await?;
        let rate = count as f64 / el.as_secs_f64();
        let p99 = percentile(&lat, 0.99);
        if conc == 1 {
            (report.small_reads_c1_per_s, report.small_reads_c1_p99_ms) = (rate, p99);
        } else {
            (report.small_reads_c16_per_s, report.small_reads_c16_p99_ms) = (rate, p99);
        }
        eprintln!("  4 KiB reads c={conc}: {rate:.0}/s p99 {p99:.2} ms");
    }

    // Random 1 MiB ranged reads of the large blob.
    let (c, b2, max) = (
        client.clone(),
        big.clone(),
        (opts.large_mib.saturating_sub(1) << 20) as i64,
    );
    let (el, lat) = concurrent(16, opts.ranged_reads, move |_| {
        let (mut c, b) = (c.clone(), b2.clone());
        async move {
            let off = rand::rng().random_range(0..=max.max(0));
            let n = read_all(&mut c, &b, off, 1 << 20).await?;
            if n != 1 << 20 {
                bail!("ranged read returned {n} bytes");
            }
            Ok(())
        }
    })
    .await?;
    report.ranged_reads_per_s = opts.ranged_reads as f64 / el.as_secs_f64();
    (report.ranged_read_p50_ms, report.ranged_read_p99_ms) =
        (percentile(&lat, 0.5), percentile(&lat, 0.99));
    eprintln!(
        "  ranged 1 MiB reads: {:.0}/s p99 {:.2} ms",
        report.ranged_reads_per_s, report.ranged_read_p99_ms
    );

    // Info.
    let (c, ds) = (client.clone(), Arc::new(small.clone()));
    let (el, lat) = concurrent(16, opts.info_calls, move |i| {
        let (mut c, ds) = (c.clone(), ds.clone());
        async move {
            let d = &ds[i % ds.len()];
            c.info(pb::InfoRequest {
                digest: d.to_string(),
            })
            .await?;
            Ok(())
        }
    })
    .await?;
    report.info_per_s = opts.info_calls as f64 / el.as_secs_f64();
    report.info_p99_ms = percentile(&lat, 0.99);
    eprintln!(
        "  info: {:.0}/s p99 {:.2} ms",
        report.info_per_s, report.info_p99_ms
    );

    // One stream writes a large blob while another reads one: the daemon's memory must not
    // follow either blob's size.
    for c in chunks.iter_mut() {
        c[8..16].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
    }
    let mut h = Algorithm::Sha256.hasher();
    chunks.iter().for_each(|c| h.update(c));
    let in_out = h.digest();
    let shared = Arc::new(std::mem::take(&mut chunks));
    let s = RssSampler::start(pid);
    let writer = {
        let (mut c, shared, d) = (client.clone(), shared.clone(), in_out.clone());
        let r = format!("bench-in-out-{run_id}");
        tokio::spawn(async move { write_large(&mut c, r, shared, d, false).await })
    };
    let n = read_all(&mut client.clone(), &big, 0, 0).await?;
    writer.await??;
    report.rss_in_and_out_mib = finish(s).await;
    if n != opts.large_mib << 20 {
        bail!("large read returned {n} bytes");
    }
    written.push(in_out);
    chunks = Arc::try_unwrap(shared).map_err(|_| anyhow::anyhow!("chunk buffers still shared"))?;
    eprintln!(
        "  one {} MiB write beside one read: RSS {:?} MiB",
        opts.large_mib, report.rss_in_and_out_mib
    );

    // 64 concurrent streams: 48 read 16 MiB ranges of the large blob, 16 write 4 MiB blobs.
    let mut blobs = Vec::new();
    for w in 0..16u64 {
        let parts: Vec<Vec<u8>> = (0..4u64)
            .map(|i| {
                let mut c = chunks[i as usize % chunks.len()].clone();
                c[16..32].copy_from_slice(&[(run_id ^ w).to_le_bytes(), i.to_le_bytes()].concat());
                c
            })
            .collect();
        let mut h = Algorithm::Sha256.hasher();
        parts.iter().for_each(|c| h.update(c));
        blobs.push((h.digest(), Arc::new(parts)));
    }
    let s = RssSampler::start(pid);
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (w, (d, parts)) in blobs.iter().enumerate() {
        let (mut c, d, parts) = (client.clone(), d.clone(), parts.clone());
        let r = format!("bench-64-{run_id}-{w}");
        set.spawn(async move {
            write_large(&mut c, r, parts, d, false).await?;
            Ok::<u64, anyhow::Error>(4 << 20)
        });
    }
    let span = (opts.large_mib << 20).saturating_sub(16 << 20) as i64;
    for _ in 0..48 {
        let (mut c, b) = (client.clone(), big.clone());
        let off = rand::rng().random_range(0..=span.max(0));
        set.spawn(async move { read_all(&mut c, &b, off, 16 << 20).await });
    }
    let mut moved = 0u64;
    while let Some(r) = set.join_next().await {
        moved += r??;
    }
    report.streams_64_mib_s = moved as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    report.rss_64_streams_mib = finish(s).await;
    written.extend(blobs.into_iter().map(|(d, _)| d));
    eprintln!(
        "  64 streams: {:.0} MiB/s, RSS {:?} MiB",
        report.streams_64_mib_s, report.rss_64_streams_mib
    );

    // Info while a large blob streams in and collections run: the async workers must never
    // wait on an fsync, a RocksDB write or a store lock.
    for c in chunks.iter_mut() {
        c[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    }
    let mut h = Algorithm::Sha256.hasher();
    chunks.iter().for_each(|c| h.update(c));
    let loaded = h.digest();
    let shared = Arc::new(std::mem::take(&mut chunks));
    let writer = {
        let (mut c, shared, d) = (client.clone(), shared.clone(), loaded.clone());
        let r = format!("bench-load-{run_id}");
        tokio::spawn(async move { write_large(&mut c, r, shared, d, false).await })
    };
    let collector = {
        let ch = connect_unix(&opts.socket).await?;
        let ns = Namespace::new(opts.namespace.as_deref())?;
        let mut gc = crate::api::pb::contentd::v1::gc_client::GcClient::with_interceptor(ch, ns);
        let writing = writer.abort_handle();
        tokio::spawn(async move {
            let mut n = 0usize;
            while !writing.is_finished() {
                match gc
                    .run(crate::api::pb::contentd::v1::RunRequest { dry_run: false })
                    .await
                {
                    Ok(_) => n += 1,
                    // containerd has no such service: Info under the write alone.
                    Err(_) => return n,
                }
            }
            n
        })
    };
    let mut lat = Vec::new();
    let ds = Arc::new(small.clone());
    let mut infos = tokio::task::JoinSet::new();
    for w in 0..4usize {
        let (mut c, ds) = (client.clone(), ds.clone());
        let done = writer.abort_handle();
        infos.spawn(async move {
            let mut lat = Vec::new();
            let mut i = w;
            while !done.is_finished() {
                let t = Instant::now();
                c.info(pb::InfoRequest {
                    digest: ds[i % ds.len()].to_string(),
                })
                .await?;
                lat.push(t.elapsed());
                i += 4;
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    while let Some(r) = infos.join_next().await {
        lat.extend(r??);
    }
    writer.await??;
    report.collections_under_load = collector.await?;
    written.push(loaded);
    drop(shared);
    lat.sort();
    report.info_under_load_calls = lat.len();
    report.info_under_load_p99_ms = percentile(&lat, 0.99);
    eprintln!(
        "  info during a {} MiB write and {} collections: {} calls, p99 {:.2} ms",
        opts.large_mib,
        report.collections_under_load,
        report.info_under_load_calls,
        report.info_under_load_p99_ms
    );

    // Hostile: a shared ingest of the large blob in another namespace, one byte appended.
    report.rss_before_hostile_mib = pid
        .and_then(|p| status_kib(p, "VmRSS:"))
        .map(|k| k as f64 / 1024.0);
    let other_ns = format!("{}-hostile", opts.namespace.as_deref().unwrap_or("bench"));
    let ch = connect_unix(&opts.socket).await?;
    let mut other: Client =
        pb::content_client::ContentClient::with_interceptor(ch, Namespace::new(Some(&other_ns))?);
    let s = RssSampler::start(pid);
    let hostile_ref = format!("bench-hostile-{run_id}");
    let size = (opts.large_mib << 20) as i64;
    let msgs = vec![
        pb::WriteContentRequest {
            action: pb::WriteAction::Stat as i32,
            r#ref: hostile_ref.clone(),
            total: size,
            expected: big.to_string(),
            ..Default::default()
        },
        pb::WriteContentRequest {
            action: pb::WriteAction::Write as i32,
            offset: size,
            data: vec![b'!'].into(),
            ..Default::default()
        },
    ];
    let answered = match other.write(tokio_stream::iter(msgs)).await {
        Ok(r) => {
            let mut r = r.into_inner();
            let mut n = 0;
            while let Ok(Some(_)) = r.message().await {
                n += 1;
            }
            n
        }
        Err(_) => 0,
    };
    report.rss_shared_append_mib = finish(s).await;
    let _ = other.abort(pb::AbortRequest { r#ref: hostile_ref }).await;
    eprintln!(
        "  shared-ingest append ({answered} answers): RSS {:?} MiB before, {:?} MiB peak",
        report.rss_before_hostile_mib, report.rss_shared_append_mib
    );

    // List everything visible.
    let t = Instant::now();
    let mut s = client
        .clone()
        .list(pb::ListContentRequest { filters: vec![] })
        .await?
        .into_inner();
    let mut entries = 0;
    while let Some(m) = s.message().await? {
        entries += m.info.len();
    }
    report.list_ms = t.elapsed().as_secs_f64() * 1e3;
    report.list_entries = entries;
    eprintln!("  list: {entries} entries in {:.1} ms", report.list_ms);

    report.rss_peak_mib = pid
        .and_then(|p| status_kib(p, "VmHWM:"))
        .map(|k| k as f64 / 1024.0);

    written.extend(small);
    let mut c = client.clone();
    for d in written {
        let _ = c
            .delete(pb::DeleteContentRequest {
                digest: d.to_string(),
            })
            .await;
    }
    Ok(report)
}

/// One endpoint's rounds merged: every figure is the median of its rounds (a peak RSS too:
/// the typical peak, not the worst). Rounds of different endpoints are run alternately, so
/// a minute in which the machine runs slow weighs on both sides of a ratio alike.
pub fn median_of_rounds(rounds: &[Report]) -> anyhow::Result<Report> {
    let Some(first) = rounds.first() else {
        bail!("no rounds to merge");
    };
    let values: Vec<serde_json::Value> = rounds
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    let mut merged = serde_json::to_value(first)?;
    let serde_json::Value::Object(fields) = &mut merged else {
        bail!("a report is not a JSON object");
    };
    for (name, v) in fields.iter_mut() {
        let mut xs: Vec<f64> = values
            .iter()
            .filter_map(|r| r.get(name).and_then(|x| x.as_f64()))
            .collect();
        if xs.is_empty() || !v.is_number() && !v.is_null() {
            continue;
        }
        let m = median(&mut xs);
        *v = match v.is_u64() {
            true => serde_json::Value::from(m.round() as u64),
            false => serde_json::Value::from(m),
        };
    }
    Ok(serde_json::from_value(merged)?)
}

pub fn print_table(reports: &[Report]) {
    type Row = (&'static str, Box<dyn Fn(&Report) -> String>);
    let rows: Vec<Row> = vec![
        (
            "large write MiB/s",
            Box::new(|r| format!("{:.0}", r.large_write_mib_s)),
        ),
        (
            "  lockstep MiB/s",
            Box::new(|r| format!("{:.0}", r.large_write_lockstep_mib_s)),
        ),
        (
            "large read MiB/s",
            Box::new(|r| format!("{:.0}", r.large_read_mib_s)),
        ),
        (
            "4KiB writes/s c=1",
            Box::new(|r| format!("{:.0}", r.small_writes_c1_per_s)),
        ),
        (
            "  p50/p99 ms",
            Box::new(|r| {
                format!(
                    "{:.2}/{:.2}",
                    r.small_writes_c1_p50_ms, r.small_writes_c1_p99_ms
                )
            }),
        ),
        (
            "4KiB writes/s c=16",
            Box::new(|r| format!("{:.0}", r.small_writes_c16_per_s)),
        ),
        (
            "  p50/p99 ms",
            Box::new(|r| {
                format!(
                    "{:.2}/{:.2}",
                    r.small_writes_c16_p50_ms, r.small_writes_c16_p99_ms
                )
            }),
        ),
        (
            "4KiB reads/s c=1",
            Box::new(|r| format!("{:.0}", r.small_reads_c1_per_s)),
        ),
        (
            "  p99 ms",
            Box::new(|r| format!("{:.2}", r.small_reads_c1_p99_ms)),
        ),
        (
            "4KiB reads/s c=16",
            Box::new(|r| format!("{:.0}", r.small_reads_c16_per_s)),
        ),
        (
            "  p99 ms",
            Box::new(|r| format!("{:.2}", r.small_reads_c16_p99_ms)),
        ),
        (
            "ranged 1MiB reads/s c=16",
            Box::new(|r| format!("{:.0}", r.ranged_reads_per_s)),
        ),
        (
            "  p50/p99 ms",
            Box::new(|r| format!("{:.2}/{:.2}", r.ranged_read_p50_ms, r.ranged_read_p99_ms)),
        ),
        ("Info/s c=16", Box::new(|r| format!("{:.0}", r.info_per_s))),
        ("  p99 ms", Box::new(|r| format!("{:.2}", r.info_p99_ms))),
        (
            "List ms (entries)",
            Box::new(|r| format!("{:.1} ({})", r.list_ms, r.list_entries)),
        ),
        (
            "RSS during large write MiB",
            Box::new(|r| {
                r.rss_large_write_mib
                    .map_or("-".into(), |v| format!("{v:.1}"))
            }),
        ),
        (
            "RSS during large read MiB",
            Box::new(|r| {
                r.rss_large_read_mib
                    .map_or("-".into(), |v| format!("{v:.1}"))
            }),
        ),
        (
            "RSS write+read streams MiB",
            Box::new(|r| {
                r.rss_in_and_out_mib
                    .map_or("-".into(), |v| format!("{v:.1}"))
            }),
        ),
        (
            "RSS 64 streams MiB",
            Box::new(|r| {
                format!(
                    "{} ({:.0} MiB/s)",
                    r.rss_64_streams_mib
                        .map_or("-".into(), |v| format!("{v:.1}")),
                    r.streams_64_mib_s
                )
            }),
        ),
        (
            "Info p99 ms under write+GC",
            Box::new(|r| {
                format!(
                    "{:.2} ({} calls, {} GC)",
                    r.info_under_load_p99_ms, r.info_under_load_calls, r.collections_under_load
                )
            }),
        ),
        (
            "RSS shared-append MiB",
            Box::new(|r| {
                format!(
                    "{} -> {}",
                    r.rss_before_hostile_mib
                        .map(|v| format!("{v:.0}"))
                        .unwrap_or("-".into()),
                    r.rss_shared_append_mib
                        .map(|v| format!("{v:.0}"))
                        .unwrap_or("-".into())
                )
            }),
        ),
        (
            "peak RSS MiB (VmHWM)",
            Box::new(|r| r.rss_peak_mib.map_or("-".into(), |v| format!("{v:.1}"))),
        ),
    ];
    print!("{:<28}", "scenario");
    for r in reports {
        print!(
            " {:>22}",
            r.target
                .chars()
                .rev()
                .take(22)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        );
    }
    println!();
    for (name, f) in rows {
        print!("{name:<28}");
        for r in reports {
            print!(" {:>22}", f(r));
        }
        println!();
    }
}

/// Figures from `contentd bench-gc`.
#[derive(Debug, Serialize, Default)]
pub struct GcBench {
    pub blobs: usize,
    pub images_rooted: usize,
    pub setup_s: f64,
    pub gc_s: f64,
    pub marked: i64,
    pub swept_blobs: i64,
    pub collector_max_pause_ms: f64,
    /// Times the marks outgrew `--mark-mib` and went to disk.
    pub mark_spills: i64,
    pub writes_during_gc: usize,
    pub write_p50_ms: f64,
    pub write_p99_ms: f64,
    pub write_max_ms: f64,
    /// The same writer for 5 s before the collection, with nothing else running.
    pub baseline_write_p99_ms: f64,
    pub baseline_write_max_ms: f64,
    /// This process's RSS just before the collection, and its peak while it ran (sampled
    /// every 20 ms): the difference is what the collection held.
    pub rss_before_gc_mib: f64,
    pub gc_peak_rss_mib: f64,
}

/// Builds a synthetic store of `blobs` blobs (images of 1 manifest, 1 config and 8 layers;
/// every other image named, the rest garbage) in `root`, then collects it while a writer
/// keeps committing small blobs, and reports the collection time and the write latencies.
#[cfg(feature = "rocksdb")]
pub async fn gc_bench(root: &Path, blobs: usize, mark_memory: usize) -> anyhow::Result<GcBench> {
    use crate::kv::rocks::{RocksKv, Tuning};
    use crate::store::{ImageRecord, Scope, Store, StoreConfig};
    let kv = RocksKv::open(root, &Tuning::default())?;
    let store = Store::open_with(
        Arc::new(kv),
        StoreConfig {
            gc_grace: Duration::ZERO,
            gc_mark_memory: mark_memory,
            scratch_dir: Some(root.to_path_buf()),
            ..Default::default()
        },
    )?;
    let scope = Scope::namespace("bench")?;
    let images = (blobs / 10).max(1);
    let t = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (store, scope, next) = (store.clone(), scope.clone(), next.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= images {
                    return anyhow::Ok(());
                }
                let mut layers = Vec::new();
                for l in 0..8 {
                    let data = format!("layer {l} of image {i}").into_bytes();
                    layers.push((Digest::of(Algorithm::Sha256, &data), data.len()));
                    put_in(&store, &scope, format!("l-{i}-{l}"), data).await?;
                }
                let config = format!("{{\"config of\":{i}}}").into_bytes();
                let cd = Digest::of(Algorithm::Sha256, &config);
                let clen = config.len();
                put_in(&store, &scope, format!("c-{i}"), config).await?;
                let layers_json: Vec<String> = layers
                    .iter()
                    .map(|(d, n)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{n}}}"#))
                    .collect();
                let manifest = format!(
                    r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{clen}}},"layers":[{}]}}"#,
                    layers_json.join(",")
                )
                .into_bytes();
                let md = Digest::of(Algorithm::Sha256, &manifest);
                let mlen = manifest.len() as i64;
                put_in(&store, &scope, format!("m-{i}"), manifest).await?;
                if i % 2 == 0 {
                    let (st, sc) = (store.clone(), scope.clone());
                    tokio::task::spawn_blocking(move || {
                        st.create_image(
                            &sc,
                            ImageRecord {
                                name: format!("bench/{i}"),
                                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                                digest: md.to_string(),
                                size: mlen,
                                ..Default::default()
                            },
                        )
                    })
                    .await??;
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let setup_s = t.elapsed().as_secs_f64();
    eprintln!("bench-gc: {} blobs written in {setup_s:.1} s", images * 10);

    // A writer commits small blobs back to back: first with no collection (the baseline:
    // fsync and compaction jitter alone), then while the collection runs. Each write's
    // latency is kept with when it started.
    let writer = |tag: &'static str, stop: Arc<std::sync::atomic::AtomicBool>| {
        let (ws, wsc) = (store.clone(), scope.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data = format!("write {tag} {i}").into_bytes();
                let t = Instant::now();
                put_in(&ws, &wsc, format!("{tag}-{i}"), data).await?;
                lat.push((t.elapsed(), t));
                i += 1;
            }
            anyhow::Ok(lat)
        })
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let baseline = writer("baseline", stop.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut base: Vec<Duration> = baseline.await??.into_iter().map(|(l, _)| l).collect();
    base.sort();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = writer("during", stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let me = std::process::id();
    let rss_before_gc_mib = status_kib(me, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let sampler = RssSampler::start(Some(me));
    let t = Instant::now();
    let started_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let st = store.clone();
    let report = tokio::task::spawn_blocking(move || st.collect(false)).await??;
    let gc_s = t.elapsed().as_secs_f64();
    let gc_peak_rss_mib = match sampler {
        Some(s) => s.finish().await,
        None => 0.0,
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut timed = writer.await??;
    timed.sort_by_key(|w| w.0);
    // The slowest writes, and when they started relative to the collection's start: to
    // line a tail up with the collector's phases (its debug log lines) and RocksDB's LOG
    // (whose EVENT_LOG times are µs after the epoch).
    eprintln!("bench-gc: the collection started at {started_us} µs after the epoch");
    for (l, at) in timed.iter().rev().take(8) {
        let at = match at.checked_duration_since(t) {
            Some(after) => after.as_secs_f64(),
            None => -(t - *at).as_secs_f64(),
        };
        eprintln!(
            "bench-gc: write of {:.1} ms at {at:+.3} s",
            l.as_secs_f64() * 1e3
        );
    }
    let lat: Vec<Duration> = timed.into_iter().map(|(l, _)| l).collect();
    Ok(GcBench {
        blobs: images * 10,
        images_rooted: images.div_ceil(2),
        setup_s,
        gc_s,
        marked: report.marked,
        swept_blobs: report.blobs_swept,
        collector_max_pause_ms: report.max_pause_us as f64 / 1e3,
        mark_spills: report.mark_spills,
        writes_during_gc: lat.len(),
        write_p50_ms: percentile(&lat, 0.5),
        write_p99_ms: percentile(&lat, 0.99),
        write_max_ms: lat.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0),
        baseline_write_p99_ms: percentile(&base, 0.99),
        baseline_write_max_ms: base.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0),
        rss_before_gc_mib,
        gc_peak_rss_mib,
    })
}

/// One blob through the store's write path (single-message upload).
#[cfg(feature = "rocksdb")]
async fn put_in(
    store: &Arc<crate::store::Store>,
    scope: &crate::store::Scope,
    r: String,
    data: Vec<u8>,
) -> anyhow::Result<()> {
    let d = Digest::of(Algorithm::Sha256, &data);
    let mut w = store
        .open_writer(scope.clone(), &r, data.len() as i64, Some(d.clone()), None)
        .await?;
    tokio::task::spawn_blocking(move || {
        w.write(0, &data)?;
        w.commit(data.len() as i64, Some(d), None)
    })
    .await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_merge_to_the_median_of_each_figure() {
        let round = |info: f64, rss: Option<f64>, entries: usize| Report {
            target: "x".into(),
            info_per_s: info,
            rss_peak_mib: rss,
            list_entries: entries,
            ..Default::default()
        };
        let m = median_of_rounds(&[
            round(9000.0, Some(80.0), 10),
            round(21000.0, None, 12),
            round(15000.0, Some(60.0), 11),
        ])
        .unwrap();
        assert_eq!(m.target, "x");
        assert_eq!(m.info_per_s, 15000.0);
        // A figure some rounds lack is the median of the rounds that have it.
        assert_eq!(m.rss_peak_mib, Some(80.0));
        assert_eq!(m.list_entries, 11);
        assert!(median_of_rounds(&[]).is_err());
    }
}
