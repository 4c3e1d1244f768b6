//! Garbage-collection marking: pure code, no I/O.
//!
//! `mark` walks from the roots over a `children` function and returns every reachable node
//! with the predecessor that first reached it, so `explain` can name the chain of root and
//! edges that keeps a node alive. The walk is iterative (an explicit stack: hostile or merely
//! deep graphs cannot overflow the thread stack) and visits each node once, so cycles are
//! harmless. `sweep_batches` plans the removal of everything unmarked in bounded batches, so
//! a collector can interleave them with writes.
//!
//! `Reach` is the collector's marker: the same walk, but it keeps only a compact key per
//! marked node (no predecessor, no reason) and asks for children a batch at a time, so a
//! store can answer from sorted lookups instead of holding its whole edge map in memory.
//! Its memory is the marked keys plus the walk's frontier, whatever the store's size.
//! `Grouped` is the set it keeps them in: (blob, scope) pairs, answering "marked in any scope"
//! too, in about 20 bytes per marked blob. `Filter` answers "maybe" or "no" for a set of
//! fingerprints in a fixed number of bits, for a collector that may look at more than it
//! must but never less.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};

/// Why a root is a root (an image name, a lease id, a label, a hold...).
pub type Reason = String;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Via<N> {
    Root(Reason),
    Parent(N),
}

/// The result of a mark phase.
#[derive(Debug, Clone)]
pub struct Marked<N: Eq + Hash> {
    via: HashMap<N, Via<N>>,
}

impl<N: Clone + Eq + Hash> Marked<N> {
    pub fn contains(&self, n: &N) -> bool {
        self.via.contains_key(n)
    }

    pub fn len(&self) -> usize {
        self.via.len()
    }

    pub fn is_empty(&self) -> bool {
        self.via.is_empty()
    }

    /// Marks `n` and everything it reaches (a write barrier during a concurrent sweep);
    /// returns the nodes that were not marked before.
    pub fn mark_more(
        &mut self,
        n: N,
        reason: Reason,
        children: impl FnMut(&N) -> Vec<N>,
    ) -> Vec<N> {
        walk(&mut self.via, vec![(n, Via::Root(reason))], children)
    }

    /// Marks `n` alone, without following its edges (containerd's `gc.flat` leases).
    pub fn mark_flat(&mut self, n: N, reason: Reason) -> bool {
        match self.via.entry(n) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Via::Root(reason));
                true
            }
            _ => false,
        }
    }

    /// Every marked node.
    pub fn nodes(&self) -> impl Iterator<Item = &N> {
        self.via.keys()
    }

    /// The chain that keeps `n` alive: the root's reason, then nodes from the root to `n`.
    pub fn explain(&self, n: &N) -> Option<(Reason, Vec<N>)> {
        let mut path = vec![n.clone()];
        let mut cur = n;
        // Each predecessor was marked strictly earlier, so this terminates.
        loop {
            match self.via.get(cur)? {
                Via::Root(reason) => {
                    path.reverse();
                    return Some((reason.clone(), path));
                }
                Via::Parent(p) => {
                    path.push(p.clone());
                    cur = p;
                }
            }
        }
    }
}

fn walk<N: Clone + Eq + Hash>(
    via: &mut HashMap<N, Via<N>>,
    start: Vec<(N, Via<N>)>,
    mut children: impl FnMut(&N) -> Vec<N>,
) -> Vec<N> {
    let mut stack: Vec<N> = Vec::new();
    let mut added = Vec::new();
    for (n, why) in start {
        if let std::collections::hash_map::Entry::Vacant(e) = via.entry(n.clone()) {
            e.insert(why);
            stack.push(n.clone());
            added.push(n);
        }
    }
    while let Some(n) = stack.pop() {
        for c in children(&n) {
            if let std::collections::hash_map::Entry::Vacant(e) = via.entry(c.clone()) {
                e.insert(Via::Parent(n.clone()));
                stack.push(c.clone());
                added.push(c);
            }
        }
    }
    added
}

