//! A deterministic crash simulator for the store (in the manner of FoundationDB's simulation
//! and TigerBeetle's VOPR). One seed drives one random workload against a [`Store`] on the
//! power-loss model of [`MemKv`]: commits of new and shared blobs across namespaces and a
//! backend tenant, interrupted and resumed uploads, aborts, deletes, manifests, images,
//! leases, `gc.root` labels, collections, clean restarts and power losses at random points
//! (losing everything in flight, or a random prefix of it). After every step that can lose
//! or remove something it checks the invariants the store promises:
//!
//! * every acknowledged commit that was not deleted or collected since reads back whole
//!   and verified, in the scope that committed it;
//! * nothing torn is visible: every blob any scope lists verifies against its digest;
//! * no blob reachable from a root (image, lease, `gc.root` label, tenant hold) is swept;
//! * a resumed upload continues from a prefix of what was written, never from other bytes;
//! * `List`, `ListStatuses`, images and leases answer after every restart.
//!
//! The same seed replays the same workload exactly (`contentd simulate --seed N`); nothing
//! depends on wall-clock time except timestamps the checks ignore. Single-threaded by
//! design: concurrency between writers and the collector is covered by the store's own
//! tests; this covers what a crash can leave behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::digest::{Algorithm, Digest};
use crate::error::Kind;
use crate::filter::Filter;
use crate::kv::mem::{Loss, MemKv};
use crate::store::{ImageRecord, Scope, Store, StoreConfig};

/// What one seed did.
#[derive(Debug, Clone, Default)]
pub struct SeedReport {
    pub seed: u64,
    pub steps: usize,
    pub commits: usize,
    pub crashes: usize,
    pub restarts: usize,
    pub collections: usize,
    /// Collections whose marks went to disk (the sim's mark table holds seven).
    pub spilled_collections: usize,
}

/// A broken invariant: the seed replays it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub step: usize,
    pub message: String,
    /// The last operations before the failure, oldest first.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} failed at step {}: {}",
            self.seed, self.step, self.message
        )?;
        writeln!(
            f,
            "replay: contentd simulate --seed {} --steps {}",
            self.seed,
            self.step + 1
        )?;
        for t in &self.trace {
            writeln!(f, "  {t}")?;
        }
        Ok(())
    }
}

/// Scopes the workload uses: two namespaces (so commits share ingests) and a tenant.
const SCOPES: [&str; 3] = ["a", "b", "t:one"];

fn scope(i: usize) -> Scope {
    match SCOPES[i].strip_prefix("t:") {
        Some(t) => Scope::tenant(t).expect("valid tenant"),
        None => Scope::namespace(SCOPES[i]).expect("valid namespace"),
    }
}

/// An upload left open (its writer dropped, as by a client that went away).
struct Partial {
    scope: usize,
    reference: String,
    data: Vec<u8>,
    written: usize,
}

/// What the store must still show: the acknowledged state, minus what deletes and
/// collections may have removed.
#[derive(Default)]
struct Oracle {
    bytes: BTreeMap<Digest, Vec<u8>>,
    linked: BTreeMap<usize, BTreeSet<Digest>>,
    manifests: HashMap<Digest, Vec<Digest>>,
    images: BTreeMap<(usize, String), Digest>,
    leases: BTreeMap<(usize, String), BTreeSet<Digest>>,
    rooted: BTreeSet<(usize, Digest)>,
    /// Blobs whose bytes (and so edges) the store must still have: committed, and reached
    /// in some scope by every collection since. A manifest swept takes its edges with it,
    /// so only a stored manifest keeps its children alive.
    stored: BTreeSet<Digest>,
    partials: Vec<Partial>,
}

impl Oracle {
    fn any_linked(&self, rng: &mut StdRng, s: usize) -> Option<Digest> {
        let set = self.linked.get(&s)?;
        if set.is_empty() {
            return None;
        }
        set.iter().nth(rng.random_range(0..set.len())).cloned()
    }

    /// A commit of `data` in scope `s` was acknowledged.
    fn committed(&mut self, s: usize, d: Digest, data: Vec<u8>) {
        self.linked.entry(s).or_default().insert(d.clone());
        self.stored.insert(d.clone());
        self.bytes.insert(d, data);
    }

