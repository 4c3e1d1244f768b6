//! Leases: namespaced holds on content (and ingests) that the collector keeps until the lease
//! is deleted or its `containerd.io/gc.expire` time passes (containerd's leases service).

use std::collections::HashMap;

use prost::Message as _;

use super::{LeaseRecord, Scope, Store, decode, now_ns, validate_labels};
use crate::digest::Digest;
use crate::error::{Error, Kind, Result};
use crate::filter::{self, Adaptor, Filter};
use crate::kv::{Batch, Cf, prefix_end};

use super::keys::{lease_key, resource_key, resource_prefix, split_resource};
pub use crate::dates::EXPIRE_LABEL;
use crate::dates::{parse_rfc3339, validate_expiry};
pub const FLAT_LABEL: &str = "containerd.io/gc.flat";

impl Adaptor for LeaseRecord {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("id") if path.len() == 1 => Some(self.id.clone()),
            Some("labels") => filter::label_field(path, |k| self.labels.get(k)),
            _ => None,
        }
    }
}

impl LeaseRecord {
    /// When the lease stops holding anything (ns since the epoch), if it expires.
    pub fn expires_ns(&self) -> Option<i64> {
        self.labels.get(EXPIRE_LABEL).and_then(|v| parse_rfc3339(v))
    }
    pub fn is_flat(&self) -> bool {
        self.labels.contains_key(FLAT_LABEL)
    }
}

/// Checks a resource type and id as containerd does.
fn validate_resource(kind: &str, rid: &str) -> Result<()> {
    match kind {
        "content" => Digest::parse(rid).map(|_| ()),
        "ingests" if !rid.is_empty() => Ok(()),
        k if k.starts_with("snapshots/") && k.len() > "snapshots/".len() && !rid.is_empty() => {
            Ok(())
        }
        "ingests" => Err(Error::invalid("an ingest resource needs a ref")),
        other => Err(Error::new(
            Kind::Unimplemented,
            format!("unsupported lease resource type {other:?}"),
        )),
    }
}

impl Store {
    pub(super) fn lease(&self, scope: &Scope, id: &str) -> Result<Option<LeaseRecord>> {
        self.kv
            .get(Cf::Leases, &lease_key(scope, id))?
            .map(|v| decode("lease", &v))
            .transpose()
    }

    /// Fails with NotFound unless the lease exists (for the `containerd-lease` header).
    pub fn require_lease(&self, scope: &Scope, id: &str) -> Result<()> {
        match self.lease(scope, id)? {
            Some(_) => Ok(()),
            None => Err(Error::not_found(format!("lease {id:?}: not found"))),
        }
    }

    pub fn create_lease(
        &self,
        scope: &Scope,
        id: &str,
        labels: HashMap<String, String>,
    ) -> Result<LeaseRecord> {
        validate_labels(&labels)?;
        if let Some(v) = labels.get(EXPIRE_LABEL) {
            validate_expiry(v, now_ns())?;
        }
        let id = if id.is_empty() {
            hex::encode(rand::random::<[u8; 12]>())
        } else {
            id.to_string()
        };
        if id.contains('\0') {
            return Err(Error::invalid("lease id must not contain NUL"));
        }
        let rec = LeaseRecord {
            id: id.clone(),
            created_ns: now_ns(),
            labels,
        };
        let key = lease_key(scope, &id);
        let _record = self.record_lock(&key);
        let _gate = self.gc_gate.read();
        if self.lease(scope, &id)?.is_some() {
            return Err(Error::exists(format!("lease {id:?}: already exists")));
        }
        self.check_record_growth(0, rec.encoded_len())?;
        let mut b = Batch::new();
        // A new lease starts empty, whatever a lease of the same id once held (an ingest's
        // resource queued while that lease was being deleted, say).
        let p = resource_prefix(scope, &id);
        b.delete_range(Cf::LeaseResources, p.clone(), prefix_end(&p));
        b.put(Cf::Leases, key, rec.encode_to_vec());
        self.kv.write(b, true)?;
        if rec.expires_ns().is_some() {
            // The collector re-plans its wake-up around the new expiry.
            self.gc_wake.notify_one();
        }
        Ok(rec)
    }

    pub fn delete_lease(&self, scope: &Scope, id: &str) -> Result<()> {
        let _record = self.record_lock(&lease_key(scope, id));
        if self.lease(scope, id)?.is_none() {
            return Err(Error::not_found(format!("lease {id:?}: not found")));
        }
        let mut b = Batch::new();
        self.drop_lease(&mut b, scope, id);
        self.kv.write(b, true)?;
        self.note_deletion();
        Ok(())
    }

    pub(super) fn drop_lease(&self, b: &mut Batch, scope: &Scope, id: &str) {
        let p = resource_prefix(scope, id);
        b.delete(Cf::Leases, lease_key(scope, id));
        b.delete_range(Cf::LeaseResources, p.clone(), prefix_end(&p));
    }

