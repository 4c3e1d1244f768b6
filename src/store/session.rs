//! containerd's Write stream as a store-level state machine, with no wire types in it: a
//! stream is bound to the ref of its first request, and every request (STAT, WRITE, COMMIT)
//! gets one response. The gRPC module only translates messages to [`WriteRequest`] and
//! [`WriteResponse`]; the fuzz target and the tests drive this type directly.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Scope, Store, Writer};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// What a request asks for (containerd's `WriteAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAction {
    Stat,
    Write,
    Commit,
}

/// One request of a Write stream, already parsed.
#[derive(Debug, Clone, Default)]
pub struct WriteRequest {
    pub action: Option<WriteAction>,
    pub offset: i64,
    pub total: i64,
    pub expected: Option<Digest>,
    pub data: bytes::Bytes,
    /// Commit labels; None when the request carried none (containerd passes nil then).
    pub labels: Option<HashMap<String, String>>,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteResponse {
    pub action: WriteAction,
    pub started_ns: i64,
    pub updated_ns: i64,
    pub offset: i64,
    pub total: i64,
    pub digest: Digest,
}

/// One Write stream's state: its writer, and whether the next request is the first.
pub struct WriteSession {
    writer: Writer,
    steps: Steps,
}

/// Where a stream is in its requests: the first one's expected digest was given at open,
/// and nothing follows a commit.
struct Steps {
    first: bool,
    done: bool,
}

impl WriteSession {
    /// Opens the session and answers its first request, in one blocking-pool task (or none,
    /// for a STAT opening a new ingest).
    pub async fn start(
        store: &Arc<Store>,
        scope: Scope,
        reference: &str,
        total: i64,
        expected: Option<Digest>,
        lease: Option<String>,
        first: WriteRequest,
    ) -> Result<(WriteSession, WriteResponse)> {
        if reference.is_empty() {
            return Err(Error::invalid("first message must have a reference"));
        }
        let stores = !(first.action == Some(WriteAction::Stat) && first.data.is_empty());
        let (writer, (r, steps)) = store
            .open_writer_with(scope, reference, total, expected, lease, stores, move |w| {
                let mut steps = Steps {
                    first: true,
                    done: false,
                };
                Ok((steps.step(w, first), steps))
            })
            .await?;
        Ok((WriteSession { writer, steps }, r?))
    }

    /// Whether `req` can be answered from this stream's state alone, with no storage and so
    /// no blocking-pool hand-off ([`WriteSession::step_in_memory`]): a STAT that changes
    /// nothing stored, with nothing queued; or a WRITE a new ingest holds until its commit
    /// ([`Writer::can_hold`]).
    pub fn in_memory(&self, req: &WriteRequest) -> bool {
        if self.steps.done || !(self.steps.first || req.expected.is_none()) {
            return false;
        }
        match req.action {
            Some(WriteAction::Stat) => req.data.is_empty() && !self.writer.has_queued(),
            Some(WriteAction::Write) => self.writer.can_hold(req.offset, req.data.len()),
            _ => false,
        }
    }

    /// Applies a request [`WriteSession::in_memory`] accepted, on the caller's thread.
    ///
    /// A held WRITE is acknowledged before its bytes are stored; the ingest, which has
    /// nothing stored yet, is then stored whole by the COMMIT's one synced batch, or by any
    /// other request, or when the stream ends (dropping the session flushes it: do that on
    /// the blocking pool, see [`WriteSession::has_queued`]). So a daemon killed between
    /// the two loses the ingest, as it loses unlogged bulk chunks (resume trims to what is
    /// stored): the client's resume finds no ingest and writes from zero. Nothing committed
    /// is ever at stake.
    pub fn step_in_memory(&mut self, req: WriteRequest) -> Result<WriteResponse> {
        if self.steps.done {
            return Err(Error::precondition("the stream already committed its blob"));
        }
        let r = self.steps.apply(&mut self.writer, req);
        self.steps.first = false;
        self.writer.hold_queued();
        r
    }

    /// Whether dropping this session would write (bytes held or changes queued).
    pub fn has_queued(&self) -> bool {
        self.writer.has_queued()
    }

    /// Whether a commit ended the stream.
    pub fn is_done(&self) -> bool {
        self.steps.done
    }

    /// Applies one request. Whatever it changed (even if it then failed) is written before
    /// this returns, so the response never acknowledges bytes that are not stored. Blocking:
    /// run it on the blocking pool.
    pub fn step(&mut self, req: WriteRequest) -> Result<WriteResponse> {
        self.steps.step(&mut self.writer, req)
    }

