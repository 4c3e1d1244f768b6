//! Online garbage collection with images as roots, on real images (umoci/skopeo fixtures).

use std::collections::BTreeSet;

use contentd::api::pb::containerd::services::content::v1 as cpb;
use contentd::api::pb::containerd::services::images::v1 as ipb;
use contentd::api::pb::containerd::types::Descriptor;
use contentd::api::pb::contentd::v1 as gpb;
use contentd::client::{Namespace, connect_unix};
use serde_json::Value;

use crate::graph::{blob_files, first_layer, fixtures};
use crate::harness::*;

/// An image named `name` whose target is the fixture's root.
fn image_of(name: &str, fx: &Value) -> ipb::CreateImageRequest {
    let root = &fx["root"];
    ipb::CreateImageRequest {
        image: Some(ipb::Image {
            name: name.into(),
            target: Some(Descriptor {
                media_type: root["mediaType"].as_str().unwrap().into(),
                digest: root["digest"].as_str().unwrap().into(),
                size: root["size"].as_i64().unwrap(),
                annotations: Default::default(),
            }),
            ..Default::default()
        }),
    }
}

fn nodes(fx: &Value) -> BTreeSet<String> {
    fx["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["present"].as_bool().unwrap())
        .map(|n| n["digest"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn images_keep_their_blobs_and_deleting_one_sweeps_only_its_own() {
    let Some((dir, _keep)) = fixtures() else {
        return;
    };
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    let files = blob_files(&dir);
    let fx = |name: &str| {
        summary["fixtures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap()
            .clone()
    };
    let (single, multi) = (fx("oci-single"), fx("oci-multi"));

    // No grace period: only images hold content.
    let d = Daemon::start_with(&["--gc-grace-secs", "0", "--gc-interval-secs", "0"]);
    let mut c = d.client(Some("gc")).await;
    for n in nodes(&single).union(&nodes(&multi)) {
        put_blob(&mut c, n, &std::fs::read(&files[n]).unwrap()).await;
    }
    let loose = pattern(5000, 9);
    put(&mut c, "loose", &loose).await.unwrap();
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let ns = Namespace::new(Some("gc")).unwrap();
    let mut images = ipb::images_client::ImagesClient::with_interceptor(ch.clone(), ns.clone());
    let mut gcc = gpb::gc_client::GcClient::with_interceptor(ch, ns);
    for (name, f) in [
        ("fixtures/single:oci", &single),
        ("fixtures/multi:oci", &multi),
    ] {
        images.create(image_of(name, f)).await.unwrap();
    }

    // Images keep every blob they reach; the loose blob goes.
    let r = gcc
        .run(gpb::RunRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.swept, vec![sha(&loose).to_string()], "{r:?}");
    for n in nodes(&single).union(&nodes(&multi)) {
        let (got, _) = read(&mut c, n, 0, 0).await.unwrap();
        assert_eq!(sha(&got).to_string(), *n, "{n} verifies after collection");
    }

    // Explain names the image and the path to a layer.
    let layer = first_layer(&single);
    let e = gcc
        .explain(gpb::ExplainRequest {
            digest: layer.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(e.alive, "{e:?}");
    assert!(e.root.contains("image"), "{e:?}");
    assert_eq!(e.path.last().map(String::as_str), Some(layer));
    assert_eq!(e.path.len(), 2, "root manifest, then the layer: {e:?}");

    // Deleting one image: a dry run reports exactly what the run removes, which is the blobs
    // only that image reached; the shared base layer stays.
    images
        .delete(ipb::DeleteImageRequest {
            name: "fixtures/multi:oci".into(),
            sync: false,
        })
        .await
        .unwrap();
    let exclusive: Vec<String> = nodes(&multi).difference(&nodes(&single)).cloned().collect();
    let dry = gcc
        .run(gpb::RunRequest { dry_run: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.swept, exclusive);
    for n in &exclusive {
        read(&mut c, n, 0, 0)
            .await
            .expect("a dry run deletes nothing");
    }
    let run = gcc
        .run(gpb::RunRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.swept, exclusive);
    assert_eq!(run.bytes_swept, dry.bytes_swept);
    for n in &exclusive {
        assert_eq!(code(read(&mut c, n, 0, 0).await), tonic::Code::NotFound);
    }
    for n in nodes(&single) {
        read(&mut c, &n, 0, 0).await.expect("shared blobs stay");
    }
    let st = gcc
        .status(gpb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.last.unwrap().blobs_swept, exclusive.len() as i64);
    assert!(st.runs >= 3);

    // A blob nothing reaches is explained as collectable.
    let orphan = pattern(100, 10);
    put(&mut c, "orphan", &orphan).await.unwrap();
    let e = gcc
        .explain(gpb::ExplainRequest {
            digest: sha(&orphan).to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!e.alive && e.collectable_after.is_some(), "{e:?}");

    // gc.root labels are roots too.
    let labelled = pattern(100, 11);
    write_msgs(
        &mut c,
        vec![commit_msg(
            "lab",
            &labelled,
            &[("containerd.io/gc.root", "x")],
        )],
    )
    .await[0]
        .as_ref()
        .unwrap();
    let r = gcc
        .run(gpb::RunRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.swept, vec![sha(&orphan).to_string()]);
    read(&mut c, &sha(&labelled).to_string(), 0, 0)
        .await
        .unwrap();
}

/// Writers push real images (layers first, then configs and manifests, then the image) under
/// a lease, as containerd clients do, and delete older images, while the collector runs in a
/// tight loop with no grace period. At the end every image is complete and verifies.
#[tokio::test(flavor = "multi_thread")]
async fn collection_never_races_writers() {
    let Some((dir, _keep)) = fixtures() else {
        return;
    };
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    let files = std::sync::Arc::new(blob_files(&dir));
    let fixtures: Vec<Value> = summary["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["format"] == "oci")
        .cloned()
        .collect();
    let secs: u64 = std::env::var("CONTENTD_GC_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let d = Daemon::start_with(&["--gc-grace-secs", "0", "--gc-interval-secs", "0"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);

    // The collector, back to back.
    let sock = d.client_sock.clone();
    let collector = tokio::spawn(async move {
        let mut runs = 0u64;
        let mut swept = 0i64;
        while std::time::Instant::now() < deadline {
            let r = gc(&sock, false).await;
            runs += 1;
            swept += r.blobs_swept;
        }
        (runs, swept)
    });

    let mut writers = Vec::new();
    for w in 0..3usize {
        let (sock, files, fixtures) = (d.client_sock.clone(), files.clone(), fixtures.clone());
        writers.push(tokio::spawn(async move {
            use contentd::api::pb::containerd::services::leases::v1 as lpb;
            let ns = format!("w{w}");
            let ch = connect_unix(&sock).await.unwrap();
            let mut images = ipb::images_client::ImagesClient::with_interceptor(
                ch.clone(),
                Namespace::new(Some(&ns)).unwrap(),
            );
            let mut leases = lpb::leases_client::LeasesClient::with_interceptor(
                ch.clone(),
                Namespace::new(Some(&ns)).unwrap(),
            );
            let mut round = 0usize;
            let mut live: Vec<(String, Value)> = Vec::new();
            while std::time::Instant::now() < deadline {
                let fx = &fixtures[(w + round) % fixtures.len()];
                let lease = format!("push-{w}-{round}");
                leases
                    .create(lpb::CreateRequest {
                        id: lease.clone(),
                        labels: Default::default(),
                    })
                    .await
                    .unwrap();
                let mut c = cpb::content_client::ContentClient::with_interceptor(
                    ch.clone(),
                    Namespace::new(Some(&ns))
                        .unwrap()
                        .with_lease(&lease)
                        .unwrap(),
                );
                // Layers first, then configs and manifests (children before parents).
                let mut order: Vec<(usize, String)> = Vec::new();
                for n in fx["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|n| n["present"].as_bool().unwrap())
                {
                    let mt = n["mediaType"].as_str().unwrap();
                    let rank =
                        if mt.contains("layer") || mt.contains("rootfs") || mt.contains("spdx") {
                            0
                        } else if mt.contains("config") || mt.contains("empty") {
                            1
                        } else {
                            2
                        };
                    order.push((rank, n["digest"].as_str().unwrap().to_string()));
                }
                order.sort();
                for (_, dg) in &order {
                    put_blob(&mut c, dg, &std::fs::read(&files[dg]).unwrap()).await;
                }
                // Some garbage for the collector.
                put(
                    &mut c,
                    &format!("junk-{round}"),
                    &pattern(3000, (w * 1000 + round) as u64),
                )
                .await
                .unwrap();
                let name = format!("img-{w}-{round}");
                images.create(image_of(&name, fx)).await.unwrap();
                leases
                    .delete(lpb::DeleteRequest {
                        id: lease,
                        sync: false,
                    })
                    .await
                    .unwrap();
                live.push((name, fx.clone()));
                if live.len() > 3 {
                    let (old, _) = live.remove(0);
                    images
                        .delete(ipb::DeleteImageRequest {
                            name: old,
                            sync: false,
                        })
                        .await
                        .unwrap();
                }
                round += 1;
            }
            (ns, live, round)
        }));
    }
    let mut results = Vec::new();
    for w in writers {
        results.push(w.await.unwrap());
    }
    let (runs, swept) = collector.await.unwrap();
    assert!(runs >= 3, "the collector ran {runs} times");
    // Every remaining image is complete, byte for byte.
    let mut checked = 0;
    for (ns, live, rounds) in &results {
        assert!(*rounds >= 2, "{ns} made {rounds} rounds");
        let mut c = connect(&d.client_sock, Some(ns)).await;
        for (_, fx) in live {
            for n in fx["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["present"].as_bool().unwrap())
            {
                let dg = n["digest"].as_str().unwrap();
                let (got, _) = read(&mut c, dg, 0, 0)
                    .await
                    .unwrap_or_else(|e| panic!("{ns}: {dg} lost: {e}"));
                assert_eq!(sha(&got).to_string(), dg);
                checked += 1;
            }
        }
    }
    eprintln!(
        "collector: {runs} runs, {swept} blobs swept; {checked} blobs of live images verified"
    );
    assert!(checked > 0);
}

/// A lease keeps what is written under it (`containerd-lease` header) until it is deleted,
/// or until its `containerd.io/gc.expire` time passes — by the clock, with no other change.
#[tokio::test(flavor = "multi_thread")]
async fn leases_hold_content_until_they_expire() {
    use contentd::api::pb::containerd::services::leases::v1 as lpb;
    let d = Daemon::start_with(&["--gc-grace-secs", "0", "--gc-interval-secs", "0"]);
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let ns = Namespace::new(Some("lz")).unwrap();
    let mut leases = lpb::leases_client::LeasesClient::with_interceptor(ch.clone(), ns.clone());
    let mut gcc = gpb::gc_client::GcClient::with_interceptor(ch.clone(), ns);
    let expire = std::time::SystemTime::now() + std::time::Duration::from_secs(3);
    let secs = expire
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let stamp = contentd::upstream::pull::rfc3339(secs);
    leases
        .create(lpb::CreateRequest {
            id: "short".into(),
            labels: [("containerd.io/gc.expire".to_string(), stamp.clone())].into(),
        })
        .await
        .unwrap();
    leases
        .create(lpb::CreateRequest {
            id: "kept".into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(
        leases
            .create(lpb::CreateRequest {
                id: "kept".into(),
                labels: Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::AlreadyExists
    );

    // Write under each lease through the header.
    let mut short = pb_client(&d, "short").await;
    let mut kept = pb_client(&d, "kept").await;
    let (a, b) = (pattern(4000, 1), pattern(4000, 2));
    put(&mut short, "a", &a).await.unwrap();
    put(&mut kept, "b", &b).await.unwrap();
    let res = leases
        .list_resources(lpb::ListResourcesRequest { id: "short".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.resources.len(), 1, "{res:?}");
    assert_eq!(
        (
            res.resources[0].r#type.as_str(),
            res.resources[0].id.clone()
        ),
        ("content", sha(&a).to_string())
    );

    let r = gcc
        .run(gpb::RunRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert!(r.swept.is_empty(), "both leases hold: {r:?}");
    let e = gcc
        .explain(gpb::ExplainRequest {
            digest: sha(&a).to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(e.alive && e.root.contains("lease"), "{e:?}");

    // Nothing else happens; the clock passes the expiry and the daemon collects by itself
    // (its interval timer is off).
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let st = gcc
        .status(gpb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let last = st.last.unwrap();
    assert!(
        !last.dry_run && last.swept == vec![sha(&a).to_string()],
        "{stamp}: {last:?}"
    );
    let mut plain = d.client(Some("lz")).await;
    assert_eq!(
        code(read(&mut plain, &sha(&a).to_string(), 0, 0).await),
        tonic::Code::NotFound
    );
    let ids: Vec<String> = leases
        .list(lpb::ListRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner()
        .leases
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(
        ids,
        vec!["kept".to_string()],
        "the expired lease is gone too"
    );

    // Deleting the other lease (sync) collects its content at once.
    leases
        .delete(lpb::DeleteRequest {
            id: "kept".into(),
            sync: true,
        })
        .await
        .unwrap();
    assert_eq!(
        code(read(&mut plain, &sha(&b).to_string(), 0, 0).await),
        tonic::Code::NotFound
    );
    // Unknown leases are NotFound, in the header too.
    let mut ghost = pb_client(&d, "ghost").await;
    assert_eq!(
        code(put(&mut ghost, "g", b"ghost").await),
        tonic::Code::NotFound
    );
}

async fn pb_client(d: &Daemon, lease: &str) -> Client {
    let ch = connect_unix(&d.client_sock).await.unwrap();
    cpb::content_client::ContentClient::with_interceptor(
        ch,
        Namespace::new(Some("lz"))
            .unwrap()
            .with_lease(lease)
            .unwrap(),
    )
}

/// Enough mutations start a collection on their own (no interval, no request).
#[tokio::test(flavor = "multi_thread")]
async fn mutation_count_triggers_a_collection() {
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "gc_pause_percent = 1\n").unwrap();
    let d = Daemon::start_with(&[
        "--config",
        cfg.path().to_str().unwrap(),
        "--gc-grace-secs",
        "0",
        "--gc-interval-secs",
        "0",
        "--gc-mutation-threshold",
        "5",
    ]);
    let mut c = d.client(Some("mut")).await;
    let ch = connect_unix(&d.client_sock).await.unwrap();
    let mut gcc = gpb::gc_client::GcClient::new(ch);
    for i in 0..4 {
        put(&mut c, &format!("m{i}"), &pattern(100, i))
            .await
            .unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let st = gcc
        .status(gpb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.runs, 0, "four mutations are below the threshold");
    put(&mut c, "m4", &pattern(100, 4)).await.unwrap();
    // Nothing roots the loose blobs (grace 0): the triggered run swept them.
    assert_eq!(swept_by_run(&mut gcc, 1).await, 5);
    // The next trigger comes at once, inside the spacing that keeps collections to 1% of
    // the time: it is deferred, never dropped.
    for i in 5..10 {
        put(&mut c, &format!("m{i}"), &pattern(100, i))
            .await
            .unwrap();
    }
    assert_eq!(swept_by_run(&mut gcc, 2).await, 5);
}

/// Waits (at most 30 s) for the daemon's `n`th collection to end; what it swept.
async fn swept_by_run(
    gcc: &mut gpb::gc_client::GcClient<tonic::transport::Channel>,
    n: i64,
) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let st = gcc
            .status(gpb::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if st.runs >= n && !st.running {
            return st.last.unwrap().blobs_swept;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "collection {n} never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Bytes of the files in a daemon's data directory.
fn bytes_on_disk(d: &Daemon) -> u64 {
    std::fs::read_dir(d.dir.join("root"))
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_and_collecting_frees_the_disk_at_once() {
    let d = Daemon::start_with(&["--gc-grace-secs", "0", "--gc-interval-secs", "0"]);
    let mut c = d.client(Some("disk")).await;
    let (gone, kept) = (pattern(64 << 20, 1), pattern(8 << 20, 2));
    let (gone_d, kept_d) = (sha(&gone).to_string(), sha(&kept).to_string());
    put_blob(&mut c, &gone_d, &gone).await;
    put_blob(&mut c, &kept_d, &kept).await;
    let root = std::collections::HashMap::from([(
        "containerd.io/gc.root".to_string(),
        "2026-01-01T00:00:00Z".to_string(),
    )]);
    c.update(cpb::UpdateRequest {
        info: Some(cpb::Info {
            digest: kept_d.clone(),
            labels: root,
            ..Default::default()
        }),
        update_mask: None,
    })
    .await
    .unwrap();
    let before = bytes_on_disk(&d);
    assert!(before >= 72 << 20, "{before} bytes on disk");
    c.delete(cpb::DeleteContentRequest {
        digest: gone_d.clone(),
    })
    .await
    .unwrap();
    let report = gc(&d.client_sock, false).await;
    assert_eq!(report.blobs_swept, 1);
    // No later write is needed: the swept blob's files are gone when the collection ends.
    let after = bytes_on_disk(&d);
    assert!(
        after + (56 << 20) <= before,
        "{before} bytes on disk before the collection, {after} after"
    );
    let (got, _) = read(&mut c, &kept_d, 0, 0).await.unwrap();
    assert!(got == kept, "the kept blob reads back whole");
}
