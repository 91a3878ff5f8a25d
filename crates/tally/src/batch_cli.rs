//! `tally batch run|verify|discard|list`.
//!
//! With the server running on the same `data_dir` (it holds `data_dir/LOCK`), `run` and
//! `discard` ask it to do the work through its admin API: only the server can cut the speed
//! epoch at the run's cutoff. With it stopped, they take the lock and work on the files.
//! `verify` and `list` only read files and work either way.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tally_batch::{ViewStatus, ViewStore};
use tally_master::Master;

use crate::config::Config;
use crate::lock::{holder_address, is_locked, DataDirLock};
use crate::serve::{master_config, runner_config, view_store};
use crate::BatchCommand;

pub(crate) fn run(cfg: Config, cmd: BatchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BatchCommand::Verify { .. } => verify(&cfg),
        BatchCommand::List { .. } => list(&cfg),
        BatchCommand::Run { full, .. } => {
            if is_locked(&cfg.storage.data_dir) {
                let full = if full { "true" } else { "false" };
                remote(&cfg, "/v1/admin/batch", &[("wait", "true"), ("full", full)])
            } else {
                local(&cfg, false, full, None)
            }
        }
        BatchCommand::Discard { .. } => {
            if is_locked(&cfg.storage.data_dir) {
                remote(&cfg, "/v1/admin/batch/discard", &[("wait", "true")])
            } else {
                local(&cfg, true, true, None)
            }
        }
    }
}

fn verify(cfg: &Config) -> anyhow::Result<ExitCode> {
    let store = view_store(cfg)?;
    let Some(version) = store.current()? else {
        println!("no current batch view");
        return Ok(ExitCode::SUCCESS);
    };
    match store.verify(&version) {
        Ok(_) => {
            println!("ok: view {version} matches its manifest");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("BAD: view {version}: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn list(cfg: &Config) -> anyhow::Result<ExitCode> {
    let store = view_store(cfg)?;
    let current = store.current()?;
    println!(
        "{:<2}{:<40} {:>12} {:>10} {:>12} {:>10}",
        "", "version", "cutoff_seq", "status", "events", "bytes"
    );
    for v in store.list()? {
        let mark = if current.as_deref() == Some(v.version.as_str()) {
            "*"
        } else {
            ""
        };
        let status = match v.status {
            ViewStatus::Good => "good",
            ViewStatus::Discarded => "discarded",
            ViewStatus::Invalid => "invalid",
        };
        println!(
            "{:<2}{:<40} {:>12} {:>10} {:>12} {:>10}",
            mark,
            v.version,
            v.cutoff_seq.get(),
            status,
            v.events,
            v.size_bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the running server (address from the lock file) to do the work: `POST path?query`.
pub(crate) fn remote(cfg: &Config, path: &str, query: &[(&str, &str)]) -> anyhow::Result<ExitCode> {
    let base = holder_address(&cfg.storage.data_dir).context(
        "the server holding data_dir has not written its address yet; retry in a moment",
    )?;
    eprintln!("a tally server is running on {base}; asking it to do the work");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(24 * 3600))
        .build()?;
    let mut req = client.post(format!("{base}{path}")).query(query);
    if let Some(token) = cfg.admin_token() {
        req = req.bearer_auth(token);
    }
    let resp = req
        .send()
        .with_context(|| format!("cannot reach the server at {base}"))?;
    let status = resp.status();
    let body: Value = resp.json().unwrap_or(Value::Null);
    if status.is_success() {
        println!("{}", serde_json::to_string_pretty(&body)?);
        Ok(ExitCode::SUCCESS)
    } else {
        let msg = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        bail!("the server answered {status}: {msg}")
    }
}

/// Works on the files with the server stopped, holding the data_dir lock meanwhile.
/// `forget`: first remove those events from the master dataset (`tally master forget`).
pub(crate) fn local(
    cfg: &Config,
    discard_first: bool,
    full: bool,
    forget: Option<tally_master::Forget>,
) -> anyhow::Result<ExitCode> {
    let _lock = DataDirLock::acquire(&cfg.storage.data_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let master = Master::open(master_config(cfg)).context("cannot open the master dataset")?;
        let store: ViewStore = view_store(cfg)?;
        let runner = tally_batch::BatchRunner::new(store, master.clone(), runner_config(cfg));
        if let Some(f) = &forget {
            let (files, events) = master
                .forget(f)
                .await
                .context("cannot remove the events from the master dataset")?;
            println!("removed {events} events from {files} master files");
        }
        if discard_first {
            match runner
                .discard_current("discarded by an operator (tally batch discard)")
                .await
            {
                Ok(Some((v, _))) => println!("discarded view {v}"),
                Ok(None) => println!("no current view to discard"),
                Err(e) => bail!("cannot discard the current view: {e}"),
            }
        }
        let progress = spawn_progress(&runner);
        let trigger = if discard_first {
            tally_batch::Trigger::Discard
        } else {
            tally_batch::Trigger::Cli
        };
        let outcome = runner.run_with(trigger, full).await;
        progress.abort();
        let _ = master.shutdown().await;
        let outcome = outcome.map_err(|e| anyhow::anyhow!("batch run failed: {e}"))?;
        println!(
            "published view {} (cutoff_seq {}, {} events, {} urls) in {} ms; {} files reused, {} computed",
            outcome.version,
            outcome.cutoff_seq.get(),
            outcome.events,
            outcome.urls,
            outcome.duration_ms,
            outcome.files_reused,
            outcome.files_computed
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// A progress bar on a terminal, plain lines otherwise.
fn spawn_progress(runner: &tally_batch::BatchRunner) -> tokio::task::JoinHandle<()> {
    let runner = runner.clone();
    let tty = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        let bar = tty.then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template("{spinner} files {pos}/{len} {wide_bar} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        let mut last = (u64::MAX, u64::MAX);
        loop {
            if let Some(r) = runner.running() {
                let p = r.progress();
                if let Some(b) = &bar {
                    b.set_length(p.files_total);
                    b.set_position(p.files_done);
                    b.set_message(format!("{} events", p.events_done));
                } else if (p.files_done, p.files_total) != last {
                    eprintln!(
                        "files {}/{}, {} events",
                        p.files_done, p.files_total, p.events_done
                    );
                    last = (p.files_done, p.files_total);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}
