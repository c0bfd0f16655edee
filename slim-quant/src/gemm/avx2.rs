//! The AVX2 products. Two of them:
//!
//! - Any int8 activations: `b` packed as int16 pairs, a 6x16 tile per `vpmaddwd` (pairs of
//!   int16 products summed into int32).
//! - Activations from 0 to 127 (every layer after a ReLU, whose quantized inputs are never
//!   negative): `b` packed as four consecutive rows per int32 lane, as the VNNI kernel packs
//!   them but not offset, and a 4x16 tile per `vpmaddubsw` (pairs of u8 x i8 products summed
//!   into int16), then `vpmaddwd` by ones (pairs of those into int32). A pair's sum is at most
//!   2 x 127 x 128 = 32,512 in size, inside int16: exact, where full-range unsigned bytes
//!   would saturate. Twice the products per instruction of the first, from bytes packed at
//!   half the size; its tiles are finished in registers as the VNNI kernel's are.

use super::vnni::Sink;
use super::{ConvLoads, Finish, Im2col, MatRef, Output, PackedA, QuadPacking, MAX_LOADS};
use std::arch::x86_64::*;

const NR: usize = 16;
/// Six rows of sums in registers (12 accumulators, the two panel halves and a broadcast).
const MR: usize = 6;

/// `b` in panels of 16 columns; within a panel, for each pair of rows `(2p, 2p + 1)`, the
/// 16 columns as interleaved int16 pairs (32 values). Missing rows and columns are zeros.
/// Whole panels are interleaved by byte unpacks and widened sixteen values at a time.
#[target_feature(enable = "avx2")]
unsafe fn pack_b(b: MatRef<'_>) -> (Vec<i16>, usize) {
    let pairs = b.rows.div_ceil(2);
    let panels = b.cols.div_ceil(NR);
    let full = b.cols / NR;
    let len = panels * pairs * 2 * NR;
    let mut packed: Vec<i16> = Vec::with_capacity(len);
    let base = packed.as_mut_ptr();
    for p in 0..pairs {
        let r0 = b.row(2 * p);
        let r1 = (2 * p + 1 < b.rows).then(|| b.row(2 * p + 1));
        for panel in 0..panels {
            let c0 = panel * NR;
            // SAFETY: block (panel, p) of 32 values lies inside the `len` reserved, and
            // every block is written whole below, so all `len` values are set.
            unsafe {
                let dst = base.add((panel * pairs + p) * 2 * NR);
                if panel < full {
                    let x0 = _mm_loadu_si128(r0[c0..c0 + NR].as_ptr().cast());
                    let x1 = match r1 {
                        Some(r1) => _mm_loadu_si128(r1[c0..c0 + NR].as_ptr().cast()),
                        None => _mm_setzero_si128(),
                    };
                    let lo = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x0, x1));
                    let hi = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(x0, x1));
                    _mm256_storeu_si256(dst.cast(), lo);
                    _mm256_storeu_si256(dst.add(NR).cast(), hi);
                } else {
                    let w = b.cols - c0;
                    for c in 0..NR {
                        let (v0, v1) = match c < w {
                            true => (
                                i16::from(r0[c0 + c]),
                                r1.map_or(0, |r| i16::from(r[c0 + c])),
                            ),
                            false => (0, 0),
                        };
                        dst.add(2 * c).write(v0);
                        dst.add(2 * c + 1).write(v1);
                    }
                }
            }
        }
    }
    // SAFETY: every value was written above.
    unsafe { packed.set_len(len) };
    (packed, pairs)
}

/// See [`super::gemm_rows`]; needs AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn gemm(a: &PackedA, rows: std::ops::Range<usize>, b: MatRef<'_>, out: &mut [i32]) {
    let (m, n) = (rows.len(), b.cols);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: this function runs with AVX2.
    let (pb, pairs) = unsafe { pack_b(b) };
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
            // Rows past `m` repeat the last one; their sums are not stored.
            let starts: [*const i32; MR] =
                std::array::from_fn(|r| pa[(i + r).min(m - 1) * pairs..].as_ptr());
            let mut acc = [_mm256_setzero_si256(); 2 * MR];
            let mut q = bp.as_ptr() as *const __m256i;
            for p in 0..pairs {
                // SAFETY: `bp` holds `pairs` blocks of 32 int16 values, and each row of
                // `pa` holds `pairs` words.
                unsafe {
                    let (b0, b1) = (_mm256_loadu_si256(q), _mm256_loadu_si256(q.add(1)));
                    q = q.add(2);
                    for r in 0..MR {
                        let x = _mm256_set1_epi32(*starts[r].add(p));
                        acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(b0, x));
                        acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(b1, x));
                    }
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