/// Marks everything reachable from `roots`.
pub fn mark<N: Clone + Eq + Hash>(
    roots: impl IntoIterator<Item = (N, Reason)>,
    children: impl FnMut(&N) -> Vec<N>,
) -> Marked<N> {
    let mut via = HashMap::new();
    walk(
        &mut via,
        roots.into_iter().map(|(n, r)| (n, Via::Root(r))).collect(),
        children,
    );
    Marked { via }
}

/// A set of marks: what [`Reach`] records a marked node's key in.
pub trait MarkSet {
    type Key;
    /// Adds `k`; true when it was not there before.
    fn insert(&mut self, k: Self::Key) -> bool;
    fn contains(&self, k: &Self::Key) -> bool;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Eq + Hash, S: BuildHasher> MarkSet for HashSet<K, S> {
    type Key = K;
    fn insert(&mut self, k: K) -> bool {
        HashSet::insert(self, k)
    }
    fn contains(&self, k: &K) -> bool {
        HashSet::contains(self, k)
    }
    fn len(&self) -> usize {
        HashSet::len(self)
    }
}

/// Reachability without paths: the marked set of a collection, as compact keys.
#[derive(Debug, Default)]
pub struct Reach<S> {
    seen: S,
}

impl<S: MarkSet> Reach<S> {
    pub fn new(seen: S) -> Self {
        Self { seen }
    }

    /// The marks.
    pub fn set(&self) -> &S {
        &self.seen
    }

    pub fn set_mut(&mut self) -> &mut S {
        &mut self.seen
    }

    pub fn contains(&self, k: &S::Key) -> bool {
        self.seen.contains(k)
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Marks `n` alone, without following its edges; true when it was not marked before.
    pub fn mark_flat(&mut self, k: S::Key) -> bool {
        self.seen.insert(k)
    }

    /// Marks `start` and everything reachable from it. `children` is given up to `batch`
    /// nodes at a time and returns each one's children, in the same order; its first error
    /// stops the walk (what was marked so far stays marked). `on_new` sees every node marked
    /// by this call, once. The frontier is a stack, so a long chain is walked without
    /// recursion and the frontier holds at most the unexpanded children of the nodes on it.
    pub fn mark<N, E>(
        &mut self,
        start: impl IntoIterator<Item = N>,
        mut key: impl FnMut(&N) -> S::Key,
        batch: usize,
        mut children: impl FnMut(&[N]) -> Result<Vec<Vec<N>>, E>,
        mut on_new: impl FnMut(&N),
    ) -> Result<(), E> {
        let mut stack: Vec<N> = Vec::new();
        for n in start {
            if self.seen.insert(key(&n)) {
                on_new(&n);
                stack.push(n);
            }
        }
        let batch = batch.max(1);
        while !stack.is_empty() {
            let take = stack.len().saturating_sub(batch);
            let expand = stack.split_off(take);
            let kids = children(&expand)?;
            for c in kids.into_iter().flatten() {
                if self.seen.insert(key(&c)) {
                    on_new(&c);
                    stack.push(c);
                }
            }
        }
        Ok(())
    }
}

/// Marks of (item, group) pairs, e.g. (blob, scope), where items are 128-bit fingerprints
/// (uniformly distributed already, so they are hashed by taking their bits) and groups are
/// small indices, and "is this item marked in any group" must be answered too.
///
/// Memory: one 20-byte entry per marked item, holding its first two groups inline; an item
/// marked in a third group spills all but its first into a second set (20 bytes per pair).
/// A set of pairs plus a set of items (what this replaces) took 32 bytes per item in the
/// common case of one group, and more than twice that with two.
#[derive(Debug, Default)]
pub struct Grouped {
    items: HashMap<Fp, [u16; 2], FpHash>,
    spilled: HashSet<(Fp, u32), FpHash>,
    pairs: usize,
}

/// Empty inline slot.
const NO_GROUP: u16 = 0;
/// In the second inline slot: the item's other groups are in `spilled`.
const SPILLED: u16 = u16::MAX;

/// A group's inline code, if it has one (group + 1, below SPILLED).
fn inline_code(g: u32) -> Option<u16> {
    u16::try_from(g)
        .ok()
        .filter(|g| *g < SPILLED - 1)
        .map(|g| g + 1)
}

impl Grouped {
    /// Room for `items` items and `spilled` spilled pairs without growing.
    pub fn with_capacity(items: usize, spilled: usize) -> Self {
        Grouped {
            items: HashMap::with_capacity_and_hasher(items, FpHash),
            spilled: HashSet::with_capacity_and_hasher(spilled, FpHash),
            pairs: 0,
        }
    }

