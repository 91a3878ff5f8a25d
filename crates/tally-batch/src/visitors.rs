//! One key's visitors as a batch view keeps them — a URL's, a site's, a source key's — and what
//! a range of cells takes of them.
//!
//! A key has a sketch per UTC day and the distinct visitors of each of its cells (15 minutes).
//! A range of cells takes the day sketches of the UTC days it holds whole and the visitor lists
//! of its other cells: a local day of Asia/Kolkata (18:30Z to 18:30Z) is the lists of 22 cells of
//! one UTC day and 74 of the next; a UTC day is one sketch. Every zone's days, hours and months
//! are whole cells, so the visitors of any of its buckets are exact up to the sketch's error.

use crate::error::Result;
use crate::sketch::VisitorSketch;
use tally_core::{CELL_MS, DAY_MS};

/// Cells per UTC day.
pub(crate) const CELLS_PER_DAY: i64 = DAY_MS / CELL_MS;

/// One key's visitors: its day sketches (`days` ascending, days since the epoch), and for its
/// cells with views (`cells` ascending) their visitor lists: cell `cells[j]` has
/// `hashes[offsets[j]..offsets[j + 1]]`, ascending.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyVisitors<'a> {
    days: &'a [i64],
    sketches: &'a [VisitorSketch],
    cells: &'a [i64],
    offsets: &'a [u32],
    hashes: &'a [u32],
}

/// The pieces of one union of visitors: sketches, and ascending lists of distinct hashes.
#[derive(Debug, Default)]
pub struct Pieces<'a> {
    pub sketches: Vec<&'a VisitorSketch>,
    pub lists: Vec<&'a [u32]>,
}

impl<'a> Pieces<'a> {
    /// The union of the pieces, with `extra` sketches and an ascending list of distinct hashes.
    pub fn union<'b>(
        &self,
        precision: u8,
        extra_sketches: impl IntoIterator<Item = &'b VisitorSketch, IntoIter: Clone> + Clone,
        extra: &'b [u32],
    ) -> Result<VisitorSketch>
    where
        'a: 'b,
    {
        let mut lists: Vec<&[u32]> = Vec::with_capacity(self.lists.len() + 1);
        lists.extend(self.lists.iter().copied());
        lists.push(extra);
        VisitorSketch::union_lists(
            precision,
            self.sketches.iter().copied().chain(extra_sketches),
            &lists,
        )
    }
}

