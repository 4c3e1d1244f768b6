//! The storage boundary: an ordered key-value store with column families, atomic batches and
//! range deletes. RocksDB is named only in `rocks.rs`; `mem.rs` is an in-memory twin for unit
//! tests. Both pass the same conformance suite (`tests::conformance`).
//!
//! Column families and their key layouts (every key is binary and fixed-width where possible;
//! `dk` is a digest key: one algorithm tag byte + raw hash, see `Digest::key`; `scope` is
//! `b'n'‖namespace` or `b't'‖tenant`, neither of which may contain a NUL byte):
//!
//! | cf        | key                              | value                               |
//! |-----------|----------------------------------|-------------------------------------|
//! | `meta`    | ASCII name                       | schema version, extent reservation, last collection's table sizes |
//! | `chunks`  | extent u64 BE ‖ offset u64 BE    | blob/ingest bytes, ≤ 1 MiB per key  |
//! | `blobs`   | dk                               | `BlobRecord` (extent, size, created)|
//! | `links`   | scope ‖ 0x00 ‖ dk                | `LinkRecord` (times, labels)        |
//! | `owners`  | dk ‖ scope                       | empty: reverse index of `links`     |
//! | `ingests` | scope ‖ 0x00 ‖ ref               | `IngestRecord`                      |
//! | `edges`   | parent dk ‖ role u8 ‖ index u32 BE ‖ child dk | `EdgeRecord` (what the parent says of the child) |
//! | `parents` | child dk ‖ parent dk ‖ role u8   | `EdgeRecord` of the parent (for referrers) |
//! | `images`  | scope ‖ 0x00 ‖ name              | `ImageRecord` (a GC root)           |
//! | `leases`  | scope ‖ 0x00 ‖ lease id          | `LeaseRecord` (a GC root until it expires) |
//! | `lease_resources` | scope ‖ 0x00 ‖ lease id ‖ 0x00 ‖ type ‖ 0x00 ‖ resource id | empty |
//! | `sources` | scope ‖ 0x00 ‖ dk                | `SourceRecord` (upstream registry + repository) |
//! | `quarantine` | dk                            | `QuarantineRecord` (a corrupt blob taken out of service) |

pub mod mem;
#[cfg(feature = "rocksdb")]
pub mod rocks;

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    Meta,
    Chunks,
    Blobs,
    Links,
    Owners,
    Ingests,
    Edges,
    Parents,
    Images,
    Leases,
    LeaseResources,
    Sources,
    Quarantine,
}

