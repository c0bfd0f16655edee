//! The product of a pointwise (1x1, stride 1) convolution, `out_n = act(W · X_n + b)` for
//! each sample, with `W` `[O, K]`, `X_n` the sample's `[K, P]` planes read where they lie, and
//! the bias and activation applied as each output tile leaves the registers.
//!
//! A tile of `MR` output channels by `NR` positions is accumulated in registers over the
//! input channels: per input channel, `NR` values of that channel's plane and `MR` weights,
//! one multiply-add each. The planes are rows of `X` already, so nothing is packed except
//! blocks of positions that span samples or end the batch (copied into a zero-padded panel).
//! The inputs are read in blocks of `KC` channels, so that a block of planes stays in the first-level cache
//! while every tile of channels passes over it. With AVX2 and FMA (checked at run time) the
//! tile lives in 12 vector registers; with AVX-512 F a product's tiles are `MR_WIDE` channels
//! by `NR_WIDE` positions in 16 registers, the same sums in the same order; elsewhere a
//! portable loop computes the same.
//!
//! The same tiles make every other product of the convolution kernels: a dense convolution's
//! forward and input-gradient columns (its unfolded columns as the planes), and every weight
//! gradient ([`WeightGrad`]).

use rayon::prelude::*;

use super::{copy_short, Disjoint, Epilogue};

/// Output channels per tile.
const MR: usize = 6;
/// Output channels and positions per tile with AVX-512 (a row is two 16-lane registers).
const MR_WIDE: usize = 8;
const NR_WIDE: usize = 32;
/// Positions per tile.
const NR: usize = 16;
/// Input channels per pass over a block of planes.
const KC: usize = 256;

/// Where a tile reads and writes: the weights from `a` (row stride `lda`, column stride
/// `acs`), the planes from `b` (row stride `ldb`), the outputs at `c` (row stride `ldc`);
/// `k` input channels.
#[derive(Clone, Copy)]
struct Tile {
    k: usize,
    a: *const f32,
    lda: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
}

/// `out[s] = act(w · x[s] + b)` for each of `n` samples: `w` is `[o, k]` read through its
/// (row, column) strides (so `Wᵀ` costs nothing), `x` `[n, k, p]`, `b` `[o]` (none: no bias
/// and no clamp), and `out` points at `n * o * p` values (which need not be initialized),
/// row-major. The positions of all samples form one sequence cut into blocks of a tile's
/// width, so a small plane (7x7, or 1x1) wastes no lanes: a block that lies in one sample is
/// read where it lies, one that spans samples is copied into a panel first. Over every core
/// with `parallel` (in blocks of positions), else on the calling thread; with the vector
/// tiles when `fast` ([`super::has_avx2_fma`]: the AVX-512 ones where the machine also has
/// AVX-512 F and there are at least `NR_WIDE` positions), else with the portable ones.
///
/// # Safety
/// `out` is valid for writes of `n * o * p` values that nothing else reads or writes
/// meanwhile, and `fast` only where the machine has AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(
    out: Disjoint<f32>,
    w: (&[f32], usize, usize),
    x: &[f32],
    b: Option<&[f32]>,
    dims: (usize, usize, usize, usize),
    act: Epilogue,
    parallel: bool,
    fast: bool,
) {
    // (Fewer positions than a wide tile holds run in the narrower tiles, which waste less.)
    let tiles = match fast {
        true if super::has_avx512f() && dims.0 * dims.3 >= NR_WIDE => Tiles::Avx512,
        true => Tiles::Avx2,
        false => Tiles::Portable,
    };
    // SAFETY: as the caller promises; AVX-512 tiles only where the machine has it.
    unsafe { product_by(out, w, x, b, dims, act, parallel, tiles) }
}

/// Which tiles run a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tiles {
    Portable,
    /// `MR` rows of two 8-lane registers (AVX2 and FMA).
    Avx2,
    /// `MR_WIDE` rows of `NR_WIDE` positions, two 16-lane registers each (AVX-512 F): 16
    /// chains of multiply-adds, two loads of positions and eight of weights per input
    /// channel. Each output is the same chain of fused multiply-adds as in [`Tiles::Avx2`],
    /// so the results are the same bits.
    Avx512,
}

