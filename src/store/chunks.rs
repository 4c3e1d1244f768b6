//! The chunk byte layer: extents of fixed-size chunks under `chunks[extent ‖ offset]`, the
//! one place bytes are read back (whole, ranged, streamed) and re-verified, and where fresh
//! extent ids come from.

use bytes::{Bytes, BytesMut};

use super::*;

impl Store {
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

    /// Up to `max` bytes of an extent starting at `offset` (one iterator, one copy). Fewer
    /// bytes only where the extent's stored data ends.
    pub fn read_extent(&self, extent: u64, offset: u64, max: usize) -> Result<Bytes> {
        let mut got = None;
        let r = self.stream_extent(
            extent,
            offset,
            offset.saturating_add(max as u64),
            max,
            &mut |b| {
                got = Some(b);
                false
            },
        );
        match (got, r) {
            (Some(b), _) => Ok(b),
            (None, Err(e)) => Err(e),
            (None, Ok(())) => Err(Error::data_loss(format!(
                "stored bytes missing at offset {offset}"
            ))),
        }
    }

    /// `[offset, end)` of an extent when one stored chunk holds all of it: one point lookup,
    /// no iterator. None when the range spans chunks (the caller streams it instead).
    pub fn read_in_first_chunk(&self, extent: u64, offset: u64, end: u64) -> Result<Option<Bytes>> {
        let Some(v) = self.kv.get(Cf::Chunks, &chunk_key(extent, 0))? else {
            return Ok(None);
        };
        match (usize::try_from(offset), usize::try_from(end)) {
            (Ok(a), Ok(b)) if a <= b && b <= v.len() => {
                let mut v = v;
                v.truncate(b);
                Ok(Some(Bytes::from(v).slice(a..)))
            }
            _ => Ok(None),
        }
    }

    /// Streams `[offset, end)` of an extent in pieces of `piece` bytes (the last may be
    /// shorter) through one storage iterator. `sink` returns false to stop early. Where the
    /// stored bytes end before `end`, what precedes the gap is delivered, then DataLoss.
    pub fn stream_extent(
        &self,
        extent: u64,
        offset: u64,
        end: u64,
        piece: usize,
        sink: &mut dyn FnMut(Bytes) -> bool,
    ) -> Result<()> {
        if offset >= end {
            return Ok(());
        }
        let (lower, _) = extent_range(extent);
        let upper = chunk_key(extent, end);
        let mut buf = BytesMut::with_capacity(piece.min((end - offset) as usize));
        let mut pos = offset;
        let mut stopped = false;
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

    /// Reads `[offset, offset+len)` of an extent, chunk by chunk.
    pub fn read_range(
        &self,
        extent: u64,
        offset: u64,
        len: u64,
        mut sink: impl FnMut(Bytes) -> Result<()>,
    ) -> Result<()> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let data = self.read_extent(
                extent,
                pos,
                (end - pos).min(READ_BUFFER_LIMIT as u64) as usize,
            )?;
            pos += data.len() as u64;
            sink(data)?;
        }
        Ok(())
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
