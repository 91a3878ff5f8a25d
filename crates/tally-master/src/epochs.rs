//! The durable list of speed-layer epoch starts, `data_dir/epochs.json`.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tally_core::Seq;

use crate::paths::{fsync_dir, io_err, TMP_SUFFIX};
use crate::{Error, Result};

#[derive(Serialize, Deserialize)]
struct EpochsFile {
    version: u32,
    epochs: Vec<Seq>,
}

pub(crate) struct Epochs {
    path: PathBuf,
    list: Mutex<Vec<Seq>>,
}

impl Epochs {
    /// Loads the list, or starts with `[Seq(1)]` when the file does not exist.
    pub(crate) fn load(path: &Path) -> Result<Epochs> {
        let list = match fs::read(path) {
            Ok(bytes) => {
                let f: EpochsFile = serde_json::from_slice(&bytes).map_err(|e| Error::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?;
                let mut l = f.epochs;
                l.sort();
                l.dedup();
                if l.is_empty() {
                    vec![Seq(1)]
                } else {
                    l
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![Seq(1)],
            Err(e) => return Err(io_err(path)(e)),
        };
        Ok(Epochs {
            path: path.to_path_buf(),
            list: Mutex::new(list),
        })
    }

    pub(crate) fn get(&self) -> Vec<Seq> {
        tally_core::sync::lock(&self.list).clone()
    }

    /// The start of the open (last) epoch.
    pub(crate) fn last_start(&self) -> Seq {
        *tally_core::sync::lock(&self.list)
            .last()
            .expect("never empty")
    }

    /// Records a new epoch starting at `c + 1`, durably, unless the open epoch already starts
    /// there. Returns `c`.
    pub(crate) fn cut(&self, c: Seq) -> Result<Seq> {
        let mut list = tally_core::sync::lock(&self.list);
        let start = c.next();
        if list.last().is_some_and(|&s| s >= start) {
            return Ok(c);
        }
        let mut new = list.clone();
        new.push(start);
        self.persist(&new)?;
        *list = new;
        Ok(c)
    }

    /// Forgets the epochs that end at or before `start`, keeping the one containing it.
    pub(crate) fn forget_before(&self, start: Seq) -> Result<()> {
        let mut list = tally_core::sync::lock(&self.list);
        // Index of the epoch containing `start`: the last one starting at or before it.
        let keep_from = match list.iter().rposition(|&s| s <= start) {
            Some(i) => i,
            None => return Ok(()),
        };
        if keep_from == 0 {
            return Ok(());
        }
        let new = list[keep_from..].to_vec();
        self.persist(&new)?;
        *list = new;
        Ok(())
    }

    /// Temp file, fsync, rename, fsync the directory.
    fn persist(&self, list: &[Seq]) -> Result<()> {
        let body = serde_json::to_vec(&EpochsFile {
            version: 1,
            epochs: list.to_vec(),
        })
        .expect("epochs serialise");
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(TMP_SUFFIX);
        let tmp = PathBuf::from(tmp);
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(Error::Unavailable {
                what: format!("writing {}", self.path.display()),
                source: std::sync::Arc::new(e),
            });
        }
        if let Some(dir) = self.path.parent() {
            fsync_dir(dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_forget_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("epochs.json");
        let e = Epochs::load(&p).unwrap();
        assert_eq!(e.get(), vec![Seq(1)]);
        assert_eq!(e.cut(Seq(0)).unwrap(), Seq(0)); // open epoch empty: no duplicate
        assert_eq!(e.get(), vec![Seq(1)]);
        e.cut(Seq(10)).unwrap();
        e.cut(Seq(10)).unwrap();
        e.cut(Seq(20)).unwrap();
        assert_eq!(e.get(), vec![Seq(1), Seq(11), Seq(21)]);
        e.forget_before(Seq(15)).unwrap();
        assert_eq!(e.get(), vec![Seq(11), Seq(21)]);
        e.forget_before(Seq(21)).unwrap();
        assert_eq!(Epochs::load(&p).unwrap().get(), vec![Seq(21)]);
    }
}
