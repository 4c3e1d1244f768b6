//! Leases: namespaced holds on content (and ingests) that the collector keeps until the lease
//! is deleted or its `containerd.io/gc.expire` time passes (containerd's leases service).

use std::collections::HashMap;

use prost::Message as _;

use super::{LeaseRecord, Scope, Store, decode, now_ns, validate_labels};
use crate::digest::Digest;
use crate::error::{Error, Kind, Result};
use crate::filter::{self, Adaptor, Filter};
use crate::kv::{Batch, Cf, prefix_end};

pub const EXPIRE_LABEL: &str = "containerd.io/gc.expire";
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

/// Parses an RFC 3339 date-time (`2006-01-02T15:04:05[.999999999](Z|±07:00)`) to ns since
/// the Unix epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        std::str::from_utf8(b.get(r)?).ok()?.parse().ok()
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = std::str::from_utf8(&b[start..i]).ok()?;
        if frac.is_empty() {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = digits.parse().ok()?;
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        b'+' | b'-' if i + 6 == b.len() && b[i + 3] == b':' => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if b[i] == b'+' { o } else { -o }
        }
        _ => return None,
    };
    // Days from civil (proleptic Gregorian).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

fn lease_key(scope: &Scope, id: &str) -> Vec<u8> {
    let mut k = scope.prefix();
    k.extend_from_slice(id.as_bytes());
    k
}

fn resource_key(scope: &Scope, id: &str, kind: &str, rid: &str) -> Vec<u8> {
    let mut k = lease_key(scope, id);
    k.push(0);
    k.extend_from_slice(kind.as_bytes());
    k.push(0);
    k.extend_from_slice(rid.as_bytes());
    k
}

fn resource_prefix(scope: &Scope, id: &str) -> Vec<u8> {
    let mut k = lease_key(scope, id);
    k.push(0);
    k
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
    fn lease(&self, scope: &Scope, id: &str) -> Result<Option<LeaseRecord>> {
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
        let _gate = self.gc_gate.read();
        if self.lease(scope, &id)?.is_some() {
            return Err(Error::exists(format!("lease {id:?}: already exists")));
        }
        let mut b = Batch::new();
        b.put(Cf::Leases, lease_key(scope, &id), rec.encode_to_vec());
        self.kv.write(b, true)?;
        if rec.expires_ns().is_some() {
            // The collector re-plans its wake-up around the new expiry.
            self.gc_wake.notify_one();
        }
        Ok(rec)
    }

    pub fn delete_lease(&self, scope: &Scope, id: &str) -> Result<()> {
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
        self.kv.write(b, false)?;
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
        self.require_lease(scope, id)?;
        let mut b = Batch::new();
        b.delete(Cf::LeaseResources, resource_key(scope, id, kind, rid));
        self.kv.write(b, false)?;
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
                let rest = &k[p.len()..];
                if let Some(nul) = rest.iter().position(|b| *b == 0) {
                    out.push((
                        String::from_utf8_lossy(&rest[..nul]).into_owned(),
                        String::from_utf8_lossy(&rest[nul + 1..]).into_owned(),
                    ));
                }
                true
            })?;
        Ok(out)
    }

    /// When the next lease expires (ns since the epoch), if any lease has an expiry.
    pub fn next_lease_expiry(&self) -> Option<i64> {
        let mut next: Option<i64> = None;
        let _ = self.kv.scan(Cf::Leases, &[], &[], &mut |_, v| {
            if let Some(t) = LeaseRecord::decode(v).ok().and_then(|l| l.expires_ns()) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
            true
        });
        next
    }

    /// Every lease of every scope with its content resources, for the collector.
    pub(super) fn all_leases(&self) -> Result<Vec<(Scope, LeaseRecord, Vec<Digest>)>> {
        let mut leases = Vec::new();
        self.kv.scan(Cf::Leases, &[], &[], &mut |k, v| {
            if let (Some(nul), Ok(l)) = (k.iter().position(|b| *b == 0), LeaseRecord::decode(v))
                && let Some(scope) = Scope::from_tag(&k[..nul])
            {
                leases.push((scope, l));
            }
            true
        })?;
        let mut out = Vec::new();
        for (scope, l) in leases {
            let content = self
                .lease_resources(&scope, &l.id)?
                .into_iter()
                .filter(|(kind, _)| kind == "content")
                .filter_map(|(_, rid)| Digest::parse(&rid).ok())
                .collect();
            out.push((scope, l, content));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-01-01T00:00:00Z"),
            Some(1_704_067_200_000_000_000)
        );
        assert_eq!(
            parse_rfc3339("2024-01-01T01:00:00+01:00"),
            Some(1_704_067_200_000_000_000)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T12:30:45.5Z"),
            Some(1_709_209_845_500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00.000000001-00:00"),
            Some(951_868_800_000_000_001)
        );
        for bad in [
            "",
            "2024-01-01",
            "2024-13-01T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "x024-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
