//! Every key contentd stores, encoded and decoded in one place (pure code, no I/O). The
//! layouts are the table in `kv/mod.rs`; a `scope` is `b'n'‖namespace` or `b't'‖tenant`
//! (neither may contain NUL), and `dk` is a digest key (`Digest::key`).

use super::Scope;
use crate::digest::Digest;
use crate::graph::Role;

impl Scope {
    /// `b'n'‖namespace` or `b't'‖tenant`.
    pub(crate) fn tag(&self) -> Vec<u8> {
        let (t, name) = match self {
            Scope::Namespace(n) => (b'n', n),
            Scope::Tenant(n) => (b't', n),
        };
        let mut k = Vec::with_capacity(name.len() + 2);
        k.push(t);
        k.extend_from_slice(name.as_bytes());
        k
    }

    /// The tag and its NUL terminator: every per-scope family's key prefix.
    pub(crate) fn prefix(&self) -> Vec<u8> {
        let mut k = self.tag();
        k.push(0);
        k
    }

    pub(crate) fn from_tag(tag: &[u8]) -> Option<Scope> {
        let name = String::from_utf8(tag.get(1..)?.to_vec()).ok()?;
        match tag.first()? {
            b'n' => Some(Scope::Namespace(name)),
            b't' => Some(Scope::Tenant(name)),
            _ => None,
        }
    }
}

/// The scope of a key that starts with a scope prefix, and the rest after the NUL.
pub(crate) fn split_scope(k: &[u8]) -> Option<(Scope, &[u8])> {
    let nul = k.iter().position(|b| *b == 0)?;
    Some((Scope::from_tag(&k[..nul])?, &k[nul + 1..]))
}

/// `links[scope ‖ 0 ‖ dk]` (also the collector's node for a (scope, blob) pair).
pub(crate) fn link_key(scope: &Scope, d: &Digest) -> Vec<u8> {
    let mut k = scope.prefix();
    k.extend_from_slice(&d.key());
    k
}

/// The (scope, digest) of a link key (or a collector node).
pub(crate) fn split_link(n: &[u8]) -> Option<(Scope, Digest)> {
    let (scope, rest) = split_scope(n)?;
    let (d, tail) = Digest::from_key(rest)?;
    tail.is_empty().then_some((scope, d))
}

/// `owners[dk ‖ scope]`.
pub(crate) fn owner_key(d: &Digest, scope: &Scope) -> Vec<u8> {
    let mut k = d.key();
    k.extend_from_slice(&scope.tag());
    k
}

/// `ingests[scope ‖ 0 ‖ ref]`.
pub(crate) fn ingest_key(scope: &Scope, r: &str) -> Vec<u8> {
    let mut k = scope.prefix();
    k.extend_from_slice(r.as_bytes());
    k
}

/// `chunks[extent ‖ offset]`, both u64 big-endian.
pub(crate) fn chunk_key(extent: u64, offset: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&extent.to_be_bytes());
    k[8..].copy_from_slice(&offset.to_be_bytes());
    k
}

/// The chunk offset of a chunk key.
pub(crate) fn chunk_offset(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(8..16)?.try_into().ok()?))
}

/// Every chunk key of one extent: `[from, to)`.
pub(crate) fn extent_range(extent: u64) -> ([u8; 16], [u8; 16]) {
    (chunk_key(extent, 0), chunk_key(extent.saturating_add(1), 0))
}

/// `edges[parent dk ‖ role ‖ index u32 BE ‖ child dk]`.
pub(crate) fn edge_key(parent: &Digest, role: Role, index: u32, child: &Digest) -> Vec<u8> {
    let mut k = parent.key();
    k.push(role.code());
    k.extend_from_slice(&index.to_be_bytes());
    k.extend_from_slice(&child.key());
    k
}

/// The (role, index, child) after a parent's digest key in an edge key.
pub(crate) fn split_edge_rest(rest: &[u8]) -> Option<(Role, u32, Digest)> {
    let role = Role::from_code(*rest.first()?)?;
    let index = u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?);
    let (child, tail) = Digest::from_key(rest.get(5..)?)?;
    tail.is_empty().then_some((role, index, child))
}

/// `parents[child dk ‖ parent dk ‖ role]`.
pub(crate) fn parent_key(child: &Digest, parent: &Digest, role: Role) -> Vec<u8> {
    let mut k = child.key();
    k.extend_from_slice(&parent.key());
    k.push(role.code());
    k
}

/// `images[scope ‖ 0 ‖ name]`.
pub(crate) fn image_key(scope: &Scope, name: &str) -> Vec<u8> {
    let mut k = scope.prefix();
    k.extend_from_slice(name.as_bytes());
    k
}

/// `leases[scope ‖ 0 ‖ id]`.
pub(crate) fn lease_key(scope: &Scope, id: &str) -> Vec<u8> {
    let mut k = scope.prefix();
    k.extend_from_slice(id.as_bytes());
    k
}

/// `lease_resources[scope ‖ 0 ‖ id ‖ 0 ‖ type ‖ 0 ‖ resource id]`.
pub(crate) fn resource_key(scope: &Scope, id: &str, kind: &str, rid: &str) -> Vec<u8> {
    let mut k = resource_prefix(scope, id);
    k.extend_from_slice(kind.as_bytes());
    k.push(0);
    k.extend_from_slice(rid.as_bytes());
    k
}

/// Every resource key of one lease starts with this.
pub(crate) fn resource_prefix(scope: &Scope, id: &str) -> Vec<u8> {
    let mut k = lease_key(scope, id);
    k.push(0);
    k
}

/// (type, resource id) of a resource key, after its lease's prefix.
pub(crate) fn split_resource(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = rest.iter().position(|b| *b == 0)?;
    Some((&rest[..nul], &rest[nul + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Algorithm;

    #[test]
    fn keys_round_trip() {
        let d = Digest::of(Algorithm::Sha256, b"x");
        let e = Digest::of(Algorithm::Sha512, b"y");
        for s in [
            Scope::namespace("a.b-c").unwrap(),
            Scope::tenant("containerd").unwrap(),
        ] {
            assert_eq!(Scope::from_tag(&s.tag()), Some(s.clone()));
            assert_eq!(split_link(&link_key(&s, &d)), Some((s.clone(), d.clone())));
            let ik = ingest_key(&s, "ref/with\x00nul");
            let (sc, rest) = split_scope(&ik).unwrap();
            assert_eq!((sc, rest), (s.clone(), &b"ref/with\x00nul"[..]));
            let rk = resource_key(&s, "lease", "content", "sha256:x");
            let p = resource_prefix(&s, "lease");
            assert_eq!(
                split_resource(&rk[p.len()..]),
                Some((&b"content"[..], &b"sha256:x"[..]))
            );
        }
        let ek = edge_key(&d, Role::Layer, 7, &e);
        assert_eq!(
            split_edge_rest(&ek[d.key().len()..]),
            Some((Role::Layer, 7, e.clone()))
        );
        assert_eq!(chunk_offset(&chunk_key(3, 1 << 40)), Some(1 << 40));
        let (a, b) = extent_range(u64::MAX);
        assert!(a <= b);
        assert!(split_link(b"no-nul").is_none());
        assert!(split_edge_rest(&[0xff]).is_none());
    }
}
