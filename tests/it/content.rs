//! Every content.v1 RPC on a client-mode socket, with containerd's semantics.

use std::collections::HashMap;

use contentd::api::pb::containerd::services::content::v1 as pb;
use tonic::Code;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn write_info_read_list_update_delete() {
    let d = Daemon::start();
    let mut c = d.client(Some("it")).await;

    // Multi-message Write as containerd's clients send it: STAT open, STATs, WRITEs, COMMIT.
    let data = pattern(3 * (1 << 20) + 5, 1);
    let dg = sha(&data).to_string();
    let before = std::time::SystemTime::now();
    let mut msgs = vec![pb::WriteContentRequest {
        action: pb::WriteAction::Stat as i32,
        r#ref: "multi".into(),
        total: data.len() as i64,
        expected: dg.clone(),
        ..Default::default()
    }];
    msgs.push(pb::WriteContentRequest::default());
    let mut off = 0;
    for piece in data.chunks(1 << 20) {
        msgs.push(pb::WriteContentRequest {
            action: pb::WriteAction::Write as i32,
            offset: off,
            data: piece.to_vec().into(),
            ..Default::default()
        });
        off += piece.len() as i64;
    }
    msgs.push(pb::WriteContentRequest {
        action: pb::WriteAction::Commit as i32,
        offset: off,
        total: off,
        expected: dg.clone(),
        labels: HashMap::from([("a".into(), "1".into())]),
        ..Default::default()
    });
    let n = msgs.len();
    let resps = write_msgs(&mut c, msgs).await;
    assert_eq!(resps.len(), n, "exactly one response per message");
    let resps: Vec<_> = resps.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(resps[0].offset, 0);
    assert_eq!(resps[0].total, data.len() as i64);
    assert_eq!(
        resps[0].digest,
        sha(b"").to_string(),
        "running digest of nothing"
    );
    assert_eq!(resps[2].offset, 1 << 20);
    assert_eq!(resps[2].digest, sha(&data[..1 << 20]).to_string());
    let last = resps.last().unwrap();
    assert_eq!(last.action, pb::WriteAction::Commit as i32);
    assert_eq!(
        (last.offset, last.digest.as_str()),
        (data.len() as i64, dg.as_str())
    );

    // Info: size, labels, nanosecond timestamps inside the commit window.
    let info = c
        .info(pb::InfoRequest { digest: dg.clone() })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.size, data.len() as i64);
    assert_eq!(info.labels["a"], "1");
    let created = info.created_at.unwrap();
    let created_ns = created.seconds as i128 * 1_000_000_000 + created.nanos as i128;
    let before_ns = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    assert!(created_ns >= before_ns && created_ns <= before_ns + 60_000_000_000);

    // Read: messages of READ_CHUNK bytes, offsets relative to the request, ranges, the end.
    let (got, msgs) = read(&mut c, &dg, 0, 0).await.unwrap();
    assert_eq!(got, data);
    let piece = contentd::api::content::READ_CHUNK;
    let sizes: Vec<usize> = data.chunks(piece).map(|c| c.len()).collect();
    assert_eq!(msgs.iter().map(|m| m.1).collect::<Vec<_>>(), sizes);
    assert_eq!(
        msgs.iter().map(|m| m.0).collect::<Vec<_>>(),
        (0..sizes.len())
            .map(|i| (i * piece) as i64)
            .collect::<Vec<_>>()
    );
    let (got, _) = read(&mut c, &dg, (1 << 20) - 3, 10).await.unwrap();
    assert_eq!(
        got,
        &data[(1 << 20) - 3..(1 << 20) + 7],
        "a range across a chunk boundary"
    );
    let (got, _) = read(&mut c, &dg, data.len() as i64 - 3, 100).await.unwrap();
    assert_eq!(got, &data[data.len() - 3..]);
    let (got, _) = read(&mut c, &dg, -7, 4).await.unwrap();
    assert_eq!(got, &data[..4]);
    let (got, msgs) = read(&mut c, &dg, data.len() as i64, 0).await.unwrap();
    assert!(got.is_empty() && msgs.is_empty());

    // Update with masks.
    let upd = |labels: &[(&str, &str)], paths: &[&str]| pb::UpdateRequest {
        info: Some(pb::Info {
            digest: dg.clone(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        update_mask: if paths.is_empty() {
            None
        } else {
            Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            })
        },
    };
    let i = c
        .update(upd(&[("b", "2")], &["labels.b"]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(i.labels.len(), 2);
    let (u1, u0) = (i.updated_at.unwrap(), info.updated_at.unwrap());
    assert!((u1.seconds, u1.nanos) >= (u0.seconds, u0.nanos));
    let i = c
        .update(upd(&[], &["labels.a"]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(
        i.labels.keys().collect::<Vec<_>>(),
        vec!["b"],
        "a key absent from the request is removed"
    );
    let i = c
        .update(upd(&[("c", "3")], &["labels"]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(i.labels.keys().collect::<Vec<_>>(), vec!["c"]);
    let i = c
        .update(upd(&[("d", "4")], &[]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(i.labels.keys().collect::<Vec<_>>(), vec!["d"]);

    // List: batches of at most 100, filters (AND within, OR across).
    for i in 0..250u64 {
        put(&mut c, &format!("many-{i}"), &pattern(64, 1000 + i))
            .await
            .unwrap();
    }
    let batches = list(&mut c, &[]).await.unwrap();
    assert_eq!(
        batches.iter().map(|b| b.len()).collect::<Vec<_>>(),
        vec![100, 100, 51]
    );
    let hits = list(&mut c, &[&format!("digest=={dg},labels.d==4")])
        .await
        .unwrap()
        .concat();
    assert_eq!(hits.len(), 1);
    let hits = list(
        &mut c,
        &[
            "labels.d==nope",
            &format!("digest=={}", sha(&pattern(64, 1000))),
        ],
    )
    .await
    .unwrap()
    .concat();
    assert_eq!(hits.len(), 1);
    assert!(
        list(&mut c, &["labels.d==nope"]).await.unwrap().is_empty(),
        "no matches: no messages"
    );

    // Status / ListStatuses / Abort of an open ingest.
    let r = write_msgs(
        &mut c,
        vec![pb::WriteContentRequest {
            action: pb::WriteAction::Write as i32,
            r#ref: "pending-1".into(),
            total: 100,
            data: b"partial".to_vec().into(),
            ..Default::default()
        }],
    )
    .await;
    assert_eq!(r[0].as_ref().unwrap().offset, 7);
    let st = c
        .status(pb::StatusRequest {
            r#ref: "pending-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(
        (st.offset, st.total, st.r#ref.as_str()),
        (7, 100, "pending-1")
    );
    assert!(st.started_at.is_some() && st.updated_at.is_some());
    let all = c
        .list_statuses(pb::ListStatusesRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner()
        .statuses;
    assert_eq!(all.len(), 1);
    let none = c
        .list_statuses(pb::ListStatusesRequest {
            filters: vec!["ref==other".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .statuses;
    assert!(none.is_empty());
    let some = c
        .list_statuses(pb::ListStatusesRequest {
            filters: vec!["ref~=^pending-".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .statuses;
    assert_eq!(some.len(), 1);
    c.abort(pb::AbortRequest {
        r#ref: "pending-1".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        code(
            c.status(pb::StatusRequest {
                r#ref: "pending-1".into()
            })
            .await
        ),
        Code::NotFound
    );

    // Delete.
    c.delete(pb::DeleteContentRequest { digest: dg.clone() })
        .await
        .unwrap();
    assert_eq!(
        code(c.info(pb::InfoRequest { digest: dg.clone() }).await),
        Code::NotFound
    );
    assert_eq!(code(read(&mut c, &dg, 0, 0).await), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_share_bytes_not_visibility() {
    let d = Daemon::start();
    let mut a = d.client(Some("ns-a")).await;
    let mut b = d.client(Some("ns-b")).await;
    let data = pattern(1000, 7);
    let dg = sha(&data).to_string();
    put(&mut a, "r", &data).await.unwrap();
    assert_eq!(
        code(b.info(pb::InfoRequest { digest: dg.clone() }).await),
        Code::NotFound
    );
    assert!(list(&mut b, &[]).await.unwrap().is_empty());

    // A shared ingest: ns-b sees the blob complete without sending it, then commits.
    let r = write_msgs(
        &mut b,
        vec![
            pb::WriteContentRequest {
                r#ref: "r".into(),
                total: 1000,
                expected: dg.clone(),
                ..Default::default()
            },
            pb::WriteContentRequest {
                action: pb::WriteAction::Commit as i32,
                offset: 1000,
                total: 1000,
                expected: dg.clone(),
                ..Default::default()
            },
        ],
    )
    .await;
    assert_eq!(
        (
            r[0].as_ref().unwrap().offset,
            r[0].as_ref().unwrap().digest.as_str()
        ),
        (1000, dg.as_str())
    );
    r[1].as_ref().unwrap();
    assert_eq!(
        b.info(pb::InfoRequest { digest: dg.clone() })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap()
            .size,
        1000
    );

    // Appending to a shared ingest copies first, then makes a new blob.
    let mut ext = data.clone();
    ext.extend_from_slice(b"appended");
    let r = write_msgs(
        &mut d.client(Some("ns-c")).await,
        vec![
            pb::WriteContentRequest {
                r#ref: "r".into(),
                total: 1000,
                expected: dg.clone(),
                ..Default::default()
            },
            pb::WriteContentRequest {
                action: pb::WriteAction::Commit as i32,
                offset: 1000,
                total: ext.len() as i64,
                expected: sha(&ext).to_string(),
                data: b"appended".to_vec().into(),
                ..Default::default()
            },
        ],
    )
    .await;
    assert_eq!(r[1].as_ref().unwrap().digest, sha(&ext).to_string());

    // Deleting in one namespace keeps the other's view and bytes.
    a.delete(pb::DeleteContentRequest { digest: dg.clone() })
        .await
        .unwrap();
    assert_eq!(read(&mut b, &dg, 0, 0).await.unwrap().0, data);
    b.delete(pb::DeleteContentRequest { digest: dg.clone() })
        .await
        .unwrap();
    assert_eq!(
        code(b.info(pb::InfoRequest { digest: dg.clone() }).await),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sha512_and_write_state_machine() {
    let d = Daemon::start();
    let mut c = d.client(Some("sm")).await;
    let data = pattern(5000, 3);
    let d512 = contentd::digest::Digest::of(contentd::digest::Algorithm::Sha512, &data).to_string();
    let r = write_msgs(
        &mut c,
        vec![pb::WriteContentRequest {
            action: pb::WriteAction::Commit as i32,
            r#ref: "s512".into(),
            total: 5000,
            expected: d512.clone(),
            data: data.clone().into(),
            ..Default::default()
        }],
    )
    .await;
    assert_eq!(r[0].as_ref().unwrap().digest, d512);
    assert_eq!(read(&mut c, &d512, 0, 0).await.unwrap().0, data);

    // Restart at offset zero, then commit.
    let w = |action: pb::WriteAction, r: &str, offset: i64, data: &[u8]| pb::WriteContentRequest {
        action: action as i32,
        r#ref: r.into(),
        offset,
        data: data.to_vec().into(),
        ..Default::default()
    };
    let r = write_msgs(
        &mut c,
        vec![
            w(pb::WriteAction::Write, "restart", 0, b"hello world"),
            w(pb::WriteAction::Write, "", 11, b"!!"),
            w(pb::WriteAction::Write, "", 0, b"xy"),
            pb::WriteContentRequest {
                action: pb::WriteAction::Commit as i32,
                offset: 2,
                total: 2,
                expected: sha(b"xy").to_string(),
                ..Default::default()
            },
        ],
    )
    .await;
    let offs: Vec<i64> = r.iter().map(|r| r.as_ref().unwrap().offset).collect();
    assert_eq!(offs, vec![11, 13, 2, 2]);
    assert_eq!(r[2].as_ref().unwrap().digest, sha(b"xy").to_string());

    // A COMMIT that omits the offset after data truncates (containerd's rule) and then fails.
    let r = write_msgs(
        &mut c,
        vec![
            w(pb::WriteAction::Write, "zero", 0, b"abc"),
            pb::WriteContentRequest {
                action: pb::WriteAction::Commit as i32,
                total: 3,
                ..Default::default()
            },
        ],
    )
    .await;
    assert_eq!(r[1].as_ref().unwrap_err().code(), Code::FailedPrecondition);

    // STAT data is ignored.
    let r = write_msgs(
        &mut c,
        vec![w(pb::WriteAction::Stat, "statdata", 0, b"ignored")],
    )
    .await;
    assert_eq!(r[0].as_ref().unwrap().offset, 0);
}
