//! Errors of the batch layer.

use std::path::{Path, PathBuf};

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A master file or view file could not be read or written as Parquet.
    #[error("parquet error on {path}: {source}")]
    Parquet {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A master file lacks a column or has an unexpected type.
    #[error("unexpected schema in {path}: {reason}")]
    Schema { path: PathBuf, reason: String },
    /// A view file does not match its manifest (or the manifest is missing or invalid).
    /// `file` is the path of the offending file.
    #[error("batch view file {file} is corrupt: {reason}")]
    Corrupt { file: PathBuf, reason: String },
    #[error("batch view version {0} does not exist")]
    NoSuchVersion(String),
    /// The snapshot of the master dataset cannot give exactly the events up to the cutoff.
    #[error("inconsistent master snapshot: {0}")]
    Snapshot(String),
    #[error("master dataset: {0}")]
    Master(#[from] tally_master::Error),
    /// The cluster log could not cut the epoch (unreachable, or timed out).
    #[error("cluster log: {0}")]
    Log(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A bug: a blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a failure means for the view it concerns: a corrupt view is discarded and recomputed,
/// a transient failure keeps what serves and retries.
pub use tally_core::error::ErrorKind;

impl Error {
    /// Whether this failure is corruption, transient, or a request that cannot be done.
    pub fn kind(&self) -> ErrorKind {
        match self {
            // A view file whose checksum matched its manifest but does not decode, or a master
            // file of the wrong shape, is bad data however often it is read.
            Error::Corrupt { .. } | Error::Parquet { .. } | Error::Schema { .. } => {
                ErrorKind::Corrupt
            }
            Error::NoSuchVersion(_) | Error::Invalid(_) => ErrorKind::Invalid,
            Error::Master(e) => e.kind(),
            Error::Io { .. } | Error::Snapshot(_) | Error::Log(_) | Error::Internal(_) => {
                ErrorKind::Transient
            }
        }
    }

    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub(crate) fn parquet(
        path: impl AsRef<Path>,
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Parquet {
            path: path.as_ref().to_path_buf(),
            source: e.into(),
        }
    }

    pub(crate) fn corrupt(path: impl AsRef<Path>, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            file: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }
}
