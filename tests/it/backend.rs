//! Backend-mode sockets: the raw store containerd expects behind a proxy plugin, one tenant
//! per socket, whose deletes release only its own hold.

use contentd::api::pb::containerd::services::content::v1 as pb;
use tonic::Code;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn raw_semantics_without_namespace() {
    let d = Daemon::start();
    let mut b = d.backend().await;
    let data = pattern(2048, 21);
    let dg = sha(&data).to_string();

    // containerd's backend writer: STAT with ref and total, no expected; digest only at COMMIT.
    let r = write_msgs(
        &mut b,
        vec![
            pb::WriteContentRequest {
                r#ref: "e2e/1/ref".into(),
                total: 2048,
                ..Default::default()
            },
            pb::WriteContentRequest {
                action: 1,
                offset: 0,
                data: data.clone().into(),
                ..Default::default()
            },
            pb::WriteContentRequest {
                action: 2,
                offset: 2048,
                total: 2048,
                expected: dg.clone(),
                ..Default::default()
            },
        ],
    )
    .await;
    assert_eq!(r[2].as_ref().unwrap().digest, dg);
    assert_eq!(read(&mut b, &dg, 0, 0).await.unwrap().0, data);
    // Committing it again: AlreadyExists, and no ingest left behind.
    assert_eq!(code(put(&mut b, "again", &data).await), Code::AlreadyExists);
    assert_eq!(
        code(
            b.status(pb::StatusRequest {
                r#ref: "again".into()
            })
            .await
        ),
        Code::NotFound
    );

    // Idempotent cleanup of unknown things; labels are not size-checked (as content/local).
    let unknown = sha(b"unknown").to_string();
    b.delete(pb::DeleteContentRequest {
        digest: unknown.clone(),
    })
    .await
    .unwrap();
    b.abort(pb::AbortRequest {
        r#ref: "never".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        code(b.info(pb::InfoRequest { digest: unknown }).await),
        Code::NotFound
    );

    // A namespace header on a backend socket changes nothing.
    let mut bn = connect(&d.backend_sock, Some("default")).await;
    assert_eq!(list(&mut bn, &[]).await.unwrap().concat().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_release_only_their_holds() {
    let d = Daemon::start();
    let mut t1 = d.backend().await;
    let mut t2 = d.other().await;
    let mut client = d.client(Some("app")).await;

    let data = pattern(10_000, 5);
    let dg = sha(&data).to_string();
    put(&mut t1, "w", &data).await.unwrap();
    assert!(
        list(&mut t2, &[]).await.unwrap().is_empty(),
        "a tenant lists only its holds"
    );

    // t2 looks it up (as containerd's shared-policy writer does) and so holds it too.
    t2.info(pb::InfoRequest { digest: dg.clone() })
        .await
        .unwrap();
    assert_eq!(list(&mut t2, &[]).await.unwrap().concat().len(), 1);
    // The same bytes committed in a client namespace.
    let r = write_msgs(&mut client, vec![commit_msg("c", &data, &[])]).await;
    r[0].as_ref().unwrap();

    // t1's GC deletes what it no longer knows: only its hold goes.
    t1.delete(pb::DeleteContentRequest { digest: dg.clone() })
        .await
        .unwrap();
    assert!(list(&mut t1, &[]).await.unwrap().is_empty());
    assert_eq!(read(&mut t2, &dg, 0, 0).await.unwrap().0, data);
    t2.delete(pb::DeleteContentRequest { digest: dg.clone() })
        .await
        .unwrap();
    assert_eq!(
        read(&mut client, &dg, 0, 0).await.unwrap().0,
        data,
        "the namespace still holds it"
    );
    client
        .delete(pb::DeleteContentRequest { digest: dg.clone() })
        .await
        .unwrap();
    // Nobody holds it now: the collector removes the bytes for everyone.
    let report = gc(&d.client_sock, false).await;
    assert!(report.swept.contains(&dg), "{report:?}");
    assert_eq!(
        code(t1.info(pb::InfoRequest { digest: dg.clone() }).await),
        Code::NotFound
    );

    // Ingests are per tenant.
    let r = write_msgs(
        &mut t1,
        vec![pb::WriteContentRequest {
            r#ref: "same".into(),
            ..Default::default()
        }],
    )
    .await;
    r[0].as_ref().unwrap();
    let r = write_msgs(
        &mut t2,
        vec![pb::WriteContentRequest {
            r#ref: "same".into(),
            ..Default::default()
        }],
    )
    .await;
    r[0].as_ref().unwrap();
    assert_eq!(
        t1.list_statuses(pb::ListStatusesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .statuses
            .len(),
        1
    );
}
