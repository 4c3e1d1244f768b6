//! The RocksDB implementation of `Kv`, and the only file that names RocksDB.
//!
//! Tuning rationale:
//! * `chunks` keeps values of 32 KiB and more in blob files (integrated BlobDB), so compaction
//!   moves small index entries, never layer bytes; layers are already compressed, so no
//!   compression there. Metadata families use LZ4.
//! * Memtables across all families are capped (`db_write_buffer_size`) so a large streaming
//!   write cannot grow the daemon's memory without bound.
//! * Durability comes from the WAL for metadata and small writes (unsynced writes survive a
//!   process kill because the WAL is written with write(2) before `write` returns; a synced
//!   batch makes it and every earlier WAL record durable against power loss too), and from a
//!   memtable flush for bulk bytes written with `write_unlogged`, which land on disk once
//!   instead of twice (WAL + blob file).
//! * Deleted blobs give their space back when a compaction drops the keys that reference
//!   their blob files. Nothing but new writes triggers one, so after deleting, the store asks
//!   for it ([`Kv::reclaim`]) over just the deleted ranges.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamily,
    ColumnFamilyDescriptor, CompactOptions, DBCompressionType, FlushOptions, Options, ReadOptions,
    WriteBatch, WriteOptions,
};

use super::{Batch, Cf, Kv, Op, Visit};
use crate::error::{Error, Result};

/// Largest RocksDB info LOG file; with the four old ones kept, at most 40 MiB of it.
const LOG_FILE_BYTES: usize = 8 << 20;

// Column families are fixed at open, so the single-threaded-CF flavour (plain `&ColumnFamily`
// handles, no per-call Arc) is enough; the DB itself is still shared across threads.
type Db = rocksdb::DB;

#[derive(Debug, Clone)]
pub struct Tuning {
    /// Total memtable budget across column families.
    pub write_buffer_bytes: usize,
    /// One column family's memtable size (a flush starts when one fills).
    pub cf_write_buffer_bytes: usize,
    /// Shared block cache for metadata.
    pub block_cache_bytes: usize,
    /// Values at least this large go to blob files.
    pub min_blob_size: u64,
}

/// The default `memory_budget_mib`.
pub const DEFAULT_BUDGET_MIB: u64 = 48;

impl Tuning {
    /// RocksDB's share of memory from one budget (`memory_budget_mib`): two thirds to
    /// memtables (all column families together; a write stalls rather than exceed it), a
    /// sixth to the block cache of metadata (index and filter blocks included, see `open_db`),
    /// and each family's memtable at most a quarter of the memtable share. Blob bytes are not
    /// cached: reads stream from the page cache.
    pub fn from_budget_mib(mib: u64) -> Tuning {
        let budget = (mib.clamp(8, 1 << 20) as usize) << 20;
        let write = budget / 3 * 2;
        Tuning {
            write_buffer_bytes: write,
            cf_write_buffer_bytes: (write / 4).clamp(1 << 20, 64 << 20),
            block_cache_bytes: budget / 6,
            min_blob_size: 32 << 10,
        }
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning::from_budget_mib(DEFAULT_BUDGET_MIB)
    }
}

pub struct RocksKv {
    db: Handle,
    /// Still read-only (a `Handle::Swappable` store not yet reopened for writing).
    read_only: AtomicBool,
    /// When the last reopen was tried; held while one runs.
    reopen: Mutex<Option<Instant>>,
    dir: PathBuf,
    tuning: Tuning,
}

/// The open database, shared so a value handed out without a copy (`get_bytes`) can keep
/// it open.
enum Handle {
    /// Opened for writing: every call borrows it, no lock or count.
    Fixed(Arc<Db>),
    /// Opened read-only on a full disk, replaced once it reopens for writing. Calls take a
    /// counted clone, so the read-only instance closes (and lets go of files the writing one
    /// deletes) once the last call on it ends.
    Swappable(RwLock<Arc<Db>>),
}

/// How often a store open read-only tries to reopen for writing, at most. A try replays the
/// WAL, so it is not free.
const REOPEN_EVERY: Duration = Duration::from_secs(5);

