//! `contentd bench-registry`: contentd's distribution API side by side with the upstream
//! registry it mirrors (e.g. Debian's docker-registry), measured by one client in one run:
//!
//! - a cached layer served by contentd vs the same layer from the upstream, whole GETs at
//!   concurrency 1 and 16 (aggregate MiB/s);
//! - a miss through contentd vs a direct upstream GET (time to first byte and to the end);
//! - 64 clients fetching one uncached layer at once (aggregate MiB/s, and how many GETs of it
//!   the upstream saw, from its access log when given);
//! - manifest HEAD by tag, cached (p50/p99), against the upstream's;
//! - the daemon's peak RSS.
//!
//! A miss needs the layer gone from contentd: before each, the bench deletes the repository's
//! manifest and layer through the API and runs a collection over the daemon's socket, so the
//! daemon must run with `--gc-grace-secs 0`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;

use crate::bench::{RssSampler, median, pid_of_socket, status_kib};
use crate::client::connect_unix;

pub struct Options {
    /// The daemon's client socket (collections between miss runs; its pid for RSS).
    pub socket: PathBuf,
    /// contentd's registry, `HOST:PORT`.
    pub registry: String,
    /// The upstream registry, `HOST:PORT` (plain HTTP).
    pub upstream: String,
    /// `REPOSITORY:TAG` on the upstream; its largest layer is the subject.
    pub image: String,
    /// The upstream's access log, to count its GETs of the layer.
    pub upstream_log: Option<PathBuf>,
    pub runs: usize,
    /// The registry's namespace (`[registry] namespace`).
    pub namespace: String,
}

#[derive(Debug, Default)]
pub struct Figures {
    pub layer: String,
    pub layer_mib: f64,
    pub cached_c1: (f64, f64),
    pub cached_c16: (f64, f64),
    pub miss_ttfb_ms: (f64, f64),
    pub miss_total_ms: (f64, f64),
    pub herd_mib_s: f64,
    pub herd_upstream_gets: Option<usize>,
    pub head_p50_ms: (f64, f64),
    pub head_p99_ms: (f64, f64),
    pub daemon_peak_rss_mib: Option<f64>,
    pub daemon_hwm_mib: Option<f64>,
}

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

fn client() -> anyhow::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?)
}

