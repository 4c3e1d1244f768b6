//! Scopes and visibility: what a namespace or a backend tenant sees of a stored blob. A
//! namespace sees what it links. A tenant sees every stored blob, and a blob it looks up
//! becomes *held* for it — but only through [`Store::hold`], its own (synced) call: a read
//! that resolves through [`Store::linked`] never writes, so it may run on an async worker.

use std::collections::HashMap;

use prost::Message as _;

use super::*;

impl Store {
    pub(super) fn not_found(d: &Digest) -> Error {
        Error::not_found(format!("content {d}: not found"))
    }

    /// What `scope` sees of `d` through its own link: one point lookup that never writes, so
    /// it may run on an async worker.
    pub(super) fn linked(
        &self,
        scope: &Scope,
        d: &Digest,
    ) -> Result<Option<(BlobRecord, LinkRecord)>> {
        Ok(self.link(scope, d)?.map(|link| {
            let blob = BlobRecord {
                extent: link.extent,
                size: link.size,
                created_ns: link.created_ns,
                ..Default::default()
            };
            (blob, link)
        }))
    }

    /// Info of `d` if `scope` links it; None means "ask [`Store::info`]", which may have to
    /// write a tenant's hold (a synced write: run it on the blocking pool).
    pub fn info_linked(&self, scope: &Scope, d: &Digest) -> Result<Option<Info>> {
        Ok(self
            .linked(scope, d)?
            .map(|(blob, link)| Self::info_of(d, &blob, link)))
    }

    /// Where to read `d` if `scope` links it; None means "ask [`Store::locate`]".
    pub fn locate_linked(&self, scope: &Scope, d: &Digest) -> Result<Option<BlobLocation>> {
        Ok(self.linked(scope, d)?.map(|(blob, _)| BlobLocation {
            extent: blob.extent,
            size: blob.size,
        }))
    }

    /// Resolves what `scope` may see of `d`: its link, else, for a tenant, a new hold
    /// ([`Store::hold`]). Call it on the blocking pool: the hold is a synced write.
    pub(super) fn resolve(
        &self,
        scope: &Scope,
        d: &Digest,
    ) -> Result<Option<(BlobRecord, LinkRecord)>> {
        match self.linked(scope, d)? {
            Some(found) => Ok(Some(found)),
            None if scope.is_tenant() => self.hold(scope, d),
            None => Ok(None),
        }
    }

    /// Makes a stored blob held by a backend tenant (so another tenant's delete can never
    /// remove it), and returns it; None if no such blob is stored. Durable before it returns:
    /// containerd records the blob as present once Info answers. Namespaces never hold: they
    /// link by committing.
    pub fn hold(&self, scope: &Scope, d: &Digest) -> Result<Option<(BlobRecord, LinkRecord)>> {
        if !scope.is_tenant() {
            return Err(Error::invalid(
                "only a backend tenant holds content it did not commit",
            ));
        }
        let _g = self.digest_lock(d);
        let _gate = self.gc_gate.read();
        if let Some(found) = self.linked(scope, d)? {
            return Ok(Some(found));
        }
        let Some(blob) = self.blob(d)? else {
            return Ok(None);
        };
        self.barrier([collect::node(scope, d)]);
        let now = now_ns();
        let link = LinkRecord {
            created_ns: blob.created_ns,
            updated_ns: now,
            labels: HashMap::new(),
            size: blob.size,
            extent: blob.extent,
        };
        let mut b = Batch::new();
        self.put_link(&mut b, scope, d, &link);
        self.kv.write(b, true)?;
        self.usage_add(scope, blob.size);
        Ok(Some((blob, link)))
    }

    pub(super) fn put_link(&self, b: &mut Batch, scope: &Scope, d: &Digest, link: &LinkRecord) {
        b.put(Cf::Links, link_key(scope, d), link.encode_to_vec());
        b.put(Cf::Owners, owner_key(d, scope), Vec::new());
    }

    pub(super) fn info_of(d: &Digest, blob: &BlobRecord, link: LinkRecord) -> Info {
        Info {
            digest: d.clone(),
            size: blob.size,
            created_ns: link.created_ns,
            updated_ns: link.updated_ns,
            labels: link.labels,
        }
    }

    pub fn info(&self, scope: &Scope, d: &Digest) -> Result<Info> {
        let (blob, link) = self.resolve(scope, d)?.ok_or_else(|| Self::not_found(d))?;
        Ok(Self::info_of(d, &blob, link))
    }

    /// Where to read `d` from, if `scope` can see it.
    pub fn locate(&self, scope: &Scope, d: &Digest) -> Result<BlobLocation> {
        let (blob, _) = self.resolve(scope, d)?.ok_or_else(|| Self::not_found(d))?;
        Ok(BlobLocation {
            extent: blob.extent,
            size: blob.size,
        })
    }
}