/// Live WAL files beyond which every family with unflushed records is flushed.
///
/// Every memtable switch starts a WAL file, and a file is deleted only once every family with
/// records in it has flushed. Bulk bytes are written without the WAL and each large commit
/// flushes `chunks`, so WAL files stay tiny (a few hundred bytes of metadata) and
/// `max_total_wal_size`, a byte count, would let hundreds of thousands pile up behind a
/// family that is rarely written (leases, images), each replayed at the next start
/// (measured: 1,322 files of ~800 bytes after three bench rounds).
const WAL_FILES_MAX: usize = 16;

/// A value RocksDB pinned for us (for a blob-file value: the buffer it read the record into),
/// owned by a `Bytes` so it travels to the client without a copy.
struct Pinned {
    // Declared first, so it is dropped before the DB it borrows.
    slice: rocksdb::DBPinnableSlice<'static>,
    _db: Arc<Db>,
}

impl AsRef<[u8]> for Pinned {
    fn as_ref(&self) -> &[u8] {
        &self.slice
    }
}

/// Values smaller than this are copied out instead of pinned: a pinned small value would hold
/// a whole block-cache block (or memtable copy) for as long as a client keeps it.
const PIN_MIN: usize = 16 << 10;

/// RocksDB's status, as a kind the caller can act on. A checksum mismatch (a block, a blob
/// record, a WAL record) is `Corruption`: the bytes on disk are not what was written, which
/// is data loss, never a retryable internal error. A full disk is a resource to free; other
/// I/O failures may pass (a remounted volume, a busy device).
fn io(e: rocksdb::Error) -> Error {
    use rocksdb::ErrorKind as K;
    let text = e.to_string();
    match e.kind() {
        K::Corruption => Error::data_loss(format!("storage: damaged data on disk: {text}")),
        K::IOError if is_no_space(&text) => {
            Error::exhausted(format!("storage: the disk is full: {text}"))
        }
        K::IOError => Error::unavailable(format!("storage: I/O error: {text}")),
        K::Busy | K::TimedOut | K::TryAgain | K::ShutdownInProgress => {
            Error::unavailable(format!("storage: {text}"))
        }
        _ => Error::internal(format!("storage: {text}")),
    }
}

/// ENOSPC, or EDQUOT: a filesystem quota (XFS project quotas, as ephemeral-storage limits
/// use) is as full as a full disk.
fn is_no_space(text: &str) -> bool {
    text.contains("No space left on device")
        || text.contains("NoSpace")
        || text.contains("Disk quota exceeded")
}

fn batch_of(db: &Db, batch: &Batch) -> WriteBatch {
    // Sized up front: a batch of bulk chunks would otherwise be copied again each time
    // RocksDB's buffer grows. (A record's header is a few bytes beyond key and value.)
    let bytes: usize = batch
        .ops
        .iter()
        .map(|op| match op {
            Op::Put(_, k, v) => k.len() + v.len() + 16,
            Op::DeleteRange(_, from, to) => from.len() + to.len() + 16,
            Op::Delete(_, k) => k.len() + 16,
        })
        .sum();
    let mut wb = WriteBatch::with_capacity_bytes(bytes + 12);
    for op in &batch.ops {
        match op {
            Op::Put(cf, k, v) => wb.put_cf(handle(db, *cf), k, v),
            Op::Delete(cf, k) => wb.delete_cf(handle(db, *cf), k),
            Op::DeleteRange(cf, from, to) => wb.delete_range_cf(handle(db, *cf), from, to),
        }
    }
    wb
}

