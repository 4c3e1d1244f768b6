//! The `contentd` command line: every operation of the daemon from a shell, over its socket.
//!
//! Owns argument parsing for the client verbs, human tables and `--json` output, progress
//! bars (on a terminal only), and the mapping of failures to exit codes with a hint of what
//! to do next. Wire calls go through the generated clients; archive formats live in
//! `archive.rs`.

mod archive;
mod output;

use std::collections::HashMap;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tokio_stream::StreamExt as _;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use crate::api::pb::containerd::services::content::v1 as cpb;
use crate::api::pb::containerd::services::images::v1 as ipb;
use crate::api::pb::containerd::services::leases::v1 as lpb;
use crate::api::pb::contentd::v1 as gpb;
use crate::client::{Namespace, connect_unix};
use crate::digest::{Algorithm, Digest};
pub use output::{Table, human_size};

/// How to reach the daemon; global flags of every verb.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The daemon's client socket (default: where `contentd serve` listens by default).
    #[arg(long, global = true, env = "CONTENTD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// containerd namespace to act in.
    #[arg(
        long,
        short = 'n',
        global = true,
        env = "CONTENTD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// List blobs (optionally filtered, containerd filter syntax).
    Ls {
        /// e.g. 'labels."containerd.io/gc.root"', 'digest==sha256:…'
        filters: Vec<String>,
    },
    /// Show one blob: size, times, labels.
    Info { digest: String },
    /// Write a blob's bytes (or a range of them) to stdout.
    Cat {
        digest: String,
        #[arg(long, default_value_t = 0)]
        offset: i64,
        /// Bytes to write (0: to the end).
        #[arg(long, default_value_t = 0)]
        length: i64,
    },
    /// Store a file (or stdin, `-`) as a blob, verified by digest; an interrupted push of
    /// the same file resumes where it stopped.
    Push {
        path: PathBuf,
        /// The blob's media type (decides how contentd classifies it).
        #[arg(long)]
        media_type: Option<String>,
        /// Labels, KEY=VALUE; repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Delete blobs from this namespace.
    Rm {
        #[arg(required = true)]
        digests: Vec<String>,
    },
    /// Set (KEY=VALUE) or remove (KEY=) labels of a blob.
    Label {
        digest: String,
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// Images: ls, tag, rm, inspect.
    Images {
        #[command(subcommand)]
        cmd: ImagesCmd,
    },
    /// Leases: ls, create, rm.
    Leases {
        #[command(subcommand)]
        cmd: LeasesCmd,
    },
    /// Garbage collection: run it (or --dry-run), status, explain DIGEST.
    Gc {
        /// Report what a run would remove, remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(subcommand)]
        cmd: Option<GcCmd>,
    },
    /// Pull an image from its registry (eagerly, or --lazy: layers on first read).
    Pull {
        reference: String,
        #[arg(long)]
        lazy: bool,
        /// os/arch[/variant]; repeatable; default all platforms.
        #[arg(long = "platform")]
        platforms: Vec<String>,
        /// Image name to record (default: the reference).
        #[arg(long)]
        name: Option<String>,
    },
    /// Import an OCI layout directory, an oci-archive or a docker-archive (`docker save`).
    Import {
        path: PathBuf,
        /// Prefix for images the archive names only by tag (e.g. umoci's "single").
        #[arg(long)]
        base_name: Option<String>,
    },
    /// Export images (by name or digest) as an OCI layout directory, an oci-archive or a
    /// docker-archive.
    Export {
        #[arg(required = true)]
        images: Vec<String>,
        /// Output path: a directory (oci), a file (.tar: oci-archive), or `-` for stdout.
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// oci, oci-archive or docker-archive (default: from the output path).
        #[arg(long)]
        format: Option<String>,
        /// For docker-archive of an index: the platform to export (default linux/amd64).
        #[arg(long)]
        platform: Option<String>,
    },
    /// Re-verify stored blobs against their digests now (all, or the ones named); corrupt
    /// ones are quarantined and reported (exit code 5).
    Verify { digests: Vec<String> },
    /// Ingests in progress.
    Status,
    /// Whether the daemon answers and serves.
    Health,
}

#[derive(Subcommand, Debug)]
pub enum ImagesCmd {
    /// List images.
    Ls { filters: Vec<String> },
    /// Name SOURCE's target also as TARGET.
    Tag { source: String, target: String },
    /// Delete images (their content goes at the next collection unless something else holds it).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// The image's tree: every blob with its size and whether it is stored.
    Inspect { name: String },
}

#[derive(Subcommand, Debug)]
pub enum LeasesCmd {
    Ls,
    /// Create a lease (prints its id).
    Create {
        #[arg(long)]
        id: Option<String>,
        /// Expire after this many seconds (containerd.io/gc.expire).
        #[arg(long)]
        expire_secs: Option<i64>,
        /// Also keep the content of this lease flat (containerd.io/gc.flat).
        #[arg(long)]
        flat: bool,
    },
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum GcCmd {
    /// The last collection's report and how many have run.
    Status,
    /// Why a blob is kept (the root and the path), or when it becomes collectable.
    Explain { digest: String },
}

/// A failure with the exit code and the advice a shell user needs.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
    pub hint: Option<String>,
}

/// Exit codes: 1 the operation failed, 2 bad input, 3 the daemon is unreachable, 4 not
/// found, 5 data does not match its digest.
impl CliError {
    fn new(code: u8, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
            hint: None,
        }
    }
    fn hint(mut self, h: impl Into<String>) -> Self {
        self.hint = Some(h.into());
        self
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(2, message)
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let msg = s.message().to_string();
        match s.code() {
            Code::NotFound => CliError::new(4, msg),
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                CliError::new(2, msg)
            }
            Code::DataLoss => CliError::new(5, msg),
            Code::AlreadyExists => CliError::new(1, msg),
            Code::Unavailable if msg.contains("transport") || msg.contains("connect") => {
                CliError::new(3, format!("lost the connection to contentd: {msg}"))
                    .hint("is the daemon still running?")
            }
            Code::Unimplemented => {
                CliError::new(1, msg).hint("the daemon is older than this command line; upgrade it")
            }
            c => CliError::new(1, format!("{msg} ({c:?})")),
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::new(1, e.to_string())
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::new(1, format!("{e:#}"))
    }
}

