//! Prometheus metrics: the process-wide registry contentd's layers record into, and its
//! text exposition (format 0.0.4), both by the `prometheus-client` crate. The daemon serves
//! [`render`] over HTTP.
//!
//! Label values are bounded by the callers (only served methods, configured registries and
//! namespaces become labels), so no family grows with client input. Gauges that describe the
//! store (bytes, blobs, ingests) are sampled at scrape time by the daemon.

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Latency buckets, seconds (gRPC calls, GC runs).
const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

type Labels = Vec<(&'static str, String)>;

fn labelled(names: &'static [&'static str], values: &[&str]) -> Labels {
    debug_assert_eq!(names.len(), values.len(), "label arity of {names:?}");
    names
        .iter()
        .zip(values)
        .map(|(n, v)| (*n, (*v).to_owned()))
        .collect()
}

/// A counter family whose label names are fixed at registration.
#[derive(Clone)]
pub struct CounterVec {
    names: &'static [&'static str],
    family: Family<Labels, Counter>,
}

impl CounterVec {
    fn new(names: &'static [&'static str]) -> CounterVec {
        CounterVec {
            names,
            family: Family::default(),
        }
    }
    pub fn add(&self, labels: &[&str], v: u64) {
        self.family
            .get_or_create(&labelled(self.names, labels))
            .inc_by(v);
    }
    pub fn get(&self, labels: &[&str]) -> u64 {
        self.family
            .get(&labelled(self.names, labels))
            .map_or(0, |c| c.get())
    }
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// A histogram family whose label names are fixed at registration.
#[derive(Clone)]
pub struct HistogramVec {
    names: &'static [&'static str],
    family: Family<Labels, Histogram, fn() -> Histogram>,
}

impl HistogramVec {
    fn new(names: &'static [&'static str]) -> HistogramVec {
        HistogramVec {
            names,
            family: Family::new_with_constructor(histogram),
        }
    }
    pub fn observe(&self, labels: &[&str], secs: f64) {
        self.family
            .get_or_create(&labelled(self.names, labels))
            .observe(secs);
    }
}

/// Everything contentd counts.
pub struct Metrics {
    /// (method, code)
    pub rpc_requests: CounterVec,
    /// (method)
    pub rpc_seconds: HistogramVec,
    /// Blob bytes written and read: counted on every write and read message.
    pub bytes_in: Counter,
    pub bytes_out: Counter,
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
    pub disk_reserve_rejections: CounterVec,
    /// (task: collector|evictor|scrubber): background loops restarted after a panic.
    pub task_restarts: CounterVec,
    /// (route, method, status, cache: hit|miss|stale|-): registry HTTP requests.
    pub registry_requests: CounterVec,
    /// (route)
    pub registry_seconds: HistogramVec,
    gauges: Gauges<Gauge>,
    registry: Registry,
}

/// Gauges sampled at scrape time.
#[derive(Default)]
pub struct Gauges<T = i64> {
    pub store_bytes: T,
    pub store_blobs: T,
    pub ingests: T,
    pub quarantined: T,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let rpc_requests = CounterVec::new(&["method", "code"]);
        let rpc_seconds = HistogramVec::new(&["method"]);
        let bytes = Family::<Labels, Counter>::default();
        let bytes_in = bytes.get_or_create_owned(&vec![("direction", "in".to_owned())]);
        let bytes_out = bytes.get_or_create_owned(&vec![("direction", "out".to_owned())]);
        let gc_runs = CounterVec::new(&["result"]);
        let gc_seconds = HistogramVec::new(&[]);
        let gc_swept = CounterVec::new(&["what"]);
        let upstream_fetches = CounterVec::new(&["registry", "result"]);
        let upstream_bytes = CounterVec::new(&["registry"]);
        let scrub_blobs = CounterVec::new(&["result"]);
        let scrub_bytes = CounterVec::new(&[]);
        let quota_rejections = CounterVec::new(&["namespace"]);
        let disk_reserve_rejections = CounterVec::new(&[]);
        let task_restarts = CounterVec::new(&["task"]);
        let registry_requests = CounterVec::new(&["route", "method", "status", "cache"]);
        let registry_seconds = HistogramVec::new(&["route"]);
        let gauges = Gauges::<Gauge>::default();

