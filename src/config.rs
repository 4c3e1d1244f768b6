//! Daemon configuration: built-in defaults, an optional TOML file, then command-line flags
//! (flags win). Every field is documented here, and validated before anything starts.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// A backend-mode listener: the raw content store one containerd expects behind its
/// `[proxy_plugins]` entry. Each is its own tenant.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Tenant name; defaults to the socket's file stem.
    pub name: Option<String>,
    pub socket: PathBuf,
}

impl Backend {
    /// Parses `PATH` or `NAME=PATH` from the command line.
    pub fn parse(s: &str) -> Result<Backend> {
        match s.split_once('=') {
            Some((name, path)) if !name.contains('/') => Ok(Backend {
                name: Some(name.to_string()),
                socket: PathBuf::from(path),
            }),
            _ => Ok(Backend {
                name: None,
                socket: PathBuf::from(s),
            }),
        }
    }

    pub fn tenant(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.socket
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "backend".into())
        })
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// RocksDB data directory.
    pub root: PathBuf,
    /// Client-mode unix socket (containerd content-service semantics; namespace required).
    /// Empty string disables it.
    pub socket: PathBuf,
    /// Backend-mode unix sockets, one tenant each.
    pub backend: Vec<Backend>,
    /// Optional client-mode TCP listener, e.g. "127.0.0.1:7070".
    pub tcp: Option<String>,
    /// Log format: "text" or "json".
    pub log_format: String,
    /// Seconds between background garbage collections (0 disables the timer).
    pub gc_interval_secs: u64,
    /// Content linked within this many seconds is a GC root (it may still be being
    /// assembled into an image by a client that uses no lease).
    pub gc_grace_secs: u64,
    /// A collection also starts once this many deletions (content, images) accumulate.
    pub gc_deletion_threshold: u64,
    /// A collection also starts once this many mutations (new blobs, image creates and
    /// updates, lease resources added) accumulate; 0 disables this trigger.
    pub gc_mutation_threshold: u64,
    /// An ingest no lease holds is dropped after this many seconds without a write.
    pub ingest_expiry_secs: u64,
    /// Upstream registries for pulls and on-demand fetches (`[upstream]`,
    /// `[upstream.registries."HOST"]`).
    pub upstream: crate::upstream::UpstreamConfig,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Default for Config {
    fn default() -> Self {
        let (root, socket) = if is_root() {
            (
                PathBuf::from("/var/lib/contentd"),
                PathBuf::from("/run/contentd/contentd.sock"),
            )
        } else {
            let data = std::env::var_os("XDG_DATA_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
                .unwrap_or_else(|| PathBuf::from("."));
            let run = std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            (data.join("contentd"), run.join("contentd/contentd.sock"))
        };
        Config {
            root,
            socket,
            backend: Vec::new(),
            tcp: None,
            log_format: "text".into(),
            gc_interval_secs: 600,
            gc_grace_secs: 3600,
            gc_deletion_threshold: 100,
            gc_mutation_threshold: 1000,
            ingest_expiry_secs: 24 * 3600,
            upstream: Default::default(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid(format!("cannot read config file {}: {e}", path.display()))
        })?;
        toml::from_str(&text)
            .map_err(|e| Error::invalid(format!("config file {}: {e}", path.display())))
    }

    pub fn validate(&self) -> Result<()> {
        if self.root.as_os_str().is_empty() {
            return Err(Error::invalid("root must not be empty"));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(Error::invalid(format!(
                "log_format {:?}: expected \"text\" or \"json\"",
                self.log_format
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for b in &self.backend {
            let t = b.tenant();
            crate::store::Scope::tenant(&t)?;
            if !seen.insert(t.clone()) {
                return Err(Error::invalid(format!(
                    "backend tenant {t:?} is configured twice"
                )));
            }
            if b.socket == self.socket {
                return Err(Error::invalid(format!(
                    "{} is both the client and a backend socket",
                    b.socket.display()
                )));
            }
        }
        if let Some(addr) = &self.tcp {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| Error::invalid(format!("tcp address {addr:?}: {e}")))?;
        }
        self.upstream.validate()?;
        if self.socket.as_os_str().is_empty() && self.backend.is_empty() && self.tcp.is_none() {
            return Err(Error::invalid("no listener configured"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_validation() {
        let c: Config = toml::from_str(
            r#"root = "/tmp/x"
               socket = "/tmp/x.sock"
               tcp = "127.0.0.1:7070"
               [[backend]]
               socket = "/run/a/ctrd.sock"
               [[backend]]
               name = "other"
               socket = "/run/b.sock""#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.backend[0].tenant(), "ctrd");
        assert_eq!(c.backend[1].tenant(), "other");
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        let mut bad = c.clone();
        bad.tcp = Some("nope".into());
        assert!(
            bad.validate()
                .unwrap_err()
                .message()
                .contains("tcp address")
        );
        let mut dup = c.clone();
        dup.backend[1].name = Some("ctrd".into());
        assert!(dup.validate().is_err());
    }

    #[test]
    fn backend_flag_forms() {
        assert_eq!(Backend::parse("/a/b.sock").unwrap().tenant(), "b");
        assert_eq!(Backend::parse("t1=/a/b.sock").unwrap().tenant(), "t1");
    }
}
