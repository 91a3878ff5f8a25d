//! One process writes a `data_dir`: `tally serve` holds an exclusive lock on `data_dir/LOCK`,
//! and writes its address into it so that the CLI can find it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fs4::fs_std::FileExt;

pub(crate) struct DataDirLock {
    file: File,
    path: PathBuf,
}

pub(crate) fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("LOCK")
}

impl DataDirLock {
    /// Takes the lock, or fails naming the process that holds it.
    pub(crate) fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
        let path = lock_path(data_dir);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match FileExt::try_lock_exclusive(&file) {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let holder =
                    holder_address(data_dir).unwrap_or_else(|| "an unknown address".into());
                bail!(
                    "data_dir {} is in use by another tally process (listening on {holder}); \
                     stop it or use another storage.data_dir",
                    data_dir.display()
                );
            }
        }
        let mut lock = DataDirLock { file, path };
        lock.write_address("")?;
        Ok(lock)
    }

    /// Records the server's address (`http://IP:PORT`) and pid in the lock file.
    pub(crate) fn write_address(&mut self, address: &str) -> anyhow::Result<()> {
        let body = format!("{address}\n{}\n", std::process::id());
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(body.as_bytes())?;
        self.file
            .sync_data()
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(())
    }
}

/// Whether another process holds the lock on `data_dir`, without taking it for long.
pub(crate) fn is_locked(data_dir: &Path) -> bool {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .write(true)
        .open(lock_path(data_dir))
    else {
        return false;
    };
    match FileExt::try_lock_exclusive(&file) {
        Ok(true) => {
            let _ = FileExt::unlock(&file);
            false
        }
        _ => true,
    }
}

/// The address the running server wrote into the lock file.
pub(crate) fn holder_address(data_dir: &Path) -> Option<String> {
    let mut s = String::new();
    File::open(lock_path(data_dir))
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    let first = s.lines().next()?.trim().to_string();
    (!first.is_empty()).then_some(first)
}