/// [`product`] by the given tiles.
///
/// # Safety
/// As for [`product`], and the machine has what `tiles` needs.
#[allow(clippy::too_many_arguments)]
unsafe fn product_by(
    out: Disjoint<f32>,
    (w, w_rs, w_cs): (&[f32], usize, usize),
    x: &[f32],
    b: Option<&[f32]>,
    (n, o, k, p): (usize, usize, usize, usize),
    act: Epilogue,
    parallel: bool,
    tiles: Tiles,
) {
    let (mr, nr) = tiles.shape();
    let total = n * p;
    if total == 0 || o == 0 {
        return;
    }
    assert!(
        (k == 0 || (o - 1) * w_rs + (k - 1) * w_cs < w.len())
            && x.len() >= n * k * p
            && b.is_none_or(|b| b.len() >= o),
        "operand sizes"
    );
    assert!(
        b.is_some() || act == Epilogue::NONE,
        "a clamp without a bias"
    );
    let blocks = total.div_ceil(nr);
    // Per worker: the panel, and the tile that a block not written in place is summed in.
    // Rows `rows` of block `j`.
    let column =
        |j: usize, rows: std::ops::Range<usize>, (panel, tile): &mut (Vec<f32>, Vec<f32>)| {
            let g0 = j * nr;
            let nc = nr.min(total - g0);
            let (s0, c0) = (g0 / p, g0 % p);
            let direct = nc == nr && c0 + nr <= p;
            // A block within one sample is read in place; any other is copied into a panel nr
            // wide (zero beyond its columns), run by run of one sample's columns.
            let (bp, ldb) = if direct {
                (x[s0 * k * p + c0..].as_ptr(), p)
            } else {
                pack_panel(panel, x, (g0, nc), (k, p, nr));
                (panel.as_ptr(), nr)
            };
            for i0 in rows.step_by(mr) {
                let m = mr.min(o - i0);
                let (c, ldc) = if direct {
                    // SAFETY: sample s0's row i0, column c0 lies inside the output.
                    (unsafe { out.add((s0 * o + i0) * p + c0) }.0, p)
                } else {
                    (tile.as_mut_ptr(), nr)
                };
                for kc in (0..k).step_by(KC) {
                    let kn = KC.min(k - kc);
                    let t = Tile {
                        k: kn,
                        // SAFETY: rows i0.. and columns kc.. lie inside w and the planes.
                        a: unsafe { w.as_ptr().add(i0 * w_rs + kc * w_cs) },
                        lda: w_rs,
                        acs: w_cs,
                        b: unsafe { bp.add(kc * ldb) },
                        ldb,
                        c,
                        ldc,
                    };
                    let finish = b.filter(|_| kc + kn == k).map(|b| (&b[i0..i0 + m], act));
                    // SAFETY: the tile's reads lie inside w and the planes (or the panel), its
                    // writes inside this block of the output (or the tile buffer).
                    unsafe { run_tile(m, t, kc > 0, finish, tiles) };
                }
                if !direct {
                    // SAFETY: the block's rows i0..i0 + m are this task's alone.
                    unsafe { scatter_tile(out, tile, (g0, nc), (i0, m), (o, p, nr)) };
                }
            }
        };
    let (row_runs, run_rows) = row_runs(blocks, o, mr, parallel);
    let tasks = blocks * o.div_ceil(run_rows);
    let task = |t: usize, scratch: &mut (Vec<f32>, Vec<f32>)| {
        let (j, r) = (t % blocks, t / blocks * run_rows);
        column(j, r..o.min(r + run_rows), scratch)
    };
    if parallel && tasks > 1 {
        (0..tasks)
            .into_par_iter()
            .with_min_len(match row_runs {
                1 => 4,
                _ => 1,
            })
            .for_each_init(
                || (Vec::new(), vec![0f32; MR_WIDE * NR_WIDE]),
                |scratch, t| task(t, scratch),
            );
    } else {
        let mut scratch = (Vec::new(), vec![0f32; MR_WIDE * NR_WIDE]);
        for t in 0..tasks {
            task(t, &mut scratch);
        }
    }
}

/// How many runs each block's `o` rows are cut into, and the rows of a run (whole tiles of
/// `mr` rows): one run of all, unless there are too few blocks of positions to keep every
/// core busy (a small plane at batch 1, where the weights are most of the work). Cutting rows
/// leaves every output's sum as it is.
fn row_runs(blocks: usize, o: usize, mr: usize, parallel: bool) -> (usize, usize) {
    let threads = rayon::current_num_threads();
    let runs = match parallel && blocks < 4 * threads {
        true => (4 * threads).div_ceil(blocks).min(o.div_ceil(mr)),
        false => 1,
    };
    (runs, o.div_ceil(mr).div_ceil(runs) * mr)
}