type R<T> = Result<T, CliError>;
type Ch = InterceptedService<Channel, Namespace>;

pub struct Ctx {
    pub conn: Conn,
    socket: PathBuf,
    ch: Channel,
}

impl Ctx {
    async fn connect(conn: Conn) -> R<Ctx> {
        let socket = conn
            .socket
            .clone()
            .unwrap_or_else(|| crate::config::Config::default().socket);
        if !socket.exists() {
            return Err(CliError::new(
                3,
                format!("cannot reach contentd: {} does not exist", socket.display()),
            )
            .hint("start the daemon with `contentd serve`, or point --socket (or CONTENTD_SOCKET) at its socket"));
        }
        let ch = connect_unix(&socket).await.map_err(|e| {
            CliError::new(
                3,
                format!("cannot reach contentd at {}: {e:#}", socket.display()),
            )
            .hint("start the daemon with `contentd serve`, or point --socket at its socket")
        })?;
        Ok(Ctx { conn, socket, ch })
    }

    fn ns(&self) -> Namespace {
        Namespace::new(Some(&self.conn.namespace)).expect("namespace validated at start")
    }
    fn content(&self) -> cpb::content_client::ContentClient<Ch> {
        cpb::content_client::ContentClient::with_interceptor(self.ch.clone(), self.ns())
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20)
    }
    fn content_leased(&self, lease: &str) -> R<cpb::content_client::ContentClient<Ch>> {
        Ok(cpb::content_client::ContentClient::with_interceptor(
            self.ch.clone(),
            self.ns().with_lease(lease)?,
        )
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
    }
    fn blobs_leased(&self, lease: Option<&str>) -> R<gpb::blobs_client::BlobsClient<Ch>> {
        let ns = match lease {
            Some(l) => self.ns().with_lease(l)?,
            None => self.ns(),
        };
        Ok(
            gpb::blobs_client::BlobsClient::with_interceptor(self.ch.clone(), ns)
                .max_encoding_message_size(16 << 20),
        )
    }
    fn images(&self) -> ipb::images_client::ImagesClient<Ch> {
        ipb::images_client::ImagesClient::with_interceptor(self.ch.clone(), self.ns())
    }
    fn leases(&self) -> lpb::leases_client::LeasesClient<Ch> {
        lpb::leases_client::LeasesClient::with_interceptor(self.ch.clone(), self.ns())
    }
    fn graph(&self) -> gpb::graph_client::GraphClient<Ch> {
        gpb::graph_client::GraphClient::with_interceptor(self.ch.clone(), self.ns())
    }
    fn gc(&self) -> gpb::gc_client::GcClient<Ch> {
        gpb::gc_client::GcClient::with_interceptor(self.ch.clone(), self.ns())
    }
    fn registry(&self) -> gpb::registry_client::RegistryClient<Ch> {
        gpb::registry_client::RegistryClient::with_interceptor(self.ch.clone(), self.ns())
    }

    /// A progress bar on a terminal (stderr), hidden otherwise or with --json.
    fn bar(&self, len: u64, what: &str) -> indicatif::ProgressBar {
        if self.conn.json || !std::io::stderr().is_terminal() {
            return indicatif::ProgressBar::hidden();
        }
        let b = indicatif::ProgressBar::new(len);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        b.set_message(what.to_string());
        b
    }

    /// Creates a lease that expires on its own if this process dies.
    async fn temp_lease(&self, what: &str) -> R<String> {
        let id = format!("{what}-{}-{}", std::process::id(), crate::store::now_ns());
        let mut labels = HashMap::new();
        labels.insert(
            "containerd.io/gc.expire".to_string(),
            crate::upstream::pull::rfc3339(crate::store::now_ns() / 1_000_000_000 + 3600),
        );
        self.leases()
            .create(lpb::CreateRequest {
                id: id.clone(),
                labels,
            })
            .await?;
        Ok(id)
    }
}

