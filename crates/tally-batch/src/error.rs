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
    #[error("parquet error on {path}: {message}")]
    Parquet { path: PathBuf, message: String },
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
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A bug: a blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub(crate) fn parquet(path: impl AsRef<Path>, e: impl std::fmt::Display) -> Error {
        Error::Parquet {
            path: path.as_ref().to_path_buf(),
            message: e.to_string(),
        }
    }

    pub(crate) fn corrupt(path: impl AsRef<Path>, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            file: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }
}