        let r = &mut registry;
        r.register(
            "contentd_grpc_requests",
            "gRPC requests by method and status code",
            rpc_requests.family.clone(),
        );
        r.register_with_unit(
            "contentd_grpc_request_duration",
            "gRPC request latency (to the end of the response stream)",
            Unit::Seconds,
            rpc_seconds.family.clone(),
        );
        r.register(
            "contentd_content_bytes",
            "Blob bytes written into (in) and read out of (out) the store",
            bytes,
        );
        r.register(
            "contentd_store_bytes",
            "Bytes of committed blobs",
            gauges.store_bytes.clone(),
        );
        r.register(
            "contentd_store_blobs",
            "Committed blobs",
            gauges.store_blobs.clone(),
        );
        r.register(
            "contentd_ingests",
            "Ingests in progress",
            gauges.ingests.clone(),
        );
        r.register(
            "contentd_quarantined_blobs",
            "Blobs the scrubber found corrupt and took out of service",
            gauges.quarantined.clone(),
        );
        r.register(
            "contentd_gc_runs",
            "Garbage collections by result",
            gc_runs.family.clone(),
        );
        r.register_with_unit(
            "contentd_gc_duration",
            "Garbage collection duration",
            Unit::Seconds,
            gc_seconds.family.clone(),
        );
        r.register(
            "contentd_gc_swept",
            "Blobs and bytes removed by garbage collection",
            gc_swept.family.clone(),
        );
        r.register(
            "contentd_upstream_fetches",
            "Blob fetches from upstream registries by result",
            upstream_fetches.family.clone(),
        );
        r.register(
            "contentd_upstream_bytes",
            "Bytes fetched from upstream registries",
            upstream_bytes.family.clone(),
        );
        r.register(
            "contentd_scrub_blobs",
            "Blobs re-verified by the scrubber, by result",
            scrub_blobs.family.clone(),
        );
        r.register(
            "contentd_scrub_bytes",
            "Bytes re-verified by the scrubber",
            scrub_bytes.family.clone(),
        );
        r.register(
            "contentd_quota_rejections",
            "Writes refused because a namespace was over its quota",
            quota_rejections.family.clone(),
        );
        r.register(
            "contentd_disk_reserve_rejections",
            "Writes refused because the disk was down to its reserve (disk_reserve_mib)",
            disk_reserve_rejections.family.clone(),
        );
        r.register(
            "contentd_task_restarts",
            "Background loops (collector, evictor, scrubber) restarted after a panic",
            task_restarts.family.clone(),
        );
        r.register(
            "contentd_registry_requests",
            "Registry (distribution API) requests by route, method, status and cache result",
            registry_requests.family.clone(),
        );
        r.register_with_unit(
            "contentd_registry_request_duration",
            "Registry request latency (to the response head)",
            Unit::Seconds,
            registry_seconds.family.clone(),
        );
        Metrics {
            registry_requests,
            registry_seconds,
            rpc_requests,
            rpc_seconds,
            bytes_in,
            bytes_out,
            gc_runs,
            gc_seconds,
            gc_swept,
            upstream_fetches,
            upstream_bytes,
            scrub_blobs,
            scrub_bytes,
            quota_rejections,
            disk_reserve_rejections,
            task_restarts,
            gauges,
            registry,
        }
    }
}

pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The text exposition of every metric, with the store gauges set to `g`.
pub fn render(g: &Gauges) -> String {
    let m = get();
    m.gauges.store_bytes.set(g.store_bytes);
    m.gauges.store_blobs.set(g.store_blobs);
    m.gauges.ingests.set(g.ingests);
    m.gauges.quarantined.set(g.quarantined);
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &m.registry)
        .expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let m = get();
        m.rpc_requests
            .add(&["/containerd.services.content.v1.Content/Info", "OK"], 2);
        m.rpc_seconds
            .observe(&["/containerd.services.content.v1.Content/Info"], 0.002);
        m.task_restarts.add(&["exposition-test"], 1);
        m.bytes_in.inc_by(5);
        let text = render(&Gauges {
            store_blobs: 3,
            ..Default::default()
        });
        for want in [
            "# TYPE contentd_grpc_requests_total counter",
            "contentd_grpc_requests_total{method=\"/containerd.services.content.v1.Content/Info\",code=\"OK\"}",
            "# TYPE contentd_grpc_request_duration_seconds histogram",
            "contentd_grpc_request_duration_seconds_bucket{method=\"/containerd.services.content.v1.Content/Info\",le=\"0.0025\"} 1",
            "contentd_task_restarts_total{task=\"exposition-test\"} 1",
            "contentd_content_bytes_total{direction=\"in\"}",
            "contentd_store_blobs 3",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert_eq!(m.task_restarts.get(&["exposition-test"]), 1);
        assert_eq!(m.task_restarts.get(&["never-seen"]), 0);
    }
}