fn digest_arg(s: &str) -> R<Digest> {
    Digest::parse(s).map_err(|e| {
        CliError::bad(format!("{s:?} is not a digest: {}", e.message()))
            .hint("digests look like sha256:<64 hex digits>")
    })
}

fn kv_labels(pairs: &[String]) -> R<HashMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError::bad(format!("label {p:?}: expected KEY=VALUE")))
        })
        .collect()
}

/// Runs a client verb and turns the outcome into an exit code (printing the error).
pub fn main(conn: Conn, verb: Verb) -> ExitCode {
    quiet_on_closed_stdout();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if crate::store::Scope::namespace(&conn.namespace).is_err() {
        eprintln!("error: {:?} is not a valid namespace", conn.namespace);
        return ExitCode::from(2);
    }
    match rt.block_on(run(conn, verb)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            if let Some(h) = e.hint {
                eprintln!("hint: {h}");
            }
            ExitCode::from(e.code)
        }
    }
}

async fn run(conn: Conn, verb: Verb) -> R<()> {
    let cx = Ctx::connect(conn).await?;
    match verb {
        Verb::Ls { filters } => ls(&cx, filters).await,
        Verb::Info { digest } => info(&cx, &digest).await,
        Verb::Cat {
            digest,
            offset,
            length,
        } => cat(&cx, &digest, offset, length).await,
        Verb::Push {
            path,
            media_type,
            labels,
        } => push(&cx, &path, media_type, &labels).await,
        Verb::Rm { digests } => {
            for d in &digests {
                digest_arg(d)?;
            }
            delete_each(&cx, &digests, |d| {
                let mut c = cx.content();
                async move {
                    c.delete(cpb::DeleteContentRequest { digest: d }).await?;
                    Ok(())
                }
            })
            .await
        }
        Verb::Label { digest, labels } => label(&cx, &digest, &labels).await,
        Verb::Images { cmd } => images(&cx, cmd).await,
        Verb::Leases { cmd } => leases(&cx, cmd).await,
        Verb::Gc { dry_run, cmd } => gc(&cx, dry_run, cmd).await,
        Verb::Pull {
            reference,
            lazy,
            platforms,
            name,
        } => pull(&cx, &reference, lazy, platforms, name).await,
        Verb::Import { path, base_name } => archive::import(&cx, &path, base_name.as_deref()).await,
        Verb::Export {
            images,
            output,
            format,
            platform,
        } => {
            archive::export(
                &cx,
                &images,
                &output,
                format.as_deref(),
                platform.as_deref(),
            )
            .await
        }
        Verb::Verify { digests } => verify(&cx, digests).await,
        Verb::Status => status(&cx).await,
        Verb::Health => health(&cx).await,
    }
}

