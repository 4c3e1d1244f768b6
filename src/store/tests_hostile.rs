//! The store under hostile input and damaged records: the collector fails closed, lease dates
//! are checked, and shared-ingest writes are bounded by the request, not the blob.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::kv::mem::MemKv;

fn ns(n: &str) -> Scope {
    Scope::namespace(n).unwrap()
}

fn sha(data: &[u8]) -> Digest {
    Digest::of(Algorithm::Sha256, data)
}

/// A store whose grace period is zero: anything unreachable is swept by the next collection.
fn graceless(kv: Arc<dyn Kv>) -> Arc<Store> {
    Store::open_with(
        kv,
        StoreConfig {
            gc_grace: Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap()
}

async fn put(store: &Arc<Store>, scope: &Scope, r: &str, data: &[u8]) -> Info {
    let mut w = store
        .open_writer(scope.clone(), r, data.len() as i64, Some(sha(data)), None)
        .await
        .unwrap();
    w.write(0, data).unwrap();
    w.commit(data.len() as i64, Some(sha(data)), None).unwrap()
}

/// A blob kept alive only by a `gc.root` label, plus one unreachable blob the collection
/// would sweep if it ran.
async fn rooted_and_garbage(store: &Arc<Store>) -> (Digest, Digest) {
    let a = ns("a");
    let kept = put(store, &a, "kept", b"kept by a gc.root label")
        .await
        .digest;
    store
        .update(
            &a,
            &kept,
            HashMap::from([("containerd.io/gc.root".to_string(), "x".to_string())]),
            &[],
        )
        .unwrap();
    let garbage = put(store, &a, "garbage", b"unreachable").await.digest;
    (kept, garbage)
}

/// One collection, run as the daemon runs it: on the blocking pool.
async fn collect_now(store: &Arc<Store>) -> GcReport {
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.collect(false))
        .await
        .unwrap()
        .unwrap()
}

fn damage(kv: &Arc<dyn Kv>, cf: Cf, key: Vec<u8>, value: &[u8]) {
    let mut b = Batch::new();
    b.put(cf, key, value.to_vec());
    kv.write(b, true).unwrap();
}

/// Every kind of damaged record the collector reads makes it stop before sweeping, with
/// DataLoss naming the family, and count an errored run; nothing is swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_fails_closed_on_damaged_records() {
    let not_a_record = [0xff_u8, 0xff, 0xff, 0xff];
    let cases: Vec<(&str, Cf, Vec<u8>)> = vec![
        ("links", Cf::Links, b"n\x00garbage-key".to_vec()),
        ("images", Cf::Images, b"na\x00img".to_vec()),
        ("leases", Cf::Leases, b"na\x00lease".to_vec()),
        ("ingests", Cf::Ingests, b"na\x00ref".to_vec()),
        // An edge of the rooted blob whose key no longer parses: marking reads it.
        ("edges", Cf::Edges, b"\x01short".to_vec()),
    ];
    for (family, cf, key) in cases {
        let kv: Arc<dyn Kv> = Arc::new(MemKv::default());
        let store = graceless(kv.clone());
        let (kept, garbage) = rooted_and_garbage(&store).await;
        let key = if cf == Cf::Edges {
            [&kept.key()[..], &key[..]].concat()
        } else {
            key
        };
        damage(&kv, cf, key, &not_a_record);
        let errors_before = crate::metrics::get().gc_runs.get(&["error"]);
        let err = store.collect(false).unwrap_err();
        assert!(err.is(Kind::DataLoss), "{family}: {err}");
        assert!(err.message().contains(family), "{family}: {err}");
        assert!(crate::metrics::get().gc_runs.get(&["error"]) > errors_before);
        // Nothing was swept: not even what really was garbage.
        store.verify(&kept).unwrap();
        store.verify(&garbage).unwrap();
    }
}

