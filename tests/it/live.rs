//! Reads of a blob that is still being written: bytes as they land, the end at commit, and a
//! clear error when the upload stops or fails verification.

use std::time::Duration;

use contentd::api::pb::containerd::services::content::v1 as cpb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::*;

struct Upload {
    tx: mpsc::Sender<cpb::WriteContentRequest>,
    resp: tonic::Streaming<cpb::WriteContentResponse>,
}

impl Upload {
    async fn open(c: &mut Client, r: &str, expected: &str, total: i64) -> Upload {
        let (tx, rx) = mpsc::channel(4);
        tx.send(cpb::WriteContentRequest {
            action: 0,
            r#ref: r.into(),
            expected: expected.into(),
            total,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut resp = c.write(ReceiverStream::new(rx)).await.unwrap().into_inner();
        resp.message().await.unwrap().unwrap();
        Upload { tx, resp }
    }

    async fn send(
        &mut self,
        action: i32,
        offset: i64,
        data: &[u8],
        total: i64,
        expected: &str,
    ) -> Result<(), tonic::Status> {
        self.tx
            .send(cpb::WriteContentRequest {
                action,
                offset,
                data: data.to_vec().into(),
                total,
                expected: expected.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        self.resp.message().await.map(|_| ())
    }
}

async fn reader(
    sock: std::path::PathBuf,
    d: String,
) -> (
    mpsc::Receiver<usize>,
    tokio::task::JoinHandle<Result<Vec<u8>, tonic::Status>>,
) {
    let (progress, rx) = mpsc::channel(1024);
    let h = tokio::spawn(async move {
        let mut c = connect(&sock, Some("live")).await;
        let mut s = c
            .read(cpb::ReadContentRequest {
                digest: d,
                offset: 0,
                size: 0,
            })
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(m) = s.message().await? {
            data.extend_from_slice(&m.data);
            let _ = progress.try_send(data.len());
        }
        Ok(data)
    });
    (rx, h)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_follows_an_upload_until_it_commits() {
    let d = Daemon::start();
    let mut c = d.client(Some("live")).await;
    let data = pattern(6 << 20, 77);
    let dg = sha(&data).to_string();
    let mut up = Upload::open(&mut c, "live-1", &dg, data.len() as i64).await;
    for i in 0..3usize {
        up.send(1, (i << 20) as i64, &data[i << 20..(i + 1) << 20], 0, "")
            .await
            .unwrap();
    }
    // The reader attaches mid-upload and gets the three landed MiB before anything else is sent.
    let (mut progress, h) = reader(d.client_sock.clone(), dg.clone()).await;
    let mut got = 0;
    while got < 3 << 20 {
        got = tokio::time::timeout(Duration::from_secs(10), progress.recv())
            .await
            .expect("the landed bytes did not reach the reader")
            .unwrap();
    }
    assert!(!h.is_finished(), "the read ended before the commit");
    for i in 3..6usize {
        let action = if i == 5 { 2 } else { 1 };
        let total = if i == 5 { data.len() as i64 } else { 0 };
        up.send(
            action,
            (i << 20) as i64,
            &data[i << 20..(i + 1) << 20],
            total,
            "",
        )
        .await
        .unwrap();
    }
    let read_back = h.await.unwrap().unwrap();
    assert!(read_back == data, "the live read returned different bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_of_a_failed_upload_gets_a_clear_error() {
    let d = Daemon::start();
    let mut c = d.client(Some("live")).await;
    let data = pattern(2 << 20, 78);

    // The upload stops (its stream closes) before commit: Unavailable.
    let dg = sha(&data).to_string();
    let mut up = Upload::open(&mut c, "live-2", &dg, data.len() as i64).await;
    up.send(1, 0, &data[..1 << 20], 0, "").await.unwrap();
    let (mut progress, h) = reader(d.client_sock.clone(), dg.clone()).await;
    progress.recv().await.unwrap();
    drop(up);
    let e = h.await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("stopped at offset"), "{e}");

    // The bytes do not hash to the expected digest: DataLoss, and nothing is committed.
    let wrong = sha(b"not these bytes").to_string();
    let mut up = Upload::open(&mut c, "live-3", &wrong, data.len() as i64).await;
    up.send(1, 0, &data[..1 << 20], 0, "").await.unwrap();
    let (mut progress, h) = reader(d.client_sock.clone(), wrong.clone()).await;
    progress.recv().await.unwrap();
    let e = up
        .send(2, 1 << 20, &data[1 << 20..], data.len() as i64, "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let e = h.await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::DataLoss, "{e}");
    assert!(e.message().contains("failed verification"), "{e}");
    let info = c.info(cpb::InfoRequest { digest: wrong }).await;
    assert_eq!(code(info), tonic::Code::NotFound);

    // Restarting the upload from zero under a reader: Aborted.
    let mut up = Upload::open(&mut c, "live-4", &dg, data.len() as i64).await;
    up.send(1, 0, &data[..1 << 20], 0, "").await.unwrap();
    let (mut progress, h) = reader(d.client_sock.clone(), dg.clone()).await;
    progress.recv().await.unwrap();
    up.send(1, 0, &data[..1 << 20], 0, "").await.unwrap();
    let e = h.await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e}");
}