    pub fn list_leases(&self, scope: &Scope, f: &Filter) -> Result<Vec<LeaseRecord>> {
        let prefix = scope.prefix();
        let mut out = Vec::new();
        self.kv
            .scan(Cf::Leases, &prefix, &prefix_end(&prefix), &mut |_, v| {
                if let Ok(l) = LeaseRecord::decode(v)
                    && f.matches(&l)
                {
                    out.push(l);
                }
                true
            })?;
        Ok(out)
    }

    /// Adds a resource to a lease (queued into `b` when given, else written now).
    pub fn add_lease_resource(&self, scope: &Scope, id: &str, kind: &str, rid: &str) -> Result<()> {
        validate_resource(kind, rid)?;
        // Held until the resource is written: a delete of the lease cannot slip in between
        // the check and the write and leave the resource behind it.
        let _record = self.record_lock(&lease_key(scope, id));
        let _gate = self.gc_gate.read();
        self.require_lease(scope, id)?;
        if kind == "content" {
            self.barrier([super::collect::node(scope, &Digest::parse(rid)?)]);
        }
        let mut b = Batch::new();
        b.put(
            Cf::LeaseResources,
            resource_key(scope, id, kind, rid),
            Vec::new(),
        );
        // A lease resource is a root: acknowledged means durable.
        self.kv.write(b, true)?;
        self.note_mutation();
        Ok(())
    }

    pub(super) fn queue_lease_resource(
        &self,
        b: &mut Batch,
        scope: &Scope,
        id: &str,
        kind: &str,
        rid: &str,
    ) {
        b.put(
            Cf::LeaseResources,
            resource_key(scope, id, kind, rid),
            Vec::new(),
        );
    }

    pub(super) fn queue_lease_resource_removal(
        &self,
        b: &mut Batch,
        scope: &Scope,
        id: &str,
        kind: &str,
        rid: &str,
    ) {
        b.delete(Cf::LeaseResources, resource_key(scope, id, kind, rid));
    }

    pub fn delete_lease_resource(
        &self,
        scope: &Scope,
        id: &str,
        kind: &str,
        rid: &str,
    ) -> Result<()> {
        validate_resource(kind, rid)?;
        let _record = self.record_lock(&lease_key(scope, id));
        self.require_lease(scope, id)?;
        let mut b = Batch::new();
        b.delete(Cf::LeaseResources, resource_key(scope, id, kind, rid));
        self.kv.write(b, true)?;
        self.note_deletion();
        Ok(())
    }

    pub fn list_lease_resources(&self, scope: &Scope, id: &str) -> Result<Vec<(String, String)>> {
        self.require_lease(scope, id)?;
        self.lease_resources(scope, id)
    }

    /// A lease's resources without checking the lease (it may be deleted concurrently).
    fn lease_resources(&self, scope: &Scope, id: &str) -> Result<Vec<(String, String)>> {
        let p = resource_prefix(scope, id);
        let mut out = Vec::new();
        self.kv
            .scan(Cf::LeaseResources, &p, &prefix_end(&p), &mut |k, _| {
                if let Some((kind, rid)) = split_resource(&k[p.len()..]) {
                    out.push((
                        String::from_utf8_lossy(kind).into_owned(),
                        String::from_utf8_lossy(rid).into_owned(),
                    ));
                }
                true
            })?;
        Ok(out)
    }

    /// When the next lease expires (ns since the epoch), if any lease has an expiry.
    pub fn next_lease_expiry(&self) -> Result<Option<i64>> {
        Ok(self
            .all_lease_records()?
            .iter()
            .filter_map(|(_, l)| l.expires_ns())
            .min())
    }

    /// Every lease record of every scope. An undecodable record is an error naming its key:
    /// the collector must not run on a partial view of the roots.
    fn all_lease_records(&self) -> Result<Vec<(Scope, LeaseRecord)>> {
        let mut leases = Vec::new();
        self.scan_scoped(Cf::Leases, "leases", |scope, l| leases.push((scope, l)))?;
        Ok(leases)
    }

    /// Every lease of every scope with its content resources, for the collector.
    pub(super) fn all_leases(&self) -> Result<Vec<(Scope, LeaseRecord, Vec<Digest>)>> {
        let mut out = Vec::new();
        for (scope, l) in self.all_lease_records()? {
            let mut content = Vec::new();
            for (kind, rid) in self.lease_resources(&scope, &l.id)? {
                if kind == "content" {
                    // Resources are validated when added: one that no longer parses is damage.
                    content.push(Digest::parse(&rid).map_err(|e| {
                        Error::data_loss(format!(
                            "lease {:?}: stored content resource {rid:?} is damaged: {}",
                            l.id,
                            e.message()
                        ))
                    })?);
                }
            }
            out.push((scope, l, content));
        }
        Ok(out)
    }
}
