//! The `contentd` binary: `serve` runs the daemon, `bench` measures any content endpoint.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use contentd::config::{Backend, Config};

#[derive(Parser)]
#[command(
    name = "contentd",
    version,
    about = "Content-addressable blob store daemon for container images"
)]
struct Cli {
    #[command(flatten)]
    conn: contentd::cli::Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the default configuration as a commented TOML file.
    Default,
    /// Validate a configuration file (and the environment's overrides).
    Check { path: PathBuf },
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Client(contentd::cli::Verb),
    /// Run the daemon. With no flags: data in /var/lib/contentd, client socket
    /// /run/contentd/contentd.sock (for non-root users, under XDG_DATA_HOME / XDG_RUNTIME_DIR).
    Serve {
        /// TOML config file; flags override it.
        #[arg(long, env = "CONTENTD_CONFIG")]
        config: Option<PathBuf>,
        /// RocksDB data directory.
        #[arg(long, env = "CONTENTD_ROOT")]
        root: Option<PathBuf>,
        /// Backend-mode unix socket for a containerd proxy plugin, `PATH` or `TENANT=PATH`;
        /// repeat for one tenant each.
        #[arg(long = "backend-socket")]
        backend_socket: Vec<String>,
        /// Client-mode TCP listener address, e.g. 127.0.0.1:7070.
        #[arg(long, env = "CONTENTD_TCP")]
        tcp: Option<String>,
        /// Log format: text or json.
        #[arg(long, env = "CONTENTD_LOG_FORMAT")]
        log_format: Option<String>,
        /// Seconds between background garbage collections (0: only on demand and on deletions).
        #[arg(long, env = "CONTENTD_GC_INTERVAL_SECS")]
        gc_interval_secs: Option<u64>,
        /// Content linked within this many seconds is kept by the collector.
        #[arg(long, env = "CONTENTD_GC_GRACE_SECS")]
        gc_grace_secs: Option<u64>,
        /// A collection starts once this many mutations accumulate (0: never by count).
        #[arg(long, env = "CONTENTD_GC_MUTATION_THRESHOLD")]
        gc_mutation_threshold: Option<u64>,
        /// A collection starts once this many deletions accumulate.
        #[arg(long, env = "CONTENTD_GC_DELETION_THRESHOLD")]
        gc_deletion_threshold: Option<u64>,
        /// TCP address serving only gRPC health checks (Kubernetes probes), e.g. 0.0.0.0:7071.
        #[arg(long, env = "CONTENTD_HEALTH_TCP")]
        health_tcp: Option<String>,
        /// Prometheus metrics endpoint address (HTTP, /metrics), e.g. 127.0.0.1:9105.
        #[arg(long, env = "CONTENTD_METRICS_ADDR")]
        metrics_addr: Option<String>,
        /// Serve the OCI distribution API (registry and pull-through mirror) here, e.g.
        /// 127.0.0.1:5000 (plain HTTP on loopback, TLS from [tls] elsewhere).
        #[arg(long = "registry", env = "CONTENTD_REGISTRY_ADDR")]
        registry_addr: Option<String>,
        /// Permission bits of the unix sockets (octal).
        #[arg(long, env = "CONTENTD_SOCKET_MODE")]
        socket_mode: Option<String>,
        /// Seconds between background scrubs of every blob (0 disables).
        #[arg(long, env = "CONTENTD_SCRUB_INTERVAL_SECS")]
        scrub_interval_secs: Option<u64>,
    },
    /// Configuration: `config default` prints every option with its default and meaning;
    /// `config check FILE` validates a file.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Benchmark garbage collection on a synthetic store built in DIR (in-process).
    BenchGc {
        /// Directory for the synthetic store (must not exist).
        #[arg(long)]
        root: PathBuf,
        /// Blobs to create (images of 10 blobs; every other image is garbage).
        #[arg(long, default_value_t = 100_000)]
        blobs: usize,
        /// Memory for the collection's marks, MiB (the daemon gives them `memory_budget_mib`);
        /// past it they go to scratch files in `--root`.
        #[arg(long, default_value_t = 48)]
        mark_mib: usize,
    },
    /// Benchmark pull-through against a registry: lazy time to first byte vs a direct GET,
    /// eager pull vs skopeo copy, daemon memory during a large lazy read. The daemon must run
    /// with --gc-grace-secs 0 (each run's content is collected before the next).
    /// (The daemon's client socket is the global `--socket`.)
    BenchPull {
        /// Image whose largest layer is measured, e.g. 127.0.0.1:5055/fixtures/single:oci.
        #[arg(long)]
        reference: String,
        /// Image with a large layer for the memory figure.
        #[arg(long)]
        big_reference: Option<String>,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Benchmark contentd's registry API against the upstream registry it mirrors: cached
    /// layer GETs at c=1 and c=16, a miss vs a direct GET, 64 clients on one uncached layer,
    /// manifest HEAD by tag, daemon RSS. The daemon must run with --gc-grace-secs 0 and
    /// `--registry`. (The daemon's client socket is the global `--socket`.)
    BenchRegistry {
        /// contentd's registry address, HOST:PORT.
        #[arg(long)]
        registry: String,
        /// The upstream registry, HOST:PORT (plain HTTP), configured in contentd's [upstream].
        #[arg(long)]
        upstream: String,
        /// REPOSITORY:TAG on the upstream; its largest layer is measured.
        #[arg(long)]
        image: String,
        /// The upstream's access log, to count its GETs of the layer.
        #[arg(long)]
        upstream_log: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Salvage a data directory that no longer opens (damaged .sst files, MANIFEST or WAL):
    /// RocksDB's repair keeps what it can read, then every kept blob is re-verified, damaged
    /// ones are quarantined, and what was lost is reported. Stop the daemon and copy the
    /// directory aside first.
    Repair {
        /// The data directory.
        #[arg(long, env = "CONTENTD_ROOT")]
        root: PathBuf,
        /// Run RocksDB's repair even if the directory opens.
        #[arg(long)]
        force: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the crash simulator: random workloads on the store with simulated power losses,
    /// checking that nothing acknowledged is lost. Runs seeds from --seed on until --seeds ran
    /// or --secs passed; a failure prints the seed that replays it.
    Simulate {
        /// First seed (a failing seed replays exactly with `--seed N --seeds 1`).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// How many seeds to run.
        #[arg(long, default_value_t = u64::MAX)]
        seeds: u64,
        /// Operations per seed.
        #[arg(long, default_value_t = 60)]
        steps: usize,
        /// Stop after this many seconds (default: when --seeds ran; if neither is given, 60).
        #[arg(long)]
        secs: Option<u64>,
    },
    /// Benchmark content.v1 endpoints (contentd or containerd) side by side.
    Bench {
        /// Unix socket of an endpoint, `PATH` or `LABEL=PATH`; repeat to compare (the global
        /// `--socket` names the one daemon the other verbs talk to, so this has its own name).
        #[arg(long = "endpoint", required = true)]
        endpoint: Vec<String>,
        /// containerd namespace to send (needed by client-mode endpoints).
        #[arg(long, default_value = "bench")]
        namespace: String,
        /// Size of the large blob, MiB.
        #[arg(long, default_value_t = 1024)]
        large_mib: u64,
        /// Repetitions of the large write and read; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// 4 KiB blobs written at concurrency 16 (a quarter of that at concurrency 1).
        #[arg(long, default_value_t = 4000)]
        small: usize,
        #[arg(long, default_value_t = 500)]
        ranged_reads: usize,
        #[arg(long, default_value_t = 20000)]
        info_calls: usize,
        /// Rounds of the whole suite, endpoints taking turns (A B A B ...); each figure is the
        /// median of its rounds. On a noisy machine 3 or more keep a slow minute from landing
        /// on one side of a comparison only.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    // glibc gives every thread that frees a 1 MiB chunk buffer its own arena; with the
    // blocking pool that grows RSS far past what is live. Two arenas keep memory near the
    // working set.
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    contentd::daemon::raise_open_files_limit();
    let cli = Cli::parse();
    match cli.command {
        Command::Client(verb) => contentd::cli::main(cli.conn, verb),
        command => match run(cli.conn, command) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

/// The runtime of a command; `workers` 0 is tokio's default (one per CPU).
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        b.worker_threads(workers);
    }
    Ok(b.enable_all().build()?)
}

fn run(conn: contentd::cli::Conn, command: Command) -> anyhow::Result<()> {
    // Each command builds the runtime it needs: the daemon's is sized by its configuration.
    match command {
        Command::Client(_) => unreachable!("client verbs are dispatched in main"),
        Command::Serve {
            config,
            root,
            backend_socket,
            tcp,
            log_format,
            gc_interval_secs,
            gc_grace_secs,
            gc_mutation_threshold,
            gc_deletion_threshold,
            health_tcp,
            metrics_addr,
            registry_addr,
            socket_mode,
            scrub_interval_secs,
        } => {
            let mut c = match &config {
                Some(p) => Config::load(p)?,
                None => Config::default(),
            };
            if let Some(r) = root {
                c.root = r;
            }
            if let Some(s) = conn.socket {
                c.socket = s;
            }
            for b in &backend_socket {
                c.backend.push(Backend::parse(b)?);
            }
            if tcp.is_some() {
                c.tcp = tcp;
            }
            if let Some(f) = log_format {
                c.log_format = f;
            }
            if let Some(v) = gc_interval_secs {
                c.gc_interval_secs = v;
            }
            if let Some(v) = gc_grace_secs {
                c.gc_grace_secs = v;
            }
            if let Some(v) = gc_mutation_threshold {
                c.gc_mutation_threshold = v;
            }
            if let Some(v) = gc_deletion_threshold {
                c.gc_deletion_threshold = v;
            }
            if health_tcp.is_some() {
                c.health_tcp = health_tcp;
            }
            if metrics_addr.is_some() {
                c.metrics_addr = metrics_addr;
            }
            if registry_addr.is_some() {
                c.registry_addr = registry_addr;
            }
            if let Some(v) = socket_mode {
                c.socket_mode = v;
            }
            if let Some(v) = scrub_interval_secs {
                c.scrub_interval_secs = v;
            }
            c.validate()?;
            let rt = runtime(c.workers())?;
            let _telemetry = rt.block_on(async {
                contentd::telemetry::init(&c.log_format, c.otlp_endpoint.as_deref())
            })?;
            rt.block_on(contentd::daemon::serve(c))
        }
        Command::Config { cmd } => match cmd {
            ConfigCmd::Default => {
                print!("{}", contentd::config::default_toml());
                Ok(())
            }
            ConfigCmd::Check { path } => {
                let c = Config::load(&path)?;
                c.validate()?;
                println!("{}: valid", path.display());
                Ok(())
            }
        },
        Command::BenchPull {
            reference,
            big_reference,
            runs,
        } => {
            let socket = conn
                .socket
                .clone()
                .context("bench-pull needs --socket (the daemon's client socket)")?;
            let rt = runtime(0)?;
            let f = rt.block_on(contentd::bench_pull::run(contentd::bench_pull::Options {
                socket,
                reference,
                big_reference,
                runs,
            }))?;
            contentd::bench_pull::print(&f);
            Ok(())
        }
        Command::BenchRegistry {
            registry,
            upstream,
            image,
            upstream_log,
            runs,
        } => {
            let socket = conn
                .socket
                .clone()
                .context("bench-registry needs --socket (the daemon's client socket)")?;
            let rt = runtime(0)?;
            let f = rt.block_on(contentd::bench_registry::run(
                contentd::bench_registry::Options {
                    socket,
                    registry,
                    upstream,
                    image,
                    upstream_log,
                    runs,
                    namespace: conn.namespace.clone(),
                },
            ))?;
            contentd::bench_registry::print(&f);
            Ok(())
        }
        Command::Repair { root, force, json } => {
            if !root.is_dir() {
                anyhow::bail!("{} is not a directory", root.display());
            }
            let r = contentd::repair::repair(&root, force)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                if r.rocksdb_repair {
                    println!("RocksDB repair ran on {}", root.display());
                }
                if let Some(dir) = &r.salvage_dir {
                    println!(
                        "{} chunks put back from {} blob-file records (the original blob files are in {dir})",
                        r.chunks_restored, r.blob_file_records
                    );
                }
                println!(
                    "{} blobs verified ({} bytes checked); {} lost, {} could not be checked, {} dangling links dropped",
                    r.blobs_verified,
                    r.bytes_checked,
                    r.blobs_lost.len(),
                    r.blobs_unchecked.len(),
                    r.links_dropped.len()
                );
                for (d, why) in &r.blobs_lost {
                    println!("lost       {d}: {why}");
                }
                for (d, why) in &r.blobs_unchecked {
                    println!("unchecked  {d}: {why}");
                }
                for (scope, d) in &r.links_dropped {
                    println!("link gone  {scope} {d}");
                }
            }
            if r.blobs_lost.is_empty() && r.blobs_unchecked.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("the data directory lost content; see above")
            }
        }
        Command::Simulate {
            seed,
            seeds,
            steps,
            secs,
        } => {
            let secs = secs.or((seeds == u64::MAX).then_some(60));
            let start = std::time::Instant::now();
            match contentd::sim::run_many(
                seed,
                seeds,
                steps,
                secs.map(std::time::Duration::from_secs),
            ) {
                Ok(r) => {
                    println!(
                        "{} seeds from {seed} passed: {} steps, {} commits, {} power losses, {} restarts, {} collections ({} with marks on disk) in {:.1}s",
                        r.seeds,
                        r.steps,
                        r.commits,
                        r.crashes,
                        r.restarts,
                        r.collections,
                        r.spilled_collections,
                        start.elapsed().as_secs_f64()
                    );
                    Ok(())
                }
                Err(f) => anyhow::bail!("{f}"),
            }
        }
        Command::BenchGc {
            root,
            blobs,
            mark_mib,
        } => {
            if root.exists() {
                anyhow::bail!("{} exists; bench-gc builds a fresh store", root.display());
            }
            // The store's own log lines (RUST_LOG), to line its phases up with the writes.
            let _log = contentd::telemetry::init("text", None)?;
            let r = runtime(0)?.block_on(contentd::bench::gc_bench(
                &root,
                blobs,
                mark_mib.saturating_mul(1 << 20),
            ))?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Command::Bench {
            endpoint,
            namespace,
            large_mib,
            runs,
            small,
            ranged_reads,
            info_calls,
            rounds,
            json,
        } => {
            let rt = runtime(0)?;
            let targets: Vec<(Option<String>, PathBuf)> = endpoint
                .iter()
                .map(|s| match s.split_once('=') {
                    Some((l, p)) => (Some(l.to_string()), PathBuf::from(p)),
                    None => (None, PathBuf::from(s)),
                })
                .collect();
            let mut rounds_of: Vec<Vec<contentd::bench::Report>> = vec![Vec::new(); endpoint.len()];
            for round in 0..rounds.max(1) {
                if rounds > 1 {
                    eprintln!("bench: round {} of {rounds}", round + 1);
                }
                for (i, (s, (label, path))) in endpoint.iter().zip(&targets).enumerate() {
                    let opts = contentd::bench::Options {
                        socket: path.clone(),
                        namespace: Some(namespace.clone()),
                        pid: None,
                        large_mib,
                        runs,
                        small_count: small,
                        ranged_reads,
                        info_calls,
                        label: label.clone(),
                    };
                    rounds_of[i].push(
                        rt.block_on(contentd::bench::run(opts))
                            .with_context(|| format!("benchmarking {s}"))?,
                    );
                }
            }
            let reports = rounds_of
                .iter()
                .map(|r| contentd::bench::median_of_rounds(r))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                contentd::bench::print_table(&reports);
            }
            Ok(())
        }
    }
}
