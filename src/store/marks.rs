//! The collector's marks within a memory budget.
//!
//! A collection marks (blob fingerprint, scope number) pairs (see `collect.rs`). They are
//! held in a `gc::Grouped` table no larger than a budget. When it fills, its pairs are
//! written out as one sorted run to an unnamed scratch file and the table starts again,
//! empty: memory is the budget plus each run's block index (a tenth of a byte per pair),
//! however many blobs are live. A table grown from small that could only grow further by
//! holding more than the budget (old and new slots at once) spills instead, and starts
//! again at the budget's full size. A lookup asks the table, then each run: a binary search of
//! the run's index names the one block of the file that can hold the pair, read with one
//! `pread` (from the page cache, as a rule). A new run is merged with the one before it
//! while that one is not more than twice its size (a binary counter), so with n marks and a
//! table of t there are at most log2(n/t) + 1 runs to ask (3 at ten million blobs and the
//! default budget) and each mark is rewritten that many times at most.
//!
//! Failure, which must never make the collector delete what is live. Each block's CRC32 is
//! kept in memory beside the index, so a run the disk changed under us is detected, not
//! trusted. A lookup that cannot read a run, or finds it damaged, answers "marked" to the
//! sweep (the blob is kept) and "not marked yet" to the walk (the node is walked again,
//! and its children with it; the walk still ends, since the table then answers for it);
//! the error is kept and the collector fails its collection before its next sweep batch
//! ([`SpillingMarks::failure`]). A spill that cannot be written (a full disk, when a
//! collection is needed most) loses nothing: its pairs stay in the table, which from then
//! on grows past the budget, and the collection goes on.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;

use crate::error::Error;
use crate::gc::{Grouped, MarkSet};

/// A pair as stored in a run: the fingerprint then the group, both big-endian, so runs
/// sort bytewise in (fingerprint, group) order.
type Entry = [u8; ENTRY];
const ENTRY: usize = 20;
/// Entries per block of a run file (one 4 KiB page holds them).
const PER_BLOCK: usize = 204;
const BLOCK: usize = PER_BLOCK * ENTRY;
/// A spill sorts the table's pairs a sixteenth of the fingerprint space at a time (by the
/// top four bits), so sorting needs a sixteenth of the table again, not a whole copy.
const PARTS: u32 = 16;
/// Bytes a table slot costs: a 20-byte entry and hashbrown's control byte.
const SLOT: usize = 21;
/// The smallest table, whatever the budget (hashbrown's smallest: eight slots).
const MIN_ITEMS: usize = 7;

fn encode((fp, g): (u128, u32)) -> Entry {
    let mut e = [0u8; ENTRY];
    e[..16].copy_from_slice(&fp.to_be_bytes());
    e[16..].copy_from_slice(&g.to_be_bytes());
    e
}

/// Items a table fills to within `budget` bytes: hashbrown holds 7/8 of a power-of-two
/// number of slots, and a table grown by doubling from any smaller size stops there too.
pub fn items_within(budget: usize) -> usize {
    let slots = (budget / SLOT).max(MIN_ITEMS * 8 / 7 + 1);
    let slots = if slots.is_power_of_two() {
        slots
    } else {
        slots.next_power_of_two() / 2
    };
    (slots / 8 * 7).max(MIN_ITEMS)
}

/// Slots behind a hashbrown table that reports room for `cap` entries (it keeps 7/8 of a
/// power of two, or one less than 4 or 8 below that).
fn slots(cap: usize) -> usize {
    match cap {
        0 => 0,
        1..=3 => 4,
        4..=7 => 8,
        _ => cap / 7 * 8,
    }
}

/// One sorted, immutable run of pairs in a scratch file.
struct Run {
    file: File,
    /// The first entry of each block.
    index: Vec<Entry>,
    /// Each block's CRC32.
    sums: Vec<u32>,
    len: usize,
}