/// The largest layer of `repo:tag` on `host` (the first manifest of an index).
async fn largest_layer(
    c: &reqwest::Client,
    host: &str,
    repo: &str,
    tag: &str,
) -> anyhow::Result<(String, u64)> {
    let get = |r: String| {
        c.get(format!("http://{host}/v2/{repo}/manifests/{r}"))
            .header("Accept", ACCEPT)
            .send()
    };
    let mut v: serde_json::Value = get(tag.to_string())
        .await?
        .error_for_status()?
        .json()
        .await?;
    if let Some(m) = v["manifests"].as_array().and_then(|m| m.first()) {
        let d = m["digest"]
            .as_str()
            .context("index entry without digest")?
            .to_string();
        v = get(d).await?.error_for_status()?.json().await?;
    }
    v["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .filter_map(|l| Some((l["digest"].as_str()?.to_string(), l["size"].as_u64()?)))
        .max_by_key(|l| l.1)
        .context("no layers")
}

/// One whole GET: (time to the first body byte, time to the end, bytes).
async fn get(c: &reqwest::Client, url: &str) -> anyhow::Result<(Duration, Duration, u64)> {
    let t = Instant::now();
    let r = c.get(url).send().await?.error_for_status()?;
    let mut s = r.bytes_stream();
    let mut first = None;
    let mut n = 0u64;
    while let Some(b) = s.next().await {
        let b = b?;
        if first.is_none() && !b.is_empty() {
            first = Some(t.elapsed());
        }
        n += b.len() as u64;
    }
    Ok((first.unwrap_or_default(), t.elapsed(), n))
}

/// `total` whole GETs of `url` by `conc` clients: aggregate MiB/s.
async fn throughput(
    c: &reqwest::Client,
    url: &str,
    conc: usize,
    total: usize,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let results = futures::stream::iter(0..total)
        .map(|_| get(c, url))
        .buffer_unordered(conc)
        .collect::<Vec<_>>()
        .await;
    let mut bytes = 0u64;
    for r in results {
        bytes += r?.2;
    }
    Ok(bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64())
}

/// Throughput of `a` and `b` side by side: alternating bursts of `per` whole GETs at `conc`,
/// at least 3 rounds; each side's figure is the median of its bursts. One burst of each is
/// a fraction of a second here, so a noisy moment then spoils one burst rather than one
/// side's whole figure (single back-to-back bursts gave 0.99x and 1.45x in two runs).
async fn side_by_side(
    c: &reqwest::Client,
    a: &str,
    b: &str,
    conc: usize,
    per: usize,
    rounds: usize,
) -> anyhow::Result<(f64, f64)> {
    let (mut xa, mut xb) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(3) {
        xa.push(throughput(c, a, conc, per).await?);
        xb.push(throughput(c, b, conc, per).await?);
    }
    Ok((median(&mut xa), median(&mut xb)))
}

/// `n` HEADs of a manifest by tag by 16 clients: (p50, p99) in ms.
async fn heads(c: &reqwest::Client, url: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut lat = futures::stream::iter(0..n)
        .map(|_| async {
            let t = Instant::now();
            let r = c.head(url).header("Accept", ACCEPT).send().await?;
            if !r.status().is_success() {
                bail!("HEAD {url}: {}", r.status());
            }
            Ok::<_, anyhow::Error>(t.elapsed().as_secs_f64() * 1e3)
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<f64>>>()?;
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok((
        lat[lat.len() / 2],
        lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
    ))
}

fn upstream_gets(log: &Option<PathBuf>, digest: &str) -> Option<usize> {
    let text = std::fs::read_to_string(log.as_ref()?).ok()?;
    Some(
        text.lines()
            .filter(|l| l.contains("\"GET ") && l.contains(&format!("/blobs/{digest}")))
            .count(),
    )
}

pub async fn run(o: Options) -> anyhow::Result<Figures> {
    let (repo, tag) = o
        .image
        .rsplit_once(':')
        .context("--image is REPOSITORY:TAG")?;
    let c = client()?;
    let (layer, size) = largest_layer(&c, &o.upstream, repo, tag).await?;
    let ch = connect_unix(&o.socket).await?;
    let pid = pid_of_socket(&o.socket);
    let rss = RssSampler::start(pid);
    let ns = format!("?ns={}", o.upstream);
    let cd = |path: &str| format!("http://{}/v2/{repo}/{path}{ns}", o.registry);
    let up = |path: &str| format!("http://{}/v2/{repo}/{path}", o.upstream);
    let layer_path = format!("blobs/{layer}");
    let tag_path = format!("manifests/{tag}");
    let mut f = Figures {
        layer: layer.clone(),
        layer_mib: size as f64 / (1 << 20) as f64,
        ..Default::default()
    };

    // Forgets the image in contentd, so the next GET is a miss.
    let forget = || async {
        let r = c
            .head(cd(&tag_path))
            .header("Accept", ACCEPT)
            .send()
            .await?;
        if let Some(d) = r.headers().get("Docker-Content-Digest") {
            let d = d.to_str()?.to_string();
            c.delete(cd(&format!("manifests/{d}"))).send().await?;
        }
        c.delete(cd(&layer_path)).send().await?;
        crate::bench_pull::collect_forgotten(&ch, &o.namespace).await
    };

    // Misses, alternating with direct GETs of the same layer.
    let (mut m1, mut m2, mut d1, mut d2) = (vec![], vec![], vec![], vec![]);
    for _ in 0..o.runs {
        forget().await?;
        // A client resolves the tag first (it records where the layer comes from).
        c.get(cd(&tag_path))
            .header("Accept", ACCEPT)
            .send()
            .await?
            .error_for_status()?;
        let (a, b, n) = get(&c, &cd(&layer_path)).await?;
        if n != size {
            bail!("contentd served {n} of {size} bytes of {layer}");
        }
        m1.push(a.as_secs_f64() * 1e3);
        m2.push(b.as_secs_f64() * 1e3);
        let (a, b, _) = get(&c, &up(&layer_path)).await?;
        d1.push(a.as_secs_f64() * 1e3);
        d2.push(b.as_secs_f64() * 1e3);
    }
    f.miss_ttfb_ms = (median(&mut m1), median(&mut d1));
    f.miss_total_ms = (median(&mut m2), median(&mut d2));

    // The herd: 64 clients, one uncached layer.
    forget().await?;
    c.get(cd(&tag_path))
        .header("Accept", ACCEPT)
        .send()
        .await?
        .error_for_status()?;
    let before = upstream_gets(&o.upstream_log, &layer);
    f.herd_mib_s = throughput(&c, &cd(&layer_path), 64, 64).await?;
    // The upstream logs a request once its response is done, which can be just after our
    // readers finished.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    f.herd_upstream_gets = upstream_gets(&o.upstream_log, &layer)
        .zip(before)
        .map(|(a, b)| a - b);

    // Cached, side by side.
    let (a, b) = (cd(&layer_path), up(&layer_path));
    f.cached_c1 = side_by_side(&c, &a, &b, 1, 4, o.runs).await?;
    f.cached_c16 = side_by_side(&c, &a, &b, 16, 32, o.runs).await?;
    let (a50, a99) = heads(&c, &cd(&tag_path), 2000).await?;
    let (b50, b99) = heads(&c, &up(&tag_path), 2000).await?;
    f.head_p50_ms = (a50, b50);
    f.head_p99_ms = (a99, b99);

    if let Some(r) = rss {
        f.daemon_peak_rss_mib = Some(r.finish().await);
    }
    f.daemon_hwm_mib = pid
        .and_then(|p| status_kib(p, "VmHWM:"))
        .map(|k| k as f64 / 1024.0);
    Ok(f)
}

pub fn print(f: &Figures) {
    let r = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!("layer {} ({:.1} MiB)", f.layer, f.layer_mib);
    println!("| scenario | contentd | upstream | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| cached layer GET, c=1 (MiB/s) | {:.0} | {:.0} | {:.2}x |",
        f.cached_c1.0,
        f.cached_c1.1,
        r(f.cached_c1.0, f.cached_c1.1)
    );
    println!(
        "| cached layer GET, c=16 (MiB/s) | {:.0} | {:.0} | {:.2}x |",
        f.cached_c16.0,
        f.cached_c16.1,
        r(f.cached_c16.0, f.cached_c16.1)
    );
    println!(
        "| miss vs direct GET, first byte (ms, median) | {:.1} | {:.1} | {:.2}x |",
        f.miss_ttfb_ms.0,
        f.miss_ttfb_ms.1,
        r(f.miss_ttfb_ms.0, f.miss_ttfb_ms.1)
    );
    println!(
        "| miss vs direct GET, whole layer (ms, median) | {:.1} | {:.1} | {:.2}x |",
        f.miss_total_ms.0,
        f.miss_total_ms.1,
        r(f.miss_total_ms.0, f.miss_total_ms.1)
    );
    println!(
        "| manifest HEAD by tag, c=16 (ms p50 / p99) | {:.2} / {:.2} | {:.2} / {:.2} | |",
        f.head_p50_ms.0, f.head_p99_ms.0, f.head_p50_ms.1, f.head_p99_ms.1
    );
    println!(
        "64 clients, one uncached layer: {:.0} MiB/s aggregate, upstream GETs of it: {}",
        f.herd_mib_s,
        f.herd_upstream_gets
            .map_or("(no --upstream-log)".to_string(), |n| n.to_string())
    );
    if let Some(p) = f.daemon_peak_rss_mib {
        println!(
            "daemon peak RSS during the run: {p:.1} MiB (VmHWM {:.1} MiB)",
            f.daemon_hwm_mib.unwrap_or(0.0)
        );
    }
}
