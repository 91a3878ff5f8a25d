//! Visitor hashes for distinct-visitor counts.
//!
//! The speed layer keeps, per (epoch, URL, UTC day), the exact set of visitor hashes (the sparse
//! form of a sketch: live epochs hold cells of events, so the sets stay small). The serving
//! layer narrows them (`tally_core::sketch::narrow`) into a `tally_batch::VisitorSketch` and
//! merges it with the batch view's day sketches, so a visitor seen in both layers counts once.
//! The hash is defined once, in `tally_core::sketch`.

pub use tally_core::sketch::SKETCH_KEYS;

/// The 64-bit hash of a visitor id kept in the speed layer's sets.
pub fn visitor_hash(visitor: &str) -> u64 {
    tally_core::sketch::visitor_hash64(visitor.as_bytes())
}
