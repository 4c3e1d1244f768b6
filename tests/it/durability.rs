//! Restarts, resumes and kill -9: committed blobs are never lost or torn; interrupted ingests
//! resume from what is durable.

use std::sync::{Arc, Mutex};

use contentd::api::pb::containerd::services::content::v1 as pb;
use tonic::Code;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_blobs_and_resumes_ingests() {
    let tmp = tempfile::Builder::new()
        .prefix("contentd-it")
        .tempdir_in("/tmp")
        .unwrap();
    let d = Daemon::start_in(tmp.path());
    let mut c = d.client(Some("persist")).await;
    let blobs: Vec<Vec<u8>> = (0..5)
        .map(|i| pattern(100_000 * (i + 1), 50 + i as u64))
        .collect();
    for (i, b) in blobs.iter().enumerate() {
        write_msgs(
            &mut c,
            vec![commit_msg(&format!("p{i}"), b, &[("n", &i.to_string())])],
        )
        .await[0]
            .as_ref()
            .unwrap();
    }
    let big = pattern(5 << 20, 99);
    let half = (5 << 20) / 2 + 3;
    let r = write_msgs(
        &mut c,
        vec![pb::WriteContentRequest {
            action: 1,
            r#ref: "resume-me".into(),
            total: big.len() as i64,
            data: big[..half].to_vec().into(),
            ..Default::default()
        }],
    )
    .await;
    assert_eq!(r[0].as_ref().unwrap().offset, half as i64);
    drop(c);

    let d = d.restart();
    let mut c = d.client(Some("persist")).await;
    for (i, b) in blobs.iter().enumerate() {
        let info = c
            .info(pb::InfoRequest {
                digest: sha(b).to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.labels["n"], i.to_string());
        assert_eq!(read(&mut c, &sha(b).to_string(), 0, 0).await.unwrap().0, *b);
    }
    // Resume: STAT reports the durable offset and the digest of the bytes so far.
    let st = c
        .status(pb::StatusRequest {
            r#ref: "resume-me".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!((st.offset, st.total), (half as i64, big.len() as i64));
    let r = write_msgs(
        &mut c,
        vec![
            pb::WriteContentRequest {
                r#ref: "resume-me".into(),
                ..Default::default()
            },
            pb::WriteContentRequest {
                action: 1,
                offset: half as i64,
                data: big[half..].to_vec().into(),
                ..Default::default()
            },
            pb::WriteContentRequest {
                action: 2,
                offset: big.len() as i64,
                total: big.len() as i64,
                expected: sha(&big).to_string(),
                ..Default::default()
            },
        ],
    )
    .await;
    assert_eq!(r[0].as_ref().unwrap().digest, sha(&big[..half]).to_string());
    assert_eq!(r[2].as_ref().unwrap().digest, sha(&big).to_string());
    assert_eq!(
        read(&mut c, &sha(&big).to_string(), 0, 0).await.unwrap().0,
        big
    );
}

/// Concurrent large writers, some blobs committed, the daemon killed with SIGKILL mid-stream.
/// After restart every acknowledged commit reads back whole and verified, nothing partial is
/// visible as a blob, and each interrupted ingest resumes (or restarts) to a verified commit.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_during_concurrent_large_writes() {
    const WRITERS: usize = 4;
    const SIZE: usize = 24 << 20;
    let tmp = tempfile::Builder::new()
        .prefix("contentd-it")
        .tempdir_in("/tmp")
        .unwrap();
    let mut d = Daemon::start_in(tmp.path());
    let committed: Arc<Mutex<Vec<String>>> = Arc::default();
    let blobs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..WRITERS * 3)
            .map(|i| pattern(SIZE, 500 + i as u64))
            .collect(),
    );

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (mut c, committed, blobs) = (
            d.client(Some("crash")).await,
            committed.clone(),
            blobs.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for k in 0..3 {
                let i = w * 3 + k;
                let data = &blobs[i];
                let msgs = upload_msgs(&format!("crash-{i}"), data, &[]);
                let n = msgs.len();
                let r = write_msgs(&mut c, msgs).await;
                if r.len() == n && r[n - 1].is_ok() {
                    committed.lock().unwrap().push(sha(data).to_string());
                } else {
                    return;
                }
            }
        }));
    }
    // Kill once some commits are acknowledged and the rest are mid-stream.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while committed.lock().unwrap().len() < WRITERS {
        assert!(
            std::time::Instant::now() < deadline,
            "writers made no progress"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    d.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = committed.lock().unwrap().clone();
    assert!(
        acked.len() >= WRITERS && acked.len() < WRITERS * 3,
        "kill landed mid-run ({} commits)",
        acked.len()
    );

    let d = Daemon::start_in(tmp.path());
    let mut c = d.client(Some("crash")).await;
    for dg in &acked {
        let (got, _) = read(&mut c, dg, 0, 0).await.unwrap();
        assert_eq!(got.len(), SIZE);
        assert_eq!(
            sha(&got).to_string(),
            *dg,
            "committed blob intact and verified"
        );
    }
    // Nothing else is visible as a blob, and no listed blob is torn.
    let listed = list(&mut c, &[]).await.unwrap().concat();
    for info in &listed {
        assert_eq!(info.size, SIZE as i64);
        let i = blobs
            .iter()
            .position(|b| sha(b).to_string() == info.digest)
            .expect("only written blobs");
        assert_eq!(read(&mut c, &info.digest, 0, 0).await.unwrap().0, blobs[i]);
    }
    // Every interrupted ingest resumes from its durable offset and commits verified.
    let statuses = c
        .list_statuses(pb::ListStatusesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .statuses;
    for st in statuses {
        let i: usize = st.r#ref.trim_start_matches("crash-").parse().unwrap();
        let data = &blobs[i];
        let stat = write_msgs(
            &mut c,
            vec![pb::WriteContentRequest {
                r#ref: st.r#ref.clone(),
                ..Default::default()
            }],
        )
        .await;
        let stat = stat[0].as_ref().unwrap();
        let off = stat.offset as usize;
        assert!(off <= SIZE);
        assert_eq!(
            stat.digest,
            sha(&data[..off]).to_string(),
            "resumed hash matches the durable prefix"
        );
        let r = write_msgs(
            &mut c,
            std::iter::once(pb::WriteContentRequest {
                r#ref: st.r#ref.clone(),
                ..Default::default()
            })
            .chain(data[off..].chunks(1 << 20).enumerate().map(|(j, piece)| {
                pb::WriteContentRequest {
                    action: 1,
                    offset: (off + (j << 20)) as i64,
                    data: piece.to_vec().into(),
                    ..Default::default()
                }
            }))
            .chain(std::iter::once(pb::WriteContentRequest {
                action: 2,
                offset: SIZE as i64,
                total: SIZE as i64,
                expected: sha(data).to_string(),
                ..Default::default()
            }))
            .collect(),
        )
        .await;
        match &r[r.len() - 1] {
            Ok(resp) => assert_eq!(resp.digest, sha(data).to_string()),
            Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e}"),
        }
        assert_eq!(
            read(&mut c, &sha(data).to_string(), 0, 0).await.unwrap().0,
            *data
        );
    }
}

