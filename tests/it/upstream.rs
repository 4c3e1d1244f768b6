//! Pull-through from a real registry (Debian's docker-registry with the fixtures pushed by
//! shared/images/registry.sh): eager and lazy pulls, on-demand reads, single flight, and
//! upstream faults.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use contentd::api::pb::containerd::services::content::v1 as cpb;
use contentd::api::pb::containerd::services::images::v1 as ipb;
use contentd::api::pb::contentd::v1 as gpb;
use contentd::client::{Namespace, connect_unix};
use serde_json::Value;
use tonic::transport::Channel;

use crate::graph::{blob_files, fixtures, walk_edges, walk_nodes, want_edges, want_nodes};
use crate::harness::*;
use crate::registry::{Proxy, Registry, free_port};

const LAYER_TYPES: &[&str] = &["layer", "tar"];

fn is_layer(media_type: &str) -> bool {
    LAYER_TYPES.iter().any(|t| media_type.contains(t)) && !media_type.contains("manifest")
}

/// A config file whose `[upstream]` table has `top` and whose entry for `host` has `registry`.
fn config_with(host: &str, top: &str, registry: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("contentd.toml");
    std::fs::write(
        &p,
        format!("[upstream]\n{top}\n[upstream.registries.\"{host}\"]\n{registry}\n"),
    )
    .unwrap();
    (dir, p)
}

