//! `contentd bench-pull`: pull-through figures against a real registry, measured by one
//! client in one run. Time to first byte of a layer read lazily through contentd against a
//! plain HTTP GET of the same blob from the registry; an eager pull against `skopeo copy` of
//! the same image into an OCI layout; the daemon's peak memory while a large lazy layer
//! streams through it.
//!
//! Between runs the bench deletes what it pulled and runs a collection, so every run fetches
//! from the registry again: the daemon must run with `--gc-grace-secs 0`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::pb::containerd::services::content::v1 as cpb;
use crate::api::pb::containerd::services::images::v1 as ipb;
use crate::api::pb::contentd::v1 as gpb;
use crate::bench::{RssSampler, median, pid_of_socket, status_kib};
use crate::client::{Namespace, connect_unix};

pub struct Options {
    pub socket: PathBuf,
    /// An image whose largest layer is the TTFB subject (e.g. the 50 MiB fixture layer).
    pub reference: String,
    /// An image with a large layer for the memory figure (optional).
    pub big_reference: Option<String>,
    pub runs: usize,
}

#[derive(Debug)]
pub struct Figures {
    pub layer: String,
    pub layer_bytes: i64,
    pub direct_ttfb_ms: f64,
    pub direct_total_ms: f64,
    pub lazy_ttfb_ms: f64,
    pub lazy_total_ms: f64,
    /// The same layer read again once stored: what content.v1 streaming alone costs.
    pub stored_total_ms: f64,
    pub eager_pull_ms: f64,
    pub skopeo_copy_ms: Option<f64>,
    pub big_layer_bytes: Option<i64>,
    pub big_read_mib_s: Option<f64>,
    pub big_peak_rss_mib: Option<f64>,
    pub daemon_hwm_mib: Option<f64>,
}

