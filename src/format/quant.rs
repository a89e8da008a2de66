//! The uniform grid shared by every quantised codec, and the search for the scale that minimises the
//! squared error of a group of weights.
//!
//! A `b`-bit code `c` stands for the odd integer `2c - (2^b - 1)` times the group's scale: for 4 bits the
//! levels are -15s, -13s, ..., 13s, 15s. The grid is symmetric and has no zero level: the sparse codec
//! only stores weights that survived pruning, which are the large ones, so a zero level would be wasted.
//! Decoding is one fused multiply-add, `c * 2s - (2^b - 1) s`, on every backend.

use half::f16;

/// A symmetric grid of `2^bits` odd levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub bits: u32,
}

impl Grid {
    pub const Q4: Grid = Grid { bits: 4 };
    pub const Q3: Grid = Grid { bits: 3 };

    /// The largest code, `2^bits - 1`; also the magnitude of the outermost level.
    pub fn max_code(self) -> u32 {
        (1 << self.bits) - 1
    }

    /// The level of `code` in units of the scale.
    #[inline]
    pub fn level(self, code: u8) -> f32 {
        (2 * code as i32 - self.max_code() as i32) as f32
    }

    /// The code whose level is nearest to `v` (in units of the scale), clamped to the grid.
    #[inline]
    pub fn nearest(self, v: f32) -> u8 {
        let m = self.max_code() as f32;
        ((v + m) * 0.5).round().clamp(0.0, m) as u8
    }

    /// Squared error of quantising `values` with `scale`.
    fn sse(self, values: &[f32], scale: f32) -> f64 {
        if scale == 0.0 {
            return values.iter().map(|&w| (w as f64).powi(2)).sum();
        }
        let inv = 1.0 / scale;
        values
            .iter()
            .map(|&w| {
                let q = self.level(self.nearest(w * inv)) * scale;
                ((w - q) as f64).powi(2)
            })
            .sum()
    }

    /// The f16 scale that minimises the squared error of `values` on this grid.
    ///
    /// The max-abs scale (`max|w| / (2^b - 1)`) never clips but wastes the outer levels on one weight;
    /// a smaller scale trades clipping of the largest weights for finer steps everywhere else. We try a
    /// range of shrink factors, then polish the best with least-squares steps (`s = <w,l> / <l,l>` for
    /// the current codes). Every candidate is rounded to f16 before it is scored, because that is the
    /// scale the decoder will use.
    pub fn best_scale(self, values: &[f32]) -> f16 {
        let amax = values.iter().fold(0.0f32, |m, &w| m.max(w.abs()));
        if amax == 0.0 {
            return f16::ZERO;
        }
        let full = amax / self.max_code() as f32;
        let to_f16 = |s: f32| {
            // A scale too small for f16's normal range still needs to decode the group's largest
            // weight to something non-zero: keep at least the smallest positive f16.
            let h = f16::from_f32(s);
            if h.to_f32() > 0.0 {
                h
            } else {
                f16::from_bits(1)
            }
        };
        let mut best = to_f16(full);
        let mut best_err = self.sse(values, best.to_f32());
        const STEPS: usize = 16;
        for i in 0..STEPS {
            let s = to_f16(full * (0.55 + 0.45 * i as f32 / STEPS as f32));
            let err = self.sse(values, s.to_f32());
            if err < best_err {
                best = s;
                best_err = err;
            }
        }
        for _ in 0..3 {
            let s = best.to_f32();
            let inv = 1.0 / s;
            let (mut wl, mut ll) = (0.0f64, 0.0f64);
            for &w in values {
                let l = self.level(self.nearest(w * inv)) as f64;
                wl += w as f64 * l;
                ll += l * l;
            }
            let refined = to_f16((wl / ll) as f32);
            let err = self.sse(values, refined.to_f32());
            if err < best_err {
                best = refined;
                best_err = err;
            } else {
                break;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_the_odd_integers() {
        let g = Grid::Q4;
        let levels: Vec<f32> = (0..16).map(|c| g.level(c)).collect();
        let expected: Vec<f32> = (-15..=15).step_by(2).map(|l| l as f32).collect();
        assert_eq!(levels, expected);
        for c in 0..16u8 {
            assert_eq!(g.nearest(g.level(c)), c);
        }
        assert_eq!(g.nearest(1e9), 15);
        assert_eq!(g.nearest(-1e9), 0);
    }

    #[test]
    fn best_scale_beats_max_abs() {
        let mut rng = crate::rng::Rng::new(crate::rng::test_seed("best_scale_beats_max_abs"));
        for _ in 0..200 {
            let v = rng.normal_vec(64, 0.02);
            let g = Grid::Q4;
            let best = g.best_scale(&v).to_f32();
            let amax = v.iter().fold(0.0f32, |m, w| m.max(w.abs()));
            let naive = f16::from_f32(amax / 15.0).to_f32();
            assert!(g.sse(&v, best) <= g.sse(&v, naive));
        }
    }
}
