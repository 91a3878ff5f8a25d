//! tally-master
