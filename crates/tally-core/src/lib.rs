//! Core types of tally: events, their validation and URL normalisation, sequence numbers and
//! time buckets. No I/O of any kind lives here.

pub mod dims;
pub mod error;
pub mod event;
pub mod hash;
pub mod metrics;
pub mod seq;
pub mod sketch;
pub mod sync;
pub mod time;
pub mod url;
pub mod zone;

pub use event::{parse_body, BodyError, BodyFormat, Event, EventError, IngestLimits};
pub use seq::Seq;
pub use time::{
    cell_of, checked_ts, day_of, format_rfc3339, hour_of, month_start, now_ms, parse_ts_param,
    parse_ts_str, CELLS_PER_HOUR, CELL_MS, DAY_MS, HOUR_MS, MAX_TS_MS, MIN_TS_MS,
};
pub use url::{normalize_url, UrlError};
pub use zone::{Granularity, Zone};
