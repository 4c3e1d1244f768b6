//! The in-memory window of an on-demand fetch: the body frames as they come off the network,
//! so readers of a blob still arriving are served at wire speed instead of after each store
//! write. Storing happens beside them through the one write path; nothing here is ever taken
//! for the blob (readers still end only on the fetch's verified commit, see `reads`).
//!
//! Invariant (kept by [`Tee::landed`]): the window's first byte is never past what the store
//! has landed for the fetch, so a reader is always served either from the window or, behind
//! it, from stored bytes. Memory: the frames not yet stored (bounded by the fetch's read-ahead,
//! `AHEAD` in `pull`) plus at most [`KEEP`] bytes already stored, for readers just behind.
//!
//! Each body attempt has a generation ([`Tee::start`]): a frame from an attempt that has
//! since been replaced is ignored, so a network task that outlives its attempt can never put
//! bytes at the wrong offset.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::watch;

/// Bytes already stored that stay in the window for readers slightly behind the network.
pub const KEEP: i64 = 4 << 20;

/// What the window holds at a reader's position.
#[derive(Debug, PartialEq)]
pub enum At {
    /// Bytes from the position (one frame's worth at most).
    Data(Bytes),
    /// The position is before the window: those bytes are stored, read them there.
    Behind,
    /// Nothing there yet: wait for [`Tee::changed`].
    Wait,
}

#[derive(Default)]
struct Window {
    /// Offset of `frames[0]`; None until the body starts.
    base: Option<i64>,
    frames: VecDeque<Bytes>,
    len: i64,
    landed: i64,
    /// Every byte of the blob has arrived and hashes to its digest.
    verified: bool,
    /// The current body attempt.
    generation: u64,
}

pub struct Tee {
    window: Mutex<Window>,
    version: watch::Sender<u64>,
}

impl Default for Tee {
    fn default() -> Self {
        Tee {
            window: Mutex::new(Window::default()),
            version: watch::channel(0).0,
        }
    }
}

impl Tee {
    /// The body (re)starts at `offset`, which the store already holds: frames from an
    /// interrupted attempt are dropped (the new attempt re-sends them). Returns the attempt's
    /// generation, which its frames and verdict carry.
    pub fn start(&self, offset: i64) -> u64 {
        let mut w = self.window.lock();
        w.frames.clear();
        w.len = 0;
        w.base = Some(offset);
        w.landed = offset;
        w.verified = false;
        w.generation += 1;
        let g = w.generation;
        drop(w);
        self.bump();
        g
    }

    /// A frame of attempt `generation` arrived after everything before it.
    pub fn push(&self, generation: u64, b: Bytes) {
        if b.is_empty() {
            return;
        }
        let mut w = self.window.lock();
        if w.base.is_none() || w.generation != generation {
            return;
        }
        w.len += b.len() as i64;
        w.frames.push_back(b);
        drop(w);
        self.bump();
    }

    /// The store holds the fetch's bytes up to `pos`.
    pub fn landed(&self, pos: i64) {
        let mut w = self.window.lock();
        w.landed = w.landed.max(pos);
        // Drop stored frames beyond the KEEP allowance; never one the store lacks.
        while let (Some(base), Some(front)) = (w.base, w.frames.front()) {
            let flen = front.len() as i64;
            if base + flen > w.landed || w.len - flen < KEEP {
                break;
            }
            w.frames.pop_front();
            w.len -= flen;
            w.base = Some(base + flen);
        }
    }

    /// Every byte has arrived and the bytes hash to the blob's digest: a reader at the end
    /// may finish before the store's commit makes the blob durable.
    pub fn verified(&self) {
        self.window.lock().verified = true;
        self.bump();
    }

    pub fn is_verified(&self) -> bool {
        self.window.lock().verified
    }

    /// Bytes received so far (the offset after the last frame), None before the body starts.
    pub fn received(&self) -> Option<i64> {
        let w = self.window.lock();
        w.base.map(|b| b + w.len)
    }

