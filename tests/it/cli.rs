//! The `contentd` command line against a real daemon: the verbs, their exit codes and
//! messages, resumed pushes, and images in and out — checked with tools no one here wrote
//! (skopeo, containerd's ctr) and the shared fixtures.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::graph::{blob_files, fixtures};
use crate::harness::*;
use crate::registry::shared;

fn cli(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args(args)
        .env("CONTENTD_SOCKET", sock)
        .env_remove("CONTENTD_NAMESPACE")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap()
}

fn err(o: &Output) -> (i32, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn verbs_round_trip() {
    let d = Daemon::start();
    let s = &d.client_sock;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    let data = pattern(3 << 20, 5);
    std::fs::write(&file, &data).unwrap();
    let dg = sha(&data).to_string();

    let p = json(&cli(
        s,
        &[
            "push",
            file.to_str().unwrap(),
            "--label",
            "team=a",
            "--json",
        ],
    ));
    assert_eq!(p["digest"], dg.as_str());
    assert_eq!(p["created"], true);
    let again = json(&cli(s, &["push", file.to_str().unwrap(), "--json"]));
    assert_eq!(again["created"], false);

    let ls = json(&cli(s, &["ls", "--json"]));
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["size"], data.len());
    assert_eq!(ls[0]["labels"]["team"], "a");
    let table = ok(&cli(s, &["ls"]));
    assert!(table.starts_with("DIGEST"), "{table}");
    assert!(
        table.contains(&dg) && table.contains("3.0 MiB") && table.contains("team=a"),
        "{table}"
    );

    let part = cli(s, &["cat", &dg, "--offset", "1000", "--length", "5000"]);
    assert_eq!(part.stdout, data[1000..6000]);
    let all = cli(s, &["cat", &dg]);
    assert!(all.stdout == data);

    let l = json(&cli(s, &["label", &dg, "team=", "tier=gold", "--json"]));
    assert_eq!(l["labels"], serde_json::json!({"tier": "gold"}));
    let i = json(&cli(s, &["info", &dg, "--json"]));
    assert_eq!(i["labels"]["tier"], "gold");

    // A reader that goes away (`contentd info … | head -0`) ends the output quietly.
    for args in [&["info", dg.as_str()][..], &["cat", dg.as_str()]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_contentd"))
            .args(args)
            .env("CONTENTD_SOCKET", s)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    // stdin
    let mut child = Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args(["push", "-", "--json"])
        .env("CONTENTD_SOCKET", s)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(v["digest"], sha(b"from stdin\n").to_string());

    // namespaces are separate
    let other = json(&cli(s, &["-n", "other", "ls", "--json"]));
    assert!(other.as_array().unwrap().is_empty());

    // leases, images, gc, status, health
    let lease = ok(&cli(s, &["leases", "create", "--expire-secs", "600"]))
        .trim()
        .to_string();
    let leases = json(&cli(s, &["leases", "ls", "--json"]));
    assert!(
        leases
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["id"] == lease.as_str())
    );
    ok(&cli(s, &["leases", "rm", &lease]));
    let st = json(&cli(s, &["status", "--json"]));
    assert!(st.as_array().unwrap().is_empty());
    assert!(ok(&cli(s, &["health"])).contains("serving"));
    let dry = json(&cli(s, &["gc", "--dry-run", "--json"]));
    assert_eq!(dry["dryRun"], true);
    let e = ok(&cli(s, &["gc", "explain", &dg]));
    assert!(!e.is_empty());

    ok(&cli(s, &["rm", &dg]));
    let (code, msg) = err(&cli(s, &["info", &dg]));
    assert_eq!(code, 4, "{msg}");
}

#[test]
fn errors_have_exit_codes_and_advice() {
    let dir = tempfile::tempdir().unwrap();
    // No daemon: the socket does not exist.
    let (code, msg) = err(&cli(&dir.path().join("none.sock"), &["ls"]));
    assert_eq!(code, 3, "{msg}");
    assert!(
        msg.contains("none.sock") && msg.contains("contentd serve"),
        "{msg}"
    );
    // A stale socket file nobody listens on.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (code, msg) = err(&cli(&stale, &["ls"]));
    assert_eq!(code, 3, "{msg}");

    let d = Daemon::start();
    let s = &d.client_sock;
    let missing = sha(b"never stored").to_string();
    let (code, msg) = err(&cli(s, &["info", &missing]));
    assert_eq!(code, 4, "{msg}");
    assert!(msg.contains("not found"), "{msg}");
    let (code, _) = err(&cli(s, &["cat", &missing]));
    assert_eq!(code, 4);
    let (code, msg) = err(&cli(s, &["info", "sha256:nothex"]));
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("hint:"), "{msg}");
    let (code, msg) = err(&cli(s, &["images", "inspect", "no/such:image"]));
    assert_eq!(code, 4, "{msg}");

    // Not an archive at all.
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, pattern(10_000, 3)).unwrap();
    let (code, msg) = err(&cli(s, &["import", junk.to_str().unwrap()]));
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("not a valid archive"), "{msg}");

    // An OCI archive whose blob does not match its name: DataLoss exit, no image.
    let bad = dir.path().join("bad.tar");
    {
        let claimed = sha(b"the real bytes");
        let mut b = tar::Builder::new(std::fs::File::create(&bad).unwrap());
        let mut add = |p: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, p, data).unwrap();
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{claimed}","size":14,"annotations":{{"org.opencontainers.image.ref.name":"example.com/bad:1"}}}}]}}"#
        );
        add("index.json", index.as_bytes());
        add(
            &format!("blobs/sha256/{}", &claimed.to_string()[7..]),
            b"other bytes!!!",
        );
        b.finish().unwrap();
    }
    let (code, msg) = err(&cli(s, &["import", bad.to_str().unwrap()]));
    assert_eq!(code, 5, "{msg}");
    assert!(msg.contains("do not match"), "{msg}");
    let imgs = json(&cli(s, &["images", "ls", "--json"]));
    assert!(imgs.as_array().unwrap().is_empty(), "{imgs}");
}