    /// Tells readers following this upload why the stream stopped.
    pub fn fail_live(&mut self, e: Error) {
        self.writer.fail_live(e);
    }
}

impl Steps {
    fn step(&mut self, w: &mut Writer, req: WriteRequest) -> Result<WriteResponse> {
        if self.done {
            return Err(Error::precondition("the stream already committed its blob"));
        }
        let r = self.apply(w, req);
        self.first = false;
        match (r, w.flush()) {
            (Ok(v), Ok(())) => Ok(v),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    }

    fn apply(&mut self, w: &mut Writer, req: WriteRequest) -> Result<WriteResponse> {
        let action = req
            .action
            .ok_or_else(|| Error::invalid("unknown write action"))?;
        // The first request's expected digest was given at open.
        if let (Some(d), false) = (&req.expected, self.first) {
            w.set_expected(d.clone())?;
        }
        w.set_total(req.total);
        let committed = match action {
            WriteAction::Stat => None,
            WriteAction::Write => {
                w.write_bytes(req.offset, req.data)?;
                None
            }
            WriteAction::Commit => {
                w.write_bytes(req.offset, req.data)?;
                let started = w.status()?.started_ns;
                let info = w.commit(req.total, req.expected, req.labels)?;
                self.done = true;
                Some((started, info))
            }
        };
        Ok(match committed {
            Some((started, info)) => WriteResponse {
                action,
                started_ns: started,
                updated_ns: info.updated_ns,
                offset: info.size,
                total: info.size,
                digest: info.digest,
            },
            None => {
                let st = w.status()?;
                WriteResponse {
                    action,
                    started_ns: st.started_ns,
                    updated_ns: st.updated_ns,
                    offset: st.offset,
                    total: st.total,
                    digest: st.digest,
                }
            }
        })
    }
}

// ---- fuzzing -----------------------------------------------------------------------------

fn fuzz_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// Reads small numbers off the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// The write-session fuzz harness (`fuzz/fuzz_targets/write_session.rs`), also replayed on
/// stable by the unit tests: decodes `data` into streams of requests against an in-memory
/// store and checks the invariants in the target's doc.
pub fn fuzz_one(data: &[u8]) {
    let store = Store::open(Arc::new(crate::kv::mem::MemKv::default())).unwrap();
    let mut input = Input(data);
    // A few blobs the requests can aim at (shared ingests, expected digests).
    let known: Vec<Vec<u8>> = vec![b"hello".to_vec(), vec![7u8; 300], Vec::new()];
    let mut session: Option<WriteSession> = None;
    let mut written: Vec<u8> = Vec::new();
    while let Some(op) = input.byte() {
        let scope = match op >> 6 {
            0 | 1 => Scope::namespace("a").unwrap(),
            2 => Scope::namespace("b").unwrap(),
            _ => Scope::tenant("t").unwrap(),
        };
        let mut opening = None;
        if session.is_none() || op & 0x20 != 0 {
            // (Re)open a stream on one of two refs, with or without an expected digest,
            // together with this request (as the gRPC service does).
            drop(session.take());
            let r = if op & 1 == 0 { "r0" } else { "r1" };
            let expected = match input.byte().unwrap_or(0) % 4 {
                0 => None,
                n => Some(Digest::of(
                    crate::digest::Algorithm::Sha256,
                    &known[(n - 1) as usize],
                )),
            };
            let total = i64::from(input.byte().unwrap_or(0)) - 8;
            opening = Some((scope, r, total, expected));
        }
        let action = match op % 4 {
            0 => None,
            1 => Some(WriteAction::Stat),
            2 => Some(WriteAction::Write),
            _ => Some(WriteAction::Commit),
        };
        let len = usize::from(input.byte().unwrap_or(0) % 64);
        let chunk = input.bytes(len).to_vec();
        let offset = match input.byte().unwrap_or(0) % 5 {
            0 => 0,
            1 => written.len() as i64,
            2 => written.len() as i64 + 1,
            3 => i64::MAX,
            _ => -1,
        };
        let expected = match input.byte().unwrap_or(0) % 5 {
            0 | 1 => None,
            2 => {
                let mut all = written.clone();
                all.extend_from_slice(&chunk);
                Some(Digest::of(crate::digest::Algorithm::Sha256, &all))
            }
            3 => Some(Digest::of(crate::digest::Algorithm::Sha512, &chunk)),
            _ => Some(Digest::of(crate::digest::Algorithm::Sha256, b"hello")),
        };
        let total = i64::from(input.byte().unwrap_or(0)) - 4;
        let req = WriteRequest {
            action,
            offset,
            total,
            expected,
            data: chunk.clone().into(),
            labels: None,
        };
        let result = match opening {
            Some((scope, r, total, expected)) => fuzz_rt()
                .block_on(WriteSession::start(
                    &store, scope, r, total, expected, None, req,
                ))
                .map(|(s, resp)| {
                    session = Some(s);
                    resp
                }),
            None => {
                // The gRPC service's split: what needs no storage is answered in memory.
                let s = session.as_mut().unwrap();
                match s.in_memory(&req) {
                    true => s.step_in_memory(req),
                    false => s.step(req),
                }
            }
        };
        match result {
            Ok(resp) => {
                assert!(resp.offset >= 0, "negative offset {resp:?}");
                if resp.action == WriteAction::Commit {
                    // Whatever was committed verifies against its digest.
                    store.verify(&resp.digest).unwrap();
                    session = None;
                    written.clear();
                } else if action == Some(WriteAction::Write) {
                    if offset == 0 {
                        written.clear();
                    }
                    written.extend_from_slice(&chunk);
                }
            }
            Err(_) => {
                // A failed request may leave the stream usable or not; start over sometimes.
                if op & 0x10 != 0 {
                    session = None;
                    written.clear();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Replays the fuzz corpus on stable, so the fuzz target's inputs stay covered in CI.
    #[test]
    fn fuzz_corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/write_session");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            super::fuzz_one(&std::fs::read(entry.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n >= 3, "corpus missing at {}", dir.display());
    }
}
