//! Exponentials, maxima and sums over f32 slices, written so that the compiler turns them into
//! vector code: SSE2 on any x86-64 CPU, AVX2 where the CPU has it (chosen at run time, see
//! [`vectorised`]). The softmaxes, log-softmaxes and SwiGLU of [`super::fused`] spend most of
//! their time here; glibc's `expf` is one scalar call per element (and a slow path for every
//! masked attention key), and a plain `fold(f32::max)` is one dependent comparison per element.
//!
//! The results are the same bit for bit at every vector width and on every x86-64 CPU: no fused
//! multiply-adds, and every sum in a fixed order of [`LANES`] partial sums, so a run does not
//! depend on the machine's instruction set.

/// Partial sums kept side by side (one 256-bit vector of f32); also the decoding product's
/// vector width.
pub(super) const LANES: usize = 8;

/// Defines a public function from one body compiled twice: for the baseline (SSE2 on x86-64)
/// and, on x86-64, for AVX2, which it runs when the CPU has it. The body must not depend on the
/// vector width for its result (fixed partial sums, no fused multiply-adds), and AVX2 alone
/// (without FMA) lets the compiler fuse nothing.
macro_rules! vectorised {
    ($(#[$attr:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports the feature `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Above this, `e^x` overflows f32: the result is +inf.
const EXP_HIGH: f32 = 88.722_84;
/// Below this, `e^x` rounds to zero in f32 (denormals included): the result is 0.
const EXP_LOW: f32 = -103.972_08;

vectorised! {
    /// `e^x` for each element, in place (at most ~2 units in the last place from the true value;
    /// NaN stays NaN).
    pub fn exp_in_place(values: &mut [f32]) {
        values.iter_mut().for_each(|v| *v = exp(*v));
    }
}

vectorised! {
    /// The largest of `values`, NaNs ignored (as `f32::max`; `-inf` when there is none), from
    /// [`LANES`] partial maxima: no chain of dependent comparisons.
    pub fn max(values: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = values.chunks_exact(LANES);
        let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane = lane.max(v);
            }
        }
        lanes.into_iter().fold(tail, f32::max)
    }
}

/// `e^x` without branches (so loops over it vectorise): `x = n ln2 + r` with `|r| <= ln2 / 2`,
/// `e^r` by a degree-7 polynomial (Cephes' `expf` coefficients), times `2^n` built from bits in
/// two halves so that `n` from -150 to 128 stays exact.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: i32 = 0x4B40_0000;
    // ln 2 in two parts: LN2_HIGH has few enough bits that `n * LN2_HIGH` is exact.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(EXP_LOW, EXP_HIGH);
    let rounded = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = rounded.to_bits() as i32 - ROUND_BITS;
    let n_float = rounded - ROUND;
    let r = clamped - n_float * LN2_HIGH - n_float * LN2_LOW;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * (r * r) + r + 1.0;
    let half = n >> 1;
    let power = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let result = e_r * power(half) * power(n - half);
    if x < EXP_LOW {
        0.0
    } else if x > EXP_HIGH {
        f32::INFINITY
    } else {
        result
    }
}

vectorised! {
    /// The sum of `values`, in [`LANES`] partial sums combined in a fixed order.
    pub fn sum(values: &[f32]) -> f32 {
        let mut lanes = [0f32; LANES];
        let chunks = values.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().sum();
        for chunk in chunks {
            for (lane, v) in lanes.iter_mut().zip(chunk) {
                *lane += v;
            }
        }
        combine(lanes) + tail
    }
}

vectorised! {
    /// `Σ a_i b_i`, in [`LANES`] partial sums combined in a fixed order.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
        let mut lanes = [0f32; LANES];
        let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f32 = (a_chunks.remainder().iter())
            .zip(b_chunks.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (a, b) in a_chunks.zip(b_chunks) {
            for ((lane, a), b) in lanes.iter_mut().zip(a).zip(b) {
                *lane += a * b;
            }
        }
        combine(lanes) + tail
    }
}

vectorised! {
    /// The sum of `values` accumulated in f64, in [`LANES`] partial sums combined in a fixed order.
    pub fn sum_f64(values: &[f32]) -> f64 {
        let mut lanes = [0f64; LANES];
        let chunks = values.chunks_exact(LANES);
        let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += f64::from(v);
            }
        }
        combine_f64(lanes) + tail
    }
}

vectorised! {
    /// `(Σ e_i, Σ e_i x_i)` accumulated in f64 (in [`LANES`] partial sums each): the normaliser and
    /// the entropy's numerator of a softmax over a vocabulary, whose f32 sums would lose ~1e-4 over
    /// 152k terms.
    pub fn sums_f64(e: &[f32], x: &[f32]) -> (f64, f64) {
        assert_eq!(e.len(), x.len(), "sums of slices of different lengths");
        let (mut total, mut weighted) = ([0f64; LANES], [0f64; LANES]);
        let (e_chunks, x_chunks) = (e.chunks_exact(LANES), x.chunks_exact(LANES));
        let (mut total_tail, mut weighted_tail) = (0f64, 0f64);
        for (e, x) in e_chunks.remainder().iter().zip(x_chunks.remainder()) {
            total_tail += f64::from(*e);
            weighted_tail += f64::from(e * x);
        }
        for (e, x) in e_chunks.zip(x_chunks) {
            for lane in 0..LANES {
                total[lane] += f64::from(e[lane]);
                weighted[lane] += f64::from(e[lane] * x[lane]);
            }
        }
        (
            combine_f64(total) + total_tail,
            combine_f64(weighted) + weighted_tail,
        )
    }
}