impl Tiles {
    /// The rows and columns of one tile.
    fn shape(self) -> (usize, usize) {
        match self {
            Tiles::Avx512 => (MR_WIDE, NR_WIDE),
            _ => (MR, NR),
        }
    }
}

/// Copies the `nc` positions from position `g0` on (of all samples' planes of `p` positions,
/// `k` channels each) into `panel`, `nr` wide (zero beyond its columns), run by run of one
/// sample's positions.
#[inline]
fn pack_panel(
    panel: &mut Vec<f32>,
    x: &[f32],
    (g0, nc): (usize, usize),
    (k, p, nr): (usize, usize, usize),
) {
    panel.clear();
    panel.resize(k * nr, 0.0);
    let mut at = 0;
    while at < nc {
        let (s, c) = ((g0 + at) / p, (g0 + at) % p);
        let run = (p - c).min(nc - at);
        let xs = &x[s * k * p..][..k * p];
        for (dst, src) in panel.chunks_exact_mut(nr).zip(xs.chunks_exact(p)) {
            copy_short(&mut dst[at..at + run], &src[c..c + run]);
        }
        at += run;
    }
}

/// Writes rows `i0..i0 + m` of a tile summed apart (`nr` wide) to the output's positions
/// `g0..g0 + nc` (of `o` rows of `p` positions per sample), run by run of one sample's.
///
/// # Safety
/// Those rows and positions lie inside the output and are the caller's alone.
#[inline]
unsafe fn scatter_tile(
    out: Disjoint<f32>,
    tile: &[f32],
    (g0, nc): (usize, usize),
    (i0, m): (usize, usize),
    (o, p, nr): (usize, usize, usize),
) {
    let mut at = 0;
    while at < nc {
        let (s, c) = ((g0 + at) / p, (g0 + at) % p);
        let run = (p - c).min(nc - at);
        for r in 0..m {
            // SAFETY: sample s's row i0 + r, columns c..c + run lie inside the output, in
            // this block alone (the caller's promise).
            let dst = unsafe { out.rows((s * o + i0 + r) * p + c, run) };
            copy_short(dst, &tile[r * nr + at..r * nr + at + run]);
        }
        at += run;
    }
}

/// One tile of `m` rows (1..=MR, or 1..=MR_WIDE with AVX-512): accumulates into the tile's
/// outputs when `accumulate`, else overwrites them; with `finish`, adds the rows' biases and
/// clamps on the way out.
///
/// # Safety
/// As for [`Tile`]: every read and write it implies is in bounds; the machine has what
/// `tiles` needs.
unsafe fn run_tile(
    m: usize,
    t: Tile,
    accumulate: bool,
    finish: Option<(&[f32], Epilogue)>,
    tiles: Tiles,
) {
    #[cfg(target_arch = "x86_64")]
    if tiles == Tiles::Avx512 {
        macro_rules! wide {
            ($($m:literal)*) => {
                match m {
                    // SAFETY: the machine has AVX-512 F; bounds as the caller promises.
                    $($m => return unsafe { avx512::tile::<$m>(t, accumulate, finish) },)*
                    _ => unreachable!("a tile has 1..=MR_WIDE rows"),
                }
            };
        }
        wide!(1 2 3 4 5 6 7 8)
    }
    let fast = tiles != Tiles::Portable;
    macro_rules! rows {
        ($($m:literal)*) => {
            match m {
                $($m => {
                    #[cfg(target_arch = "x86_64")]
                    if fast {
                        // SAFETY: the machine has AVX2 and FMA; bounds as the caller promises.
                        return unsafe { avx2::tile::<$m>(t, accumulate, finish) };
                    }
                    // SAFETY: as the caller promises.
                    unsafe { portable_tile::<$m>(t, accumulate, finish) }
                })*
                _ => unreachable!("a tile has 1..=MR rows"),
            }
        };
    }
    let _ = fast;
    rows!(1 2 3 4 5 6)
}