    /// Up to `max` bytes at `pos`: a slice of one frame when one frame holds them, else
    /// copied from the frames that do (network frames are often a few KiB, and a reader's
    /// message costs the same whether it carries one of them or `max` bytes).
    pub fn at(&self, pos: i64, max: usize) -> At {
        let w = self.window.lock();
        let Some(base) = w.base else {
            return At::Wait;
        };
        if pos < base {
            return At::Behind;
        }
        let mut off = base;
        let mut frames = w.frames.iter();
        for f in frames.by_ref() {
            let end = off + f.len() as i64;
            if pos < end {
                let from = (pos - off) as usize;
                let to = f.len().min(from.saturating_add(max));
                if to - from == max || to < f.len() {
                    return At::Data(f.slice(from..to));
                }
                let mut out = BytesMut::with_capacity(max.min((w.len - (pos - base)) as usize));
                out.extend_from_slice(&f[from..]);
                for f in frames {
                    let take = f.len().min(max - out.len());
                    out.extend_from_slice(&f[..take]);
                    if out.len() == max {
                        break;
                    }
                }
                return At::Data(out.freeze());
            }
            off = end;
        }
        At::Wait
    }

    /// Changes whenever the window does.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(a: &At) -> &[u8] {
        match a {
            At::Data(b) => b,
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn serves_frames_and_sends_readers_behind_it_to_the_store() {
        let t = Tee::default();
        assert_eq!(t.at(0, 10), At::Wait);
        let g = t.start(100);
        assert_eq!(t.at(50, 10), At::Behind);
        assert_eq!(t.at(100, 10), At::Wait);
        t.push(g, Bytes::from_static(b"abcdef"));
        t.push(g, Bytes::from_static(b"ghij"));
        t.push(g, Bytes::from_static(b"kl"));
        assert_eq!(t.received(), Some(112));
        assert_eq!(data(&t.at(100, 3)), b"abc");
        // A read spanning frames gathers them, up to its limit.
        assert_eq!(data(&t.at(104, 100)), b"efghijkl");
        assert_eq!(data(&t.at(104, 5)), b"efghi");
        assert_eq!(data(&t.at(107, 3)), b"hij");
        assert_eq!(data(&t.at(111, 100)), b"l");
        assert_eq!(t.at(112, 10), At::Wait);
        // Landed bytes stay within KEEP; the window never starts past the landed offset.
        t.landed(112);
        assert_eq!(data(&t.at(100, 1)), b"a");
        assert!(!t.is_verified());
        t.verified();
        assert!(t.is_verified());
        // A restart drops the old frames and the verdict; the old attempt's late frames are
        // ignored.
        let g2 = t.start(103);
        assert!(!t.is_verified());
        assert_eq!(t.at(100, 1), At::Behind);
        assert_eq!(t.at(103, 1), At::Wait);
        t.push(g, Bytes::from_static(b"zz"));
        assert_eq!(t.at(103, 1), At::Wait);
        t.push(g2, Bytes::from_static(b"d"));
        assert_eq!(data(&t.at(103, 10)), b"d");
    }

    #[test]
    fn memory_is_the_unstored_frames_plus_keep() {
        let t = Tee::default();
        let g = t.start(0);
        let frame = Bytes::from(vec![7u8; 64 << 10]);
        for i in 1..=1000i64 {
            t.push(g, frame.clone());
            // The store lags the network by 16 frames.
            t.landed(((i - 16).max(0)) * (64 << 10));
        }
        let w = t.window.lock();
        assert!(w.len <= KEEP + 17 * (64 << 10), "{}", w.len);
        assert!(w.base.unwrap() <= w.landed);
        drop(w);
        // Everything not yet stored is still served.
        let unstored = 984 * (64 << 10);
        assert_eq!(data(&t.at(unstored, 1)), &[7]);
        assert_eq!(t.at(0, 1), At::Behind);
    }
}