    /// Whether `item` is marked in any group.
    pub fn contains_item(&self, item: u128) -> bool {
        self.items.contains_key(&Fp::from(item))
    }

    /// Distinct items marked.
    pub fn items(&self) -> usize {
        self.items.len()
    }

    /// Pairs held outside the inline slots.
    pub fn spilled(&self) -> usize {
        self.spilled.len()
    }

    /// Items and spilled pairs the tables hold without growing.
    pub fn capacity(&self) -> (usize, usize) {
        (self.items.capacity(), self.spilled.capacity())
    }

    /// Every marked (item, group) pair, in no particular order.
    pub fn pairs(&self) -> impl Iterator<Item = (u128, u32)> + '_ {
        let inline = self.items.iter().flat_map(|(fp, slots)| {
            slots
                .iter()
                .filter(|c| **c != NO_GROUP && **c != SPILLED)
                .map(move |c| (u128::from(*fp), u32::from(*c - 1)))
        });
        inline.chain(self.spilled.iter().map(|(fp, g)| (u128::from(*fp), *g)))
    }

    /// Forgets every mark, keeping the tables' room.
    pub fn clear(&mut self) {
        self.items.clear();
        self.spilled.clear();
        self.pairs = 0;
    }
}

impl MarkSet for Grouped {
    type Key = (u128, u32);

    fn insert(&mut self, (item, g): (u128, u32)) -> bool {
        if self.contains(&(item, g)) {
            return false;
        }
        let fp = Fp::from(item);
        let slots = self.items.entry(fp).or_insert([NO_GROUP; 2]);
        match inline_code(g) {
            Some(c) if slots[0] == NO_GROUP => slots[0] = c,
            Some(c) if slots[1] == NO_GROUP => slots[1] = c,
            _ => {
                // The second slot becomes the spill marker; a group it held moves out first.
                if slots[1] != SPILLED {
                    if slots[1] != NO_GROUP {
                        self.spilled.insert((fp, u32::from(slots[1] - 1)));
                    }
                    slots[1] = SPILLED;
                }
                self.spilled.insert((fp, g));
            }
        }
        self.pairs += 1;
        true
    }

    fn contains(&self, &(item, g): &(u128, u32)) -> bool {
        let fp = Fp::from(item);
        let Some(slots) = self.items.get(&fp) else {
            return false;
        };
        if let Some(c) = inline_code(g)
            && slots.contains(&c)
        {
            return true;
        }
        slots[1] == SPILLED && self.spilled.contains(&(fp, g))
    }

    fn len(&self) -> usize {
        self.pairs
    }
}

/// A 128-bit fingerprint stored at 4-byte alignment, so a map entry holding one and a u32 is
/// 20 bytes, not the 32 a `u128` (16-byte aligned) makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fp([u32; 4]);

impl From<u128> for Fp {
    fn from(v: u128) -> Self {
        Fp([
            v as u32,
            (v >> 32) as u32,
            (v >> 64) as u32,
            (v >> 96) as u32,
        ])
    }
}

impl From<Fp> for u128 {
    fn from(f: Fp) -> Self {
        u128::from(f.0[0])
            | (u128::from(f.0[1]) << 32)
            | (u128::from(f.0[2]) << 64)
            | (u128::from(f.0[3]) << 96)
    }
}

impl Hash for Fp {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(u64::from(self.0[0]) | (u64::from(self.0[1]) << 32));
    }
}

/// Hashes fingerprints by their own bits (mixed by one multiply, so the table's index and
/// tag bits both vary): they are keyed hashes already, so hashing them again buys nothing.
#[derive(Debug, Default, Clone, Copy)]
struct FpHash;

impl BuildHasher for FpHash {
    type Hasher = FpHasher;
    fn build_hasher(&self) -> FpHasher {
        FpHasher(0)
    }
}

#[derive(Debug)]
struct FpHasher(u64);