/// Deletes each item in turn, saying so as it goes (or in one JSON list at the end).
async fn delete_each<F, Fut>(cx: &Ctx, items: &[String], mut del: F) -> R<()>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = R<()>>,
{
    for it in items {
        del(it.clone()).await?;
        if !cx.conn.json {
            println!("deleted {it}");
        }
    }
    if cx.conn.json {
        output::json(&serde_json::json!({ "deleted": items }));
    }
    Ok(())
}

fn info_json(i: &cpb::Info) -> serde_json::Value {
    serde_json::json!({
        "digest": i.digest,
        "size": i.size,
        "created": i.created_at.as_ref().map(output::ts),
        "updated": i.updated_at.as_ref().map(output::ts),
        "labels": i.labels,
    })
}

async fn ls(cx: &Ctx, filters: Vec<String>) -> R<()> {
    let mut s = cx
        .content()
        .list(cpb::ListContentRequest { filters })
        .await?
        .into_inner();
    let mut all = Vec::new();
    while let Some(m) = s.next().await {
        all.extend(m?.info);
    }
    all.sort_by(|a, b| a.digest.cmp(&b.digest));
    if cx.conn.json {
        output::json(&serde_json::Value::Array(
            all.iter().map(info_json).collect(),
        ));
        return Ok(());
    }
    let mut t = Table::new(&["DIGEST", "SIZE", "CREATED", "LABELS"]);
    for i in &all {
        let mut labels: Vec<String> = i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        t.row(vec![
            i.digest.clone(),
            human_size(i.size),
            i.created_at.as_ref().map(output::ts).unwrap_or_default(),
            labels.join(","),
        ]);
    }
    t.print();
    Ok(())
}

async fn info(cx: &Ctx, digest: &str) -> R<()> {
    digest_arg(digest)?;
    let i = cx
        .content()
        .info(cpb::InfoRequest {
            digest: digest.into(),
        })
        .await?
        .into_inner()
        .info
        .unwrap_or_default();
    if cx.conn.json {
        output::json(&info_json(&i));
        return Ok(());
    }
    println!("digest:  {}", i.digest);
    println!("size:    {} ({} bytes)", human_size(i.size), i.size);
    println!(
        "created: {}",
        i.created_at.as_ref().map(output::ts).unwrap_or_default()
    );
    println!(
        "updated: {}",
        i.updated_at.as_ref().map(output::ts).unwrap_or_default()
    );
    let mut labels: Vec<_> = i.labels.iter().collect();
    labels.sort();
    for (k, v) in labels {
        println!("label:   {k}={v}");
    }
    Ok(())
}

async fn cat(cx: &Ctx, digest: &str, offset: i64, length: i64) -> R<()> {
    digest_arg(digest)?;
    if offset < 0 || length < 0 {
        return Err(CliError::bad("--offset and --length must not be negative"));
    }
    let mut s = cx
        .content()
        .read(cpb::ReadContentRequest {
            digest: digest.into(),
            offset,
            size: length,
        })
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(m) = s.next().await {
        let m = m?;
        if let Err(e) = out.write_all(&m.data) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
    }
    out.flush()?;
    Ok(())
}

/// A reader that goes away (`contentd ls | head`) ends the output quietly, as `cat` does
/// above. Rust leaves SIGPIPE ignored, so `println!` to the closed pipe panics, with a
/// backtrace; SIGPIPE stays ignored (a closed daemon socket must stay an error the verb
/// reports) and only that panic becomes a quiet exit.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info)
    }));
}

/// Hashes a file (sha256) with a progress bar.
fn hash_file(cx: &Ctx, path: &std::path::Path) -> R<(Digest, u64)> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| CliError::bad(format!("cannot open {}: {e}", path.display())))?;
    let len = f.metadata()?.len();
    let bar = cx.bar(len, "hashing");
    let mut h = Algorithm::Sha256.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok((h.digest(), len))
}