impl Run {
    fn read_block<'a>(&self, i: usize, buf: &'a mut [u8; BLOCK]) -> std::io::Result<&'a [Entry]> {
        let first = i * PER_BLOCK;
        let n = (self.len - first).min(PER_BLOCK);
        let bytes = &mut buf[..n * ENTRY];
        self.file.read_exact_at(bytes, (first * ENTRY) as u64)?;
        if crc32fast::hash(bytes) != self.sums[i] {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("block {i} of a scratch run does not match its checksum"),
            ));
        }
        Ok(bytes.as_chunks::<ENTRY>().0)
    }

    fn contains(&self, k: &Entry) -> std::io::Result<bool> {
        let i = self.index.partition_point(|f| f <= k);
        if i == 0 {
            return Ok(false);
        }
        if self.index[i - 1] == *k {
            return Ok(true);
        }
        let mut buf = [0u8; BLOCK];
        Ok(self.read_block(i - 1, &mut buf)?.binary_search(k).is_ok())
    }

    /// Whether any pair of the run has this fingerprint.
    fn contains_item(&self, fp: &[u8]) -> std::io::Result<bool> {
        let i = self.index.partition_point(|f| &f[..16] < fp);
        if self.index.get(i).is_some_and(|f| &f[..16] == fp) {
            return Ok(true);
        }
        if i == 0 {
            return Ok(false);
        }
        // Block i-1 starts below the fingerprint: its pairs, if any, are further in.
        let mut buf = [0u8; BLOCK];
        let block = self.read_block(i - 1, &mut buf)?;
        let j = block.partition_point(|e| &e[..16] < fp);
        Ok(block.get(j).is_some_and(|e| &e[..16] == fp))
    }
}

/// Writes entries, given in order, as a run.
struct RunWriter {
    out: BufWriter<File>,
    index: Vec<Entry>,
    sums: Vec<u32>,
    block: crc32fast::Hasher,
    len: usize,
}

impl RunWriter {
    fn new(dir: &std::path::Path) -> std::io::Result<Self> {
        Ok(RunWriter {
            out: BufWriter::with_capacity(64 << 10, tempfile::tempfile_in(dir)?),
            index: Vec::new(),
            sums: Vec::new(),
            block: crc32fast::Hasher::new(),
            len: 0,
        })
    }

    fn push(&mut self, e: &Entry) -> std::io::Result<()> {
        if self.len.is_multiple_of(PER_BLOCK) {
            self.index.push(*e);
        }
        self.len += 1;
        self.block.update(e);
        if self.len.is_multiple_of(PER_BLOCK) {
            let done = std::mem::take(&mut self.block);
            self.sums.push(done.finalize());
        }
        self.out.write_all(e)
    }

    fn finish(mut self) -> std::io::Result<Run> {
        if !self.len.is_multiple_of(PER_BLOCK) {
            self.sums.push(self.block.finalize());
        }
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        Ok(Run {
            file,
            index: self.index,
            sums: self.sums,
            len: self.len,
        })
    }
}

/// A run read front to back.
struct RunReader {
    input: BufReader<File>,
    left: usize,
    head: Option<Entry>,
}

impl RunReader {
    fn new(run: &Run) -> std::io::Result<Self> {
        let mut file = run.file.try_clone()?;
        std::io::Seek::rewind(&mut file)?;
        let mut r = RunReader {
            input: BufReader::with_capacity(64 << 10, file),
            left: run.len,
            head: None,
        };
        r.advance()?;
        Ok(r)
    }

    fn advance(&mut self) -> std::io::Result<()> {
        self.head = if self.left == 0 {
            None
        } else {
            let mut e = [0u8; ENTRY];
            self.input.read_exact(&mut e)?;
            self.left -= 1;
            Some(e)
        };
        Ok(())
    }
}

/// Marks held in memory up to a budget, the rest in sorted runs on disk.
pub struct SpillingMarks {
    table: Grouped,
    budget: usize,
    /// Items and spilled pairs the table may hold (its room at the budget).
    max_items: usize,
    max_spilled: usize,
    /// While set, a full table spills only at its very limit (the collector holds its gate,
    /// and writers wait for it): the last eighth of the room is for that.
    holding: bool,
    runs: Vec<Run>,
    pairs: usize,
    spills: usize,
    dir: PathBuf,
    /// Set once a spill could not be written: the table keeps everything from then on.
    in_memory: bool,
    failure: std::sync::OnceLock<Error>,
}

impl SpillingMarks {
    /// Marks within `budget` bytes of tables, spilling to unnamed files in `dir`. The table
    /// starts with room for `items` items and `spilled` pairs (at most the budget's).
    pub fn new(budget: usize, dir: PathBuf, items: usize, spilled: usize) -> Self {
        let max_items = items_within(budget);
        let max_spilled = (max_items / 8).max(MIN_ITEMS);
        SpillingMarks {
            table: Grouped::with_capacity(items.min(max_items), spilled.min(max_spilled)),
            budget,
            max_items,
            max_spilled,
            holding: false,
            runs: Vec::new(),
            pairs: 0,
            spills: 0,
            dir,
            in_memory: false,
            failure: std::sync::OnceLock::new(),
        }
    }

