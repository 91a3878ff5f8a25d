//! tally-batch: the batch layer.
//!
//! - [`kernel`]: the computation over a snapshot of the master dataset, up to a cutoff `seq`;
//! - [`store`]: versioned view directories with manifests, `CURRENT`, verify, discard, gc;
//! - [`view`]: the in-memory [`BatchView`] the serving layer answers from;
//! - [`sketch`]: mergeable visitor sketches per (URL, day);
//! - [`partials`]: cached per-master-file aggregates, so a run computes only new files;
//! - [`runner`]: one run at a time, retries, progress and history.

mod codec;
pub mod error;
pub mod kernel;
pub mod partials;
pub mod runner;
mod site;
pub mod sketch;
mod sources;
pub mod store;
pub mod view;
pub mod visitors;

pub use error::{Error, ErrorKind, Result};
pub use kernel::{
    compute, compute_cached, compute_sources, compute_sources_cached, ComputeStats, Progress,
    ProgressSnapshot, SketchData, ViewData,
};
pub use partials::PartialCache;
pub use runner::{
    Admission, BatchRunner, EpochCut, HistoryEntry, RunError, RunOutcome, RunStatus, RunnerConfig,
    RunningInfo, StageTimings, StartedRun, Trigger,
};
pub use sketch::{relative_error, visitor_hash, VisitorSketch};
pub use sources::{CampaignCount, SourceCount};
pub use store::{Manifest, ManifestFile, ViewInfo, ViewStatus, ViewStore};
pub use view::{BatchView, UrlCount};
pub use visitors::{KeyVisitors, Piece, Pieces};