/// Rows of a tile of the product of non-negative activations (8 accumulators, the panel's two
/// registers, the broadcast, the ones and two products in the 16 registers).
const MR7: usize = 4;

/// See [`super::gemm_rows`] and [`super::gemm_rows_finished`] for activations from 0 to 127:
/// returns `false`, having written nothing, where `b` holds a negative value. A finished
/// output must be valid as `gemm_rows_finished` requires.
///
/// # Safety
/// The machine has AVX2; `a` was packed for it.
#[target_feature(enable = "avx2")]
pub unsafe fn gemm_u7(
    a: &PackedA,
    rows: std::ops::Range<usize>,
    b: MatRef<'_>,
    sink: Sink,
) -> bool {
    if !(0..b.rows).all(|i| super::nonnegative(b.row(i))) {
        return false;
    }
    if !rows.is_empty() && b.cols > 0 {
        let (pb, quads) = super::vnni::pack_b(b, 0);
        // SAFETY: as the caller promises; `pb` is `b` packed.
        unsafe { product(a, rows, &pb, quads, b.cols, sink) };
    }
    true
}

/// See [`super::gemm_conv_quads_finished`], with `quads` laid out for AVX2 (not offset, so
/// from planes without a negative value).
///
/// # Safety
/// As for [`gemm_u7`], and the output as `gemm_rows_finished` requires.
#[target_feature(enable = "avx2")]
pub unsafe fn gemm_conv_quads(
    a: &PackedA,
    rows: std::ops::Range<usize>,
    src: &Im2col<'_>,
    quads: &[u8],
    finish: &Finish<'_>,
) {
    let n = src.cols();
    if rows.is_empty() || n == 0 {
        return;
    }
    // SAFETY: the machine has AVX2.
    let (pb, depth) = unsafe { pack_quads(src, quads) };
    // SAFETY: as the caller promises; `pb` is the columns packed.
    unsafe { product(a, rows, &pb, depth, n, Sink::Finish(finish)) }
}

/// The columns of a convolution gathered from its quad planes and packed as
/// [`super::vnni::pack_b`] packs a matrix (without the offset), as the VNNI kernel's
/// `pack_quads` does: per panel, tap and group of four channels, the 16 positions' words come
/// in masked loads of eight (one pair per output row the panel touches); padding and
/// positions past the last read as 0.
///
/// # Safety
/// The machine has AVX2; `quads` holds `src`'s planes laid out by `quad_planes` for AVX2.
#[target_feature(enable = "avx2")]
unsafe fn pack_quads(src: &Im2col<'_>, quads: &[u8]) -> (Vec<u8>, usize) {
    let QuadPacking {
        plane,
        groups,
        depth,
        panels,
    } = QuadPacking::of(src, quads);
    let len = panels * depth * 4 * NR;
    let mut packed: Vec<u8> = Vec::with_capacity(len);
    let out = packed.as_mut_ptr();
    let words = quads.as_ptr().cast::<i32>();
    let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    // The lanes of eight whose bits are set in `m`, as a load mask.
    let lanes = |m: u16| {
        let b = _mm256_and_si256(_mm256_set1_epi32(i32::from(m)), bits);
        _mm256_cmpeq_epi32(b, bits)
    };
    let mut made = None;
    let all = ConvLoads::of(src, &mut made);
    for panel in 0..panels {
        let (loads, counts) = all.panel(panel);
        let blocks = out.wrapping_add(panel * depth * 4 * NR);
        for (t, (l, &count)) in loads.iter().zip(counts).enumerate() {
            let l = &l[..usize::from(count)];
            // Each load's two halves (lanes 0..8 and 8..16): the offset, the mask, and what
            // the load is for that half (0: nothing; 1: all eight lanes, a plain load; 2:
            // some, a masked one).
            let kind = |m: u16| match m {
                0 => 0u8,
                0xff => 1,
                _ => 2,
            };
            let mut halves = [[(0isize, _mm256_setzero_si256(), 0u8); 2]; MAX_LOADS];
            for (h, &(at, m)) in halves.iter_mut().zip(l) {
                let (lo, hi) = (m & 0xff, m >> 8);
                *h = [(at, lanes(lo), kind(lo)), (at + 8, lanes(hi), kind(hi))];
            }
            let halves = &halves[..l.len()];
            // The 16 positions in one row of the plane: two plain loads per group.
            let whole = matches!(halves, [[(_, _, 1), (_, _, 1)]]);
            for q in 0..groups {
                let base = words.wrapping_add(q * plane);
                let mut v = [_mm256_setzero_si256(); 2];
                if whole {
                    let p = base.wrapping_offset(halves[0][0].0);
                    // SAFETY: all 16 lanes read words of the plane (see below).
                    unsafe {
                        v = [
                            _mm256_loadu_si256(p.cast()),
                            _mm256_loadu_si256(p.wrapping_add(8).cast()),
                        ];
                    }
                }
                for load in halves.iter().filter(|_| !whole) {
                    for (v, &(at, mask, kind)) in v.iter_mut().zip(load) {
                        let p = base.wrapping_offset(at);
                        // SAFETY: the lanes in each mask read words of the plane (rows and
                        // columns inside it), which `quads` holds (checked above); masked-off
                        // lanes are not read.
                        unsafe {
                            match kind {
                                1 => *v = _mm256_or_si256(*v, _mm256_loadu_si256(p.cast())),
                                2 => *v = _mm256_or_si256(*v, _mm256_maskload_epi32(p, mask)),
                                _ => {}
                            }
                        }
                    }
                }
                let [v0, v1] = v;
                // SAFETY: block `t * groups + q` of the panel lies inside the `len` reserved.
                unsafe {
                    let dst = blocks.add((t * groups + q) * 4 * NR).cast::<__m256i>();
                    _mm256_storeu_si256(dst, v0);
                    _mm256_storeu_si256(dst.add(1), v1);
                }
            }
        }
    }
    // SAFETY: every block of every panel was written above.
    unsafe { packed.set_len(len) };
    (packed, depth)
}