async fn pull(
    ch: &Channel,
    ns: &str,
    reference: &str,
    lazy: bool,
) -> Result<Vec<gpb::PullEvent>, tonic::Status> {
    let mut c = gpb::registry_client::RegistryClient::with_interceptor(
        ch.clone(),
        Namespace::new(Some(ns)).unwrap(),
    );
    let mut s = c
        .pull(gpb::PullRequest {
            reference: reference.into(),
            mode: if lazy { 1 } else { 0 },
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = s.message().await? {
        out.push(e);
    }
    Ok(out)
}

async fn walk(ch: &Channel, ns: &str, root: &str) -> gpb::WalkResponse {
    gpb::graph_client::GraphClient::with_interceptor(ch.clone(), Namespace::new(Some(ns)).unwrap())
        .walk(gpb::DigestRequest {
            digest: root.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The walk once `done` holds of it, or the last one after 30 s. A reader of a fetch ends as
/// soon as the bytes verify, which can be just before the store's commit lands, so a test
/// that reads and then looks at the graph waits for that commit.
async fn walk_when(
    ch: &Channel,
    ns: &str,
    root: &str,
    done: impl Fn(&gpb::WalkResponse) -> bool,
) -> gpb::WalkResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let w = walk(ch, ns, root).await;
        if done(&w) || Instant::now() >= deadline {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ingest_offset(c: &mut Client, r: &str) -> Option<i64> {
    let st = c
        .list_statuses(cpb::ListStatusesRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner()
        .statuses;
    st.into_iter().find(|s| s.r#ref == r).map(|s| s.offset)
}

/// The error of a call expected to fail (without printing what a success returned).
fn failed<T>(r: Result<T, tonic::Status>) -> tonic::Status {
    match r {
        Ok(_) => panic!("expected an error, the call succeeded"),
        Err(e) => e,
    }
}

fn summary(dir: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap()
}

fn reference(reg: &Registry, fx: &Value) -> String {
    format!(
        "{}/{}:{}",
        reg.addr,
        fx["registry"]["repository"].as_str().unwrap(),
        fx["registry"]["tag"].as_str().unwrap()
    )
}

fn fixture<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap()
}

/// The largest present layer of a fixture: (digest, size).
fn big_layer(fx: &Value) -> (String, i64) {
    let (d, size) = stored_blobs(fx, is_layer).swap_remove(0);
    (d, size as i64)
}

/// The fixture's blobs the registry holds whose media type `keep` accepts, as (digest,
/// size), largest first.
pub(crate) fn stored_blobs(fx: &Value, keep: impl Fn(&str) -> bool) -> Vec<(String, u64)> {
    let mut blobs: Vec<(String, u64)> = fx["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["present"].as_bool().unwrap() && keep(n["mediaType"].as_str().unwrap()))
        .map(|n| {
            (
                n["digest"].as_str().unwrap().to_string(),
                n["size"].as_u64().unwrap(),
            )
        })
        .collect();
    blobs.sort_by_key(|b| std::cmp::Reverse(b.1));
    blobs
}

/// The fixtures, a registry holding them, and summary.json; None when tools are missing.
pub(crate) fn registry_with_fixtures() -> Option<(
    std::path::PathBuf,
    Option<tempfile::TempDir>,
    Registry,
    Value,
)> {
    let (dir, keep) = fixtures()?;
    let reg = Registry::start(&dir)?;
    let s = summary(&dir);
    Some((dir, keep, reg, s))
}

/// Every fixture the registry holds, pulled eagerly into one namespace and lazily into
/// another: both give the graph summary.json (and so the registry) holds; the lazy one
/// stores no layer until it is read, and reading each gives its verified bytes.
#[tokio::test(flavor = "multi_thread")]
async fn eager_and_lazy_pulls_give_the_registry_graph() {
    let Some((dir, _keep)) = fixtures() else {
        return;
    };
    let Some(reg) = Registry::start(&dir) else {
        return;
    };
    let s = summary(&dir);
    // A mirror that is down comes first: pulls fall through to the endpoint.
    let (_cfg, path) = config_with(
        &reg.addr,
        "",
        &format!("mirrors = [\"http://127.0.0.1:{}\"]", free_port()),
    );
    let d = Daemon::start_with(&["--config", path.to_str().unwrap()]);
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let mut lazy_c = d.client(Some("lazy")).await;
    let files = blob_files(&dir);

    for fx in s["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| !f["registry"].is_null())
    {
        let name = fx["name"].as_str().unwrap();
        let root = fx["root"]["digest"].as_str().unwrap();
        let r = reference(&reg, fx);
        for (ns, lazy) in [("eager", false), ("lazy", true)] {
            let events = pull(&ch, ns, &r, lazy)
                .await
                .unwrap_or_else(|e| panic!("{name} {ns}: {e}"));
            let last = events.last().unwrap();
            assert_eq!(last.state, gpb::pull_event::State::Done as i32, "{name}");
            assert_eq!(last.digest, root, "{name}");
            assert_eq!(last.detail, r, "{name}");
            let w = walk(&ch, ns, root).await;
            assert_eq!(walk_edges(&w), want_edges(fx), "{name} {ns}: edges");
            let nodes = walk_nodes(&w);
            let want = want_nodes(fx);
            let strip =
                |s: &BTreeSet<(String, String, i64, bool)>| -> BTreeSet<(String, String, i64)> {
                    s.iter().map(|n| (n.0.clone(), n.1.clone(), n.2)).collect()
                };
            assert_eq!(strip(&nodes), strip(&want), "{name} {ns}: nodes");
            // A lazy pull leaves exactly the layers upstream.
            let layers: BTreeSet<&str> = fx["edges"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["role"] == "layer")
                .map(|e| e["to"].as_str().unwrap())
                .collect();
            for n in &want {
                let got = nodes.iter().find(|g| g.0 == n.0).unwrap().3;
                if !lazy {
                    assert_eq!(got, n.3, "{name} eager: presence of {}", n.0);
                } else if !layers.contains(n.0.as_str()) {
                    assert_eq!(got, n.3, "{name} lazy: presence of {}", n.0);
                }
            }
            let mut images = ipb::images_client::ImagesClient::with_interceptor(
                ch.clone(),
                Namespace::new(Some(ns)).unwrap(),
            );
            let img = images
                .get(ipb::GetImageRequest { name: r.clone() })
                .await
                .unwrap()
                .into_inner()
                .image
                .unwrap();
            assert_eq!(
                img.target.unwrap().digest,
                root,
                "{name} {ns}: image target"
            );
        }
    }

    // Every present layer, read through the lazy namespace: fetched, verified, now stored.
    let mut layers = BTreeSet::new();
    for fx in s["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| !f["registry"].is_null())
    {
        let present: BTreeSet<&str> = fx["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["present"].as_bool().unwrap())
            .map(|n| n["digest"].as_str().unwrap())
            .collect();
        for e in fx["edges"].as_array().unwrap() {
            let to = e["to"].as_str().unwrap();
            if e["role"] == "layer" && present.contains(to) {
                layers.insert(to.to_string());
            }
        }
    }
    assert!(layers.len() >= 4);
    for l in &layers {
        let info = lazy_c
            .info(cpb::InfoRequest { digest: l.clone() })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        let (data, _) = read(&mut lazy_c, l, 0, 0).await.unwrap();
        assert_eq!(sha(&data).to_string(), *l);
        assert_eq!(data, std::fs::read(&files[l]).unwrap());
        assert_eq!(info.size, data.len() as i64);
    }
    for fx in s["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| !f["registry"].is_null())
    {
        let w = walk_when(&ch, "lazy", fx["root"]["digest"].as_str().unwrap(), |w| {
            walk_nodes(w) == want_nodes(fx)
        })
        .await;
        assert_eq!(
            walk_nodes(&w),
            want_nodes(fx),
            "{}: lazy after reads",
            fx["name"]
        );
    }

    // Unknown tags and repositories are NotFound, named.
    let e = pull(
        &ch,
        "eager",
        &format!("{}/fixtures/single:nope", reg.addr),
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert!(e.message().contains("nope"), "{e}");
    let e = pull(&ch, "eager", "not a reference", false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
}

/// A lazy layer read by eight readers at once: one upstream GET, the first bytes reach a
/// reader while most of the layer is still to come, and a read far into the layer is served
/// at once by an upstream Range request.
#[tokio::test(flavor = "multi_thread")]
async fn lazy_layer_single_flight_and_first_bytes_early() {
    let Some((dir, _keep, reg, s)) = registry_with_fixtures() else {
        return;
    };
    let fx = fixture(&s, "oci-single");
    let (layer, size) = big_layer(fx);
    assert!(size > 40 << 20, "the 50 MiB fixture layer");
    let bytes = std::fs::read(&blob_files(&dir)[&layer]).unwrap();
    // 16 MiB/s: the layer takes about three seconds to arrive.
    let proxy = Proxy::start(&reg.addr, 16 << 20).await;
    let (_cfg, path) = config_with(
        &reg.addr,
        "",
        &format!("endpoint = \"http://{}\"", proxy.addr),
    );
    let d = Daemon::start_with(&["--config", path.to_str().unwrap()]);
    let ch = connect_unix(&d.client_sock).await.unwrap();
    pull(&ch, "lz", &reference(&reg, fx), true).await.unwrap();
    let mut c = d.client(Some("lz")).await;
    let info = c
        .info(cpb::InfoRequest {
            digest: layer.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.size, size);
    assert!(info.labels["contentd.io/lazy"].ends_with("fixtures/single"));

    // Far ahead of anything fetched: an upstream Range request answers it.
    let at = 40i64 << 20;
    let t = Instant::now();
    let (part, _) = read(&mut c, &layer, at, 1 << 20).await.unwrap();
    let ranged_in = t.elapsed();
    assert_eq!(part, bytes[at as usize..(at as usize + (1 << 20))]);
    let landed = ingest_offset(&mut c, &format!("fetch-{layer}"))
        .await
        .unwrap_or(0);
    assert!(
        landed < at,
        "the ranged read did not wait for the fetch ({landed} landed)"
    );

    // Eight readers of the whole layer.
    let first_byte = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for _ in 0..8 {
        let sock = d.client_sock.clone();
        let (layer, first_byte) = (layer.clone(), first_byte.clone());
        readers.push(tokio::spawn(async move {
            let mut c = connect(&sock, Some("lz")).await;
            let mut s = c
                .read(cpb::ReadContentRequest {
                    digest: layer.clone(),
                    offset: 0,
                    size: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let mut data = Vec::new();
            while let Some(m) = s.message().await.unwrap() {
                if data.is_empty() {
                    let mut probe = connect(&sock, Some("lz")).await;
                    let landed = ingest_offset(&mut probe, &format!("fetch-{layer}")).await;
                    first_byte.lock().push(landed);
                }
                data.extend_from_slice(&m.data);
            }
            data
        }));
    }
    for r in readers {
        assert!(r.await.unwrap() == bytes, "a reader got the wrong bytes");
    }
    // When each reader had its first bytes, the fetch was still under way.
    let seen = first_byte.lock().clone();
    assert_eq!(seen.len(), 8);
    assert!(
        seen.iter().any(|o| matches!(o, Some(n) if *n < size / 2)),
        "first bytes only after half the layer was fetched: {seen:?}"
    );
    // One fetch of the whole layer, plus the one ranged request.
    let reqs: Vec<String> = proxy
        .requests()
        .into_iter()
        .filter(|h| h.starts_with("get ") && h.contains(&format!("/blobs/{layer}")))
        .collect();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    // The whole fetch asks from the start: no Range at all, or `bytes=0-`.
    assert_eq!(
        reqs.iter()
            .filter(|h| !h.contains("range: ") || h.contains("range: bytes=0-"))
            .count(),
        1,
        "{reqs:#?}"
    );
    assert_eq!(reg.requests("GET", &format!("/blobs/{layer}")), 2);
    // The layer is now stored.
    let stored = |w: &gpb::WalkResponse| w.nodes.iter().any(|n| n.digest == layer && n.present);
    let w = walk_when(&ch, "lz", fx["root"]["digest"].as_str().unwrap(), stored).await;
    assert!(stored(&w), "the fetched layer was never committed");
    eprintln!("ranged read of 1 MiB at 40 MiB: {ranged_in:?}");
    // Another namespace's lazy read of the stored layer is linked to it: no upstream request.
    pull(&ch, "lz2", &reference(&reg, fx), true).await.unwrap();
    let mut c2 = d.client(Some("lz2")).await;
    let (data, _) = read(&mut c2, &layer, 0, 0).await.unwrap();
    assert!(data == bytes, "the second namespace read the wrong bytes");
    assert_eq!(reg.requests("GET", &format!("/blobs/{layer}")), 2);
}

/// The registry is killed in the middle of a layer and restarted: the pull resumes with a
/// Range request and finishes with verified content.
#[tokio::test(flavor = "multi_thread")]
async fn registry_killed_mid_layer_pull_resumes() {
    let Some((_dir, _keep, reg, s)) = registry_with_fixtures() else {
        return;
    };
    let fx = fixture(&s, "oci-single");
    let (layer, size) = big_layer(fx);
    let proxy = Proxy::start(&reg.addr, 16 << 20).await;
    let (_cfg, path) = config_with(
        &reg.addr,
        "fetch_attempts = 8",
        &format!("endpoint = \"http://{}\"", proxy.addr),
    );
    let d = Daemon::start_with(&["--config", path.to_str().unwrap()]);
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let r = reference(&reg, fx);
    let ch2 = ch.clone();
    let pulling = tokio::spawn(async move { pull(&ch2, "k", &r, false).await });
    let mut c = d.client(Some("k")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(o) = ingest_offset(&mut c, &format!("fetch-{layer}")).await
            && o > 8 << 20
        {
            break;
        }
        assert!(Instant::now() < deadline, "the layer fetch never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reg.kill9();
    let stopped_at = ingest_offset(&mut c, &format!("fetch-{layer}"))
        .await
        .unwrap();
    assert!(stopped_at < size);
    tokio::time::sleep(Duration::from_millis(300)).await;
    reg.start_again();
    let events = pulling
        .await
        .unwrap()
        .expect("the pull finishes after the restart");
    assert_eq!(
        events.last().unwrap().state,
        gpb::pull_event::State::Done as i32
    );
    let (data, _) = read(&mut c, &layer, 0, 0).await.unwrap();
    assert_eq!(sha(&data).to_string(), layer);
    let resumed: Vec<String> = proxy
        .requests()
        .into_iter()
        .filter(|h| h.contains(&format!("/blobs/{layer}")) && h.contains("range: bytes="))
        .filter(|h| !h.contains("range: bytes=0-"))
        .collect();
    assert!(!resumed.is_empty(), "no Range request resumed the layer");
}

/// Wrong bytes, a missing blob and a stalled upstream each give a clear error, nothing
/// unverified is stored, and a retry succeeds once the upstream is right again.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_faults_are_clear_errors() {
    let Some((_dir, _keep, reg, s)) = registry_with_fixtures() else {
        return;
    };
    let fx = fixture(&s, "oci-single");
    let root = fx["root"]["digest"].as_str().unwrap();
    let proxy = Proxy::start(&reg.addr, 0).await;
    let (_cfg, path) = config_with(
        &reg.addr,
        "read_timeout_secs = 1\nfetch_attempts = 2",
        &format!("endpoint = \"http://{}\"", proxy.addr),
    );
    let d = Daemon::start_with(&["--config", path.to_str().unwrap()]);
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let r = reference(&reg, fx);

    // Wrong bytes for a layer: DataLoss, the layer is not stored, no ingest is left to resume.
    let small = fx["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| is_layer(n["mediaType"].as_str().unwrap()))
        .map(|n| {
            (
                n["digest"].as_str().unwrap().to_string(),
                n["size"].as_i64().unwrap(),
            )
        })
        .find(|n| n.1 > 100_000 && n.1 < 10 << 20)
        .unwrap()
        .0;
    let file = reg.blob_data(&small);
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    bad[1000] ^= 0xff;
    std::fs::write(&file, &bad).unwrap();
    let e = pull(&ch, "f", &r, false).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DataLoss, "{e}");
    assert!(e.message().contains(&small), "{e}");
    let w = walk(&ch, "f", root).await;
    assert!(!w.nodes.iter().find(|n| n.digest == small).unwrap().present);
    let mut c = d.client(Some("f")).await;
    assert_eq!(ingest_offset(&mut c, &format!("fetch-{small}")).await, None);
    // A lazy read of it fails the same way.
    pull(&ch, "f2", &r, true).await.unwrap();
    let mut c2 = d.client(Some("f2")).await;
    let e = failed(read(&mut c2, &small, 0, 0).await);
    assert_eq!(e.code(), tonic::Code::DataLoss, "{e}");
    // Fixed upstream: the retry succeeds.
    std::fs::write(&file, &good).unwrap();
    pull(&ch, "f", &r, false).await.unwrap();
    let (data, _) = read(&mut c, &small, 0, 0).await.unwrap();
    assert_eq!(data, good);

    // A stalled upstream: Unavailable after the read timeout. (A fresh daemon: a blob that
    // another namespace already has is linked without any upstream traffic.)
    drop(c2);
    let d = Daemon::start_with(&["--config", path.to_str().unwrap()]);
    let ch = connect_unix(&d.client_sock).await.unwrap();
    pull(&ch, "f2", &r, true).await.unwrap();
    let mut c2 = d.client(Some("f2")).await;
    let (big, _) = big_layer(fx);
    proxy.stall(true);
    let t = Instant::now();
    let e = failed(read(&mut c2, &big, 0, 0).await);
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(t.elapsed() < Duration::from_secs(30));
    proxy.stall(false);

    // Gone upstream (404): NotFound.
    let file = reg.blob_data(&big);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    let e = failed(read(&mut c2, &big, 0, 0).await);
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");

    // Back: the retry succeeds.
    std::fs::write(&file, &bytes).unwrap();
    let (data, _) = read(&mut c2, &big, 0, 0).await.unwrap();
    assert!(data == bytes, "wrong bytes after the upstream came back");
}

/// A registry that speaks only TLS (a private CA) and wants basic credentials: pulls work
/// with the configured CA file and credentials, and fail clearly without the credentials.
#[tokio::test(flavor = "multi_thread")]
async fn tls_registry_with_basic_auth() {
    let Some((dir, _keep)) = fixtures() else {
        return;
    };
    let required = std::env::var_os("CONTENTD_REQUIRE_TOOLS").is_some();
    let have = |c: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    for tool in ["docker-registry", "openssl", "htpasswd", "skopeo"] {
        if !have(tool) {
            assert!(!required, "{tool} is not installed");
            eprintln!("skipping: {tool} not installed");
            return;
        }
    }
    let w = tempfile::tempdir().unwrap();
    let p = |f: &str| w.path().join(f).to_str().unwrap().to_string();
    let sh = |cmd: &str| {
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let Some(certs) = crate::certs::make(w.path()) else {
        return;
    };
    sh(&format!("htpasswd -cbB {} puller s3cret", p("htpasswd")));
    let addr = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        p("config.yml"),
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: contentd-test\n    path: {}\n",
            p("data"),
            certs.server_cert,
            certs.server_key,
            p("htpasswd")
        ),
    )
    .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _reg = Kill(
        std::process::Command::new("docker-registry")
            .args(["serve", &p("config.yml")])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(p("registry.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the TLS registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::create_dir_all(p("certs")).unwrap();
    std::fs::copy(&certs.ca, w.path().join("certs/ca.crt")).unwrap();
    std::fs::write(
        p("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    sh(&format!(
        "skopeo --policy {} copy -q --preserve-digests --dest-cert-dir {} --dest-creds puller:s3cret oci:{}/oci:single docker://{addr}/private/single:v1",
        p("policy.json"),
        p("certs"),
        dir.display()
    ));

    let s = summary(&dir);
    let fx = fixture(&s, "oci-single");
    let root = fx["root"]["digest"].as_str().unwrap();
    let r = format!("{addr}/private/single:v1");
    let (_cfg, path) = config_with(
        &addr,
        "",
        &format!(
            "endpoint = \"https://{addr}\"\nca_file = \"{}\"\nusername = \"puller\"\npassword = \"s3cret\"",
            certs.ca
        ),
    );
    let d = Daemon::start_with(&["--config", path.to_str().unwrap()]);
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let events = pull(&ch, "tls", &r, false).await.unwrap();
    assert_eq!(events.last().unwrap().digest, root);
    let w2 = walk(&ch, "tls", root).await;
    assert_eq!(walk_nodes(&w2), want_nodes(fx));

    // Without credentials: the registry's 401 is PermissionDenied, named.
    let (_cfg2, path2) = config_with(
        &addr,
        "",
        &format!("endpoint = \"https://{addr}\"\nca_file = \"{}\"", certs.ca),
    );
    let d2 = Daemon::start_with(&["--config", path2.to_str().unwrap()]);
    let ch2 = connect_unix(&d2.client_sock).await.unwrap();
    let e = pull(&ch2, "tls", &r, false).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains(&addr), "{e}");
}

/// A pulled layer corrupted behind the daemon's back is quarantined by `contentd verify` and
/// fetched again from the registry it came from.
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_pulled_blob_is_fetched_again() {
    let Some((dir, _keep, reg, s)) = registry_with_fixtures() else {
        return;
    };
    let fx = fixture(&s, "oci-single");
    let (layer, _) = big_layer(fx);
    let files = blob_files(&dir);
    let want = std::fs::read(&files[&layer]).unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_in(work.path());
    let ch = connect_unix(&d.client_sock).await.unwrap();
    pull(&ch, "rf", &reference(&reg, fx), false).await.unwrap();
    drop(ch);
    d.stop();
    corrupt_first_chunk(
        work.path(),
        "rf",
        &contentd::digest::Digest::parse(&layer).unwrap(),
        7,
    );
    let d = Daemon::start_in(work.path());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args(["verify", &layer, "--json"])
        .env("CONTENTD_SOCKET", &d.client_sock)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["corrupt"][0]["digest"], layer.as_str());
    assert_eq!(v["corrupt"][0]["refetching"], serde_json::json!(["n:rf"]));
    let mut c = d.client(Some("rf")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((data, _)) = read(&mut c, &layer, 0, 0).await
            && data == want
        {
            break;
        }
        assert!(Instant::now() < deadline, "the layer was not fetched again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let w = walk_when(&ch, "rf", fx["root"]["digest"].as_str().unwrap(), |w| {
        walk_nodes(w) == want_nodes(fx)
    })
    .await;
    assert_eq!(walk_nodes(&w), want_nodes(fx));
}

/// Edges are a function of the bytes, end to end: one namespace Puts an image's manifest
/// declared as `application/octet-stream`; another namespace pulls that image from the
/// registry; the first lets go, and a collection past the grace period (zero here) runs.
/// Every blob of the pulled image is still there and reads back whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_mislabelled_manifest_never_costs_another_namespace_its_layers() {
    let Some((dir, _keep, reg, s)) = registry_with_fixtures() else {
        return;
    };
    let fx = fixture(&s, "oci-single");
    let root = fx["root"]["digest"].as_str().unwrap();
    let files = blob_files(&dir);
    let manifest = std::fs::read(&files[root]).unwrap();
    let d = Daemon::start_with(&["--gc-grace-secs", "0"]);
    let ch = connect_unix(&d.client_sock).await.unwrap();
    crate::graph::put_declared(
        &ch,
        "mislabel",
        &manifest,
        "application/octet-stream",
        root,
        1,
    )
    .await
    .unwrap();
    pull(&ch, "puller", &reference(&reg, fx), false)
        .await
        .unwrap();
    let mut m = d.client(Some("mislabel")).await;
    m.delete(cpb::DeleteContentRequest {
        digest: root.to_string(),
    })
    .await
    .unwrap();
    gc(&d.client_sock, false).await;
    let w = walk(&ch, "puller", root).await;
    assert_eq!(walk_nodes(&w), want_nodes(fx));
    let mut c = d.client(Some("puller")).await;
    for n in fx["nodes"].as_array().unwrap() {
        if !n["present"].as_bool().unwrap() {
            continue;
        }
        let dg = n["digest"].as_str().unwrap();
        let (got, _) = read(&mut c, dg, 0, 0)
            .await
            .unwrap_or_else(|e| panic!("{dg} was collected: {e}"));
        assert!(got == std::fs::read(&files[dg]).unwrap(), "{dg}");
    }
}
