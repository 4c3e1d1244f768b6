//! The OCI distribution API (`registry_addr`): every route and status of the pull and push
//! API against the real daemon over HTTP, and the pull-through mirror in front of Debian's
//! docker-registry.

use std::collections::HashMap;
use std::path::PathBuf;

use contentd::api::pb::containerd::services::images::v1 as ipb;
use contentd::client::Namespace;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Daemon, pattern, sha};
use crate::registry::free_port;

/// What a client that takes any manifest type sends.
const ACCEPT_ANY: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A daemon serving the registry on a free loopback port, with `extra` TOML appended to
/// its configuration file.
pub fn start_registry(extra: &str) -> (Daemon, String, tempfile::TempDir) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("contentd.toml");
    std::fs::write(
        &p,
        format!("registry_addr = \"127.0.0.1:{port}\"\n{extra}\n"),
    )
    .unwrap();
    let d = Daemon::start_with(&["--config", p.to_str().unwrap()]);
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&base);
    (d, base, dir)
}

fn wait_http(base: &str) {
    let addr = base.trim_start_matches("http://").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "registry did not listen on {addr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn code_of(r: reqwest::Response) -> (StatusCode, String) {
    let st = r.status();
    let v: Value = r.json().await.unwrap_or_default();
    (
        st,
        v["errors"][0]["code"].as_str().unwrap_or("").to_string(),
    )
}

/// Starts an upload by POST (202) and gives its Location.
async fn start_upload(c: &reqwest::Client, base: &str, repo: &str) -> String {
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    r.headers()["Location"].to_str().unwrap().to_string()
}

/// Pushes a blob monolithically.
async fn push_blob(c: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    let d = sha(data).to_string();
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    d
}

fn manifest(
    config: &(String, usize),
    layers: &[(String, usize)],
    subject: Option<(&str, usize)>,
) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers.iter().map(|(d, s)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})).collect::<Vec<_>>(),
    });
    if let Some((d, s)) = subject {
        m["subject"] = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": s});
        m["artifactType"] = json!("application/vnd.example.sbom");
        m["annotations"] = json!({"org.example": "yes"});
    }
    serde_json::to_vec(&m).unwrap()
}