    /// Whether any scope marked the item.
    pub fn contains_item(&self, item: u128) -> bool {
        if self.table.contains_item(item) {
            return true;
        }
        let fp = item.to_be_bytes();
        for run in &self.runs {
            match run.contains_item(&fp) {
                Ok(true) => return true,
                Ok(false) => {}
                // Unknown counts as marked: the sweep keeps what it cannot rule out.
                Err(e) => {
                    self.fail(e);
                    return true;
                }
            }
        }
        false
    }

    /// Distinct items marked, as near as the runs tell (they count pairs): the next
    /// collection's starting size.
    pub fn items(&self) -> usize {
        self.pairs - self.table.len() + self.table.items()
    }

    /// Pairs beyond two per item held by the table now.
    pub fn spilled(&self) -> usize {
        self.table.spilled()
    }

    /// How many times the table was written out to disk.
    pub fn spills(&self) -> usize {
        self.spills
    }

    /// The first failure to read a run back: a collection that met one must not sweep.
    pub fn failure(&self) -> Option<&Error> {
        self.failure.get()
    }

    /// Set while writers wait on the collector: a full table then spills only at its very
    /// limit.
    pub fn set_holding(&mut self, on: bool) {
        self.holding = on;
    }

    fn in_runs(&self, k: &Entry) -> std::io::Result<bool> {
        for run in &self.runs {
            if run.contains(k)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn fail(&self, e: std::io::Error) {
        if self.failure.get().is_none() {
            tracing::error!(error = %e, dir = %self.dir.display(), "collector marks: could not read");
        }
        let _ = self.failure.set(Error::data_loss(format!(
            "the collector could not read its marks back from {}: {e}",
            self.dir.display()
        )));
    }

    /// Whether the next new item would grow the table past the budget. A hashbrown table
    /// grows by doubling and holds its old slots beside the new ones while it moves them,
    /// so a table grown from small to the budget's size would hold half the budget again.
    fn growth_over_budget(&self) -> bool {
        let (items, spilled) = self.table.capacity();
        if self.table.items() < items || items >= self.max_items || self.table.is_empty() {
            return false;
        }
        let now = (slots(items) + slots(spilled)) * SLOT;
        now + slots(items) * 2 * SLOT > self.budget
    }

    /// [`Self::spill`], or, when the disk refuses it, every mark kept in memory from then on.
    fn spill_or_keep(&mut self) -> bool {
        match self.spill() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    dir = %self.dir.display(),
                    marks = self.pairs,
                    "collector marks: could not write them out; keeping them all in memory"
                );
                self.in_memory = true;
                false
            }
        }
    }

    fn full(&self) -> bool {
        let (items, spilled) = (self.table.items(), self.table.spilled());
        let soft = |max: usize| if self.holding { max } else { max - max / 8 };
        items >= soft(self.max_items) || spilled >= soft(self.max_spilled)
    }

    /// Writes the table out as a run and empties it (keeping its room); merges the runs
    /// into one when there are MAX_RUNS.
    fn spill(&mut self) -> std::io::Result<()> {
        let mut w = RunWriter::new(&self.dir)?;
        let mut part: Vec<Entry> = Vec::new();
        for p in 0..PARTS {
            part.clear();
            part.extend(
                self.table
                    .pairs()
                    .filter(|(fp, _)| (fp >> 124) as u32 == p)
                    .map(encode),
            );
            part.sort_unstable();
            for e in &part {
                w.push(e)?;
            }
        }
        let run = w.finish()?;
        if run.len != self.table.len() {
            return Err(std::io::Error::other(format!(
                "a spill wrote {} of {} marks",
                run.len,
                self.table.len()
            )));
        }
        // Only now is the table's content on disk (the file is ours alone and never
        // truncated, so what was written is what later reads see).
        self.runs.push(run);
        self.table.clear();
        self.spills += 1;
        while let [.., a, b] = &self.runs[..]
            && b.len.saturating_mul(2) >= a.len
        {
            let merged = merge(&self.dir, [a, b])?;
            self.runs.truncate(self.runs.len() - 2);
            self.runs.push(merged);
        }
        Ok(())
    }
}

/// One run holding the pairs of `runs`.
fn merge(dir: &std::path::Path, runs: [&Run; 2]) -> std::io::Result<Run> {
    let mut inputs = runs
        .iter()
        .map(|r| RunReader::new(r))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut w = RunWriter::new(dir)?;
    while let Some((i, e)) = inputs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.head.map(|e| (i, e)))
        .min_by_key(|(_, e)| *e)
    {
        w.push(&e)?;
        inputs[i].advance()?;
    }
    let run = w.finish()?;
    let total: usize = runs.iter().map(|r| r.len).sum();
    if run.len != total {
        return Err(std::io::Error::other(format!(
            "a merge wrote {} of {total} marks",
            run.len
        )));
    }
    Ok(run)
}