/// The [`LANES`] partial sums added pairwise, in the order a vector reduction adds them.
fn combine(l: [f32; LANES]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// [`combine`] in f64.
fn combine_f64(l: [f64; LANES]) -> f64 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance between two f32 in units in the last place.
    fn ulps(a: f32, b: f32) -> u32 {
        let key = |v: f32| {
            let bits = v.to_bits() as i32;
            if bits < 0 {
                i32::MIN - bits
            } else {
                bits
            }
        };
        key(a).abs_diff(key(b))
    }

    #[test]
    fn exp_is_within_two_ulps_of_the_true_value_over_the_normal_range() {
        // Every 97th f32 between -87 and 88.7 (normal results), plus the exact edges.
        let mut inputs: Vec<f32> = (0..)
            .map(|i| -87.0 + i as f32 * 1.7e-3)
            .take_while(|&x| x < 88.7)
            .collect();
        inputs.extend([
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5 * std::f32::consts::LN_2,
            88.7,
            -87.0,
        ]);
        let mut ours = inputs.clone();
        exp_in_place(&mut ours);
        for (x, got) in inputs.iter().zip(&ours) {
            let want = f64::from(*x).exp() as f32;
            assert!(ulps(*got, want) <= 2, "exp({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn exp_handles_overflow_underflow_denormals_and_nan() {
        let mut values = vec![
            f32::NEG_INFINITY,
            -1e30,
            -104.0,
            -100.0,
            -90.0,
            88.8,
            1e30,
            f32::INFINITY,
            f32::NAN,
        ];
        exp_in_place(&mut values);
        assert_eq!(&values[..2], &[0.0, 0.0]);
        assert_eq!(values[2], 0.0, "e^-104 rounds to zero in f32");
        // Denormal results: close in absolute terms (the smallest denormal is 1.4e-45).
        for (got, x) in values[3..5].iter().zip([-100f64, -90.0]) {
            assert!(
                (f64::from(*got) - x.exp()).abs() < 3e-45,
                "exp({x}) = {got}"
            );
            assert!(*got > 0.0);
        }
        assert_eq!(&values[5..8], &[f32::INFINITY; 3]);
        assert!(values[8].is_nan());
    }

    #[test]
    fn every_vector_width_gives_the_same_bits() {
        // The scalar loop (no vectors), the baseline's and AVX2's loops agree exactly.
        let inputs: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.731).sin() * 60.0).collect();
        let scalar: Vec<u32> = inputs
            .iter()
            .map(|&x| std::hint::black_box(exp)(x).to_bits())
            .collect();
        let mut vector = inputs.clone();
        exp_in_place(&mut vector);
        assert_eq!(
            scalar,
            vector.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let mut portable = inputs.clone();
        portable.iter_mut().for_each(|v| *v = exp(*v));
        assert_eq!(portable, vector);
    }

    #[test]
    fn max_is_the_largest_value_ignoring_nans_at_every_length() {
        let values: Vec<f32> = (0..37)
            .map(|i| ((i * 29 % 31) as f32 - 15.0) * 0.37)
            .collect();
        for len in 0..values.len() {
            for nan_at in [None, Some(len / 2)] {
                let mut row = values[..len].to_vec();
                if let Some(i) = nan_at.filter(|&i| i < len) {
                    row[i] = f32::NAN;
                }
                let want = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max(&row).to_bits(), want.to_bits(), "{row:?}");
            }
        }
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NAN; 9]), f32::NEG_INFINITY);
        assert_eq!(
            max(&[-3.0, f32::INFINITY, 1.0, -1.0, 0.0, 2.0, 5.0, 7.0, 8.0]),
            f32::INFINITY
        );
        // The largest value last, in the tail, and first.
        let mut row = vec![-1.0f32; 19];
        for at in [18, 0, 9] {
            row[at] = 4.5;
            assert_eq!(max(&row), 4.5);
            row[at] = -1.0;
        }
    }

    #[test]
    fn sums_match_f64_sums() {
        let a: Vec<f32> = (0..1005)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let b: Vec<f32> = (0..1005)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.02)
            .collect();
        let want_sum: f64 = a.iter().map(|&v| f64::from(v)).sum();
        let want_dot: f64 = a.iter().zip(&b).map(|(&a, &b)| f64::from(a * b)).sum();
        assert!((f64::from(sum(&a)) - want_sum).abs() < 1e-4);
        assert!((f64::from(dot(&a, &b)) - want_dot).abs() < 1e-4);
        let (total, weighted) = sums_f64(&a, &b);
        assert!((total - want_sum).abs() < 1e-12);
        assert!((sum_f64(&a) - want_sum).abs() < 1e-12);
        assert!((weighted - want_dot).abs() < 1e-12);
        // Short slices: the tail alone.
        assert_eq!(sum(&a[..3]), a[0] + a[1] + a[2]);
        assert_eq!(dot(&[], &[]), 0.0);
    }
}