async fn push(
    cx: &Ctx,
    path: &std::path::Path,
    media_type: Option<String>,
    labels: &[String],
) -> R<()> {
    let labels = kv_labels(labels)?;
    if path.as_os_str() == "-" {
        let r = archive::upload_stream(cx, None, std::io::stdin(), labels, "push-stdin").await?;
        return report_push(cx, &r.0, r.1, r.2);
    }
    let (digest, size) = hash_file(cx, path)?;
    let r = format!("push-{digest}");
    // Resume: the ingest of an earlier, interrupted push of these bytes.
    let offset = match cx
        .content()
        .status(cpb::StatusRequest { r#ref: r.clone() })
        .await
    {
        Ok(s) => {
            let st = s.into_inner().status.unwrap_or_default();
            if st.expected == digest.to_string() && st.offset > 0 && st.offset <= size as i64 {
                st.offset
            } else {
                0
            }
        }
        Err(s) if s.code() == tonic::Code::NotFound => 0,
        Err(s) => return Err(s.into()),
    };
    if offset > 0 && !cx.conn.json {
        eprintln!("resuming {} at byte {offset} of {size}", path.display());
    }
    let file = std::fs::File::open(path)?;
    let created = archive::put_file(
        cx, None, file, &digest, size, offset, media_type, labels, &r,
    )
    .await?;
    report_push(cx, &digest, size as i64, created)
}

fn report_push(cx: &Ctx, digest: &Digest, size: i64, created: bool) -> R<()> {
    if cx.conn.json {
        output::json(
            &serde_json::json!({"digest": digest.to_string(), "size": size, "created": created}),
        );
    } else if created {
        println!("{digest}");
    } else {
        eprintln!("already stored");
        println!("{digest}");
    }
    Ok(())
}

async fn label(cx: &Ctx, digest: &str, pairs: &[String]) -> R<()> {
    digest_arg(digest)?;
    let set = kv_labels(pairs)?;
    let paths: Vec<String> = set.keys().map(|k| format!("labels.{k}")).collect();
    let labels: HashMap<String, String> = set.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    let i = cx
        .content()
        .update(cpb::UpdateRequest {
            info: Some(cpb::Info {
                digest: digest.into(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        })
        .await?
        .into_inner()
        .info
        .unwrap_or_default();
    if cx.conn.json {
        output::json(&info_json(&i));
    } else {
        let mut l: Vec<String> = i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        l.sort();
        println!("{} {}", i.digest, l.join(","));
    }
    Ok(())
}

fn image_json(i: &ipb::Image) -> serde_json::Value {
    let t = i.target.clone().unwrap_or_default();
    serde_json::json!({
        "name": i.name,
        "target": {"mediaType": t.media_type, "digest": t.digest, "size": t.size},
        "labels": i.labels,
        "created": i.created_at.as_ref().map(output::ts),
        "updated": i.updated_at.as_ref().map(output::ts),
    })
}

async fn images(cx: &Ctx, cmd: ImagesCmd) -> R<()> {
    match cmd {
        ImagesCmd::Ls { filters } => {
            let mut all = cx
                .images()
                .list(ipb::ListImagesRequest { filters })
                .await?
                .into_inner()
                .images;
            all.sort_by(|a, b| a.name.cmp(&b.name));
            if cx.conn.json {
                output::json(&serde_json::Value::Array(
                    all.iter().map(image_json).collect(),
                ));
                return Ok(());
            }
            let mut t = Table::new(&["NAME", "DIGEST", "SIZE", "TYPE"]);
            for i in &all {
                let d = i.target.clone().unwrap_or_default();
                t.row(vec![
                    i.name.clone(),
                    d.digest,
                    human_size(d.size),
                    output::short_type(&d.media_type),
                ]);
            }
            t.print();
            Ok(())
        }
        ImagesCmd::Tag { source, target } => {
            let src = cx
                .images()
                .get(ipb::GetImageRequest { name: source })
                .await?
                .into_inner()
                .image
                .unwrap_or_default();
            let img = ipb::Image {
                name: target.clone(),
                target: src.target.clone(),
                labels: src.labels.clone(),
                ..Default::default()
            };
            let r = cx
                .images()
                .create(ipb::CreateImageRequest {
                    image: Some(img.clone()),
                })
                .await;
            let out = match r {
                Ok(r) => r.into_inner().image.unwrap_or_default(),
                Err(s) if s.code() == tonic::Code::AlreadyExists => cx
                    .images()
                    .update(ipb::UpdateImageRequest {
                        image: Some(img),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["target".into()],
                        }),
                    })
                    .await?
                    .into_inner()
                    .image
                    .unwrap_or_default(),
                Err(s) => return Err(s.into()),
            };
            if cx.conn.json {
                output::json(&image_json(&out));
            } else {
                println!("{} -> {}", out.name, out.target.unwrap_or_default().digest);
            }
            Ok(())
        }
        ImagesCmd::Rm { names } => {
            delete_each(cx, &names, |name| {
                let mut c = cx.images();
                async move {
                    c.delete(ipb::DeleteImageRequest { name, sync: false })
                        .await?;
                    Ok(())
                }
            })
            .await
        }
        ImagesCmd::Inspect { name } => {
            let img = cx
                .images()
                .get(ipb::GetImageRequest { name })
                .await?
                .into_inner()
                .image
                .unwrap_or_default();
            let target = img.target.clone().unwrap_or_default();
            let w = cx
                .graph()
                .walk(gpb::DigestRequest {
                    digest: target.digest.clone(),
                })
                .await?
                .into_inner();
            if cx.conn.json {
                output::json(&serde_json::json!({
                    "image": image_json(&img),
                    "nodes": w.nodes.iter().map(|n| serde_json::json!({
                        "digest": n.digest, "mediaType": n.media_type, "size": n.size, "present": n.present,
                    })).collect::<Vec<_>>(),
                    "edges": w.edges.iter().map(|e| serde_json::json!({
                        "from": e.from, "to": e.to, "role": e.role, "mediaType": e.media_type,
                        "size": e.size, "platform": e.platform,
                    })).collect::<Vec<_>>(),
                    "presentBytes": w.present_bytes,
                    "absent": w.absent,
                }));
                return Ok(());
            }
            println!("{}", img.name);
            output::tree(&w, &target.digest, &target.media_type, target.size);
            let total: i64 = w.nodes.iter().map(|n| n.size).sum();
            println!(
                "{} blobs, {} stored of {}{}",
                w.nodes.len(),
                human_size(w.present_bytes),
                human_size(total),
                if w.absent.is_empty() {
                    String::new()
                } else {
                    format!(", {} not stored", w.absent.len())
                }
            );
            Ok(())
        }
    }
}

async fn leases(cx: &Ctx, cmd: LeasesCmd) -> R<()> {
    match cmd {
        LeasesCmd::Ls => {
            let all = cx
                .leases()
                .list(lpb::ListRequest { filters: vec![] })
                .await?
                .into_inner()
                .leases;
            if cx.conn.json {
                output::json(&serde_json::Value::Array(
                    all.iter()
                        .map(|l| serde_json::json!({"id": l.id, "created": l.created_at.as_ref().map(output::ts), "labels": l.labels}))
                        .collect(),
                ));
                return Ok(());
            }
            let mut t = Table::new(&["ID", "CREATED", "LABELS"]);
            for l in &all {
                let mut labels: Vec<String> =
                    l.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                t.row(vec![
                    l.id.clone(),
                    l.created_at.as_ref().map(output::ts).unwrap_or_default(),
                    labels.join(","),
                ]);
            }
            t.print();
            Ok(())
        }
        LeasesCmd::Create {
            id,
            expire_secs,
            flat,
        } => {
            let id = id.unwrap_or_else(|| format!("cli-{}", crate::store::now_ns()));
            let mut labels = HashMap::new();
            if let Some(s) = expire_secs {
                labels.insert(
                    "containerd.io/gc.expire".into(),
                    crate::upstream::pull::rfc3339(crate::store::now_ns() / 1_000_000_000 + s),
                );
            }
            if flat {
                labels.insert("containerd.io/gc.flat".into(), "true".into());
            }
            let l = cx
                .leases()
                .create(lpb::CreateRequest { id, labels })
                .await?
                .into_inner()
                .lease
                .unwrap_or_default();
            if cx.conn.json {
                output::json(&serde_json::json!({"id": l.id, "labels": l.labels}));
            } else {
                println!("{}", l.id);
            }
            Ok(())
        }
        LeasesCmd::Rm { ids } => {
            delete_each(cx, &ids, |id| {
                let mut c = cx.leases();
                async move {
                    c.delete(lpb::DeleteRequest { id, sync: false }).await?;
                    Ok(())
                }
            })
            .await
        }
    }
}

fn report_json(r: &gpb::Report) -> serde_json::Value {
    serde_json::json!({
        "dryRun": r.dry_run,
        "started": r.started_at.as_ref().map(output::ts),
        "durationMs": r.duration_ms,
        "marked": r.marked,
        "blobsSwept": r.blobs_swept,
        "bytesSwept": r.bytes_swept,
        "linksSwept": r.links_swept,
        "ingestsExpired": r.ingests_expired,
        "sourcesSwept": r.sources_swept,
        "maxPauseUs": r.max_pause_us,
        "markSpills": r.mark_spills,
        "swept": r.swept,
    })
}

fn print_report(r: &gpb::Report) {
    println!(
        "{} {} blobs ({}), {} links, {} ingests, {} upstream sources in {} ms; {} marked live; longest pause {:.1} ms",
        if r.dry_run { "would sweep" } else { "swept" },
        r.blobs_swept,
        human_size(r.bytes_swept),
        r.links_swept,
        r.ingests_expired,
        r.sources_swept,
        r.duration_ms,
        r.marked,
        r.max_pause_us as f64 / 1e3
    );
    for d in &r.swept {
        println!("  {d}");
    }
}

async fn gc(cx: &Ctx, dry_run: bool, cmd: Option<GcCmd>) -> R<()> {
    match cmd {
        None => {
            let r = cx.gc().run(gpb::RunRequest { dry_run }).await?.into_inner();
            if cx.conn.json {
                output::json(&report_json(&r));
            } else {
                print_report(&r);
            }
            Ok(())
        }
        Some(GcCmd::Status) => {
            let s = cx.gc().status(gpb::StatusRequest {}).await?.into_inner();
            if cx.conn.json {
                output::json(&serde_json::json!({
                    "running": s.running, "runs": s.runs, "last": s.last.as_ref().map(report_json),
                }));
            } else {
                println!(
                    "{} collections run{}",
                    s.runs,
                    if s.running { ", one running now" } else { "" }
                );
                if let Some(r) = &s.last {
                    print!("last: ");
                    print_report(r);
                }
            }
            Ok(())
        }
        Some(GcCmd::Explain { digest }) => {
            digest_arg(&digest)?;
            let e = cx
                .gc()
                .explain(gpb::ExplainRequest { digest })
                .await?
                .into_inner();
            if cx.conn.json {
                output::json(&serde_json::json!({
                    "alive": e.alive, "root": e.root, "path": e.path,
                    "collectableAfter": e.collectable_after.as_ref().map(output::ts), "message": e.message,
                }));
            } else {
                println!("{}", e.message);
                if e.alive {
                    println!("root: {}", e.root);
                    for (i, p) in e.path.iter().enumerate() {
                        println!("{:indent$}└─ {p}", "", indent = i * 2);
                    }
                }
            }
            Ok(())
        }
    }
}

async fn pull(
    cx: &Ctx,
    reference: &str,
    lazy: bool,
    platforms: Vec<String>,
    name: Option<String>,
) -> R<()> {
    let mut s = cx
        .registry()
        .pull(gpb::PullRequest {
            reference: reference.into(),
            platforms,
            mode: if lazy { 1 } else { 0 },
            image_name: name.unwrap_or_default(),
        })
        .await?
        .into_inner();
    use gpb::pull_event::State;
    let bars = indicatif::MultiProgress::new();
    let mut active: HashMap<String, indicatif::ProgressBar> = HashMap::new();
    let mut events = Vec::new();
    let mut done = None;
    while let Some(e) = s.next().await {
        let e = e?;
        let state = State::try_from(e.state).unwrap_or(State::Unspecified);
        match state {
            State::Fetching => {
                let b = active.entry(e.digest.clone()).or_insert_with(|| {
                    let b =
                        bars.add(cx.bar(e.size.max(0) as u64, &e.digest[..19.min(e.digest.len())]));
                    b.set_length(e.size.max(0) as u64);
                    b
                });
                b.set_position(e.offset.max(0) as u64);
            }
            State::Done => done = Some((e.detail.clone(), e.digest.clone())),
            _ => {
                if let Some(b) = active.remove(&e.digest) {
                    b.finish_and_clear();
                }
                if !cx.conn.json {
                    let line = format!(
                        "{:<9} {} {:>10} {}{}",
                        format!("{state:?}").to_lowercase(),
                        e.digest,
                        human_size(e.size),
                        output::short_type(&e.media_type),
                        if e.detail.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", e.detail)
                        }
                    );
                    bars.suspend(|| eprintln!("{line}"));
                }
            }
        }
        events.push(e);
    }
    let (image, digest) =
        done.ok_or_else(|| CliError::new(1, "the pull ended without its final event"))?;
    if cx.conn.json {
        output::json(&serde_json::json!({
            "image": image, "digest": digest,
            "events": events.iter().map(|e| serde_json::json!({
                "state": format!("{:?}", State::try_from(e.state).unwrap_or(State::Unspecified)).to_lowercase(),
                "digest": e.digest, "mediaType": e.media_type, "size": e.size, "detail": e.detail,
            })).collect::<Vec<_>>(),
        }));
    } else {
        println!("{image} {digest}");
    }
    Ok(())
}

async fn verify(cx: &Ctx, digests: Vec<String>) -> R<()> {
    for d in &digests {
        digest_arg(d)?;
    }
    let mut c = gpb::scrub_client::ScrubClient::with_interceptor(cx.ch.clone(), cx.ns());
    let r = c.verify(gpb::VerifyRequest { digests }).await?.into_inner();
    if cx.conn.json {
        output::json(&serde_json::json!({
            "checked": r.checked, "bytes": r.bytes,
            "corrupt": r.corrupt.iter().map(|c| serde_json::json!({
                "digest": c.digest, "reason": c.reason, "refetching": c.refetching,
            })).collect::<Vec<_>>(),
        }));
    } else {
        println!("verified {} blobs ({})", r.checked, human_size(r.bytes));
        for c in &r.corrupt {
            println!("CORRUPT {} — quarantined: {}", c.digest, c.reason);
            if !c.refetching.is_empty() {
                println!("  fetching it again for {}", c.refetching.join(", "));
            }
        }
    }
    if r.corrupt.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(
            5,
            format!("{} corrupt blob(s) quarantined", r.corrupt.len()),
        )
        .hint("images that need them show them absent; push or pull them again"))
    }
}