/// A damaged link on the path from a root (the gc.root blob's link to a child label) stops
/// the collection rather than dropping the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_fails_closed_on_an_image_with_a_damaged_target() {
    let kv: Arc<dyn Kv> = Arc::new(MemKv::default());
    let store = graceless(kv.clone());
    let (_, garbage) = rooted_and_garbage(&store).await;
    let img = ImageRecord {
        name: "broken".into(),
        digest: "sha256:not-hex".into(),
        ..Default::default()
    };
    damage(
        &kv,
        Cf::Images,
        b"na\x00broken".to_vec(),
        &img.encode_to_vec(),
    );
    let err = store.collect(false).unwrap_err();
    assert!(err.is(Kind::DataLoss), "{err}");
    assert!(err.message().contains("broken"), "{err}");
    store.verify(&garbage).unwrap();
}

/// Without damage the same setup collects exactly the garbage (the cases above fail for the
/// damage, not for the setup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undamaged_store_collects_its_garbage() {
    let store = graceless(Arc::new(MemKv::default()));
    let (kept, garbage) = rooted_and_garbage(&store).await;
    let r = store.collect(false).unwrap();
    assert_eq!(r.swept, vec![garbage]);
    store.verify(&kept).unwrap();
}

/// A label written after the mark phase, naming content the mark found unreachable, keeps
/// that content: the write barrier re-reads the children of what it recorded even when that
/// node was marked already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_added_during_a_collection_keeps_what_it_names() {
    let store = graceless(Arc::new(MemKv::default()));
    let (kept, garbage) = rooted_and_garbage(&store).await;
    let a = ns("a");
    let (s, k, g) = (store.clone(), kept.clone(), garbage.clone());
    *store.after_mark.lock() = Some(Box::new(move || {
        s.update(
            &a,
            &k,
            HashMap::from([
                ("containerd.io/gc.root".to_string(), "x".to_string()),
                ("containerd.io/gc.ref.content.l".to_string(), g.to_string()),
            ]),
            &[],
        )
        .unwrap();
    }));
    let r = store.collect(false).unwrap();
    assert_eq!((r.blobs_swept, r.links_swept), (0, 0), "{r:?}");
    store.verify(&kept).unwrap();
    store.verify(&garbage).unwrap();
    // With the label gone again it is garbage.
    store
        .update(
            &ns("a"),
            &kept,
            HashMap::from([("containerd.io/gc.root".to_string(), "x".to_string())]),
            &[],
        )
        .unwrap();
    assert_eq!(store.collect(false).unwrap().swept, vec![garbage]);
}

/// The collector holds fingerprints, walks in batches and scans in pages: a store of many
/// images across pages and batches collects exactly its garbage, and the barrier rescues a
/// commit made between mark and sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_spanning_many_pages_keeps_exactly_the_reachable() {
    let kv: Arc<dyn Kv> = Arc::new(MemKv::default());
    let store = graceless(kv.clone());
    let a = ns("a");
    let mut kept = Vec::new();
    let mut garbage = Vec::new();
    // Large enough that its chunks go by one range, not key by key; in two writes.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut w = store
        .open_writer(a.clone(), "big", big.len() as i64, Some(sha(&big)), None)
        .await
        .unwrap();
    w.write(0, &big[..40_000]).unwrap();
    w.write(40_000, &big[40_000..]).unwrap();
    garbage.push(
        w.commit(big.len() as i64, Some(sha(&big)), None)
            .unwrap()
            .digest,
    );
    for i in 0..600 {
        let layer = put(
            &store,
            &a,
            &format!("l{i}"),
            format!("layer {i}").as_bytes(),
        )
        .await
        .digest;
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{layer}","size":{}}},"layers":[]}}"#,
            format!("layer {i}").len()
        );
        let m = put(&store, &a, &format!("m{i}"), manifest.as_bytes()).await;
        if i % 3 == 0 {
            store
                .create_image(
                    &a,
                    ImageRecord {
                        name: format!("img{i}"),
                        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                        digest: m.digest.to_string(),
                        size: m.size,
                        ..Default::default()
                    },
                )
                .unwrap();
            kept.extend([layer, m.digest]);
        } else {
            garbage.extend([layer, m.digest]);
        }
    }
    let late = b"committed between mark and sweep".to_vec();
    let (s, sc, l) = (store.clone(), a.clone(), late.clone());
    *store.after_mark.lock() = Some(Box::new(move || {
        let rt = tokio::runtime::Handle::current();
        std::thread::scope(|t| {
            t.spawn(|| rt.block_on(put(&s, &sc, "late", &l)));
        });
    }));
    let r = collect_now(&store).await;
    garbage.sort();
    assert_eq!(r.swept, garbage);
    assert_eq!(r.blobs_swept as usize, garbage.len());
    for d in kept.iter().chain([&sha(&late)]) {
        store.verify(d).unwrap();
    }
    // Every swept blob's chunks went with it: each kept blob was written in one chunk.
    let mut chunks = 0;
    kv.scan(Cf::Chunks, &[], &[], &mut |_, _| {
        chunks += 1;
        true
    })
    .unwrap();
    assert_eq!(chunks, kept.len() + 1);
}