/// The product of `a`'s `rows` with the packed `pb` (`quads` groups of four rows of
/// non-negative values, `n` columns), to `sink`, in tiles of `MR7` rows by 16 columns.
///
/// # Safety
/// As for [`gemm_u7`]; a finished output as `gemm_rows_finished` requires.
#[target_feature(enable = "avx2")]
unsafe fn product(
    a: &PackedA,
    rows: std::ops::Range<usize>,
    pb: &[u8],
    quads: usize,
    n: usize,
    mut sink: Sink,
) {
    let panels = n.div_ceil(NR);
    assert!(pb.len() >= panels * quads * 4 * NR && a.quads.len() >= rows.end * quads);
    let pa = &a.quads[rows.start * quads..rows.end * quads];
    let m = rows.len();
    let lanes = match sink {
        Sink::Finish(f) => Lanes::new(f.out),
        Sink::Sums(_) => Lanes::new(Output::F32(std::ptr::null_mut())),
    };
    let ones = _mm256_set1_epi16(1);
    for panel in 0..panels {
        let c0 = panel * NR;
        let w = NR.min(n - c0);
        let bp = pb[panel * quads * 4 * NR..].as_ptr();
        let mut i = 0;
        while i < m {
            // Rows past `m` repeat the last one; their sums are not stored.
            let ap: [*const i32; MR7] =
                std::array::from_fn(|r| pa[(i + r).min(m - 1) * quads..].as_ptr());
            let mut acc = [[_mm256_setzero_si256(); 2]; MR7];
            for q in 0..quads {
                // SAFETY: the panel holds `quads` blocks of 64 bytes, and each row `quads`
                // words (asserted above).
                unsafe {
                    let x0 = _mm256_loadu_si256(bp.add(q * 4 * NR).cast());
                    let x1 = _mm256_loadu_si256(bp.add(q * 4 * NR + 32).cast());
                    for (acc, &row) in acc.iter_mut().zip(&ap) {
                        let wv = _mm256_set1_epi32(*row.add(q));
                        let (p0, p1) = (_mm256_maddubs_epi16(x0, wv), _mm256_maddubs_epi16(x1, wv));
                        acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(p0, ones));
                        acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(p1, ones));
                    }
                }
            }
            for (r, &[s0, s1]) in acc.iter().enumerate().take(m - i) {
                match sink {
                    Sink::Sums(ref mut out) => {
                        let mut tile = [0i32; NR];
                        // SAFETY: `tile` holds 16 values.
                        unsafe {
                            _mm256_storeu_si256(tile.as_mut_ptr().cast(), s0);
                            _mm256_storeu_si256(tile.as_mut_ptr().add(8).cast(), s1);
                        }
                        out[(i + r) * n + c0..][..w].copy_from_slice(&tile[..w]);
                    }
                    // SAFETY: the caller promises the output's rows.
                    Sink::Finish(f) => unsafe { finish_row(f, &lanes, i + r, c0, w, [s0, s1]) },
                }
            }
            i += MR7;
        }
    }
}

