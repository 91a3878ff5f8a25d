//! tally-speed