impl MarkSet for SpillingMarks {
    type Key = (u128, u32);

    fn insert(&mut self, k: (u128, u32)) -> bool {
        if self.runs.is_empty() {
            // Nothing on disk (every collection below the budget): the table alone answers.
            if !self.table.insert(k) {
                return false;
            }
        } else {
            if self.table.contains(&k) {
                return false;
            }
            match self.in_runs(&encode(k)) {
                Ok(true) => return false,
                Ok(false) => {}
                // Unknown counts as new: walking a node twice is harmless, skipping it is not.
                Err(e) => self.fail(e),
            }
            self.table.insert(k);
        }
        self.pairs += 1;
        if self.in_memory {
            return true;
        }
        if self.full() {
            self.spill_or_keep();
        } else if !self.holding && self.growth_over_budget() && self.spill_or_keep() {
            // Out of room below the budget's size (a first collection's table, grown from
            // small): its pairs are on disk now, so the old slots go before the new, full
            // ones are taken. (Writers waiting under the gate let it grow instead.)
            let spilled = self.table.capacity().1;
            self.table = Grouped::with_capacity(0, 0);
            self.table = Grouped::with_capacity(self.max_items, spilled);
        }
        true
    }

    fn contains(&self, k: &(u128, u32)) -> bool {
        // Unknown counts as marked: the sweep keeps what it cannot rule out.
        self.table.contains(k)
            || self.in_runs(&encode(*k)).unwrap_or_else(|e| {
                self.fail(e);
                true
            })
    }

    fn len(&self) -> usize {
        self.pairs
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn spread(i: u128) -> u128 {
        i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    }

    #[test]
    fn tables_fit_their_budget() {
        for mib in [1usize, 16, 48, 64, 100] {
            let budget = mib << 20;
            let n = items_within(budget);
            let g = Grouped::with_capacity(n, 0);
            let slots = g.capacity().0 * 8 / 7;
            assert!(slots * SLOT <= budget, "{mib} MiB: {slots} slots");
            assert!(
                slots * SLOT * 2 > budget,
                "{mib} MiB: {slots} slots wastes half"
            );
        }
        assert_eq!(items_within(0), MIN_ITEMS);
    }

    #[test]
    fn a_store_ten_times_the_budget_spills_and_stays_within_it() {
        let dir = tempfile::tempdir().unwrap();
        let budget = 64 << 10;
        let mut m = SpillingMarks::new(budget, dir.path().into(), 0, 0);
        let room = items_within(budget);
        let n = room * 10;
        for i in 0..n as u128 {
            assert!(m.insert((spread(i), (i % 3) as u32)));
            assert!(m.table.capacity().0 <= room);
        }
        assert!(m.spills() >= 10, "{} spills", m.spills());
        // A binary counter of runs: 11 spills leave as many runs as 11 has one bits.
        assert!(m.runs.len() <= 4, "{} runs", m.runs.len());
        assert!(m.runs.windows(2).all(|w| w[0].len > 2 * w[1].len));
        assert_eq!(m.len(), n);
        for i in 0..n as u128 {
            assert!(!m.insert((spread(i), (i % 3) as u32)));
            assert!(m.contains(&(spread(i), (i % 3) as u32)));
            assert!(!m.contains(&(spread(i), (i % 3) as u32 + 1)));
            assert!(m.contains_item(spread(i)));
            assert!(!m.contains_item(spread(i + n as u128)));
        }
        assert!(m.failure().is_none());
    }

    /// A growing hashbrown table holds its old slots beside the new ones while it moves the
    /// pairs; a table grown from nothing must stay within the budget through that too, and
    /// still end with the budget's whole room.
    #[test]
    fn a_table_grown_from_empty_never_holds_more_than_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        for budget in [64 << 10, 1 << 20, 3 << 20] {
            let mut m = SpillingMarks::new(budget, dir.path().into(), 0, 0);
            let room = items_within(budget);
            let n = room * 3;
            for i in 0..n as u128 {
                let (before, spills) = (m.table.capacity().0, m.spills());
                assert!(m.insert((spread(i), (i % 2) as u32)));
                let after = m.table.capacity().0;
                if after > before {
                    // Unless a spill freed the old table first, both were held at once.
                    let held = if m.spills() > spills {
                        slots(after)
                    } else {
                        slots(before) + slots(after)
                    };
                    assert!(
                        held * SLOT <= budget,
                        "{budget}: growing {before} -> {after} held {held} slots"
                    );
                }
            }
            assert_eq!(m.table.capacity().0, room, "{budget}: the budget's room");
            assert_eq!(m.len(), n);
            for i in 0..n as u128 {
                assert!(m.contains(&(spread(i), (i % 2) as u32)));
            }
            assert!(m.failure().is_none());
        }
    }

