//! contentd under hostile requests and rotting disks, driven over its sockets: bytes flipped
//! inside RocksDB's blob files, a damaged MANIFEST, lease dates that once stopped the
//! collector, and admin calls from namespaces that may not make them.

use std::process::Command;

use contentd::api::pb::containerd::services::leases::v1 as lpb;
use contentd::api::pb::contentd::v1 as gpb;
use contentd::client::{Namespace, connect_unix};

use crate::harness::*;

/// Every file under `dir` (recursively) whose name ends with `suffix`.
fn files_ending(dir: &std::path::Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_ending(&p, suffix));
        } else if p.to_string_lossy().ends_with(suffix) {
            out.push(p);
        }
    }
    out
}

/// Flips bytes inside the stored copy of `needle` wherever it appears in `files`; returns
/// how many copies were damaged.
fn flip_where(files: &[std::path::PathBuf], needle: &[u8]) -> usize {
    let mut hits = 0;
    for f in files {
        let mut bytes = std::fs::read(f).unwrap();
        let mut i = 0;
        let mut changed = false;
        while let Some(at) = bytes[i..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + i)
        {
            bytes[at + needle.len() / 2] ^= 0xa5;
            hits += 1;
            changed = true;
            i = at + needle.len();
        }
        if changed {
            std::fs::write(f, bytes).unwrap();
        }
    }
    hits
}

/// The way disks fail: with the daemon stopped, bytes inside a BlobDB `.blob` file change.
/// The daemon still starts; a read of the damaged blob is DataLoss (RocksDB's checksum
/// failure, not Internal) and takes it out of service (re-verified and quarantined, so the
/// next read is NotFound and `contentd verify` has nothing left to find); every undamaged
/// blob still reads back whole.
#[tokio::test(flavor = "multi_thread")]
async fn flipped_bytes_in_blob_files_are_data_loss_and_contained() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_in(dir.path());
    let mut c = d.client(Some("rot")).await;
    // Streamed in 1 MiB messages: bytes go without the WAL and are flushed into blob files
    // before the commit.
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| pattern(1_500_000, 40 + i)).collect();
    for b in &blobs {
        put_blob(&mut c, &sha(b).to_string(), b).await;
    }
    drop(c);
    d.stop();
    let blob_files = files_ending(&dir.path().join("root"), ".blob");
    assert!(!blob_files.is_empty(), "no BlobDB files under the root");
    let damaged = flip_where(&blob_files, &blobs[1][1_200_000..1_200_064]);
    assert!(damaged >= 1, "the damaged blob's bytes were not found");

    let d = Daemon::start_in(dir.path());
    let mut c = d.client(Some("rot")).await;
    let bad = sha(&blobs[1]).to_string();
    let e = read(&mut c, &bad, 0, 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DataLoss, "{e}");
    // The operator hears of it once, with the call's method and namespace and the message.
    let failed: Vec<String> = d
        .log()
        .lines()
        .filter(|l| l.contains("call failed"))
        .map(str::to_owned)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    for want in [
        "containerd.services.content.v1.Content/Read",
        "namespace=\"rot\"",
        "DATA_LOSS",
        "damaged data on disk",
    ] {
        assert!(failed[0].contains(want), "{want} not in {}", failed[0]);
    }
    for i in [0, 2] {
        let (got, _) = read(&mut c, &sha(&blobs[i]).to_string(), 0, 0)
            .await
            .unwrap();
        assert!(got == blobs[i], "blob {i} did not read back whole");
    }
    // The failed read had the blob re-verified and quarantined: the next read is a plain
    // NotFound, not the same broken stream.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match read(&mut c, &bad, 0, 0).await {
            Err(e) if e.code() == tonic::Code::NotFound => break,
            r => assert!(
                std::time::Instant::now() < deadline,
                "the damaged blob was not taken out of service: {:?}",
                r.map(|(b, _)| b.len())
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        d.log()
            .contains("damaged blob quarantined after a failed read"),
        "{}",
        d.log()
    );
    let o = Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args(["verify", "--json"])
        .env("CONTENTD_SOCKET", &d.client_sock)
        .env("CONTENTD_NAMESPACE", "rot")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["checked"], 2, "{v}");
    assert!(v["corrupt"].as_array().unwrap().is_empty(), "{v}");
    // The undamaged blobs still read back after the scrub.
    for i in [0, 2] {
        let (got, _) = read(&mut c, &sha(&blobs[i]).to_string(), 0, 0)
            .await
            .unwrap();
        assert!(got == blobs[i]);
    }
}