async fn status(cx: &Ctx) -> R<()> {
    let mut all = cx
        .content()
        .list_statuses(cpb::ListStatusesRequest { filters: vec![] })
        .await?
        .into_inner()
        .statuses;
    all.sort_by(|a, b| a.r#ref.cmp(&b.r#ref));
    if cx.conn.json {
        output::json(&serde_json::Value::Array(
            all.iter()
                .map(|s| serde_json::json!({
                    "ref": s.r#ref, "offset": s.offset, "total": s.total, "expected": s.expected,
                    "started": s.started_at.as_ref().map(output::ts), "updated": s.updated_at.as_ref().map(output::ts),
                }))
                .collect(),
        ));
        return Ok(());
    }
    let mut t = Table::new(&["REF", "OFFSET", "TOTAL", "EXPECTED", "UPDATED"]);
    for s in &all {
        t.row(vec![
            s.r#ref.clone(),
            human_size(s.offset),
            if s.total > 0 {
                human_size(s.total)
            } else {
                "?".into()
            },
            s.expected.clone(),
            s.updated_at.as_ref().map(output::ts).unwrap_or_default(),
        ]);
    }
    t.print();
    Ok(())
}

async fn health(cx: &Ctx) -> R<()> {
    let mut h = tonic_health::pb::health_client::HealthClient::new(cx.ch.clone());
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    let serving =
        r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    if cx.conn.json {
        output::json(&serde_json::json!({"socket": cx.socket, "serving": serving}));
    } else {
        println!(
            "{}: {}",
            cx.socket.display(),
            if serving { "serving" } else { "not serving" }
        );
    }
    if serving {
        Ok(())
    } else {
        Err(CliError::new(
            1,
            "the daemon is not serving (shutting down?)",
        ))
    }
}