/// What writers record while a collection marks is marked as the mark phase goes, not held
/// until the sweep (on a large store that is minutes of writes): a burst of commits made
/// during the mark leaves less than one drain's worth recorded when the mark ends, and every
/// one of them survives the sweep, while the garbage made before the collection goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_the_mark_are_marked_as_it_goes_and_all_kept() {
    use super::collect::BARRIER_DRAIN_AT;
    let kv: Arc<dyn Kv> = Arc::new(MemKv::default());
    let store = graceless(kv);
    let (kept, garbage) = rooted_and_garbage(&store).await;
    let late: Vec<Vec<u8>> = (0..BARRIER_DRAIN_AT + 100)
        .map(|i| format!("written while the collector marks: {i}").into_bytes())
        .collect();
    let (s, l) = (store.clone(), late.clone());
    *store.during_mark.lock() = Some(Box::new(move || {
        let rt = tokio::runtime::Handle::current();
        std::thread::scope(|t| {
            t.spawn(|| {
                rt.block_on(async {
                    for (i, data) in l.iter().enumerate() {
                        put(&s, &ns("b"), &format!("late-{i}"), data).await;
                    }
                })
            });
        });
    }));
    let held = Arc::new(Mutex::new(None));
    let (s, h) = (store.clone(), held.clone());
    *store.after_mark.lock() = Some(Box::new(move || {
        *h.lock() = s.barrier.lock().as_ref().map(Vec::len);
    }));
    let r = collect_now(&store).await;
    let held = (*held.lock()).expect("the barrier exists while a collection runs");
    assert!(
        held < BARRIER_DRAIN_AT,
        "{held} recorded writes were left for the sweep"
    );
    assert_eq!(r.swept, vec![garbage], "{r:?}");
    store.verify(&kept).unwrap();
    for data in &late {
        store.verify(&sha(data)).unwrap();
    }
}