    /// What a collection with no grace period keeps linked: per scope, everything reachable
    /// from that scope's roots over the edges of the manifests still stored. A blob no scope
    /// reaches loses its bytes. (The store may keep more, e.g. a blob a shared ingest holds:
    /// the oracle then just expects less of it.)
    fn collect(&mut self) {
        let mut reached: BTreeSet<Digest> = BTreeSet::new();
        for (s, name) in SCOPES.iter().enumerate() {
            let tenant = name.starts_with("t:");
            let mut marked: BTreeSet<Digest> = BTreeSet::new();
            let mut todo: Vec<Digest> = Vec::new();
            if tenant {
                todo.extend(self.linked.get(&s).into_iter().flatten().cloned());
            }
            todo.extend(
                self.images
                    .iter()
                    .filter(|((is, _), _)| *is == s)
                    .map(|(_, d)| d.clone()),
            );
            todo.extend(
                self.leases
                    .iter()
                    .filter(|((ls, _), _)| *ls == s)
                    .flat_map(|(_, c)| c.iter().cloned()),
            );
            todo.extend(
                self.rooted
                    .iter()
                    .filter(|(rs, _)| *rs == s)
                    .map(|(_, d)| d.clone()),
            );
            while let Some(d) = todo.pop() {
                if marked.insert(d.clone())
                    && self.stored.contains(&d)
                    && let Some(children) = self.manifests.get(&d)
                {
                    todo.extend(children.iter().cloned());
                }
            }
            if let Some(set) = self.linked.get_mut(&s) {
                set.retain(|d| marked.contains(d));
            }
            self.rooted.retain(|(rs, d)| *rs != s || marked.contains(d));
            reached.extend(marked);
        }
        self.stored.retain(|d| reached.contains(d));
    }
}

struct Sim {
    rng: StdRng,
    kv: Arc<MemKv>,
    store: Arc<Store>,
    rt: tokio::runtime::Runtime,
    oracle: Oracle,
    trace: Vec<String>,
    step: usize,
    report: SeedReport,
    next_ref: u64,
}

type Check = Result<(), String>;

fn config() -> StoreConfig {
    StoreConfig {
        gc_grace: Duration::ZERO,
        gc_deletion_threshold: u64::MAX,
        gc_mutation_threshold: 0,
        // A mark table of seven: every collection with more marks keeps them on disk, so
        // the sim checks that path against its roots through crashes and restarts.
        gc_mark_memory: 0,
        ..Default::default()
    }
}

fn sha(data: &[u8]) -> Digest {
    Digest::of(Algorithm::Sha256, data)
}

impl Sim {
    fn note(&mut self, what: String) {
        if self.trace.len() >= 200 {
            self.trace.remove(0);
        }
        self.trace.push(format!("#{} {what}", self.step));
    }

    fn random_bytes(&mut self) -> Vec<u8> {
        let size = match self.rng.random_range(0..100) {
            0..70 => self.rng.random_range(0..4096),
            70..92 => self.rng.random_range(4096..300_000),
            // Past the store's unlogged threshold: bytes go without the WAL.
            _ => self.rng.random_range(520_000..800_000),
        };
        let mut v = vec![0u8; size];
        self.rng.fill(&mut v[..]);
        v
    }

    fn reopen(&mut self) -> Check {
        let store = Store::open_with(self.kv.clone(), config())
            .map_err(|e| format!("store does not open after a restart: {e}"))?;
        self.store = store;
        self.check_all()
    }

    /// Writes `data` into `s` as one upload and commits it; Ok(true) if acknowledged.
    fn commit(
        &mut self,
        s: usize,
        data: Vec<u8>,
        media_type: Option<&str>,
    ) -> Result<bool, String> {
        let d = sha(&data);
        let sc = scope(s);
        let tenant = matches!(sc, Scope::Tenant(_));
        self.next_ref += 1;
        let r = format!("w{}", self.next_ref);
        // A backend tenant learns the digest only at commit (containerd's proxy); a
        // namespace opens with it (and may get a shared ingest).
        let expected = (!tenant).then(|| d.clone());
        let store = self.store.clone();
        let opened =
            self.rt
                .block_on(store.open_writer(sc.clone(), &r, data.len() as i64, expected, None));
        let mut w = match opened {
            Ok(w) => w,
            Err(e) if e.is(Kind::AlreadyExists) => {
                self.oracle.committed(s, d, data);
                return Ok(true);
            }
            Err(e) => return Err(format!("open_writer {r}: {e}")),
        };
        w.set_media_type(media_type.map(str::to_string));
        let offset = w.status().map_err(|e| e.to_string())?.offset as usize;
        if offset < data.len() {
            let pieces = self.rng.random_range(1..=3usize);
            let mut at = offset;
            for i in 0..pieces {
                let end = if i + 1 == pieces {
                    data.len()
                } else {
                    self.rng.random_range(at..=data.len())
                };
                w.write(at as i64, &data[at..end])
                    .map_err(|e| format!("write {r}: {e}"))?;
                w.flush().map_err(|e| format!("flush {r}: {e}"))?;
                at = end;
            }
        }
        match w.commit(data.len() as i64, Some(d.clone()), None) {
            Ok(_) => {}
            Err(e) if e.is(Kind::AlreadyExists) => {}
            Err(e) => return Err(format!("commit {r} of {d}: {e}")),
        }
        self.report.commits += 1;
        self.oracle.committed(s, d, data);
        Ok(true)
    }