impl Hasher for FpHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(23) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The unmarked nodes of `all`, in batches of at most `batch`.
pub fn sweep_batches<N: Clone + Eq + Hash>(
    all: impl IntoIterator<Item = N>,
    marked: &Marked<N>,
    batch: usize,
) -> Vec<Vec<N>> {
    let mut out: Vec<Vec<N>> = Vec::new();
    for n in all {
        if marked.contains(&n) {
            continue;
        }
        match out.last_mut() {
            Some(b) if b.len() < batch.max(1) => b.push(n),
            _ => out.push(vec![n]),
        }
    }
    out
}

/// A Bloom filter over 128-bit fingerprints that are already uniform keyed hashes, so each
/// of its probes is taken from the fingerprint's two halves (Kirsch and Mitzenmacher's
/// double hashing) instead of hashing again. It never answers "no" for a fingerprint it
/// holds; it answers "maybe" for one it does not hold about (1 - e^(-kn/m))^k of the time
/// (n held, m bits, k probes): 2% at 8 bits each, more as it overfills, never wrong the
/// other way. Its size is fixed when it is made, whatever is put in it.
#[derive(Debug, Clone)]
pub struct Filter {
    words: Vec<u64>,
    /// Bits − 1 (a power of two).
    mask: u64,
}

/// Probes per fingerprint: near the best for 6–10 bits per held fingerprint.
const FILTER_PROBES: u64 = 5;

impl Filter {
    /// A filter of at most `bits` bits (a power of two), and at least 64.
    pub fn with_bits(bits: usize) -> Self {
        let bits = 1usize << bits.max(64).ilog2();
        Filter {
            words: vec![0; bits / 64],
            mask: bits as u64 - 1,
        }
    }

    fn probes(&self, fp: u128) -> impl Iterator<Item = u64> + use<> {
        let (h1, h2) = (fp as u64, ((fp >> 64) as u64) | 1);
        let mask = self.mask;
        (0..FILTER_PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & mask)
    }

