//! The int8 matrix product of the runtime: `C (m x n, i32) = A (m x k, i8) * B (k x n, i8)`,
//! with 32-bit accumulation.
//!
//! `A` holds filters (one row per output channel) and `B` input columns (for a convolution,
//! one row per kernel tap and channel, one column per output position; for a 1x1 convolution,
//! the input itself). On x86-64 with AVX2 (detected at run time) `B` is packed in panels of 16
//! columns with pairs of consecutive rows interleaved as int16, and a 4x16 tile of `C` is
//! computed with `vpmaddwd` (pairs of int16 products summed into int32): exact for every int8
//! input, unlike `vpmaddubsw`, whose int16 pair sums saturate with full-range unsigned
//! activations. Elsewhere a portable loop computes the same integers.

/// A view of a row-major int8 matrix with a row stride.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [i8],
    pub rows: usize,
    pub cols: usize,
    /// Distance between the starts of two rows (at least `cols`).
    pub stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense `rows x cols` matrix.
    pub fn new(data: &'a [i8], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            stride: cols,
        }
    }
    fn row(&self, i: usize) -> &'a [i8] {
        &self.data[i * self.stride..i * self.stride + self.cols]
    }
    fn check(&self) {
        assert!(
            self.stride >= self.cols
                && (self.rows == 0 || self.data.len() >= (self.rows - 1) * self.stride + self.cols),
            "matrix view out of bounds"
        );
    }
}

/// The left operand (filters) prepared once for many products: its rows, and on AVX2 the
/// same values as int32 words of two consecutive int16, ready to broadcast.
pub struct PackedA {
    rows: usize,
    cols: usize,
    data: Vec<i8>,
    words: Vec<i32>,
}