/// The tile in plain code (which the compiler vectorizes as the target allows).
///
/// # Safety
/// As for [`run_tile`].
unsafe fn portable_tile<const M: usize>(
    t: Tile,
    accumulate: bool,
    finish: Option<(&[f32], Epilogue)>,
) {
    let mut acc = [[0f32; NR]; M];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: row r of the tile's outputs is in bounds.
            row.copy_from_slice(unsafe { std::slice::from_raw_parts(t.c.add(r * t.ldc), NR) });
        }
    }
    for kk in 0..t.k {
        // SAFETY: row kk of the planes has NR values from b.
        let xb = unsafe { std::slice::from_raw_parts(t.b.add(kk * t.ldb), NR) };
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: weight (r, kk) is in bounds.
            let a = unsafe { *t.a.add(r * t.lda + kk * t.acs) };
            for (v, &xv) in row.iter_mut().zip(xb) {
                *v += a * xv;
            }
        }
    }
    for (r, row) in acc.iter_mut().enumerate() {
        if let Some((bias, act)) = finish {
            for v in row.iter_mut() {
                *v = act.apply(*v + bias[r]);
            }
        }
        // SAFETY: row r of the tile's outputs is in bounds.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), t.c.add(r * t.ldc), NR) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Epilogue, Tile};

    /// The tile in 2 x M 16-lane registers (`NR_WIDE` positions).
    ///
    /// # Safety
    /// The machine has AVX-512 F; every read and write the tile implies is in bounds.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const M: usize>(
        t: Tile,
        accumulate: bool,
        finish: Option<(&[f32], Epilogue)>,
    ) {
        const { assert!(super::NR_WIDE == 32) };
        // SAFETY (whole body): the pointers are in bounds as the caller promises.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    let c = t.c.add(r * t.ldc);
                    *row = [_mm512_loadu_ps(c), _mm512_loadu_ps(c.add(16))];
                }
            }
            let mut b = t.b;
            let mut a = t.a;
            for _ in 0..t.k {
                let (x0, x1) = (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16)));
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*a.add(r * t.lda));
                    row[0] = _mm512_fmadd_ps(w, x0, row[0]);
                    row[1] = _mm512_fmadd_ps(w, x1, row[1]);
                }
                b = b.add(t.ldb);
                a = a.add(t.acs);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                if let Some((bias, act)) = finish {
                    // max(lo, v) and min(hi, v) return v when v is NaN, as Epilogue does.
                    let (bv, lo, hi) = (
                        _mm512_set1_ps(bias[r]),
                        _mm512_set1_ps(act.lo),
                        _mm512_set1_ps(act.hi),
                    );
                    for v in row.iter_mut() {
                        *v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_add_ps(*v, bv)));
                    }
                }
                let c = t.c.add(r * t.ldc);
                _mm512_storeu_ps(c, row[0]);
                _mm512_storeu_ps(c.add(16), row[1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use avx2::transpose8;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Epilogue, Tile};

    /// `dst[j * ldd + i] = src[i * lds + j]` for `i, j` in `0..8`: an 8 x 8 block
    /// transposed in registers.
    ///
    /// # Safety
    /// The machine has AVX2; the 8 rows of 8 values read and written are in bounds.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn transpose8(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
        // SAFETY (whole body): in bounds as the caller promises.
        unsafe {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * lds)));
            // Pairs of rows interleaved, then quads, then the halves exchanged.
            let t: [__m256; 8] = std::array::from_fn(|i| {
                let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
                if i % 2 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            let q: [__m256; 8] = std::array::from_fn(|i| {
                let (a, b) = (t[i / 4 * 4 + i / 2 % 2], t[i / 4 * 4 + i / 2 % 2 + 2]);
                if i % 2 == 0 {
                    _mm256_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm256_shuffle_ps::<0xEE>(a, b)
                }
            });
            for j in 0..4 {
                _mm256_storeu_ps(
                    dst.add(j * ldd),
                    _mm256_permute2f128_ps::<0x20>(q[j], q[j + 4]),
                );
                _mm256_storeu_ps(
                    dst.add((j + 4) * ldd),
                    _mm256_permute2f128_ps::<0x31>(q[j], q[j + 4]),
                );
            }
        }
    }

    /// The tile in 2 x M vector registers.
    ///
    /// # Safety
    /// The machine has AVX2 and FMA; every read and write the tile implies is in bounds.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const M: usize>(
        t: Tile,
        accumulate: bool,
        finish: Option<(&[f32], Epilogue)>,
    ) {
        // SAFETY (whole body): the pointers are in bounds as the caller promises.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    let c = t.c.add(r * t.ldc);
                    *row = [_mm256_loadu_ps(c), _mm256_loadu_ps(c.add(8))];
                }
            }
            let mut b = t.b;
            let mut a = t.a;
            for _ in 0..t.k {
                let (x0, x1) = (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = _mm256_broadcast_ss(&*a.add(r * t.lda));
                    row[0] = _mm256_fmadd_ps(w, x0, row[0]);
                    row[1] = _mm256_fmadd_ps(w, x1, row[1]);
                }
                b = b.add(t.ldb);
                a = a.add(t.acs);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                if let Some((bias, act)) = finish {
                    // max(lo, v) and min(hi, v) return v when v is NaN, as Epilogue does.
                    let (bv, lo, hi) = (
                        _mm256_set1_ps(bias[r]),
                        _mm256_set1_ps(act.lo),
                        _mm256_set1_ps(act.hi),
                    );
                    for v in row.iter_mut() {
                        *v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_add_ps(*v, bv)));
                    }
                }
                let c = t.c.add(r * t.ldc);
                _mm256_storeu_ps(c, row[0]);
                _mm256_storeu_ps(c.add(8), row[1]);
            }
        }
    }
}

