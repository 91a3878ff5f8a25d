//! tally-batch
