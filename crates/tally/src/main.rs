//! `tally`: the page-view analytics server and its command line.

mod batch_cli;
mod config;
mod lock;
mod master_cli;
mod serve;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: every request and every ingested event allocates
/// (parsed strings, JSON answers, mirror entries), and glibc's malloc/free were a fifth of the
/// CPU of a query profile (`malloc_consolidate`, `_int_malloc`, `_int_free`). Built without
/// transparent huge pages (the workspace's `no_thp` feature): mimalloc 3 asks for them by
/// default, and under the mixed benchmark's ingest the kernel then spent 12 % of tally's CPU
/// zeroing fresh 2 MiB pages (`clear_page_erms`); 1 % without (BENCHMARKS.md, "Mixed").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "Exact page-view analytics on the Lambda architecture"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: ingestion, speed layer, serving layer and batch scheduler.
    Serve {
        /// Configuration file (overrides the built-in defaults; TALLY_* variables override it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Work with the master dataset: deletion requests.
    Master {
        #[command(subcommand)]
        command: MasterCommand,
    },
    /// Work with the batch layer (on the files, or through the running server).
    Batch {
        #[command(subcommand)]
        command: BatchCommand,
    },
}

#[derive(Subcommand)]
pub(crate) enum MasterCommand {
    /// Remove every event of a URL prefix or of a visitor from the master dataset (rewriting
    /// the files that hold them), then run the batch layer so that no view counts them. For
    /// deletion requests; logged.
    Forget {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Events whose URL starts with this (normalised: scheme and host in lower case).
        #[arg(long, conflicts_with = "visitor", required_unless_present = "visitor")]
        url_prefix: Option<String>,
        /// Events of this visitor id.
        #[arg(long)]
        visitor: Option<String>,
    },
    /// Publish this data_dir's master dataset (sealed files and WAL) to a cluster's log (NATS
    /// JetStream), once: how a single node moves into cluster mode. Every cluster node then
    /// counts these events as if they had been posted to it. The server must be stopped.
    /// Resumable: what is published is recorded in data_dir/upload_progress, and a rerun goes on
    /// after it (a message interrupted half-way is sent again with the same id, which the log
    /// stores once within its 2-minute duplicate window).
    Upload {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The log, nats://host:port[,…] (default: queue.url of the configuration).
        #[arg(long)]
        to: Option<String>,
    },
}

impl MasterCommand {
    fn config(&self) -> Option<&PathBuf> {
        match self {
            MasterCommand::Forget { config, .. } | MasterCommand::Upload { config, .. } => {
                config.as_ref()
            }
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum BatchCommand {
    /// One batch recompute; exits 0 once the new view is published. Reuses the cached
    /// partial aggregates of master files earlier runs read.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Ignore every cached partial and read every master file (same result).
        #[arg(long)]
        full: bool,
    },
    /// Check the current view against its manifest; exit 1 naming the bad file.
    Verify {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Mark the current view discarded and rerun the batch layer.
    Discard {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List view versions with their cutoff, status and size.
    List {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

impl BatchCommand {
    fn config(&self) -> Option<&PathBuf> {
        match self {
            BatchCommand::Run { config, .. }
            | BatchCommand::Verify { config }
            | BatchCommand::Discard { config }
            | BatchCommand::List { config } => config.as_ref(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => config::Config::load(config.as_deref()).and_then(|cfg| {
            telemetry::init(&cfg.log, false);
            serve::run(cfg)
        }),
        Command::Master { command } => config::Config::load(command.config().map(PathBuf::as_path))
            .and_then(|cfg| {
                telemetry::init(&cfg.log, true);
                master_cli::run(cfg, command)
            }),
        Command::Batch { command } => config::Config::load(command.config().map(PathBuf::as_path))
            .and_then(|cfg| {
                telemetry::init(&cfg.log, true);
                batch_cli::run(cfg, command)
            }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