/// Damaged metadata (the MANIFEST) makes the daemon refuse to start with an error that says
/// what to do; `contentd repair` salvages the directory — RocksDB's repair for the tables,
/// then the chunks in the blob files it would have dropped — and every blob reads back whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_manifest_gets_a_message_and_a_repair() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_in(dir.path());
    let mut c = d.client(Some("meta")).await;
    // Large ones in blob files (streamed), a small one inline in the tables.
    let mut blobs: Vec<Vec<u8>> = (0..3)
        .map(|i| pattern(1_500_000 + i * 1000, 60 + i as u64))
        .collect();
    for b in &blobs {
        put_blob(&mut c, &sha(b).to_string(), b).await;
    }
    let small = pattern(3000, 70);
    put(&mut c, "small", &small).await.unwrap();
    blobs.push(small);
    drop(c);
    d.stop();
    let root = dir.path().join("root");
    let manifests = files_ending(&root, "")
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("MANIFEST-"))
        })
        .collect::<Vec<_>>();
    assert!(!manifests.is_empty());
    for m in &manifests {
        let mut bytes = std::fs::read(m).unwrap();
        for b in bytes.iter_mut().skip(8).take(64) {
            *b ^= 0xff;
        }
        std::fs::write(m, bytes).unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args(["serve", "--root"])
        .arg(&root)
        .arg("--socket")
        .arg(dir.path().join("x.sock"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("contentd repair"), "{err}");

    let o = Command::new(env!("CARGO_BIN_EXE_contentd"))
        .args(["repair", "--json", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)));
    assert!(o.status.success(), "{report}");
    assert_eq!(report["rocksdb_repair"], true, "{report}");
    assert_eq!(
        report["blobs_lost"].as_array().unwrap().len(),
        0,
        "{report}"
    );
    assert_eq!(report["blobs_verified"], 4, "{report}");
    assert!(
        report["chunks_restored"].as_u64().unwrap() >= 18,
        "{report}"
    );
    let d = Daemon::start_in(dir.path());
    let mut c = d.client(Some("meta")).await;
    for b in &blobs {
        let dg = sha(b).to_string();
        let (got, _) = read(&mut c, &dg, 0, 0)
            .await
            .unwrap_or_else(|e| panic!("{dg} after repair: {e}; report {report}"));
        assert!(got == *b, "{dg} served damaged after repair");
    }
}

/// The lease that once stopped garbage collection for good: an expiry in 1700 is refused at
/// creation, and collections keep running.
#[tokio::test(flavor = "multi_thread")]
async fn absurd_lease_dates_are_refused_and_collection_goes_on() {
    let d = Daemon::start();
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let mut leases =
        lpb::leases_client::LeasesClient::with_interceptor(ch, Namespace::new(Some("l")).unwrap());
    for bad in ["1700-01-01T00:00:00Z", "9999-01-01T00:00:00Z", "not a date"] {
        let e = leases
            .create(lpb::CreateRequest {
                id: "x".into(),
                labels: [("containerd.io/gc.expire".to_string(), bad.to_string())].into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e}");
        assert!(e.message().contains("gc.expire"), "{e}");
    }
    // Collections run (the harness unwraps each answer).
    gc(&d.client_sock, false).await;
    gc(&d.client_sock, false).await;
}

/// With `[admin]` configured, admin calls come only from the admin socket or an admin
/// namespace; everyone else gets PermissionDenied, and ordinary calls are untouched.
#[tokio::test(flavor = "multi_thread")]
async fn admin_calls_are_limited_to_the_admin_socket_and_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let admin_sock = dir.path().join("admin.sock");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nsocket = {:?}\nnamespaces = [\"ops\"]\n",
            admin_sock.display().to_string()
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&["--config", cfg.to_str().unwrap()]);
    let gc_client = |sock: std::path::PathBuf, ns: Option<&'static str>| async move {
        let ch = connect_unix(&sock).await.unwrap();
        gpb::gc_client::GcClient::with_interceptor(ch, Namespace::new(ns).unwrap())
    };
    let mut team = gc_client(d.client_sock.clone(), Some("team")).await;
    let e = team
        .run(gpb::RunRequest { dry_run: true })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("admin"), "{e}");
    // Reading the collector's state is not an admin call.
    team.status(gpb::StatusRequest {}).await.unwrap();
    let mut backend = gc_client(d.backend_sock.clone(), None).await;
    let e = backend
        .run(gpb::RunRequest { dry_run: true })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let mut registry = gpb::registry_client::RegistryClient::with_interceptor(
        ch,
        Namespace::new(Some("team")).unwrap(),
    );
    let e = registry
        .pull(gpb::PullRequest {
            reference: "169.254.169.254/latest/meta-data:x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    let mut ops = gc_client(d.client_sock.clone(), Some("ops")).await;
    ops.run(gpb::RunRequest { dry_run: true }).await.unwrap();
    let mut admin = gc_client(admin_sock.clone(), Some("team")).await;
    admin.run(gpb::RunRequest { dry_run: true }).await.unwrap();
    // Content calls from the same namespace still work.
    let mut c = d.client(Some("team")).await;
    put(&mut c, "r", b"ordinary work").await.unwrap();
}

/// CPU time a process has used, in clock ticks (user + system).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A daemon out of descriptors (a limit of 64, and more clients queued than it can take)
/// neither spins nor stops: it uses next to no CPU while it cannot accept, keeps serving the
/// connections it has, and accepts again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_out_of_descriptors_waits_instead_of_spinning() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::unspawned_in(tmp.path());
    d.nofile = Some(64);
    let d = d.started();
    let mut c = d.client(Some("default")).await;
    let data = b"still served".to_vec();
    put(&mut c, "kept", &data).await.unwrap();
    let queued: Vec<_> = (0..80)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.client_sock).unwrap())
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !d.log().contains("cannot accept connections") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let before = cpu_ticks(d.pid());
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let used = cpu_ticks(d.pid()) - before;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        used * 10 < 2 * hz * 2,
        "the daemon used {used} ticks of CPU in 2 s ({hz}/s) while it could not accept"
    );
    let (got, _) = read(&mut c, &sha(&data).to_string(), 0, 0).await.unwrap();
    assert_eq!(got, data);
    drop(queued);
    // Accepted again within the longest pause.
    let mut fresh = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let mut f = d.client(Some("default")).await;
            match read(&mut f, &sha(&data).to_string(), 0, 0).await {
                Ok(_) => return f,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("a new client is served once descriptors are free");
    let (got, _) = read(&mut fresh, &sha(&data).to_string(), 0, 0)
        .await
        .unwrap();
    assert_eq!(got, data);
}
