//! Graph queries over the descriptor graph recorded at commit: a blob's children and
//! parents (referrers), a walk from a root, and the edge writes commit makes.

use prost::Message as _;

use super::*;

impl Store {
    /// Whether `scope` can see `d`, without creating a hold.
    pub fn visible(&self, scope: &Scope, d: &Digest) -> Result<bool> {
        Ok(self.visible_size(scope, d)?.is_some())
    }

    /// The size of `d` if `scope` can see it, without creating a hold.
    pub fn visible_size(&self, scope: &Scope, d: &Digest) -> Result<Option<i64>> {
        if let Some(link) = self.link(scope, d)? {
            return Ok(Some(link.size));
        }
        if !scope.is_tenant() {
            return Ok(None);
        }
        Ok(self.blob(d)?.map(|b| b.size))
    }

    /// A committed blob's own media type as classified at commit ("" for opaque blobs), and
    /// its size.
    pub fn blob_media_type(&self, d: &Digest) -> Result<Option<(String, i64)>> {
        Ok(self.blob(d)?.map(|b| (b.media_type, b.size)))
    }

    /// Size of a committed blob.
    pub fn info_size(&self, d: &Digest) -> Result<i64> {
        Ok(self.blob(d)?.ok_or_else(|| Self::not_found(d))?.size)
    }

    /// Whether any outgoing edge of `d` is recorded.
    pub(super) fn has_edges(&self, d: &Digest) -> Result<bool> {
        let dk = d.key();
        let mut any = false;
        self.kv
            .scan(Cf::Edges, &dk, &prefix_end(&dk), &mut |_, _| {
                any = true;
                false
            })?;
        Ok(any)
    }

    /// A committed blob's bytes when they may be a document worth classifying (small enough,
    /// starting like a JSON object).
    pub(super) fn stored_document(&self, d: &Digest) -> Result<Option<Vec<u8>>> {
        let Some(blob) = self.blob(d)? else {
            return Ok(None);
        };
        if blob.size <= 0 || blob.size as usize > self.max_document {
            return Ok(None);
        }
        let first = self.read_extent(blob.extent, 0, 1)?;
        if !matches!(first.first(), Some(b'{' | b' ' | b'\n' | b'\r' | b'\t')) {
            return Ok(None);
        }
        let mut doc = Vec::with_capacity(blob.size as usize);
        self.read_range(blob.extent, 0, blob.size as u64, |c| {
            doc.extend_from_slice(&c);
            Ok(())
        })?;
        Ok(Some(doc))
    }

    /// A committed blob's outgoing edges, in document order (config, layers / manifests, subject).
    pub fn children(&self, d: &Digest) -> Result<Vec<GraphEdge>> {
        let dk = d.key();
        let mut out = Vec::new();
        let mut err = None;
        self.kv
            .scan(Cf::Edges, &dk, &prefix_end(&dk), &mut |k, v| {
                let parsed = keys::split_edge_rest(&k[dk.len()..]);
                match (parsed, EdgeRecord::decode(v)) {
                    (Some((role, index, to)), Ok(rec)) => out.push(GraphEdge {
                        from: d.clone(),
                        to,
                        role,
                        index,
                        rec,
                    }),
                    (_, r) => {
                        err = Some(corrupt_record("edges", k, r.err()));
                        return false;
                    }
                }
                true
            })?;
        err.map_or(Ok(out), Err)
    }

    /// Documents that point at `d` (`rec` describes the parent itself).
    pub fn parents(&self, d: &Digest) -> Result<Vec<GraphEdge>> {
        let dk = d.key();
        let mut out = Vec::new();
        self.kv
            .scan(Cf::Parents, &dk, &prefix_end(&dk), &mut |k, v| {
                if let (Some((from, rest)), Ok(rec)) =
                    (Digest::from_key(&k[dk.len()..]), EdgeRecord::decode(v))
                    && let Some(role) = rest.first().and_then(|c| Role::from_code(*c))
                {
                    {
                        out.push(GraphEdge {
                            from,
                            to: d.clone(),
                            role,
                            index: 0,
                            rec,
                        });
                    }
                }
                true
            })?;
        Ok(out)
    }

    /// The parents of `d` that `scope` can see.
    pub fn visible_parents(&self, scope: &Scope, d: &Digest) -> Result<Vec<GraphEdge>> {
        let mut out = Vec::new();
        for e in self.parents(d)? {
            if self.visible(scope, &e.from)? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Everything `root` keeps alive, as `scope` sees it: nodes with size and presence, and
    /// every edge met on the way (subject edges are listed but not followed).
    pub fn walk(&self, scope: &Scope, root: &Digest) -> Result<Walk> {
        const MAX_NODES: usize = 100_000;
        let blob = self
            .blob(root)?
            .filter(|_| self.visible(scope, root).unwrap_or(false));
        let blob = blob.ok_or_else(|| Self::not_found(root))?;
        let mut walk = Walk {
            nodes: vec![WalkNode {
                digest: root.clone(),
                media_type: blob.media_type,
                size: blob.size,
                present: true,
            }],
            edges: Vec::new(),
        };
        let mut seen = std::collections::HashSet::from([root.clone()]);
        let mut next = 0;
        while next < walk.nodes.len() {
            let node = walk.nodes[next].clone();
            next += 1;
            if !node.present {
                continue;
            }
            for e in self.children(&node.digest)? {
                if e.role.keeps_alive() && seen.insert(e.to.clone()) {
                    if walk.nodes.len() >= MAX_NODES {
                        return Err(Error::new(
                            Kind::ResourceExhausted,
                            format!("graph under {root} has more than {MAX_NODES} nodes"),
                        ));
                    }
                    walk.nodes.push(WalkNode {
                        digest: e.to.clone(),
                        media_type: e.rec.media_type.clone(),
                        size: e.rec.size,
                        present: self.visible(scope, &e.to)?,
                    });
                }
                walk.edges.push(e);
            }
        }
        Ok(walk)
    }
}

/// Queues a committed document's outgoing edges and their reverse index.
pub(super) fn put_edges(b: &mut Batch, parent: &Digest, p: &graph::Parsed) {
    let me = EdgeRecord {
        media_type: p.media_type.clone().unwrap_or_default(),
        size: 0,
        artifact_type: p.artifact_type.clone().unwrap_or_default(),
        platform: String::new(),
        urls: Vec::new(),
    };
    for e in &p.edges {
        let rec = EdgeRecord {
            media_type: e.media_type.clone(),
            size: e.size,
            artifact_type: e.artifact_type.clone().unwrap_or_default(),
            platform: e.platform.clone().unwrap_or_default(),
            urls: e.urls.clone(),
        };
        b.put(
            Cf::Edges,
            edge_key(parent, e.role, e.index, &e.digest),
            rec.encode_to_vec(),
        );
        b.put(
            Cf::Parents,
            parent_key(&e.digest, parent, e.role),
            me.encode_to_vec(),
        );
    }
}
