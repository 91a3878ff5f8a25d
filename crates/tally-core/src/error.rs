//! What a failure means, so that whoever handles it decides by kind, not by message (STYLE.md,
//! "errors that classify themselves"): every crate's error answers [`ErrorKind`].

/// Whether a failure is corruption, transient, or the caller's mistake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The data is bad (checksum mismatch, undecodable or inconsistent file, invalid manifest,
    /// a corrupt WAL record): retrying cannot help. Derived data is discarded and recomputed;
    /// source data is reported, never silently dropped.
    Corrupt,
    /// The data may be fine but could not be read or written now (I/O errors such as `EIO`,
    /// `EMFILE`, `ENOSPC`; Redis unreachable; a failed task): keep what serves and retry later.
    /// Never discard because of it.
    Transient,
    /// The request names something that does not exist or cannot be done (an unknown or
    /// discarded version, an invalid argument): the caller's to fix.
    Invalid,
}