impl Cf {
    pub const ALL: [Cf; 13] = [
        Cf::Meta,
        Cf::Chunks,
        Cf::Blobs,
        Cf::Links,
        Cf::Owners,
        Cf::Ingests,
        Cf::Edges,
        Cf::Parents,
        Cf::Images,
        Cf::Leases,
        Cf::LeaseResources,
        Cf::Sources,
        Cf::Quarantine,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Chunks => "chunks",
            Cf::Blobs => "blobs",
            Cf::Links => "links",
            Cf::Owners => "owners",
            Cf::Ingests => "ingests",
            Cf::Edges => "edges",
            Cf::Parents => "parents",
            Cf::Images => "images",
            Cf::Leases => "leases",
            Cf::LeaseResources => "lease_resources",
            Cf::Sources => "sources",
            Cf::Quarantine => "quarantine",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Op {
    /// The value is shared, not owned: a chunk is a slice of the request that carried it, so
    /// queueing it costs no copy.
    Put(Cf, Vec<u8>, bytes::Bytes),
    Delete(Cf, Vec<u8>),
    /// Deletes every key in `[from, to)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

/// Operations applied all-or-nothing by [`Kv::write`].
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<bytes::Bytes>) {
        self.ops.push(Op::Put(cf, key.into(), value.into()));
    }
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(cf, key.into()));
    }
    pub fn delete_range(&mut self, cf: Cf, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.ops.push(Op::DeleteRange(cf, from.into(), to.into()));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Visitor for [`Kv::scan`]: return `false` to stop.
pub type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> bool;

/// Visitor for [`Kv::scan_prefixes`]: the prefix's index, then the entry.
pub type PrefixVisit<'a> = &'a mut dyn FnMut(usize, &[u8], &[u8]) -> bool;

/// Owned entries of one page of a scan.
pub type Page = Vec<(Vec<u8>, Vec<u8>)>;

/// Visits `cf` in pages of at most `page` entries. No storage iterator is open while `f`
/// runs, so `f` may read and write the store; entries it adds or removes past the page
/// are seen or not as the resumed scan finds them. `f` returns false to stop.
pub fn for_each_page(
    kv: &dyn Kv,
    cf: Cf,
    page: usize,
    f: &mut dyn FnMut(Page) -> Result<bool>,
) -> Result<()> {
    let mut from: Vec<u8> = Vec::new();
    loop {
        let items = collect(kv, cf, &from, &[], page.max(1))?;
        let full = items.len() >= page.max(1);
        let Some(last) = items.last() else {
            return Ok(());
        };
        // The smallest key after `last`.
        from = last.0.clone();
        from.push(0);
        if !f(items)? || !full {
            return Ok(());
        }
    }
}

pub trait Kv: Send + Sync + 'static {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// The value of `key` as shared bytes. RocksDB hands over its own buffer for values kept
    /// in blob files, so a streamed chunk is never copied on its way out; the default copies.
    fn get_bytes(&self, cf: Cf, key: &[u8]) -> Result<Option<bytes::Bytes>> {
        Ok(self.get(cf, key)?.map(bytes::Bytes::from))
    }
    /// The entry with the greatest key `<= key` and `>= lower`, if any.
    fn floor(&self, cf: Cf, key: &[u8], lower: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Visits entries with `start <= key < end` in key order (`end` empty = unbounded).
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: Visit<'_>) -> Result<()>;
    /// Like `scan` over `[lower, end)`, but starts at the floor of `key` (the greatest key
    /// `<= key`), or at the first key after it when there is none. One iterator serves the
    /// whole walk, which is how a ranged read crosses chunk boundaries cheaply.
    fn scan_from_floor(
        &self,
        cf: Cf,
        key: &[u8],
        lower: &[u8],
        end: &[u8],
        visit: Visit<'_>,
    ) -> Result<()>;
    /// Visits every entry whose key starts with one of `prefixes` (sorted ascending, so one
    /// forward iterator can serve them all), as `visit(index of the prefix, key, value)`.
    /// `visit` returns false to stop the whole walk. Prefixes that are themselves prefixes of
    /// one another each see their entries.
    fn scan_prefixes(&self, cf: Cf, prefixes: &[&[u8]], visit: PrefixVisit<'_>) -> Result<()> {
        for (i, p) in prefixes.iter().enumerate() {
            let mut go = true;
            self.scan(cf, p, &prefix_end(p), &mut |k, v| {
                go = visit(i, k, v);
                go
            })?;
            if !go {
                break;
            }
        }
        Ok(())
    }
    /// Applies `batch` atomically. With `sync`, it (and everything written before it) is on
    /// stable storage when this returns.
    fn write(&self, batch: Batch, sync: bool) -> Result<()>;
    /// Applies `batch` atomically without the write-ahead log: cheaper for bulk bytes, but
    /// lost by a crash unless a [`Kv::flush`] of its families completes first.
    fn write_unlogged(&self, batch: Batch) -> Result<()>;
    /// Makes everything written to `cf`, logged or not, durable.
    fn flush(&self, cf: Cf) -> Result<()>;
    /// Gives back now the disk space of keys deleted in the `[from, to)` ranges of `cf`,
    /// rather than whenever later writes get round to it. Reads are unchanged.
    fn reclaim(&self, cf: Cf, ranges: &[(Vec<u8>, Vec<u8>)]) -> Result<()>;
    /// Bytes free for the store on the filesystem that holds it, and that filesystem's size
    /// (None: not on a disk).
    fn disk_space(&self) -> Option<(u64, u64)> {
        None
    }
    /// Approximate bytes on disk, for reporting only.
    fn disk_usage(&self) -> u64 {
        0
    }
}

/// Space on the filesystem holding `path`, as df reports it: bytes an unprivileged writer may
/// still use, bytes in use, and the filesystem's size.
pub struct FsSpace {
    pub avail: u64,
    pub used: u64,
    pub size: u64,
}

impl FsSpace {
    pub fn of(path: &std::path::Path) -> Option<FsSpace> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: statvfs fills the zeroed struct we own from a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 || st.f_blocks == 0 {
            return None;
        }
        let frsize = st.f_frsize as u64;
        Some(FsSpace {
            avail: (st.f_bavail as u64).saturating_mul(frsize),
            used: (st.f_blocks.saturating_sub(st.f_bfree) as u64).saturating_mul(frsize),
            size: (st.f_blocks as u64).saturating_mul(frsize),
        })
    }
}

