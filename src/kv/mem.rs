//! In-memory `Kv` for fast unit tests and the crash simulator: one ordered map per column
//! family under a lock, so a batch is atomic.
//!
//! By default nothing is durable and nothing is lost. [`MemKv::with_power_loss`] adds a model
//! of what a power loss does to RocksDB as `rocks.rs` uses it, so the simulator can crash the
//! store at any point:
//! * a synced logged batch makes it and every logged batch before it durable (the WAL is
//!   fsynced up to it);
//! * an unsynced logged batch survives only if the WAL happened to reach the disk up to it:
//!   at a crash, a random prefix of the unsynced logged batches survives;
//! * an unlogged write lives in the memtable only: it survives if the family was flushed
//!   after it, explicitly (`flush`) or by a background flush the crash happened to follow;
//!   a flush also syncs the WAL before it (RocksDB syncs closed logs when it switches
//!   memtables of a multi-family database);
//! * every batch is atomic: a crash never keeps part of one.

use std::collections::BTreeMap;
use std::ops::Bound;

use parking_lot::{Mutex, RwLock};

use super::{Batch, Cf, Kv, Op, Visit};
use crate::error::Result;

type Family = BTreeMap<Vec<u8>, Vec<u8>>;
type Maps = BTreeMap<Cf, Family>;

#[derive(Default)]
pub struct MemKv {
    maps: RwLock<Maps>,
    power: Option<Mutex<PowerModel>>,
    /// What [`Kv::disk_space`] reports (None: not on a disk), set by tests.
    space: Mutex<Option<(u64, u64)>>,
}

/// What is on "disk" and what is still in flight (see the module doc).
#[derive(Default)]
struct PowerModel {
    /// The state every durable write has been applied to.
    durable: Maps,
    /// Writes not yet durable, oldest first.
    pending: Vec<Pending>,
}

struct Pending {
    logged: bool,
    /// The family an unlogged write went to (one family per entry).
    cf: Option<Cf>,
    durable: bool,
    batch: Batch,
}

/// How a simulated power loss treats what was in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Everything not yet durable is lost.
    All,
    /// The WAL reached the disk up to a point (`wal_keep` of the unsynced logged writes, in
    /// order), and a background flush happened after `flushed` of the pending writes.
    Prefix { wal_keep: usize, flushed: usize },
}

fn upper(end: &[u8]) -> Bound<Vec<u8>> {
    if end.is_empty() {
        Bound::Unbounded
    } else {
        Bound::Excluded(end.to_vec())
    }
}

fn apply(maps: &mut Maps, batch: &Batch) {
    for op in &batch.ops {
        match op {
            Op::Put(cf, k, v) => {
                maps.entry(*cf).or_default().insert(k.clone(), v.to_vec());
            }
            Op::Delete(cf, k) => {
                maps.entry(*cf).or_default().remove(k);
            }
            Op::DeleteRange(cf, from, to) => {
                let m = maps.entry(*cf).or_default();
                if from >= to {
                    continue;
                }
                let doomed: Vec<Vec<u8>> = m
                    .range::<Vec<u8>, _>((
                        Bound::Included(from.clone()),
                        Bound::Excluded(to.clone()),
                    ))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in doomed {
                    m.remove(&k);
                }
            }
        }
    }
}

impl PowerModel {
    /// Moves the durable prefix of `pending` into `durable`.
    fn settle(&mut self) {
        let n = self.pending.iter().take_while(|p| p.durable).count();
        for p in self.pending.drain(..n) {
            apply(&mut self.durable, &p.batch);
        }
    }

    fn sync_logged(&mut self) {
        for p in self.pending.iter_mut().filter(|p| p.logged) {
            p.durable = true;
        }
    }
}

fn cf_of(op: &Op) -> Cf {
    match op {
        Op::Put(cf, ..) | Op::Delete(cf, ..) | Op::DeleteRange(cf, ..) => *cf,
    }
}

impl MemKv {
    /// A MemKv that models power loss (see the module doc); [`MemKv::power_loss`] applies one.
    pub fn with_power_loss() -> MemKv {
        MemKv {
            power: Some(Mutex::new(PowerModel::default())),
            ..Default::default()
        }
    }

    /// Makes the store look like it sits on a disk of `size` bytes with `free` left.
    pub fn set_disk_space(&self, space: Option<(u64, u64)>) {
        *self.space.lock() = space;
    }

    /// Simulates a power loss and the restart after it: what `loss` spares of the writes in
    /// flight survives on top of the durable state; everything else is gone. The caller
    /// must have dropped every user of the store first (as a real crash would have).
    pub fn power_loss(&self, loss: Loss) {
        let Some(power) = &self.power else {
            return;
        };
        let mut p = power.lock();
        let (wal_keep, flushed) = match loss {
            Loss::All => (0, 0),
            Loss::Prefix { wal_keep, flushed } => (wal_keep, flushed),
        };
        let mut state = std::mem::take(&mut p.durable);
        let mut logged_seen = 0;
        for (i, e) in p.pending.iter().enumerate() {
            let survives = e.durable
                || if e.logged {
                    logged_seen += 1;
                    // A background flush at `flushed` synced the WAL before it, too.
                    logged_seen <= wal_keep || i < flushed
                } else {
                    i < flushed
                };
            if survives {
                apply(&mut state, &e.batch);
            }
        }
        p.pending.clear();
        p.durable = state.clone();
        *self.maps.write() = state;
    }

    /// (unsynced logged batches, every write in flight): the ranges a [`Loss::Prefix`] is
    /// chosen from.
    pub fn pending_len(&self) -> (usize, usize) {
        let Some(p) = &self.power else {
            return (0, 0);
        };
        let p = p.lock();
        let logged = p.pending.iter().filter(|e| e.logged && !e.durable).count();
        (logged, p.pending.len())
    }
}