async fn put_manifest(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    body: &[u8],
) -> reqwest::Response {
    c.put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

/// The pull and push API of a local registry, route by route and status by status.
#[tokio::test(flavor = "multi_thread")]
async fn distribution_api_routes_and_statuses() {
    let (daemon, base, _cfg) = start_registry("[registry]\ndefault_upstream = \"\"\n");
    let c = http();

    // Base.
    let r = c.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["Docker-Distribution-API-Version"],
        "registry/2.0"
    );
    let r = c.delete(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(
        code_of(r).await,
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED".into())
    );

    // Grammar errors are the spec's codes in its JSON body.
    let r = c
        .get(format!("{base}/v2/Bad/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code_of(r).await,
        (StatusCode::BAD_REQUEST, "NAME_INVALID".into())
    );
    let r = c
        .get(format!("{base}/v2/a/blobs/sha256:00"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code_of(r).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    let unknown = sha(b"nothing").to_string();
    let r = c
        .get(format!("{base}/v2/a/blobs/{unknown}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code_of(r).await,
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN".into())
    );
    let r = c
        .get(format!("{base}/v2/a/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code_of(r).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
    // A host nobody configured is not fetched from (not even tried): the name is unknown.
    let r = c
        .get(format!("{base}/v2/a/manifests/latest?ns=registry.invalid"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["OCI-Namespace"], "registry.invalid");
    assert_eq!(
        code_of(r).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
    // An `ns` that is no host is ignored: not echoed, not part of the repository's name.
    let r = c
        .get(format!("{base}/v2/a/manifests/latest?ns=../../x"))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("OCI-Namespace").is_none());
    assert_eq!(
        code_of(r).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );

    // Monolithic upload, then HEAD, GET, and ranges.
    let layer = pattern(300_000, 1);
    let ld = push_blob(&c, &base, "team/app", &layer).await;
    let r = c
        .head(format!("{base}/v2/team/app/blobs/{ld}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["Content-Length"], layer.len().to_string());
    assert_eq!(r.headers()["Docker-Content-Digest"], ld.as_str());
    let got = c
        .get(format!("{base}/v2/team/app/blobs/{ld}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), &layer[..]);
    let r = c
        .get(format!("{base}/v2/team/app/blobs/{ld}"))
        .header("Range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["Content-Range"],
        format!("bytes 100-199/{}", layer.len())
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &layer[100..200]);
    let r = c
        .get(format!("{base}/v2/team/app/blobs/{ld}"))
        .header("Range", "bytes=0-9,-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let ct = r.headers()["Content-Type"].to_str().unwrap().to_string();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap()
        .to_string();
    let len: usize = r.headers()["Content-Length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), len, "Content-Length of the multipart body");
    let n = layer.len();
    let mut want = Vec::new();
    for (a, b) in [(0usize, 10usize), (n - 5, n)] {
        want.extend_from_slice(
            format!("\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{}/{n}\r\n\r\n", b - 1).as_bytes(),
        );
        want.extend_from_slice(&layer[a..b]);
    }
    want.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    assert_eq!(body.as_ref(), &want[..]);
    let r = c
        .get(format!("{base}/v2/team/app/blobs/{ld}"))
        .header("Range", format!("bytes={}-", n))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["Content-Range"], format!("bytes */{n}"));

    // sha512 digests work wherever sha256 ones do.
    let d512 = contentd::digest::Digest::of(contentd::digest::Algorithm::Sha512, &layer[..1000])
        .to_string();
    let r = c
        .post(format!("{base}/v2/team/app/blobs/uploads/?digest={d512}"))
        .body(layer[..1000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = c
        .get(format!("{base}/v2/team/app/blobs/{d512}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.headers()["Docker-Content-Digest"], d512.as_str());
    assert_eq!(got.bytes().await.unwrap().as_ref(), &layer[..1000]);

    // Chunked upload: POST, PATCH with Content-Range, a gap (416), status, PUT.
    let big = pattern(3 << 20, 2);
    let bd = sha(&big).to_string();
    let loc = start_upload(&c, &base, "team/app").await;
    let r = c
        .patch(format!("{base}{loc}"))
        .header("Content-Range", format!("0-{}", (1 << 20) - 1))
        .body(big[..1 << 20].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.headers()["Range"], format!("0-{}", (1 << 20) - 1));
    let r = c
        .patch(format!("{base}{loc}"))
        .header("Content-Range", format!("{}-{}", (2 << 20), (3 << 20) - 1))
        .body(big[2 << 20..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let r = c.get(format!("{base}{loc}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["Range"], format!("0-{}", (1 << 20) - 1));

    // An upload that has no byte yet is stored as well.
    let empty = start_upload(&c, &base, "team/app").await;

    // The upload is an ingest: it survives a restart of the daemon.
    let daemon = daemon.restart();
    wait_http(&base);
    let r = c.get(format!("{base}{empty}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "{:?}", r.text().await);
    // A streamed PATCH (no Content-Range), then the closing PUT with the last bytes.
    let r = c
        .patch(format!("{base}{loc}"))
        .body(big[1 << 20..2 << 20].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED, "{:?}", r.text().await);
    let r = c
        .put(format!("{base}{loc}?digest={bd}"))
        .body(big[2 << 20..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["Location"], format!("/v2/team/app/blobs/{bd}"));
    let got = c
        .get(format!("{base}/v2/team/app/blobs/{bd}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got.as_ref() == &big[..], "chunked upload read back whole");

    // A wrong digest is DIGEST_INVALID and stores nothing; an unknown upload is unknown;
    // DELETE cancels.
    let loc = start_upload(&c, &base, "team/app").await;
    let r = c
        .put(format!("{base}{loc}?digest={unknown}"))
        .body(b"other bytes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        code_of(r).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    let r = c
        .head(format!("{base}/v2/team/app/blobs/{unknown}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // A PUT naming a digest stored here is still to an unknown upload.
    let unknown_upload = format!("{base}/v2/team/app/blobs/uploads/0123abcd");
    for req in [
        c.patch(&unknown_upload).body(b"x".to_vec()),
        // An id no upload here could have is as unknown.
        c.patch(format!("{base}/v2/team/app/blobs/uploads/doesnotexist"))
            .body(b"x".to_vec()),
        c.get(format!("{base}/v2/team/app/blobs/uploads/not.an.id")),
        c.put(format!("{unknown_upload}?digest={ld}"))
            .body(Vec::new()),
    ] {
        assert_eq!(
            code_of(req.send().await.unwrap()).await,
            (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN".into())
        );
    }
    let loc = start_upload(&c, &base, "team/app").await;
    assert_eq!(
        c.delete(format!("{base}{loc}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        c.get(format!("{base}{loc}")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // Cross-repository and anonymous mounts of a blob the registry has.
    let r = c
        .post(format!(
            "{base}/v2/other/repo/blobs/uploads/?mount={ld}&from=team/app"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.headers()["Location"],
        format!("/v2/other/repo/blobs/{ld}")
    );
    let r = c
        .post(format!("{base}/v2/third/blobs/uploads/?mount={ld}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = c
        .post(format!("{base}/v2/third/blobs/uploads/?mount={unknown}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "an unknown mount starts an upload"
    );

    // Manifests: refused while a blob is missing, then by tag; GET/HEAD with negotiation.
    let cfg = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
        .to_vec();
    let m = manifest(
        &(sha(&cfg).to_string(), cfg.len()),
        &[(ld.clone(), layer.len())],
        None,
    );
    let r = put_manifest(&c, &base, "team/app", "v1", &m).await;
    assert_eq!(
        code_of(r).await,
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN".into())
    );
    push_blob(&c, &base, "team/app", &cfg).await;
    let wrong_size = manifest(
        &(sha(&cfg).to_string(), cfg.len() + 1),
        &[(ld.clone(), layer.len())],
        None,
    );
    let r = put_manifest(&c, &base, "team/app", "v1", &wrong_size).await;
    let (status, body) = (r.status(), r.text().await.unwrap());
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("MANIFEST_INVALID") && body.contains(&format!("size of {}", cfg.len() + 1)),
        "a descriptor whose size is not its blob's is refused: {body}"
    );
    let md = sha(&m).to_string();
    let r = put_manifest(&c, &base, "team/app", "v1", &m).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["Docker-Content-Digest"], md.as_str());
    assert_eq!(
        r.headers()["Location"],
        format!("/v2/team/app/manifests/{md}")
    );
    let r = put_manifest(&c, &base, "team/app", &unknown, &m).await;
    assert_eq!(
        code_of(r).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    let r = put_manifest(&c, &base, "team/app", "v2", b"not json").await;
    assert_eq!(
        code_of(r).await,
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID".into())
    );
    let r = c
        .get(format!("{base}/v2/team/app/manifests/v1"))
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["Content-Type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(r.headers()["Docker-Content-Digest"], md.as_str());
    assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
    let r = c
        .head(format!("{base}/v2/team/app/manifests/{md}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["Content-Length"], m.len().to_string());
    let r = c
        .get(format!("{base}/v2/team/app/manifests/v1"))
        .header(
            "Accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        code_of(r).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
    let oversize = vec![b' '; 5 << 20];
    let r = put_manifest(&c, &base, "team/app", "huge", &oversize).await;
    assert_eq!(
        code_of(r).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID".into())
    );

    // Tags: listing with n and last, and the Link to the next page.
    for t in ["v2", "a0", "z9"] {
        assert_eq!(
            put_manifest(&c, &base, "team/app", t, &m).await.status(),
            StatusCode::CREATED
        );
    }
    let v: Value = c
        .get(format!("{base}/v2/team/app/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v,
        json!({"name": "team/app", "tags": ["a0", "v1", "v2", "z9"]})
    );
    let r = c
        .get(format!("{base}/v2/team/app/tags/list?n=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["Link"],
        "</v2/team/app/tags/list?n=2&last=v1>; rel=\"next\""
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!(["a0", "v1"]));
    let v: Value = c
        .get(format!("{base}/v2/team/app/tags/list?n=2&last=v1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], json!(["v2", "z9"]));
    let r = c
        .get(format!("{base}/v2/nobody/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code_of(r).await,
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN".into())
    );

    // Tags are image records: the images service lists them.
    let ch = contentd::client::connect_unix(&daemon.client_sock)
        .await
        .unwrap();
    let mut images = ipb::images_client::ImagesClient::with_interceptor(
        ch,
        Namespace::new(Some("default")).unwrap(),
    );
    let listed = images
        .list(ipb::ListImagesRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner()
        .images;
    let names: Vec<&str> = listed.iter().map(|i| i.name.as_str()).collect();
    assert!(names.contains(&"team/app:v1"), "{names:?}");

    // Referrers: a manifest with a subject answers OCI-Subject and is listed, filterable.
    let sbom = b"{}".to_vec();
    push_blob(&c, &base, "team/app", &sbom).await;
    let refm = manifest(
        &(sha(&sbom).to_string(), sbom.len()),
        &[],
        Some((&md, m.len())),
    );
    let r = put_manifest(&c, &base, "team/app", &sha(&refm).to_string(), &refm).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["OCI-Subject"], md.as_str());
    let v: Value = c
        .get(format!("{base}/v2/team/app/referrers/{md}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["manifests"][0]["digest"], sha(&refm).to_string());
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
    assert_eq!(v["manifests"][0]["annotations"]["org.example"], "yes");
    let r = c
        .get(format!(
            "{base}/v2/team/app/referrers/{md}?artifactType=application/x-other"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["OCI-Filters-Applied"], "artifactType");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"], json!([]));

    // Deletes: a tag, a manifest by digest (and every tag on it), a blob.
    assert_eq!(
        c.delete(format!("{base}/v2/team/app/manifests/z9"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        c.get(format!("{base}/v2/team/app/manifests/z9"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.delete(format!("{base}/v2/team/app/manifests/{md}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        c.get(format!("{base}/v2/team/app/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.delete(format!("{base}/v2/team/app/blobs/{bd}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        c.head(format!("{base}/v2/team/app/blobs/{bd}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.delete(format!("{base}/v2/team/app/blobs/{bd}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    // Metrics count requests per route, status and cache result.
    let _ = daemon;
}

/// Basic auth from a bcrypt htpasswd file, and the read-only switch.
#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd: PathBuf = dir.path().join("htpasswd");
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    std::fs::write(&htpasswd, format!("alice:{hash}\n")).unwrap();
    let (_d, base, _cfg) = start_registry(&format!(
        "[registry]\ndefault_upstream = \"\"\nread_only = true\nhtpasswd = \"{}\"\n",
        htpasswd.display()
    ));
    let c = http();
    let r = c.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["WWW-Authenticate"], "Basic realm=\"contentd\"");
    assert_eq!(code_of(r).await.1, "UNAUTHORIZED");
    let r = c
        .get(format!("{base}/v2/"))
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for _ in 0..2 {
        let r = c
            .get(format!("{base}/v2/"))
            .basic_auth("alice", Some("s3cret"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = c
        .post(format!("{base}/v2/a/blobs/uploads/?digest={}", sha(b"x")))
        .basic_auth("alice", Some("s3cret"))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        code_of(r).await,
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED".into())
    );
}

/// A client that opens a connection and stays silent where it should speak (no bytes, half a
/// request's headers, half of HTTP/2's preface, nothing after a kept-alive response) is cut
/// off after `idle_timeout_secs`; one that keeps sending, however slowly, is not.
#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    use std::io::{Read as _, Write as _};
    let (_d, base, _cfg) =
        start_registry("[registry]\ndefault_upstream = \"\"\nidle_timeout_secs = 2\n");
    let addr = base.trim_start_matches("http://").to_string();
    let open = |first: &[u8]| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(first).unwrap();
        s
    };
    let mut kept = open(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut head = [0u8; 512];
    let n = kept.read(&mut head).unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head[..n])
    );
    let silent = vec![
        ("no bytes", open(b"")),
        (
            "half the headers",
            open(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"),
        ),
        ("half the HTTP/2 preface", open(b"PRI * HTTP")),
        ("nothing after a response", kept),
    ];

    // A monolithic upload whose body trickles in over twice the timeout.
    let data = pattern(64, 7);
    let d = sha(&data);
    let mut slow = open(
        format!(
            "POST /v2/slow/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            data.len()
        )
        .as_bytes(),
    );
    for piece in data.chunks(8) {
        std::thread::sleep(std::time::Duration::from_millis(500));
        slow.write_all(piece).unwrap();
    }
    let n = slow.read(&mut head).unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 201"),
        "slow upload: {:?}",
        String::from_utf8_lossy(&head[..n])
    );

    // A download the client stops reading: 24 MiB is more than the socket buffers on both
    // sides hold, so the daemon's writes block long before the blob is sent.
    let big = pattern(24 << 20, 8);
    let bd = push_blob(&http(), &base, "slow", &big).await;
    let mut stalled =
        open(format!("GET /v2/slow/blobs/{bd} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());

    std::thread::sleep(std::time::Duration::from_secs(4));
    stalled
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    let _ = stalled.read_to_end(&mut got);
    assert!(
        got.len() < big.len(),
        "a stalled download was not cut off ({} bytes came)",
        got.len()
    );
    for (what, mut s) in silent {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "{what}: still open ({e})"
            ),
        }
    }
    let r = http()
        .get(format!("{base}/v2/slow/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), data);
}

/// HTTP/2: a client that keeps its connection alive (it reads, it answers pings) but never
/// opens one stream's flow-control window would pin the piece h2 holds for that stream for
/// good; the connection is closed once the stream has taken none of it for the idle
/// timeout. A stream that keeps taking its data, however slowly, is not cut.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_stream_whose_window_stays_shut_closes_its_connection() {
    let (_d, base, _cfg) =
        start_registry("[registry]\ndefault_upstream = \"\"\nidle_timeout_secs = 2\n");
    let addr = base.trim_start_matches("http://").to_string();
    let big = pattern(3 << 20, 9);
    let bd = push_blob(&http(), &base, "h2", &big).await;
    let get = || {
        http::Request::get(format!("http://{addr}/v2/h2/blobs/{bd}"))
            .body(())
            .unwrap()
    };
    let connect = |window: u32| {
        let addr = addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (send, conn) = h2::client::Builder::new()
                .initial_window_size(window)
                .handshake::<_, bytes::Bytes>(tcp)
                .await
                .unwrap();
            (send, tokio::spawn(conn))
        }
    };

    // Stalled: a 1-byte stream window, never widened.
    let (mut send, driver) = connect(1).await;
    let (resp, _) = send.send_request(get(), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stalled = resp.into_body();
    assert_eq!(stalled.data().await.unwrap().unwrap().len(), 1);
    // What one connection can hold that way is bounded by its streams.
    assert_eq!(send.current_max_send_streams(), 16);

    // Slow but moving, meanwhile, on its own connection: ~320 KiB/s for 3 s (each 256 KiB
    // piece taken well within the timeout), then the rest at once.
    let (mut send2, _driver2) = connect(65_535).await;
    let (resp, _) = send2.send_request(get(), true).unwrap();
    let mut slow = resp.await.unwrap().into_body();
    let mut got = Vec::new();
    let t0 = std::time::Instant::now();
    while let Some(frame) = slow.data().await {
        let frame = frame.unwrap();
        slow.flow_control().release_capacity(frame.len()).unwrap();
        got.extend_from_slice(&frame);
        if t0.elapsed() < std::time::Duration::from_secs(3) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    assert_eq!(got.len(), big.len());
    assert!(got == big, "the slow stream's bytes differ");

    // The stalled stream's connection is gone within a few timeouts.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), driver).await;
    assert!(
        ended.is_ok(),
        "the connection of a stalled stream is still open"
    );
    assert!(
        stalled.data().await.is_none_or(|r| r.is_err()),
        "the stalled stream went on"
    );
}

/// Past `max_connections`, a new connection waits to be accepted until one ends.
#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_cap_wait_for_a_slot() {
    let (_d, base, _cfg) =
        start_registry("[registry]\ndefault_upstream = \"\"\nmax_connections = 2\n");
    let addr = base.trim_start_matches("http://").to_string();
    let held: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let url = format!("{base}/v2/");
    let mut waiting = tokio::spawn(async move { http().get(url).send().await.unwrap().status() });
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(500), &mut waiting)
            .await
            .is_err(),
        "a third connection was served while two held the cap"
    );
    drop(held);
    assert_eq!(waiting.await.unwrap(), StatusCode::OK);
}

/// The pull-through mirror in front of a real docker-registry: every fixture pulls through
/// contentd by `?ns=` (containerd's form) and by a host path prefix (registries.conf's), each
/// blob is fetched from the upstream once however many clients ask at once, a second pass
/// makes no upstream request, and with the upstream stopped the tags still resolve (stale)
/// and every digest still serves.
#[tokio::test(flavor = "multi_thread")]
async fn mirror_fetches_once_and_serves_when_the_upstream_is_down() {
    let Some((_dir, _keep, up, s)) = crate::upstream::registry_with_fixtures() else {
        return;
    };
    let (_d, base, _cfg) = start_registry(&format!(
        "[registry]\ntag_ttl_secs = 0\n[upstream]\nread_timeout_secs = 5\n[upstream.registries.\"{a}\"]\nendpoint = \"http://{a}\"\n",
        a = up.addr
    ));
    let c = http();
    let fixtures: Vec<&Value> = s["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["registry"].is_object())
        .collect();
    assert!(!fixtures.is_empty());
    let accept = ACCEPT_ANY;

    // Every node of every graph, read through the mirror, 4 clients at once per blob.
    // (repository, tag, [(digest, is a manifest or index)])
    type Pulled = (String, String, Vec<(String, bool)>);
    let mut pulled: Vec<Pulled> = Vec::new();
    for fx in &fixtures {
        let repo = fx["registry"]["repository"].as_str().unwrap().to_string();
        let tag = fx["registry"]["tag"].as_str().unwrap().to_string();
        let r = c
            .get(format!("{base}/v2/{repo}/manifests/{tag}?ns={}", up.addr))
            .header("Accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{repo}:{tag}");
        assert_eq!(r.headers()["OCI-Namespace"], up.addr.as_str());
        let nodes: Vec<(String, bool)> = fx["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["present"].as_bool().unwrap())
            .map(|n| {
                let mt = n["mediaType"].as_str().unwrap();
                (
                    n["digest"].as_str().unwrap().to_string(),
                    mt.contains("manifest") || mt.contains("index"),
                )
            })
            .collect();
        for (d, is_doc) in &nodes {
            let kind = if *is_doc { "manifests" } else { "blobs" };
            let gets = (0..4).map(|_| {
                let (c, url) = (
                    c.clone(),
                    format!("{base}/v2/{repo}/{kind}/{d}?ns={}", up.addr),
                );
                async move {
                    let r = c.get(url).header("Accept", accept).send().await.unwrap();
                    (r.status(), r.bytes().await.unwrap())
                }
            });
            for (st, body) in futures::future::join_all(gets).await {
                assert_eq!(st, StatusCode::OK, "{repo} {d}");
                assert_eq!(sha(&body).to_string(), *d, "{repo} {d} bytes");
            }
        }
        pulled.push((repo, tag, nodes));
    }
    let mut per_blob = HashMap::new();
    for (_, _, nodes) in &pulled {
        for (d, is_doc) in nodes {
            if !is_doc {
                per_blob.insert(d.clone(), up.requests("GET", &format!("/blobs/{d}")));
            }
        }
    }
    for (d, n) in &per_blob {
        assert_eq!(*n, 1, "blob {d} fetched from the upstream {n} times");
    }

    // The host-prefix form (registries.conf `location = "contentd/HOST"`) finds the same.
    let (repo, tag, nodes) = &pulled[0];
    let r = c
        .get(format!("{base}/v2/{}/{repo}/manifests/{tag}", up.addr))
        .header("Accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let before: usize = per_blob
        .keys()
        .map(|d| up.requests("GET", &format!("/blobs/{d}")))
        .sum();
    for (d, is_doc) in nodes.iter().filter(|n| !n.1) {
        let _ = is_doc;
        let r = c
            .get(format!("{base}/v2/{}/{repo}/blobs/{d}", up.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(sha(&r.bytes().await.unwrap()).to_string(), *d);
    }
    let after: usize = per_blob
        .keys()
        .map(|d| up.requests("GET", &format!("/blobs/{d}")))
        .sum();
    assert_eq!(before, after, "a second pass fetched blobs again");

    // A mirrored repository's tag list is the upstream's, with tags never pulled here: one
    // tagged upstream only now.
    let (repo, tag, _) = &pulled[0];
    let raw = c
        .get(format!("http://{}/v2/{repo}/manifests/{tag}", up.addr))
        .header("Accept", accept)
        .send()
        .await
        .unwrap();
    let mt = raw.headers()["Content-Type"].to_str().unwrap().to_string();
    let raw = raw.bytes().await.unwrap();
    let r = c
        .put(format!(
            "http://{}/v2/{repo}/manifests/only-upstream",
            up.addr
        ))
        .header("Content-Type", mt)
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let tags_of = |url: String| {
        let c = c.clone();
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let v: Value = r.json().await.unwrap();
            v["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let want = tags_of(format!("http://{}/v2/{repo}/tags/list", up.addr)).await;
    assert!(want.iter().any(|t| t == "only-upstream"), "{want:?}");
    let mut stored: Vec<String> = pulled
        .iter()
        .filter(|p| &p.0 == repo)
        .map(|p| p.1.clone())
        .collect();
    stored.sort();
    let mut listed = tags_of(format!("{base}/v2/{repo}/tags/list?ns={}", up.addr)).await;
    listed.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(listed, want_sorted, "the mirror lists the upstream's tags");
    let page = tags_of(format!(
        "{base}/v2/{repo}/tags/list?ns={}&n=1&last={}",
        up.addr, want_sorted[0]
    ))
    .await;
    assert_eq!(page, want_sorted[1..2], "pagination over the merged list");

    // Upstream down: tags are served stale (their TTL is 0, so each GET tries it), every
    // digest as ever; the tag list is what is stored.
    let addr = up.addr.clone();
    drop(up);
    let listed = tags_of(format!("{base}/v2/{repo}/tags/list?ns={addr}")).await;
    assert_eq!(listed, stored, "with the upstream down, the stored tags");
    for (repo, tag, nodes) in &pulled {
        let r = c
            .get(format!("{base}/v2/{repo}/manifests/{tag}?ns={addr}"))
            .header("Accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{repo}:{tag} with the upstream down"
        );
        for (d, is_doc) in nodes {
            let kind = if *is_doc { "manifests" } else { "blobs" };
            let r = c
                .get(format!("{base}/v2/{repo}/{kind}/{d}?ns={addr}"))
                .header("Accept", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status(),
                StatusCode::OK,
                "{repo} {d} with the upstream down"
            );
            assert_eq!(sha(&r.bytes().await.unwrap()).to_string(), *d);
        }
    }
}

/// The first fixture the upstream registry holds.
fn first_pushed(summary: &Value) -> &Value {
    summary["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["registry"].is_object())
        .unwrap()
}

/// A blob asked for by digest alone (no manifest recorded where it comes from) is settled
/// by an upstream HEAD before any answer: a blob the upstream lacks is a 404, never a 200
/// whose body breaks off; an unreachable upstream is a 503; a HEAD fetches no body; and a
/// blob the upstream holds is then served like any recorded one, ranges included.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_miss_is_settled_upstream_before_any_body() {
    let Some((_dir, _keep, up, s)) = crate::upstream::registry_with_fixtures() else {
        return;
    };
    let (_d, base, _cfg) = start_registry(&format!(
        "[upstream]\nread_timeout_secs = 5\nfetch_attempts = 1\n[upstream.registries.\"{a}\"]\nendpoint = \"http://{a}\"\n",
        a = up.addr
    ));
    let c = http();
    let fx = first_pushed(&s);
    let repo = fx["registry"]["repository"].as_str().unwrap();
    let blobs =
        crate::upstream::stored_blobs(fx, |mt| !mt.contains("manifest") && !mt.contains("index"));
    assert!(blobs.len() >= 2, "{blobs:?}");
    let (d, size) = blobs[0].clone();
    let (d2, size2) = blobs[1].clone();
    let url = |d: &str| format!("{base}/v2/{repo}/blobs/{d}?ns={}", up.addr);

    // Not upstream: 404 with the spec's body, for GET and HEAD, and again (nothing was
    // recorded for it).
    let absent = sha(b"no registry holds this").to_string();
    for _ in 0..2 {
        let r = c.get(url(&absent)).send().await.unwrap();
        let (st, body) = code_of(r).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body, "BLOB_UNKNOWN");
        let r = c.head(url(&absent)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    // Upstream: a HEAD answers its size and fetches no body; of many clients asking at
    // once, one HEAD goes upstream.
    // (The log already holds the push's HEADs.)
    let before = up.requests("HEAD", &format!("/blobs/{d}"));
    let heads = (0..16).map(|_| c.head(url(&d)).send());
    for r in futures::future::join_all(heads).await {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["Content-Length"], size.to_string().as_str());
        assert_eq!(r.headers()["Docker-Content-Digest"], d.as_str());
    }
    assert_eq!(up.requests("HEAD", &format!("/blobs/{d}")), before + 1);
    assert_eq!(
        up.requests("GET", &format!("/blobs/{d}")),
        0,
        "a HEAD fetched the body"
    );
    let file = std::fs::read(up.blob_data(&d)).unwrap();
    let r = c
        .get(url(&d))
        .header("Range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["Content-Range"],
        format!("bytes 100-199/{size}").as_str()
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &file[100..200]);
    let r = c.get(url(&d)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["Content-Length"], size.to_string().as_str());
    assert_eq!(sha(&r.bytes().await.unwrap()).to_string(), d);

    // A client told by a HEAD that a blob is here does not upload it: a manifest pushed
    // naming it makes the registry fetch it (verified) before the manifest is stored.
    let r = c.head(url(&d2)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(up.requests("GET", &format!("/blobs/{d2}")), 0);
    let cfg = br#"{"architecture":"amd64","os":"linux"}"#;
    let cd = push_blob(&c, &base, repo, cfg).await;
    let m = manifest(&(cd, cfg.len()), &[(d2.clone(), size2 as usize)], None);
    let r = put_manifest(&c, &base, repo, &format!("pushed?ns={}", up.addr), &m).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    assert_eq!(up.requests("GET", &format!("/blobs/{d2}")), 1);
    // Nor is a manifest stored that names a blob neither here nor upstream at that size.
    let m = manifest(
        &(sha(cfg).to_string(), cfg.len()),
        &[(d2.clone(), size2 as usize + 1)],
        None,
    );
    let r = put_manifest(&c, &base, repo, &format!("wrong?ns={}", up.addr), &m).await;
    assert_eq!(code_of(r).await.0, StatusCode::BAD_REQUEST);

    // Upstream down: an unknown blob is a 503 that names the upstream, not a 200.
    let addr = up.addr.clone();
    drop(up);
    let other = sha(b"asked for while the upstream is down").to_string();
    let r = c
        .get(format!("{base}/v2/{repo}/blobs/{other}?ns={addr}"))
        .send()
        .await
        .unwrap();
    let st = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains(&addr), "{body}");
    // What was fetched before is served as ever.
    for d in [&d, &d2] {
        let r = c
            .get(format!("{base}/v2/{repo}/blobs/{d}?ns={addr}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(sha(&r.bytes().await.unwrap()).to_string(), *d);
    }
}

/// Wrong bytes from the upstream are never stored nor served as the blob once fetched: the
/// fetch fails its digest check, and once the upstream is fixed the next GET fetches the
/// blob again and serves the right bytes. (The client of the failed fetch was streamed the
/// bytes as they arrived, as from any pull-through mirror: a body whose length was stated
/// is whole at its last byte, before the fetch's verdict, so it is the client's digest check
/// that rejects it; see the README.)
#[tokio::test(flavor = "multi_thread")]
async fn an_upstreams_wrong_bytes_are_never_stored() {
    let Some((_dir, _keep, up, s)) = crate::upstream::registry_with_fixtures() else {
        return;
    };
    let metrics = format!("127.0.0.1:{}", free_port());
    let (_d, base, _cfg) = start_registry(&format!(
        "metrics_addr = \"{metrics}\"\n[upstream]\nread_timeout_secs = 5\nfetch_attempts = 1\n[upstream.registries.\"{a}\"]\nendpoint = \"http://{a}\"\n",
        a = up.addr
    ));
    // Fetches that failed their digest check, from the metrics endpoint.
    let lost = || {
        let c = http();
        let url = format!("http://{metrics}/metrics");
        async move {
            let text = c.get(url).send().await.unwrap().text().await.unwrap();
            text.lines()
                .filter(|l| l.starts_with("contentd_upstream_fetches") && l.contains("DataLoss"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        }
    };
    let c = http();
    let fx = first_pushed(&s);
    let repo = fx["registry"]["repository"].as_str().unwrap();
    let blobs = crate::upstream::stored_blobs(fx, |_| true);
    assert!(blobs.len() >= 2 && blobs[0].1 > 1 << 20, "{blobs:?}");
    // A wrong byte in the middle and at the very end. (Two blobs: a blob once stored is
    // linked again rather than fetched, even after a delete.)
    for (i, (d, size)) in blobs.iter().take(2).enumerate() {
        let url = format!("{base}/v2/{repo}/blobs/{d}?ns={}", up.addr);
        let file = up.blob_data(d);
        let good = std::fs::read(&file).unwrap();
        let at = if i == 0 {
            good.len() / 2
        } else {
            good.len() - 1
        };
        let mut bad = good.clone();
        bad[at] ^= 0xff;
        std::fs::write(&file, &bad).unwrap();
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["Content-Length"], size.to_string().as_str());
        if let Ok(b) = r.bytes().await {
            assert!(b == bad || b.len() < bad.len(), "bytes no upstream sent");
        }
        assert_eq!(up.requests("GET", &format!("/blobs/{d}")), 1);
        // The fetch's verdict: wrong bytes.
        let settled = std::time::Instant::now();
        while lost().await < (i + 1) as f64 {
            assert!(
                settled.elapsed() < std::time::Duration::from_secs(10),
                "no verdict"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Not stored: the next GET asks the upstream again.
        std::fs::write(&file, &good).unwrap();
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.bytes().await.unwrap() == good,
            "wrong bytes after the fix"
        );
        assert_eq!(up.requests("GET", &format!("/blobs/{d}")), 2);
    }
}

/// A mirrored repository's referrers include the upstream's: docker-registry has no
/// referrers API, so they come from the referrers tag schema's index that clients pushed
/// there; the artifactType filter applies to them; an unreachable upstream leaves the
/// stored ones (a 200, as a stale tag is served).
#[tokio::test(flavor = "multi_thread")]
async fn mirrored_referrers_include_the_upstreams() {
    let Some((_dir, _keep, up, s)) = crate::upstream::registry_with_fixtures() else {
        return;
    };
    let (_d, base, _cfg) = start_registry(&format!(
        "[upstream]\nread_timeout_secs = 5\n[upstream.registries.\"{a}\"]\nendpoint = \"http://{a}\"\n",
        a = up.addr
    ));
    let c = http();
    let fx = s["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "oci-single-referrers")
        .unwrap();
    let repo = fx["registry"]["repository"].as_str().unwrap();
    let tag = fx["registry"]["tag"].as_str().unwrap();
    let subject = tag.replacen('-', ":", 1);
    let index: Value = c
        .get(format!("http://{}/v2/{repo}/manifests/{tag}", up.addr))
        .header("Accept", "application/vnd.oci.image.index.v1+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let want: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["digest"].as_str().unwrap().to_string(),
                m["artifactType"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(!want.is_empty());
    let listed = |q: String| {
        let c = c.clone();
        let url = format!("{base}/v2/{repo}/referrers/{subject}?{q}");
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(
                r.headers()["Content-Type"],
                "application/vnd.oci.image.index.v1+json"
            );
            let filtered = r.headers().get("OCI-Filters-Applied").cloned();
            let v: Value = r.json().await.unwrap();
            let got: Vec<(String, String)> = v["manifests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["digest"].as_str().unwrap().to_string(),
                        m["artifactType"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            (got, filtered)
        }
    };
    let (got, filtered) = listed(format!("ns={}", up.addr)).await;
    assert_eq!(got, want);
    assert!(filtered.is_none());
    // Query values are form-encoded: a `+` in a media type is sent as %2B.
    let (got, filtered) = listed(format!(
        "ns={}&artifactType={}",
        up.addr,
        want[0].1.replace('+', "%2B")
    ))
    .await;
    assert!(got.contains(&want[0]), "{got:?}");
    assert!(got.iter().all(|g| g.1 == want[0].1), "{got:?}");
    assert_eq!(filtered.unwrap(), "artifactType");
    let (got, _) = listed(format!("ns={}&artifactType=application/x-none", up.addr)).await;
    assert!(got.is_empty(), "{got:?}");
    // A referrer listed is pulled through like any manifest.
    let r = c
        .get(format!(
            "{base}/v2/{repo}/manifests/{}?ns={}",
            want[0].0, up.addr
        ))
        .header("Accept", ACCEPT_ANY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sha(&r.bytes().await.unwrap()).to_string(), want[0].0);

    // Upstream down: still a 200, listing what is stored: the referrer pulled through.
    let addr = up.addr.clone();
    drop(up);
    let (got, _) = listed(format!("ns={addr}")).await;
    assert_eq!(got, want[..1], "with the upstream down");
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Containerd {
    stop: PathBuf,
    dir: PathBuf,
    sock: String,
}

impl Containerd {
    fn start(shared: &std::path::Path, dir: PathBuf) -> Containerd {
        run(
            "bash",
            &[
                shared
                    .join("contentsuite/start-containerd.sh")
                    .to_str()
                    .unwrap(),
                dir.to_str().unwrap(),
            ],
        );
        Containerd {
            stop: shared.join("contentsuite/stop-containerd.sh"),
            sock: dir.join("containerd.sock").display().to_string(),
            dir,
        }
    }
    fn sock(&self) -> &str {
        &self.sock
    }
    /// `ctr images pull` of `reference` with `hosts` as its hosts directory.
    fn pull(&self, hosts: &std::path::Path, reference: &str) -> String {
        run(
            "ctr",
            &[
                "-a",
                self.sock(),
                "-n",
                "mirror",
                "images",
                "pull",
                "--all-platforms",
                "--hosts-dir",
                hosts.to_str().unwrap(),
                reference,
            ],
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(&self.stop)
            .arg(&self.dir)
            .output();
    }
}

/// Real clients through the mirror and the registry, on loopback with docker-registry as the
/// upstream: containerd 1.6 pulls every fixture through contentd (hosts.toml as the README
/// gives it), the upstream serves each blob once, a second containerd makes no upstream
/// request; skopeo pushes to contentd and pulls from it, also through a registries.conf
/// mirror with a host path prefix; with the upstream stopped, what was pulled still pulls by
/// tag and by digest.
#[tokio::test(flavor = "multi_thread")]
async fn containerd_and_skopeo_use_contentd_as_mirror_and_registry() {
    let Some(shared) = crate::registry::shared() else {
        return;
    };
    let Some((_dir, _keep, up, s)) = crate::upstream::registry_with_fixtures() else {
        return;
    };
    let (_d, base, _cfg) = start_registry(&format!(
        "[upstream]\nread_timeout_secs = 5\n[upstream.registries.\"{a}\"]\nendpoint = \"http://{a}\"\n",
        a = up.addr
    ));
    let cport = base.trim_start_matches("http://").to_string();
    let work = tempfile::Builder::new()
        .prefix("contentd-e2e")
        .tempdir_in("/tmp")
        .unwrap();

    // hosts.toml, as in the README: contentd first, the upstream as `server`.
    let hosts = work.path().join("hosts");
    std::fs::create_dir_all(hosts.join(&up.addr)).unwrap();
    std::fs::write(
        hosts.join(&up.addr).join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n[host.\"http://{cport}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            up.addr
        ),
    )
    .unwrap();
    let refs: Vec<(String, &Value)> = s["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        // Runnable images only: not the artifacts (sbom, signature, the referrers tag
        // schema), which ctr cannot unpack, and not the foreign-layer images, whose
        // non-distributable layers ctr fetches from the URLs they name (nowhere, here).
        .filter(|f| {
            let tag = f["registry"]["tag"].as_str().unwrap_or("");
            f["registry"].is_object()
                && !tag.starts_with("sha256-")
                && tag != "sbom"
                && tag != "sig"
                && !f["registry"]["repository"]
                    .as_str()
                    .unwrap()
                    .contains("foreign")
        })
        .map(|f| {
            (
                format!(
                    "{}/{}:{}",
                    up.addr,
                    f["registry"]["repository"].as_str().unwrap(),
                    f["registry"]["tag"].as_str().unwrap()
                ),
                f,
            )
        })
        .collect();
    let a = Containerd::start(&shared, work.path().join("ctrd-a"));
    for (r, _) in &refs {
        a.pull(&hosts, r);
    }
    let blobs: Vec<String> = refs
        .iter()
        .flat_map(|(_, f)| f["nodes"].as_array().unwrap().iter())
        .filter(|n| n["present"].as_bool().unwrap())
        .filter(|n| {
            let mt = n["mediaType"].as_str().unwrap();
            !(mt.contains("manifest") || mt.contains("index"))
        })
        .filter(|n| n["urls"].is_null())
        .map(|n| n["digest"].as_str().unwrap().to_string())
        .collect();
    let counts: HashMap<&String, usize> = blobs
        .iter()
        .map(|d| (d, up.requests("GET", &format!("/blobs/{d}"))))
        .collect();
    let fetched: usize = counts.values().sum();
    for (d, n) in &counts {
        assert!(*n <= 1, "blob {d} fetched from the upstream {n} times");
    }
    assert!(fetched > 0, "containerd fetched nothing through the mirror");

    // A second containerd: everything from contentd, nothing from the upstream.
    let b = Containerd::start(&shared, work.path().join("ctrd-b"));
    for (r, _) in &refs {
        b.pull(&hosts, r);
    }
    let again: usize = counts
        .keys()
        .map(|d| up.requests("GET", &format!("/blobs/{d}")))
        .sum();
    assert_eq!(
        again, fetched,
        "the second containerd caused upstream fetches"
    );

    // skopeo pushes an image to contentd as a registry, and pulls it back.
    let (single, _) = &refs[0];
    run(
        "skopeo",
        &[
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{single}"),
            &format!("docker://{cport}/pushed/app:v1"),
        ],
    );
    let raw_up = run(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{single}"),
        ],
    );
    let raw_cd = run(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{cport}/pushed/app:v1"),
        ],
    );
    assert_eq!(
        raw_up, raw_cd,
        "the pushed manifest reads back byte for byte"
    );
    let out = work.path().join("out");
    run(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{cport}/pushed/app:v1"),
            &format!("oci:{}:v1", out.display()),
        ],
    );

    // With the upstream stopped: containerd by tag and by digest through hosts.toml, and
    // skopeo through a registries.conf mirror with a host path prefix.
    let addr = up.addr.clone();
    drop(up);
    let c = Containerd::start(&shared, work.path().join("ctrd-c"));
    for (r, f) in &refs {
        c.pull(&hosts, r);
        let root = f["root"]["digest"].as_str().map(str::to_string);
        if let Some(root) = root {
            let repo = r.rsplit_once(':').unwrap().0;
            c.pull(&hosts, &format!("{repo}@{root}"));
        }
    }
    let conf = work.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"{addr}\"\nlocation = \"{addr}\"\ninsecure = true\n[[registry.mirror]]\nlocation = \"{cport}/{}\"\ninsecure = true\n",
            addr.replace(':', "_")
        ),
    )
    .unwrap();
    for (r, _) in refs.iter().take(3) {
        let o = work
            .path()
            .join(format!("m-{}", r.replace(['/', ':'], "_")));
        run(
            "skopeo",
            &[
                "--registries-conf",
                conf.to_str().unwrap(),
                "copy",
                "--all",
                &format!("docker://{r}"),
                &format!("oci:{}:x", o.display()),
            ],
        );
    }
    drop((a, b, c));
    let _ = base;
}

/// A private dockerd (Debian's docker.io engine) with contentd as its registry mirror,
/// exactly the README's `daemon.json` line, plus what lets it run unprivileged of the host
/// network: vfs storage, no bridge, no iptables, its own sockets and state.
struct Dockerd {
    child: std::process::Child,
    sock: String,
    _dir: tempfile::TempDir,
}

impl Dockerd {
    fn start(mirror: &str) -> Option<Dockerd> {
        // Debian's docker.io installs it in /usr/sbin, on root's PATH.
        if !crate::harness::have("dockerd") {
            return None;
        }
        // Short: dockerd's sockets live under it, and a socket path has 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("dk")
            .tempdir_in("/tmp")
            .unwrap();
        let p = |n: &str| dir.path().join(n).display().to_string();
        std::fs::write(
            p("daemon.json"),
            json!({
                "registry-mirrors": [mirror],
                "storage-driver": "vfs",
                "iptables": false,
                "ip6tables": false,
                "bridge": "none",
            })
            .to_string(),
        )
        .unwrap();
        let sock = p("docker.sock");
        let child = std::process::Command::new("dockerd")
            .args([
                "--config-file",
                &p("daemon.json"),
                "--data-root",
                &p("root"),
                "--exec-root",
                &p("x"),
                "--pidfile",
                &p("docker.pid"),
                "--host",
                &format!("unix://{sock}"),
            ])
            .stdout(std::fs::File::create(p("log")).unwrap())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let d = Dockerd {
            child,
            sock,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let up = std::process::Command::new("docker")
                .args(["-H", &format!("unix://{}", d.sock), "version"])
                .output()
                .unwrap()
                .status
                .success();
            if up {
                return Some(d);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "dockerd did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    fn docker(&self, args: &[&str]) -> String {
        let h = format!("unix://{}", self.sock);
        let mut all = vec!["-H", h.as_str()];
        all.extend_from_slice(args);
        run("docker", &all)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the dockerd this helper started; on SIGTERM it stops its own
        // containerd, which a SIGKILL would leave behind.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// docker pulls through contentd as its `registry-mirrors` entry (docker.io only, no `ns`,
/// `library/` for one-part names): every blob is fetched upstream once, a second pull after
/// `docker rmi` makes no upstream request, and with the upstream stopped the images still
/// pull by tag and by digest.
#[tokio::test(flavor = "multi_thread")]
async fn docker_uses_contentd_as_registry_mirror() {
    let Some((_dir, _keep, up, s)) = crate::upstream::registry_with_fixtures() else {
        return;
    };
    // docker.io is the upstream docker asks the mirror for; here it is docker-registry.
    let (_d, base, _cfg) = start_registry(&format!(
        "[registry]\ndefault_upstream = \"docker.io\"\n[upstream]\nread_timeout_secs = 5\n[upstream.registries.\"docker.io\"]\nendpoint = \"http://{}\"\n",
        up.addr
    ));
    let Some(dk) = Dockerd::start(&base) else {
        return;
    };
    // Runnable images, OCI and schema2, single and multi-platform; and a one-part name,
    // which docker sends as `library/<name>`.
    let mut images: Vec<(String, String)> = s["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| {
            let repo = f["registry"]["repository"].as_str()?;
            let tag = f["registry"]["tag"].as_str()?;
            ((tag == "oci" || tag == "v2s2") && !repo.contains("foreign")).then(|| {
                (
                    format!("{repo}:{tag}"),
                    f["root"]["digest"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect();
    assert!(images.len() >= 4, "{images:?}");
    run(
        "skopeo",
        &[
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{}/{}", up.addr, images[0].0),
            &format!("docker://{}/library/app:v1", up.addr),
        ],
    );
    images.push(("app:v1".into(), images[0].1.clone()));

    // Only what the pulls below ask of the upstream (skopeo's copy read blobs too).
    let skip = std::fs::read_to_string(up.log_path())
        .unwrap()
        .lines()
        .count();
    let blob_gets = || up.requests("GET", "/blobs/");
    let pull_all = |what: &str| {
        for (r, root) in &images {
            dk.docker(&["pull", r]);
            let digests = dk.docker(&["image", "inspect", "-f", "{{json .RepoDigests}}", r]);
            assert!(digests.contains(root.as_str()), "{what}: {r}: {digests}");
        }
    };
    let remove_all = || {
        for (r, _) in &images {
            dk.docker(&["rmi", "-f", r]);
        }
    };
    pull_all("first pull");
    let first = blob_gets();
    assert!(first > 0, "docker fetched nothing through the mirror");
    assert!(
        up.requests("GET", "/v2/library/app/manifests/v1") > 0,
        "docker's one-part name reached the upstream under library/"
    );
    let mut seen = HashMap::new();
    for l in std::fs::read_to_string(up.log_path())
        .unwrap()
        .lines()
        .skip(skip)
    {
        if l.contains("\"GET ") && l.contains("/blobs/sha256:") {
            let d = l.split("/blobs/").nth(1).unwrap()[..71].to_string();
            *seen.entry(d).or_insert(0) += 1;
        }
    }
    for (d, n) in &seen {
        assert_eq!(*n, 1, "blob {d} fetched from the upstream {n} times");
    }

    remove_all();
    pull_all("second pull");
    assert_eq!(
        blob_gets(),
        first,
        "a second pull fetched from the upstream"
    );

    drop(up);
    remove_all();
    pull_all("upstream stopped");
    for (r, root) in &images {
        let repo = r.rsplit_once(':').unwrap().0;
        dk.docker(&["rmi", "-f", r]);
        dk.docker(&["pull", &format!("{repo}@{root}")]);
    }
}

/// A registry on a non-loopback address is served over TLS only, with client certificates
/// required when `client_ca` is set.
#[tokio::test(flavor = "multi_thread")]
async fn a_non_loopback_registry_is_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let Some(certs) = crate::certs::make(dir.path()) else {
        return;
    };
    let port = free_port();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "registry_addr = \"0.0.0.0:{port}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n[registry]\ndefault_upstream = \"\"\n",
            certs.server_cert, certs.server_key, certs.ca
        ),
    )
    .unwrap();
    let _d = Daemon::start_with(&["--config", cfg.to_str().unwrap()]);
    wait_http(&format!("http://127.0.0.1:{port}"));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&certs.ca).unwrap()).unwrap();
    let mut pem = std::fs::read(&certs.client_cert).unwrap();
    pem.extend(std::fs::read(&certs.client_key).unwrap());
    let with_cert = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let r = with_cert
        .get(format!("https://127.0.0.1:{port}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Without a client certificate the handshake is refused; plain HTTP gets nothing.
    let without = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    assert!(
        without
            .get(format!("https://127.0.0.1:{port}/v2/"))
            .send()
            .await
            .is_err()
    );
    assert!(
        http()
            .get(format!("http://127.0.0.1:{port}/v2/"))
            .send()
            .await
            .is_err()
    );
}

/// Past `[registry] max_mib`, mirrored images go least recently used first, and a layer a
/// pushed image shares with an evicted one stays.
#[tokio::test(flavor = "multi_thread")]
async fn mirrored_images_are_evicted_least_recently_used_first() {
    let Some((_dir, _keep, up, s)) = crate::upstream::registry_with_fixtures() else {
        return;
    };
    // No limit while the images are fetched: an eviction in the middle of the setup would
    // race it (a manifest fetched again by digest is a new mirrored record). The daemon is
    // restarted with the 1 MiB limit once everything is in place.
    let settings = |max_mib: u32| {
        format!(
            "gc_grace_secs = 0\neviction_check_secs = 1\neviction_high_watermark_percent = 0\n[registry]\nmax_mib = {max_mib}\ndefault_upstream = \"\"\n[upstream.registries.\"{a}\"]\nendpoint = \"http://{a}\"\n",
            a = up.addr
        )
    };
    let (d, base, cfg) = start_registry(&settings(0));
    let c = http();
    let accept = ACCEPT_ANY;
    let single: Vec<&Value> = s["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["registry"].is_object()
                && f["subject"].is_null()
                && f["nodes"].as_array().unwrap().iter().all(|n| {
                    n["present"].as_bool().unwrap()
                        && !n["mediaType"].as_str().unwrap().contains("index")
                        && !n["mediaType"].as_str().unwrap().contains("list")
                })
        })
        .take(2)
        .collect();
    assert_eq!(single.len(), 2, "two single-manifest fixtures");
    let mut names = Vec::new();
    let mut layers_of_first = Vec::new();
    let mut sizes = Vec::new();
    for (i, fx) in single.iter().enumerate() {
        let repo = fx["registry"]["repository"].as_str().unwrap();
        let tag = fx["registry"]["tag"].as_str().unwrap();
        let r = c
            .get(format!("{base}/v2/{repo}/manifests/{tag}?ns={}", up.addr))
            .header("Accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        for n in fx["nodes"].as_array().unwrap() {
            let dg = n["digest"].as_str().unwrap();
            let kind = if n["mediaType"].as_str().unwrap().contains("manifest") {
                "manifests"
            } else {
                "blobs"
            };
            let body = c
                .get(format!("{base}/v2/{repo}/{kind}/{dg}?ns={}", up.addr))
                .header("Accept", accept)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(sha(&body).to_string(), dg);
            if i == 0 && kind == "blobs" {
                layers_of_first.push((dg.to_string(), body));
            }
        }
        names.push(format!("{}/{repo}:{tag}", up.addr));
        sizes.push(
            fx["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["size"].as_i64().unwrap())
                .sum::<i64>(),
        );
        // Distinct recency, in seconds.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    // A pushed image sharing one blob of the first (least recently used) mirrored image.
    let (shared, shared_bytes) = layers_of_first.pop().unwrap();
    push_blob(&c, &base, "local/keep", &shared_bytes).await;
    let config = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}".to_vec();
    let cd = push_blob(&c, &base, "local/keep", &config).await;
    let m = manifest(
        &(cd, config.len()),
        &[(shared.clone(), shared_bytes.len())],
        None,
    );
    assert_eq!(
        put_manifest(&c, &base, "local/keep", "1", &m)
            .await
            .status(),
        StatusCode::CREATED
    );

    let conf = cfg.path().join("contentd.toml");
    let listen = std::fs::read_to_string(&conf).unwrap();
    let listen = listen.lines().next().unwrap();
    std::fs::write(&conf, format!("{listen}\n{}", settings(1))).unwrap();
    assert!(!d.log().contains("evicted a mirrored image"), "{}", d.log());
    let d = d.restart();
    wait_http(&base);

    // The least recently used goes first; the other goes too only if what is left is still
    // past 1 MiB.
    let pushed = (shared_bytes.len() + config.len() + m.len()) as i64;
    let want = if sizes[1] + pushed > 1 << 20 { 2 } else { 1 };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let evicted = loop {
        let log = d.log();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains("evicted a mirrored image"))
            .map(String::from)
            .collect();
        if lines.len() >= want {
            // Give a wrong extra eviction time to show.
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            break d
                .log()
                .lines()
                .filter(|l| l.contains("evicted a mirrored image"))
                .map(String::from)
                .collect::<Vec<_>>();
        }
        assert!(std::time::Instant::now() < deadline, "no eviction:\n{log}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(evicted.len(), want, "{evicted:#?}");
    assert!(evicted[0].contains(&names[0]), "{evicted:#?}");
    if want == 2 {
        assert!(evicted[1].contains(&names[1]), "{evicted:#?}");
    }
    // The pushed image is whole; the first image's other blobs are gone.
    let r = c
        .get(format!("{base}/v2/local/keep/manifests/1"))
        .header("Accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(format!("{base}/v2/local/keep/blobs/{shared}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), shared_bytes);
    // The evicted image's own manifest is no longer stored. (Its layers stay known by their
    // recorded upstream source and are fetched again on demand.)
    let root = single[0]["root"]["digest"].as_str().unwrap();
    let r = c
        .head(format!("{base}/v2/local/keep/manifests/{root}"))
        .header("Accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "{root} was kept");
}

/// A client that deletes a blob right after reading it through the mirror deletes it, and
/// nothing links it again afterwards. (A read ends once the bytes are verified, before the
/// fetch commits, so the delete waits for that commit: `Reads::settle`. The fixtures here
/// commit fast enough that this test passes without the wait too; the 50 MiB miss loop of
/// `benches/registry.sh` is what caught the race.)
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_deleted_right_after_its_mirrored_read_stays_deleted() {
    let Some((_dir, _keep, up, s)) = crate::upstream::registry_with_fixtures() else {
        return;
    };
    let (_d, base, _cfg) = start_registry(&format!(
        "gc_grace_secs = 0\n[upstream.registries.\"{a}\"]\nendpoint = \"http://{a}\"\n",
        a = up.addr
    ));
    let c = http();
    let fx = first_pushed(&s);
    let repo = fx["registry"]["repository"].as_str().unwrap();
    let tag = fx["registry"]["tag"].as_str().unwrap();
    let layer = fx["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["present"].as_bool().unwrap())
        .max_by_key(|n| n["size"].as_i64().unwrap())
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let ns = format!("?ns={}", up.addr);
    let r = c
        .get(format!("{base}/v2/{repo}/manifests/{tag}{ns}"))
        .header("Accept", ACCEPT_ANY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let blob = format!("{base}/v2/{repo}/blobs/{layer}{ns}");
    let body = c.get(&blob).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha(&body).to_string(), layer);
    let r = c.delete(&blob).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED, "the delete found no blob");
    // Nothing links it again afterwards: a second delete finds it gone.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let r = c.delete(&blob).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}
