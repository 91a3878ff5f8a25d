//! `tally master forget`: deletion requests.
//!
//! With the server running on the same `data_dir`, it asks the server (`POST /v1/admin/forget`),
//! which rewrites the files and reruns the batch layer; with it stopped, it does both on the
//! files, holding the `data_dir` lock.

use std::process::ExitCode;

use tally_master::Forget;

use crate::batch_cli::{local, remote};
use crate::config::Config;
use crate::lock::is_locked;
use crate::MasterCommand;

pub(crate) fn run(cfg: Config, cmd: MasterCommand) -> anyhow::Result<ExitCode> {
    let MasterCommand::Forget {
        url_prefix,
        visitor,
        ..
    } = cmd;
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