impl<'a> KeyVisitors<'a> {
    /// `offsets` has `cells.len() + 1` entries, indexes into `hashes`.
    pub(crate) fn new(
        (days, sketches): (&'a [i64], &'a [VisitorSketch]),
        cells: &'a [i64],
        offsets: &'a [u32],
        hashes: &'a [u32],
    ) -> KeyVisitors<'a> {
        debug_assert_eq!(days.len(), sketches.len());
        debug_assert!(offsets.len() == cells.len() + 1 || (cells.is_empty() && offsets.is_empty()));
        KeyVisitors {
            days,
            sketches,
            cells,
            offsets,
            hashes,
        }
    }

    /// The day sketches of the days `[from_day, to_day)`, with their days.
    pub fn day_sketches(&self, from_day: i64, to_day: i64) -> (&'a [i64], &'a [VisitorSketch]) {
        let a = self.days.partition_point(|&d| d < from_day);
        let b = a + self.days[a..].partition_point(|&d| d < to_day);
        (&self.days[a..b], &self.sketches[a..b])
    }

    /// The `(cell, visitor list)` of the key's cells in `[from_cell, to_cell)` with visitors.
    pub fn cell_lists(
        &self,
        from_cell: i64,
        to_cell: i64,
    ) -> impl Iterator<Item = (i64, &'a [u32])> + 'a {
        let (cells, offsets, hashes) = (self.cells, self.offsets, self.hashes);
        let a = cells.partition_point(|&c| c < from_cell);
        let b = a + cells[a..].partition_point(|&c| c < to_cell);
        (a..b).filter_map(move |j| {
            let list = &hashes[offsets[j] as usize..offsets[j + 1] as usize];
            (!list.is_empty()).then_some((cells[j], list))
        })
    }

    /// Adds the visitors of the cells `[from_cell, to_cell)` to `out`: the sketches of the UTC
    /// days it holds whole, the lists of its cells in the days it cuts.
    pub fn collect(&self, from_cell: i64, to_cell: i64, out: &mut Pieces<'a>) {
        self.collect_by(from_cell, to_cell, None, &mut |_, piece| match piece {
            Piece::Day(s) => out.sketches.push(s),
            Piece::Cell(l) => out.lists.push(l),
        });
    }

    /// The visitors of the cells `[from_cell, to_cell)` per time bucket: `f(bucket, piece)` for
    /// each piece, where `bucket_of` maps an instant to the start of its bucket (buckets are
    /// whole cells). A UTC day that lies whole in the range and in one bucket is its sketch; the
    /// other days are their cells' lists. Without `bucket_of` the range is one bucket (0).
    pub fn collect_by(
        &self,
        from_cell: i64,
        to_cell: i64,
        bucket_of: Option<&dyn Fn(i64) -> i64>,
        f: &mut dyn FnMut(i64, Piece<'a>),
    ) {
        if from_cell >= to_cell {
            return;
        }
        let (days, sketches) = self.day_sketches(
            from_cell.div_euclid(CELLS_PER_DAY),
            (to_cell - 1).div_euclid(CELLS_PER_DAY) + 1,
        );
        for (&day, sketch) in days.iter().zip(sketches) {
            let (start, end) = (day * CELLS_PER_DAY, (day + 1) * CELLS_PER_DAY);
            let whole_bucket = match bucket_of {
                None => Some(0),
                Some(b) => {
                    let first = b(start * CELL_MS);
                    (first == b((end - 1) * CELL_MS)).then_some(first)
                }
            };
            match whole_bucket {
                Some(bucket) if from_cell <= start && end <= to_cell => {
                    f(bucket, Piece::Day(sketch))
                }
                _ => {
                    for (cell, list) in self.cell_lists(start.max(from_cell), end.min(to_cell)) {
                        let bucket = bucket_of.map_or(0, |b| b(cell * CELL_MS));
                        f(bucket, Piece::Cell(list));
                    }
                }
            }
        }
    }
}

/// A piece of a key's visitors: a UTC day's sketch, or a cell's visitor list.
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    Day(&'a VisitorSketch),
    Cell(&'a [u32]),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One key's data, as a view lays it out.
    struct Key {
        cells: Vec<i64>,
        offsets: Vec<u32>,
        hashes: Vec<u32>,
        days: Vec<i64>,
        sketches: Vec<VisitorSketch>,
    }

    impl Key {
        fn visitors(&self) -> KeyVisitors<'_> {
            KeyVisitors::new(
                (&self.days, &self.sketches),
                &self.cells,
                &self.offsets,
                &self.hashes,
            )
        }
    }

    /// Visitors `1..=n` of cell `c` for each `(c, n)`.
    fn key(cells: &[(i64, u32)]) -> Key {
        let mut offsets = vec![0u32];
        let mut hashes = Vec::new();
        for &(_, n) in cells {
            hashes.extend(1..=n);
            offsets.push(hashes.len() as u32);
        }
        let mut days: Vec<i64> = cells
            .iter()
            .map(|c| c.0.div_euclid(CELLS_PER_DAY))
            .collect();
        days.dedup();
        let sketches = days
            .iter()
            .map(|&d| {
                let n = cells
                    .iter()
                    .filter(|c| c.0.div_euclid(CELLS_PER_DAY) == d)
                    .map(|c| c.1)
                    .max()
                    .unwrap_or(0);
                VisitorSketch::from_hashes(14, (1..=n).collect()).unwrap()
            })
            .collect();
        Key {
            cells: cells.iter().map(|c| c.0).collect(),
            offsets,
            hashes,
            days,
            sketches,
        }
    }

    #[test]
    fn a_range_takes_whole_days_as_sketches_and_cut_days_as_cells() {
        // Day 0: cells 5 (3 visitors) and 90 (7); day 1: cell 100 (2); day 2: cell 200 (9).
        let data = key(&[(5, 3), (90, 7), (100, 2), (200, 9)]);
        let k = data.visitors();
        let count = |a, b| {
            let mut p = Pieces::default();
            k.collect(a, b, &mut p);
            let n = p.union(14, None, &[]).unwrap().estimate() as u64;
            (p.sketches.len(), p.lists.len(), n)
        };
        // All three days whole.
        assert_eq!(count(0, 3 * CELLS_PER_DAY), (3, 0, 9));
        // Asia/Kolkata's day from 18:30Z (cell 74) of day 0: cell 90 of day 0, cell 100 of day 1.
        assert_eq!(count(74, 74 + CELLS_PER_DAY), (0, 2, 7));
        // From cell 74 to the end of day 2: day 0 cut, days 1 and 2 whole.
        assert_eq!(count(74, 3 * CELLS_PER_DAY), (2, 1, 9));
        assert_eq!(count(6, 90), (0, 0, 0));
        assert_eq!(count(10, 10), (0, 0, 0));
    }

    #[test]
    fn buckets_take_a_day_whole_only_when_it_lies_in_one() {
        let data = key(&[(5, 3), (90, 7), (100, 2)]);
        let k = data.visitors();
        // Buckets of 12 hours: every day is cut.
        let half = |ms: i64| ms - ms.rem_euclid(DAY_MS / 2);
        let mut got = Vec::new();
        k.collect_by(0, 2 * CELLS_PER_DAY, Some(&half), &mut |b, p| {
            got.push((b / CELL_MS, matches!(p, Piece::Day(_))))
        });
        assert_eq!(got, vec![(0, false), (48, false), (96, false)]);
        // Buckets of two days: day 0 and 1 whole, in bucket 0.
        let two = |ms: i64| ms - ms.rem_euclid(2 * DAY_MS);
        let mut got = Vec::new();
        k.collect_by(0, 2 * CELLS_PER_DAY, Some(&two), &mut |b, p| {
            got.push((b, matches!(p, Piece::Day(_))))
        });
        assert_eq!(got, vec![(0, true), (0, true)]);
    }
}
