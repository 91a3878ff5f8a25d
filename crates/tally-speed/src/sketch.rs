//! Visitor hashes for distinct-visitor counts (issue 5).
//!
//! The speed layer keeps, per (epoch, URL, UTC day), the exact set of visitor hashes (the sparse
//! form of a sketch: live epochs hold hours of events, so the sets stay small). The serving
//! layer turns them into a `tally_batch::sketch::VisitorSketch` (`from_hashes`) and merges it
//! with the batch view's day sketches, so a visitor seen in both layers counts once.
//!
//! [`visitor_hash`] must equal `tally_batch::sketch::visitor_hash` bit for bit: SipHash-1-3 with
//! the fixed keys below over the UTF-8 bytes of the id. It is written out here so that the speed
//! layer does not depend on the batch layer (and its Parquet stack); the test vectors were
//! produced with the `siphasher` crate that `tally-batch` uses.

/// Fixed SipHash-1-3 keys (the same as `tally_batch::sketch::SKETCH_KEYS`).
pub const SKETCH_KEYS: (u64, u64) = (0x7461_6c6c_7973_6b31, 0x9e37_79b9_7f4a_7c15);

/// The 64-bit hash of a visitor id that every sketch is built from.
pub fn visitor_hash(visitor: &str) -> u64 {
    siphash13(SKETCH_KEYS.0, SKETCH_KEYS.1, visitor.as_bytes())
}

#[inline]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

fn siphash13(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let m = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        v[3] ^= m;
        sip_round(&mut v);
        v[0] ^= m;
    }
    let mut b: u64 = (data.len() as u64 & 0xff) << 56;
    for (i, byte) in chunks.remainder().iter().enumerate() {
        b |= u64::from(*byte) << (8 * i);
    }
    v[3] ^= b;
    sip_round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    for _ in 0..3 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visitor_hash_matches_siphasher_sip13_with_the_sketch_keys() {
        // Produced with `siphasher::sip::SipHasher13::new_with_keys(SKETCH_KEYS)` + `write`.
        let vectors: [(&str, u64); 6] = [
            ("", 0x9db4_9a02_1247_dfa4),
            ("a", 0xff2c_e074_70ba_cd15),
            ("visitor-1", 0x107f_81c2_a8c6_b80f),
            ("0123456789abcdef", 0x15d6_51de_1020_cd59),
            ("a much longer visitor id with 33b", 0xf807_6f80_d573_b28d),
            ("ünï", 0x6333_4dc5_3811_d3cd),
        ];
        for (s, want) in vectors {
            assert_eq!(visitor_hash(s), want, "{s:?}");
        }
    }
}