#[test]
fn interrupted_push_resumes() {
    let d = Daemon::start();
    let s = &d.client_sock;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big");
    let data = pattern(192 << 20, 9);
    std::fs::write(&file, &data).unwrap();
    let dg = sha(&data).to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args(["push", file.to_str().unwrap()])
        .env("CONTENTD_SOCKET", s)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let r = format!("push-{dg}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let at = loop {
        let st = json(&cli(s, &["status", "--json"]));
        if let Some(o) = st
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["ref"] == r.as_str())
            .and_then(|x| x["offset"].as_i64())
            && o > 0
        {
            break o;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the push finished before it could be interrupted"
        );
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(at < data.len() as i64);
    let o = cli(s, &["push", file.to_str().unwrap()]);
    let out = ok(&o);
    assert_eq!(out.trim(), dg);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(msg.contains("resuming"), "{msg}");
    let back = cli(s, &["cat", &dg]);
    assert!(back.stdout == data, "the resumed blob differs");
}

fn untar(archive: &Path, to: &Path) -> HashMap<String, Vec<u8>> {
    let mut a = tar::Archive::new(std::fs::File::open(archive).unwrap());
    let mut out = HashMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if !e.header().entry_type().is_file() {
            continue;
        }
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut v).unwrap();
        out.insert(p, v);
    }
    let _ = to;
    out
}