impl RocksKv {
    /// Opens (or creates) the store at `path`.
    ///
    /// A full disk does not keep the daemon down. Opening for writing replays the WAL into
    /// new table files, which a full disk refuses; the store then opens for writing with the
    /// replayed records kept in memory and in their WAL (RocksDB's
    /// `avoid_flush_during_recovery`), which needs only a few KiB for a new MANIFEST and WAL,
    /// so deletes and collections can make room. With not even that, it opens read-only
    /// (the WAL replayed in memory, nothing written): reads are served, and writes are
    /// refused with ResourceExhausted until one finds room to reopen for writing
    /// ([`RocksKv::writable`]).
    pub fn open(path: &Path, tuning: &Tuning) -> Result<RocksKv> {
        std::fs::create_dir_all(path).map_err(|e| {
            Error::internal(format!(
                "cannot create data directory {}: {e}",
                path.display()
            ))
        })?;
        let no_space =
            |e: &rocksdb::Error| e.kind() == rocksdb::ErrorKind::IOError && is_no_space(e.as_ref());
        let (db, read_only) = match open_db(path, tuning, OpenAs::Write) {
            Ok(db) => (db, false),
            Err(e) if no_space(&e) => match open_db(path, tuning, OpenAs::WriteKeepingWal) {
                Ok(db) => {
                    tracing::warn!(
                        dir = %path.display(),
                        error = %e,
                        "the disk is full: the store is open with its WAL unflushed; \
                         delete content to make room"
                    );
                    (db, false)
                }
                Err(e) if no_space(&e) => {
                    tracing::warn!(
                        dir = %path.display(),
                        error = %e,
                        "the disk is full: the store is open read-only until there is room \
                         to write"
                    );
                    (
                        open_db(path, tuning, OpenAs::ReadOnly).map_err(|e| open_error(path, e))?,
                        true,
                    )
                }
                Err(e) => return Err(open_error(path, e)),
            },
            Err(e) => return Err(open_error(path, e)),
        };
        Ok(RocksKv {
            db: if read_only {
                Handle::Swappable(RwLock::new(Arc::new(db)))
            } else {
                Handle::Fixed(Arc::new(db))
            },
            read_only: AtomicBool::new(read_only),
            reopen: Mutex::new(None),
            dir: path.to_path_buf(),
            tuning: tuning.clone(),
        })
    }

    fn db(&self) -> Cow<'_, Arc<Db>> {
        match &self.db {
            Handle::Fixed(db) => Cow::Borrowed(db),
            Handle::Swappable(db) => Cow::Owned(db.read().clone()),
        }
    }

    /// The database, open for writing: a store open read-only tries to reopen (at most
    /// every REOPEN_EVERY), and refuses while the disk is still too full.
    fn writable(&self) -> Result<Cow<'_, Arc<Db>>> {
        let Handle::Swappable(swap) = &self.db else {
            return Ok(self.db());
        };
        if !self.read_only.load(Ordering::Acquire) {
            return Ok(self.db());
        }
        let mut last = self.reopen.lock();
        if !self.read_only.load(Ordering::Acquire) {
            return Ok(self.db());
        }
        let refuse = |why: &str| {
            Error::exhausted(format!(
                "the store is open read-only: its disk ({}) was full when the daemon started \
                 ({why}); writes resume by themselves once there is room",
                self.dir.display()
            ))
        };
        if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return Err(refuse("still full at the last try"));
        }
        *last = Some(Instant::now());
        // A read-only instance takes no lock on the directory, so this one can open beside
        // it.
        match open_db(&self.dir, &self.tuning, OpenAs::Write)
            .or_else(|_| open_db(&self.dir, &self.tuning, OpenAs::WriteKeepingWal))
        {
            Ok(db) => {
                *swap.write() = Arc::new(db);
                self.read_only.store(false, Ordering::Release);
                tracing::warn!(dir = %self.dir.display(), "the store has room again: open for writing");
                Ok(self.db())
            }
            Err(e) => Err(refuse(e.as_ref())),
        }
    }
}

fn open_error(path: &Path, e: rocksdb::Error) -> Error {
    if e.kind() == rocksdb::ErrorKind::Corruption {
        // Damaged metadata (an SST, the MANIFEST, the WAL): say what to do, not only
        // what RocksDB found.
        Error::data_loss(format!(
            "the data directory {dir} is damaged and cannot be opened ({e}). Stop \
             anything using it, copy it aside as a backup, then run `contentd repair \
             --root {dir}`: it salvages what can be read, re-verifies every blob it \
             keeps and reports what was lost",
            dir = path.display()
        ))
    } else {
        let e = io(e);
        Error::new(
            e.kind(),
            format!("cannot open RocksDB at {}: {e}", path.display()),
        )
    }
}

/// Files RocksDB keeps open at once (table files and blob files, in its table cache): half
/// the process's descriptor limit, the rest left for client connections, listeners, WAL,
/// MANIFEST and the files a flush or compaction is writing. RocksDB's default keeps every
/// file open for good, and every large blob committed on its own is a blob file and a table
/// file of its own: under a 256-descriptor limit the 199th push of a 600 KiB blob failed
/// with "Too many open files" (a 1024 limit, a shell's usual, is reached the same way by a
/// few hundred layers). Bounded, RocksDB closes the least recently used file instead.
fn open_files_budget() -> i32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    // RocksDB takes no fewer than 20.
    (soft / 2).clamp(20, 1 << 16) as i32
}

