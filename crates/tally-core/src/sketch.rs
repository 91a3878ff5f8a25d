//! The visitor hash every distinct-visitor sketch is built from, in one place so that the batch
//! and speed layers (and any process) agree bit for bit: SipHash-1-3 under fixed keys over the
//! UTF-8 bytes of the visitor id. Never change the keys: stored sketches depend on them.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// Fixed SipHash-1-3 keys for visitor hashes.
pub const SKETCH_KEYS: (u64, u64) = (0x7461_6c6c_7973_6b31, 0x9e37_79b9_7f4a_7c15);

/// The full 64-bit SipHash-1-3 of a visitor id under [`SKETCH_KEYS`].
pub fn visitor_hash64(bytes: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(SKETCH_KEYS.0, SKETCH_KEYS.1);
    h.write(bytes);
    h.finish()
}

/// The 32-bit hash sketches hold: the high 32 bits of [`visitor_hash64`].
pub fn visitor_hash32(bytes: &[u8]) -> u32 {
    (visitor_hash64(bytes) >> 32) as u32
}

/// Narrows a [`visitor_hash64`] to the sketch hash ([`visitor_hash32`]).
pub fn narrow(hash64: u64) -> u32 {
    (hash64 >> 32) as u32
}

/// Hashes a sparse sketch of precision `p` holds at most; past it, the `2^p` registers are
/// smaller. A sketch's form depends only on its distinct hashes, never on how it was merged.
pub fn sparse_limit(p: u8) -> usize {
    (1usize << p) / 4
}

/// Sets the HyperLogLog register of `hash` in `regs` (`2^p` registers): index = top `p` bits,
/// value = leading zeros of the remaining bits + 1, kept at its maximum.
#[inline]
pub fn set_register(regs: &mut [u8], p: u8, hash: u32) {
    let idx = (hash >> (32 - p)) as usize;
    let rest = hash << p;
    let rank = (rest.leading_zeros() as u8).min(32 - p) + 1;
    if regs[idx] < rank {
        regs[idx] = rank;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_agrees_with_the_32_bit_hash() {
        for v in ["", "v1", "a visitor id"] {
            assert_eq!(
                narrow(visitor_hash64(v.as_bytes())),
                visitor_hash32(v.as_bytes())
            );
        }
        assert_ne!(visitor_hash64(b"v1"), visitor_hash64(b"v2"));
    }
}
