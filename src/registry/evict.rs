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
pub fn evict_lru(
    store: &Store,
    scope: &Scope,
    mut over: impl FnMut(&Store) -> bool,
) -> Result<Vec<String>> {
    let mut evicted = Vec::new();
    while evicted.len() < MAX_PER_PASS && over(store) {
        let images = store.list_images(scope, &crate::filter::Filter::parse_all::<&str>(&[])?)?;
        let Some(victim) = images
            .into_iter()
            .filter(|i| {
                i.labels.contains_key(CHECKED_LABEL) && !i.labels.contains_key(ORIGIN_LABEL)
            })
            .min_by_key(|i| (recency(&i.labels), i.name.clone()))
        else {
            break;
        };
        match store.delete_image(scope, &victim.name) {
            Ok(()) => {}
            // Deleted meanwhile (a client's DELETE): look again.
            Err(e) if e.is(crate::error::Kind::NotFound) => continue,
            Err(e) => return Err(e),
        }
        let swept = store.evict()?;
        tracing::warn!(
            image = %victim.name,
            used = recency(&victim.labels),
            swept_bytes = swept.bytes_swept,
            namespace_bytes = store.usage_of(scope),
            "evicted a mirrored image (least recently used)"
        );
        evicted.push(victim.name);
    }
    Ok(evicted)
}
