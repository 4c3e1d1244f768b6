//! A real upstream for the pull tests: Debian's docker-registry (CNCF distribution) on a
//! loopback port, started and filled by shared/images/registry.sh, plus a byte-level TCP
//! proxy that can slow, stall or cut the registry's responses.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The shared directory (with images/registry.sh), or None when absent and not required.
pub fn shared() -> Option<PathBuf> {
    let found = std::env::var_os("CONTENTD_SHARED")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
            PathBuf::from("/work/shared"),
        ])
        .find(|p| p.join("images/registry.sh").exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CONTENTD_REQUIRE_TOOLS").is_none(),
            "shared/images/registry.sh not found (set CONTENTD_SHARED)"
        );
    }
    found
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Registry {
    pub addr: String,
    work: tempfile::TempDir,
    script: PathBuf,
}

impl Registry {
    /// A registry on a free loopback port with every fixture of `fixtures` pushed.
    pub fn start(fixtures: &Path) -> Option<Registry> {
        let shared = shared()?;
        if !crate::harness::have("docker-registry") {
            return None;
        }
        let r = Registry {
            addr: format!("127.0.0.1:{}", free_port()),
            work: tempfile::Builder::new()
                .prefix("contentd-reg")
                .tempdir_in("/tmp")
                .unwrap(),
            script: shared.join("images/registry.sh"),
        };
        r.sh(&["start"]);
        r.sh(&["push", fixtures.to_str().unwrap()]);
        Some(r)
    }

    fn sh(&self, args: &[&str]) {
        let out = std::process::Command::new("bash")
            .arg(&self.script)
            .args(args)
            .env("IMGWORK", self.work.path())
            .env("REGISTRY_ADDR", &self.addr)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "registry.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILL, mid-response: no graceful drain.
    pub fn kill9(&self) {
        let pid = std::fs::read_to_string(self.work.path().join("registry/registry.pid")).unwrap();
        // SAFETY: kill(2) on the registry process this helper started.
        unsafe { libc::kill(pid.trim().parse().unwrap(), libc::SIGKILL) };
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    pub fn start_again(&self) {
        self.sh(&["start"]);
    }

    /// The file the registry serves blob `digest` from.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.work.path().join(format!(
            "registry/data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// The registry's access log.
    pub fn log_path(&self) -> PathBuf {
        self.work.path().join("registry/registry.log")
    }

    /// Completed requests in the access log whose request line contains `needle`.
    pub fn requests(&self, method: &str, needle: &str) -> usize {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let prefix = format!("\"{method} ");
        log.lines()
            .filter(|l| l.contains(&prefix) && l.contains(needle))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .env("IMGWORK", self.work.path())
            .env("REGISTRY_ADDR", &self.addr)
            .output();
    }
}

/// A TCP proxy in front of the registry. Requests pass at full speed (their heads are
/// recorded); responses pass at `rate` bytes/s, or not at all while stalled. When the
/// registry side ends, the client side is closed too, so a registry killed mid-body looks
/// to contentd exactly like a dead upstream.
pub struct Proxy {
    pub addr: String,
    stalled: Arc<AtomicBool>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: &str, rate: u64) -> Proxy {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let rate = Arc::new(AtomicU64::new(rate));
        let stalled = Arc::new(AtomicBool::new(false));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let up = upstream.to_string();
        let (r2, s2, h2) = (rate.clone(), stalled.clone(), heads.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = l.accept().await else {
                    return;
                };
                let (up, rate, stalled, heads) = (up.clone(), r2.clone(), s2.clone(), h2.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&up).await else {
                        return; // dropping the client connection: the upstream is down
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up_task = tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            heads
                                .lock()
                                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        while stalled.load(Ordering::Relaxed) {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        let r = rate.load(Ordering::Relaxed);
                        if r > 0 {
                            tokio::time::sleep(std::time::Duration::from_secs_f64(
                                n as f64 / r as f64,
                            ))
                            .await;
                        }
                    }
                    let _ = cw.shutdown().await;
                    up_task.abort();
                });
            }
        });
        Proxy {
            addr,
            stalled,
            heads,
            task,
        }
    }

    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::Relaxed);
    }

    /// Request heads sent through the proxy (lower-cased), in order.
    pub fn requests(&self) -> Vec<String> {
        self.heads.lock().iter().map(|h| h.to_lowercase()).collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