impl Kv for MemKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.maps.read().get(&cf).and_then(|m| m.get(key).cloned()))
    }

    fn floor(&self, cf: Cf, key: &[u8], lower: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if lower > key {
            return Ok(None);
        }
        let maps = self.maps.read();
        let Some(m) = maps.get(&cf) else {
            return Ok(None);
        };
        Ok(m.range::<Vec<u8>, _>((
            Bound::Included(lower.to_vec()),
            Bound::Included(key.to_vec()),
        ))
        .next_back()
        .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: Visit<'_>) -> Result<()> {
        if !end.is_empty() && start >= end {
            return Ok(());
        }
        // Copy out first so a visitor may call back into the store.
        let items: Vec<(Vec<u8>, Vec<u8>)> = {
            let maps = self.maps.read();
            let Some(m) = maps.get(&cf) else {
                return Ok(());
            };
            m.range::<Vec<u8>, _>((Bound::Included(start.to_vec()), upper(end)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        for (k, v) in items {
            if !visit(&k, &v) {
                break;
            }
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
        let start = match self.floor(cf, key, lower)? {
            Some((k, _)) => k,
            None => key.to_vec(),
        };
        self.scan(cf, &start, end, visit)
    }

    fn write_unlogged(&self, batch: Batch) -> Result<()> {
        let Some(power) = &self.power else {
            return self.write(batch, false);
        };
        // The model lock is taken before the map lock on every write, so the order of
        // `pending` is the order writes became visible.
        let mut p = power.lock();
        apply(&mut self.maps.write(), &batch);
        let mut by_cf: BTreeMap<Cf, Batch> = BTreeMap::new();
        for op in batch.ops {
            by_cf.entry(cf_of(&op)).or_default().ops.push(op);
        }
        for (cf, b) in by_cf {
            p.pending.push(Pending {
                logged: false,
                cf: Some(cf),
                durable: false,
                batch: b,
            });
        }
        Ok(())
    }

    fn flush(&self, cf: Cf) -> Result<()> {
        if let Some(power) = &self.power {
            let mut p = power.lock();
            p.sync_logged();
            for e in p.pending.iter_mut().filter(|e| e.cf == Some(cf)) {
                e.durable = true;
            }
            p.settle();
        }
        Ok(())
    }

    fn disk_space(&self) -> Option<(u64, u64)> {
        *self.space.lock()
    }

    /// Deleted keys hold no memory here once the batch that deleted them applied.
    fn reclaim(&self, _cf: Cf, _ranges: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        Ok(())
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<()> {
        let Some(power) = &self.power else {
            apply(&mut self.maps.write(), &batch);
            return Ok(());
        };
        let mut p = power.lock();
        apply(&mut self.maps.write(), &batch);
        p.pending.push(Pending {
            logged: true,
            cf: None,
            durable: false,
            batch,
        });
        if sync {
            p.sync_logged();
            p.settle();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(kv: &MemKv, k: &[u8], sync: bool) {
        let mut b = Batch::new();
        b.put(Cf::Blobs, k.to_vec(), b"v".to_vec());
        kv.write(b, sync).unwrap();
    }

    fn chunk(kv: &MemKv, k: &[u8]) {
        let mut b = Batch::new();
        b.put(Cf::Chunks, k.to_vec(), b"bytes".to_vec());
        kv.write_unlogged(b).unwrap();
    }

    fn has(kv: &MemKv, cf: Cf, k: &[u8]) -> bool {
        kv.get(cf, k).unwrap().is_some()
    }

    #[test]
    fn a_sync_makes_earlier_logged_writes_durable_but_not_unlogged_ones() {
        let kv = MemKv::with_power_loss();
        put(&kv, b"a", false);
        chunk(&kv, b"c");
        put(&kv, b"b", true);
        put(&kv, b"lost", false);
        kv.power_loss(Loss::All);
        assert!(has(&kv, Cf::Blobs, b"a") && has(&kv, Cf::Blobs, b"b"));
        assert!(!has(&kv, Cf::Chunks, b"c"));
        assert!(!has(&kv, Cf::Blobs, b"lost"));
    }

    #[test]
    fn a_flush_keeps_its_family_and_the_wal_before_it() {
        let kv = MemKv::with_power_loss();
        put(&kv, b"a", false);
        chunk(&kv, b"c");
        kv.flush(Cf::Chunks).unwrap();
        chunk(&kv, b"late");
        kv.power_loss(Loss::All);
        assert!(has(&kv, Cf::Blobs, b"a"));
        assert!(has(&kv, Cf::Chunks, b"c"));
        assert!(!has(&kv, Cf::Chunks, b"late"));
    }

    #[test]
    fn a_wal_prefix_survives_in_order() {
        let kv = MemKv::with_power_loss();
        for k in [b"1", b"2", b"3"] {
            put(&kv, k, false);
        }
        kv.power_loss(Loss::Prefix {
            wal_keep: 2,
            flushed: 0,
        });
        assert!(has(&kv, Cf::Blobs, b"1") && has(&kv, Cf::Blobs, b"2"));
        assert!(!has(&kv, Cf::Blobs, b"3"));
        // After the crash the survivors are durable.
        kv.power_loss(Loss::All);
        assert!(has(&kv, Cf::Blobs, b"2"));
    }

    #[test]
    fn without_the_model_nothing_is_lost() {
        let kv = MemKv::default();
        put(&kv, b"a", false);
        kv.power_loss(Loss::All);
        assert!(has(&kv, Cf::Blobs, b"a"));
    }
}
