//! The chunk byte layer: extents of fixed-size chunks under `chunks[extent ‖ offset]`, the
//! one place bytes are read back (whole, ranged, streamed) and re-verified, and where fresh
//! extent ids come from; and [`Gather`], which shapes a byte stream into writes that keep
//! chunks whole.

use bytes::{Bytes, BytesMut};

use super::*;

/// Gathers a stream of body frames (an upstream fetch, a registry upload) into store writes
/// that end on a blob's `CHUNK_SIZE` boundaries, so its chunks are whole and aligned.
///
/// Why: a write's chunks end on the blob's boundaries, so a write that ends between two
/// leaves a short chunk there. Frames written as they come (tens of KiB, any size) leave
/// almost every chunk short, and such a blob can never be streamed from its stored chunk
/// buffers: each read falls back to the iterator that copies pieces together (a copy of
/// every byte on every cached registry GET of a mirrored layer), and chunks under the
/// blob-file threshold stay in the LSM tree, rewritten by every compaction. Only the
/// caller's last write (`rest`) may end between boundaries.
pub struct Gather {
    /// Blob offset of `buf[0]`.
    at: u64,
    buf: BytesMut,
    /// Bytes gathered before a write is due (at least one chunk).
    min: usize,
}

impl Gather {
    /// A stream whose first byte lands at blob offset `at`; writes of at least `min` bytes.
    pub fn new(at: u64, min: usize) -> Gather {
        Gather {
            at,
            buf: BytesMut::new(),
            min: min.max(CHUNK_SIZE),
        }
    }

    /// Bytes gathered and not yet handed out for writing.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Adds `data`; returns the next write once `min` bytes are gathered: everything up to
    /// the last chunk boundary they reach (the remainder stays for the next write).
    pub fn push(&mut self, data: &[u8]) -> Option<Bytes> {
        self.buf.extend_from_slice(data);
        if self.buf.len() < self.min {
            return None;
        }
        // `min` ≥ CHUNK_SIZE bytes from `at` always cross a boundary, so `cut` > 0 (a stream
        // that starts off a boundary, a resumed one, is realigned by its first write).
        let end = self.at + self.buf.len() as u64;
        let cut = (end - end % CHUNK_SIZE as u64 - self.at) as usize;
        self.at += cut as u64;
        Some(self.buf.split_to(cut).freeze())
    }

    /// Whatever is gathered (the stream's end, or a point where the caller must write).
    pub fn rest(&mut self) -> Option<Bytes> {
        if self.buf.is_empty() {
            return None;
        }
        self.at += self.buf.len() as u64;
        Some(self.buf.split().freeze())
    }
}

impl Store {
    /// [`Store::new_extent`] when it needs no write: None once the reserved block is used up.
    pub(super) fn new_extent_reserved(&self) -> Option<u64> {
        let mut e = self.extents.lock();
        (e.next < e.reserved).then(|| {
            e.next += 1;
            e.next - 1
        })
    }

    /// A fresh extent id. Ids are reserved in blocks with a synced write before use, so an id
    /// seen in any durable record can never be handed out again after a restart.
    pub(super) fn new_extent(&self) -> Result<u64> {
        let mut e = self.extents.lock();
        if e.next >= e.reserved {
            let reserved = e.next + EXTENT_RESERVATION;
            let mut b = Batch::new();
            b.put(Cf::Meta, META_EXTENTS, reserved.to_be_bytes().to_vec());
            self.kv.write(b, true)?;
            e.reserved = reserved;
        }
        e.next += 1;
        Ok(e.next - 1)
    }

    /// Up to `max` bytes of an extent starting at `offset`, in one buffer. Fewer bytes only
    /// where the extent's stored data ends.
    pub fn read_extent(&self, extent: u64, offset: u64, max: usize) -> Result<Bytes> {
        let mut got: Vec<Bytes> = Vec::new();
        let r = self.stream_extent(
            extent,
            offset,
            offset.saturating_add(max as u64),
            max,
            &mut |b| {
                got.push(b);
                true
            },
        );
        match (got.len(), r) {
            (0, Err(e)) => Err(e),
            (0, Ok(())) => Err(Error::data_loss(format!(
                "stored bytes missing at offset {offset}"
            ))),
            (1, _) => Ok(got.pop().expect("one piece")),
            // The no-copy path ends pieces at chunk boundaries; join them.
            _ => Ok(got.concat().into()),
        }
    }