/// A weight gradient `dW = Σ_n G_n · X_nᵀ` summed sample by sample, with `G_n` `[o, p]` (a
/// sample's output gradient) and `X_n` `[k, p]` (its input planes, or its unfolded columns),
/// by the forward's tiles: the operand with fewer rows is transposed into a panel `[p, ·]`
/// (columns padded to whole tiles, zero beyond), whose rows the tiles read as they read
/// planes, while the other operand's rows serve as the weights. With `X_n` transposed, the
/// tiles sum `G · X_nᵀ` into `[o, ·]`; with `G_n` transposed, `X_n · G_nᵀ = dWᵀ` into
/// `[k, ·]`, transposed once at the end. The sum over positions runs in blocks of `KC`, so a
/// tile's block of the panel stays in the first-level cache while the tiles of rows pass over
/// it.
pub(super) struct WeightGrad {
    o: usize,
    k: usize,
    p: usize,
    /// Whether `G_n` (rather than `X_n`) is the transposed operand.
    g_transposed: bool,
    /// Columns of the panel and of the sums: the transposed operand's rows, in whole tiles.
    width: usize,
    /// The transposed operand, `[p, width]`.
    panel: Vec<f32>,
    /// The sums, `[rows, width]`, rows being the other operand's.
    sums: Vec<f32>,
}

impl WeightGrad {
    /// Empty sums for `o` output channels, `k` input rows and `p` positions per sample.
    pub(super) fn new(o: usize, k: usize, p: usize) -> Self {
        let g_transposed = o < k;
        let (rows, cols) = if g_transposed { (k, o) } else { (o, k) };
        let width = cols.div_ceil(NR) * NR;
        WeightGrad {
            o,
            k,
            p,
            g_transposed,
            width,
            panel: vec![0.0; p * width],
            sums: vec![0.0; rows * width],
        }
    }