/// Each scope keeps only what its own roots reach, and a blob stays while any scope reaches
/// it, with one blob linked in many scopes (more than the collector's marks hold inline) and
/// reached from some of them: directly, through another scope's manifest, or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_shared_by_many_scopes_is_kept_for_the_ones_that_reach_it() {
    let kv: Arc<dyn Kv> = Arc::new(MemKv::default());
    let store = graceless(kv.clone());
    let scopes: Vec<Scope> = (0..6).map(|i| ns(&format!("n{i}"))).collect();
    let layer = b"a layer every scope links".to_vec();
    let manifest = |config: &Digest, size: usize| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{size}}},"layers":[]}}"#
        )
    };
    let image = |name: &str, m: &Info| ImageRecord {
        name: name.into(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        digest: m.digest.to_string(),
        size: m.size,
        ..Default::default()
    };
    let l = sha(&layer);
    let shared = manifest(&l, layer.len());
    let mut own = Vec::new();
    let mut m = None;
    for (i, s) in scopes.iter().enumerate() {
        put(&store, s, "l", &layer).await;
        m = Some(put(&store, s, "m", shared.as_bytes()).await);
        own.push(
            put(&store, s, "own", format!("only n{i} has this").as_bytes())
                .await
                .digest,
        );
    }
    let m = m.unwrap();
    // n0, n2 and n5 name the shared manifest; n3 names a manifest of its own that reaches
    // the layer; n1 and n4 name nothing.
    for i in [0, 2, 5] {
        store.create_image(&scopes[i], image("img", &m)).unwrap();
    }
    let extra = manifest(&l, layer.len()).replace(
        "\"layers\":[]",
        "\"layers\":[],\"annotations\":{\"n\":\"3\"}",
    );
    let m3 = put(&store, &scopes[3], "m3", extra.as_bytes()).await;
    store.create_image(&scopes[3], image("img", &m3)).unwrap();

    let r = collect_now(&store).await;
    own.sort();
    assert_eq!(r.swept, own, "only the blobs no scope reaches go");
    let has = |s: &Scope, d: &Digest| store.info(s, d).is_ok();
    for (i, s) in scopes.iter().enumerate() {
        let (keeps_m, keeps_l) = match i {
            0 | 2 | 5 => (true, true),
            3 => (false, true),
            _ => (false, false),
        };
        assert_eq!(
            has(s, &m.digest),
            keeps_m,
            "n{i}'s link to the shared manifest"
        );
        assert_eq!(has(s, &l), keeps_l, "n{i}'s link to the layer");
    }
    assert!(has(&scopes[3], &m3.digest));
    store.verify(&l).unwrap();
    store.verify(&m.digest).unwrap();
    // Nodes marked: the layer in four scopes (n0, n2, n5 through m, n3 through m3), the
    // manifest in three, m3 in one.
    assert_eq!(r.marked, 4 + 3 + 1);
    // Three blobs; beyond each one's first scope, the layer's three and the manifest's two
    // are held apart. The sizes outlive a restart, and a damaged record is bounded by the
    // store's blob count.
    assert_eq!(*store.gc_sizes.lock(), (3, 5));
    drop(store);
    assert_eq!(*graceless(kv.clone()).gc_sizes.lock(), (3, 5));
    damage(&kv, Cf::Meta, super::META_GC_SIZES.to_vec(), &[0xff; 16]);
    let blobs = 3;
    assert_eq!(
        *graceless(kv.clone()).gc_sizes.lock(),
        (blobs + blobs / 8 + 1024, blobs + blobs / 8 + 1024)
    );
    damage(&kv, Cf::Meta, super::META_GC_SIZES.to_vec(), b"short");
    assert_eq!(*graceless(kv).gc_sizes.lock(), (0, 0));
}