/// Largest table or blob file RocksDB writes (see `open_db` for why small).
const FILE_BYTES: u64 = 16 << 20;

/// How [`open_db`] opens the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OpenAs {
    Write,
    /// For writing, without flushing what the WAL replays (it stays in the memtables and in
    /// its WAL files until a later flush): the open writes only a new MANIFEST and WAL.
    WriteKeepingWal,
    ReadOnly,
}

fn open_db(path: &Path, tuning: &Tuning, how: OpenAs) -> std::result::Result<Db, rocksdb::Error> {
    let mut db_opts = match how {
        // The binding has no setter for it; set first, on options holding nothing else.
        OpenAs::WriteKeepingWal => {
            Options::default().get_options_from_string("avoid_flush_during_recovery=true")?
        }
        OpenAs::Write | OpenAs::ReadOnly => Options::default(),
    };
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_db_write_buffer_size(tuning.write_buffer_bytes);
    db_opts.set_max_background_jobs(2);
    // RocksDB's info LOG rolls only at open unless capped, and one benchmark run wrote
    // 8 MB of it: a daemon that runs for months would fill its disk with it.
    db_opts.set_max_log_file_size(LOG_FILE_BYTES);
    db_opts.set_keep_log_file_num(4);
    db_opts.set_max_total_wal_size(256 << 20);
    db_opts.set_max_open_files(open_files_budget());
    db_opts.set_bytes_per_sync(1 << 20);
    let cache = Cache::new_lru_cache(tuning.block_cache_bytes);

    let meta_opts = || {
        let mut o = Options::default();
        let mut t = BlockBasedOptions::default();
        t.set_block_cache(&cache);
        t.set_bloom_filter(10.0, false);
        // Index and filter blocks live in the block cache, so they count against the memory
        // budget. Left to RocksDB they are held per open table, outside any cap: a daemon
        // idling on a store of 5.85M blobs was at 69-90 MiB RSS (two starts), 36.7 MiB with
        // them cached. Partitioned, so a lookup in a large table loads a few KiB of its
        // filter and index, never the whole (MiBs in a large store, more than the cache holds).
        t.set_cache_index_and_filter_blocks(true);
        t.set_pin_l0_filter_and_index_blocks_in_cache(true);
        t.set_partition_filters(true);
        t.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
        t.set_pin_top_level_index_and_filter(true);
        o.set_block_based_table_factory(&t);
        o.set_compression_type(DBCompressionType::Lz4);
        o.set_write_buffer_size(tuning.cf_write_buffer_bytes);
        // Small files, because deleting a large one stalls every fsync behind it: freeing
        // its blocks is one journal transaction, and on a file system mounted with `discard`
        // (as on this machine) the commit waits for the device to trim them all. Measured
        // with a 200-byte fdatasync'd append looping beside: unlinking one 192 MiB file
        // stalled it 150-157 ms, twelve 16 MiB files unlinked back to back 20-22 ms (its
        // jitter then). Compactions delete their inputs as they finish, so with 64 MiB files
        // (RocksDB's default) a collection's sweep, which compacts whole families, put
        // 30-56 ms on the commits that followed each compaction (`bench-gc`: every write
        // over 28 ms started within 10 ms of a compaction's end).
        o.set_target_file_size_base(FILE_BYTES);
        o
    };
    let descriptors = Cf::ALL.iter().map(|cf| {
        let mut o = meta_opts();
        if *cf == Cf::Chunks {
            o.set_compression_type(DBCompressionType::None);
            o.set_write_buffer_size(tuning.cf_write_buffer_bytes);
            o.set_max_write_buffer_number(4);
            o.set_enable_blob_files(true);
            o.set_min_blob_size(tuning.min_blob_size);
            o.set_blob_file_size(FILE_BYTES);
            o.set_blob_compression_type(DBCompressionType::None);
            o.set_enable_blob_gc(true);
            o.set_blob_gc_age_cutoff(0.25);
            o.set_blob_gc_force_threshold(0.5);
            // No readahead for blob GC: a compaction keeps one prefetch buffer per blob
            // file it relocates from, so with readahead its memory grew with the number
            // of blob files (heaptrack: 263 MiB held by one compaction's buffers, the
            // daemon at 290 MiB RSS). Values here are 32 KiB to 1 MiB, read whole by one
            // pread each, which is what readahead would have bought.
            o.set_blob_compaction_readahead_size(0);
        }
        let name = if *cf == Cf::Meta {
            rocksdb::DEFAULT_COLUMN_FAMILY_NAME
        } else {
            cf.name()
        };
        ColumnFamilyDescriptor::new(name, o)
    });
    if how == OpenAs::ReadOnly {
        Db::open_cf_descriptors_read_only(&db_opts, path, descriptors, false)
    } else {
        Db::open_cf_descriptors(&db_opts, path, descriptors)
    }
}