async fn pull(
    ch: &tonic::transport::Channel,
    ns: &str,
    reference: &str,
    lazy: bool,
) -> anyhow::Result<String> {
    let mut c = gpb::registry_client::RegistryClient::with_interceptor(
        ch.clone(),
        Namespace::new(Some(ns))?,
    );
    let mut s = c
        .pull(gpb::PullRequest {
            reference: reference.into(),
            mode: if lazy { 1 } else { 0 },
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut root = String::new();
    while let Some(e) = s.message().await? {
        if e.state == gpb::pull_event::State::Done as i32 {
            root = e.digest;
        }
    }
    Ok(root)
}

/// The largest layer of an image: (digest, size).
async fn largest_layer(
    ch: &tonic::transport::Channel,
    ns: &str,
    root: &str,
) -> anyhow::Result<(String, i64)> {
    let mut g =
        gpb::graph_client::GraphClient::with_interceptor(ch.clone(), Namespace::new(Some(ns))?);
    let w = g
        .walk(gpb::DigestRequest {
            digest: root.into(),
        })
        .await?
        .into_inner();
    w.edges
        .iter()
        .filter(|e| e.role == "layer")
        .max_by_key(|e| e.size)
        .map(|e| (e.to.clone(), e.size))
        .context("the image has no layer")
}

/// Deletes what a run pulled into `ns` and collects it, so the next run fetches again.
async fn forget(ch: &tonic::transport::Channel, ns: &str, image: &str) -> anyhow::Result<()> {
    let n = Namespace::new(Some(ns))?;
    let mut images = ipb::images_client::ImagesClient::with_interceptor(ch.clone(), n.clone());
    images
        .delete(ipb::DeleteImageRequest {
            name: image.into(),
            sync: false,
        })
        .await?;
    collect_forgotten(ch, ns).await
}

/// Runs a collection that must sweep what a bench just forgot in `ns` (a daemon with a grace
/// period would keep it, and the next "miss" would be a hit). A reader of a fetch finishes
/// once the bytes are verified, before the fetch's commit: the collection waits for the
/// namespace's ingests to end, or the blob would be committed after it and stay.
pub(crate) async fn collect_forgotten(
    ch: &tonic::transport::Channel,
    ns: &str,
) -> anyhow::Result<()> {
    wait_ingests(ch, ns).await?;
    let mut gc = gpb::gc_client::GcClient::new(ch.clone());
    let r = gc
        .run(gpb::RunRequest { dry_run: false })
        .await?
        .into_inner();
    if r.blobs_swept == 0 {
        bail!("the collection swept nothing: run the daemon with --gc-grace-secs 0");
    }
    Ok(())
}

/// Waits (up to 10 s) until no ingest is open in `ns`: its fetches have committed.
async fn wait_ingests(ch: &tonic::transport::Channel, ns: &str) -> anyhow::Result<()> {
    let mut content =
        cpb::content_client::ContentClient::with_interceptor(ch.clone(), Namespace::new(Some(ns))?);
    for _ in 0..200 {
        let st = content
            .list_statuses(cpb::ListStatusesRequest { filters: vec![] })
            .await?
            .into_inner();
        if st.statuses.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Time to the first body byte and to the last, of a plain HTTP/1.1 GET.
async fn direct_get(reference: &str, digest: &str) -> anyhow::Result<(Duration, Duration, u64)> {
    let (src, _) = crate::upstream::parse_reference(reference)?;
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(&src.registry).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET /v2/{}/blobs/{digest} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        src.repository, src.registry
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut first = None;
    let mut body = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if first.is_none() {
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                let status = String::from_utf8_lossy(&head[..head.len().min(12)]).to_string();
                if !status.contains(" 200") {
                    bail!("registry answered {status}");
                }
                let rest = (head.len() - (i + 4)) as u64;
                if rest > 0 {
                    first = Some(t.elapsed());
                    body += rest;
                }
            }
        } else {
            body += n as u64;
        }
        if first.is_none() && body > 0 {
            first = Some(t.elapsed());
        }
    }
    if first.is_none() {
        first = Some(t.elapsed());
    }
    Ok((first.unwrap(), t.elapsed(), body))
}

/// Reads a whole blob through content.v1: (first message, last message, bytes).
async fn read_all(
    ch: &tonic::transport::Channel,
    ns: &str,
    digest: &str,
) -> anyhow::Result<(Duration, Duration, u64)> {
    let mut c =
        cpb::content_client::ContentClient::with_interceptor(ch.clone(), Namespace::new(Some(ns))?)
            .max_decoding_message_size(16 << 20);
    let t = Instant::now();
    let mut s = c
        .read(cpb::ReadContentRequest {
            digest: digest.into(),
            offset: 0,
            size: 0,
        })
        .await?
        .into_inner();
    let mut first = None;
    let mut n = 0u64;
    while let Some(m) = s.message().await? {
        first.get_or_insert_with(|| t.elapsed());
        n += m.data.len() as u64;
    }
    Ok((first.unwrap_or_default(), t.elapsed(), n))
}

pub async fn run(opts: Options) -> anyhow::Result<Figures> {
    let ch = connect_unix(&opts.socket).await?;
    let runs = opts.runs.max(1);
    let tag = std::process::id();

    let ns = format!("bench-pull-{tag}-probe");
    let root = pull(&ch, &ns, &opts.reference, true).await?;
    let (layer, layer_bytes) = largest_layer(&ch, &ns, &root).await?;
    forget(&ch, &ns, &opts.reference).await.ok();

    let (mut dt, mut dtot, mut lt, mut ltot, mut st, mut ep, mut sk) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        // Alternate which goes first, so neither always meets a warm page cache.
        let direct = direct_get(&opts.reference, &layer).await?;
        if direct.2 != layer_bytes as u64 {
            bail!("the registry sent {} bytes of {layer_bytes}", direct.2);
        }
        dt.push(direct.0.as_secs_f64() * 1e3);
        dtot.push(direct.1.as_secs_f64() * 1e3);

        let ns = format!("bench-pull-{tag}-lazy-{i}");
        pull(&ch, &ns, &opts.reference, true).await?;
        let (first, total, n) = read_all(&ch, &ns, &layer).await?;
        if n != layer_bytes as u64 {
            bail!("contentd returned {n} bytes of {layer_bytes}");
        }
        lt.push(first.as_secs_f64() * 1e3);
        ltot.push(total.as_secs_f64() * 1e3);
        wait_ingests(&ch, &ns).await?;
        let (_, total, _) = read_all(&ch, &ns, &layer).await?;
        st.push(total.as_secs_f64() * 1e3);
        forget(&ch, &ns, &opts.reference).await?;

        let ns = format!("bench-pull-{tag}-eager-{i}");
        let t = Instant::now();
        pull(&ch, &ns, &opts.reference, false).await?;
        ep.push(t.elapsed().as_secs_f64() * 1e3);
        forget(&ch, &ns, &opts.reference).await?;

        if let Some(ms) = skopeo_copy(&opts.reference).await? {
            sk.push(ms);
        }
    }

    let (mut big_layer_bytes, mut big_read, mut big_rss) = (None, None, None);
    let pid = pid_of_socket(&opts.socket);
    if let Some(big) = &opts.big_reference {
        let ns = format!("bench-pull-{tag}-big");
        let root = pull(&ch, &ns, big, true).await?;
        let (blayer, bsize) = largest_layer(&ch, &ns, &root).await?;
        let sampler = RssSampler::start(pid);
        let (_, total, n) = read_all(&ch, &ns, &blayer).await?;
        if n != bsize as u64 {
            bail!("contentd returned {n} bytes of {bsize}");
        }
        if let Some(s) = sampler {
            big_rss = Some(s.finish().await);
        }
        big_layer_bytes = Some(bsize);
        big_read = Some(n as f64 / (1 << 20) as f64 / total.as_secs_f64());
        forget(&ch, &ns, big).await?;
    }
    Ok(Figures {
        layer,
        layer_bytes,
        direct_ttfb_ms: median(&mut dt),
        direct_total_ms: median(&mut dtot),
        lazy_ttfb_ms: median(&mut lt),
        lazy_total_ms: median(&mut ltot),
        stored_total_ms: median(&mut st),
        eager_pull_ms: median(&mut ep),
        skopeo_copy_ms: (!sk.is_empty()).then(|| median(&mut sk)),
        big_layer_bytes,
        big_read_mib_s: big_read,
        big_peak_rss_mib: big_rss,
        daemon_hwm_mib: pid
            .and_then(|p| status_kib(p, "VmHWM:"))
            .map(|k| k as f64 / 1024.0),
    })
}

/// `skopeo copy docker://REF oci:DIR` of the same image, when skopeo is installed.
async fn skopeo_copy(reference: &str) -> anyhow::Result<Option<f64>> {
    let dir = std::env::temp_dir().join(format!("contentd-bench-skopeo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let policy = dir.with_extension("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let t = Instant::now();
    let st = tokio::process::Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:bench", dir.display()))
        .stdout(std::process::Stdio::null())
        .status()
        .await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&policy);
    match st {
        Ok(s) if s.success() => Ok(Some(ms)),
        Ok(s) => bail!("skopeo copy failed ({s})"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn print(f: &Figures) {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "layer {} ({:.1} MiB)",
        f.layer,
        f.layer_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "time to first byte: lazy through contentd {:.2} ms, direct registry GET {:.2} ms ({:.2}x)",
        f.lazy_ttfb_ms,
        f.direct_ttfb_ms,
        ratio(f.lazy_ttfb_ms, f.direct_ttfb_ms)
    );
    println!(
        "whole layer: lazy through contentd {:.1} ms, direct registry GET {:.1} ms ({:.2}x); \
         the same read once stored {:.1} ms",
        f.lazy_total_ms,
        f.direct_total_ms,
        ratio(f.lazy_total_ms, f.direct_total_ms),
        f.stored_total_ms
    );
    match f.skopeo_copy_ms {
        Some(s) => println!(
            "eager pull: contentd {:.1} ms, skopeo copy to an OCI layout {:.1} ms ({:.2}x)",
            f.eager_pull_ms,
            s,
            ratio(f.eager_pull_ms, s)
        ),
        None => println!(
            "eager pull: contentd {:.1} ms (skopeo not installed)",
            f.eager_pull_ms
        ),
    }
    if let (Some(b), Some(r)) = (f.big_layer_bytes, f.big_read_mib_s) {
        println!(
            "lazy read of a {:.0} MiB layer: {:.0} MiB/s, daemon peak RSS while streaming {} MiB",
            b as f64 / (1 << 20) as f64,
            r,
            f.big_peak_rss_mib.map_or("?".into(), |m| format!("{m:.1}"))
        );
    }
    if let Some(h) = f.daemon_hwm_mib {
        println!("daemon VmHWM over its life: {h:.1} MiB");
    }
}