    #[test]
    fn an_unwritable_scratch_dir_keeps_every_mark_in_memory_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let mut m = SpillingMarks::new(0, gone, 0, 0);
        for i in 0..1000u128 {
            assert!(m.insert((spread(i), 0)));
        }
        assert!(m.failure().is_none());
        assert_eq!(m.spills(), 0);
        for i in 0..1000u128 {
            assert!(m.contains(&(spread(i), 0)) && !m.insert((spread(i), 0)));
        }
    }

    #[test]
    fn a_run_the_disk_changed_answers_marked_and_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = SpillingMarks::new(0, dir.path().into(), 0, 0);
        for i in 0..7u128 {
            m.insert((spread(i), 0));
        }
        assert_eq!((m.spills(), m.runs.len()), (1, 1));
        // One bit of the run's last pair (the largest) flips on disk.
        let k = (0..7u128)
            .map(spread)
            .filter(|x| !m.table.contains(&(*x, 0)))
            .max_by_key(|x| encode((*x, 0)))
            .unwrap();
        let run = &m.runs[0];
        let at = ((run.len - 1) * ENTRY + 15) as u64;
        let mut b = [0u8; 1];
        run.file.read_exact_at(&mut b, at).unwrap();
        run.file.write_all_at(&[b[0] ^ 1], at).unwrap();
        assert!(m.failure().is_none());
        assert!(
            m.contains(&(k, 0)) && m.contains_item(k),
            "a damaged run counts as marked"
        );
        assert!(
            m.failure()
                .is_some_and(|e| e.to_string().contains("checksum"))
        );
    }

    #[test]
    fn an_unreadable_run_answers_marked_and_walks_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = SpillingMarks::new(0, dir.path().into(), 0, 0);
        let n = MIN_ITEMS as u128 * 2;
        for i in 0..n {
            m.insert((spread(i), 0));
        }
        assert!(m.spills() > 0);
        // A run whose file lost its bytes (reads fail with UnexpectedEof).
        for r in &m.runs {
            r.file.set_len(0).unwrap();
        }
        // (A run's first pair in each block is in its index, answered without a read.)
        let spilled: Vec<u128> = (0..n)
            .filter(|i| !m.table.contains(&(spread(*i), 0)))
            .filter(|i| {
                !m.runs
                    .iter()
                    .any(|r| r.index.contains(&encode((spread(*i), 0))))
            })
            .collect();
        assert!(!spilled.is_empty());
        for i in &spilled {
            assert!(m.contains(&(spread(*i), 0)), "unknown must count as marked");
            assert!(m.contains_item(spread(*i)));
        }
        // The walk sees it as new once, then the table answers.
        assert!(m.insert((spread(spilled[0]), 0)));
        assert!(!m.insert((spread(spilled[0]), 0)));
        assert!(m.failure().is_some());
    }

    proptest! {
        /// With a tiny budget (many spills and merges), the marks answer exactly as a set of
        /// pairs and a set of items would, held or not.
        #[test]
        fn spilling_marks_are_a_set_of_pairs(
            ops in proptest::collection::vec((0u128..400, 0u32..4, any::<bool>()), 0..1500),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut m = SpillingMarks::new(0, dir.path().into(), 0, 0);
            let mut pairs: HashSet<(u128, u32)> = HashSet::new();
            for (item, group, hold) in &ops {
                m.set_holding(*hold);
                let k = (spread(*item), *group);
                prop_assert_eq!(m.insert(k), pairs.insert(k));
                prop_assert_eq!(m.len(), pairs.len());
            }
            prop_assert!(m.failure().is_none());
            for i in 0u128..401 {
                prop_assert_eq!(m.contains_item(spread(i)), pairs.iter().any(|(x, _)| *x == spread(i)));
                for g in 0u32..5 {
                    prop_assert_eq!(m.contains(&(spread(i), g)), pairs.contains(&(spread(i), g)));
                }
            }
        }
    }
}
