//! The byte-shuffle table that expands a block's compacted 4-bit codes into their columns, and the
//! constants that turn a shuffled byte into the decoded weight with one fused multiply-add.
//!
//! The SIMD decoders first rewrite each code `c` as the byte `t = 2c ^ 0x11`, kept
//! weights in column order. For 8 columns whose mask byte is `m`, [`SHUFFLE`]`[m]` holds 8 little-endian
//! u32 lanes: lane `i` has the rank of column `i` among the kept columns (bits of `m` below `i`) in its
//! byte 2, and 0x80 everywhere else. A byte shuffle (x86 `pshufb`, Arm `tbl`) with that index, from the
//! kept bytes starting at this chunk's first rank, puts `t` in byte 2 of each kept lane and zero in
//! every other byte (both instructions write 0 for an index with the high bit set; `tbl` for any index
//! past its table, which 0x80 plus a rank offset still is). XOR with [`MAGIC`] makes every lane an f32:
//!
//! - kept:   bits 0x3F80_0000 | (2c+1) << 16, the float 1 + (2c+1)/128;
//! - pruned: bits 0x3F90_0000, the float 1 + 16/128.
//!
//! so `f * 128s - 144s = s * (2c - 15)` for kept and `0` for pruned weights. One FMA computes it
//! exactly: the exact value is representable (an f16 scale times a 5-bit odd integer) and FMA rounds
//! once; `128s` and `144s = 9 * 16s` are exact in f32 (11 + 4 significant bits). The result is
//! therefore bit-identical to the reference `scale * level`, except that a zero scale gives +0 where
//! the reference may give -0 (the decoders route zero-scale rows through the scalar decoder).

/// Index table for the byte shuffle, one 32-byte entry per mask byte; aligned for vector loads.
#[repr(C, align(32))]
pub struct ShuffleTable(pub [[u8; 32]; 256]);

/// For a source whose 16-byte halves both start at the chunk's first kept byte (NEON's `tbl`, after
/// adding the rank).
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
pub static SHUFFLE: ShuffleTable = ShuffleTable(build(false));

/// For a 32-byte source whose halves meet at the first kept byte of the chunk's upper 4 columns
/// (AVX2): lanes 0-3 index the low half from its end (`16 - r4 + rank`, `r4` the kept count of the
/// low 4 columns), lanes 4-7 the high half from its start (`rank - r4`). The load address then
/// depends only on a popcount of the mask's low bits, and the source is one plain load, where a
/// 16-byte broadcast would cost a shuffle.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub static SPLIT: ShuffleTable = ShuffleTable(build(true));

/// XORed into each shuffled u32 lane to make it an f32 in [1, 1.25).
pub const MAGIC: u32 = 0x3F90_0000;

const fn build(split: bool) -> [[u8; 32]; 256] {
    let mut table = [[0x80u8; 32]; 256];
    let mut m = 0;
    while m < 256 {
        let r4 = ((m & 0xF) as u32).count_ones() as u8;
        let mut rank = 0u8;
        let mut i = 0;
        while i < 8 {
            if (m >> i) & 1 == 1 {
                table[m][4 * i + 2] = match (split, i < 4) {
                    (false, _) => rank,
                    (true, true) => 16 - r4 + rank,
                    (true, false) => rank - r4,
                };
                rank += 1;
            }
            i += 1;
        }
        m += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte the decoders make of code `c`: bit 0 set and bit 4 flipped, so that XOR with
    /// [`MAGIC`]'s byte 2 (0x90) yields 0x80 | (2c + 1).
    fn code_byte(code: u8) -> u8 {
        (2 * code) ^ 0x11
    }

    /// Emulates both shuffles and the FMA in scalar code for every mask byte: the kept codes of a
    /// chunk sit at `first` in a byte array, as the decoders lay them out.
    #[test]
    fn shuffled_lanes_decode_to_scale_times_level() {
        let s = 0.0123f32;
        for m in 0..256usize {
            let first = 20;
            let codes: Vec<u8> = (0..48u8).map(|k| (k * 5 + m as u8) & 0xF).collect();
            let bytes: Vec<u8> = codes.iter().map(|&c| code_byte(c)).collect();
            let r4 = (m & 0xF).count_ones() as usize;
            let pshufb = |src: &[u8], j: u8| {
                if j & 0x80 != 0 {
                    0
                } else {
                    src[(j & 0xF) as usize]
                }
            };
            let mut rank = 0;
            for i in 0..8 {
                let lane = |table: &ShuffleTable, src: &[u8]| {
                    let idx: [u8; 4] = table.0[m][4 * i..4 * i + 4].try_into().unwrap();
                    let f = f32::from_bits(u32::from_le_bytes(idx.map(|j| pshufb(src, j))) ^ MAGIC);
                    f.mul_add(128.0 * s, -144.0 * s)
                };
                let half = first + r4;
                let split_src = if i < 4 {
                    &bytes[half - 16..half]
                } else {
                    &bytes[half..half + 16]
                };
                for w in [
                    lane(&SHUFFLE, &bytes[first..first + 16]),
                    lane(&SPLIT, split_src),
                ] {
                    if m >> i & 1 == 1 {
                        let want = s * (2 * codes[first + rank] as i32 - 15) as f32;
                        assert_eq!(w, want, "mask {m:#x} lane {i}");
                    } else {
                        assert_eq!(w.to_bits(), 0, "mask {m:#x} lane {i}");
                    }
                }
                rank += (m >> i & 1 == 1) as usize;
            }
        }
    }
}
