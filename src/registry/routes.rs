//! The OCI distribution-spec URL grammar, pure: a request path and method become a [`Route`]
//! (or the spec's error for a malformed name, reference or digest), and a `Range` header
//! becomes the byte ranges to serve. No I/O, so every edge of the grammar is unit tested.

use crate::digest::Digest;

/// What a `/v2/...` path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: String, reference: Reference },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: String, digest: Digest },
    /// `/v2/<name>/blobs/uploads/` (start) and `/v2/<name>/blobs/uploads/<id>`.
    Upload { name: String, id: Option<String> },
    /// `/v2/<name>/tags/list`
    Tags { name: String },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: String, digest: Digest },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// A path the grammar refuses, with the spec's error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: &'static str,
    pub message: String,
}

fn refused(code: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
    }
}

/// The longest repository name accepted (distribution's limit).
pub const MAX_NAME: usize = 255;

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, one path component of a name. The first component
/// may also be a registry host with a port (`localhost:5000`), the form a registries.conf
/// mirror with a host path prefix sends.
fn component_ok(c: &str, first: bool) -> bool {
    let (c, port) = match (first, c.split_once(':')) {
        (true, Some((h, p))) => (h, Some(p)),
        _ => (c, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    let b = c.as_bytes();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

fn alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

pub fn name_ok(name: &str) -> bool {
    name.len() <= MAX_NAME
        && name
            .split('/')
            .enumerate()
            .all(|(i, c)| component_ok(c, i == 0))
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
pub fn tag_ok(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn checked_name(name: &str) -> Result<String, Refused> {
    if name_ok(name) {
        Ok(name.to_string())
    } else {
        Err(refused(
            "NAME_INVALID",
            format!("invalid repository name {name:?}"),
        ))
    }
}

fn checked_digest(s: &str) -> Result<Digest, Refused> {
    Digest::parse(s).map_err(|e| refused("DIGEST_INVALID", e.message().to_string()))
}

/// Parses a request path (without the query). `None`: not an API path at all (404).
pub fn parse(path: &str) -> Option<Result<Route, Refused>> {
    if path == "/v2/" || path == "/v2" {
        return Some(Ok(Route::Base));
    }
    let rest = path.strip_prefix("/v2/")?;
    let r = if let Some(name) = rest.strip_suffix("/tags/list") {
        checked_name(name).map(|name| Route::Tags { name })
    } else if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/") {
        if id.contains('/') {
            return None;
        }
        let id = (!id.is_empty()).then(|| id.to_string());
        if let Some(i) = &id
            && !upload_id_ok(i)
        {
            // No upload of ours has such an id: unknown, as distribution answers.
            return Some(Err(refused(
                "BLOB_UPLOAD_UNKNOWN",
                format!("upload {i:?} is unknown (upload ids here are hex)"),
            )));
        }
        checked_name(name).map(|name| Route::Upload { name, id })
    } else if let Some(name) = rest.strip_suffix("/blobs/uploads") {
        checked_name(name).map(|name| Route::Upload { name, id: None })
    } else if let Some((name, r)) = rest.rsplit_once("/manifests/") {
        if r.contains('/') {
            return None;
        }
        checked_name(name).and_then(|name| {
            let reference = if r.contains(':') {
                Reference::Digest(checked_digest(r)?)
            } else if tag_ok(r) {
                Reference::Tag(r.to_string())
            } else {
                return Err(refused("TAG_INVALID", format!("invalid tag {r:?}")));
            };
            Ok(Route::Manifest { name, reference })
        })
    } else if let Some((name, d)) = rest.rsplit_once("/blobs/") {
        if d.contains('/') {
            return None;
        }
        checked_name(name).and_then(|name| {
            Ok(Route::Blob {
                name,
                digest: checked_digest(d)?,
            })
        })
    } else if let Some((name, d)) = rest.rsplit_once("/referrers/") {
        if d.contains('/') {
            return None;
        }
        checked_name(name).and_then(|name| {
            Ok(Route::Referrers {
                name,
                digest: checked_digest(d)?,
            })
        })
    } else {
        return None;
    };
    Some(r)
}

/// Upload ids are ours (hex), but they come back from clients.
pub fn upload_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The value of query parameter `key`, percent-decoded.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a `Range` header applies to a blob of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ranges {
    /// No usable header: the whole blob (RFC 9110 lets a server ignore a malformed one).
    Whole,
    /// `[start, end)` pairs, in request order.
    Parts(Vec<(u64, u64)>),
    /// No range overlaps the blob: 416.
    Unsatisfiable,
}

/// More ranges than this in one request are ignored (the whole blob is sent): a request may
/// not multiply the bytes it makes us read.
pub const MAX_RANGES: usize = 16;

pub fn ranges(header: Option<&str>, size: u64) -> Ranges {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ranges::Whole;
    };
    let mut parts = Vec::new();
    let mut any = false;
    for item in spec.split(',') {
        any = true;
        if parts.len() >= MAX_RANGES {
            return Ranges::Whole;
        }
        let Some((a, b)) = item.trim().split_once('-') else {
            return Ranges::Whole;
        };
        let (a, b) = (a.trim(), b.trim());
        let part = if a.is_empty() {
            // A suffix: the last b bytes.
            let Ok(n) = b.parse::<u64>() else {
                return Ranges::Whole;
            };
            if n == 0 || size == 0 {
                continue;
            }
            (size.saturating_sub(n), size)
        } else {
            let Ok(start) = a.parse::<u64>() else {
                return Ranges::Whole;
            };
            let end = if b.is_empty() {
                size
            } else {
                match b.parse::<u64>() {
                    Ok(e) if e >= start => e.saturating_add(1).min(size),
                    _ => return Ranges::Whole,
                }
            };
            if start >= size {
                continue;
            }
            (start, end)
        };
        parts.push(part);
    }
    if !any {
        return Ranges::Whole;
    }
    if parts.is_empty() {
        Ranges::Unsatisfiable
    } else {
        Ranges::Parts(parts)
    }
}

/// A `Content-Range: bytes a-b` value of a PATCH: `[start, end]` inclusive.
pub fn content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v.strip_prefix("bytes ").unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b) = (a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?);
    (b >= a).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn paths() {
        assert_eq!(parse("/v2/"), Some(Ok(Route::Base)));
        assert_eq!(parse("/v1/"), None);
        assert_eq!(
            parse("/v2/library/alpine/manifests/3.20"),
            Some(Ok(Route::Manifest {
                name: "library/alpine".into(),
                reference: Reference::Tag("3.20".into())
            }))
        );
        assert!(matches!(
            parse(&format!("/v2/a/b/manifests/{D}")),
            Some(Ok(Route::Manifest {
                reference: Reference::Digest(_),
                ..
            }))
        ));
        assert!(matches!(
            parse(&format!("/v2/a/blobs/{D}")),
            Some(Ok(Route::Blob { .. }))
        ));
        assert_eq!(
            parse("/v2/a/blobs/uploads/"),
            Some(Ok(Route::Upload {
                name: "a".into(),
                id: None
            }))
        );
        assert_eq!(
            parse("/v2/a/blobs/uploads/00ff"),
            Some(Ok(Route::Upload {
                name: "a".into(),
                id: Some("00ff".into())
            }))
        );
        assert_eq!(
            parse("/v2/docker.io/library/x/tags/list"),
            Some(Ok(Route::Tags {
                name: "docker.io/library/x".into()
            }))
        );
        assert_eq!(
            parse("/v2/localhost:5000/x/tags/list"),
            Some(Ok(Route::Tags {
                name: "localhost:5000/x".into()
            }))
        );
        assert!(matches!(
            parse(&format!("/v2/a/referrers/{D}")),
            Some(Ok(Route::Referrers { .. }))
        ));
        // A repository may itself be called "blobs" or "manifests".
        assert!(matches!(
            parse(&format!("/v2/blobs/blobs/{D}")),
            Some(Ok(Route::Blob { name, .. })) if name == "blobs"
        ));
    }

    #[test]
    fn refusals() {
        let code = |p: &str| parse(p).unwrap().unwrap_err().code;
        assert_eq!(code("/v2/UPPER/tags/list"), "NAME_INVALID");
        assert_eq!(code("/v2/a//b/tags/list"), "NAME_INVALID");
        assert_eq!(code("/v2/a-/tags/list"), "NAME_INVALID");
        assert_eq!(code("/v2/a/b:c/tags/list"), "NAME_INVALID");
        assert_eq!(
            code(&format!("/v2/{}/tags/list", "a".repeat(256))),
            "NAME_INVALID"
        );
        assert_eq!(code("/v2/a/manifests/-bad"), "TAG_INVALID");
        assert_eq!(code("/v2/a/manifests/sha256:zz"), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/blobs/md5:abc"), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/blobs/uploads/zz.x"), "BLOB_UPLOAD_UNKNOWN");
        assert_eq!(parse("/v2/a/blobs/uploads/../x"), None);
        assert!(name_ok("a__b.c-d---e/f0"));
        assert!(!name_ok("a___b"));
        assert!(tag_ok(&"t".repeat(128)));
        assert!(!tag_ok(&"t".repeat(129)));
    }

    #[test]
    fn range_headers() {
        assert_eq!(ranges(None, 10), Ranges::Whole);
        assert_eq!(ranges(Some("bytes=0-3"), 10), Ranges::Parts(vec![(0, 4)]));
        assert_eq!(ranges(Some("bytes=5-"), 10), Ranges::Parts(vec![(5, 10)]));
        assert_eq!(ranges(Some("bytes=-3"), 10), Ranges::Parts(vec![(7, 10)]));
        assert_eq!(
            ranges(Some("bytes=8-100"), 10),
            Ranges::Parts(vec![(8, 10)])
        );
        assert_eq!(
            ranges(Some("bytes=0-0, 9-9"), 10),
            Ranges::Parts(vec![(0, 1), (9, 10)])
        );
        assert_eq!(ranges(Some("bytes=10-"), 10), Ranges::Unsatisfiable);
        assert_eq!(ranges(Some("bytes=-0"), 10), Ranges::Unsatisfiable);
        assert_eq!(ranges(Some("bytes=3-1"), 10), Ranges::Whole);
        assert_eq!(ranges(Some("items=0-1"), 10), Ranges::Whole);
        assert_eq!(ranges(Some("bytes=x-1"), 10), Ranges::Whole);
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(ranges(Some(&many), 10), Ranges::Whole);
        assert_eq!(
            ranges(Some("bytes=18446744073709551615-18446744073709551615"), 10),
            Ranges::Unsatisfiable
        );
        assert_eq!(content_range("0-99"), Some((0, 99)));
        assert_eq!(content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(content_range("9-1"), None);
    }

    #[test]
    fn queries() {
        assert_eq!(
            query_param(Some("ns=docker.io&n=2"), "ns").as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            query_param(Some("digest=sha256%3Aab"), "digest").as_deref(),
            Some("sha256:ab")
        );
        assert_eq!(query_param(Some("a=%"), "a").as_deref(), Some("%"));
        assert_eq!(query_param(None, "a"), None);
    }
}
