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
    let tmp = tempfile::Builder::new()
        .prefix("contentd-fx")
        .tempdir_in("/tmp")
        .unwrap();
    let out = tmp.path().join("fixtures");
    let st = std::process::Command::new("bash")
        .arg(shared.join("images/make-fixtures.sh"))
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
    Some((out, Some(tmp)))
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
        let got: BTreeSet<(String, String, i64, bool)> = w
            .nodes
            .iter()
            .map(|n| (n.digest.clone(), n.media_type.clone(), n.size, n.present))
            .collect();
        let want: BTreeSet<(String, String, i64, bool)> = fx["nodes"]
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
            .collect();
        assert_eq!(got, want, "{name}: nodes");
        type E = (String, String, String, u32, String, i64, String);
        let got: BTreeSet<E> = w
            .edges
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
            .collect();
        let want: BTreeSet<E> = fx["edges"]
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
            .collect();
        assert_eq!(got, want, "{name}: edges");
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