/// Fixture archives and layouts in, and out again: same digests, byte-identical blobs, and
/// the exports read by skopeo and imported by containerd.
#[test]
fn import_and_export_round_trip_with_other_tools() {
    let Some((fx, _keep)) = fixtures() else {
        return;
    };
    if !have("skopeo") || !have("ctr") || !have("containerd") {
        return;
    }
    let summary: Value =
        serde_json::from_slice(&std::fs::read(fx.join("summary.json")).unwrap()).unwrap();
    let files = blob_files(&fx);
    let d = Daemon::start();
    let s = &d.client_sock;
    let w = tempfile::tempdir().unwrap();
    let out = |n: &str| w.path().join(n).to_str().unwrap().to_string();

    // OCI archives: the image is the summary's root, under the archive's name.
    for a in summary["archives"].as_array().unwrap() {
        let path = fx.join(a["path"].as_str().unwrap());
        let r = json(&cli(s, &["import", path.to_str().unwrap(), "--json"]));
        let img = &r["images"][0];
        match a["format"].as_str().unwrap() {
            "oci-archive" => {
                assert_eq!(img["name"], a["ref_name"]);
                assert_eq!(img["digest"], a["root"]["digest"]);
            }
            _ => assert_eq!(img["name"], a["repo_tags"][0]),
        }
    }
    // docker-archive: the manifest contentd writes is the one containerd writes (the digests
    // ../shared/images/fixtures.md records for `ctr images import`).
    let imgs = json(&cli(s, &["images", "ls", "--json"]));
    let target = |n: &str| {
        imgs.as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == n)
            .unwrap()["target"]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let single = target("docker.io/fixtures/single:docker");
    assert!(
        single.starts_with("sha256:ba3c0d77") && single.ends_with("8710"),
        "{single}"
    );
    let arm = target("docker.io/fixtures/multi:docker-arm64");
    assert!(
        arm.starts_with("sha256:c1a8acf0") && arm.ends_with("927f"),
        "{arm}"
    );
    // The OCI layout directory: every ref, under a base name.
    let r = json(&cli(
        s,
        &[
            "import",
            fx.join("oci").to_str().unwrap(),
            "--base-name",
            "fx",
            "--json",
        ],
    ));
    assert_eq!(r["images"].as_array().unwrap().len(), 9);

    // Out again as oci-archive: every blob byte-identical to the fixture's.
    for (name, root) in [
        (
            "docker.io/fixtures/single:oci",
            "sha256:135ec7a10da67d145c29249a0308ad5298310d78da2ef736f5ecd28877ae13b1",
        ),
        (
            "fx:multi",
            "sha256:097373911e89a1f19c2b4345d41ad24cda9ab28933fa130163bcad3da389ca34",
        ),
        (
            "fx:multi-v2s2",
            "sha256:394ca2e392f96e4914fac49928a9ccb30eb32a5f3bea464b49c1ecb2fcfdabcd",
        ),
    ] {
        let tarp = out(&format!("{}.tar", &root[7..19]));
        ok(&cli(s, &["export", name, "-o", &tarp]));
        let got = untar(Path::new(&tarp), w.path());
        let index: Value = serde_json::from_slice(&got["index.json"]).unwrap();
        assert_eq!(index["manifests"][0]["digest"], root);
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            name
        );
        let mut blobs = 0;
        for (p, bytes) in &got {
            if let Some(hex) = p.strip_prefix("blobs/sha256/") {
                let dg = format!("sha256:{hex}");
                assert_eq!(sha(bytes).to_string(), dg);
                assert!(
                    std::fs::read(&files[&dg]).unwrap() == *bytes,
                    "{dg} differs"
                );
                blobs += 1;
            }
        }
        assert!(blobs >= 5, "{name}: {blobs} blobs");
        // skopeo reads it and copies it into an OCI layout.
        let policy = out("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        let o = Command::new("skopeo")
            .args(["inspect", "--raw", &format!("oci-archive:{tarp}")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            sha(&o.stdout).to_string(),
            root,
            "skopeo reads the root manifest"
        );
        let o = Command::new("skopeo")
            .args([
                "--policy",
                &policy,
                "copy",
                "-q",
                "--all",
                &format!("oci-archive:{tarp}"),
                &format!("oci:{}:x", out(&format!("copy-{}", &root[7..19]))),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // docker-archive out: the same config and layer files as the archive that came in.
    let dtar = out("single.docker.tar");
    ok(&cli(
        s,
        &[
            "export",
            "docker.io/fixtures/single:docker",
            "--format",
            "docker-archive",
            "-o",
            &dtar,
        ],
    ));
    let got = untar(Path::new(&dtar), w.path());
    let orig = untar(&fx.join("archives/single.docker.tar"), w.path());
    let m: Value = serde_json::from_slice(&got["manifest.json"]).unwrap();
    let om: Value = serde_json::from_slice(&orig["manifest.json"]).unwrap();
    assert_eq!(m[0]["Config"], om[0]["Config"]);
    assert_eq!(m[0]["Layers"], om[0]["Layers"]);
    assert_eq!(m[0]["RepoTags"], om[0]["RepoTags"]);
    for f in m[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .chain([&m[0]["Config"]])
    {
        let f = f.as_str().unwrap();
        assert!(got[f] == orig[f], "{f} differs");
    }

    // containerd imports what contentd exported.
    let shared = shared().expect("shared/ with contentsuite");
    let cdir = out("ctrd");
    let st = Command::new("bash")
        .arg(shared.join("contentsuite/start-containerd.sh"))
        .arg(&cdir)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "start-containerd: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    struct Stop(std::path::PathBuf, String);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new("bash").arg(&self.0).arg(&self.1).output();
        }
    }
    let _stop = Stop(shared.join("contentsuite/stop-containerd.sh"), cdir.clone());
    let sock = format!("{cdir}/containerd.sock");
    for (tarp, name, root) in [
        (
            out("135ec7a10da6.tar"),
            "docker.io/fixtures/single:oci",
            "sha256:135ec7a10da67d145c29249a0308ad5298310d78da2ef736f5ecd28877ae13b1",
        ),
        (
            out("097373911e89.tar"),
            "fx:multi",
            "sha256:097373911e89a1f19c2b4345d41ad24cda9ab28933fa130163bcad3da389ca34",
        ),
        (
            dtar.clone(),
            "docker.io/fixtures/single:docker",
            single.as_str(),
        ),
    ] {
        let o = Command::new("ctr")
            .args([
                "-a",
                &sock,
                "-n",
                "cli",
                "images",
                "import",
                "--no-unpack",
                "--all-platforms",
                &tarp,
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ctr import {tarp}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ls = Command::new("ctr")
            .args(["-a", &sock, "-n", "cli", "images", "ls"])
            .output()
            .unwrap();
        let ls = String::from_utf8_lossy(&ls.stdout).into_owned();
        assert!(
            ls.lines().any(|l| l.starts_with(name) && l.contains(root)),
            "{name} {root} not in:\n{ls}"
        );
    }
}

/// Every verb's flags parse: `bench` once shared `--socket` with the global flag and panicked
/// in clap before doing anything. A short run against a real daemon proves it measures.
#[test]
fn bench_and_simulate_parse_and_run() {
    let d = Daemon::start();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args(["bench", "--large-mib", "2", "--runs", "1", "--small", "8"])
        .args([
            "--ranged-reads",
            "4",
            "--info-calls",
            "16",
            "--json",
            "--endpoint",
        ])
        .arg(format!("contentd={}", d.client_sock.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["target"], "contentd");
    assert!(v[0]["info_under_load_calls"].as_u64().unwrap() > 0, "{v}");
    assert!(v[0]["rss_shared_append_mib"].as_f64().unwrap() > 0.0, "{v}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args(["simulate", "--seed", "3", "--seeds", "2", "--steps", "20"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 seeds from 3 passed"));
}