impl PackedA {
    pub fn new(a: MatRef<'_>) -> PackedA {
        a.check();
        let pairs = a.cols.div_ceil(2);
        let (mut data, mut words) = (Vec::new(), Vec::new());
        if vector() {
            words = vec![0i32; a.rows * pairs];
            // Two int16 values in one word: the first in the low half, as they sit in memory.
            let word = |lo: i8, hi: i8| {
                (u32::from(i16::from(lo) as u16) | (u32::from(i16::from(hi) as u16) << 16)) as i32
            };
            for (i, dst) in words
                .chunks_exact_mut(pairs.max(1))
                .enumerate()
                .take(a.rows)
            {
                let r = a.row(i);
                for (w, pair) in dst.iter_mut().zip(r.chunks_exact(2)) {
                    *w = word(pair[0], pair[1]);
                }
                if a.cols % 2 == 1 {
                    dst[pairs - 1] = word(r[a.cols - 1], 0);
                }
            }
        } else {
            data.reserve(a.rows * a.cols);
            for i in 0..a.rows {
                data.extend_from_slice(a.row(i));
            }
        }
        PackedA {
            rows: a.rows,
            cols: a.cols,
            data,
            words,
        }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
}

fn vector() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out (a.rows x b.cols, row-major) = a * b`.
pub fn gemm(a: MatRef<'_>, b: MatRef<'_>, out: &mut [i32]) {
    let p = PackedA::new(a);
    gemm_rows(&p, 0..p.rows, b, out);
}

/// `out = a[rows] * b`: the product of some rows of a packed left operand.
pub fn gemm_rows(a: &PackedA, rows: std::ops::Range<usize>, b: MatRef<'_>, out: &mut [i32]) {
    b.check();
    assert!(rows.end <= a.rows, "rows out of range");
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    assert!(out.len() >= rows.len() * b.cols);
    #[cfg(target_arch = "x86_64")]
    {
        if vector() {
            // SAFETY: AVX2 is present (so `a.words` was made); the views were checked.
            unsafe { avx2::gemm(a, rows, b, out) };
            return;
        }
    }
    let view = MatRef {
        data: &a.data[rows.start * a.cols..rows.end * a.cols],
        rows: rows.len(),
        cols: a.cols,
        stride: a.cols,
    };
    gemm_portable(view, b, out);
}

/// The portable product (also the reference the vector kernel is tested against).
pub fn gemm_portable(a: MatRef<'_>, b: MatRef<'_>, out: &mut [i32]) {
    let n = b.cols;
    for i in 0..a.rows {
        let row = &mut out[i * n..(i + 1) * n];
        row.iter_mut().for_each(|v| *v = 0);
        for (t, &w) in a.row(i).iter().enumerate() {
            let w = i32::from(w);
            for (o, &x) in row.iter_mut().zip(b.row(t)) {
                *o += w * i32::from(x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MatRef, PackedA};
    use std::arch::x86_64::*;

    const NR: usize = 16;
    const MR: usize = 4;

    /// `b` in panels of 16 columns; within a panel, for each pair of rows `(2p, 2p + 1)`, the
    /// 16 columns as interleaved int16 pairs (32 values). Missing rows and columns are zeros.
    fn pack_b(b: MatRef<'_>) -> (Vec<i16>, usize) {
        let pairs = b.rows.div_ceil(2);
        let panels = b.cols.div_ceil(NR);
        let mut packed = vec![0i16; panels * pairs * 2 * NR];
        for p in 0..pairs {
            let r0 = b.row(2 * p);
            let r1 = (2 * p + 1 < b.rows).then(|| b.row(2 * p + 1));
            for panel in 0..panels {
                let dst = &mut packed[(panel * pairs + p) * 2 * NR..][..2 * NR];
                let c0 = panel * NR;
                let w = NR.min(b.cols - c0);
                for c in 0..w {
                    dst[2 * c] = i16::from(r0[c0 + c]);
                    if let Some(r1) = r1 {
                        dst[2 * c + 1] = i16::from(r1[c0 + c]);
                    }
                }
            }
        }
        (packed, pairs)
    }

    /// See [`super::gemm_rows`]; needs AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemm(a: &PackedA, rows: std::ops::Range<usize>, b: MatRef<'_>, out: &mut [i32]) {
        let (m, n) = (rows.len(), b.cols);
        if m == 0 || n == 0 {
            return;
        }
        let (pb, pairs) = pack_b(b);
        let pa = &a.words[rows.start * pairs..rows.end * pairs];
        let panels = n.div_ceil(NR);
        let mut tile = [0i32; MR * NR];
        for panel in 0..panels {
            let c0 = panel * NR;
            let w = NR.min(n - c0);
            let bp = &pb[panel * pairs * 2 * NR..(panel + 1) * pairs * 2 * NR];
            let mut i = 0;
            while i < m {
                let rows = MR.min(m - i);
                let mut acc = [_mm256_setzero_si256(); 2 * MR];
                for p in 0..pairs {
                    // SAFETY: `bp` holds `pairs` blocks of 32 int16 values.
                    let (b0, b1) = unsafe {
                        let q = bp.as_ptr().add(p * 2 * NR) as *const __m256i;
                        (_mm256_loadu_si256(q), _mm256_loadu_si256(q.add(1)))
                    };
                    for r in 0..MR {
                        // Rows past `m` repeat the last one; their sums are not stored.
                        let row = (i + r).min(m - 1);
                        let x = _mm256_set1_epi32(pa[row * pairs + p]);
                        acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(b0, x));
                        acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(b1, x));
                    }
                }
                // Lane j of the first register is column j of the panel, of the second
                // column 8 + j.
                for r in 0..rows {
                    // SAFETY: `tile` has room for 16 values of row r.
                    unsafe {
                        let t = tile.as_mut_ptr().add(r * NR) as *mut __m256i;
                        _mm256_storeu_si256(t, acc[2 * r]);
                        _mm256_storeu_si256(t.add(1), acc[2 * r + 1]);
                    }
                    out[(i + r) * n + c0..(i + r) * n + c0 + w]
                        .copy_from_slice(&tile[r * NR..r * NR + w]);
                }
                i += MR;
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
            (4, 16, 2),
            (5, 17, 3),
            (8, 9, 31),
            (7, 33, 9),
            (12, 10, 288),
            (3, 1, 1000),
            (64, 49, 576),
        ] {
            let a: Vec<i8> = (0..m * k).map(|_| rng.random()).collect();
            // B as a view with a row stride wider than its columns.
            let stride = n + 3;
            let b: Vec<i8> = (0..k * stride).map(|_| rng.random()).collect();
            let (av, bv) = (
                MatRef::new(&a, m, k),
                MatRef {
                    data: &b,
                    rows: k,
                    cols: n,
                    stride,
                },
            );
            let (mut x, mut y) = (vec![0; m * n], vec![0; m * n]);
            gemm(av, bv, &mut x);
            gemm_portable(av, bv, &mut y);
            assert_eq!(x, y, "{m}x{n}x{k}");
            // And by the definition.
            let (i, j) = (m - 1, n - 1);
            let d: i32 = (0..k)
                .map(|t| i32::from(a[i * k + t]) * i32::from(b[t * stride + j]))
                .sum();
            assert_eq!(y[i * n + j], d);
        }
        // The extremes, where 16-bit pair sums would saturate: -128 * -128 over long rows.
        let (m, n, k) = (4, 16, 4096);
        let a = vec![-128i8; m * k];
        let b = vec![-128i8; k * n];
        let mut x = vec![0; m * n];
        gemm(MatRef::new(&a, m, k), MatRef::new(&b, k, n), &mut x);
        assert!(x.iter().all(|&v| v == 16384 * 4096));
    }
}