/// Bulk chunks skip the WAL; a crash before they are flushed loses them while the ingest
/// record (in the WAL) still counts them. The resumed ingest must start from the bytes that
/// are really stored, with a matching digest, and commit verified.
#[tokio::test(flavor = "multi_thread")]
async fn crash_trims_ingest_to_stored_bytes() {
    let tmp = tempfile::Builder::new()
        .prefix("contentd-it")
        .tempdir_in("/tmp")
        .unwrap();
    let mut d = Daemon::start_in(tmp.path());
    let mut c = d.client(Some("trim")).await;
    let data = pattern(3 << 20, 77);
    let mut msgs = vec![pb::WriteContentRequest {
        r#ref: "t".into(),
        total: data.len() as i64,
        ..Default::default()
    }];
    for (j, piece) in data.chunks(1 << 20).enumerate() {
        msgs.push(pb::WriteContentRequest {
            action: 1,
            offset: (j << 20) as i64,
            data: piece.to_vec().into(),
            ..Default::default()
        });
    }
    let r = write_msgs(&mut c, msgs).await;
    assert_eq!(r.last().unwrap().as_ref().unwrap().offset, 3 << 20);
    drop(c);
    d.kill9();

    let d = Daemon::start_in(tmp.path());
    let mut c = d.client(Some("trim")).await;
    let r = write_msgs(
        &mut c,
        vec![pb::WriteContentRequest {
            r#ref: "t".into(),
            ..Default::default()
        }],
    )
    .await;
    let st = r[0].as_ref().unwrap();
    let off = st.offset as usize;
    assert!(
        off < 3 << 20,
        "unflushed bulk chunks cannot have survived a SIGKILL (offset {off})"
    );
    assert_eq!(st.digest, sha(&data[..off]).to_string());
    let mut msgs = vec![pb::WriteContentRequest {
        r#ref: "t".into(),
        ..Default::default()
    }];
    let mut pos = off;
    for piece in data[off..].chunks(1 << 20) {
        msgs.push(pb::WriteContentRequest {
            action: 1,
            offset: pos as i64,
            data: piece.to_vec().into(),
            ..Default::default()
        });
        pos += piece.len();
    }
    msgs.push(pb::WriteContentRequest {
        action: 2,
        offset: pos as i64,
        total: data.len() as i64,
        expected: sha(&data).to_string(),
        ..Default::default()
    });
    let r = write_msgs(&mut c, msgs).await;
    assert_eq!(
        r.last().unwrap().as_ref().unwrap().digest,
        sha(&data).to_string()
    );
    assert_eq!(
        read(&mut c, &sha(&data).to_string(), 0, 0).await.unwrap().0,
        data
    );
}