    fn op_commit(&mut self) -> Check {
        let s = self.rng.random_range(0..SCOPES.len());
        // A third of commits reuse bytes some scope already has: dedupe and shared ingests.
        let data = if self.rng.random_bool(0.33) && !self.oracle.bytes.is_empty() {
            let i = self.rng.random_range(0..self.oracle.bytes.len());
            self.oracle
                .bytes
                .values()
                .nth(i)
                .cloned()
                .expect("in range")
        } else {
            self.random_bytes()
        };
        self.note(format!(
            "commit {} bytes {} in {}",
            data.len(),
            sha(&data),
            SCOPES[s]
        ));
        self.commit(s, data, None).map(|_| ())
    }

    fn op_manifest(&mut self) -> Check {
        let s = self.rng.random_range(0..2);
        let mut children = Vec::new();
        for _ in 0..self.rng.random_range(1..=3) {
            if let Some(d) = self.oracle.any_linked(&mut self.rng, s) {
                children.push(d);
            }
        }
        if children.is_empty() {
            return Ok(());
        }
        let desc = |d: &Digest, bytes: &BTreeMap<Digest, Vec<u8>>| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{}}}"#,
                bytes[d].len()
            )
        };
        let layers: Vec<String> = children[1..]
            .iter()
            .map(|d| desc(d, &self.oracle.bytes))
            .collect();
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[{}],"annotations":{{"n":"{}"}}}}"#,
            desc(&children[0], &self.oracle.bytes),
            layers.join(","),
            self.rng.random::<u32>()
        );
        let d = sha(doc.as_bytes());
        // Sometimes declared as something else: the bytes must still decide its edges.
        let mt = self
            .rng
            .random_bool(0.3)
            .then_some("application/octet-stream");
        self.note(format!(
            "manifest {d} in {} -> {} children ({mt:?}): {}",
            SCOPES[s],
            children.len(),
            children
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        self.oracle.manifests.insert(d.clone(), children);
        self.commit(s, doc.into_bytes(), mt)?;
        if self.rng.random_bool(0.7) {
            let name = format!("img{}", self.rng.random_range(0..4));
            let rec = ImageRecord {
                name: name.clone(),
                digest: d.to_string(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: 1,
                ..Default::default()
            };
            self.note(format!("image {name} -> {d} in {}", SCOPES[s]));
            let sc = scope(s);
            match self.store.create_image(&sc, rec.clone()) {
                Ok(_) => {}
                Err(e) if e.is(Kind::AlreadyExists) => {
                    self.store
                        .update_image(&sc, rec, &[])
                        .map_err(|e| format!("update image: {e}"))?;
                }
                Err(e) => return Err(format!("create image: {e}")),
            }
            self.oracle.images.insert((s, name), d);
        }
        Ok(())
    }

    fn op_partial(&mut self) -> Check {
        let s = self.rng.random_range(0..SCOPES.len());
        let data = self.random_bytes();
        if data.is_empty() {
            return Ok(());
        }
        self.next_ref += 1;
        let r = format!("p{}", self.next_ref);
        let upto = self.rng.random_range(0..=data.len());
        self.note(format!(
            "partial {r} in {}: {upto}/{} bytes",
            SCOPES[s],
            data.len()
        ));
        let store = self.store.clone();
        let mut w = self
            .rt
            .block_on(store.open_writer(scope(s), &r, data.len() as i64, None, None))
            .map_err(|e| format!("open partial {r}: {e}"))?;
        w.write(0, &data[..upto])
            .map_err(|e| format!("write partial {r}: {e}"))?;
        drop(w);
        self.oracle.partials.push(Partial {
            scope: s,
            reference: r,
            data,
            written: upto,
        });
        Ok(())
    }

    fn op_resume(&mut self) -> Check {
        if self.oracle.partials.is_empty() {
            return Ok(());
        }
        let i = self.rng.random_range(0..self.oracle.partials.len());
        let p = self.oracle.partials.swap_remove(i);
        let store = self.store.clone();
        let mut w = self
            .rt
            .block_on(store.open_writer(scope(p.scope), &p.reference, 0, None, None))
            .map_err(|e| format!("resume {}: {e}", p.reference))?;
        let st = w.status().map_err(|e| e.to_string())?;
        self.note(format!(
            "resume {} at {} (wrote {})",
            p.reference, st.offset, p.written
        ));
        let at = usize::try_from(st.offset).map_err(|_| "negative offset".to_string())?;
        if at > p.written {
            return Err(format!(
                "ingest {} resumed at {at}, past the {} bytes written",
                p.reference, p.written
            ));
        }
        if st.digest != sha(&p.data[..at]) {
            return Err(format!(
                "ingest {} resumed at {at} with a digest that is not of the bytes written",
                p.reference
            ));
        }
        if self.rng.random_bool(0.2) {
            self.note(format!("abort {}", p.reference));
            return w.abort().map_err(|e| format!("abort: {e}"));
        }
        w.write(at as i64, &p.data[at..])
            .map_err(|e| format!("write resumed {}: {e}", p.reference))?;
        let d = sha(&p.data);
        match w.commit(p.data.len() as i64, Some(d.clone()), None) {
            Ok(_) => {}
            Err(e) if e.is(Kind::AlreadyExists) => {}
            Err(e) => return Err(format!("commit resumed {}: {e}", p.reference)),
        }
        self.report.commits += 1;
        self.oracle.committed(p.scope, d, p.data);
        Ok(())
    }

    fn op_delete(&mut self) -> Check {
        let s = self.rng.random_range(0..SCOPES.len());
        let Some(d) = self.oracle.any_linked(&mut self.rng, s) else {
            return Ok(());
        };
        self.note(format!("delete {d} in {}", SCOPES[s]));
        self.store
            .delete(&scope(s), &d)
            .map_err(|e| format!("delete: {e}"))?;
        self.oracle.linked.entry(s).or_default().remove(&d);
        self.oracle.rooted.remove(&(s, d));
        self.check_usage()
    }

    fn op_label_root(&mut self) -> Check {
        let s = self.rng.random_range(0..2);
        let Some(d) = self.oracle.any_linked(&mut self.rng, s) else {
            return Ok(());
        };
        self.note(format!("gc.root {d} in {}", SCOPES[s]));
        self.store
            .update(
                &scope(s),
                &d,
                HashMap::from([("containerd.io/gc.root".to_string(), "sim".to_string())]),
                &["labels.containerd.io/gc.root".to_string()],
            )
            .map_err(|e| format!("label: {e}"))?;
        self.oracle.rooted.insert((s, d));
        Ok(())
    }

    fn op_lease(&mut self) -> Check {
        let s = self.rng.random_range(0..2);
        let id = format!("l{}", self.rng.random_range(0..3));
        let sc = scope(s);
        if self.oracle.leases.contains_key(&(s, id.clone())) && self.rng.random_bool(0.5) {
            self.note(format!("delete lease {id} in {}", SCOPES[s]));
            self.store
                .delete_lease(&sc, &id)
                .map_err(|e| format!("delete lease: {e}"))?;
            self.oracle.leases.remove(&(s, id));
            return Ok(());
        }
        if !self.oracle.leases.contains_key(&(s, id.clone())) {
            self.note(format!("lease {id} in {}", SCOPES[s]));
            self.store
                .create_lease(&sc, &id, HashMap::new())
                .map_err(|e| format!("create lease: {e}"))?;
            self.oracle.leases.insert((s, id.clone()), BTreeSet::new());
        }
        if let Some(d) = self.oracle.any_linked(&mut self.rng, s) {
            self.note(format!("lease {id} holds {d}"));
            self.store
                .add_lease_resource(&sc, &id, "content", &d.to_string())
                .map_err(|e| format!("lease resource: {e}"))?;
            self.oracle
                .leases
                .get_mut(&(s, id))
                .expect("created")
                .insert(d);
        }
        Ok(())
    }

    fn op_delete_image(&mut self) -> Check {
        let Some(key) = self.oracle.images.keys().next().cloned() else {
            return Ok(());
        };
        self.note(format!("delete image {} in {}", key.1, SCOPES[key.0]));
        self.store
            .delete_image(&scope(key.0), &key.1)
            .map_err(|e| format!("delete image: {e}"))?;
        self.oracle.images.remove(&key);
        Ok(())
    }

    fn op_collect(&mut self) -> Check {
        self.note("collect".into());
        let r = self
            .store
            .collect(false)
            .map_err(|e| format!("collection failed: {e}"))?;
        self.report.collections += 1;
        self.report.spilled_collections += usize::from(r.mark_spills > 0);
        self.oracle.collect();
        self.check_usage()?;
        self.check_linked()
    }

    fn op_restart(&mut self, crash: bool) -> Check {
        // Every user of the store goes first, as in a real process exit.
        let placeholder = Store::open(Arc::new(MemKv::default())).map_err(|e| e.to_string())?;
        drop(std::mem::replace(&mut self.store, placeholder));
        if crash {
            let (logged, all) = self.kv.pending_len();
            let loss = if self.rng.random_bool(0.5) {
                Loss::All
            } else {
                Loss::Prefix {
                    wal_keep: self.rng.random_range(0..=logged),
                    flushed: self.rng.random_range(0..=all),
                }
            };
            self.note(format!(
                "power loss: {loss:?} of {logged} logged / {all} in flight"
            ));
            self.kv.power_loss(loss);
            self.report.crashes += 1;
        } else {
            // A clean close: RocksDB flushes memtables holding unlogged writes when it closes
            // (and replays, then flushes, its WAL when it opens).
            use crate::kv::Kv as _;
            self.kv
                .flush(crate::kv::Cf::Chunks)
                .map_err(|e| e.to_string())?;
            self.note("restart".into());
            self.report.restarts += 1;
        }
        self.reopen()
    }

    /// Every acknowledged, still-expected commit reads back whole.
    fn check_linked(&self) -> Check {
        for (s, set) in &self.oracle.linked {
            let sc = scope(*s);
            for d in set {
                let info = self
                    .store
                    .info(&sc, d)
                    .map_err(|e| format!("acknowledged {d} in {} is gone: {e}", SCOPES[*s]))?;
                let want = &self.oracle.bytes[d];
                if info.size != want.len() as i64 {
                    return Err(format!("{d}: size {} != {}", info.size, want.len()));
                }
                let loc = self.store.locate(&sc, d).map_err(|e| e.to_string())?;
                let mut got = Vec::with_capacity(want.len());
                self.store
                    .read_range(loc.extent, 0, loc.size as u64, |c| {
                        got.extend_from_slice(&c);
                        Ok(())
                    })
                    .map_err(|e| format!("read {d} in {}: {e}", SCOPES[*s]))?;
                if &got != want {
                    return Err(format!("{d} in {} reads back other bytes", SCOPES[*s]));
                }
            }
        }
        Ok(())
    }

    /// The O(1) usage counters equal a full recount of the links.
    fn check_usage(&self) -> Check {
        let mut recount = self
            .store
            .recount_usage()
            .map_err(|e| format!("usage recount: {e}"))?;
        recount.retain(|_, v| *v != 0);
        let counters = self.store.usage_counters();
        if recount != counters {
            return Err(format!(
                "usage counters {counters:?} differ from a recount {recount:?}"
            ));
        }
        Ok(())
    }

    fn check_all(&self) -> Check {
        self.check_linked()?;
        let all = Filter::default();
        for (s, name) in SCOPES.iter().enumerate() {
            let sc = scope(s);
            let listed = self
                .store
                .list(&sc, &all, None, usize::MAX)
                .map_err(|e| format!("List in {} after restart: {e}", name))?;
            for info in listed {
                self.store
                    .verify(&info.digest)
                    .map_err(|e| format!("torn blob visible in {}: {e}", name))?;
            }
            self.store
                .list_statuses(&sc, &all)
                .map_err(|e| format!("ListStatuses in {}: {e}", name))?;
            self.store
                .list_leases(&sc, &all)
                .map_err(|e| format!("leases in {}: {e}", name))?;
        }
        for (s, name) in self.oracle.images.keys() {
            self.store
                .image(&scope(*s), name)
                .map_err(|e| format!("acknowledged image {name} is gone: {e}"))?;
        }
        for (s, id) in self.oracle.leases.keys() {
            self.store
                .require_lease(&scope(*s), id)
                .map_err(|e| format!("acknowledged lease {id} is gone: {e}"))?;
        }
        Ok(())
    }

    fn step_once(&mut self) -> Check {
        match self.rng.random_range(0..100) {
            0..30 => self.op_commit(),
            30..40 => self.op_manifest(),
            40..48 => self.op_partial(),
            48..54 => self.op_resume(),
            54..62 => self.op_delete(),
            62..67 => self.op_label_root(),
            67..74 => self.op_lease(),
            74..77 => self.op_delete_image(),
            77..87 => self.op_collect(),
            87..92 => self.op_restart(false),
            _ => self.op_restart(true),
        }
    }
}

/// Runs one seed for `steps` operations.
pub fn run_seed(seed: u64, steps: usize) -> Result<SeedReport, Failure> {
    let kv = Arc::new(MemKv::with_power_loss());
    let fail = |step: usize, message: String, trace: Vec<String>| Failure {
        seed,
        step,
        message,
        trace,
    };
    let store =
        Store::open_with(kv.clone(), config()).map_err(|e| fail(0, e.to_string(), vec![]))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(0, e.to_string(), vec![]))?;
    let mut sim = Sim {
        rng: StdRng::seed_from_u64(seed),
        kv,
        store,
        rt,
        oracle: Oracle::default(),
        trace: Vec::new(),
        step: 0,
        report: SeedReport {
            seed,
            ..Default::default()
        },
        next_ref: 0,
    };
    for step in 0..steps {
        sim.step = step;
        if let Err(message) = sim.step_once() {
            return Err(fail(step, message, std::mem::take(&mut sim.trace)));
        }
    }
    // A final power loss and the full check, so every seed ends on a crash.
    sim.step = steps;
    if let Err(message) = sim.op_restart(true) {
        return Err(fail(steps, message, std::mem::take(&mut sim.trace)));
    }
    sim.report.steps = steps;
    Ok(sim.report)
}

