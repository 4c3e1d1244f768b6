//! Images in and out: OCI image layout directories, oci-archive tarballs and docker-archive
//! tarballs (`docker save`). Every imported byte goes through the daemon's verified write
//! path (Blobs.Put with the digest the archive names, or a Write whose commit is checked
//! against the digest computed while streaming); an export writes exactly the stored bytes.
//!
//! Archives are read by a plain thread (the tar reader is synchronous) that hands each blob
//! to the async side through bounded channels, so memory stays a few chunks per blob
//! whatever the archive's size; exports run the same bridge the other way.

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use super::{CliError, Ctx, R, output};
use crate::api::pb::containerd::services::content::v1 as cpb;
use crate::api::pb::containerd::services::images::v1 as ipb;
use crate::api::pb::containerd::types::Descriptor;
use crate::api::pb::contentd::v1 as gpb;
use crate::digest::{Algorithm, Digest};

const CHUNK: usize = 1 << 20;
/// Largest index.json / manifest.json / oci-layout read from an archive.
const MAX_META: u64 = 4 << 20;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const IMAGE_NAME: &str = "io.containerd.image.name";

fn corrupt(path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::bad(format!("{} is truncated or not a valid archive: {e}", path.display()))
        .hint("check the file (e.g. `tar tf`); re-create it with `contentd export`, `skopeo copy` or `docker save`")
}

/// How a copy into a channel ended.
enum Pumped {
    /// The reader reached its end.
    Done,
    /// The receiver went away (the daemon already had the blob and stopped reading).
    Dropped,
    /// The reader failed; the error was sent on.
    Failed,
}

