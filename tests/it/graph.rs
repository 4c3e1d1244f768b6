//! The descriptor graph contentd records at commit, checked against real images built by
//! umoci and skopeo (shared/images/make-fixtures.sh) and the reference graph in summary.json.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use contentd::api::pb::contentd::v1 as gpb;
use contentd::client::{Namespace, connect_unix};
use serde_json::Value;

use crate::harness::*;

/// The fixtures: `CONTENTD_FIXTURES` (a directory with summary.json), else built now with
/// the shared make-fixtures.sh (about 10 s). None when the tools are missing and not required.
pub fn fixtures() -> Option<(PathBuf, Option<tempfile::TempDir>)> {
    if let Some(dir) = std::env::var_os("CONTENTD_FIXTURES") {
        return Some((PathBuf::from(dir), None));
    }
    let shared = std::env::var_os("CONTENTD_SHARED")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
            PathBuf::from("/work/shared"),
        ])
        .find(|p| p.join("images/make-fixtures.sh").exists());
    let required = std::env::var_os("CONTENTD_REQUIRE_TOOLS").is_some();
    let Some(shared) = shared else {
        assert!(
            !required,
            "shared/images/make-fixtures.sh not found (set CONTENTD_SHARED)"
        );
        eprintln!("skipping: shared/images not found");
        return None;
    };
    // The fixtures are deterministic: one build per version of the script is shared by
    // every test (and every run) through a cache directory, filled by an atomic rename.
    let script = shared.join("images/make-fixtures.sh");
    let cache = PathBuf::from(format!(
        "/tmp/contentd-fixtures-{}",
        &sha(&std::fs::read(&script).unwrap()).to_string()[7..23]
    ));
    if cache.join("summary.json").exists() {
        return Some((cache, None));
    }
    let tmp = tempfile::Builder::new()
        .prefix("contentd-fx")
        .tempdir_in("/tmp")
        .unwrap();
    let out = tmp.path().join("fixtures");
    let st = std::process::Command::new("bash")
        .arg(&script)
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    if !st.success() {
        assert!(
            !required,
            "make-fixtures.sh failed (needs umoci, skopeo, jq)"
        );
        eprintln!("skipping: make-fixtures.sh failed");
        return None;
    }
    // Losing the race to another test is fine: its copy is identical.
    let _ = std::fs::rename(&out, &cache);
    Some((cache, None))
}

/// Every blob file under the fixture tree, by digest.
pub fn blob_files(root: &Path) -> HashMap<String, PathBuf> {
    fn visit(dir: &Path, out: &mut HashMap<String, PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "archives") {
                    continue;
                }
                visit(&p, out);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.insert(sha(&bytes).to_string(), p);
            }
        }
    }
    let mut out = HashMap::new();
    visit(root, &mut out);
    out
}

/// The first layer a fixture's root manifest lists.
pub fn first_layer(fx: &Value) -> &str {
    fx["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["role"] == "layer")
        .unwrap()["to"]
        .as_str()
        .unwrap()
}

pub type NodeRow = (String, String, i64, bool);
pub type EdgeRow = (String, String, String, u32, String, i64, String);

/// A Walk's nodes: digest, media type, size, presence.
pub fn walk_nodes(w: &gpb::WalkResponse) -> BTreeSet<NodeRow> {
    w.nodes
        .iter()
        .map(|n| (n.digest.clone(), n.media_type.clone(), n.size, n.present))
        .collect()
}

/// The nodes summary.json gives a fixture.
pub fn want_nodes(fx: &Value) -> BTreeSet<NodeRow> {
    fx["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["digest"].as_str().unwrap().to_string(),
                n["mediaType"].as_str().unwrap().to_string(),
                n["size"].as_i64().unwrap(),
                n["present"].as_bool().unwrap(),
            )
        })
        .collect()
}

pub fn walk_edges(w: &gpb::WalkResponse) -> BTreeSet<EdgeRow> {
    w.edges
        .iter()
        .map(|e| {
            (
                e.from.clone(),
                e.to.clone(),
                e.role.clone(),
                e.index,
                e.media_type.clone(),
                e.size,
                e.platform.clone(),
            )
        })
        .collect()
}