/// Upstream source records are collected like the content they describe: one that an image
/// reaches stays (its blob is lazy, so the source is how it is read), one nothing reaches
/// goes once it is ten minutes old, and a young one stays (a pull in flight records sources
/// just before the image that reaches them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_sources_are_collected_once_old() {
    let store = graceless(Arc::new(MemKv::default()));
    let a = ns("a");
    let lazy_layer = sha(b"a layer never fetched");
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{lazy_layer}","size":21}},"layers":[]}}"#
    );
    let m = put(&store, &a, "m", manifest.as_bytes()).await;
    store
        .create_image(
            &a,
            ImageRecord {
                name: "img".into(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: m.digest.to_string(),
                size: m.size,
                ..Default::default()
            },
        )
        .unwrap();
    let hour_ago = now_ns() - 3600 * 1_000_000_000;
    let rec = |created_ns| SourceRecord {
        registry: "registry.example".into(),
        repository: "app".into(),
        media_type: "application/octet-stream".into(),
        size: 21,
        created_ns,
    };
    let (old_orphan, young_orphan) = (sha(b"old orphan"), sha(b"young orphan"));
    store.put_source(&a, &lazy_layer, &rec(hour_ago)).unwrap();
    store.put_source(&a, &old_orphan, &rec(hour_ago)).unwrap();
    store.put_source(&a, &young_orphan, &rec(now_ns())).unwrap();
    // The same blob in another scope that no image of its own reaches.
    let b = ns("b");
    store.put_source(&b, &lazy_layer, &rec(hour_ago)).unwrap();

    let r = collect_now(&store).await;
    assert_eq!(r.sources_swept, 2, "{r:?}");
    assert!(store.source(&a, &lazy_layer).unwrap().is_some());
    assert!(store.source(&a, &old_orphan).unwrap().is_none());
    assert!(store.source(&a, &young_orphan).unwrap().is_some());
    assert!(store.source(&b, &lazy_layer).unwrap().is_none());
    // A dry run counts, and removes nothing.
    store.put_source(&a, &old_orphan, &rec(hour_ago)).unwrap();
    let r = tokio::task::spawn_blocking({
        let s = store.clone();
        move || s.collect(true)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.sources_swept, 1, "{r:?}");
    assert!(store.source(&a, &old_orphan).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_dates_are_checked() {
    let store = Store::open(Arc::new(MemKv::default())).unwrap();
    let a = ns("a");
    for bad in [
        "1700-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "9999-12-31T23:59:59Z",
        "2262-04-12T00:00:00Z",
        "tomorrow",
        "2024-02-30T00:00:00Z",
        "-001-01-01T00:00:00Z",
    ] {
        let err = store
            .create_lease(
                &a,
                "l",
                HashMap::from([(leases::EXPIRE_LABEL.to_string(), bad.to_string())]),
            )
            .unwrap_err();
        assert!(err.is(Kind::InvalidArgument), "{bad}: {err}");
        assert!(err.message().contains(leases::EXPIRE_LABEL), "{err}");
    }
    let soon = crate::upstream::pull::rfc3339(now_ns() / 1_000_000_000 + 60);
    store
        .create_lease(
            &a,
            "ok",
            HashMap::from([(leases::EXPIRE_LABEL.to_string(), soon)]),
        )
        .unwrap();
}

/// A lease stored before dates were checked (or by a damaged disk) with an expiry in 1700 is
/// simply expired: the collector computes with it without overflowing and drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_lease_from_1700_expires_without_overflow() {
    let kv: Arc<dyn Kv> = Arc::new(MemKv::default());
    let store = graceless(kv.clone());
    let rec = LeaseRecord {
        id: "old".into(),
        created_ns: 0,
        labels: HashMap::from([(
            leases::EXPIRE_LABEL.to_string(),
            "1700-01-01T00:00:00Z".to_string(),
        )]),
    };
    damage(&kv, Cf::Leases, b"na\x00old".to_vec(), &rec.encode_to_vec());
    let at = store.next_lease_expiry().unwrap().unwrap();
    assert!(at < 0);
    let wait = crate::dates::expiry_wait(at, now_ns());
    assert!(wait < Duration::from_secs(1));
    store.collect(false).unwrap();
    assert!(store.next_lease_expiry().unwrap().is_none());
}

/// The 1-byte attack: a namespace opens a shared ingest of a large blob another namespace
/// has and writes one byte at offset = size. containerd's own suite does exactly this (and
/// commits the longer blob), so it is allowed; but the copy it forces streams: the writer
/// never queues more than a flush window of it, and the original blob is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appending_to_a_shared_ingest_copies_in_bounded_batches() {
    let store = Store::open(Arc::new(MemKv::default())).unwrap();
    let data: Vec<u8> = (0..(9 * CHUNK_SIZE + 3)).map(|i| (i % 249) as u8).collect();
    let d = put(&store, &ns("a"), "big", &data).await.digest;
    let mut w = store
        .open_writer(ns("b"), "big", data.len() as i64, Some(d.clone()), None)
        .await
        .unwrap();
    let size = data.len() as i64;
    assert_eq!(w.status().unwrap().offset, size);
    w.write(size, b"!").unwrap();
    let queued: usize = w
        .pending
        .ops
        .iter()
        .chain(w.chunks.ops.iter())
        .map(|op| match op {
            crate::kv::Op::Put(_, _, v) => v.len(),
            _ => 0,
        })
        .sum();
    assert!(queued <= UNLOGGED_MIN, "{queued} bytes queued");
    let mut all = data.clone();
    all.push(b'!');
    assert_eq!(w.status().unwrap().digest, sha(&all));
    w.commit(size + 1, Some(sha(&all)), None).unwrap();
    store.verify(&sha(&all)).unwrap();
    store.verify(&d).unwrap();
}

async fn put_declared(store: &Arc<Store>, scope: &Scope, r: &str, data: &[u8], mt: &str) -> Info {
    let mut w = store
        .open_writer(scope.clone(), r, data.len() as i64, Some(sha(data)), None)
        .await
        .unwrap();
    w.set_media_type(Some(mt.to_string()));
    w.write(0, data).unwrap();
    w.commit(data.len() as i64, Some(sha(data)), None).unwrap()
}

/// Edges are a function of the bytes. A manifest Put as octet-stream in one namespace still
/// gets its edges; and where a store holds a manifest without edges (written by a version
/// that trusted the declared type), another namespace's commit of it repairs them, so that
/// namespace's image keeps its layers through a collection past the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_follow_the_bytes_and_a_dedupe_commit_repairs_them() {
    let kv: Arc<dyn Kv> = Arc::new(MemKv::default());
    let store = graceless(kv.clone());
    let (a, b) = (ns("a"), ns("b"));
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        sha(&config),
        config.len(),
        sha(&layer),
        layer.len()
    )
    .into_bytes();
    let octet = "application/octet-stream";
    put_declared(&store, &a, "c", &config, octet).await;
    put_declared(&store, &a, "l", &layer, octet).await;
    let m = put_declared(&store, &a, "m", &manifest, octet).await.digest;
    assert_eq!(store.children(&m).unwrap().len(), 2);

    // An older store: the manifest's edges were never recorded.
    let mk = m.key();
    let mut del = Batch::new();
    del.delete_range(Cf::Edges, mk.clone(), crate::kv::prefix_end(&mk));
    kv.write(del, true).unwrap();
    assert!(store.children(&m).unwrap().is_empty());

    // Namespace b pulls the same image: shared ingests of all three, then the image.
    for (r, data) in [("c", &config), ("l", &layer), ("m", &manifest)] {
        let mut w = store
            .open_writer(b.clone(), r, data.len() as i64, Some(sha(data)), None)
            .await
            .unwrap();
        w.commit(data.len() as i64, Some(sha(data)), None).unwrap();
    }
    assert_eq!(store.children(&m).unwrap().len(), 2, "edges repaired");
    store
        .create_image(
            &b,
            ImageRecord {
                name: "img".into(),
                digest: m.to_string(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: manifest.len() as i64,
                ..Default::default()
            },
        )
        .unwrap();
    // Namespace a lets go of everything; a collection past the grace period runs.
    for d in [&m, &sha(&config), &sha(&layer)] {
        store.delete(&a, d).unwrap();
    }
    store.collect(false).unwrap();
    for d in [&m, &sha(&config), &sha(&layer)] {
        store.verify(d).unwrap();
        store.info(&b, d).unwrap();
    }
}

