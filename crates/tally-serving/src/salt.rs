//! The daily secret salt of Plausible-compatible visitor ids.

use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::Value;

/// The secret salt of the current UTC day, persisted so that restarts within a day keep
/// visitor ids stable, and replaced at UTC midnight so that ids cannot be linked across days.
pub struct DailySalt {
    path: PathBuf,
    current: Mutex<Option<(i64, [u8; 32])>>,
}

impl DailySalt {
    pub fn new(path: PathBuf) -> DailySalt {
        DailySalt {
            path,
            current: Mutex::new(None),
        }
    }

    /// The salt for `day` (days since the epoch), creating and persisting a new one when the
    /// day changed.
    pub fn for_day(&self, day: i64) -> [u8; 32] {
        let mut guard = tally_core::sync::lock(&self.current);
        if let Some((d, salt)) = *guard {
            if d == day {
                return salt;
            }
        }
        let salt = self.read(day).unwrap_or_else(|| {
            let salt: [u8; 32] = rand::random();
            self.write(day, &salt);
            salt
        });
        *guard = Some((day, salt));
        salt
    }

    fn read(&self, day: i64) -> Option<[u8; 32]> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        if v.get("day")?.as_i64()? != day {
            return None;
        }
        let hex = v.get("salt")?.as_str()?;
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()?;
        bytes.try_into().ok()
    }

    fn write(&self, day: i64, salt: &[u8; 32]) {
        let hex: String = salt.iter().map(|b| format!("{b:02x}")).collect();
        let body = serde_json::json!({ "day": day, "salt": hex }).to_string();
        let tmp = self.path.with_extension("tmp");
        let result = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot persist the daily salt; visitor ids change on restart today");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salt_is_kept_within_a_day_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("salt.json");
        let a = DailySalt::new(path.clone()).for_day(100);
        assert_eq!(DailySalt::new(path.clone()).for_day(100), a);
        assert_ne!(DailySalt::new(path).for_day(101), a);
    }
}
