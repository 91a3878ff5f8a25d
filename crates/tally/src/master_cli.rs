//! `tally master forget`: deletion requests; `tally master upload`: a single node's master
//! dataset into a cluster's log.
//!
//! With the server running on the same `data_dir`, `forget` asks the server
//! (`POST /v1/admin/forget`), which rewrites the files and reruns the batch layer; with it
//! stopped, it does both on the files, holding the `data_dir` lock.

use std::process::ExitCode;

use anyhow::{bail, Context};
use tally_core::Seq;
use tally_master::{Forget, Master};

use crate::batch_cli::{local, remote};
use crate::config::Config;
use crate::lock::{is_locked, DataDirLock};
use crate::serve::master_config;
use crate::MasterCommand;

pub(crate) fn run(cfg: Config, cmd: MasterCommand) -> anyhow::Result<ExitCode> {
    let (url_prefix, visitor) = match cmd {
        MasterCommand::Forget {
            url_prefix,
            visitor,
            ..
        } => (url_prefix, visitor),
        MasterCommand::Upload { to, .. } => return upload(cfg, to),
    };
    let (key, value, forget) = match (url_prefix, visitor) {
        (Some(p), _) => ("url_prefix", p.clone(), Forget::url_prefix(&p)),
        (None, Some(v)) => ("visitor", v.clone(), Forget::visitor(&v)),
        (None, None) => anyhow::bail!("name --url-prefix or --visitor"),
    };
    let forget = forget.map_err(|e| anyhow::anyhow!("{e}"))?;
    if is_locked(&cfg.storage.data_dir) {
        remote(
            &cfg,
            "/v1/admin/forget",
            &[(key, value.as_str()), ("wait", "true")],
        )
    } else {
        local(&cfg, false, false, Some(forget))
    }
}

/// Where `tally master upload` records how far it got: `<stream identity> <last seq published>`.
const UPLOAD_FILE: &str = "upload_progress";

/// The `seq` windows the master dataset is read in (one node's `seq`s are dense: as many
/// events at most).
const UPLOAD_READ: u64 = 50_000;

fn upload(cfg: Config, to: Option<String>) -> anyhow::Result<ExitCode> {
    let mut queue = cfg.queue.clone();
    if let Some(url) = to {
        queue.url = url;
    }
    let Some(mut log_cfg) = queue.log(&cfg.cluster) else {
        bail!("name the cluster's log: --to nats://host:port, or queue.url in the configuration");
    };
    if !log_cfg
        .url
        .split(',')
        .all(|u| u.trim().starts_with("nats://"))
    {
        bail!(
            "the log must be nats://host:port[,…], not {:?}",
            log_cfg.url
        );
    }
    log_cfg.node_id = "upload".into();
    let dir = cfg.storage.data_dir.clone();
    let _lock = DataDirLock::acquire(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let master = Master::open(master_config(&cfg)).context("cannot open the master dataset")?;
        let url = log_cfg.url.clone();
        let log = tally_log::Log::connect(log_cfg)
            .await
            .context("cannot set up the NATS client")?;
        if !log.connected() {
            bail!("cannot reach NATS at {url}");
        }
        let identity = log.stream_identity().await?;
        let mut after = match std::fs::read_to_string(dir.join(UPLOAD_FILE)) {
            Ok(text) => match text.split_whitespace().collect::<Vec<_>>()[..] {
                [id, through] if id == identity => Seq(through
                    .parse()
                    .with_context(|| format!("{} is garbled", dir.join(UPLOAD_FILE).display()))?),
                [id, _] => bail!(
                    "{} was uploaded to {id}, not to {identity}; delete {} to upload it again",
                    dir.display(),
                    dir.join(UPLOAD_FILE).display()
                ),
                _ => bail!("{} is garbled", dir.join(UPLOAD_FILE).display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Seq::ZERO,
            Err(e) => return Err(e).context("cannot read the upload progress"),
        };
        let acked = master.acked_seq();
        let (mut events_sent, mut messages) = (0u64, 0u64);
        let max_bytes = log.max_message_bytes();
        while after < acked {
            // Windows aligned to multiples of UPLOAD_READ, and messages cut greedily from their
            // first event: a message is a function of its first seq and the data alone, so a
            // rerun after an interruption builds the same messages under the same ids, and
            // JetStream keeps one copy of each.
            let window_end = (after.0 / UPLOAD_READ + 1) * UPLOAD_READ;
            let through = Seq(window_end.min(acked.0));
            let m = master.clone();
            let read = tokio::task::spawn_blocking(move || m.read_range(after, through))
                .await
                .context("reading the master dataset stopped")??;
            let events: Vec<tally_core::Event> = read.iter().map(|e| e.event.clone()).collect();
            let mut start = 0;
            while start < events.len() {
                // As many events as one message holds (halving from 4 096 until they fit).
                let mut end = (start + 4096).min(events.len());
                while end - start > 1
                    && tally_master::encode_events(&events[start..end]).len() > max_bytes
                {
                    end = start + (end - start) / 2;
                }
                let first = read[start].seq;
                let last = read[end - 1].seq;
                let id = format!("upload-{}-{first}", master.dataset_id());
                log.publish_events_with_id(&events[start..end], id)
                    .await
                    .with_context(|| format!("publishing seq {first}..={last}"))?;
                tally_log::write_durably(&dir, UPLOAD_FILE, &format!("{identity} {last}\n"))?;
                events_sent += (end - start) as u64;
                messages += 1;
                start = end;
            }
            after = through;
            tracing::info!(through = through.get(), of = acked.get(), "uploading");
        }
        master.shutdown().await?;
        if events_sent == 0 {
            println!("nothing left to upload: {} is in {identity}", dir.display());
        } else {
            println!("uploaded {events_sent} events in {messages} messages to {identity}");
        }
        Ok(ExitCode::SUCCESS)
    })
}