impl RocksKv {
    /// Runs RocksDB's repair on a data directory that no longer opens: it rebuilds the
    /// MANIFEST from the table and blob files it can read and drops what it cannot. What
    /// survived must then be re-verified (`contentd repair` does).
    pub fn repair(path: &Path, tuning: &Tuning) -> Result<()> {
        let mut opts = Options::default();
        opts.set_db_write_buffer_size(tuning.write_buffer_bytes);
        Db::repair(&opts, path).map_err(|e| {
            let e = io(e);
            Error::new(
                e.kind(),
                format!("RocksDB repair of {} failed: {e}", path.display()),
            )
        })
    }

    /// Every `(key, value)` record of an integrated-BlobDB `.blob` file, read directly from
    /// the file (RocksDB's blob log format: a 30-byte header, then records of key length
    /// u64, value length u64, expiration u64, two CRC32Cs, key, value, all little-endian;
    /// a 32-byte footer when the file was closed). RocksDB's repair does not register blob
    /// files in the MANIFEST it rebuilds, and drops them as obsolete once the database is
    /// opened, so `contentd repair` moves them aside first and puts their records back.
    /// Parsing stops at the first record header that does not fit the file; checksums are
    /// not checked here: every salvaged blob is re-verified against its digest.
    pub fn blob_file_records(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        const HEADER: usize = 30;
        const RECORD_HEADER: usize = 32;
        const FOOTER: usize = 32;
        const MAGIC: [u8; 4] = 0x0024_8f37u32.to_le_bytes();
        let data = std::fs::read(path)
            .map_err(|e| Error::unavailable(format!("reading {}: {e}", path.display())))?;
        if data.len() < HEADER || data[..4] != MAGIC {
            return Err(Error::data_loss(format!(
                "{} is not a blob file (bad header)",
                path.display()
            )));
        }
        let end = if data.len() >= HEADER + FOOTER && data[data.len() - FOOTER..][..4] == MAGIC {
            data.len() - FOOTER
        } else {
            data.len()
        };
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
        };
        let mut out = Vec::new();
        let mut pos = HEADER;
        while pos + RECORD_HEADER <= end {
            let (Some(klen), Some(vlen)) = (u64_at(pos), u64_at(pos + 8)) else {
                break;
            };
            let body = pos + RECORD_HEADER;
            let (Ok(klen), Ok(vlen)) = (usize::try_from(klen), usize::try_from(vlen)) else {
                break;
            };
            let Some(stop) = body
                .checked_add(klen)
                .and_then(|k| k.checked_add(vlen))
                .filter(|s| *s <= end)
            else {
                break;
            };
            out.push((
                data[body..body + klen].to_vec(),
                data[body + klen..stop].to_vec(),
            ));
            pos = stop;
        }
        Ok(out)
    }

    /// When WAL files pile up (see [`WAL_FILES_MAX`]), starts a flush of every family whose
    /// memtable holds anything, which lets RocksDB delete them. Housekeeping: it never fails
    /// the write that triggered it, and it does not wait for the flushes.
    fn release_wals(&self) {
        let db = self.db();
        let wals = wal_files(&self.dir);
        if wals <= WAL_FILES_MAX {
            return;
        }
        let mut fo = FlushOptions::default();
        fo.set_wait(false);
        for cf in Cf::ALL {
            let h = handle(&db, cf);
            // Counts every record, deletes included.
            let entries = db
                .property_int_value_cf(h, "rocksdb.num-entries-active-mem-table")
                .ok()
                .flatten()
                .unwrap_or(0);
            if entries == 0 {
                continue;
            }
            if let Err(e) = db.flush_cf_opt(h, &fo) {
                tracing::warn!(
                    family = cf.name(),
                    wals,
                    "flushing to release WAL files: {e}"
                );
            }
        }
    }
}

