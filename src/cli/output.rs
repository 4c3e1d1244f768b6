//! Human output (aligned tables, sizes, trees) and JSON output for the CLI.

use std::collections::HashMap;

use crate::api::pb::contentd::v1 as gpb;

pub fn json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialise")
    );
}

pub fn ts(t: &prost_types::Timestamp) -> String {
    let secs = t.seconds;
    let date = crate::upstream::pull::rfc3339(secs);
    if t.nanos == 0 {
        date
    } else {
        format!("{}.{:03}Z", date.trim_end_matches('Z'), t.nanos / 1_000_000)
    }
}

pub fn human_size(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The informative part of a media type: "oci.image.manifest.v1", "docker…rootfs.diff.tar.gzip".
pub fn short_type(mt: &str) -> String {
    mt.strip_prefix("application/vnd.")
        .map(|s| s.trim_end_matches("+json").to_string())
        .unwrap_or_else(|| mt.to_string())
}

/// Columns padded to the widest cell; the last column is not padded.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }
    pub fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }
    pub fn print(&self) {
        let n = self.rows[0].len();
        let widths: Vec<usize> = (0..n)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in &self.rows {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i + 1 == n {
                    line.push_str(c);
                } else {
                    line.push_str(&format!("{c:<w$}  ", w = widths[i]));
                }
            }
            println!("{}", line.trim_end());
        }
    }
}

/// Prints a Walk as a tree from `root`, each node with its size and presence.
pub fn tree(w: &gpb::WalkResponse, root: &str, media_type: &str, size: i64) {
    let present: HashMap<&str, bool> = w
        .nodes
        .iter()
        .map(|n| (n.digest.as_str(), n.present))
        .collect();
    let mut children: HashMap<&str, Vec<&gpb::Edge>> = HashMap::new();
    for e in &w.edges {
        children.entry(e.from.as_str()).or_default().push(e);
    }
    fn line(
        digest: &str,
        role: &str,
        mt: &str,
        size: i64,
        present: bool,
        platform: &str,
    ) -> String {
        let mut s = String::new();
        if !role.is_empty() {
            s.push_str(role);
            s.push_str(": ");
        }
        s.push_str(&format!("{digest} {} {}", human_size(size), short_type(mt)));
        if !platform.is_empty() {
            s.push_str(&format!(" [{platform}]"));
        }
        if !present {
            s.push_str(" (not stored)");
        }
        s
    }
    println!(
        "{}",
        line(
            root,
            "",
            media_type,
            size,
            present.get(root).copied().unwrap_or(false),
            ""
        )
    );
    fn walk(
        at: &str,
        prefix: String,
        children: &HashMap<&str, Vec<&gpb::Edge>>,
        present: &HashMap<&str, bool>,
        depth: usize,
    ) {
        let Some(kids) = children.get(at) else { return };
        for (i, e) in kids.iter().enumerate() {
            let last = i + 1 == kids.len();
            println!(
                "{prefix}{}{}",
                if last { "└─ " } else { "├─ " },
                line(
                    &e.to,
                    &e.role,
                    &e.media_type,
                    e.size,
                    present.get(e.to.as_str()).copied().unwrap_or(false),
                    &e.platform
                )
            );
            if depth < 8 && e.role != "subject" {
                walk(
                    &e.to,
                    format!("{prefix}{}", if last { "   " } else { "│  " }),
                    children,
                    present,
                    depth + 1,
                );
            }
        }
    }
    walk(root, String::new(), &children, &present, 0);
}
