//! Prometheus metrics: the process-wide registry contentd's layers record into, and its
//! text exposition (format 0.0.4) served over HTTP by the daemon.
//!
//! Counters and histograms are plain atomics behind a lock-free fast path for the label sets
//! seen so far; gauges that describe the store (bytes, blobs, ingests) are sampled at scrape
//! time by the daemon.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

/// Latency buckets, seconds (gRPC calls, GC runs).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Histogram {
    buckets: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            buckets: BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// A family of counters keyed by label values.
#[derive(Default)]
pub struct CounterVec(RwLock<BTreeMap<Vec<String>, AtomicU64>>);

impl CounterVec {
    pub fn add(&self, labels: &[&str], v: u64) {
        if let Some(c) = self.0.read().get(&key(labels)) {
            c.fetch_add(v, Ordering::Relaxed);
            return;
        }
        self.0
            .write()
            .entry(key(labels))
            .or_default()
            .fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(&self, labels: &[&str]) -> u64 {
        self.0
            .read()
            .get(&key(labels))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

#[derive(Default)]
pub struct HistogramVec(RwLock<BTreeMap<Vec<String>, Histogram>>);

impl HistogramVec {
    pub fn observe(&self, labels: &[&str], secs: f64) {
        if let Some(h) = self.0.read().get(&key(labels)) {
            h.observe(secs);
            return;
        }
        self.0.write().entry(key(labels)).or_default().observe(secs);
    }
}

fn key(labels: &[&str]) -> Vec<String> {
    labels.iter().map(|s| s.to_string()).collect()
}

/// Everything contentd counts.
#[derive(Default)]
pub struct Metrics {
    /// (method, code)
    pub rpc_requests: CounterVec,
    /// (method)
    pub rpc_seconds: HistogramVec,
    /// Blob bytes written and read: plain atomics, they are counted on every write and read
    /// message.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// (result: ok|error)
    pub gc_runs: CounterVec,
    pub gc_seconds: HistogramVec,
    /// (what: blobs|bytes)
    pub gc_swept: CounterVec,
    /// (registry, result: ok|<error kind>)
    pub upstream_fetches: CounterVec,
    /// (registry)
    pub upstream_bytes: CounterVec,
    /// (result: ok|corrupt)
    pub scrub_blobs: CounterVec,
    pub scrub_bytes: CounterVec,
    /// (namespace)
    pub quota_rejections: CounterVec,
    /// (task: collector|evictor|scrubber): background loops restarted after a panic.
    pub task_restarts: CounterVec,
}

pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(names: &[&str], values: &[String], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", esc(v)))
        .collect();
    if let Some((n, v)) = extra {
        parts.push(format!("{n}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn counter(out: &mut String, name: &str, help: &str, names: &[&str], c: &CounterVec) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (k, v) in c.0.read().iter() {
        let _ = writeln!(
            out,
            "{name}{} {}",
            labels(names, k, None),
            v.load(Ordering::Relaxed)
        );
    }
}

fn histogram(out: &mut String, name: &str, help: &str, names: &[&str], h: &HistogramVec) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (k, v) in h.0.read().iter() {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{} {}",
                labels(names, k, Some(("le", format!("{b}")))),
                v.buckets[i].load(Ordering::Relaxed)
            );
        }
        let n = v.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{} {n}",
            labels(names, k, Some(("le", "+Inf".into())))
        );
        let _ = writeln!(
            out,
            "{name}_sum{} {}",
            labels(names, k, None),
            v.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{} {n}", labels(names, k, None));
    }
}

/// Gauges sampled at scrape time.
pub struct Gauges {
    pub store_bytes: i64,
    pub store_blobs: i64,
    pub ingests: i64,
    pub quarantined: i64,
}

/// The text exposition of every metric.
pub fn render(g: &Gauges) -> String {
    let m = get();
    let mut out = String::new();
    counter(
        &mut out,
        "contentd_grpc_requests_total",
        "gRPC requests by method and status code.",
        &["method", "code"],
        &m.rpc_requests,
    );
    histogram(
        &mut out,
        "contentd_grpc_request_duration_seconds",
        "gRPC request latency (to the end of the response stream).",
        &["method"],
        &m.rpc_seconds,
    );
    let _ = writeln!(
        out,
        "# HELP contentd_content_bytes_total Blob bytes written into (in) and read out of (out) the store.\n\
         # TYPE contentd_content_bytes_total counter\n\
         contentd_content_bytes_total{{direction=\"in\"}} {}\n\
         contentd_content_bytes_total{{direction=\"out\"}} {}",
        m.bytes_in.load(Ordering::Relaxed),
        m.bytes_out.load(Ordering::Relaxed)
    );
    for (name, help, v) in [
        (
            "contentd_store_bytes",
            "Bytes of committed blobs.",
            g.store_bytes,
        ),
        ("contentd_store_blobs", "Committed blobs.", g.store_blobs),
        ("contentd_ingests", "Ingests in progress.", g.ingests),
        (
            "contentd_quarantined_blobs",
            "Blobs the scrubber found corrupt and took out of service.",
            g.quarantined,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    counter(
        &mut out,
        "contentd_gc_runs_total",
        "Garbage collections by result.",
        &["result"],
        &m.gc_runs,
    );
    histogram(
        &mut out,
        "contentd_gc_duration_seconds",
        "Garbage collection duration.",
        &[],
        &m.gc_seconds,
    );
    counter(
        &mut out,
        "contentd_gc_swept_total",
        "Blobs and bytes removed by garbage collection.",
        &["what"],
        &m.gc_swept,
    );
    counter(
        &mut out,
        "contentd_upstream_fetches_total",
        "Blob fetches from upstream registries by result.",
        &["registry", "result"],
        &m.upstream_fetches,
    );
    counter(
        &mut out,
        "contentd_upstream_bytes_total",
        "Bytes fetched from upstream registries.",
        &["registry"],
        &m.upstream_bytes,
    );
    counter(
        &mut out,
        "contentd_scrub_blobs_total",
        "Blobs re-verified by the scrubber, by result.",
        &["result"],
        &m.scrub_blobs,
    );
    counter(
        &mut out,
        "contentd_scrub_bytes_total",
        "Bytes re-verified by the scrubber.",
        &[],
        &m.scrub_bytes,
    );
    counter(
        &mut out,
        "contentd_quota_rejections_total",
        "Writes refused because a namespace was over its quota.",
        &["namespace"],
        &m.quota_rejections,
    );
    counter(
        &mut out,
        "contentd_task_restarts_total",
        "Background loops (collector, evictor, scrubber) restarted after a panic.",
        &["task"],
        &m.task_restarts,
    );
    out
}