    /// `[offset, end)` of an extent when one stored chunk holds all of it: one point lookup,
    /// no iterator. None when the range spans chunks (the caller streams it instead).
    pub fn read_in_first_chunk(&self, extent: u64, offset: u64, end: u64) -> Result<Option<Bytes>> {
        let Some(v) = self.kv.get_bytes(Cf::Chunks, &chunk_key(extent, 0))? else {
            return Ok(None);
        };
        match (usize::try_from(offset), usize::try_from(end)) {
            (Ok(a), Ok(b)) if a <= b && b <= v.len() => Ok(Some(v.slice(a..b))),
            _ => Ok(None),
        }
    }

    /// Streams `[offset, end)` of an extent in pieces of at most `piece` bytes. `sink`
    /// returns false to stop early. Where the stored bytes end before `end`, what precedes
    /// the gap is delivered, then DataLoss.
    ///
    /// Pieces are full (`piece` bytes) except the last and, on the no-copy path, those
    /// that end a stored chunk: while the chunk under the stream holds at least a piece (or
    /// the rest of the range), its own buffer is handed out in slices. Chunks written in
    /// large messages are all like that, so a blob streams out without being copied here.
    /// Anything else (chunks cut small by small writes) is gathered into full pieces from
    /// one storage iterator.
    pub fn stream_extent(
        &self,
        extent: u64,
        offset: u64,
        end: u64,
        piece: usize,
        sink: &mut dyn FnMut(Bytes) -> bool,
    ) -> Result<()> {
        if offset >= end || piece == 0 {
            return Ok(());
        }
        let mut pos = offset;
        // Chunks end on multiples of CHUNK_SIZE (`Writer::write_bytes`), so for a blob
        // written in whole chunks the chunk under any offset starts at its multiple.
        let mut start = offset - offset % CHUNK_SIZE as u64;
        // Each chunk is looked up when it is due, so one deleted meanwhile (a collected blob)
        // ends this path; the iterator below then reports what is still stored.
        while let Some(v) = self.kv.get_bytes(Cf::Chunks, &chunk_key(extent, start))? {
            let Some(chunk_end) = start.checked_add(v.len() as u64) else {
                break;
            };
            let stop = chunk_end.min(end);
            if pos < start || pos >= chunk_end || (v.len() < piece && stop < end) {
                break;
            }
            while pos < stop {
                let n = (stop - pos).min(piece as u64);
                let from = (pos - start) as usize;
                pos += n;
                if !sink(v.slice(from..from + n as usize)) {
                    return Ok(());
                }
            }
            if pos >= end {
                return Ok(());
            }
            start = chunk_end;
        }
        let offset = pos;
        let mut stopped = false;
        let (lower, _) = extent_range(extent);
        let upper = chunk_key(extent, end);
        let mut buf = BytesMut::with_capacity(piece.min((end - offset) as usize));
        self.kv.scan_from_floor(
            Cf::Chunks,
            &chunk_key(extent, offset),
            &lower,
            &upper,
            &mut |k, v| {
                let Some(start) = keys::chunk_offset(k) else {
                    return false;
                };
                if start > pos || start + v.len() as u64 <= pos {
                    return false;
                }
                let mut from = (pos - start) as usize;
                let stop = v.len().min((end - start) as usize);
                while from < stop {
                    let n = (stop - from).min(piece - buf.len());
                    buf.extend_from_slice(&v[from..from + n]);
                    from += n;
                    pos += n as u64;
                    if buf.len() == piece || pos == end {
                        let full = std::mem::replace(
                            &mut buf,
                            BytesMut::with_capacity(piece.min((end - pos) as usize)),
                        );
                        if !sink(full.freeze()) {
                            stopped = true;
                            return false;
                        }
                    }
                }
                pos < end
            },
        )?;
        if !stopped && pos < end {
            // Bytes before the gap are still delivered; the gap itself is the error.
            if !buf.is_empty() {
                sink(buf.freeze());
            }
            return Err(Error::data_loss(format!(
                "stored bytes missing at offset {pos}"
            )));
        }
        Ok(())
    }

