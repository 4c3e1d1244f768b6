//! Operating contentd: the metrics endpoint, socket permissions, the health-only TCP
//! listener, scrubbing a blob corrupted behind the daemon's back, and the deploy/ files.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::process::Command;

use contentd::api::pb::containerd::services::content::v1 as cpb;
use contentd::api::pb::contentd::v1 as gpb;

use crate::harness::*;
use crate::registry::free_port;

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the sample `name{labels}` (labels as written, in order), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_shows_the_workload() {
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(&["--metrics-addr", &addr, "--gc-grace-secs", "0"]);
    let before = scrape(&addr);
    assert_eq!(sample(&before, "contentd_store_blobs"), 0.0);

    let mut c = d.client(Some("m")).await;
    let data = pattern(700_000, 4);
    put(&mut c, "m1", &data).await.unwrap();
    let (back, _) = read(&mut c, &sha(&data).to_string(), 0, 0).await.unwrap();
    assert_eq!(back.len(), data.len());
    let missing = c
        .info(cpb::InfoRequest {
            digest: sha(b"nope").to_string(),
        })
        .await;
    assert_eq!(code(missing), tonic::Code::NotFound);
    gc(&d.client_sock, false).await;

    let m = scrape(&addr);
    let info_nf = r#"contentd_grpc_requests_total{method="containerd.services.content.v1.Content/Info",code="NOT_FOUND"}"#;
    assert_eq!(sample(&m, info_nf), 1.0, "{m}");
    let write_ok = r#"contentd_grpc_requests_total{method="containerd.services.content.v1.Content/Write",code="OK"}"#;
    assert!(sample(&m, write_ok) >= 1.0, "{m}");
    let read_ok = r#"contentd_grpc_requests_total{method="containerd.services.content.v1.Content/Read",code="OK"}"#;
    assert!(sample(&m, read_ok) >= 1.0, "{m}");
    assert!(m.contains(r#"contentd_grpc_request_duration_seconds_count{method="containerd.services.content.v1.Content/Write"}"#));
    assert!(sample(&m, r#"contentd_content_bytes_total{direction="in"}"#) >= data.len() as f64);
    assert!(sample(&m, r#"contentd_content_bytes_total{direction="out"}"#) >= data.len() as f64);
    assert!(sample(&m, r#"contentd_gc_runs_total{result="ok"}"#) >= 1.0);
    // Nothing roots the blob (grace 0): the collection took it, and the gauges say so.
    assert_eq!(
        sample(&m, r#"contentd_gc_swept_total{what="blobs"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(sample(&m, "contentd_store_blobs"), 0.0, "{m}");
    assert!(m.contains("# TYPE contentd_grpc_request_duration_seconds histogram"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sockets_get_the_configured_mode_and_group() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "socket_mode = \"0600\"\nsocket_group = \"1\"\n").unwrap();
    let d = Daemon::start_with(&["--config", cfg.to_str().unwrap()]);
    for s in [&d.client_sock, &d.backend_sock, &d.other_sock] {
        let meta = std::fs::metadata(s).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", s.display());
        assert_eq!(meta.gid(), 1, "{}", s.display());
    }
    // A bad value is refused at start, naming the option.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "socket_mode = \"rw-rw----\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args([
            "serve",
            "--root",
            dir.path().join("r").to_str().unwrap(),
            "--config",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("socket_mode"));
}

#[tokio::test(flavor = "multi_thread")]
async fn health_listener_serves_health_and_nothing_else() {
    let addr = format!("127.0.0.1:{}", free_port());
    let _d = Daemon::start_with(&["--health-tcp", &addr]);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut c = cpb::content_client::ContentClient::new(ch);
    let e = c
        .info(cpb::InfoRequest {
            digest: sha(b"x").to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
}

/// A byte of a stored chunk is changed in RocksDB while the daemon is down; verification
/// finds it, quarantines the blob (reads stop serving it) and reports it.
#[tokio::test(flavor = "multi_thread")]
async fn scrub_finds_a_chunk_corrupted_behind_the_daemons_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_in(dir.path());
    let mut c = d.client(Some("s")).await;
    let good = pattern(300_000, 1);
    let bad = pattern(600_000, 2);
    put(&mut c, "good", &good).await.unwrap();
    put(&mut c, "bad", &bad).await.unwrap();
    let bad_dg = sha(&bad);
    drop(c);
    d.stop();
    corrupt_first_chunk(dir.path(), "s", &bad_dg, 100);
    let d = Daemon::start_in(dir.path());
    let o = Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args(["verify", "--json"])
        .env("CONTENTD_SOCKET", &d.client_sock)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["checked"], 2);
    assert_eq!(v["corrupt"].as_array().unwrap().len(), 1);
    assert_eq!(v["corrupt"][0]["digest"], bad_dg.to_string());
    let mut c = d.client(Some("s")).await;
    assert_eq!(
        code(read(&mut c, &bad_dg.to_string(), 0, 0).await),
        tonic::Code::NotFound
    );
    let (g, _) = read(&mut c, &sha(&good).to_string(), 0, 0).await.unwrap();
    assert!(g == good);
    let ch = contentd::client::connect_unix(&d.client_sock)
        .await
        .unwrap();
    let mut s = gpb::scrub_client::ScrubClient::with_interceptor(
        ch,
        contentd::client::Namespace::new(Some("s")).unwrap(),
    );
    let q = s
        .quarantined(gpb::QuarantinedRequest {})
        .await
        .unwrap()
        .into_inner()
        .blobs;
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].digest, bad_dg.to_string());
    assert_eq!(q[0].scopes, vec!["n:s".to_string()]);
    // Stored again by a client, it is served again.
    put(&mut c, "bad-again", &bad).await.unwrap();
    let (b2, _) = read(&mut c, &bad_dg.to_string(), 0, 0).await.unwrap();
    assert!(b2 == bad);
}

/// deploy/: the systemd unit passes `systemd-analyze verify`, the Kubernetes manifests parse
/// and their probes, ports and volumes agree, and the container recipe builds what the
/// README builds.
#[test]
fn deploy_files_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let required = std::env::var_os("CONTENTD_REQUIRE_TOOLS").is_some();
    let unit = std::fs::read_to_string(root.join("deploy/systemd/contentd.service")).unwrap();
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        // The unit names /usr/local/bin/contentd; verify it against the binary built here.
        let dir = tempfile::tempdir().unwrap();
        let u = dir.path().join("contentd.service");
        std::fs::write(
            &u,
            unit.replace("/usr/local/bin/contentd", env!("CARGO_BIN_EXE_contentd")),
        )
        .unwrap();
        let o = Command::new("systemd-analyze")
            .args(["verify", u.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let relevant: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("contentd.service"))
            .collect();
        assert!(o.status.success() && relevant.is_empty(), "{err}");
    } else {
        assert!(!required, "systemd-analyze is not installed");
    }
    let check = r#"
import sys, yaml
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        kind = doc["kind"]
        spec = doc["spec"]["template"]["spec"] if kind == "DaemonSet" else doc["spec"]
        assert doc["apiVersion"] == {"DaemonSet": "apps/v1", "Pod": "v1"}[kind], path
        vols = {v["name"] for v in spec["volumes"]}
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, (path, m)
            ports = {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in c:
                    assert c[probe]["grpc"]["port"] in ports, (path, probe)
                    assert any(a == "--health-tcp=0.0.0.0:%d" % c[probe]["grpc"]["port"] for a in c["args"]), (path, c["args"])
        if kind == "DaemonSet":
            assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
            assert {v["hostPath"]["path"] for v in spec["volumes"]} == {"/var/lib/contentd", "/run/contentd"}
print("ok")
"#;
    let o = Command::new("python3")
        .arg("-c")
        .arg(check)
        .arg(root.join("deploy/kubernetes/daemonset.yaml"))
        .arg(root.join("deploy/kubernetes/sidecar.yaml"))
        .output();
    match o {
        Ok(o) if o.status.success() => {}
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named 'yaml'") => {
            assert!(!required, "python3-yaml is not installed")
        }
        Ok(o) => panic!("{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => assert!(!required, "python3: {e}"),
    }
    // The recipe runs the README's build and takes the binary from the configured target dir.
    let recipe = std::fs::read_to_string(root.join("deploy/Containerfile")).unwrap();
    let cargo_cfg = std::fs::read_to_string(root.join(".cargo/config.toml")).unwrap();
    let target = cargo_cfg
        .lines()
        .find_map(|l| {
            l.trim().strip_prefix("target-dir").map(|r| {
                r.trim_start_matches([' ', '='])
                    .trim()
                    .trim_matches('"')
                    .to_string()
            })
        })
        .unwrap();
    assert!(recipe.contains("cargo build --release --locked --bin contentd"));
    assert!(
        recipe.contains(&format!("{target}/release/contentd")),
        "{target}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quota_breach_is_resource_exhausted_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[quotas.namespaces]\nq = 1000000\n").unwrap();
    let d = Daemon::start_with(&["--config", cfg.to_str().unwrap()]);
    let mut q = d.client(Some("q")).await;
    let first = pattern(600_000, 1);
    let second = pattern(600_000, 2);
    put(&mut q, "first", &first).await.unwrap();
    let e = put(&mut q, "second", &second).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(
        e.message().contains("\"q\"") && e.message().contains("quota"),
        "{e}"
    );
    let info = q
        .info(cpb::InfoRequest {
            digest: sha(&second).to_string(),
        })
        .await;
    assert_eq!(code(info), tonic::Code::NotFound);
    let st = q
        .status(cpb::StatusRequest {
            r#ref: "second".into(),
        })
        .await
        .map(|s| s.into_inner().status.unwrap().offset);
    assert!(matches!(st, Err(_) | Ok(0)), "bytes were stored: {st:?}");
    // Across messages: refused at the message that crosses the line.
    let msgs: Vec<cpb::WriteContentRequest> = (0..3)
        .map(|i| cpb::WriteContentRequest {
            action: 1,
            r#ref: if i == 0 {
                "multi".into()
            } else {
                String::new()
            },
            offset: i * 200_000,
            data: second[(i as usize) * 200_000..(i as usize + 1) * 200_000]
                .to_vec()
                .into(),
            ..Default::default()
        })
        .collect();
    let rs = write_msgs(&mut q, msgs).await;
    assert!(rs[0].is_ok() && rs[1].is_ok(), "{rs:?}");
    assert_eq!(
        rs.last().unwrap().as_ref().unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
    // Other namespaces are not affected; freeing space lets the write through.
    let mut free = d.client(Some("free")).await;
    put(&mut free, "second", &second).await.unwrap();
    q.abort(cpb::AbortRequest {
        r#ref: "multi".into(),
    })
    .await
    .unwrap();
    q.delete(cpb::DeleteContentRequest {
        digest: sha(&first).to_string(),
    })
    .await
    .unwrap();
    put(&mut q, "second-again", &second).await.unwrap();
}

/// Past the high watermark (1% here, so always), unreachable content goes at once despite
/// the grace period; rooted content stays.
#[tokio::test(flavor = "multi_thread")]
async fn watermark_eviction_takes_only_unreachable_content() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "eviction_high_watermark_percent = 1\neviction_check_secs = 1\ngc_grace_secs = 3600\n",
    )
    .unwrap();
    let d = Daemon::start_with(&["--config", cfg.to_str().unwrap()]);
    let mut c = d.client(Some("e")).await;
    let loose = pattern(50_000, 1);
    let kept = pattern(50_000, 2);
    put(&mut c, "loose", &loose).await.unwrap();
    write_msgs(
        &mut c,
        vec![commit_msg("kept", &kept, &[("containerd.io/gc.root", "x")])],
    )
    .await
    .pop()
    .unwrap()
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = c
            .info(cpb::InfoRequest {
                digest: sha(&loose).to_string(),
            })
            .await;
        if code(r) == tonic::Code::NotFound {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "nothing was evicted");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (k, _) = read(&mut c, &sha(&kept).to_string(), 0, 0).await.unwrap();
    assert!(k == kept);
}

/// TCP is served only over TLS; with a client CA, a client without a certificate is refused
/// in the handshake and one with a certificate that CA signed is served.
#[tokio::test(flavor = "multi_thread")]
async fn mtls_refuses_clients_without_a_certificate() {
    let w = tempfile::tempdir().unwrap();
    let p = |f: &str| w.path().join(f).to_str().unwrap().to_string();
    let Some(certs) = crate::certs::make(w.path()) else {
        return;
    };
    let port = free_port();
    let cfg = p("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "tcp = \"127.0.0.1:{port}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            certs.server_cert, certs.server_key, certs.ca
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&["--config", &cfg]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no TCP listener: {}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let ca = Certificate::from_pem(std::fs::read(&certs.ca).unwrap());
    let ep = || Endpoint::from_shared(format!("https://localhost:{port}")).unwrap();
    let ask = |ch: tonic::transport::Channel| async move {
        let mut c = cpb::content_client::ContentClient::with_interceptor(
            ch,
            contentd::client::Namespace::new(Some("tls")).unwrap(),
        );
        c.info(cpb::InfoRequest {
            digest: sha(b"x").to_string(),
        })
        .await
    };
    // No client certificate: refused.
    let bare = ep()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .domain_name("localhost"),
        )
        .unwrap();
    let refused = match bare.connect().await {
        Err(_) => true,
        Ok(ch) => ask(ch)
            .await
            .is_err_and(|e| e.code() != tonic::Code::NotFound),
    };
    assert!(refused, "a client without a certificate was served");
    // A certificate the CA signed: served (the blob is simply not there).
    let id = Identity::from_pem(
        std::fs::read(&certs.client_cert).unwrap(),
        std::fs::read(&certs.client_key).unwrap(),
    );
    let good = ep()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(ca)
                .domain_name("localhost")
                .identity(id),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(ask(good).await.unwrap_err().code(), tonic::Code::NotFound);
    // A connection that never starts its handshake is closed, not held for good.
    {
        use std::io::Read as _;
        let mut silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        silent
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut rest = Vec::new();
        if let Err(e) = silent.read_to_end(&mut rest) {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "a silent TLS connection stayed open: {e}"
            );
        }
    }
    // Nor is one that finishes its handshake and then sends nothing (hyper would wait for
    // its HTTP/2 preface for ever): closed within the handshake's bound (10 s).
    {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        use tokio::io::AsyncReadExt as _;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&certs.ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let chain = CertificateDer::pem_file_iter(&certs.client_cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&certs.client_key).unwrap();
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut quiet = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let t = std::time::Instant::now();
        let closed = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            let mut buf = [0u8; 1024];
            // The server's own SETTINGS may come first.
            while let Ok(n) = quiet.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a connection silent after its TLS handshake was held for {:?}",
            t.elapsed()
        );
    }
    // Plain TCP without [tls] is refused at start.
    let plain = p("plain.toml");
    std::fs::write(&plain, format!("tcp = \"127.0.0.1:{}\"\n", free_port())).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args([
            "serve",
            "--root",
            &p("r2"),
            "--socket",
            &p("s2.sock"),
            "--config",
            &plain,
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs [tls]"));
}

/// Configured limits: the largest message, and the largest manifest the parser reads.
#[tokio::test(flavor = "multi_thread")]
async fn message_and_manifest_limits_apply() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "max_message_bytes = 65536\nmax_manifest_bytes = 200\n",
    )
    .unwrap();
    let d = Daemon::start_with(&["--config", cfg.to_str().unwrap()]);
    let mut c = d.client(Some("l")).await;
    let e = put(&mut c, "big", &pattern(100_000, 1)).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e}"
    );
    put(&mut c, "small", &pattern(60_000, 1)).await.unwrap();
    // A manifest over the parser's limit is stored, without edges.
    let layer = sha(b"layer");
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{layer}","size":5}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":5}}]}}"#
    );
    assert!(m.len() > 200);
    put(&mut c, "m", m.as_bytes()).await.unwrap();
    let ch = contentd::client::connect_unix(&d.client_sock)
        .await
        .unwrap();
    let mut g = gpb::graph_client::GraphClient::with_interceptor(
        ch,
        contentd::client::Namespace::new(Some("l")).unwrap(),
    );
    let edges = g
        .children(gpb::DigestRequest {
            digest: sha(m.as_bytes()).to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .edges;
    assert!(edges.is_empty(), "{edges:?}");
}

/// With an OTLP endpoint configured, each RPC becomes an exported span carrying its method,
/// namespace and digest (received here by a collector's gRPC trace service).
#[tokio::test(flavor = "multi_thread")]
async fn rpc_spans_are_exported_over_otlp() {
    use opentelemetry_proto::tonic::collector::trace::v1 as otlp;
    /// (span name, attributes) as received.
    type Spans = Vec<(String, Vec<(String, String)>)>;
    #[derive(Clone, Default)]
    struct Collector(std::sync::Arc<parking_lot::Mutex<Spans>>);
    #[tonic::async_trait]
    impl otlp::trace_service_server::TraceService for Collector {
        async fn export(
            &self,
            req: tonic::Request<otlp::ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<otlp::ExportTraceServiceResponse>, tonic::Status> {
            for rs in req.into_inner().resource_spans {
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        let attrs = s
                            .attributes
                            .iter()
                            .map(|a| {
                                let v = match a.value.as_ref().and_then(|v| v.value.clone()) {
                                    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => s,
                                    other => format!("{other:?}"),
                                };
                                (a.key.clone(), v)
                            })
                            .collect();
                        self.0.lock().push((s.name, attrs));
                    }
                }
            }
            Ok(tonic::Response::new(otlp::ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }
    let collector = Collector::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let svc = otlp::trace_service_server::TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("otlp_endpoint = \"http://127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let mut d = Daemon::start_with(&["--config", cfg.to_str().unwrap()]);
    let mut c = d.client(Some("otel")).await;
    let dg = sha(b"traced").to_string();
    let _ = c.info(cpb::InfoRequest { digest: dg.clone() }).await;
    drop(c);
    d.stop(); // a clean stop flushes the exporter
    let spans = collector.0.lock().clone();
    let found = spans.iter().any(|(_, attrs)| {
        attrs.contains(&("namespace".into(), "otel".into()))
            && attrs.contains(&("digest".into(), dg.clone()))
            && attrs
                .iter()
                .any(|(k, v)| k == "path" && v.ends_with("Content/Info"))
    });
    assert!(found, "{spans:#?}");
}
