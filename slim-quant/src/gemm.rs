//! Integer dot-product kernels: every dot product between two sets of int8 rows, with 32-bit
//! accumulation.
//!
//! `dots(a, b)` fills `out[i * n + j] = a_i · b_j` for the `m` rows of `a` (filters) and the `n`
//! rows of `b` (input patches), all of length `k`. On x86-64 with AVX2 (detected at run time)
//! a 4x2 tile of dot products is computed at once: 16 int8 values of each row are widened to
//! int16 (`vpmovsxbw`) and multiplied pairwise into int32 sums (`vpmaddwd`), which cannot
//! saturate for any int8 inputs (unlike `vpmaddubsw`, whose int16 pair sums overflow with
//! full-range unsigned activations). Elsewhere a portable loop computes the same integers.

/// `out[i * n + j] = dot(a[i], b[j])` for `m` rows of `a` and `n` rows of `b`, each `k` long.
pub fn dots(a: &[i8], m: usize, b: &[i8], n: usize, k: usize, out: &mut [i32]) {
    assert!(a.len() >= m * k && b.len() >= n * k && out.len() >= m * n);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present, and the slices hold the rows the asserts above checked.
            unsafe { avx2::dots(a, m, b, n, k, out) };
            return;
        }
    }
    dots_portable(a, m, b, n, k, out);
}

/// The portable kernel (also the reference the AVX2 one is tested against).
pub fn dots_portable(a: &[i8], m: usize, b: &[i8], n: usize, k: usize, out: &mut [i32]) {
    for i in 0..m {
        let ar = &a[i * k..(i + 1) * k];
        for j in 0..n {
            let br = &b[j * k..(j + 1) * k];
            out[i * n + j] = ar
                .iter()
                .zip(br)
                .map(|(&x, &y)| i32::from(x) * i32::from(y))
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// 16 int8 values at `p`, widened to int16.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn widen(p: *const i8) -> __m256i {
        // SAFETY: the caller guarantees 16 readable bytes at `p`.
        unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i)) }
    }

    /// The sum of the eight int32 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    #[inline(always)]
    fn tail(a: &[i8], b: &[i8]) -> i32 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| i32::from(x) * i32::from(y))
            .sum()
    }

    /// One dot product.
    #[target_feature(enable = "avx2")]
    unsafe fn dot(a: &[i8], b: &[i8], k: usize) -> i32 {
        let k16 = k / 16 * 16;
        let mut acc = _mm256_setzero_si256();
        let mut t = 0;
        while t < k16 {
            // SAFETY: t + 16 <= k16 <= k, the length of both rows.
            let (x, y) = unsafe { (widen(a.as_ptr().add(t)), widen(b.as_ptr().add(t))) };
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, y));
            t += 16;
        }
        hsum(acc) + tail(&a[k16..k], &b[k16..k])
    }

    /// See [`super::dots`]; needs AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dots(a: &[i8], m: usize, b: &[i8], n: usize, k: usize, out: &mut [i32]) {
        let k16 = k / 16 * 16;
        let mut i = 0;
        while i + 4 <= m {
            let ar: [&[i8]; 4] = std::array::from_fn(|r| &a[(i + r) * k..(i + r + 1) * k]);
            let mut j = 0;
            while j + 2 <= n {
                let b0 = &b[j * k..(j + 1) * k];
                let b1 = &b[(j + 1) * k..(j + 2) * k];
                let mut acc = [_mm256_setzero_si256(); 8];
                let mut t = 0;
                while t < k16 {
                    // SAFETY: t + 16 <= k16 <= k, the length of every row.
                    unsafe {
                        let y0 = widen(b0.as_ptr().add(t));
                        let y1 = widen(b1.as_ptr().add(t));
                        for r in 0..4 {
                            let x = widen(ar[r].as_ptr().add(t));
                            acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(x, y0));
                            acc[2 * r + 1] =
                                _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(x, y1));
                        }
                    }
                    t += 16;
                }
                for r in 0..4 {
                    let (x, rest) = (&ar[r][k16..], [&b0[k16..], &b1[k16..]]);
                    for c in 0..2 {
                        out[(i + r) * n + j + c] = hsum(acc[2 * r + c]) + tail(x, rest[c]);
                    }
                }
                j += 2;
            }
            for jj in j..n {
                let br = &b[jj * k..(jj + 1) * k];
                for r in 0..4 {
                    // SAFETY: AVX2 is enabled for this function.
                    out[(i + r) * n + jj] = unsafe { dot(ar[r], br, k) };
                }
            }
            i += 4;
        }
        for ii in i..m {
            let ar = &a[ii * k..(ii + 1) * k];
            for jj in 0..n {
                // SAFETY: AVX2 is enabled for this function.
                out[ii * n + jj] = unsafe { dot(ar, &b[jj * k..(jj + 1) * k], k) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn every_shape_and_the_full_int8_range_are_exact() {
        let mut rng = StdRng::seed_from_u64(3);
        for &(m, n, k) in &[
            (1, 1, 1),
            (4, 2, 16),
            (5, 3, 17),
            (8, 9, 31),
            (7, 6, 9),
            (12, 10, 288),
            (3, 1, 1000),
        ] {
            let a: Vec<i8> = (0..m * k).map(|_| rng.random()).collect();
            let b: Vec<i8> = (0..n * k).map(|_| rng.random()).collect();
            let (mut x, mut y) = (vec![0; m * n], vec![0; m * n]);
            dots(&a, m, &b, n, k, &mut x);
            dots_portable(&a, m, &b, n, k, &mut y);
            assert_eq!(x, y, "{m}x{n}x{k}");
        }
        // The extremes, where 16-bit pair sums would saturate: -128 * -128 over long rows.
        let (m, n, k) = (4, 2, 4096);
        let a = vec![-128i8; m * k];
        let b = vec![-128i8; n * k];
        let mut x = vec![0; m * n];
        dots(&a, m, &b, n, k, &mut x);
        assert!(x.iter().all(|&v| v == 16384 * 4096));
    }
}