    /// Whether `d`'s bytes are stored, for any scope.
    pub fn holds(&self, d: &Digest) -> Result<bool> {
        Ok(self.blob(d)?.is_some())
    }

    /// Whether `d` is still stored in `extent`. A read that finds bytes missing asks, to tell
    /// a blob collected while it was being read (not found) from lost bytes (data loss).
    /// A failed lookup answers yes, so the data-loss report stands.
    pub fn stored_in(&self, d: &Digest, extent: u64) -> bool {
        !matches!(self.blob(d), Ok(ref b) if b.as_ref().is_none_or(|b| b.extent != extent))
    }

    /// Reads `[offset, offset+len)` of an extent, chunk by chunk.
    pub fn read_range(
        &self,
        extent: u64,
        offset: u64,
        len: u64,
        mut sink: impl FnMut(Bytes) -> Result<()>,
    ) -> Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid(format!("range {offset}+{len} overflows")))?;
        let mut failed = None;
        let r = self.stream_extent(
            extent,
            offset,
            end,
            READ_BUFFER_LIMIT,
            &mut |b| match sink(b) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            },
        );
        match failed {
            Some(e) => Err(e),
            None => r,
        }
    }

    /// Re-hashes a stored blob and checks it against its digest and size.
    pub fn verify(&self, d: &Digest) -> Result<()> {
        let blob = self.blob(d)?.ok_or_else(|| Self::not_found(d))?;
        let mut h = d.algorithm().hasher();
        let mut n = 0i64;
        self.read_range(blob.extent, 0, blob.size as u64, |c| {
            n += c.len() as i64;
            h.update(&c);
            Ok(())
        })?;
        if n != blob.size || h.digest() != *d {
            return Err(Error::data_loss(format!(
                "content {d}: stored bytes do not match the digest"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod gather_tests {
    use super::*;

    /// Frames of awkward sizes from offset `at`: every byte comes out once, in order; every
    /// write but the last ends on a chunk boundary and is at least `min` bytes (or realigns
    /// a stream that started off a boundary).
    fn check(at: u64, min: usize, frames: &[usize]) {
        let total: usize = frames.iter().sum();
        let data: Vec<u8> = (0..total).map(|i| (i * 31 % 251) as u8).collect();
        let mut g = Gather::new(at, min);
        let (mut out, mut pos, mut from) = (Vec::new(), at, 0);
        let mut writes = Vec::new();
        for &n in frames {
            if let Some(p) = g.push(&data[from..from + n]) {
                writes.push((pos, p.len()));
                pos += p.len() as u64;
                out.extend_from_slice(&p);
            }
            from += n;
            assert_eq!(out.len() + g.pending(), from);
        }
        if let Some(p) = g.rest() {
            out.extend_from_slice(&p);
        }
        assert!(g.rest().is_none());
        assert_eq!(out, data);
        for (start, len) in writes {
            assert_eq!(
                (start + len as u64) % CHUNK_SIZE as u64,
                0,
                "write ends off a boundary"
            );
            assert!(
                len >= min.max(CHUNK_SIZE) - CHUNK_SIZE,
                "write of {len} bytes"
            );
        }
    }

    #[test]
    fn writes_end_on_chunk_boundaries() {
        check(0, 1 << 20, &[16 << 10; 300]);
        check(0, 1 << 20, &[1 << 20, 5, (1 << 20) - 5, 3 << 20, 7]);
        check(1000, 1 << 20, &[16 << 10; 200]);
        check(0, 1, &[CHUNK_SIZE + 1, CHUNK_SIZE - 1, 1]);
        check(5, 0, &[CHUNK_SIZE * 3]);
        check(0, 1 << 20, &[]);
        let mut odd = Vec::new();
        let mut x = 7usize;
        for _ in 0..500 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            odd.push(1 + (x >> 33) % 70_000);
        }
        check(123_457, 1 << 20, &odd);
    }
}
