//! `data_dir/dataset_id`: a random id created with the master dataset, naming its history.
//!
//! Derived state stored elsewhere (the speed layer in Redis) is tagged with it, so state that
//! belongs to another history — Redis kept while the `data_dir` was replaced by an empty or
//! another one — is recognised and rebuilt instead of being added to this history's counts.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::paths::{fsync_dir, io_err, TMP_SUFFIX};
use crate::{Error, Result};

/// File name of the dataset id under `data_dir`.
pub const DATASET_ID_FILE: &str = "dataset_id";

/// Reads the id, or creates one (temp, fsync, rename, fsync the directory) when the file does
/// not exist: a new `data_dir`, or one written by a version without ids (its derived state is
/// then rebuilt once).
pub(crate) fn load_or_create(root: &Path) -> Result<String> {
    let path = root.join(DATASET_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(s) if is_valid(s.trim()) => return Ok(s.trim().to_string()),
        Ok(s) => {
            return Err(Error::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not a dataset id: {:?}", s.trim()),
                ),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path)(e)),
    }
    let id: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let tmp = root.join(format!("{DATASET_ID_FILE}{TMP_SUFFIX}"));
    (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    })()
    .map_err(io_err(&path))?;
    fsync_dir(root)?;
    tracing::info!(dataset_id = %id, "new master dataset");
    Ok(id)
}

fn is_valid(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        assert!(is_valid(&a));
        assert_eq!(load_or_create(dir.path()).unwrap(), a);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create(other.path()).unwrap(), a);
        fs::write(dir.path().join(DATASET_ID_FILE), "garbage").unwrap();
        assert!(load_or_create(dir.path()).is_err());
    }
}
