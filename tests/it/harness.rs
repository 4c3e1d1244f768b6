//! Starts the real `contentd` binary on temporary sockets and hands out clients.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use contentd::api::pb::containerd::services::content::v1 as pb;
use contentd::client::{Namespace, connect_unix};
use contentd::digest::{Algorithm, Digest};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

pub type Client = pb::content_client::ContentClient<InterceptedService<Channel, Namespace>>;

pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub client_sock: PathBuf,
    pub backend_sock: PathBuf,
    pub other_sock: PathBuf,
    extra: Vec<String>,
    /// A limit on open files (soft and hard) the daemon runs under.
    pub nofile: Option<u64>,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// A daemon with extra `serve` flags.
    pub fn start_with(args: &[&str]) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("contentd-it")
            .tempdir_in("/tmp")
            .unwrap();
        let mut d = Daemon {
            child: None,
            dir: tmp.path().to_path_buf(),
            client_sock: tmp.path().join("c.sock"),
            backend_sock: tmp.path().join("b.sock"),
            other_sock: tmp.path().join("o.sock"),
            extra: args.iter().map(|a| a.to_string()).collect(),
            nofile: None,
            _tmp: None,
        }
        .spawn();
        d._tmp = Some(tmp);
        d
    }

    /// Starts (or restarts) a daemon whose data and sockets live under `dir`.
    pub fn start_in(dir: &Path) -> Daemon {
        Daemon::start_in_with(dir, &[])
    }

    /// [`Daemon::start_in`] with extra `serve` flags.
    pub fn start_in_with(dir: &Path, args: &[&str]) -> Daemon {
        let mut d = Daemon::unspawned_in(dir);
        d.extra = args.iter().map(|a| a.to_string()).collect();
        d.spawn()
    }

    /// A daemon under `dir` not started yet: set fields, then [`Daemon::started`].
    pub fn unspawned_in(dir: &Path) -> Daemon {
        Daemon {
            child: None,
            dir: dir.to_path_buf(),
            client_sock: dir.join("c.sock"),
            backend_sock: dir.join("b.sock"),
            other_sock: dir.join("o.sock"),
            extra: Vec::new(),
            nofile: None,
            _tmp: None,
        }
    }

    /// Starts a daemon made by [`Daemon::unspawned_in`].
    pub fn started(self) -> Daemon {
        self.spawn()
    }

    fn spawn(mut self) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_contentd"));
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt as _;
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd
            .arg("serve")
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--socket")
            .arg(&self.client_sock)
            .arg("--backend-socket")
            .arg(&self.backend_sock)
            .arg("--backend-socket")
            .arg(format!("other={}", self.other_sock.display()))
            .args(&self.extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning contentd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in [&self.client_sock, &self.backend_sock, &self.other_sock] {
            while std::os::unix::net::UnixStream::connect(s).is_err() {
                if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!("contentd exited early ({st}): {}", self.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "contentd did not listen on {}",
                    s.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self
    }

    /// The running daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().unwrap();
            assert!(st.success(), "contentd exited with {st}: {}", self.log());
        }
    }

    pub fn restart(mut self) -> Daemon {
        self.stop();
        self.spawn()
    }

    pub async fn client(&self, ns: Option<&str>) -> Client {
        connect(&self.client_sock, ns).await
    }

    pub async fn backend(&self) -> Client {
        connect(&self.backend_sock, None).await
    }

    pub async fn other(&self) -> Client {
        connect(&self.other_sock, None).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log ({}) ---\n{}",
                self.dir.display(),
                self.log()
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn connect(sock: &Path, ns: Option<&str>) -> Client {
    let ch = connect_unix(sock).await.unwrap();
    pb::content_client::ContentClient::with_interceptor(ch, Namespace::new(ns).unwrap())
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

pub fn sha(data: &[u8]) -> Digest {
    Digest::of(Algorithm::Sha256, data)
}

pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `msgs` on one Write stream and collects one result per response, stopping at the
/// first error.
pub async fn write_msgs(
    c: &mut Client,
    msgs: Vec<pb::WriteContentRequest>,
) -> Vec<Result<pb::WriteContentResponse, tonic::Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(msgs.len() + 1);
    let mut out = Vec::new();
    let mut msgs = msgs.into_iter();
    // Queue the first message before the call: a server may hold its response headers
    // until it has answered the first request.
    if let Some(first) = msgs.next() {
        tx.send(first).await.unwrap();
    }
    let mut stream = match c
        .write(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => return vec![Err(e)],
    };
    let mut pending = true;
    loop {
        if !pending {
            match msgs.next() {
                Some(m) => tx.send(m).await.unwrap(),
                None => break,
            }
        }
        pending = false;
        match stream.message().await {
            Ok(Some(r)) => out.push(Ok(r)),
            Ok(None) => break,
            Err(e) => {
                out.push(Err(e));
                break;
            }
        }
    }
    drop(tx);
    out
}

pub fn commit_msg(r: &str, data: &[u8], labels: &[(&str, &str)]) -> pb::WriteContentRequest {
    pb::WriteContentRequest {
        action: pb::WriteAction::Commit as i32,
        r#ref: r.into(),
        total: data.len() as i64,
        expected: sha(data).to_string(),
        data: data.to_vec().into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Writes a whole blob in one COMMIT message.
pub async fn put(
    c: &mut Client,
    r: &str,
    data: &[u8],
) -> Result<pb::WriteContentResponse, tonic::Status> {
    write_msgs(c, vec![commit_msg(r, data, &[])])
        .await
        .pop()
        .unwrap()
}

pub async fn read(
    c: &mut Client,
    d: &str,
    offset: i64,
    size: i64,
) -> Result<(Vec<u8>, Vec<(i64, usize)>), tonic::Status> {
    let mut s = c
        .read(pb::ReadContentRequest {
            digest: d.into(),
            offset,
            size,
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    let mut msgs = Vec::new();
    while let Some(m) = s.message().await? {
        msgs.push((m.offset, m.data.len()));
        data.extend_from_slice(&m.data);
    }
    Ok((data, msgs))
}

pub async fn list(c: &mut Client, filters: &[&str]) -> Result<Vec<Vec<pb::Info>>, tonic::Status> {
    let mut s = c
        .list(pb::ListContentRequest {
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut batches = Vec::new();
    while let Some(m) = s.message().await? {
        batches.push(m.info);
    }
    Ok(batches)
}

pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    }
}

/// Runs a garbage collection through `contentd.v1.GC`.
pub async fn gc(sock: &Path, dry_run: bool) -> contentd::api::pb::contentd::v1::Report {
    let ch = connect_unix(sock).await.unwrap();
    let mut c = contentd::api::pb::contentd::v1::gc_client::GcClient::new(ch);
    c.run(contentd::api::pb::contentd::v1::RunRequest { dry_run })
        .await
        .unwrap()
        .into_inner()
}

/// The messages of one upload of `data` as ref `r`: 1 MiB WRITEs, then a COMMIT expecting
/// its digest, with `labels`.
pub fn upload_msgs(r: &str, data: &[u8], labels: &[(&str, &str)]) -> Vec<pb::WriteContentRequest> {
    let mut msgs = vec![pb::WriteContentRequest {
        r#ref: r.into(),
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
    msgs.push(pb::WriteContentRequest {
        action: 2,
        offset: data.len() as i64,
        total: data.len() as i64,
        expected: sha(data).to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    });
    msgs
}

/// Writes `bytes` as blob `dg` in 1 MiB WRITE messages; an existing blob is fine.
pub async fn put_blob(c: &mut Client, dg: &str, bytes: &[u8]) {
    let mut msgs = upload_msgs(&format!("w-{dg}"), bytes, &[]);
    msgs.last_mut().unwrap().expected = dg.to_string();
    match write_msgs(c, msgs).await.pop().unwrap() {
        Ok(r) => assert_eq!(r.digest, dg),
        Err(e) => assert_eq!(e.code(), tonic::Code::AlreadyExists, "{dg}: {e}"),
    }
}

/// Flips a byte of a blob's first stored chunk directly in the RocksDB of a stopped daemon
/// whose directory is `dir`: corruption behind the daemon's back.
pub fn corrupt_first_chunk(dir: &Path, namespace: &str, d: &Digest, at: usize) {
    use contentd::kv::{Batch, Cf};
    let kv = contentd::kv::rocks::RocksKv::open(&dir.join("root"), &Default::default()).unwrap();
    let store = contentd::store::Store::open(std::sync::Arc::new(kv)).unwrap();
    let scope = contentd::store::Scope::namespace(namespace).unwrap();
    let loc = store.locate(&scope, d).unwrap();
    let mut key = loc.extent.to_be_bytes().to_vec();
    key.extend_from_slice(&0u64.to_be_bytes());
    let mut v = store
        .kv()
        .get(Cf::Chunks, &key)
        .unwrap()
        .expect("the first chunk");
    v[at] ^= 0x5a;
    let mut b = Batch::new();
    b.put(Cf::Chunks, key, v);
    store.kv().write(b, true).unwrap();
}

/// Whether `tool` is on PATH; a missing tool skips the test, or fails it under
/// `CONTENTD_REQUIRE_TOOLS` (CI installs every tool).
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    if !found {
        assert!(
            std::env::var_os("CONTENTD_REQUIRE_TOOLS").is_none(),
            "{tool} is not installed"
        );
        eprintln!("skipping: {tool} not installed");
    }
    found
}
