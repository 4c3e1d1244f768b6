//! Conformance suite for the content store, run against every `Kv` implementation.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;
use crate::kv::mem::MemKv;
#[cfg(feature = "rocksdb")]
use crate::kv::rocks::{RocksKv, Tuning};
use crate::store::StoreConfig;

fn ns(n: &str) -> Scope {
    Scope::namespace(n).unwrap()
}

fn sha(data: &[u8]) -> Digest {
    Digest::of(Algorithm::Sha256, data)
}

async fn put(store: &Arc<Store>, scope: &Scope, r: &str, data: &[u8]) -> Result<Info> {
    let mut w = store
        .open_writer(scope.clone(), r, data.len() as i64, Some(sha(data)), None)
        .await?;
    w.write(0, data)?;
    w.commit(data.len() as i64, Some(sha(data)), None)
}

/// A store over `kv` that collects unrooted content at once (no grace period).
fn without_grace(kv: Arc<dyn crate::kv::Kv>) -> Arc<Store> {
    Store::open_with(
        kv,
        StoreConfig {
            gc_grace: std::time::Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Opens an ingest, writes `data` and lets the writer go: an upload left unfinished.
async fn leave_ingest(
    store: &Arc<Store>,
    scope: &Scope,
    r: &str,
    lease: Option<&str>,
    data: &[u8],
) {
    let mut w = store
        .open_writer(scope.clone(), r, 0, None, lease.map(String::from))
        .await
        .unwrap();
    w.write(0, data).unwrap();
}

fn read_all(store: &Store, scope: &Scope, d: &Digest) -> Vec<u8> {
    let loc = store.locate(scope, d).unwrap();
    let mut out = Vec::new();
    store
        .read_range(loc.extent, 0, loc.size as u64, |c| {
            out.extend_from_slice(&c);
            Ok(())
        })
        .unwrap();
    out
}

/// Runs `write(0)`, `write(1)`, ... on a thread while `delete` runs here, and returns once
/// the thread has stopped: at its first NotFound (the delete won) or, the update under way
/// when the delete returned being allowed to finish, right after it.
fn race_with_delete(
    mut write: impl FnMut(u32) -> Result<()> + Send + 'static,
    delete: impl FnOnce(),
) {
    let deleted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = deleted.clone();
    let writer = std::thread::spawn(move || {
        for i in 0u32.. {
            if seen.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if let Err(e) = write(i) {
                assert!(e.is(Kind::NotFound), "{e}");
                return;
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_micros(200));
    delete();
    deleted.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
}

/// Every lease resource key starting with `prefix`, read straight from the store.
fn resource_keys(store: &Store, prefix: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    store
        .kv
        .scan(
            Cf::LeaseResources,
            prefix,
            &prefix_end(prefix),
            &mut |k, _| {
                out.push(k.to_vec());
                true
            },
        )
        .unwrap();
    out
}

async fn conformance(store: Arc<Store>) {
    let a = ns("a");
    let b = ns("b");

    // write, read back, info
    let data: Vec<u8> = (0..(3 * CHUNK_SIZE + 5)).map(|i| (i % 253) as u8).collect();
    let info = put(&store, &a, "r1", &data).await.unwrap();
    assert_eq!(info.size, data.len() as i64);
    assert_eq!(read_all(&store, &a, &sha(&data)), data);
    store.verify(&sha(&data)).unwrap();
    assert_eq!(
        store
            .read_extent(store.locate(&a, &sha(&data)).unwrap().extent, 10, 5)
            .unwrap(),
        &data[10..15]
    );
    assert!(store.status(&a, "r1").unwrap_err().is(Kind::NotFound));

    // bytes gathered from odd frames (a fetch, an upload) are stored in whole, aligned
    // chunks, and a write that resumes off a boundary realigns
    let frames: Vec<u8> = (0..(5 * CHUNK_SIZE + 77))
        .map(|i| (i % 241) as u8)
        .collect();
    let d = sha(&frames);
    let mut w = store
        .open_writer(
            a.clone(),
            "gathered",
            frames.len() as i64,
            Some(d.clone()),
            None,
        )
        .await
        .unwrap();
    w.write(0, &frames[..1000]).unwrap();
    let mut g = Gather::new(1000, 1 << 20);
    let mut at = 1000i64;
    for f in frames[1000..].chunks(13_001) {
        if let Some(p) = g.push(f) {
            let n = p.len() as i64;
            w.write_bytes(at, p).unwrap();
            at += n;
        }
    }
    if let Some(p) = g.rest() {
        w.write_bytes(at, p).unwrap();
    }
    w.commit(frames.len() as i64, Some(d.clone()), None)
        .unwrap();
    assert_eq!(read_all(&store, &a, &d), frames);
    let extent = store.locate(&a, &d).unwrap().extent;
    let (lo, hi) = keys::extent_range(extent);
    let mut starts = Vec::new();
    store
        .kv
        .scan(Cf::Chunks, &lo, &hi, &mut |k, v| {
            starts.push((keys::chunk_offset(k).unwrap(), v.len()));
            true
        })
        .unwrap();
    let expect: Vec<(u64, usize)> = [(0, 1000), (1000, CHUNK_SIZE - 1000)]
        .into_iter()
        .chain((1..5).map(|i| ((i * CHUNK_SIZE) as u64, CHUNK_SIZE)))
        .chain([((5 * CHUNK_SIZE) as u64, 77)])
        .collect();
    assert_eq!(starts, expect);

    // namespaces isolate visibility
    assert!(store.info(&b, &sha(&data)).unwrap_err().is(Kind::NotFound));
    // committing the same bytes again in the same namespace: AlreadyExists
    let err = put(&store, &a, "r2", &data).await.unwrap_err();
    assert!(err.is(Kind::AlreadyExists), "{err}");

    // a shared ingest links without a re-upload
    let mut w = store
        .open_writer(b.clone(), "r1", data.len() as i64, Some(sha(&data)), None)
        .await
        .unwrap();
    let st = w.status().unwrap();
    assert_eq!(
        (st.offset, st.total),
        (data.len() as i64, data.len() as i64)
    );
    assert_eq!(st.digest, sha(&data));
    w.commit(data.len() as i64, Some(sha(&data)), None).unwrap();
    assert_eq!(store.info(&b, &sha(&data)).unwrap().size, data.len() as i64);

    // delete in one namespace keeps the bytes for the other
    assert!(store.delete(&a, &sha(&data)).unwrap());
    assert!(!store.delete(&a, &sha(&data)).unwrap());
    assert_eq!(read_all(&store, &b, &sha(&data)), data);
    let loc = store.locate(&b, &sha(&data)).unwrap();
    assert!(store.delete(&b, &sha(&data)).unwrap());
    assert!(
        store.read_extent(loc.extent, 0, 10).is_ok(),
        "bytes stay until the collector runs"
    );
    // A dry run reports exactly what the run then removes.
    let dry = store.collect(true).unwrap();
    assert!(
        store.read_extent(loc.extent, 0, 10).is_ok(),
        "a dry run removes nothing"
    );
    let run = store.collect(false).unwrap();
    assert_eq!(dry.swept, run.swept);
    assert_eq!(
        (dry.blobs_swept, dry.bytes_swept),
        (run.blobs_swept, run.bytes_swept)
    );
    assert!(run.swept.contains(&sha(&data)));
    assert!(
        store
            .read_extent(loc.extent, 0, 10)
            .unwrap_err()
            .is(Kind::DataLoss),
        "bytes go once nothing links or reaches the blob"
    );

    // write rules: gap, restart at zero, resume across writers
    let mut w = store
        .open_writer(a.clone(), "w", 0, None, None)
        .await
        .unwrap();
    assert!(w.write(5, b"abc").unwrap_err().is(Kind::OutOfRange));
    w.write(0, b"hello world").unwrap();
    w.write(11, b"!!").unwrap();
    w.write(0, b"xy").unwrap();
    assert_eq!(w.status().unwrap().digest, sha(b"xy"));
    drop(w);
    let mut w = store
        .open_writer(a.clone(), "w", 0, None, None)
        .await
        .unwrap();
    assert_eq!(w.status().unwrap().offset, 2);
    w.write(2, b"z").unwrap();
    // size and digest mismatches keep the ingest
    assert!(
        w.commit(99, None, None)
            .unwrap_err()
            .is(Kind::FailedPrecondition)
    );
    assert!(
        w.commit(3, Some(sha(b"nope")), None)
            .unwrap_err()
            .is(Kind::FailedPrecondition)
    );
    w.flush().unwrap();
    assert_eq!(store.status(&a, "w").unwrap().offset, 3);
    let info = w
        .commit(
            3,
            Some(sha(b"xyz")),
            Some(HashMap::from([("k".into(), "v".into())])),
        )
        .unwrap();
    assert_eq!(info.labels["k"], "v");

    // sha512 commits rehash with the expected algorithm
    let mut w = store
        .open_writer(a.clone(), "w512", 0, None, None)
        .await
        .unwrap();
    w.write(0, b"sha512 content").unwrap();
    let d512 = Digest::of(Algorithm::Sha512, b"sha512 content");
    assert_eq!(w.commit(0, Some(d512.clone()), None).unwrap().digest, d512);
    store.verify(&d512).unwrap();

    // one live writer per ref
    let w = store
        .open_writer(a.clone(), "locked", 0, None, None)
        .await
        .unwrap();
    let err = store
        .open_writer(a.clone(), "locked", 0, None, None)
        .await
        .err()
        .unwrap();
    assert!(err.is(Kind::Unavailable), "{err}");
    drop(w);
    assert!(
        store
            .open_writer(a.clone(), "locked", 0, None, None)
            .await
            .is_ok()
    );
    assert!(store.abort(&a, "locked").await.unwrap());
    assert!(!store.abort(&a, "locked").await.unwrap());

    // labels: masks, limits
    let d = sha(b"xyz");
    let i = store
        .update(
            &a,
            &d,
            HashMap::from([("x".into(), "1".into())]),
            &["labels.x".into()],
        )
        .unwrap();
    assert_eq!(i.labels.len(), 2);
    let i = store
        .update(&a, &d, HashMap::new(), &["labels.k".into()])
        .unwrap();
    assert_eq!(i.labels.keys().collect::<Vec<_>>(), vec!["x"]);
    assert!(
        store
            .update(&a, &d, HashMap::new(), &["size".into()])
            .unwrap_err()
            .is(Kind::InvalidArgument)
    );
    let huge = HashMap::from([("k".to_string(), "v".repeat(MAX_LABEL_BYTES))]);
    assert!(
        store
            .update(&a, &d, huge, &[])
            .unwrap_err()
            .is(Kind::InvalidArgument)
    );
    let i = store.update(&a, &d, HashMap::new(), &[]).unwrap();
    assert!(i.labels.is_empty());

    // list with filters and pagination
    for n in 0..7u8 {
        put(&store, &ns("l"), &format!("l{n}"), &[n; 10])
            .await
            .unwrap();
    }
    let all = Filter::default();
    assert_eq!(store.list(&ns("l"), &all, None, 100).unwrap().len(), 7);
    let first = store.list(&ns("l"), &all, None, 3).unwrap();
    let rest = store
        .list(&ns("l"), &all, Some(&first[2].digest), 100)
        .unwrap();
    assert_eq!((first.len(), rest.len()), (3, 4));
    let f = Filter::parse_all(&[format!("digest=={}", sha(&[4; 10]))]).unwrap();
    assert_eq!(store.list(&ns("l"), &f, None, 100).unwrap().len(), 1);
    let f = Filter::parse_all(&["ref~=^l[0-2]$"]).unwrap();
    leave_ingest(&store, &ns("l"), "l9", None, b"pending").await;
    assert_eq!(
        store
            .list_statuses(&ns("l"), &Filter::default())
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.list_statuses(&ns("l"), &f).unwrap().len(), 0);

    // tenants: any blob is visible and becomes held; delete releases only the hold
    let t1 = Scope::tenant("t1").unwrap();
    let t2 = Scope::tenant("t2").unwrap();
    let shared = b"tenant data".to_vec();
    put(&store, &t1, "x", &shared).await.unwrap();
    assert!(store.list(&t2, &all, None, 100).unwrap().is_empty());
    store.info(&t2, &sha(&shared)).unwrap();
    assert_eq!(store.list(&t2, &all, None, 100).unwrap().len(), 1);
    assert!(
        put(&store, &t2, "y", &shared)
            .await
            .unwrap_err()
            .is(Kind::AlreadyExists)
    );
    assert!(store.delete(&t1, &sha(&shared)).unwrap());
    assert_eq!(read_all(&store, &t2, &sha(&shared)), shared);
    assert_eq!(store.owners(&sha(&shared)).unwrap(), vec![t2.clone()]);

    // an image delete is never undone by a label update racing it (the registry records a
    // mirrored tag's use that way while a client deletes the tag)
    let target = put(&store, &a, "img-target", b"{}").await.unwrap();
    for round in 0..50 {
        let name = format!("raced-{round}");
        let img = ImageRecord {
            name: name.clone(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: target.digest.to_string(),
            size: target.size,
            ..Default::default()
        };
        store.create_image(&a, img).unwrap();
        let (s2, a2, n2) = (store.clone(), a.clone(), name.clone());
        race_with_delete(
            move |i| {
                let update = ImageRecord {
                    name: n2.clone(),
                    labels: HashMap::from([("used".to_string(), i.to_string())]),
                    ..Default::default()
                };
                s2.update_image(&a2, update, &["labels.used".to_string()])
                    .map(|_| ())
            },
            || store.delete_image(&a, &name).unwrap(),
        );
        assert!(
            store.image(&a, &name).unwrap_err().is(Kind::NotFound),
            "round {round}: the deleted image came back"
        );
    }

    // label updates of different keys racing on one blob all land (none is lost to a
    // read-modify-write that started before another's write)
    let labelled = put(&store, &a, "labelled", b"labelled")
        .await
        .unwrap()
        .digest;
    let writers: Vec<_> = ["x", "y"]
        .into_iter()
        .map(|key| {
            let (s2, a2, d2) = (store.clone(), a.clone(), labelled.clone());
            std::thread::spawn(move || {
                for i in 0..200 {
                    let labels = HashMap::from([(key.to_string(), i.to_string())]);
                    s2.update(&a2, &d2, labels, &[format!("labels.{key}")])
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let labels = store.info(&a, &labelled).unwrap().labels;
    assert_eq!(
        (labels.get("x"), labels.get("y")),
        (Some(&"199".to_string()), Some(&"199".to_string())),
        "a label update was lost"
    );

    // a lease delete racing resource adds leaves no resource behind it, and a lease created
    // again with that id starts empty
    for round in 0..30 {
        let id = format!("raced-lease-{round}");
        store.create_lease(&a, &id, HashMap::new()).unwrap();
        let (s2, a2, id2) = (store.clone(), a.clone(), id.clone());
        race_with_delete(
            move |i| {
                let d = sha(&i.to_be_bytes()).to_string();
                s2.add_lease_resource(&a2, &id2, "content", &d)
            },
            || store.delete_lease(&a, &id).unwrap(),
        );
        let left = resource_keys(&store, &keys::resource_prefix(&a, &id)).len();
        assert_eq!(left, 0, "round {round}: resources outlived their lease");
    }
    // a commit under a lease deleted meanwhile fails (as containerd's does), leaves no
    // resource, and the ingest stays for a retry without the lease
    store.create_lease(&a, "short", HashMap::new()).unwrap();
    let body = b"committed after its lease went".to_vec();
    let mut w = store
        .open_writer(a.clone(), "short-lived", 0, None, Some("short".into()))
        .await
        .unwrap();
    w.write(0, &body).unwrap();
    store.delete_lease(&a, "short").unwrap();
    let e = w
        .commit(body.len() as i64, Some(sha(&body)), None)
        .unwrap_err();
    assert!(e.is(Kind::NotFound) && e.message().contains("short"), "{e}");
    drop(w);
    assert_eq!(
        store.status(&a, "short-lived").unwrap().offset,
        body.len() as i64
    );
    let mut w = store
        .open_writer(a.clone(), "short-lived", 0, None, None)
        .await
        .unwrap();
    w.commit(body.len() as i64, Some(sha(&body)), None).unwrap();
    assert_eq!(read_all(&store, &a, &sha(&body)), body);
    // (the ingest's own resource, queued at open, may outlive the lease: it holds nothing,
    // the next collection drops it, see `expire_ingests`, and a new lease of that id does
    // not inherit it)
    let p = keys::resource_prefix(&a, "short");
    let content = resource_keys(&store, &p)
        .iter()
        .filter(|k| k[p.len()..].starts_with(b"content\0"))
        .count();
    assert_eq!(
        content, 0,
        "the commit left a resource under a deleted lease"
    );
    // (a resource left by an older version or a raced ingest open is not inherited)
    let mut b = Batch::new();
    b.put(
        Cf::LeaseResources,
        keys::resource_key(&a, "reborn", "content", &sha(b"old").to_string()),
        Vec::new(),
    );
    store.kv.write(b, true).unwrap();
    store.create_lease(&a, "reborn", HashMap::new()).unwrap();
    assert!(store.list_lease_resources(&a, "reborn").unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_mem_kv() {
    conformance(Store::open(Arc::new(MemKv::default())).unwrap()).await;
}

#[cfg(feature = "rocksdb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_rocksdb() {
    let dir = tempfile::tempdir().unwrap();
    conformance(
        Store::open(Arc::new(
            RocksKv::open(dir.path(), &Tuning::default()).unwrap(),
        ))
        .unwrap(),
    )
    .await;
}

#[cfg(feature = "rocksdb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_resumes_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = ns("a");
    let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 100))
        .map(|i| (i * 7 % 255) as u8)
        .collect();
    {
        let store = Store::open(Arc::new(
            RocksKv::open(dir.path(), &Tuning::default()).unwrap(),
        ))
        .unwrap();
        let mut w = store
            .open_writer(a.clone(), "resume", data.len() as i64, None, None)
            .await
            .unwrap();
        w.write(0, &data[..CHUNK_SIZE + 7]).unwrap();
    }
    let store = Store::open(Arc::new(
        RocksKv::open(dir.path(), &Tuning::default()).unwrap(),
    ))
    .unwrap();
    let mut w = store
        .open_writer(a.clone(), "resume", 0, None, None)
        .await
        .unwrap();
    let st = w.status().unwrap();
    assert_eq!(st.offset, (CHUNK_SIZE + 7) as i64);
    assert_eq!(st.total, data.len() as i64);
    assert_eq!(st.digest, sha(&data[..CHUNK_SIZE + 7]));
    w.write(st.offset, &data[CHUNK_SIZE + 7..]).unwrap();
    w.commit(0, Some(sha(&data)), None).unwrap();
    store.verify(&sha(&data)).unwrap();
    // a fresh extent after reopen never collides with a stored one
    let mut w = store
        .open_writer(a.clone(), "after", 0, None, None)
        .await
        .unwrap();
    w.write(0, b"new").unwrap();
    w.commit(0, None, None).unwrap();
    assert_eq!(read_all(&store, &a, &sha(&data)), data);
}

/// containerd's client uploads a small blob as STAT, WRITE, COMMIT on one stream. The WRITE
/// of a new ingest is answered from memory: Status shows it, nothing is stored until the
/// COMMIT's one batch, and a stream that ends without committing stores what it held, so
/// the ingest resumes where the client was told it stood.
#[tokio::test]
async fn a_small_new_upload_is_held_until_its_commit() {
    let kv = Arc::new(MemKv::default());
    let store = Store::open(kv.clone()).unwrap();
    let a = ns("a");
    let req = |action, offset: i64, data: &[u8]| WriteRequest {
        action: Some(action),
        offset,
        total: 10,
        expected: None,
        data: bytes::Bytes::copy_from_slice(data),
        labels: None,
    };
    let stored = |r: &str| kv.get(Cf::Ingests, &ingest_key(&a, r)).unwrap();
    let open = |r: &'static str, expected: &[u8]| {
        WriteSession::start(
            &store,
            a.clone(),
            r,
            10,
            Some(sha(expected)),
            None,
            req(WriteAction::Stat, 0, b""),
        )
    };

    let (mut s, _) = open("r1", b"helloworld").await.unwrap();
    let write = req(WriteAction::Write, 0, b"hello");
    assert!(s.in_memory(&write));
    assert_eq!(s.step_in_memory(write).unwrap().offset, 5);
    assert!(stored("r1").is_none(), "a held WRITE stores nothing");
    assert!(s.has_queued());
    assert_eq!(store.status(&a, "r1").unwrap().offset, 5);
    // Held bytes are part of the commit's batch, and verified with it.
    let write = req(WriteAction::Write, 5, b"world");
    assert!(s.in_memory(&write));
    s.step_in_memory(write).unwrap();
    let commit = req(WriteAction::Commit, 10, b"");
    assert!(!s.in_memory(&commit));
    let r = s.step(commit).unwrap();
    assert_eq!(r.digest, sha(b"helloworld"));
    assert!(stored("r1").is_none());
    store.verify(&sha(b"helloworld")).unwrap();

    // A stream that ends between WRITE and COMMIT stores what it held.
    let (mut s, _) = open("r2", b"hello, you").await.unwrap();
    s.step_in_memory(req(WriteAction::Write, 0, b"hello"))
        .unwrap();
    drop(s);
    let rec = IngestRecord::decode(&stored("r2").unwrap()[..]).unwrap();
    assert_eq!(rec.offset, 5);
    let reopened = Store::open(kv.clone()).unwrap();
    assert_eq!(reopened.status(&a, "r2").unwrap().offset, 5);

    // Only a new ingest's first HOLD bytes are held, and only appends.
    let (s, _) = WriteSession::start(
        &reopened,
        a.clone(),
        "r2",
        10,
        None,
        None,
        req(WriteAction::Stat, 0, b""),
    )
    .await
    .unwrap();
    assert!(
        !s.in_memory(&req(WriteAction::Write, 5, b"world")),
        "r2 is stored"
    );
    drop(s);
    let (s, _) = open("r3", b"").await.unwrap();
    assert!(!s.in_memory(&req(WriteAction::Write, 1, b"x")));
    assert!(!s.in_memory(&req(WriteAction::Write, 0, &vec![0; ingest::HOLD + 1])));
    assert!(s.in_memory(&req(WriteAction::Write, 0, &vec![0; ingest::HOLD])));
    drop(s);

    // A restart at offset 0 drops what was held: none of it outlives the ingest.
    let chunks = || {
        let mut n = 0;
        kv.scan(Cf::Chunks, &[], &[], &mut |_, _| {
            n += 1;
            true
        })
        .unwrap();
        n
    };
    let held = || store.held_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let before = chunks();
    let (mut s, _) = open("r4", b"xyz").await.unwrap();
    s.step_in_memory(req(WriteAction::Write, 0, b"hello"))
        .unwrap();
    assert_eq!(held(), 5);
    let unknown_total = |action, offset, data: &[u8]| WriteRequest {
        total: 0,
        ..req(action, offset, data)
    };
    let restart = unknown_total(WriteAction::Write, 0, b"xy");
    assert!(!s.in_memory(&restart));
    s.step(restart).unwrap();
    assert_eq!(held(), 0);
    s.step(WriteRequest {
        total: 3,
        ..req(WriteAction::Commit, 2, b"z")
    })
    .unwrap();
    assert_eq!(
        chunks(),
        before + 2,
        "the committed blob's two chunks, nothing else"
    );
    assert_eq!(read_all(&store, &a, &sha(b"xyz")), b"xyz");
    // Held bytes are counted until stored, whichever way that happens.
    let (mut s, _) = open("r5", b"abc").await.unwrap();
    s.step_in_memory(req(WriteAction::Write, 0, b"ab")).unwrap();
    assert_eq!(held(), 2);
    drop(s);
    assert_eq!(held(), 0);
}

/// A new ingest is stored with its first bytes, not at open: opening one writes nothing, yet
/// Status and ListStatuses show it; its first write stores the record and the bytes together;
/// a restart forgets an ingest that never got a byte and resumes one that did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ingest_is_stored_with_its_first_bytes() {
    let kv = Arc::new(MemKv::default());
    let store = Store::open(kv.clone()).unwrap();
    let (a, b) = (ns("a"), ns("b"));
    let names = |store: &Store| -> Vec<(String, i64, i64)> {
        let mut v: Vec<_> = store
            .list_statuses(&a, &Filter::default())
            .unwrap()
            .into_iter()
            .map(|s| (s.reference, s.offset, s.total))
            .collect();
        v.sort();
        v
    };
    let mut w = store
        .open_writer(a.clone(), "r1", 10, None, None)
        .await
        .unwrap();
    w.flush().unwrap();
    assert!(!w.has_queued());
    assert!(
        kv.get(Cf::Ingests, &ingest_key(&a, "r1"))
            .unwrap()
            .is_none()
    );
    assert_eq!(store.status(&a, "r1").unwrap().total, 10);
    assert_eq!(names(&store), [("r1".to_string(), 0, 10)]);
    assert!(store.status(&b, "r1").unwrap_err().is(Kind::NotFound));
    assert!(
        store
            .list_statuses(&b, &Filter::default())
            .unwrap()
            .is_empty()
    );
    // Let go and taken again: the same ingest, still shown while it waits.
    drop(w);
    assert_eq!(names(&store), [("r1".to_string(), 0, 10)]);
    let mut w = store
        .open_writer(a.clone(), "r1", 10, None, None)
        .await
        .unwrap();
    w.write(0, b"hello").unwrap();
    w.flush().unwrap();
    let stored = kv.get(Cf::Ingests, &ingest_key(&a, "r1")).unwrap().unwrap();
    assert_eq!(IngestRecord::decode(&stored[..]).unwrap().offset, 5);
    assert_eq!(names(&store), [("r1".to_string(), 5, 10)]);
    drop(w);
    let w2 = store
        .open_writer(a.clone(), "r2", 0, None, None)
        .await
        .unwrap();
    drop(w2);
    assert_eq!(names(&store).len(), 2);

    let store = Store::open(kv.clone()).unwrap();
    assert_eq!(names(&store), [("r1".to_string(), 5, 10)]);
    assert!(store.status(&a, "r2").unwrap_err().is(Kind::NotFound));
    let mut w = store
        .open_writer(a.clone(), "r1", 10, None, None)
        .await
        .unwrap();
    w.write(5, b"world").unwrap();
    let info = w.commit(10, Some(sha(b"helloworld")), None).unwrap();
    assert_eq!(info.size, 10);
    // An ingest committed with no bytes of its own (the empty blob) leaves nothing behind.
    let mut w = store
        .open_writer(a.clone(), "empty", 0, None, None)
        .await
        .unwrap();
    w.commit(0, Some(sha(b"")), None).unwrap();
    assert!(names(&store).is_empty());
    assert!(
        kv.get(Cf::Ingests, &ingest_key(&a, "empty"))
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unleased_ingests_expire_and_leased_ones_stay() {
    let store = Store::open_with(
        Arc::new(MemKv::default()),
        StoreConfig {
            gc_grace: std::time::Duration::ZERO,
            ingest_expiry: std::time::Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap();
    let a = ns("a");
    store.create_lease(&a, "keep", HashMap::new()).unwrap();
    leave_ingest(&store, &a, "loose", None, b"abandoned").await;
    leave_ingest(&store, &a, "held", Some("keep"), b"leased").await;
    // A resource whose lease is gone (an ingest opened as its lease was deleted) holds
    // nothing.
    leave_ingest(&store, &a, "orphan", None, b"orphaned").await;
    let mut b = Batch::new();
    b.put(
        Cf::LeaseResources,
        keys::resource_key(&a, "gone", "ingests", "orphan"),
        Vec::new(),
    );
    store.kv.write(b, true).unwrap();
    // A live writer is never expired under it.
    let mut live = store
        .open_writer(a.clone(), "live", 0, None, None)
        .await
        .unwrap();
    live.write(0, b"busy").unwrap();
    live.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let dry = store.collect(true).unwrap();
    assert_eq!(dry.ingests_expired, 2);
    assert!(store.status(&a, "loose").is_ok(), "a dry run drops nothing");
    let r = store.collect(false).unwrap();
    assert_eq!(r.ingests_expired, 2);
    assert!(store.status(&a, "loose").unwrap_err().is(Kind::NotFound));
    assert!(store.status(&a, "orphan").unwrap_err().is(Kind::NotFound));
    assert_eq!(store.status(&a, "held").unwrap().offset, 6);
    // The orphaned resource itself is gone; the kept lease's is not.
    let resources = resource_keys(&store, b"");
    assert_eq!(
        resources,
        vec![keys::resource_key(&a, "keep", "ingests", "held")]
    );
    live.write(4, b"!").unwrap();
    live.commit(0, None, None).unwrap();
}

#[cfg(feature = "rocksdb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_gives_the_disk_space_of_swept_blobs_back() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(RocksKv::open(dir.path(), &Tuning::default()).unwrap());
    let store = without_grace(kv.clone());
    let a = ns("a");
    let blob = |seed: u32| -> Vec<u8> {
        (0..24u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
            .collect()
    };
    let (gone, kept) = (blob(1), blob(2));
    put(&store, &a, "gone", &gone).await.unwrap();
    put(&store, &a, "kept", &kept).await.unwrap();
    let root = HashMap::from([("containerd.io/gc.root".to_string(), "now".to_string())]);
    store.update(&a, &sha(&kept), root, &[]).unwrap();
    assert!(store.delete(&a, &sha(&gone)).unwrap());
    // Both blobs in blob files (a commit may leave some of its bytes in the memtable).
    kv.flush(Cf::Chunks).unwrap();
    let before = kv.disk_usage();
    assert!(before >= 48 << 20, "{before} bytes on disk");
    std::thread::sleep(std::time::Duration::from_millis(5));
    let r = store.collect(false).unwrap();
    assert_eq!(r.blobs_swept, 1, "{r:?}");
    // No later write is needed for the swept blob's files to go.
    let after = kv.disk_usage();
    assert!(
        after + (20 << 20) <= before,
        "{before} bytes on disk before the collection, {after} after"
    );
    assert_eq!(read_all(&store, &a, &sha(&kept)), kept);
    store.verify(&sha(&kept)).unwrap();

    // An aborted upload's bytes go with the next collection too.
    let mut w = store
        .open_writer(a.clone(), "aborted", 0, None, None)
        .await
        .unwrap();
    w.write(0, &gone).unwrap();
    w.flush().unwrap();
    drop(w);
    kv.flush(Cf::Chunks).unwrap();
    let before = kv.disk_usage();
    assert!(store.abort(&a, "aborted").await.unwrap());
    store.collect(false).unwrap();
    let after = kv.disk_usage();
    assert!(
        after + (20 << 20) <= before,
        "{before} bytes on disk before the abort and collection, {after} after"
    );
    assert_eq!(read_all(&store, &a, &sha(&kept)), kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_bytes_stop_short_of_the_disk_reserve_and_deletes_go_on() {
    let kv = Arc::new(MemKv::default());
    let store = without_grace(kv.clone());
    let a = ns("a");
    let mib = 1u64 << 20;
    put(&store, &a, "before", b"stored while there was room")
        .await
        .unwrap();
    // A 10 GiB disk with the default reserve (128 MiB) and 10 bytes more free.
    kv.set_disk_space(Some((128 * mib + 10, 10 << 30)));
    let e = put(&store, &a, "big", &[1u8; 11]).await.unwrap_err();
    assert!(e.is(Kind::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("disk_reserve_mib"), "{e}");
    put(&store, &a, "fits", &[2u8; 10]).await.unwrap();
    // Metadata is new bytes too: a label, an image or a lease that would grow into the
    // reserve is refused; one that shrinks a record goes through.
    let fits = sha(&[2u8; 10]);
    let label = |v: &str| HashMap::from([("k".to_string(), v.to_string())]);
    kv.set_disk_space(Some((128 * mib + 100, 10 << 30)));
    store
        .update(&a, &fits, label(&"x".repeat(50)), &[])
        .unwrap();
    kv.set_disk_space(Some((128 * mib, 10 << 30)));
    let e = store
        .update(&a, &fits, label(&"x".repeat(51)), &[])
        .unwrap_err();
    assert!(e.is(Kind::ResourceExhausted), "{e}");
    store.update(&a, &fits, label("short"), &[]).unwrap();
    let img = ImageRecord {
        name: "full".into(),
        digest: fits.to_string(),
        size: 10,
        media_type: "application/octet-stream".into(),
        ..Default::default()
    };
    let e = store.create_image(&a, img.clone()).unwrap_err();
    assert!(e.is(Kind::ResourceExhausted), "{e}");
    let e = store.create_lease(&a, "full", HashMap::new()).unwrap_err();
    assert!(e.is(Kind::ResourceExhausted), "{e}");
    kv.set_disk_space(Some((128 * mib + 10, 10 << 30)));
    // Nothing of the refused write was stored, and deleting and collecting still work.
    assert_eq!(store.status(&a, "big").unwrap().offset, 0);
    assert!(
        store
            .delete(&a, &sha(b"stored while there was room"))
            .unwrap()
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert!(store.collect(false).unwrap().blobs_swept >= 1);
    // On a small filesystem the reserve is a quarter of it: 25 MiB of 100.
    kv.set_disk_space(Some((26 * mib, 100 * mib)));
    put(&store, &a, "small-disk", &[3u8; 4096]).await.unwrap();
    kv.set_disk_space(Some((24 * mib, 100 * mib)));
    let e = put(&store, &a, "small-disk-full", &[4u8; 4096])
        .await
        .unwrap_err();
    assert!(e.is(Kind::ResourceExhausted), "{e}");
}

/// A collection whose marks do not fit its memory budget (a table of seven, so nearly every
/// walk spills to disk and the runs are merged again and again) sweeps exactly what one
/// held in memory sweeps, and keeps what writers root while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_past_the_memory_budget_go_to_disk_and_sweep_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let open = |gc_mark_memory: usize| {
        Store::open_with(
            Arc::new(MemKv::default()),
            StoreConfig {
                gc_grace: std::time::Duration::ZERO,
                gc_mark_memory,
                scratch_dir: Some(dir.path().into()),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let (small, big) = (open(0), open(64 << 20));
    let mut kept: Vec<(Scope, Digest)> = Vec::new();
    for store in [&small, &big] {
        for s in ["a", "b"] {
            for i in 0..40 {
                // Layers shared across namespaces and images, so scopes and runs overlap.
                let mut layers = Vec::new();
                for j in 0..3 {
                    let bytes = format!("layer {} {j}", i % 25);
                    if let Err(e) = put(store, &ns(s), &format!("l{i}-{j}"), bytes.as_bytes()).await
                    {
                        assert!(e.is(Kind::AlreadyExists), "{e}");
                    }
                    layers.push(format!(
                        r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}"#,
                        sha(bytes.as_bytes()),
                        bytes.len()
                    ));
                }
                let doc = format!(
                    r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[{}],"annotations":{{"i":"{i}"}}}}"#,
                    layers[0],
                    layers[1..].join(",")
                );
                let m = put(store, &ns(s), &format!("m{i}"), doc.as_bytes())
                    .await
                    .unwrap();
                if i % 3 != 0 {
                    store
                        .create_image(
                            &ns(s),
                            ImageRecord {
                                name: format!("img{i}"),
                                digest: m.digest.to_string(),
                                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                                size: doc.len() as i64,
                                ..Default::default()
                            },
                        )
                        .unwrap();
                    if Arc::ptr_eq(store, &small) {
                        kept.push((ns(s), m.digest.clone()));
                        for j in 0..3 {
                            kept.push((ns(s), sha(format!("layer {} {j}", i % 25).as_bytes())));
                        }
                    }
                }
            }
        }
    }
    // Writers root new content in the small store while it collects.
    let collector = {
        let small = small.clone();
        tokio::task::spawn_blocking(move || small.collect(false).unwrap())
    };
    let mut rooted = Vec::new();
    while (!collector.is_finished() && rooted.len() < 2000) || rooted.len() < 20 {
        let data = format!("rooted {}", rooted.len()).into_bytes();
        let mut w = small
            .open_writer(
                ns("a"),
                &format!("r{}", rooted.len()),
                data.len() as i64,
                Some(sha(&data)),
                None,
            )
            .await
            .unwrap();
        w.write(0, &data).unwrap();
        let labels = HashMap::from([("containerd.io/gc.root".to_string(), "t".to_string())]);
        w.commit(data.len() as i64, Some(sha(&data)), Some(labels))
            .unwrap();
        rooted.push(sha(&data));
        tokio::time::sleep(std::time::Duration::from_micros(200)).await;
    }
    let on_disk = collector.await.unwrap();
    let in_memory = big.collect(false).unwrap();
    assert!(on_disk.blobs_swept > 0);
    assert_eq!(
        (on_disk.blobs_swept, on_disk.links_swept, &on_disk.swept),
        (
            in_memory.blobs_swept,
            in_memory.links_swept,
            &in_memory.swept
        )
    );
    kept.extend(rooted.into_iter().map(|d| (ns("a"), d)));
    for (scope, d) in &kept {
        assert!(small.info(scope, d).is_ok(), "{d} in {scope:?} was swept");
    }
    // A second collection (its table now presized from the first) finds nothing more.
    assert_eq!(small.collect(false).unwrap().blobs_swept, 0);
    // The scratch files are unnamed: nothing is left in the directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