/// Quotas are exact under concurrency: 32 commits of 100 distinct bytes race in a namespace
/// with a 1000-byte quota; exactly ten land, and the O(1) counters equal a recount.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_are_exact_under_concurrent_commits() {
    let store = Store::open_with(
        Arc::new(MemKv::default()),
        StoreConfig {
            quotas: HashMap::from([("q".to_string(), 1000)]),
            ..Default::default()
        },
    )
    .unwrap();
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let data = vec![i; 100];
            let mut w = store
                .open_writer(ns("q"), &format!("r{i}"), 100, Some(sha(&data)), None)
                .await?;
            w.write(0, &data)?;
            tokio::task::spawn_blocking(move || w.commit(100, Some(sha(&data)), None))
                .await
                .unwrap()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert!(e.is(Kind::ResourceExhausted), "{e}"),
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(store.usage_of(&ns("q")), 1000);
    let mut recount = store.recount_usage().unwrap();
    recount.retain(|_, v| *v != 0);
    assert_eq!(recount, store.usage_counters());
    // Deleting frees exactly what the link counted.
    let first = store
        .list(&ns("q"), &crate::filter::Filter::default(), None, 1)
        .unwrap()
        .remove(0);
    assert!(store.delete(&ns("q"), &first.digest).unwrap());
    assert_eq!(store.usage_of(&ns("q")), 900);
}