/// The smallest key greater than every key starting with `prefix` (empty if none exists).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// Collects `[start, end)` as owned pairs, at most `limit`.
pub fn collect(
    kv: &dyn Kv,
    cf: Cf,
    start: &[u8],
    end: &[u8],
    limit: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    kv.scan(cf, start, end, &mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        out.len() < limit
    })?;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    //! Conformance suite every `Kv` implementation must pass.
    use super::*;

    pub fn conformance(kv: &dyn Kv) {
        // put / get / delete
        let mut b = Batch::new();
        b.put(Cf::Blobs, b"a".to_vec(), b"1".to_vec());
        b.put(Cf::Blobs, b"b".to_vec(), b"2".to_vec());
        b.put(Cf::Links, b"a".to_vec(), b"other-cf".to_vec());
        kv.write(b, true).unwrap();
        assert_eq!(kv.get(Cf::Blobs, b"a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(
            kv.get(Cf::Links, b"a").unwrap().as_deref(),
            Some(&b"other-cf"[..])
        );
        assert_eq!(kv.get(Cf::Owners, b"a").unwrap(), None);
        let mut b = Batch::new();
        b.delete(Cf::Blobs, b"a".to_vec());
        kv.write(b, false).unwrap();
        assert_eq!(kv.get(Cf::Blobs, b"a").unwrap(), None);

        // shared-bytes reads, large values (blob files in RocksDB) and small alike
        let big: Vec<u8> = (0..(300u32 << 10)).map(|i| (i % 253) as u8).collect();
        let mut b = Batch::new();
        b.put(Cf::Chunks, vec![5, 0], big.clone());
        b.put(Cf::Chunks, vec![5, 1], b"small".to_vec());
        kv.write(b, true).unwrap();
        let seen: Vec<_> = [[5, 0], [5, 1], [5, 2]]
            .iter()
            .map(|k| kv.get_bytes(Cf::Chunks, k).unwrap())
            .collect();
        assert_eq!(seen[0].as_deref(), Some(&big[..]));
        assert_eq!(seen[1].as_deref(), Some(&b"small"[..]));
        assert_eq!(seen[2], None);
        // the values outlive the writes after them
        let mut b = Batch::new();
        b.delete_range(Cf::Chunks, vec![5], vec![6]);
        kv.write(b, true).unwrap();
        assert_eq!(seen[0].as_deref(), Some(&big[..]));
        assert_eq!(kv.get(Cf::Chunks, &[5, 0]).unwrap(), None);

        // reclaiming deleted ranges changes no read, inside or beside them
        let mut b = Batch::new();
        b.put(Cf::Chunks, vec![6, 0], big.clone());
        b.put(Cf::Chunks, vec![6, 9], b"beside".to_vec());
        kv.write(b, true).unwrap();
        kv.reclaim(Cf::Chunks, &[(vec![5], vec![6]), (vec![6, 1], vec![6, 9])])
            .unwrap();
        kv.reclaim(Cf::Chunks, &[]).unwrap();
        assert_eq!(kv.get(Cf::Chunks, &[5, 0]).unwrap(), None);
        assert_eq!(
            kv.get(Cf::Chunks, &[6, 0]).unwrap().as_deref(),
            Some(&big[..])
        );
        assert_eq!(
            kv.get(Cf::Chunks, &[6, 9]).unwrap().as_deref(),
            Some(&b"beside"[..])
        );
        let mut b = Batch::new();
        b.delete_range(Cf::Chunks, vec![6], vec![7]);
        kv.write(b, true).unwrap();

        // ordered scan with bounds and early stop
        let mut b = Batch::new();
        for i in 0u8..10 {
            b.put(Cf::Chunks, vec![7, i], vec![i]);
        }
        b.put(Cf::Chunks, vec![8, 0], vec![99]);
        kv.write(b, false).unwrap();
        let all = collect(kv, Cf::Chunks, &[7], &prefix_end(&[7]), usize::MAX).unwrap();
        assert_eq!(all.len(), 10);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(
            collect(kv, Cf::Chunks, &[7, 3], &[7, 5], usize::MAX)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(collect(kv, Cf::Chunks, &[7], &[], 3).unwrap().len(), 3);
        assert_eq!(
            collect(kv, Cf::Chunks, &[7], &[], usize::MAX)
                .unwrap()
                .len(),
            11
        );

        // scan_prefixes: each prefix's entries, in order, with its index; early stop
        let mut seen = Vec::new();
        kv.scan_prefixes(
            Cf::Chunks,
            &[&[7, 2], &[7, 4], &[8], &[9]],
            &mut |i, k, _| {
                seen.push((i, k.to_vec()));
                true
            },
        )
        .unwrap();
        assert_eq!(
            seen,
            vec![(0, vec![7, 2]), (1, vec![7, 4]), (2, vec![8, 0])]
        );
        let mut n = 0;
        kv.scan_prefixes(Cf::Chunks, &[&[7], &[8]], &mut |_, _, _| {
            n += 1;
            n < 4
        })
        .unwrap();
        assert_eq!(n, 4);
        let mut seen = Vec::new();
        kv.scan_prefixes(Cf::Chunks, &[&[7], &[7, 9]], &mut |i, k, _| {
            seen.push((i, k.to_vec()));
            true
        })
        .unwrap();
        assert_eq!(seen.len(), 11);
        assert_eq!(seen[10], (1, vec![7, 9]));

        // for_each_page: every entry once, in order, in pages
        let mut pages = Vec::new();
        for_each_page(kv, Cf::Chunks, 4, &mut |p| {
            pages.push(p.len());
            Ok(true)
        })
        .unwrap();
        assert_eq!(pages, vec![4, 4, 3]);

        // floor respects the lower bound
        assert_eq!(
            kv.floor(Cf::Chunks, &[7, 4, 0xff], &[7])
                .unwrap()
                .unwrap()
                .0,
            vec![7, 4]
        );
        assert_eq!(
            kv.floor(Cf::Chunks, &[7, 4], &[7]).unwrap().unwrap().0,
            vec![7, 4]
        );
        assert!(kv.floor(Cf::Chunks, &[8, 0], &[8, 1]).unwrap().is_none());
        assert!(kv.floor(Cf::Chunks, &[6], &[]).unwrap().is_none());

        // scan_from_floor starts at the floor, or after it, and stops at the bound
        let mut seen = Vec::new();
        kv.scan_from_floor(Cf::Chunks, &[7, 4, 0xff], &[7], &[7, 8], &mut |k, _| {
            seen.push(k.to_vec());
            true
        })
        .unwrap();
        assert_eq!(seen, vec![vec![7, 4], vec![7, 5], vec![7, 6], vec![7, 7]]);
        seen.clear();
        kv.scan_from_floor(Cf::Chunks, &[6], &[6], &[7, 2], &mut |k, _| {
            seen.push(k.to_vec());
            true
        })
        .unwrap();
        assert_eq!(seen, vec![vec![7, 0], vec![7, 1]]);

        // range delete is exact
        let mut b = Batch::new();
        b.delete_range(Cf::Chunks, vec![7, 2], vec![7, 8]);
        kv.write(b, true).unwrap();
        let left: Vec<_> = collect(kv, Cf::Chunks, &[], &[], usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            left,
            vec![vec![7, 0], vec![7, 1], vec![7, 8], vec![7, 9], vec![8, 0]]
        );

        // a batch is atomic and ordered: later ops see earlier ones
        let mut b = Batch::new();
        b.put(Cf::Meta, b"k".to_vec(), b"v1".to_vec());
        b.delete(Cf::Meta, b"k".to_vec());
        b.put(Cf::Meta, b"k".to_vec(), b"v2".to_vec());
        kv.write(b, true).unwrap();
        assert_eq!(kv.get(Cf::Meta, b"k").unwrap().as_deref(), Some(&b"v2"[..]));

        // unlogged writes are visible at once and durable after a flush
        let mut b = Batch::new();
        b.put(Cf::Chunks, vec![9, 1], b"unlogged".to_vec());
        kv.write_unlogged(b).unwrap();
        assert_eq!(
            kv.get(Cf::Chunks, &[9, 1]).unwrap().as_deref(),
            Some(&b"unlogged"[..])
        );
        kv.flush(Cf::Chunks).unwrap();

        // large values survive byte for byte
        let big: Vec<u8> = (0..(1 << 20) + 17).map(|i| (i * 31 % 251) as u8).collect();
        let mut b = Batch::new();
        b.put(Cf::Chunks, vec![9, 9], big.clone());
        kv.write(b, true).unwrap();
        assert_eq!(kv.get(Cf::Chunks, &[9, 9]).unwrap().unwrap(), big);
    }

    #[test]
    fn prefix_end_works() {
        assert_eq!(prefix_end(b"ab"), b"ac".to_vec());
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
        assert_eq!(prefix_end(&[0xff, 0xff]), Vec::<u8>::new());
    }

    #[test]
    fn mem_conforms() {
        conformance(&mem::MemKv::default());
    }

    #[cfg(feature = "rocksdb")]
    #[test]
    fn rocks_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let kv = rocks::RocksKv::open(dir.path(), &rocks::Tuning::default()).unwrap();
        conformance(&kv);
        drop(kv);
        // and it persists, flushed unlogged writes included
        let kv = rocks::RocksKv::open(dir.path(), &rocks::Tuning::default()).unwrap();
        assert_eq!(kv.get(Cf::Meta, b"k").unwrap().as_deref(), Some(&b"v2"[..]));
        assert_eq!(
            kv.get(Cf::Chunks, &[9, 1]).unwrap().as_deref(),
            Some(&b"unlogged"[..])
        );
    }
}
