//! tally-serving