/// A finished output's grid in registers, and whether rounding onto it may take the short
/// way ([`super::relu_grid`]), worked out once for a product.
pub(super) struct Lanes {
    out: Output,
    lo: __m256,
    hi: __m256,
    inv: __m256,
    relu: bool,
}

impl Lanes {
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn new(out: Output) -> Lanes {
        let grid = match out {
            Output::F32(_) => [0.0; 3],
            Output::I8(_, grid) => grid,
        };
        Lanes {
            out,
            lo: _mm256_set1_ps(grid[0]),
            hi: _mm256_set1_ps(grid[1]),
            inv: _mm256_set1_ps(grid[2]),
            relu: super::relu_grid(grid),
        }
    }
}

/// Row `r`, the `w` columns from `c0` of a finished product (sums in two registers of eight):
/// see [`Finish`]; each value as the VNNI kernel's `finish_lanes` computes it.
///
/// # Safety
/// As for [`super::gemm_rows_finished`]; the machine has AVX2.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn finish_row(
    f: &Finish<'_>,
    lanes: &Lanes,
    r: usize,
    c0: usize,
    w: usize,
    s: [__m256i; 2],
) {
    let bias = _mm256_set1_ps(f.bias.map_or(0.0, |b| b[r]));
    let scale = _mm256_set1_ps(f.scales[r]);
    let y = s.map(|s| _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s), scale), bias));
    let at = r * f.ld + c0;
    match lanes.out {
        Output::F32(p) => {
            let mut tile = [0f32; NR];
            // SAFETY: `tile` holds 16 values; the `w` values at `at` are the caller's to write.
            unsafe {
                _mm256_storeu_ps(tile.as_mut_ptr(), y[0]);
                _mm256_storeu_ps(tile.as_mut_ptr().add(8), y[1]);
                std::ptr::copy_nonoverlapping(tile.as_ptr(), p.add(at), w);
            }
        }
        Output::I8(p, _) => {
            let ints = y.map(|y| {
                let q = _mm256_mul_ps(
                    _mm256_min_ps(_mm256_max_ps(y, lanes.lo), lanes.hi),
                    lanes.inv,
                );
                if lanes.relu {
                    // `q` is +0 or more and below 1e9: the clamp to 127 is the saturation of
                    // the narrowing below.
                    _mm256_cvttps_epi32(_mm256_add_ps(q, _mm256_set1_ps(crate::grid::HALF_DOWN)))
                } else {
                    // As `round_to_grid`: plus 1/2 less an ulp with q's sign, clamped, truncated.
                    let sign = _mm256_and_ps(q, _mm256_set1_ps(-0.0));
                    let half = _mm256_or_ps(sign, _mm256_set1_ps(crate::grid::HALF_DOWN));
                    let v = _mm256_min_ps(
                        _mm256_max_ps(_mm256_add_ps(q, half), _mm256_set1_ps(-127.0)),
                        _mm256_set1_ps(127.0),
                    );
                    _mm256_cvttps_epi32(v)
                }
            });
            // Narrowed with saturation: int16 lanes [0..4, 8..12 | 4..8, 12..16], then bytes
            // [0..4, 8..12, 4..8, 12..16], put in order by their 4-byte groups.
            let words = _mm256_packs_epi32(ints[0], ints[1]);
            let (lo, hi) = (
                _mm256_castsi256_si128(words),
                _mm256_extracti128_si256::<1>(words),
            );
            let bytes = _mm_shuffle_epi32::<0b11_01_10_00>(_mm_packs_epi16(lo, hi));
            let mut tile = [0i8; NR];
            // SAFETY: `tile` holds 16 bytes; the `w` values at `at` are the caller's to write.
            unsafe {
                _mm_storeu_si128(tile.as_mut_ptr().cast(), bytes);
                std::ptr::copy_nonoverlapping(tile.as_ptr(), p.add(at), w);
            }
        }
    }
}