pub fn want_edges(fx: &Value) -> BTreeSet<EdgeRow> {
    fx["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["from"].as_str().unwrap().to_string(),
                e["to"].as_str().unwrap().to_string(),
                e["role"].as_str().unwrap().to_string(),
                e.get("index").and_then(Value::as_u64).unwrap_or(0) as u32,
                e["mediaType"].as_str().unwrap().to_string(),
                e["size"].as_i64().unwrap(),
                platform(e),
            )
        })
        .collect()
}

fn platform(v: &Value) -> String {
    match v.get("platform") {
        Some(p) => {
            let mut s = format!(
                "{}/{}",
                p["os"].as_str().unwrap(),
                p["architecture"].as_str().unwrap()
            );
            if let Some(var) = p.get("variant").and_then(Value::as_str) {
                s.push('/');
                s.push_str(var);
            }
            s
        }
        None => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn graph_of_real_images_matches_the_reference() {
    let Some((dir, _keep)) = fixtures() else {
        return;
    };
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    let files = blob_files(&dir);
    let d = Daemon::start();
    let mut c = d.client(Some("fx")).await;
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let mut g =
        gpb::graph_client::GraphClient::with_interceptor(ch, Namespace::new(Some("fx")).unwrap());

    let fixtures = summary["fixtures"].as_array().unwrap();
    // Every present blob of every fixture, children before parents for half of them and
    // parents first for the rest: edges must not depend on arrival order.
    for (i, fx) in fixtures.iter().enumerate() {
        let mut nodes: Vec<&Value> = fx["nodes"].as_array().unwrap().iter().collect();
        if i % 2 == 1 {
            nodes.reverse();
        }
        for n in nodes
            .into_iter()
            .filter(|n| n["present"].as_bool().unwrap())
        {
            let dg = n["digest"].as_str().unwrap();
            put_blob(&mut c, dg, &std::fs::read(&files[dg]).unwrap()).await;
        }
    }

    for fx in fixtures {
        let name = fx["name"].as_str().unwrap();
        let root = fx["root"]["digest"].as_str().unwrap();
        let w = g
            .walk(gpb::DigestRequest {
                digest: root.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(walk_nodes(&w), want_nodes(fx), "{name}: nodes");
        assert_eq!(walk_edges(&w), want_edges(fx), "{name}: edges");
        let absent: Vec<&str> = fx["totals"]["absent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(w.absent, absent, "{name}: absent");

        // A subject makes this root a referrer of it, found in one lookup.
        if let Some(subject) = fx
            .get("subject")
            .and_then(|s| s.get("digest"))
            .and_then(Value::as_str)
        {
            let r = g
                .referrers(gpb::ReferrersRequest {
                    digest: subject.into(),
                    artifact_type: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .referrers;
            assert!(
                r.iter().any(|x| x.digest == root),
                "{name}: referrer of {subject}"
            );
            let at = r
                .iter()
                .find(|x| x.digest == root)
                .unwrap()
                .artifact_type
                .clone();
            let filtered = g
                .referrers(gpb::ReferrersRequest {
                    digest: subject.into(),
                    artifact_type: format!("{at}-other"),
                })
                .await
                .unwrap()
                .into_inner()
                .referrers;
            assert!(
                !filtered.iter().any(|x| x.digest == root),
                "{name}: artifactType filter"
            );
        }
    }

    // Parents: the shared base layer is held by several manifests.
    let base = first_layer(&fixtures[0]);
    let parents = g
        .parents(gpb::DigestRequest {
            digest: base.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .edges;
    assert!(parents.len() >= 4, "base layer parents: {}", parents.len());
    // Another namespace sees nothing of it.
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let mut other = gpb::graph_client::GraphClient::with_interceptor(
        ch,
        Namespace::new(Some("elsewhere")).unwrap(),
    );
    let root = fixtures[0]["root"]["digest"].as_str().unwrap();
    let err = other
        .walk(gpb::DigestRequest {
            digest: root.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

pub async fn put_declared(
    ch: &tonic::transport::Channel,
    ns: &str,
    data: &[u8],
    media_type: &str,
    digest: &str,
    pieces: usize,
) -> Result<gpb::PutResponse, tonic::Status> {
    let mut c = gpb::blobs_client::BlobsClient::with_interceptor(
        ch.clone(),
        Namespace::new(Some(ns)).unwrap(),
    );
    let step = data.len().div_ceil(pieces.max(1)).max(1);
    let mut msgs: Vec<gpb::PutRequest> = data
        .chunks(step)
        .map(|p| gpb::PutRequest {
            data: p.to_vec().into(),
            ..Default::default()
        })
        .collect();
    if msgs.is_empty() {
        msgs.push(Default::default());
    }
    msgs[0].digest = digest.to_string();
    msgs[0].size = data.len() as i64;
    msgs[0].media_type = media_type.to_string();
    c.put(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// The bytes decide how a blob is classified; a media type declared through contentd.v1.Blobs
/// only breaks ties: a manifest declared as a layer (or as an index) still gets its edges, so
/// no client can make another namespace's image lose its layers by mislabelling it.
#[tokio::test(flavor = "multi_thread")]
async fn declared_media_type_decides_classification() {
    let d = Daemon::start();
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let mut graph = gpb::graph_client::GraphClient::with_interceptor(
        ch.clone(),
        Namespace::new(Some("mt")).unwrap(),
    );
    let config = pattern(300, 1);
    let layer = pattern(3000, 2);
    let manifest = |pad: &str| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",{pad}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":300}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":3000}}]}}"#,
            sha(&config),
            sha(&layer)
        )
        .into_bytes()
    };
    let children = |g: &mut gpb::graph_client::GraphClient<_>, dg: String| {
        let mut g = g.clone();
        async move {
            g.children(gpb::DigestRequest { digest: dg })
                .await
                .unwrap()
                .into_inner()
                .edges
        }
    };

    // Declared as a layer: still a manifest, because its bytes say so.
    let as_layer = manifest("");
    let dg = sha(&as_layer).to_string();
    let r = put_declared(
        &ch,
        "mt",
        &as_layer,
        "application/vnd.oci.image.layer.v1.tar",
        &dg,
        3,
    )
    .await
    .unwrap();
    assert!(r.created);
    assert_eq!(r.size, as_layer.len() as i64);
    assert_eq!(children(&mut graph, dg.clone()).await.len(), 2);
    let walk = graph
        .walk(gpb::DigestRequest { digest: dg.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        walk.nodes[0].media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );

    // Declared as a manifest: config and layer edges.
    let as_manifest = manifest(r#""annotations":{"x":"y"},"#);
    let dg = sha(&as_manifest).to_string();
    put_declared(
        &ch,
        "mt",
        &as_manifest,
        "application/vnd.oci.image.manifest.v1+json",
        &dg,
        1,
    )
    .await
    .unwrap();
    let edges = children(&mut graph, dg.clone()).await;
    let roles: Vec<&str> = edges.iter().map(|e| e.role.as_str()).collect();
    assert_eq!(roles, ["config", "layer"]);
    assert_eq!(edges[1].to, sha(&layer).to_string());

    // Declared as an index, but its own mediaType says manifest: the bytes win.
    let contradiction = manifest(r#""annotations":{"z":"1"},"#);
    let cdg = sha(&contradiction).to_string();
    put_declared(
        &ch,
        "mt",
        &contradiction,
        "application/vnd.oci.image.index.v1+json",
        &cdg,
        2,
    )
    .await
    .unwrap();
    assert_eq!(children(&mut graph, cdg).await.len(), 2);

    // Again: nothing is read, created is false.
    let again = put_declared(&ch, "mt", &as_manifest, "", &dg, 1)
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.size, as_manifest.len() as i64);

    // Wrong bytes for the digest: FailedPrecondition naming both, nothing stored, whether
    // the blob came in pieces or in one message (written and committed in one step).
    let wrong = sha(b"something else").to_string();
    for pieces in [2, 1] {
        let e = put_declared(&ch, "mt", &layer, "", &wrong, pieces)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains(&wrong), "{e}");
    }
    let mut c = d.client(Some("mt")).await;
    let info = c
        .info(
            contentd::api::pb::containerd::services::content::v1::InfoRequest {
                digest: wrong.clone(),
            },
        )
        .await;
    assert_eq!(code(info), tonic::Code::NotFound);

    // No digest: InvalidArgument.
    let e = put_declared(&ch, "mt", &layer, "", "", 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
}