impl Kv for RocksKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let db = self.db();
        Ok(db
            .get_pinned_cf(handle(&db, cf), key)
            .map_err(io)?
            .map(|v| v.to_vec()))
    }

    fn get_bytes(&self, cf: Cf, key: &[u8]) -> Result<Option<bytes::Bytes>> {
        let db = self.db();
        // A point read with no snapshot. Releasing a snapshot makes RocksDB re-compact every
        // bottommost file written before it (to zero sequence numbers), and blob GC then
        // rewrites their blobs: reading a freshly written 512 MiB blob under one cost 61
        // compactions that rewrote 488 MB. So a streamed blob is read key by key.
        let Some(slice) = db.get_pinned_cf(handle(&db, cf), key).map_err(io)? else {
            return Ok(None);
        };
        if slice.len() < PIN_MIN {
            return Ok(Some(bytes::Bytes::copy_from_slice(&slice)));
        }
        // SAFETY: the slice borrows only the DB, and `Pinned` keeps the DB alive in a field
        // dropped after it.
        let slice = unsafe {
            std::mem::transmute::<rocksdb::DBPinnableSlice<'_>, rocksdb::DBPinnableSlice<'static>>(
                slice,
            )
        };
        Ok(Some(bytes::Bytes::from_owner(Pinned {
            slice,
            _db: db.into_owned(),
        })))
    }

    fn floor(&self, cf: Cf, key: &[u8], lower: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let db = self.db();
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(lower.to_vec());
        let mut it = db.raw_iterator_cf_opt(handle(&db, cf), ro);
        it.seek_for_prev(key);
        if it.valid() {
            let (k, v) = (it.key().expect("valid"), it.value().expect("valid"));
            return Ok(Some((k.to_vec(), v.to_vec())));
        }
        it.status().map_err(io)?;
        Ok(None)
    }

    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: Visit<'_>) -> Result<()> {
        let db = self.db();
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        if !end.is_empty() {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        let mut it = db.raw_iterator_cf_opt(handle(&db, cf), ro);
        it.seek(start);
        while it.valid() {
            if !visit(it.key().expect("valid"), it.value().expect("valid")) {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(io)
    }

    fn scan_prefixes(
        &self,
        cf: Cf,
        prefixes: &[&[u8]],
        visit: crate::kv::PrefixVisit<'_>,
    ) -> Result<()> {
        // One iterator seeks forward through the sorted prefixes: the per-lookup cost of a
        // collection's edge walk is a seek, not an iterator's setup.
        let (Some(first), Some(last)) = (prefixes.first(), prefixes.last()) else {
            return Ok(());
        };
        let db = self.db();
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(first.to_vec());
        let end = crate::kv::prefix_end(last);
        if !end.is_empty() {
            ro.set_iterate_upper_bound(end);
        }
        let mut it = db.raw_iterator_cf_opt(handle(&db, cf), ro);
        for (i, p) in prefixes.iter().enumerate() {
            it.seek(p);
            while it.valid() {
                let k = it.key().expect("valid");
                if !k.starts_with(p) {
                    break;
                }
                if !visit(i, k, it.value().expect("valid")) {
                    return Ok(());
                }
                it.next();
            }
            it.status().map_err(io)?;
        }
        Ok(())
    }

    fn scan_from_floor(
        &self,
        cf: Cf,
        key: &[u8],
        lower: &[u8],
        end: &[u8],
        visit: Visit<'_>,
    ) -> Result<()> {
        let db = self.db();
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(lower.to_vec());
        if !end.is_empty() {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        let mut it = db.raw_iterator_cf_opt(handle(&db, cf), ro);
        it.seek_for_prev(key);
        if !it.valid() {
            it.status().map_err(io)?;
            it.seek(key);
        }
        while it.valid() {
            if !visit(it.key().expect("valid"), it.value().expect("valid")) {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(io)
    }

    fn write_unlogged(&self, batch: Batch) -> Result<()> {
        let db = self.writable()?;
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        db.write_opt(batch_of(&db, &batch), &wo).map_err(io)
    }

    fn flush(&self, cf: Cf) -> Result<()> {
        let db = self.writable()?;
        db.flush_cf(handle(&db, cf)).map_err(io)?;
        self.release_wals();
        Ok(())
    }

    fn reclaim(&self, cf: Cf, ranges: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        // The range tombstones may still sit in the memtable, which no compaction reads.
        self.flush(cf)?;
        let db = self.db();
        let h = handle(&db, cf);
        let mut o = CompactOptions::default();
        // Writes and background compactions go on meanwhile.
        o.set_exclusive_manual_compaction(false);
        // Deleted keys and their tombstone can both sit in the last level; only a compaction
        // of that level drops the keys, and with them the last references to blob files.
        o.set_bottommost_level_compaction(BottommostLevelCompaction::ForceOptimized);
        // Two passes. The first only drops the deleted keys, so a blob file none of whose
        // blobs is left goes with them, and it writes next to nothing (a few keys, or no
        // file at all). Blob GC in the same compaction would first copy the live blobs of
        // old blob files into new ones, and when the disk is full that write fails and takes
        // the whole compaction with it: a collection would free nothing exactly when the
        // disk is full (measured on a full tmpfs: "IO error: No space left on device: While
        // appending to file: …/000047.blob", nothing freed). The second pass, with blob GC
        // as configured, frees what partly dead blob files hold, when there is room for it.
        let gc_paused = cf == Cf::Chunks
            && db
                .set_options_cf(h, &[("enable_blob_garbage_collection", "false")])
                .is_ok();
        for (from, to) in ranges {
            db.compact_range_cf_opt(h, Some(from), Some(to), &o);
        }
        if gc_paused {
            db.set_options_cf(h, &[("enable_blob_garbage_collection", "true")])
                .map_err(io)?;
            // Blob GC copies the live blobs of the oldest quarter of blob files
            // (`blob_gc_age_cutoff`). With less free than a quarter of all blob files that
            // copy may not fit, and a failed one keeps its partial output (measured: an
            // 11 MB `.blob` left behind, where the first pass had freed 4 MiB). Background
            // compactions still collect partly dead files later.
            let blob_bytes = db
                .property_int_value_cf(h, "rocksdb.total-blob-file-size")
                .ok()
                .flatten()
                .unwrap_or(u64::MAX);
            let free = super::FsSpace::of(&self.dir).map_or(0, |f| f.avail);
            if free >= blob_bytes / 4 {
                for (from, to) in ranges {
                    db.compact_range_cf_opt(h, Some(from), Some(to), &o);
                }
            }
        }
        Ok(())
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<()> {
        let db = self.writable()?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        db.write_opt(batch_of(&db, &batch), &wo).map_err(io)
    }

    fn disk_space(&self) -> Option<(u64, u64)> {
        let db = self.db();
        let fs = super::FsSpace::of(&self.dir)?;
        // Less what the memtables hold: those bytes are written out when they flush.
        let unflushed = db
            .property_int_value_cf(handle(&db, Cf::Chunks), "rocksdb.size-all-mem-tables")
            .ok()
            .flatten()
            .unwrap_or(0);
        Some((fs.avail.saturating_sub(unflushed), fs.size))
    }

    fn disk_usage(&self) -> u64 {
        let db = self.db();
        Cf::ALL
            .iter()
            .map(|cf| {
                let h = handle(&db, *cf);
                let sst = db
                    .property_int_value_cf(h, "rocksdb.total-sst-files-size")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                let blob = db
                    .property_int_value_cf(h, "rocksdb.total-blob-file-size")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                sst + blob
            })
            .sum()
    }
}

fn handle(db: &Db, cf: Cf) -> &ColumnFamily {
    let name = if cf == Cf::Meta {
        rocksdb::DEFAULT_COLUMN_FAMILY_NAME
    } else {
        cf.name()
    };
    db.cf_handle(name).expect("column family opened at start")
}

/// WAL files in a data directory (0 when it cannot be listed).
fn wal_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().as_encoded_bytes().ends_with(b".log"))
            .count()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_or_a_full_quota_is_no_space() {
        assert!(is_no_space(
            "IO error: No space left on device: While appending to file: r/000013.sst: No space left on device"
        ));
        assert!(is_no_space(
            "IO error: While appending to file: r/000009.log: Disk quota exceeded"
        ));
        assert!(!is_no_space(
            "IO error: While pread offset 0 len 4096: Input/output error"
        ));
    }

    #[test]
    fn the_info_log_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        drop(RocksKv::open(dir.path(), &Tuning::default()).unwrap());
        // RocksDB records the options it runs with; the cap must be among them.
        let options = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .unwrap();
        assert!(
            options.contains(&format!("max_log_file_size={LOG_FILE_BYTES}")),
            "no log cap in the OPTIONS file"
        );
        assert!(options.contains("keep_log_file_num=4"));
    }

    #[test]
    fn reclaim_gives_deleted_blob_files_back_to_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let kv = RocksKv::open(dir.path(), &Tuning::default()).unwrap();
        let chunk = vec![3u8; 256 << 10];
        // Two extents of 32 MiB each (the first byte of the key), in blob files. Each is
        // flushed on its own: a blob file holding the end of one and the start of the other
        // (where a background flush cut, which load moves) would stay for the kept one.
        for extent in [1u8, 2] {
            for i in 0..128u32 {
                let mut b = Batch::new();
                b.put(
                    Cf::Chunks,
                    [&[extent][..], &i.to_be_bytes()].concat(),
                    chunk.clone(),
                );
                kv.write_unlogged(b).unwrap();
            }
            kv.flush(Cf::Chunks).unwrap();
        }
        let before = kv.disk_usage();
        assert!(before >= 64 << 20, "{before} bytes on disk");
        let mut b = Batch::new();
        b.delete_range(Cf::Chunks, vec![1], vec![2]);
        kv.write(b, true).unwrap();
        // Deleting alone frees nothing: the files wait for a compaction.
        assert!(kv.disk_usage() >= before);
        kv.reclaim(Cf::Chunks, &[(vec![1], vec![2])]).unwrap();
        let after = kv.disk_usage();
        assert!(
            after < before - (30 << 20) && after >= 32 << 20,
            "{before} bytes before, {after} after"
        );
        // The other extent reads back whole.
        for i in 0..128u32 {
            let k = [&[2u8][..], &i.to_be_bytes()].concat();
            assert_eq!(
                kv.get_bytes(Cf::Chunks, &k).unwrap().as_deref(),
                Some(&chunk[..])
            );
        }
    }

    #[test]
    fn wal_files_do_not_pile_up_behind_a_quiet_family() {
        let dir = tempfile::tempdir().unwrap();
        let kv = RocksKv::open(dir.path(), &Tuning::default()).unwrap();
        // One record in a family nothing else writes: its WAL file (and so every later one)
        // stays live until that family flushes.
        let mut b = Batch::new();
        b.put(Cf::Leases, b"lease".to_vec(), b"kept".to_vec());
        kv.write(b, true).unwrap();
        // Large commits: bulk bytes without the WAL, then a flush, each starting a WAL file.
        for i in 0..(WAL_FILES_MAX * 3) as u32 {
            let mut b = Batch::new();
            b.put(Cf::Chunks, i.to_be_bytes().to_vec(), vec![7u8; 64 << 10]);
            kv.write_unlogged(b).unwrap();
            kv.flush(Cf::Chunks).unwrap();
            let mut b = Batch::new();
            b.put(Cf::Blobs, i.to_be_bytes().to_vec(), b"record".to_vec());
            kv.write(b, true).unwrap();
        }
        // The flushes it starts do not block the commit; they finish in the background.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while wal_files(dir.path()) > WAL_FILES_MAX + 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            wal_files(dir.path()) <= WAL_FILES_MAX + 2,
            "{} WAL files live",
            wal_files(dir.path())
        );
        drop(kv);
        let kv = RocksKv::open(dir.path(), &Tuning::default()).unwrap();
        assert_eq!(
            kv.get(Cf::Leases, b"lease").unwrap(),
            Some(b"kept".to_vec())
        );
        for i in 0..(WAL_FILES_MAX * 3) as u32 {
            assert!(kv.get(Cf::Blobs, &i.to_be_bytes()).unwrap().is_some());
            assert!(kv.get(Cf::Chunks, &i.to_be_bytes()).unwrap().is_some());
        }
    }
}
