//! `Seq`: the position of an event in acknowledgement order.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Sequence number assigned to an event when it is appended to the WAL.
///
/// Strictly increasing, never reused, across restarts too. The first event gets `Seq(1)`;
/// `Seq(0)` means "nothing" (e.g. nothing acknowledged yet, or a cutoff before any event).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }

    /// Zero-padded to 20 digits so that lexicographic order of file names is sequence order.
    pub fn padded(self) -> String {
        format!("{:020}", self.0)
    }

    /// Parses the zero-padded form written by [`Seq::padded`].
    pub fn parse_padded(s: &str) -> Option<Seq> {
        if s.len() != 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().map(Seq)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for Seq {
    fn from(v: u64) -> Self {
        Seq(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_round_trips_and_sorts() {
        let a = Seq(9);
        let b = Seq(10);
        assert_eq!(Seq::parse_padded(&a.padded()), Some(a));
        assert!(a.padded() < b.padded());
        assert_eq!(Seq::parse_padded("12"), None);
        assert_eq!(Seq::parse_padded("0000000000000000000x"), None);
    }
}