/// A filesystem of its own, mounted for one test (tmpfs: needs root, as CI has).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<SmallDisk> {
        let dir = tempfile::Builder::new()
            .prefix("contentd-full")
            .tempdir_in("/tmp")
            .unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }

    /// [`SmallDisk::mount`], saying the test is skipped when it cannot be.
    fn mount_or_skip(bytes: u64) -> Option<SmallDisk> {
        let disk = SmallDisk::mount(bytes);
        if disk.is_none() {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        }
        disk
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Takes every free byte with a file of another program's, as a full disk would.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let p = self.path().join("someone-else");
        let mut f = std::fs::File::create(&p).unwrap();
        let block = vec![0x5au8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let mut small = [0u8; 512];
        small.fill(1);
        while f.write_all(&small).is_ok() {}
        p
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes `data` in 1 MiB messages and commits it; the first error, if any.
async fn try_put(c: &mut Client, r: &str, data: &[u8]) -> Result<(), tonic::Status> {
    let msgs = upload_msgs(r, data, &[("containerd.io/gc.root", "test")]);
    match write_msgs(c, msgs).await.pop().unwrap() {
        Ok(r) => {
            assert_eq!(r.digest, sha(data).to_string());
            Ok(())
        }
        Err(e) => Err(e),
    }
}

async fn reads_back(c: &mut Client, blobs: &[Vec<u8>]) {
    for b in blobs {
        let (got, _) = read(c, &sha(b).to_string(), 0, 0).await.unwrap();
        assert!(got == *b, "blob {} reads back whole", sha(b));
    }
}

/// A real full disk (a 128 MiB filesystem of its own). New bytes are refused with
/// ResourceExhausted before RocksDB meets the end of the disk. When another program takes
/// every byte left, reads go on, deletes and collections still run, and nothing committed is
/// lost; a collection gives back what it collects even then. A daemon killed then comes back
/// on the full disk (for writing with its WAL unflushed, or read-only when not even that
/// fits): it serves every blob, refuses new bytes with a message that says why, and takes
/// writes again by itself once there is room. A kill -9 after that loses nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_bytes_and_loses_nothing() {
    let Some(disk) = SmallDisk::mount_or_skip(128 << 20) else {
        return;
    };
    let flags = ["--gc-grace-secs", "0", "--gc-interval-secs", "0"];
    let mut d = Daemon::start_in_with(disk.path(), &flags);
    let mut c = d.client(Some("full")).await;
    // Writes go on until the reserve (a quarter of this disk) is reached.
    let mut stored = Vec::new();
    let mut refused = None;
    for i in 0..64u64 {
        let b = pattern(4 << 20, 1000 + i);
        match try_put(&mut c, &format!("fill-{i}"), &b).await {
            Ok(()) => stored.push(b),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("a 128 MiB disk cannot take 256 MiB");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("disk_reserve_mib"), "{e}");
    assert!(stored.len() >= 8, "only {} blobs fit", stored.len());
    reads_back(&mut c, &stored).await;

    // Another program takes every byte left.
    let hog = disk.fill();
    reads_back(&mut c, &stored).await;
    let small = pattern(1000, 7);
    let e = try_put(&mut c, "while-full", &small).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    let gone = stored.remove(0);
    c.delete(pb::DeleteContentRequest {
        digest: sha(&gone).to_string(),
    })
    .await
    .expect("a delete fits in the WAL RocksDB set aside");
    let report = gc(&d.client_sock, false).await;
    assert_eq!(report.blobs_swept, 1);
    // The collection gave the blob's bytes back to the disk, with none free to work in.
    let free = contentd::kv::FsSpace::of(disk.path()).unwrap().avail;
    assert!(free >= 4 << 20, "{free} bytes free after collecting 4 MiB");
    reads_back(&mut c, &stored).await;
    // The other program takes that too.
    disk.fill();

    // Killed on the full disk, the daemon comes back and serves everything. Which open it
    // got depends on the few KiB the kill gave back (the WAL's preallocated tail): for
    // writing with the WAL unflushed (new bytes then stop at the reserve), or read-only.
    d.kill9();
    let d = Daemon::start_in_with(disk.path(), &flags);
    let mut c = d.client(Some("full")).await;
    reads_back(&mut c, &stored).await;
    let e = try_put(&mut c, "while-full", &small).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message().contains("read-only") || e.message().contains("disk_reserve_mib"),
        "{e}"
    );

    // Room comes back: writes resume without a restart (a reopen is tried every 5 s), the
    // first of them deletes that make room under the reserve again.
    std::fs::remove_file(&hog).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let more_gone: Vec<Vec<u8>> = stored.drain(..4).collect();
    loop {
        let r = c
            .delete(pb::DeleteContentRequest {
                digest: sha(&more_gone[0]).to_string(),
            })
            .await;
        match r {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(std::time::Instant::now() < deadline, "still refused: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
    for b in &more_gone[1..] {
        c.delete(pb::DeleteContentRequest {
            digest: sha(b).to_string(),
        })
        .await
        .unwrap();
    }
    assert_eq!(gc(&d.client_sock, false).await.blobs_swept, 4);
    try_put(&mut c, "after-full", &small).await.unwrap();
    stored.push(small);
    reads_back(&mut c, &stored).await;

    // A kill -9 now loses nothing committed, before or after the full disk.
    let mut d = d;
    d.kill9();
    let d = Daemon::start_in_with(disk.path(), &flags);
    let mut c = d.client(Some("full")).await;
    reads_back(&mut c, &stored).await;
    let e = c
        .info(pb::InfoRequest {
            digest: sha(&gone).to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "the deleted blob stays deleted: {e}"
    );
}

/// A full disk met at run time, inside RocksDB itself (no reserve, as `disk_reserve_mib = 0`
/// configures): the write that meets it, and every write after it, get ResourceExhausted
/// naming the full disk; reads go on; once there is room again writes resume without a
/// restart, and a kill -9 then loses nothing acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filling_up_at_run_time_stops_writes_until_there_is_room() {
    let Some(disk) = SmallDisk::mount_or_skip(48 << 20) else {
        return;
    };
    let cfg = disk.path().join("c.toml");
    std::fs::write(&cfg, "disk_reserve_mib = 0\n").unwrap();
    let flags = ["--config", cfg.to_str().unwrap()];
    let mut d = Daemon::start_in_with(disk.path(), &flags);
    let mut c = d.client(Some("runtime")).await;
    let blob = pattern(300 << 10, 3);
    try_put(&mut c, "before", &blob).await.unwrap();
    let label = |i: usize| {
        let labels = std::collections::HashMap::from([(format!("n{}", i % 40), "x".repeat(3000))]);
        pb::UpdateRequest {
            info: Some(pb::Info {
                digest: sha(&blob).to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![format!("labels.n{}", i % 40)],
            }),
        }
    };

    // Every label there is, while there is room: the updates below rewrite the record at
    // the same size, so the reserve check (on growth) lets them through to RocksDB.
    for i in 0..40 {
        c.update(label(i)).await.unwrap();
    }
    // Another program takes the disk; label updates (WAL records) run until one meets it.
    let hog = disk.fill();
    let mut refused = None;
    for i in 0..20_000 {
        if let Err(e) = c.update(label(i)).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("a full disk refuses a write at last");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("disk is full"), "{e}");
    let e = c.update(label(0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    reads_back(&mut c, std::slice::from_ref(&blob)).await;

    // Room again: writes resume by themselves.
    std::fs::remove_file(&hog).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Err(e) = c.update(label(1)).await {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        assert!(std::time::Instant::now() < deadline, "still refused: {e}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let after = pattern(200 << 10, 4);
    try_put(&mut c, "after", &after).await.unwrap();

    d.kill9();
    let d = Daemon::start_in_with(disk.path(), &flags);
    let mut c = d.client(Some("runtime")).await;
    reads_back(&mut c, &[blob.clone(), after]).await;
    let info = c
        .info(pb::InfoRequest {
            digest: sha(&blob).to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.labels["n1"], "x".repeat(3000));
}

/// A daemon killed on a full disk whose WAL holds more than the room left (small blobs not
/// yet flushed) comes back open for writing all the same, its WAL kept unflushed: deletes
/// work, and they make the room that lets it flush. Nothing committed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_full_disk_still_takes_the_deletes_that_make_room() {
    let Some(disk) = SmallDisk::mount_or_skip(64 << 20) else {
        return;
    };
    // Room the other program will give back: less than the WAL's blobs take to flush.
    let placeholder = disk.path().join("placeholder");
    std::fs::write(&placeholder, vec![0u8; 1 << 20]).unwrap();
    let flags = ["--gc-grace-secs", "0", "--gc-interval-secs", "0"];
    let mut d = Daemon::start_in_with(disk.path(), &flags);
    let mut c = d.client(Some("wal")).await;
    let blobs: Vec<Vec<u8>> = (0..300).map(|i| pattern(16 << 10, 5000 + i)).collect();
    for (i, b) in blobs.iter().enumerate() {
        try_put(&mut c, &format!("small-{i}"), b).await.unwrap();
    }
    disk.fill();
    d.kill9();
    std::fs::remove_file(&placeholder).unwrap();

    let d = Daemon::start_in_with(disk.path(), &flags);
    let mut c = d.client(Some("wal")).await;
    assert!(
        d.log().contains("open with its WAL unflushed"),
        "the restart needed the open that keeps the WAL: {}",
        d.log()
    );
    let (gone, kept) = blobs.split_at(200);
    for b in gone {
        c.delete(pb::DeleteContentRequest {
            digest: sha(b).to_string(),
        })
        .await
        .expect("a delete is taken after a restart on a full disk");
    }
    gc(&d.client_sock, false).await;
    reads_back(&mut c, kept).await;

    let mut d = d;
    d.kill9();
    let d = Daemon::start_in_with(disk.path(), &flags);
    let mut c = d.client(Some("wal")).await;
    reads_back(&mut c, kept).await;
    for b in gone {
        let e = c
            .info(pb::InfoRequest {
                digest: sha(b).to_string(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::NotFound,
            "a deleted blob stays deleted: {e}"
        );
    }
}

/// Under a low limit on open files (128, soft and hard, as a container or a shell may
/// impose) the daemon keeps working however many files the store has: 300 large blobs
/// committed one by one are a blob file and a table file each, more than the limit, and all
/// of them are written, read back (twice, so files closed meanwhile open again) and served
/// again after a restart under the same limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_more_files_than_the_descriptor_limit_keeps_working() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::unspawned_in(tmp.path());
    d.nofile = Some(128);
    let mut d = d.started();
    let mut c = d.client(Some("default")).await;
    // Larger than what a commit writes through the WAL: each commit flushes its own files.
    let blobs: Vec<Vec<u8>> = (0..300).map(|i| pattern(600 << 10, i)).collect();
    for (i, b) in blobs.iter().enumerate() {
        if let Err(e) = try_put(&mut c, &format!("f{i}"), b).await {
            panic!("blob {i} of {}: {e}", blobs.len());
        }
    }
    reads_back(&mut c, &blobs).await;
    reads_back(&mut c, &blobs).await;
    let files = std::fs::read_dir(d.dir.join("root")).unwrap().count();
    assert!(files > 256, "the store has only {files} files");
    drop(c);
    d = d.restart();
    let mut c = d.client(Some("default")).await;
    reads_back(&mut c, &blobs).await;
}

/// A disk with not one byte free when the daemon starts: neither open for writing fits (each
/// writes a new MANIFEST), so the store opens read-only. Every blob is served, a write is
/// refused with ResourceExhausted saying the store is read-only and why, and once another
/// program frees its file a later write reopens the store for writing, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_on_a_full_disk_serves_read_only_until_there_is_room() {
    let Some(disk) = SmallDisk::mount_or_skip(64 << 20) else {
        return;
    };
    let flags = ["--gc-interval-secs", "0"];
    let mut d = Daemon::start_in_with(disk.path(), &flags);
    let mut c = d.client(Some("ro")).await;
    let stored: Vec<Vec<u8>> = (0..4)
        .map(|i| pattern((1 << 20) + i * 4099, 50 + i as u64))
        .collect();
    for (i, b) in stored.iter().enumerate() {
        try_put(&mut c, &format!("ro-{i}"), b).await.unwrap();
    }
    d.stop();
    let hog = disk.fill();

    let d = Daemon::start_in_with(disk.path(), &flags);
    let mut c = d.client(Some("ro")).await;
    reads_back(&mut c, &stored).await;
    let small = pattern(1000, 9);
    let e = try_put(&mut c, "while-full", &small).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("read-only"), "{e}");
    assert!(e.message().contains("full"), "{e}");

    // Room again: a write reopens the store for writing. Reopens are tried at most every
    // 5 s, and the refused write above was one, so the first writes may still be refused.
    std::fs::remove_file(&hog).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match try_put(&mut c, "after-full", &small).await {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(std::time::Instant::now() < deadline, "still refused: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
    let mut all = stored;
    all.push(small);
    reads_back(&mut c, &all).await;
}
