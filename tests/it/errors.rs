//! Every row of containerd's error-code table, and bad input of every kind: each gets the
//! right code, a message that names the problem, and leaves stored content untouched.

use contentd::api::pb::containerd::services::content::v1 as pb;
use tonic::Code;

use crate::harness::*;

fn msg<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let e = r.unwrap_err();
    (e.code(), e.message().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn error_code_table() {
    let d = Daemon::start();
    let mut c = d.client(Some("errs")).await;
    let keep = pattern(300, 11);
    let kd = sha(&keep).to_string();
    put(&mut c, "keep", &keep).await.unwrap();

    // Malformed digests: InvalidArgument on every digest-taking RPC.
    for bad in [
        "nope",
        "sha256:xyz",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha256:ABCDEF",
        "",
    ] {
        let (code_, m) = msg(c.info(pb::InfoRequest { digest: bad.into() }).await);
        assert_eq!(code_, Code::InvalidArgument, "{bad}");
        assert!(m.contains("invalid digest"), "{m}");
        assert_eq!(code_of_read(&mut c, bad).await, Code::InvalidArgument);
        assert_eq!(
            code(
                c.delete(pb::DeleteContentRequest { digest: bad.into() })
                    .await
            ),
            Code::InvalidArgument
        );
        let upd = pb::UpdateRequest {
            info: Some(pb::Info {
                digest: bad.into(),
                ..Default::default()
            }),
            update_mask: None,
        };
        assert_eq!(code(c.update(upd).await), Code::InvalidArgument);
    }

    // Unknown digest: NotFound.
    let unknown = sha(b"never written").to_string();
    let (code_, m) = msg(c
        .info(pb::InfoRequest {
            digest: unknown.clone(),
        })
        .await);
    assert_eq!(code_, Code::NotFound);
    assert!(m.contains(&unknown), "{m}");
    assert_eq!(code_of_read(&mut c, &unknown).await, Code::NotFound);
    assert_eq!(
        code(
            c.delete(pb::DeleteContentRequest {
                digest: unknown.clone()
            })
            .await
        ),
        Code::NotFound
    );
    let upd = pb::UpdateRequest {
        info: Some(pb::Info {
            digest: unknown.clone(),
            ..Default::default()
        }),
        update_mask: None,
    };
    assert_eq!(code(c.update(upd).await), Code::NotFound);
    let (code_, m) = msg(c
        .status(pb::StatusRequest {
            r#ref: "nope".into(),
        })
        .await);
    assert_eq!(code_, Code::NotFound);
    assert!(m.contains("could not get status for ref \"nope\""), "{m}");
    assert_eq!(
        code(
            c.abort(pb::AbortRequest {
                r#ref: "nope".into()
            })
            .await
        ),
        Code::NotFound
    );

    // Namespace missing or invalid on a client socket.
    let mut nons = d.client(None).await;
    let (code_, m) = msg(nons.info(pb::InfoRequest { digest: kd.clone() }).await);
    assert_eq!(code_, Code::FailedPrecondition);
    assert!(m.contains("namespace is required"), "{m}");
    assert_eq!(code(list(&mut nons, &[]).await), Code::FailedPrecondition);
    assert_eq!(
        code(put(&mut nons, "x", b"x").await),
        Code::FailedPrecondition
    );
    let mut badns = d.client(Some("bad..name")).await;
    assert_eq!(
        code(badns.info(pb::InfoRequest { digest: kd.clone() }).await),
        Code::InvalidArgument
    );

    // Write: first message without ref.
    let r = write_msgs(
        &mut c,
        vec![pb::WriteContentRequest {
            total: 5,
            ..Default::default()
        }],
    )
    .await;
    let (code_, m) = msg(r.into_iter().next().unwrap());
    assert_eq!(code_, Code::InvalidArgument);
    assert!(m.contains("first message must have a reference"), "{m}");

    // Write: expected already committed, on the first message and on a later one.
    let r = write_msgs(
        &mut c,
        vec![pb::WriteContentRequest {
            r#ref: "dup".into(),
            expected: kd.clone(),
            total: 300,
            ..Default::default()
        }],
    )
    .await;
    assert_eq!(code(r.into_iter().next().unwrap()), Code::AlreadyExists);
    let r = write_msgs(
        &mut c,
        vec![
            pb::WriteContentRequest {
                r#ref: "dup2".into(),
                ..Default::default()
            },
            pb::WriteContentRequest {
                expected: kd.clone(),
                ..Default::default()
            },
        ],
    )
    .await;
    assert_eq!(code(r.into_iter().nth(1).unwrap()), Code::AlreadyExists);
    assert_eq!(
        code(
            c.status(pb::StatusRequest {
                r#ref: "dup2".into()
            })
            .await
        ),
        Code::NotFound,
        "ingest aborted"
    );

    // Write: out-of-order offsets.
    let r = write_msgs(
        &mut c,
        vec![
            pb::WriteContentRequest {
                action: 1,
                r#ref: "gap".into(),
                data: b"abc".to_vec().into(),
                ..Default::default()
            },
            pb::WriteContentRequest {
                action: 1,
                offset: 10,
                data: b"def".to_vec().into(),
                ..Default::default()
            },
        ],
    )
    .await;
    let (code_, m) = msg(r.into_iter().nth(1).unwrap());
    assert_eq!(code_, Code::OutOfRange);
    assert!(
        m.contains("write @10 must occur at current offset 3"),
        "{m}"
    );

    // Commit: wrong size, wrong digest (ingest kept), existing content.
    for (name, total, expected) in [
        ("size", 99, String::new()),
        ("digest", 0, sha(b"other").to_string()),
    ] {
        let r = write_msgs(
            &mut c,
            vec![pb::WriteContentRequest {
                action: 2,
                r#ref: format!("bad-{name}"),
                total,
                expected,
                data: b"0123456789".to_vec().into(),
                ..Default::default()
            }],
        )
        .await;
        let (code_, m) = msg(r.into_iter().next().unwrap());
        assert_eq!(code_, Code::FailedPrecondition, "{name}");
        assert!(m.contains("unexpected commit"), "{m}");
        let st = c
            .status(pb::StatusRequest {
                r#ref: format!("bad-{name}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            st.status.unwrap().offset,
            10,
            "failed commit keeps the ingest"
        );
    }
    let r = write_msgs(
        &mut c,
        vec![pb::WriteContentRequest {
            action: 2,
            r#ref: "again".into(),
            data: keep.clone().into(),
            ..Default::default()
        }],
    )
    .await;
    assert_eq!(code(r.into_iter().next().unwrap()), Code::AlreadyExists);

    // Two writers on one ref.
    let (tx1, rx1) = tokio::sync::mpsc::channel(4);
    let mut s1 = c
        .clone()
        .write(tokio_stream::wrappers::ReceiverStream::new(rx1))
        .await
        .unwrap()
        .into_inner();
    tx1.send(pb::WriteContentRequest {
        r#ref: "held".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    s1.message().await.unwrap().unwrap();
    let t = std::time::Instant::now();
    let r = write_msgs(
        &mut c,
        vec![pb::WriteContentRequest {
            r#ref: "held".into(),
            ..Default::default()
        }],
    )
    .await;
    let (code_, m) = msg(r.into_iter().next().unwrap());
    assert_eq!(code_, Code::Unavailable);
    assert!(m.contains("ref held locked"), "{m}");
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(400),
        "waits like containerd before giving up"
    );
    drop(tx1);
    while s1.message().await.unwrap().is_some() {}
    let r = write_msgs(
        &mut c,
        vec![pb::WriteContentRequest {
            r#ref: "held".into(),
            ..Default::default()
        }],
    )
    .await;
    assert_eq!(
        code(r.into_iter().next().unwrap()),
        Code::Ok,
        "free again once the first stream ends"
    );

    // Read past the end.
    let (code_, m) = msg(read(&mut c, &kd, 301, 0).await);
    assert_eq!(code_, Code::OutOfRange);
    assert!(m.contains("read past object length"), "{m}");

    // Unparsable filters.
    let (code_, m) = msg(list(&mut c, &["labels.a=="]).await);
    assert_eq!(code_, Code::InvalidArgument);
    assert!(m.contains("filters: parse error"), "{m}");
    let r = c
        .list_statuses(pb::ListStatusesRequest {
            filters: vec!["ref~=(".into()],
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);

    // Update masks other than labels.
    let upd = pb::UpdateRequest {
        info: Some(pb::Info {
            digest: kd.clone(),
            size: 1,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["size".into()],
        }),
    };
    let (code_, m) = msg(c.update(upd).await);
    assert_eq!(code_, Code::InvalidArgument);
    assert!(m.contains("cannot update \"size\""), "{m}");

    // Oversize labels, on commit and on update.
    let big = "v".repeat(4097);
    let r = write_msgs(
        &mut c,
        vec![commit_msg("biglabel", b"label test", &[("k", &big)])],
    )
    .await;
    let (code_, m) = msg(r.into_iter().next().unwrap());
    assert_eq!(code_, Code::InvalidArgument);
    assert!(m.contains("maximum size"), "{m}");
    let upd = pb::UpdateRequest {
        info: Some(pb::Info {
            digest: kd.clone(),
            labels: [("k".to_string(), big.clone())].into(),
            ..Default::default()
        }),
        update_mask: None,
    };
    assert_eq!(code(c.update(upd).await), Code::InvalidArgument);

    // A Read request far larger than any real one is refused before it is decoded; one sent
    // compressed is refused as the service accepts no compression.
    let (code_, m) = msg(read(&mut c, &"a".repeat(20 << 10), 0, 0).await);
    assert_eq!(code_, Code::ResourceExhausted);
    assert!(m.contains("Read request larger than"), "{m}");
    let mut gz = c
        .clone()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    assert_eq!(code_of_read(&mut gz, &kd).await, Code::Unimplemented);

    // Nothing stored was harmed by any of it.
    let (got, _) = read(&mut c, &kd, 0, 0).await.unwrap();
    assert_eq!(got, keep);
    let info = c
        .info(pb::InfoRequest { digest: kd.clone() })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert!(info.labels.is_empty());
}

async fn code_of_read(c: &mut Client, d: &str) -> Code {
    code(read(c, d, 0, 0).await)
}
