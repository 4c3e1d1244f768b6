//! Least-recently-used eviction of mirrored images. A mirrored image is an image record the
//! mirror made (it carries `contentd.io/registry.checked` and no push origin); its recency
//! is `contentd.io/registry.used`, refreshed at most once a minute when a client asks for it
//! (by tag or by the record's digest), else its last upstream check. Eviction deletes the
//! oldest such records and collects: what goes is only what no kept image, lease, label or
//! hold still reaches, so a layer shared with a kept image always stays. Pushed images are
//! never evicted.

use crate::error::Result;
use crate::store::{Scope, Store};

use super::api::{CHECKED_LABEL, ORIGIN_LABEL};

/// When a mirrored image was last asked for (seconds since the epoch).
pub const USED_LABEL: &str = "contentd.io/registry.used";
/// `USED_LABEL` is rewritten only when it is older than this (one write per image a minute).
pub const USED_GRANULARITY_SECS: i64 = 60;
/// Images evicted in one pass at most (each is followed by a collection).
const MAX_PER_PASS: usize = 256;

fn recency(labels: &std::collections::HashMap<String, String>) -> i64 {
    [USED_LABEL, CHECKED_LABEL]
        .iter()
        .filter_map(|l| labels.get(*l)?.parse::<i64>().ok())
        .max()
        .unwrap_or(0)
}

/// Deletes mirrored images of `scope`, least recently used first, collecting after each,
/// while `over` says the store is past its limit. Returns the names evicted.
///
/// The namespace is listed once per pass, not once per eviction; each victim is read again
/// just before it goes, and one a client asked for since the listing is kept.
pub fn evict_lru(
    store: &Store,
    scope: &Scope,
    mut over: impl FnMut(&Store) -> bool,
) -> Result<Vec<String>> {
    let mut evicted = Vec::new();
    if !over(store) {
        return Ok(evicted);
    }
    let mut candidates: Vec<(i64, String)> = store
        .list_images(scope, &crate::filter::Filter::default())?
        .into_iter()
        .filter(|i| mirrored(&i.labels))
        .map(|i| (recency(&i.labels), i.name))
        .collect();
    candidates.sort();
    for (used, name) in candidates {
        if evicted.len() >= MAX_PER_PASS || !over(store) {
            break;
        }
        match store.image(scope, &name) {
            Ok(now) if mirrored(&now.labels) && recency(&now.labels) == used => {}
            // Asked for meanwhile, pushed over, or deleted: not this one.
            Ok(_) => continue,
            Err(e) if e.is(crate::error::Kind::NotFound) => continue,
            Err(e) => return Err(e),
        }
        match store.delete_image(scope, &name) {
            Ok(()) => {}
            Err(e) if e.is(crate::error::Kind::NotFound) => continue,
            Err(e) => return Err(e),
        }
        let swept = store.evict()?;
        tracing::warn!(
            image = %name,
            used,
            swept_bytes = swept.bytes_swept,
            namespace_bytes = store.usage_of(scope),
            "evicted a mirrored image (least recently used)"
        );
        evicted.push(name);
    }
    Ok(evicted)
}

/// A record the mirror made and may evict: checked upstream, never pushed.
fn mirrored(labels: &std::collections::HashMap<String, String>) -> bool {
    labels.contains_key(CHECKED_LABEL) && !labels.contains_key(ORIGIN_LABEL)
}