/// A name-prefix listing is exactly the images whose names start with it, in name order,
/// whatever else the namespace (or another namespace) holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_list_by_name_prefix() {
    let store = graceless(Arc::new(MemKv::default()));
    let (a, b) = (ns("a"), ns("b"));
    let m = put(&store, &a, "m", b"not a manifest").await;
    let _ = put(&store, &b, "m", b"not a manifest").await;
    let names = [
        "r/app:2",
        "r/app:1",
        "r/app@sha256:00",
        "r/apps:1",
        "r/ap:1",
        "s/app:1",
    ];
    for (scope, name) in names.iter().map(|n| (&a, *n)).chain([(&b, "r/app:3")]) {
        store
            .create_image(
                scope,
                ImageRecord {
                    name: name.into(),
                    media_type: "application/octet-stream".into(),
                    digest: m.digest.to_string(),
                    size: m.size,
                    ..Default::default()
                },
            )
            .unwrap();
    }
    let listed = |scope: &Scope, prefix: &str| -> Vec<String> {
        store
            .list_images_named(scope, prefix, &crate::filter::Filter::default())
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect()
    };
    assert_eq!(listed(&a, "r/app:"), ["r/app:1", "r/app:2"]);
    assert_eq!(listed(&a, "r/app@"), ["r/app@sha256:00"]);
    assert_eq!(
        listed(&a, "r/app"),
        ["r/app:1", "r/app:2", "r/app@sha256:00", "r/apps:1"]
    );
    assert_eq!(listed(&b, "r/app:"), ["r/app:3"]);
    assert!(listed(&a, "t/").is_empty());
    assert_eq!(listed(&a, "").len(), names.len());
}

/// A ref is a key and is listed whole: one longer than MAX_REF is refused before anything
/// is stored, naming its length, not echoing it.
#[tokio::test]
async fn an_ingest_ref_is_bounded() {
    let store = graceless(Arc::new(MemKv::default()));
    let s = ns("n");
    let long = "r".repeat(ingest::MAX_REF + 1);
    let e = store
        .open_writer(s.clone(), &long, 5, None, None)
        .await
        .err()
        .expect("a ref past MAX_REF is refused");
    assert!(e.is(Kind::InvalidArgument), "{e}");
    assert!(
        e.message().contains(&format!("{} bytes", long.len())),
        "{e}"
    );
    assert!(
        e.message().len() < 200,
        "the ref is echoed: {} bytes",
        e.message().len()
    );
    assert!(
        store
            .list_statuses(&s, &Default::default())
            .unwrap()
            .is_empty()
    );
    let longest = "r".repeat(ingest::MAX_REF);
    put(&store, &s, &longest, b"hello").await;
}