/// Copies `reader` into `tx` in chunks (from a plain thread: the sends block).
fn pump(reader: &mut impl std::io::Read, tx: &mpsc::Sender<std::io::Result<Bytes>>) -> Pumped {
    loop {
        let mut buf = vec![0u8; CHUNK];
        match reader.read(&mut buf) {
            Ok(0) => return Pumped::Done,
            Ok(n) => {
                buf.truncate(n);
                if tx.blocking_send(Ok(buf.into())).is_err() {
                    return Pumped::Dropped;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return Pumped::Failed;
            }
        }
    }
}

/// Streams `file` from `offset` as blob `digest` through Blobs.Put. Returns whether it was
/// created (false: the namespace already had it).
#[allow(clippy::too_many_arguments)]
pub(super) async fn put_file(
    cx: &Ctx,
    lease: Option<&str>,
    mut file: std::fs::File,
    digest: &Digest,
    size: u64,
    offset: i64,
    media_type: Option<String>,
    labels: HashMap<String, String>,
    r: &str,
) -> R<bool> {
    use std::io::Seek as _;
    file.seek(std::io::SeekFrom::Start(offset as u64))?;
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    std::thread::spawn(move || {
        pump(&mut file, &tx);
    });
    let bar = cx.bar(size, "pushing");
    bar.set_position(offset as u64);
    let r = put_chunks(
        cx, lease, rx, digest, size, offset, media_type, labels, r, &bar,
    )
    .await;
    bar.finish_and_clear();
    r
}

#[allow(clippy::too_many_arguments)]
async fn put_chunks(
    cx: &Ctx,
    lease: Option<&str>,
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    digest: &Digest,
    size: u64,
    offset: i64,
    media_type: Option<String>,
    labels: HashMap<String, String>,
    r: &str,
    bar: &indicatif::ProgressBar,
) -> R<bool> {
    let failed = std::sync::Arc::new(parking_lot::Mutex::new(None));
    let f2 = failed.clone();
    let mut first = Some(gpb::PutRequest {
        digest: digest.to_string(),
        size: size as i64,
        media_type: media_type.unwrap_or_default(),
        labels,
        r#ref: r.to_string(),
        offset,
        data: Bytes::new(),
    });
    let bar2 = bar.clone();
    let body = ReceiverStream::new(rx).map_while(move |c| match c {
        Ok(data) => {
            bar2.inc(data.len() as u64);
            Some(match first.take() {
                Some(mut m) => {
                    m.data = data;
                    m
                }
                None => gpb::PutRequest {
                    data,
                    ..Default::default()
                },
            })
        }
        Err(e) => {
            *f2.lock() = Some(e);
            None
        }
    });
    // An empty blob still needs its first message.
    let body = if size as i64 == offset {
        let m = gpb::PutRequest {
            digest: digest.to_string(),
            size: size as i64,
            r#ref: r.to_string(),
            offset,
            ..Default::default()
        };
        Box::pin(tokio_stream::iter(vec![m]))
            as std::pin::Pin<Box<dyn tokio_stream::Stream<Item = gpb::PutRequest> + Send>>
    } else {
        Box::pin(body)
    };
    let resp = cx.blobs_leased(lease)?.put(body).await;
    if let Some(e) = failed.lock().take() {
        return Err(CliError::new(
            1,
            format!("reading the data for {digest}: {e}"),
        ));
    }
    match resp {
        Ok(r) => Ok(r.into_inner().created),
        Err(s) if s.code() == tonic::Code::FailedPrecondition && s.message().contains("digest") => {
            Err(CliError::new(
                5,
                format!(
                    "the bytes given for {digest} do not match it: {}",
                    s.message()
                ),
            ))
        }
        Err(s) => Err(s.into()),
    }
}

/// Streams bytes of unknown digest through content.v1 Write, hashing them on the way, and
/// commits against the digest computed (the daemon checks it). Returns (digest, size,
/// created).
pub(super) async fn upload_stream(
    cx: &Ctx,
    lease: Option<&str>,
    mut reader: impl std::io::Read + Send + 'static,
    labels: HashMap<String, String>,
    prefix: &str,
) -> R<(Digest, i64, bool)> {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    std::thread::spawn(move || {
        pump(&mut reader, &tx);
    });
    write_chunks(
        cx,
        lease,
        rx,
        labels,
        prefix,
        &indicatif::ProgressBar::hidden(),
    )
    .await
}

async fn write_chunks(
    cx: &Ctx,
    lease: Option<&str>,
    mut rx: mpsc::Receiver<std::io::Result<Bytes>>,
    labels: HashMap<String, String>,
    prefix: &str,
    bar: &indicatif::ProgressBar,
) -> R<(Digest, i64, bool)> {
    let r = format!("{prefix}-{}-{}", std::process::id(), crate::store::now_ns());
    let (mtx, mrx) = mpsc::channel::<cpb::WriteContentRequest>(4);
    let mut client = match lease {
        Some(l) => cx.content_leased(l)?,
        None => cx.content(),
    };
    mtx.send(cpb::WriteContentRequest {
        action: cpb::WriteAction::Stat as i32,
        r#ref: r.clone(),
        ..Default::default()
    })
    .await
    .map_err(|_| CliError::new(1, "write stream closed"))?;
    let mut resp = client.write(ReceiverStream::new(mrx)).await?.into_inner();
    resp.next().await.transpose()?;
    let mut h = Algorithm::Sha256.hasher();
    let mut offset = 0i64;
    while let Some(c) = rx.recv().await {
        let data = c.map_err(|e| CliError::new(1, format!("reading the data: {e}")))?;
        h.update(&data);
        let n = data.len() as i64;
        bar.inc(n as u64);
        mtx.send(cpb::WriteContentRequest {
            action: cpb::WriteAction::Write as i32,
            offset,
            data,
            ..Default::default()
        })
        .await
        .map_err(|_| CliError::new(1, "write stream closed"))?;
        offset += n;
        resp.next().await.transpose()?;
    }
    let d = h.digest();
    mtx.send(cpb::WriteContentRequest {
        action: cpb::WriteAction::Commit as i32,
        offset,
        total: offset,
        expected: d.to_string(),
        labels,
        ..Default::default()
    })
    .await
    .map_err(|_| CliError::new(1, "write stream closed"))?;
    match resp.next().await.transpose() {
        Ok(_) => Ok((d, offset, true)),
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            let _ = client.abort(cpb::AbortRequest { r#ref: r }).await;
            Ok((d, offset, false))
        }
        Err(s) => Err(s.into()),
    }
}

// ---- import -----------------------------------------------------------------------------

/// One file of an archive or layout the importer wants.
struct Job {
    name: String,
    size: u64,
    chunks: mpsc::Receiver<std::io::Result<Bytes>>,
}

/// What pass 1 learns about an archive.
#[derive(Default)]
struct Meta {
    index: Option<Vec<u8>>,
    layout: bool,
    docker_manifest: Option<Vec<u8>>,
    symlinks: HashMap<String, String>,
}

fn norm(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

fn blob_name(p: &str) -> Option<Digest> {
    let p = norm(p);
    let rest = p.strip_prefix("blobs/")?;
    let (alg, hex) = rest.split_once('/')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

fn read_meta_tar(path: &Path) -> R<Meta> {
    let f = std::fs::File::open(path)
        .map_err(|e| CliError::bad(format!("cannot open {}: {e}", path.display())))?;
    let mut a = tar::Archive::new(f);
    let mut m = Meta::default();
    let mut entries = 0;
    for e in a.entries().map_err(|e| corrupt(path, e))? {
        let mut e = e.map_err(|e| corrupt(path, e))?;
        entries += 1;
        let p = norm(&e.path().map_err(|e| corrupt(path, e))?.to_string_lossy());
        if e.header().entry_type().is_symlink() {
            if let Ok(Some(t)) = e.link_name() {
                let dir = p.rsplit_once('/').map(|x| x.0).unwrap_or("");
                m.symlinks
                    .insert(p.clone(), norm(&format!("{dir}/{}", t.to_string_lossy())));
            }
            continue;
        }
        let small = |e: &mut tar::Entry<std::fs::File>| -> R<Vec<u8>> {
            if e.size() > MAX_META {
                return Err(CliError::bad(format!(
                    "{p} in {} is larger than {MAX_META} bytes",
                    path.display()
                )));
            }
            let mut v = Vec::new();
            e.read_to_end(&mut v).map_err(|x| corrupt(path, x))?;
            Ok(v)
        };
        match p.as_str() {
            "index.json" => m.index = Some(small(&mut e)?),
            "manifest.json" => m.docker_manifest = Some(small(&mut e)?),
            "oci-layout" => m.layout = true,
            _ => {
                // Reading every entry to its end is what finds a truncated archive in pass 1.
                std::io::copy(&mut e, &mut std::io::sink()).map_err(|x| corrupt(path, x))?;
            }
        }
    }
    if entries == 0 {
        return Err(corrupt(path, "no entries"));
    }
    Ok(m)
}

/// Pass 2 in a thread: hands every wanted file to the async side.
fn feed_tar(path: PathBuf, wanted: HashSet<String>, jobs: mpsc::Sender<R<Job>>) {
    let run = || -> R<()> {
        let f = std::fs::File::open(&path)?;
        let mut a = tar::Archive::new(f);
        for e in a.entries().map_err(|e| corrupt(&path, e))? {
            let mut e = e.map_err(|e| corrupt(&path, e))?;
            if !e.header().entry_type().is_file() {
                continue;
            }
            let p = norm(&e.path().map_err(|e| corrupt(&path, e))?.to_string_lossy());
            if !wanted.contains(&p) {
                continue;
            }
            let (tx, rx) = mpsc::channel(4);
            if jobs
                .blocking_send(Ok(Job {
                    name: p,
                    size: e.size(),
                    chunks: rx,
                }))
                .is_err()
            {
                return Ok(());
            }
            // Dropped: the daemon already had the blob; go on with the next entry.
            if let Pumped::Failed = pump(&mut e, &tx) {
                return Ok(());
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        let _ = jobs.blocking_send(Err(e));
    }
}

fn feed_dir(root: PathBuf, wanted: Vec<String>, jobs: mpsc::Sender<R<Job>>) {
    for p in wanted {
        let full = root.join(&p);
        let f = match std::fs::File::open(&full) {
            Ok(f) => f,
            Err(e) => {
                let _ = jobs.blocking_send(Err(CliError::bad(format!("{}: {e}", full.display()))));
                return;
            }
        };
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        let (tx, rx) = mpsc::channel(4);
        if jobs
            .blocking_send(Ok(Job {
                name: p,
                size,
                chunks: rx,
            }))
            .is_err()
        {
            return;
        }
        let mut f = f;
        if let Pumped::Failed = pump(&mut f, &tx) {
            return;
        }
    }
}

fn list_blobs_dir(root: &Path) -> R<Vec<String>> {
    let mut out = Vec::new();
    let blobs = root.join("blobs");
    for alg in
        std::fs::read_dir(&blobs).map_err(|e| CliError::bad(format!("{}: {e}", blobs.display())))?
    {
        let alg = alg?;
        if !alg.file_type()?.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(alg.path())? {
            let f = f?;
            if f.file_type()?.is_file() {
                out.push(format!(
                    "blobs/{}/{}",
                    alg.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[derive(serde::Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// An image name for an index entry: containerd's full-name annotation, else the ref name
/// (a full name as is, a bare tag under `base`).
fn entry_name(d: &serde_json::Value, base: Option<&str>) -> Option<String> {
    let ann = d.get("annotations");
    if let Some(n) = ann.and_then(|a| a.get(IMAGE_NAME)).and_then(|v| v.as_str()) {
        return Some(n.to_string());
    }
    let r = ann.and_then(|a| a.get(REF_NAME)).and_then(|v| v.as_str())?;
    if r.contains('/') {
        return Some(r.to_string());
    }
    Some(match base {
        Some(b) => format!("{b}:{r}"),
        None => r.to_string(),
    })
}

pub(super) async fn import(cx: &Ctx, path: &Path, base: Option<&str>) -> R<()> {
    let is_dir = path.is_dir();
    let meta = if is_dir {
        let index = std::fs::read(path.join("index.json")).map_err(|e| {
            CliError::bad(format!(
                "{}: not an OCI image layout: index.json: {e}",
                path.display()
            ))
        })?;
        Meta {
            index: Some(index),
            layout: path.join("oci-layout").exists(),
            ..Default::default()
        }
    } else {
        let p = path.to_path_buf();
        tokio::task::spawn_blocking(move || read_meta_tar(&p))
            .await
            .map_err(|e| CliError::new(1, e.to_string()))??
    };

    // What to upload, and how images are named afterwards.
    let mut docker: Vec<DockerEntry> = Vec::new();
    let index: Option<serde_json::Value> = match &meta.index {
        Some(b) => {
            Some(serde_json::from_slice(b).map_err(|e| corrupt(path, format!("index.json: {e}")))?)
        }
        None => None,
    };
    let wanted: Vec<String> = if index.is_some() {
        if is_dir {
            list_blobs_dir(path)?
        } else {
            Vec::new() // every blobs/ entry, decided while reading
        }
    } else if let Some(m) = &meta.docker_manifest {
        docker =
            serde_json::from_slice(m).map_err(|e| corrupt(path, format!("manifest.json: {e}")))?;
        let resolve = |p: &str| {
            let p = norm(p);
            meta.symlinks.get(&p).cloned().unwrap_or(p)
        };
        docker
            .iter()
            .flat_map(|e| {
                std::iter::once(resolve(&e.config)).chain(e.layers.iter().map(|l| resolve(l)))
            })
            .collect()
    } else {
        return Err(CliError::bad(format!(
            "{} has neither index.json (OCI) nor manifest.json (docker-archive)",
            path.display()
        )));
    };

    let lease = cx.temp_lease("import").await?;
    let r = import_blobs(cx, path, is_dir, index.is_some(), &wanted, &lease).await;
    let result = match r {
        Ok(uploaded) => {
            name_images(
                cx,
                path,
                base,
                index.as_ref(),
                &docker,
                &meta,
                &uploaded,
                &lease,
            )
            .await
        }
        Err(e) => Err(e),
    };
    let _ = cx
        .leases()
        .delete(
            crate::api::pb::containerd::services::leases::v1::DeleteRequest {
                id: lease,
                sync: false,
            },
        )
        .await;
    let (images, blobs, bytes) = result?;
    if cx.conn.json {
        output::json(&serde_json::json!({
            "images": images.iter().map(|(n, d, mt)| serde_json::json!({"name": n, "digest": d, "mediaType": mt})).collect::<Vec<_>>(),
            "blobs": blobs, "bytes": bytes,
        }));
    } else {
        for (n, d, _) in &images {
            println!("{n} {d}");
        }
        eprintln!(
            "imported {} images, {blobs} blobs ({})",
            images.len(),
            output::human_size(bytes)
        );
    }
    Ok(())
}

/// Uploads every wanted file; returns file path → (digest, size, first bytes).
#[allow(clippy::too_many_arguments)]
async fn import_blobs(
    cx: &Ctx,
    path: &Path,
    is_dir: bool,
    oci: bool,
    wanted: &[String],
    lease: &str,
) -> R<HashMap<String, (Digest, i64, bool)>> {
    let (jtx, mut jrx) = mpsc::channel::<R<Job>>(1);
    let p = path.to_path_buf();
    if is_dir {
        let w = wanted.to_vec();
        std::thread::spawn(move || feed_dir(p, w, jtx));
    } else {
        let w: HashSet<String> = if oci {
            HashSet::new()
        } else {
            wanted.iter().cloned().collect()
        };
        let all_blobs = oci;
        std::thread::spawn(move || {
            if all_blobs {
                feed_tar_blobs(p, jtx)
            } else {
                feed_tar(p, w, jtx)
            }
        });
    }
    let total: u64 = std::fs::metadata(path)
        .map(|m| if is_dir { 0 } else { m.len() })
        .unwrap_or(0);
    let bar = cx.bar(total, "importing");
    let mut out = HashMap::new();
    while let Some(job) = jrx.recv().await {
        let job = job?;
        let name = job.name.clone();
        let mut chunks = job.chunks;
        // Peek the first chunk: docker layers are typed by their compression.
        let first = chunks
            .recv()
            .await
            .transpose()
            .map_err(|e| corrupt(path, e))?;
        let gzip = first.as_ref().is_some_and(|b| b.starts_with(&[0x1f, 0x8b]));
        let (tx, rx) = mpsc::channel(4);
        if let Some(f) = first {
            tx.send(Ok(f)).await.ok();
        }
        tokio::spawn(async move {
            while let Some(c) = chunks.recv().await {
                if tx.send(c).await.is_err() {
                    return;
                }
            }
        });
        let r = match blob_name(&name).filter(|_| oci) {
            Some(d) => {
                let created = put_chunks(
                    cx,
                    Some(lease),
                    rx,
                    &d,
                    job.size,
                    0,
                    None,
                    HashMap::new(),
                    &format!("import-{d}"),
                    &bar,
                )
                .await
                .map_err(|e| {
                    if e.code == 5 {
                        CliError::new(5, format!("{name} in {}: {}", path.display(), e.message))
                            .hint("the archive is corrupt; re-create it")
                    } else {
                        e
                    }
                })?;
                (d, job.size as i64, created)
            }
            None => write_chunks(cx, Some(lease), rx, HashMap::new(), "import", &bar).await?,
        };
        if r.1 != job.size as i64 {
            return Err(corrupt(
                path,
                format!("{name}: {} of {} bytes", r.1, job.size),
            ));
        }
        out.insert(name, (r.0, r.1, gzip));
    }
    bar.finish_and_clear();
    if !oci {
        for w in wanted {
            if !out.contains_key(w) {
                return Err(corrupt(
                    path,
                    format!("{w} is listed in manifest.json but missing"),
                ));
            }
        }
    }
    Ok(out)
}

fn feed_tar_blobs(path: PathBuf, jobs: mpsc::Sender<R<Job>>) {
    // Every regular file under blobs/ is wanted.
    let run = || -> R<HashSet<String>> {
        let f = std::fs::File::open(&path)?;
        let mut a = tar::Archive::new(f);
        let mut names = HashSet::new();
        for e in a.entries().map_err(|e| corrupt(&path, e))? {
            let e = e.map_err(|e| corrupt(&path, e))?;
            let p = norm(&e.path().map_err(|e| corrupt(&path, e))?.to_string_lossy());
            if e.header().entry_type().is_file() && blob_name(&p).is_some() {
                names.insert(p);
            }
        }
        Ok(names)
    };
    match run() {
        Ok(names) => feed_tar(path, names, jobs),
        Err(e) => {
            let _ = jobs.blocking_send(Err(e));
        }
    }
}

type Named = Vec<(String, String, String)>;

#[allow(clippy::too_many_arguments)]
async fn name_images(
    cx: &Ctx,
    path: &Path,
    base: Option<&str>,
    index: Option<&serde_json::Value>,
    docker: &[DockerEntry],
    meta: &Meta,
    uploaded: &HashMap<String, (Digest, i64, bool)>,
    lease: &str,
) -> R<(Named, usize, i64)> {
    let mut images: Named = Vec::new();
    if let Some(ix) = index {
        let entries = ix
            .get("manifests")
            .and_then(|m| m.as_array())
            .ok_or_else(|| corrupt(path, "index.json has no manifests"))?;
        for d in entries {
            let digest = d.get("digest").and_then(|v| v.as_str()).unwrap_or_default();
            let mt = d
                .get("mediaType")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            let size = d.get("size").and_then(|v| v.as_i64()).unwrap_or(0);
            let Some(name) = entry_name(d, base) else {
                eprintln!(
                    "warning: {digest} has no name in index.json; stored, but no image is created (use --base-name)"
                );
                continue;
            };
            set_image(cx, &name, mt, digest, size).await?;
            images.push((name, digest.to_string(), mt.to_string()));
        }
    } else {
        let resolve = |p: &str| {
            let p = norm(p);
            meta.symlinks.get(&p).cloned().unwrap_or(p)
        };
        for e in docker {
            let (cd, cs, _) = &uploaded[&resolve(&e.config)];
            // The Docker schema2 manifest a docker-archive lacks, written with the field
            // order containerd's importer uses (so both name the image by the same digest).
            let desc = |mt: &str, d: &Digest, s: i64| {
                format!(r#"{{"mediaType":"{mt}","digest":"{d}","size":{s}}}"#)
            };
            let bytes = format!(
                r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{},"layers":[{}]}}"#,
                desc(DOCKER_CONFIG, cd, *cs),
                e.layers
                    .iter()
                    .map(|l| {
                        let (d, s, gz) = &uploaded[&resolve(l)];
                        desc(if *gz { DOCKER_LAYER_GZIP } else { DOCKER_LAYER }, d, *s)
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            )
            .into_bytes();
            let md = Digest::of(Algorithm::Sha256, &bytes);
            let (tx, rx) = mpsc::channel(1);
            tx.send(Ok(Bytes::from(bytes.clone()))).await.ok();
            drop(tx);
            put_chunks(
                cx,
                Some(lease),
                rx,
                &md,
                bytes.len() as u64,
                0,
                Some(DOCKER_MANIFEST.into()),
                HashMap::new(),
                &format!("import-{md}"),
                &indicatif::ProgressBar::hidden(),
            )
            .await?;
            let names: Vec<String> = match (&e.repo_tags, base) {
                (Some(t), _) if !t.is_empty() => t.clone(),
                (_, Some(b)) => vec![b.to_string()],
                _ => {
                    eprintln!(
                        "warning: an image in manifest.json has no RepoTags; stored as {md}, no image created (use --base-name)"
                    );
                    vec![]
                }
            };
            for n in names {
                set_image(cx, &n, DOCKER_MANIFEST, &md.to_string(), bytes.len() as i64).await?;
                images.push((n, md.to_string(), DOCKER_MANIFEST.into()));
            }
        }
    }
    let bytes = uploaded.values().map(|v| v.1).sum();
    Ok((images, uploaded.len(), bytes))
}

async fn set_image(cx: &Ctx, name: &str, mt: &str, digest: &str, size: i64) -> R<()> {
    let img = ipb::Image {
        name: name.to_string(),
        target: Some(Descriptor {
            media_type: mt.to_string(),
            digest: digest.to_string(),
            size,
            annotations: HashMap::new(),
        }),
        ..Default::default()
    };
    match cx
        .images()
        .create(ipb::CreateImageRequest {
            image: Some(img.clone()),
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            cx.images()
                .update(ipb::UpdateImageRequest {
                    image: Some(img),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                })
                .await?;
            Ok(())
        }
        Err(s) => Err(s.into()),
    }
}

// ---- export -----------------------------------------------------------------------------

/// Where exported files go.
enum Sink {
    Dir(PathBuf),
    /// A tar written by a thread from (path, size, chunks) entries.
    Tar {
        entries: mpsc::Sender<(String, u64, mpsc::Receiver<std::io::Result<Bytes>>)>,
        done: std::thread::JoinHandle<std::io::Result<()>>,
    },
}

struct ChanReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl std::io::Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

impl Sink {
    fn tar(out: &Path) -> R<Sink> {
        let w: Box<dyn std::io::Write + Send> = if out.as_os_str() == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::File::create(out)
                    .map_err(|e| CliError::bad(format!("cannot create {}: {e}", out.display())))?,
            )
        };
        let (tx, mut rx) =
            mpsc::channel::<(String, u64, mpsc::Receiver<std::io::Result<Bytes>>)>(1);
        let done = std::thread::spawn(move || {
            let mut b = tar::Builder::new(w);
            while let Some((p, size, chunks)) = rx.blocking_recv() {
                let mut h = tar::Header::new_ustar();
                h.set_size(size);
                h.set_mode(0o644);
                h.set_mtime(0);
                h.set_uid(0);
                h.set_gid(0);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(
                    &mut h,
                    &p,
                    ChanReader {
                        rx: chunks,
                        cur: Bytes::new(),
                    },
                )?;
            }
            b.into_inner()?.flush()
        });
        Ok(Sink::Tar { entries: tx, done })
    }

    async fn file(&self, p: &str, data: Vec<u8>) -> R<()> {
        match self {
            Sink::Dir(root) => {
                let full = root.join(p);
                if let Some(d) = full.parent() {
                    std::fs::create_dir_all(d)?;
                }
                std::fs::write(full, data)?;
                Ok(())
            }
            Sink::Tar { entries, .. } => {
                let (tx, rx) = mpsc::channel(1);
                tx.send(Ok(Bytes::from(data.clone()))).await.ok();
                drop(tx);
                entries
                    .send((p.to_string(), data.len() as u64, rx))
                    .await
                    .map_err(|_| CliError::new(1, "the archive writer stopped"))
            }
        }
    }

    /// Copies a stored blob into the output, exactly as stored.
    async fn blob(
        &self,
        cx: &Ctx,
        p: &str,
        digest: &str,
        size: i64,
        bar: &indicatif::ProgressBar,
    ) -> R<()> {
        let mut s = cx
            .content()
            .read(cpb::ReadContentRequest {
                digest: digest.into(),
                offset: 0,
                size: 0,
            })
            .await?
            .into_inner();
        enum Out {
            File(tokio::fs::File),
            Entry(mpsc::Sender<std::io::Result<Bytes>>),
        }
        let stopped = || CliError::new(1, "the archive writer stopped");
        let mut out = match self {
            Sink::Dir(root) => {
                let full = root.join(p);
                if let Some(d) = full.parent() {
                    std::fs::create_dir_all(d)?;
                }
                Out::File(tokio::fs::File::create(&full).await?)
            }
            Sink::Tar { entries, .. } => {
                let (tx, rx) = mpsc::channel(4);
                entries
                    .send((p.to_string(), size as u64, rx))
                    .await
                    .map_err(|_| stopped())?;
                Out::Entry(tx)
            }
        };
        let mut n = 0i64;
        while let Some(m) = s.next().await {
            let data = m?.data;
            n += data.len() as i64;
            bar.inc(data.len() as u64);
            match &mut out {
                Out::File(f) => tokio::io::AsyncWriteExt::write_all(f, &data).await?,
                Out::Entry(tx) => tx.send(Ok(data)).await.map_err(|_| stopped())?,
            }
        }
        if n != size {
            if let Out::Entry(tx) = &out {
                // The tar header promised `size` bytes: fail the entry, not just this call.
                let _ = tx.send(Err(std::io::Error::other("short read"))).await;
            }
            return Err(CliError::new(
                5,
                format!("{digest}: read {n} bytes, expected {size}"),
            ));
        }
        if let Out::File(f) = &mut out {
            tokio::io::AsyncWriteExt::flush(f).await?;
        }
        Ok(())
    }

    fn finish(self) -> R<()> {
        match self {
            Sink::Dir(_) => Ok(()),
            Sink::Tar { entries, done } => {
                drop(entries);
                done.join()
                    .map_err(|_| CliError::new(1, "the archive writer panicked"))?
                    .map_err(|e| CliError::new(1, format!("writing the archive: {e}")))
            }
        }
    }
}

/// An export root: its name (if it is an image) and descriptor.
struct Root {
    name: Option<String>,
    media_type: String,
    digest: String,
    size: i64,
}

async fn resolve(cx: &Ctx, arg: &str) -> R<Root> {
    if let Ok(d) = Digest::parse(arg) {
        let w = cx
            .graph()
            .walk(gpb::DigestRequest {
                digest: d.to_string(),
            })
            .await?
            .into_inner();
        let n = w.nodes.first().cloned().unwrap_or_default();
        return Ok(Root {
            name: None,
            media_type: n.media_type,
            digest: n.digest,
            size: n.size,
        });
    }
    let img = cx
        .images()
        .get(ipb::GetImageRequest {
            name: arg.to_string(),
        })
        .await
        .map_err(|s| {
            let e: CliError = s.into();
            if e.code == 4 {
                CliError::new(4, format!("no image named {arg:?}"))
                    .hint("`contentd images ls` lists them; a digest works too")
            } else {
                e
            }
        })?
        .into_inner()
        .image
        .unwrap_or_default();
    let t = img.target.unwrap_or_default();
    Ok(Root {
        name: Some(img.name),
        media_type: t.media_type,
        digest: t.digest,
        size: t.size,
    })
}

async fn read_small(cx: &Ctx, digest: &str) -> R<Vec<u8>> {
    let mut s = cx
        .content()
        .read(cpb::ReadContentRequest {
            digest: digest.into(),
            offset: 0,
            size: 0,
        })
        .await?
        .into_inner();
    let mut v = Vec::new();
    while let Some(m) = s.next().await {
        v.extend_from_slice(&m?.data);
        if v.len() as u64 > MAX_META {
            return Err(CliError::bad(format!(
                "{digest} is too large to be a manifest"
            )));
        }
    }
    Ok(v)
}

fn blob_path(digest: &str) -> String {
    let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    format!("blobs/{alg}/{hex}")
}

pub(super) async fn export(
    cx: &Ctx,
    args: &[String],
    out: &Path,
    format: Option<&str>,
    platform: Option<&str>,
) -> R<()> {
    let format = match format {
        Some(f) => f.to_string(),
        None if out.as_os_str() == "-" || out.extension().is_some_and(|e| e == "tar") => {
            "oci-archive".into()
        }
        None => "oci".into(),
    };
    let mut roots = Vec::new();
    for a in args {
        roots.push(resolve(cx, a).await?);
    }
    match format.as_str() {
        "oci" | "oci-archive" => {
            // Every stored blob the roots reach.
            let mut blobs: Vec<(String, i64)> = Vec::new();
            let mut seen = HashSet::new();
            for r in &roots {
                let w = cx
                    .graph()
                    .walk(gpb::DigestRequest {
                        digest: r.digest.clone(),
                    })
                    .await?
                    .into_inner();
                for n in w.nodes {
                    if seen.insert(n.digest.clone()) {
                        if n.present {
                            blobs.push((n.digest, n.size));
                        } else if !cx.conn.json {
                            eprintln!(
                                "note: {} is not stored (a foreign layer?); not exported",
                                n.digest
                            );
                        }
                    }
                }
            }
            let sink = if format == "oci" {
                if out.exists() && std::fs::read_dir(out)?.next().is_some() {
                    return Err(CliError::bad(format!(
                        "{} exists and is not empty",
                        out.display()
                    )));
                }
                std::fs::create_dir_all(out)?;
                Sink::Dir(out.to_path_buf())
            } else {
                Sink::tar(out)?
            };
            sink.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec())
                .await?;
            let manifests: Vec<serde_json::Value> = roots
                .iter()
                .map(|r| {
                    let mut d = serde_json::json!({"mediaType": r.media_type, "digest": r.digest, "size": r.size});
                    if let Some(n) = &r.name {
                        // containerd reads the full name; OCI tools the tag-like ref name.
                        let tag = n.rsplit_once(':').filter(|(h, _)| !h.is_empty() && !n.ends_with(']')).map(|(_, t)| t).filter(|t| !t.contains('/')).unwrap_or(n);
                        d["annotations"] = serde_json::json!({IMAGE_NAME: n, REF_NAME: tag});
                    }
                    d
                })
                .collect();
            let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
            sink.file("index.json", serde_json::to_vec(&index).expect("JSON"))
                .await?;
            let total: i64 = blobs.iter().map(|b| b.1).sum();
            let bar = cx.bar(total as u64, "exporting");
            for (d, size) in &blobs {
                sink.blob(cx, &blob_path(d), d, *size, &bar).await?;
            }
            bar.finish_and_clear();
            sink.finish()?;
            report(cx, out, &format, roots.len(), blobs.len(), total);
            Ok(())
        }
        "docker-archive" => {
            let want = platform.unwrap_or("linux/amd64");
            let sink = Sink::tar(out)?;
            let mut entries = Vec::new();
            let mut written = HashSet::new();
            let mut count = 0usize;
            let mut total = 0i64;
            let bar = cx.bar(0, "exporting");
            for r in &roots {
                let mut digest = r.digest.clone();
                let mut doc: serde_json::Value =
                    serde_json::from_slice(&read_small(cx, &digest).await?)
                        .map_err(|e| CliError::bad(format!("{digest} is not a manifest: {e}")))?;
                if let Some(list) = doc.get("manifests").and_then(|m| m.as_array()) {
                    let pick = list
                        .iter()
                        .find(|m| {
                            let p = m.get("platform");
                            let os = p
                                .and_then(|p| p.get("os"))
                                .and_then(|v| v.as_str())
                                .unwrap_or("");
                            let arch = p
                                .and_then(|p| p.get("architecture"))
                                .and_then(|v| v.as_str())
                                .unwrap_or("");
                            let var = p.and_then(|p| p.get("variant")).and_then(|v| v.as_str());
                            let have = match var {
                                Some(v) => format!("{os}/{arch}/{v}"),
                                None => format!("{os}/{arch}"),
                            };
                            have == want || have.starts_with(&format!("{want}/"))
                        })
                        .ok_or_else(|| {
                            CliError::bad(format!(
                                "{} has no {want} image; pick one with --platform",
                                r.name.clone().unwrap_or(digest.clone())
                            ))
                        })?;
                    digest = pick
                        .get("digest")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string();
                    doc = serde_json::from_slice(&read_small(cx, &digest).await?)
                        .map_err(|e| CliError::bad(format!("{digest} is not a manifest: {e}")))?;
                }
                let desc = |v: &serde_json::Value| -> R<(String, i64)> {
                    Ok((
                        v.get("digest")
                            .and_then(|x| x.as_str())
                            .ok_or_else(|| {
                                CliError::bad(format!("{digest}: a descriptor has no digest"))
                            })?
                            .to_string(),
                        v.get("size").and_then(|x| x.as_i64()).unwrap_or(0),
                    ))
                };
                let config =
                    desc(doc.get("config").ok_or_else(|| {
                        CliError::bad(format!("{digest} is not an image manifest"))
                    })?)?;
                let layers: Vec<(String, i64)> = doc
                    .get("layers")
                    .and_then(|l| l.as_array())
                    .map(|l| l.iter().map(desc).collect::<R<Vec<_>>>())
                    .transpose()?
                    .unwrap_or_default();
                let hex = |d: &str| {
                    d.split_once(':')
                        .map(|x| x.1.to_string())
                        .unwrap_or(d.to_string())
                };
                let cfg_file = format!("{}.json", hex(&config.0));
                if written.insert(cfg_file.clone()) {
                    sink.blob(cx, &cfg_file, &config.0, config.1, &bar).await?;
                    count += 1;
                    total += config.1;
                }
                let mut files = Vec::new();
                for (d, s) in &layers {
                    let f = format!("{}.tar", hex(d));
                    if written.insert(f.clone()) {
                        sink.blob(cx, &f, d, *s, &bar).await?;
                        count += 1;
                        total += s;
                    }
                    files.push(f);
                }
                entries.push(serde_json::json!({
                    "Config": cfg_file,
                    "RepoTags": r.name.iter().collect::<Vec<_>>(),
                    "Layers": files,
                }));
            }
            sink.file("manifest.json", serde_json::to_vec(&entries).expect("JSON"))
                .await?;
            bar.finish_and_clear();
            sink.finish()?;
            report(cx, out, "docker-archive", roots.len(), count, total);
            Ok(())
        }
        f => Err(CliError::bad(format!(
            "unknown format {f:?}: use oci, oci-archive or docker-archive"
        ))),
    }
}

fn report(cx: &Ctx, out: &Path, format: &str, images: usize, blobs: usize, bytes: i64) {
    if cx.conn.json {
        output::json(
            &serde_json::json!({"output": out, "format": format, "images": images, "blobs": blobs, "bytes": bytes}),
        );
    } else if out.as_os_str() != "-" {
        eprintln!(
            "exported {images} images, {blobs} blobs ({}) to {} ({format})",
            output::human_size(bytes),
            out.display()
        );
    }
}