    pub fn insert(&mut self, fp: u128) {
        for b in self.probes(fp) {
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// False only if `fp` was never inserted.
    pub fn may_contain(&self, fp: u128) -> bool {
        self.probes(fp)
            .all(|b| self.words[(b / 64) as usize] & (1 << (b % 64)) != 0)
    }

    /// Bytes the filter holds.
    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashSet, VecDeque};

    /// Stand-ins for the collector's keyed-hash fingerprints: splitmix64 of each half.
    fn spread(i: u128) -> u128 {
        let mix = |mut z: u64| {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        (u128::from(mix(i as u64)) << 64) | u128::from(mix(!(i as u64)))
    }

    #[test]
    fn a_filter_keeps_its_size_and_its_false_maybes_near_the_bound() {
        assert_eq!(Filter::with_bits(0).bytes(), 8);
        assert_eq!(Filter::with_bits(1000).bytes(), 512 / 8);
        assert_eq!(Filter::with_bits(1 << 20).bytes(), 1 << 17);
        // 8 bits per held fingerprint: about 2% of the others answer "maybe".
        let n = 10_000u128;
        let mut f = Filter::with_bits(8 * 16_384);
        let bits_each = 8.0 * 16_384.0 / n as f64;
        for i in 0..n {
            f.insert(spread(i));
        }
        assert!((0..n).all(|i| f.may_contain(spread(i))));
        let false_maybes = (n..n * 11).filter(|i| f.may_contain(spread(*i))).count();
        let rate = false_maybes as f64 / (10 * n) as f64;
        let bound = (1.0 - (-5.0 / bits_each).exp()).powi(5);
        assert!(rate < bound * 1.5, "{rate} against {bound}");
        // Overfilled (a store larger than its filter's room): still never a wrong "no".
        let mut tiny = Filter::with_bits(64);
        for i in 0..n {
            tiny.insert(spread(i));
        }
        assert!((0..n).all(|i| tiny.may_contain(spread(i))));
        assert_eq!(tiny.bytes(), 8);
    }

    proptest! {
        #[test]
        fn a_filter_never_denies_what_it_holds(
            bits in 0usize..4096,
            held in proptest::collection::vec(any::<u128>(), 0..300),
        ) {
            let mut f = Filter::with_bits(bits);
            for fp in &held {
                f.insert(*fp);
            }
            for fp in &held {
                prop_assert!(f.may_contain(*fp));
            }
        }
    }

    fn graph(edges: &[(u32, u32)]) -> HashMap<u32, Vec<u32>> {
        let mut g: HashMap<u32, Vec<u32>> = HashMap::new();
        for (a, b) in edges {
            g.entry(*a).or_default().push(*b);
        }
        g
    }

    #[test]
    fn marks_and_explains() {
        let g = graph(&[(1, 2), (2, 3), (3, 1), (4, 5)]);
        let m = mark([(1, "image a".to_string())], |n| {
            g.get(n).cloned().unwrap_or_default()
        });
        assert!(m.contains(&3) && !m.contains(&4));
        assert_eq!(m.explain(&3), Some(("image a".to_string(), vec![1, 2, 3])));
        assert_eq!(m.explain(&5), None);
        let batches = sweep_batches(1..=5, &m, 1);
        assert_eq!(batches, vec![vec![4], vec![5]]);
    }

    #[test]
    fn deep_chains_do_not_overflow() {
        let n = 1_000_000u32;
        let m = mark([(0u32, "root".to_string())], |x| {
            if *x < n { vec![x + 1] } else { vec![] }
        });
        assert_eq!(m.len() as u32, n + 1);
        assert_eq!(m.explain(&n).unwrap().1.len() as u32, n + 1);
    }

    #[test]
    fn write_barrier_marks_late_additions() {
        let g = graph(&[(10, 11)]);
        let mut m = mark([(1u32, "r".to_string())], |n| {
            g.get(n).cloned().unwrap_or_default()
        });
        assert!(!m.contains(&11));
        m.mark_more(10, "new image".into(), |n| {
            g.get(n).cloned().unwrap_or_default()
        });
        assert!(m.contains(&11));
        assert_eq!(m.explain(&11).unwrap().0, "new image");
    }

    #[test]
    fn reach_walks_long_chains_in_batches_and_stops_on_error() {
        let n = 100_000u32;
        let mut r: Reach<HashSet<u32>> = Reach::default();
        let mut calls = 0;
        let mut new = 0;
        r.mark(
            [0u32],
            |x| *x,
            64,
            |xs: &[u32]| {
                calls += 1;
                assert!(xs.len() <= 64);
                Ok::<_, ()>(
                    xs.iter()
                        .map(|x| if *x < n { vec![x + 1] } else { vec![] })
                        .collect(),
                )
            },
            |_| new += 1,
        )
        .unwrap();
        assert_eq!((r.len() as u32, new as u32), (n + 1, n + 1));
        assert!(calls > 0);
        let mut r: Reach<HashSet<u32>> = Reach::default();
        let e = r.mark([1u32, 2], |x| *x, 1, |_: &[u32]| Err("boom"), |_| {});
        assert_eq!(e, Err("boom"));
        assert!(r.mark_flat(7) && !r.mark_flat(7));
    }

    #[test]
    fn grouped_entries_are_20_bytes() {
        assert_eq!(std::mem::size_of::<(Fp, [u16; 2])>(), 20);
        assert_eq!(std::mem::size_of::<(Fp, u32)>(), 20);
    }

    proptest! {
        /// `Grouped` answers exactly as a set of pairs and a set of items would, whatever
        /// the groups (inline, spilled, too large to inline) and the order of inserts.
        #[test]
        fn grouped_is_a_set_of_pairs(
            ops in proptest::collection::vec(
                (0u128..12, prop_oneof![0u32..5, Just(65533u32), Just(65534), Just(65535), Just(u32::MAX)]),
                0..120,
            ),
        ) {
            let mut g = Grouped::with_capacity(4, 0);
            let mut pairs: HashSet<(u128, u32)> = HashSet::new();
            for (item, group) in &ops {
                // Spread the items over the whole fingerprint, as real ones are.
                let item = item.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
                prop_assert_eq!(MarkSet::insert(&mut g, (item, *group)), pairs.insert((item, *group)));
                prop_assert_eq!(MarkSet::len(&g), pairs.len());
            }
            for i in 0u128..13 {
                let item = i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
                prop_assert_eq!(g.contains_item(item), pairs.iter().any(|(x, _)| *x == item));
                for group in [0u32, 1, 2, 3, 4, 5, 65533, 65534, 65535, u32::MAX] {
                    prop_assert_eq!(MarkSet::contains(&g, &(item, group)), pairs.contains(&(item, group)));
                }
            }
            prop_assert_eq!(g.items(), pairs.iter().map(|(x, _)| *x).collect::<HashSet<_>>().len());
            let listed: Vec<(u128, u32)> = g.pairs().collect();
            prop_assert_eq!(listed.len(), pairs.len());
            prop_assert_eq!(listed.into_iter().collect::<HashSet<_>>(), pairs);
            let room = g.capacity();
            g.clear();
            prop_assert_eq!((MarkSet::len(&g), g.items(), g.pairs().count()), (0, 0, 0));
            prop_assert_eq!(g.capacity(), room);
        }
    }

    proptest! {
        #[test]
        fn reach_marks_what_mark_marks(
            edges in proptest::collection::vec((0u32..60, 0u32..60), 0..200),
            roots in proptest::collection::vec(0u32..60, 0..5),
            later in proptest::collection::vec(0u32..60, 0..3),
            batch in 1usize..9,
        ) {
            let g = graph(&edges);
            let kids = |xs: &[u32]| Ok::<_, ()>(xs.iter().map(|n| g.get(n).cloned().unwrap_or_default()).collect());
            let mut m = mark(roots.iter().map(|r| (*r, String::new())), |n| g.get(n).cloned().unwrap_or_default());
            let mut r: Reach<HashSet<u32>> = Reach::default();
            let mut first = Vec::new();
            r.mark(roots.iter().copied(), |x| *x, batch, kids, |x| first.push(*x)).unwrap();
            for l in &later {
                let before = r.len();
                let mut added = Vec::new();
                r.mark([*l], |x| *x, batch, kids, |x| added.push(*x)).unwrap();
                let expect = m.mark_more(*l, String::new(), |n| g.get(n).cloned().unwrap_or_default());
                added.sort();
                let mut expect = expect;
                expect.sort();
                prop_assert_eq!(&added, &expect);
                prop_assert_eq!(r.len(), before + added.len());
            }
            // Each node is reported once, and exactly the roots' reach is.
            let reported = first.len();
            first.sort();
            first.dedup();
            prop_assert_eq!(first.len(), reported);
            let mut reached: Vec<u32> = mark(roots.iter().map(|r| (*r, String::new())), |n| g.get(n).cloned().unwrap_or_default()).nodes().copied().collect();
            reached.sort();
            prop_assert_eq!(first, reached);
            for n in 0..60u32 {
                prop_assert_eq!(r.contains(&n), m.contains(&n));
            }
        }

        #[test]
        fn marked_is_exactly_the_reachable_set(
            edges in proptest::collection::vec((0u32..60, 0u32..60), 0..200),
            roots in proptest::collection::vec(0u32..60, 0..5),
        ) {
            let g = graph(&edges);
            let m = mark(roots.iter().map(|r| (*r, format!("root {r}"))), |n| g.get(n).cloned().unwrap_or_default());
            let mut seen: HashSet<u32> = roots.iter().copied().collect();
            let mut q: VecDeque<u32> = roots.iter().copied().collect();
            while let Some(n) = q.pop_front() {
                for c in g.get(&n).into_iter().flatten() {
                    if seen.insert(*c) {
                        q.push_back(*c);
                    }
                }
            }
            for n in 0..60u32 {
                prop_assert_eq!(m.contains(&n), seen.contains(&n));
                if let Some((reason, path)) = m.explain(&n) {
                    prop_assert!(roots.contains(&path[0]));
                    prop_assert_eq!(reason, format!("root {}", path[0]));
                    prop_assert_eq!(*path.last().unwrap(), n);
                    for w in path.windows(2) {
                        prop_assert!(g.get(&w[0]).is_some_and(|c| c.contains(&w[1])));
                    }
                }
            }
            let swept: HashSet<u32> = sweep_batches(0..60u32, &m, 7).into_iter().flatten().collect();
            prop_assert!(swept.iter().all(|n| !seen.contains(n)));
            prop_assert_eq!(swept.len() + seen.iter().filter(|n| **n < 60).count(), 60);
        }
    }
}
