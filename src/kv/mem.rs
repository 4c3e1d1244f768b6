//! In-memory `Kv` for fast unit tests: one ordered map per column family under a lock, so a
//! batch is atomic. Not durable, by design.

use std::collections::BTreeMap;
use std::ops::Bound;

use parking_lot::RwLock;

use super::{Batch, Cf, Kv, Op, Visit};
use crate::error::Result;

type Family = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
pub struct MemKv {
    maps: RwLock<BTreeMap<Cf, Family>>,
}

fn upper(end: &[u8]) -> Bound<Vec<u8>> {
    if end.is_empty() {
        Bound::Unbounded
    } else {
        Bound::Excluded(end.to_vec())
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
        self.write(batch, false)
    }

    fn flush(&self, _cf: Cf) -> Result<()> {
        Ok(())
    }

    fn write(&self, batch: Batch, _sync: bool) -> Result<()> {
        let mut maps = self.maps.write();
        for op in batch.ops {
            match op {
                Op::Put(cf, k, v) => {
                    maps.entry(cf).or_default().insert(k, v);
                }
                Op::Delete(cf, k) => {
                    maps.entry(cf).or_default().remove(&k);
                }
                Op::DeleteRange(cf, from, to) => {
                    let m = maps.entry(cf).or_default();
                    if from >= to {
                        continue;
                    }
                    let doomed: Vec<Vec<u8>> = m
                        .range::<Vec<u8>, _>((Bound::Included(from), Bound::Excluded(to)))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in doomed {
                        m.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }
}