/// Totals of a run over many seeds.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub seeds: u64,
    pub steps: u64,
    pub commits: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub collections: u64,
    pub spilled_collections: u64,
}

/// Runs seeds `first..` until `count` seeds ran or `budget` elapsed (whichever comes first),
/// stopping at the first failure.
pub fn run_many(
    first: u64,
    count: u64,
    steps: usize,
    budget: Option<Duration>,
) -> Result<RunReport, Failure> {
    let start = std::time::Instant::now();
    let mut total = RunReport::default();
    for seed in first..first.saturating_add(count) {
        if budget.is_some_and(|b| start.elapsed() >= b) {
            break;
        }
        let r = run_seed(seed, steps)?;
        total.seeds += 1;
        total.steps += r.steps as u64;
        total.commits += r.commits as u64;
        total.crashes += r.crashes as u64;
        total.restarts += r.restarts as u64;
        total.collections += r.collections as u64;
        total.spilled_collections += r.spilled_collections as u64;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CI run: as many seeds as `CONTENTD_SIM_SEEDS` says (default 2000), each ending in a
    /// power loss. A failure prints the seed and the command that replays it.
    #[test]
    fn simulated_crashes_keep_every_promise() {
        let seeds = std::env::var("CONTENTD_SIM_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        let start = std::time::Instant::now();
        match run_many(0, seeds, 60, None) {
            Ok(r) => {
                eprintln!(
                    "simulated {} seeds ({} steps, {} commits, {} power losses, {} restarts, {} collections, {} with marks on disk) in {:.1}s",
                    r.seeds,
                    r.steps,
                    r.commits,
                    r.crashes,
                    r.restarts,
                    r.collections,
                    r.spilled_collections,
                    start.elapsed().as_secs_f64()
                );
                assert_eq!(r.seeds, seeds);
                // The workloads reach the on-disk marks, so the roots are checked against them.
                assert!(seeds < 100 || r.spilled_collections * 10 >= r.collections);
            }
            Err(f) => panic!("{f}"),
        }
    }

    /// Longer runs than CI's: seed 7741 once failed at step 95 when the oracle still
    /// followed the edges of a manifest a collection had swept (the store, rightly, could
    /// not), so these keep runs past ninety steps covered.
    #[test]
    fn longer_runs_keep_every_promise() {
        if let Err(f) = run_seed(7741, 96) {
            panic!("{f}");
        }
        if let Err(f) = run_many(5000, 100, 120, None) {
            panic!("{f}");
        }
    }

    /// The same seed is the same run.
    #[test]
    fn a_seed_replays_exactly() {
        let a = run_seed(7, 80).unwrap();
        let b = run_seed(7, 80).unwrap();
        assert_eq!(
            (a.commits, a.crashes, a.restarts, a.collections),
            (b.commits, b.crashes, b.restarts, b.collections)
        );
    }
}