    /// Adds one sample's `G_n · X_nᵀ`: over every core with `parallel` (in blocks of
    /// columns), else on the calling thread; with the vector tiles when `fast`
    /// ([`super::has_avx2_fma`]).
    pub(super) fn add(&mut self, g: &[f32], x: &[f32], parallel: bool, fast: bool) {
        let (o, k, p, width) = (self.o, self.k, self.p, self.width);
        assert!(g.len() >= o * p && x.len() >= k * p, "operand sizes");
        if p == 0 {
            return;
        }
        let (rows, t_src, a) = if self.g_transposed {
            (k, &g[..o * p], &x[..k * p])
        } else {
            (o, &x[..k * p], &g[..o * p])
        };
        // The panel's columns beyond the transposed operand's rows stay zero from `new`. In
        // blocks of 8 x 8, so that both the reads and the writes stay within a few lines.
        let cols = t_src.len() / p;
        for c0 in (0..cols).step_by(8) {
            let cn = 8.min(cols - c0);
            for q0 in (0..p).step_by(8) {
                let qn = 8.min(p - q0);
                #[cfg(target_arch = "x86_64")]
                if fast && cn == 8 && qn == 8 {
                    // SAFETY: rows c0..c0 + 8, columns q0..q0 + 8 of the source and rows
                    // q0..q0 + 8, columns c0..c0 + 8 of the panel are in bounds; the machine
                    // has AVX2.
                    unsafe {
                        avx2::transpose8(
                            t_src[c0 * p + q0..].as_ptr(),
                            p,
                            self.panel[q0 * width + c0..].as_mut_ptr(),
                            width,
                        )
                    };
                    continue;
                }
                for c in c0..c0 + cn {
                    let src = &t_src[c * p + q0..][..qn];
                    for (j, &v) in src.iter().enumerate() {
                        self.panel[(q0 + j) * width + c] = v;
                    }
                }
            }
        }
        let sums = Disjoint(self.sums.as_mut_ptr());
        let panel = &self.panel;
        let column = |j0: usize| {
            for q0 in (0..p).step_by(KC) {
                let qn = KC.min(p - q0);
                for i0 in (0..rows).step_by(MR) {
                    let t = Tile {
                        k: qn,
                        // SAFETY: row i0, column q0 of `a` ([rows, p]); row q0, column j0 of
                        // the panel ([p, width]); row i0, column j0 of the sums
                        // ([rows, width]): all in bounds.
                        a: unsafe { a.as_ptr().add(i0 * p + q0) },
                        lda: p,
                        acs: 1,
                        b: unsafe { panel.as_ptr().add(q0 * width + j0) },
                        ldb: width,
                        c: unsafe { sums.add(i0 * width + j0) }.0,
                        ldc: width,
                    };
                    let tiles = if fast { Tiles::Avx2 } else { Tiles::Portable };
                    // SAFETY: the tile reads `MR.min(rows - i0)` rows of `qn` values of `a`,
                    // `qn` rows of NR values of the panel, and writes that many rows of NR
                    // sums in columns j0.., which no other task touches; `fast` only where
                    // the machine has AVX2 and FMA.
                    unsafe { run_tile(MR.min(rows - i0), t, true, None, tiles) };
                }
            }
        };
        let blocks = width / NR;
        if parallel && blocks > 1 {
            (0..blocks).into_par_iter().for_each(|j| column(j * NR));
        } else {
            (0..blocks).for_each(|j| column(j * NR));
        }
    }

    /// The gradient, `[o, k]` row-major.
    pub(super) fn finish(self) -> Vec<f32> {
        let (o, k, width) = (self.o, self.k, self.width);
        if width == 0 {
            return vec![0.0; o * k];
        }
        if self.g_transposed {
            let mut dw = vec![0f32; o * k];
            for (c, row) in self.sums.chunks_exact(width).enumerate() {
                for (r, &v) in row[..o].iter().enumerate() {
                    dw[r * k + c] = v;
                }
            }
            dw
        } else {
            self.sums
                .chunks_exact(width)
                .flat_map(|row| &row[..k])
                .copied()
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 tiles give the same bits as the AVX2 tiles: 1 to 25 output channels
    /// (whole and partial tiles of either height), positions in whole blocks, in blocks across
    /// samples and a partial last block, input channels in one block of `KC` and in two,
    /// with and without a bias and clamp.
    #[test]
    fn avx512_tiles_give_the_avx2_bits() {
        if !(super::super::has_avx512f() && super::super::has_avx2_fma()) {
            crate::note_skipped("this machine (or SLIM_CPU) lacks AVX-512 F, or AVX2 and FMA");
            return;
        }
        let mut next = super::super::tests::uniform(7);
        for (n, o, k, p) in [
            (2, 1, 3, 16),
            (3, 7, 16, 49),
            (2, 12, 32, 20),
            (1, 13, 300, 33),
            (4, 25, 5, 1),
            (2, 64, 128, 49),
        ] {
            let w: Vec<f32> = (0..o * k).map(|_| next()).collect();
            let x: Vec<f32> = (0..n * k * p).map(|_| next()).collect();
            let b: Vec<f32> = (0..o).map(|_| next()).collect();
            for (bias, act) in [(None, Epilogue::NONE), (Some(&b[..]), Epilogue::RELU6)] {
                let run = |tiles| {
                    let mut y = vec![f32::NAN; n * o * p];
                    // SAFETY: `y` holds `n * o * p` values; the machine has both kinds of
                    // tiles (checked above).
                    unsafe {
                        product_by(
                            Disjoint(y.as_mut_ptr()),
                            (&w, k, 1),
                            &x,
                            bias,
                            (n, o, k, p),
                            act,
                            true,
                            tiles,
                        )
                    };
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(
                    run(Tiles::Avx512),
                    run(Tiles::Avx2),
                    "{n} x {o} x {k} x {p}"
                );
            }
        }
    }
}
