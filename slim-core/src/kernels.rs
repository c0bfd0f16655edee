//! Convolution kernels for training on a CPU, as candle custom ops with forward and backward.
//!
//! candle 0.11 runs a grouped convolution as one convolution per group, which makes a
//! depthwise convolution very slow, and computes a convolution's input gradient with a direct
//! transposed convolution. Here:
//! - **depthwise** convolution is a direct kernel over each `(sample, channel)` plane, in
//!   parallel, with its own input and weight gradients;
//! - a **dense** convolution is `W · im2col(x) + b` in one custom op, sample by sample; its
//!   backward recomputes each sample's unfold and makes two products of the same size
//!   (`dW += G · colsᵀ`, `dcols = Wᵀ · G`) and a fold, with no autograd intermediates; a
//!   **pointwise** one (1x1, stride 1, no padding) needs no unfold at all. Every product is
//!   made of the same register tiles (`pointwise`), which read each sample's planes (or
//!   columns) where they lie; for the weight gradient the operand with fewer rows is
//!   transposed into a panel once per sample;
//! - in evaluation a convolution can finish its outputs with a bias and a clamp as they are
//!   written ([`conv2d_fused`]), and layers under a size run on the calling thread;
//! - train-mode **batch norm** is one fused op with its own backward;
//! - **max pooling** supports padding and overlapping windows, with an exact backward.
//!
//! [`conv2d`] picks the kernel; other cases (grouped, non-f32, non-CPU) go to candle's own
//! convolution. Every kernel is tested against candle's convolution and its gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, OnceLock};

use crate::graph::Conv2dSpec;

pub mod channels_last;
mod clip;
mod pointwise;
pub use clip::{clip, Clip};

/// The geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    pad: usize,
    dil: usize,
}

impl Geom {
    /// The output columns `ow` whose input column `ow * stride + k * dil - pad` lies inside
    /// `0..w`, as a range (so the inner loops carry no bounds test).
    fn valid(&self, k: usize, out: usize, size: usize) -> std::ops::Range<usize> {
        let off = (k * self.dil) as i64 - self.pad as i64;
        let s = self.stride as i64;
        let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
        let hi = ((size as i64 - off + s - 1) / s).clamp(0, out as i64);
        (lo.min(hi) as usize)..(hi as usize)
    }
    fn src(&self, o: usize, k: usize) -> usize {
        // Only called for `o` in `valid(k, ..)`, where this is non-negative.
        o * self.stride + k * self.dil - self.pad
    }
    /// A 1x1 convolution with stride 1 and no padding: each sample's output is the product
    /// `W · X_n` of the weights and the sample's `[C, H*W]` planes, read where they lie.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
}

/// What a convolution does to each output value on its way out, after adding the channel's
/// bias: clamp it to `lo..=hi` (a fused ReLU is `0..=inf`, ReLU6 `0..=6`). NaN passes through.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Epilogue {
    pub lo: f32,
    pub hi: f32,
}

impl Epilogue {
    /// No clamp.
    pub const NONE: Epilogue = Epilogue {
        lo: f32::NEG_INFINITY,
        hi: f32::INFINITY,
    };
    /// ReLU.
    pub const RELU: Epilogue = Epilogue {
        lo: 0.0,
        hi: f32::INFINITY,
    };
    /// ReLU6.
    pub const RELU6: Epilogue = Epilogue { lo: 0.0, hi: 6.0 };

    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        // Two selects (not one if-else chain), so that the loops calling this vectorize.
        let v = if v < self.lo { self.lo } else { v };
        if v > self.hi {
            self.hi
        } else {
            v
        }
    }
}

/// A buffer that parallel tasks write at disjoint places which are not one contiguous chunk
/// per task (the planes of one channel over every sample, say).
#[derive(Clone, Copy)]
pub struct Disjoint<T>(pub *mut T);

// SAFETY: tasks write through the pointer only at places no other task reads or writes
// (see `Disjoint::rows`).
unsafe impl<T: Send> Send for Disjoint<T> {}
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    /// The place `count` values on.
    ///
    /// # Safety
    /// As for [`pointer::add`]: the result lies within (or one past) the buffer.
    pub unsafe fn add(&self, count: usize) -> Disjoint<T> {
        // SAFETY: as the caller promises.
        Disjoint(unsafe { self.0.add(count) })
    }

    /// `len` values from `start`.
    ///
    /// # Safety
    /// `start + len` is within the buffer, and no other live slice overlaps this one.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn rows(&self, start: usize, len: usize) -> &mut [T] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// `dst.copy_from_slice(src)` for the short runs of small planes (a row of 7 or 14 values),
/// in pieces of 32, 16, 8, 4, 2 or 1 bytes, each one unaligned load and store (the last piece
/// overlapping the one before), where `copy_from_slice` calls `memmove`: per row, that call
/// cost more than the copy (a quarter of a depthwise convolution's backward). Panics if the
/// lengths differ.
#[inline(always)]
pub fn copy_short<T: Copy>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "copy_short: lengths differ");
    let n = std::mem::size_of_val(src);
    let (d, s) = (dst.as_mut_ptr().cast::<u8>(), src.as_ptr().cast::<u8>());
    macro_rules! pieces {
        ($($b:literal)*) => {$(
            if n >= $b {
                // SAFETY: every piece lies within the `n` bytes of both slices, which cannot
                // overlap (one is borrowed mutably); `T: Copy`, so bytes copy values.
                unsafe {
                    let piece = |at: usize| {
                        let v = s.add(at).cast::<[u8; $b]>().read_unaligned();
                        d.add(at).cast::<[u8; $b]>().write_unaligned(v);
                    };
                    let mut at = 0;
                    while at + $b < n {
                        piece(at);
                        at += $b;
                    }
                    piece(n - $b);
                }
                return;
            }
        )*};
    }
    pieces!(32 16 8 4 2 1);
}

/// im2col, `[N, C, H, W]` to `[C*KH*KW, N*OH*OW]`, into `cols`, whose padding positions must
/// hold zeros (they are never written, so one buffer serves every batch of one geometry);
/// over every core with `parallel`.
fn unfold_into(g: &Geom, x: &[f32], cols: &mut [f32], parallel: bool) {
    let p = g.oh * g.ow;
    let wide = has_avx512f();
    // Where each tap's values lie: the first value read and the first written, and how many
    // rows and columns follow (none for a tap wholly in the padding).
    let taps: Vec<[usize; 4]> = (0..g.kh * g.kw)
        .map(|t| {
            let (kh, kw) = (t / g.kw, t % g.kw);
            let (rows, cols) = (g.valid(kh, g.oh, g.h), g.valid(kw, g.ow, g.w));
            if rows.is_empty() || cols.is_empty() {
                return [0; 4];
            }
            let from = g.src(rows.start, kh) * g.w + g.src(cols.start, kw);
            [from, rows.start * g.ow + cols.start, rows.len(), cols.len()]
        })
        .collect();
    let row_of = |row: usize, dst: &mut [f32]| {
        let (c, [from, to, rows, len]) = (row / taps.len(), taps[row % taps.len()]);
        for n in 0..g.n {
            let plane = &x[(n * g.c + c) * g.h * g.w..][..g.h * g.w];
            let out = &mut dst[n * p..(n + 1) * p];
            let step = (g.stride * g.w, g.stride);
            gather_rows(
                &plane[from..],
                step,
                &mut out[to..],
                g.ow,
                (rows, len),
                wide,
            );
        }
    };
    if parallel {
        cols.par_chunks_mut(g.n * p)
            .enumerate()
            .for_each(|(row, dst)| row_of(row, dst));
    } else {
        for (row, dst) in cols.chunks_mut(g.n * p).enumerate() {
            row_of(row, dst);
        }
    }
}

/// `rows` rows of `len` values each: value `i` of row `r` from `src[r * step + i * stride]`
/// to `dst[r * ow + i]`. With AVX-512 (`wide`) at strides 1 and 2, 16 values per masked load
/// and store (two loads and a permute at stride 2); else a copy per row, or value by value.
fn gather_rows(
    src: &[f32],
    (step, stride): (usize, usize),
    dst: &mut [f32],
    ow: usize,
    (rows, len): (usize, usize),
    wide: bool,
) {
    if rows == 0 || len == 0 {
        return;
    }
    assert!(
        src.len() > (rows - 1) * step + (len - 1) * stride && dst.len() >= (rows - 1) * ow + len,
        "gather_rows: {rows} rows of {len} out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if wide && (stride == 1 || stride == 2) {
        // SAFETY: `wide` says the machine has AVX-512 F, and the bounds were checked above.
        unsafe {
            let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
            if stride == 1 {
                gather_avx512::rows::<1>(s, step, d, ow, rows, len)
            } else {
                gather_avx512::rows::<2>(s, step, d, ow, rows, len)
            }
        }
        return;
    }
    for r in 0..rows {
        let (line, out) = (&src[r * step..], &mut dst[r * ow..][..len]);
        if stride == 1 {
            copy_short(out, &line[..len]);
        } else {
            for (i, o) in out.iter_mut().enumerate() {
                *o = line[i * stride];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod gather_avx512 {
    use std::arch::x86_64::*;

    /// [`super::gather_rows`] at stride `S` (1 or 2).
    ///
    /// # Safety
    /// The machine has AVX-512 F; `src` holds `(rows - 1) * step + (len - 1) * S + 1` values
    /// and `dst` holds `(rows - 1) * ow + len`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows<const S: usize>(
        src: *const f32,
        step: usize,
        dst: *mut f32,
        ow: usize,
        rows: usize,
        len: usize,
    ) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        // The last block's outputs, and (at stride 2) the inputs they read.
        let tail = len - (len - 1) / 16 * 16;
        let tail_out = (1u32 << tail) - 1;
        let tail_in = (1u64 << (S * (tail - 1) + 1)) - 1;
        for r in 0..rows {
            let (s, d) = (src.wrapping_add(r * step), dst.wrapping_add(r * ow));
            let mut i = 0;
            while i < len {
                let (m_out, m_in) = if i + 16 < len {
                    (u16::MAX, u32::MAX)
                } else {
                    (tail_out as u16, tail_in as u32)
                };
                let from = s.wrapping_add(i * S);
                // SAFETY: the masks select the values inside both buffers (masked-off values
                // are neither read nor written).
                unsafe {
                    let v = if S == 1 {
                        _mm512_maskz_loadu_ps(m_out, from)
                    } else {
                        let a = _mm512_maskz_loadu_ps(m_in as u16, from);
                        let b = _mm512_maskz_loadu_ps((m_in >> 16) as u16, from.wrapping_add(16));
                        _mm512_permutex2var_ps(a, even, b)
                    };
                    _mm512_mask_storeu_ps(d.wrapping_add(i), m_out, v);
                }
                i += 16;
            }
        }
    }
}

/// col2im, the adjoint of [`unfold_into`]: `[C*KH*KW, N*OH*OW]` added into `x` `[N, C, H, W]`;
/// over every core with `parallel`.
fn fold_into(g: &Geom, cols: &[f32], x: &mut [f32], parallel: bool) {
    let p = g.oh * g.ow;
    let plane_of = |plane_idx: usize, plane: &mut [f32]| {
        let (n, c) = (plane_idx / g.c, plane_idx % g.c);
        for kh in 0..g.kh {
            for kw in 0..g.kw {
                let row = (c * g.kh + kh) * g.kw + kw;
                let src = &cols[row * g.n * p + n * p..][..p];
                let cols_r = g.valid(kw, g.ow, g.w);
                for oh in g.valid(kh, g.oh, g.h) {
                    let ih = g.src(oh, kh);
                    let dst_row = &mut plane[ih * g.w..(ih + 1) * g.w];
                    let src_row = &src[oh * g.ow..(oh + 1) * g.ow];
                    if g.stride == 1 {
                        let a = g.src(cols_r.start, kw);
                        let dst = &mut dst_row[a..a + cols_r.len()];
                        for (d, s) in dst.iter_mut().zip(&src_row[cols_r.clone()]) {
                            *d += s;
                        }
                    } else {
                        for ow in cols_r.clone() {
                            dst_row[g.src(ow, kw)] += src_row[ow];
                        }
                    }
                }
            }
        }
    };
    if parallel {
        x.par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(i, plane)| plane_of(i, plane));
    } else {
        for (i, plane) in x.chunks_mut(g.h * g.w).enumerate() {
            plane_of(i, plane);
        }
    }
}

/// Work below which an evaluation kernel runs on the calling thread: handing a small layer to
/// the pool and waking another worker (tens of microseconds on this kind of machine) costs
/// more than the second core saves. In multiply-adds for products and sweeps, in values for
/// pooling.
const SERIAL_PRODUCT: usize = 1 << 20;
const SERIAL_SWEEP: usize = 1 << 17;
const SERIAL_VALUES: usize = 1 << 15;

/// Values made once per key (a layer's geometry) and kept for the life of the process, for
/// the kernels' layouts that depend on a layer's shape alone: a `static` of this type.
pub struct Memo<K, V>(OnceLock<Mutex<HashMap<K, V>>>);

impl<K: Eq + std::hash::Hash, V: Clone> Memo<K, V> {
    /// An empty memo.
    pub const fn new() -> Memo<K, V> {
        Memo(OnceLock::new())
    }

    /// The value kept for `key`, made by `make` the first time.
    pub fn get(&self, key: K, make: impl FnOnce() -> V) -> V {
        let mut kept = self
            .0
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        kept.entry(key).or_insert_with(make).clone()
    }
}

impl<K: Eq + std::hash::Hash, V: Clone> Default for Memo<K, V> {
    fn default() -> Memo<K, V> {
        Memo::new()
    }
}

/// `f(i)` for every `i` in `0..n`: over the pool, or in order on this thread when `serial`.
pub fn for_each_task(n: usize, serial: bool, f: impl Fn(usize) + Sync + Send) {
    if serial {
        (0..n).for_each(f)
    } else {
        (0..n).into_par_iter().for_each(f)
    }
}

/// `f((i, chunk))` for the chunks of `size` values of `out`, as [`for_each_task`] does.
pub fn for_each_chunk<T: Send>(
    out: &mut [T],
    size: usize,
    serial: bool,
    f: impl Fn((usize, &mut [T])) + Sync + Send,
) {
    if serial {
        out.chunks_mut(size).enumerate().for_each(f)
    } else {
        out.par_chunks_mut(size).enumerate().for_each(f)
    }
}

/// `len` values written by `f((i, chunk))` for the chunks of `size` values, as
/// [`for_each_chunk`] runs them, into memory that is not zeroed first (a fill that every
/// value of an elementwise op's output would pay for again).
///
/// # Safety
/// `f` writes every value of every chunk it is given.
pub(crate) unsafe fn written(
    len: usize,
    size: usize,
    serial: bool,
    f: impl Fn((usize, &mut [MaybeUninit<f32>])) + Sync + Send,
) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(len);
    for_each_chunk(&mut y.spare_capacity_mut()[..len], size, serial, f);
    // SAFETY: the caller's `f` wrote every one of the `len` values.
    unsafe { y.set_len(len) };
    y
}

/// `values` set to zero, as the initialized slice they now are.
fn zeroed(values: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    values.fill(MaybeUninit::new(0.0));
    // SAFETY: every value was just written.
    unsafe { assume_written(values) }
}

/// `values` as the initialized slice they are.
///
/// # Safety
/// Every value of `values` has been written.
unsafe fn assume_written(values: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the caller vouches that every
    // value is initialized.
    unsafe { &mut *(values as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Runs `f(n, chunk, scratch, parallel)` over the `chunk`-sized pieces of `out`, one per
/// sample: in parallel when there are enough samples to keep every core busy (then `f` is
/// told to stay on its thread), else one after another with `f` free to use every core; the
/// scratch value is made by `init` for each worker's run of samples. With `serial`, all of it
/// on the calling thread.
fn per_sample_with<T: Send, S>(
    out: &mut [T],
    chunk: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(usize, &mut [T], &mut S, bool) + Sync,
    serial: bool,
) {
    if chunk == 0 {
        return;
    }
    let samples = out.len() / chunk;
    if serial {
        let mut s = init();
        for (n, c) in out.chunks_mut(chunk).enumerate() {
            f(n, c, &mut s, false);
        }
    } else if samples >= rayon::current_num_threads() {
        // Runs of at least half a core's share: rayon makes a scratch value for every run
        // it splits off, and a scratch of columns is zeroed when made.
        let run = samples.div_ceil(2 * rayon::current_num_threads());
        out.par_chunks_mut(chunk)
            .with_min_len(run)
            .enumerate()
            .for_each_init(&init, |s, (n, c)| f(n, c, s, false));
    } else {
        let mut s = init();
        for (n, c) in out.chunks_mut(chunk).enumerate() {
            f(n, c, &mut s, true);
        }
    }
}

/// The forward of a dense convolution, `act(W · im2col(x) + b)` as `[N, O, OH, OW]`, sample
/// by sample: each sample's product is written where it belongs and finished while it is
/// still in cache. A pointwise convolution reads the sample's planes where they lie; others
/// unfold one sample at a time into a buffer of the worker's.
fn dense_forward(g: &Geom, o: usize, x: &[f32], w: &[f32], b: &[f32], act: Epilogue) -> Vec<f32> {
    dense_forward_by(g, o, x, w, b, act, true)
}

/// Input channels up to which a dense convolution at stride 1 whose output plane is its
/// input's runs straight over the flattened planes ([`flat_dense`]) instead of through
/// unfolded columns: a network's first layer, on one or three channels, where the columns
/// cost more than the arithmetic (per 16 samples, `mobilenet_tiny`'s stem 0.08 -> 0.055 ms
/// and LeNet's first layer 0.09 -> 0.05 ms).
const FLAT_DENSE_CHANNELS: usize = 4;

/// The flattened planes' taps (in [`DepthwiseRows::flat`]) where a dense convolution of
/// geometry `g` runs over them ([`flat_dense`]): on AVX-512 F, at most
/// [`FLAT_DENSE_CHANNELS`] input channels, stride 1 with the output the input's size, not
/// pointwise (which reads its planes in place already).
fn flat_dense_taps(g: &Geom) -> Option<Arc<DepthwiseRows>> {
    if !cfg!(target_arch = "x86_64")
        || g.pointwise()
        || g.stride != 1
        || g.c > FLAT_DENSE_CHANNELS
        || (g.oh, g.ow) != (g.h, g.w)
        || !has_avx512f()
    {
        return None;
    }
    DepthwiseRows::cached(g).filter(|r| r.flat.as_ref().is_some_and(|f| f.split.is_none()))
}

/// [`dense_forward`], straight over the flattened planes where that applies and `direct`.
fn dense_forward_by(
    g: &Geom,
    o: usize,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    act: Epilogue,
    direct: bool,
) -> Vec<f32> {
    let (k, p) = (g.c * g.kh * g.kw, g.oh * g.ow);
    if g.pointwise() {
        return pointwise_forward(g.n, (o, k, p), x, w, b, act);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(rows) = direct.then(|| flat_dense_taps(g)).flatten() {
        if let Some(flat) = &rows.flat {
            return flat_dense::forward(g, o, x, w, b, act, flat);
        }
    }
    let _ = direct;
    let one = Geom { n: 1, ..*g };
    let per_in = g.c * g.h * g.w;
    let fast = has_avx2_fma();
    let len = g.n * o * p;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    per_sample_with(
        &mut y.spare_capacity_mut()[..len],
        o * p,
        || vec![0f32; k * p],
        |n, out, cols, parallel| {
            unfold_into(&one, &x[n * per_in..][..per_in], cols, parallel);
            // SAFETY: `out` is this sample's o * p outputs, borrowed mutably here alone; the
            // product writes every one of them.
            unsafe {
                pointwise::product(
                    Disjoint(out.as_mut_ptr().cast::<f32>()),
                    (w, k, 1),
                    cols,
                    Some(b),
                    (1, o, k, p),
                    act,
                    parallel,
                    fast,
                )
            };
        },
        len * k < SERIAL_PRODUCT,
    );
    // SAFETY: each sample's product wrote its o * p outputs.
    unsafe { y.set_len(len) };
    y
}

/// A dense convolution at stride 1 with the output plane the input's size, computed over the
/// flattened planes ([`FlatTaps`]) without unfolding them: per tile of 8 output channels by
/// 32 positions, each input channel's tap is one masked load per 16 positions (zero where
/// the tap falls into the padding or across a row's end), multiplied into all 8 channels'
/// sums. The sums start at zero and take the taps in the unfolded columns' order (channel,
/// then kernel row, then column), the bias and clamp last, as the tiles over the columns do:
/// the same bits.
#[cfg(target_arch = "x86_64")]
mod flat_dense {
    use std::arch::x86_64::*;

    use super::{Disjoint, Epilogue, FlatTaps, Geom};

    /// Output channels per tile.
    const M: usize = 8;

    pub(super) fn forward(
        g: &Geom,
        o: usize,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        act: Epilogue,
        flat: &FlatTaps,
    ) -> Vec<f32> {
        let (p, kk) = (g.oh * g.ow, g.kh * g.kw);
        let k = g.c * kk;
        assert!(
            (g.oh, g.ow) == (g.h, g.w)
                && x.len() == g.n * g.c * p
                && w.len() >= o * k
                && b.len() >= o
                && flat.offsets.len() == kk
                && flat.masks.len() == kk * p.div_ceil(16),
            "a flat dense convolution out of bounds"
        );
        let groups = o.div_ceil(M);
        let len = g.n * o * p;
        let mut y: Vec<f32> = Vec::with_capacity(len);
        let out = Disjoint(y.as_mut_ptr());
        super::for_each_task(g.n * groups, len * k < super::SERIAL_PRODUCT, |task| {
            let (n, i0) = (task / groups, task % groups * M);
            let m = M.min(o - i0);
            let planes = &x[n * g.c * p..][..g.c * p];
            // SAFETY: rows i0..i0 + m of sample n's outputs belong to this task alone and
            // lie inside the buffer's capacity.
            let ys = unsafe { out.rows((n * o + i0) * p, m * p) };
            let tile = Tile {
                flat,
                planes,
                c: g.c,
                w: &w[i0 * k..(i0 + m) * k],
                b: &b[i0..i0 + m],
                act,
            };
            macro_rules! rows {
                ($($m:literal)*) => {
                    match m {
                        // SAFETY: the machine has AVX-512 F (checked by the caller); the
                        // slices were sized above.
                        $($m => unsafe { tile.rows::<$m>(ys) },)*
                        _ => unreachable!("a tile has 1..=8 rows"),
                    }
                };
            }
            rows!(1 2 3 4 5 6 7 8)
        });
        // SAFETY: every task wrote all of its rows.
        unsafe { y.set_len(len) };
        y
    }

    /// One sample's input planes and a tile's output channels (weights `[R, c * taps]`).
    struct Tile<'a> {
        flat: &'a FlatTaps,
        planes: &'a [f32],
        c: usize,
        w: &'a [f32],
        b: &'a [f32],
        act: Epilogue,
    }

    impl Tile<'_> {
        /// All `R` output planes of the tile into `ys` (`R` planes one after another), two
        /// blocks of 16 positions at a time.
        ///
        /// # Safety
        /// The machine has AVX-512 F; `w` holds `R` rows of weights, `b` `R` biases, and
        /// `ys` `R` planes.
        #[target_feature(enable = "avx512f")]
        unsafe fn rows<const R: usize>(&self, ys: &mut [f32]) {
            let p = ys.len() / R;
            let blocks = p.div_ceil(16);
            let mut v = 0;
            // SAFETY: as the caller promises; the blocks lie inside the planes.
            unsafe {
                while v + 2 <= blocks {
                    self.blocks::<R, 2>(ys, p, v);
                    v += 2;
                }
                if v < blocks {
                    self.blocks::<R, 1>(ys, p, v);
                }
            }
        }

        /// Blocks `v..v + N` of the tile's planes.
        ///
        /// # Safety
        /// As [`Tile::rows`], and the blocks lie inside the planes.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn blocks<const R: usize, const N: usize>(
            &self,
            ys: &mut [f32],
            p: usize,
            v: usize,
        ) {
            let (flat, kk) = (self.flat, self.flat.offsets.len());
            let (blocks, k) = (p.div_ceil(16), self.c * kk);
            let mut acc = [[_mm512_setzero_ps(); N]; R];
            for ci in 0..self.c {
                let plane = self.planes[ci * p..].as_ptr();
                for (t, &off) in flat.offsets.iter().enumerate() {
                    let from = plane.wrapping_offset(off).wrapping_add(16 * v);
                    let masks = &flat.masks[t * blocks + v..][..N];
                    // SAFETY: each mask selects inputs inside the plane (masked-off values
                    // are not read).
                    let xs: [__m512; N] = std::array::from_fn(|j| unsafe {
                        _mm512_maskz_loadu_ps(masks[j], from.wrapping_add(16 * j))
                    });
                    for (r, row) in acc.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(self.w[r * k + ci * kk + t]);
                        for (a, &xv) in row.iter_mut().zip(&xs) {
                            *a = _mm512_fmadd_ps(wv, xv, *a);
                        }
                    }
                }
            }
            let (lo, hi) = (_mm512_set1_ps(self.act.lo), _mm512_set1_ps(self.act.hi));
            for (r, row) in acc.iter().enumerate() {
                let bv = _mm512_set1_ps(self.b[r]);
                for (j, &a) in row.iter().enumerate() {
                    let at = 16 * (v + j);
                    let keep = (u32::MAX >> (32 - (p - at).min(16))) as u16;
                    // max(lo, v) and min(hi, v) return v when v is NaN, as Epilogue does.
                    let out = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_add_ps(a, bv)));
                    // SAFETY: outputs `at..at + 16` of plane r that `keep` selects lie
                    // inside `ys`.
                    unsafe { _mm512_mask_storeu_ps(ys[r * p + at..].as_mut_ptr(), keep, out) };
                }
            }
        }
    }
}

/// A pointwise convolution's forward over `n` samples ([`pointwise::product`]), written
/// straight into the (never zeroed) output.
fn pointwise_forward(
    n: usize,
    (o, k, p): (usize, usize, usize),
    x: &[f32],
    w: &[f32],
    b: &[f32],
    act: Epilogue,
) -> Vec<f32> {
    let len = n * o * p;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: the buffer has room for n * o * p values, which only this call writes.
    unsafe {
        pointwise::product(
            Disjoint(y.as_mut_ptr()),
            (w, k, 1),
            x,
            Some(b),
            (n, o, k, p),
            act,
            len * k >= SERIAL_PRODUCT,
            has_avx2_fma(),
        )
    };
    // SAFETY: the product wrote all n * o * p values.
    unsafe { y.set_len(len) };
    y
}

/// A dense convolution `(x [N, C, H, W], w [O, C, KH, KW], b [O])` as `W · im2col(x) + b`.
struct DenseConv {
    g: Geom,
    o: usize,
}

/// The gradients of [`DenseConv`] as one flat tensor: `dx`, then `dw`, then `db`.
struct DenseConvGrad {
    g: Geom,
    o: usize,
}

impl candle_core::CustomOp3 for DenseConv {
    fn name(&self) -> &'static str {
        "slim-conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, o) = (self.g, self.o);
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let y = dense_forward(&g, o, x, w, b, Epilogue::NONE);
        Ok((CpuStorage::F32(y), Shape::from((g.n, o, g.oh, g.ow))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, gb) = dense_grads(x, w, grad, self.g, self.o)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// The input, weight and bias gradients of [`DenseConv`] for the output gradient `grad`.
fn dense_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    g: Geom,
    o: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &DenseConvGrad { g, o })?;
    let (nx, nw) = (x.elem_count(), w.elem_count());
    let gx = all.narrow(0, 0, nx)?.reshape(x.dims())?;
    let gw = all.narrow(0, nx, nw)?.reshape(w.dims())?;
    let gb = all.narrow(0, nx + nw, o)?;
    Ok((gx, gw, gb))
}

impl candle_core::CustomOp3 for DenseConvGrad {
    fn name(&self) -> &'static str {
        "slim-conv2d-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, o) = (self.g, self.o);
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let gy = f32_slice(s3, l3, self.name())?;
        let (k, p) = (g.c * g.kh * g.kw, g.oh * g.ow);
        let (nx, nw) = (g.n * g.c * g.h * g.w, o * k);
        let per_in = g.c * g.h * g.w;
        let one = Geom { n: 1, ..g };
        // Nothing is zeroed up front: a pointwise input gradient is written whole by its
        // product, a dense one is zeroed sample by sample just before its fold adds into it
        // (in cache, on the worker), and the weight and bias gradients are written at the end.
        let mut out: Vec<f32> = Vec::with_capacity(nx + nw + o);
        let (gx, rest) = out.spare_capacity_mut()[..nx + nw + o].split_at_mut(nx);
        let (gw, gb) = rest.split_at_mut(nw);
        // Sample by sample, in runs of samples per task: dX_n = fold(Wᵀ · G_n) (a pointwise
        // convolution needs no fold, and no unfold below), and per task dW += G_n · cols_nᵀ
        // and db += the sums of G_n's rows; the tasks' dW and db are summed at the end. Each
        // sample's unfold and products stay in cache. With fewer samples than threads, one
        // task runs the products over every core.
        let threads = rayon::current_num_threads();
        let parallel = g.n < threads;
        let fast = has_avx2_fma();
        let parts = if parallel { 1 } else { (threads * 4).min(g.n) };
        let per = g.n.div_ceil(parts.max(1)).max(1);
        // `out = Wᵀ · G_n` (k * p values: a pointwise input gradient, or the columns a fold
        // turns into one), by the forward's tiles.
        let transposed_product = |out: &mut [MaybeUninit<f32>], gn: &[f32]| {
            assert_eq!(out.len(), k * p, "input-gradient columns");
            // SAFETY: `out` holds k * p values and is borrowed mutably here alone; the product
            // writes every one of them and reads none.
            unsafe {
                pointwise::product(
                    Disjoint(out.as_mut_ptr().cast::<f32>()),
                    (w, 1, k),
                    gn,
                    None,
                    (1, k, o, p),
                    Epilogue::NONE,
                    parallel,
                    fast,
                )
            }
        };
        let partial: Vec<(Vec<f32>, Vec<f64>)> = gx
            .par_chunks_mut(per * per_in)
            .enumerate()
            .map(|(t, gx_part)| {
                let mut acc_w = pointwise::WeightGrad::new(o, k, p);
                let mut acc_b = vec![0f64; o];
                let cols_len = if g.pointwise() { 0 } else { k * p };
                let mut cols = vec![0f32; cols_len];
                let mut gcols: Vec<f32> = Vec::with_capacity(cols_len);
                let gcols = &mut gcols.spare_capacity_mut()[..cols_len];
                for (j, dst) in gx_part.chunks_mut(per_in).enumerate() {
                    let n = t * per + j;
                    let gn = &gy[n * o * p..][..o * p];
                    let xn = &x[n * per_in..][..per_in];
                    if g.pointwise() {
                        transposed_product(dst, gn);
                        acc_w.add(gn, xn, parallel, fast);
                    } else {
                        unfold_into(&one, xn, &mut cols, parallel);
                        acc_w.add(gn, &cols, parallel, fast);
                        transposed_product(gcols, gn);
                        // SAFETY: the product wrote every value of `gcols`.
                        let gcols = unsafe { assume_written(gcols) };
                        fold_into(&one, gcols, zeroed(dst), parallel);
                    }
                    for (b, row) in acc_b.iter_mut().zip(gn.chunks_exact(p)) {
                        *b += f64::from(lane_sum(row, row, |v, _| v));
                    }
                }
                (acc_w.finish(), acc_b)
            })
            .collect();
        let mut sums_w = vec![0f32; nw];
        let mut sums_b = vec![0f64; o];
        for (part_w, part_b) in partial {
            sums_w.iter_mut().zip(part_w).for_each(|(d, s)| *d += s);
            sums_b.iter_mut().zip(part_b).for_each(|(d, s)| *d += s);
        }
        gw.iter_mut().zip(sums_w).for_each(|(d, s)| {
            d.write(s);
        });
        gb.iter_mut().zip(sums_b).for_each(|(d, s)| {
            d.write(s as f32);
        });
        // SAFETY: every input gradient value was written by its sample's product (pointwise)
        // or zeroed and then folded into, and the weight and bias gradients just above.
        unsafe { out.set_len(nx + nw + o) };
        Ok((CpuStorage::F32(out), Shape::from(nx + nw + o)))
    }
}

/// A convolution input plane laid out for whole-plane sweeps: zero-padded, and split by
/// stride phase (the rows `y` and columns `x` of the padded plane with one `y % stride` and
/// one `x % stride` side by side). Every kernel tap then reads one phase from one offset, and
/// one long sweep over the phase computes that tap's share of every output at once (output
/// rows as wide as the phase's rows; the extra columns are dropped at the end). On the small
/// planes of small networks (7x7, 14x14) a sweep per output row cost more in loop overhead
/// than in arithmetic. Depthwise convolutions, f32 and int8, run this way.
#[derive(Clone, Debug)]
pub struct Phases {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
    /// Rows and columns of one phase.
    ph: usize,
    pw: usize,
    /// Output rows and columns.
    oh: usize,
    ow: usize,
    /// Per kernel tap (row-major): where its sweep starts in the phases.
    taps: Vec<usize>,
}

impl Phases {
    /// The layout for a `kh x kw` kernel over an `h x w` plane with symmetric padding `pad`,
    /// stride and dilation.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        h: usize,
        w: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        pad: usize,
        dil: usize,
    ) -> Self {
        let st = stride.max(1);
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        let (ph, pw) = (hp.div_ceil(st), wp.div_ceil(st));
        let oh = (hp - dil * (kh - 1) - 1) / st + 1;
        let ow = (wp - dil * (kw - 1) - 1) / st + 1;
        // Tap (ky, kx) of output (oy, ox) reads padded (oy st + ky dil, ox st + kx dil): in
        // phase ((ky dil) % st, (kx dil) % st), row oy + (ky dil) / st, column ox + (kx dil) / st.
        let taps = (0..kh * kw)
            .map(|t| {
                let (dy, dx) = ((t / kw) * dil, (t % kw) * dil);
                ((dy % st) * st + dx % st) * ph * pw + (dy / st) * pw + dx / st
            })
            .collect();
        Phases {
            stride: st,
            pad,
            h,
            w,
            ph,
            pw,
            oh,
            ow,
            taps,
        }
    }

    /// Values in the phases of one plane.
    pub fn len(&self) -> usize {
        self.stride * self.stride * self.ph * self.pw
    }

    /// Whether the layout holds nothing (never, for a valid convolution).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The length of every sweep: from output (0, 0) to output (oh - 1, ow - 1) in rows of
    /// the phase's width (the last row needs only its valid columns, which keeps every tap's
    /// reads inside its phase).
    pub fn span(&self) -> usize {
        (self.oh - 1) * self.pw + self.ow
    }

    /// Where tap `t`'s sweep starts.
    pub fn tap(&self, t: usize) -> usize {
        self.taps[t]
    }

    /// Where output row `oy` starts in a sweep's result.
    pub fn row(&self, oy: usize) -> usize {
        oy * self.pw
    }

    /// Writes the plane `src` (`h * w` values) into `phases` (of [`Phases::len`] values). The
    /// padding is never written: start from zeros and reuse the buffer for plane after plane.
    pub fn fill<T: Copy>(&self, src: &[T], phases: &mut [T]) {
        if self.stride == 2 {
            // Each row's column pairs split into two phase rows in one pass (which vectorizes,
            // where a strided copy per phase did not).
            return self.rows2(|y, a, b| {
                let (ra, rb) = two_rows(phases, a, b, self.w);
                let row = &src[y * self.w..][..self.w];
                for ((da, db), pair) in ra.iter_mut().zip(rb.iter_mut()).zip(row.chunks_exact(2)) {
                    *da = pair[0];
                    *db = pair[1];
                }
                if self.w % 2 == 1 {
                    ra[self.w / 2] = row[self.w - 1];
                }
            });
        }
        self.runs(|at_src, at, n, step| {
            if step == 1 {
                copy_short(&mut phases[at..at + n], &src[at_src..at_src + n]);
            } else {
                for (d, &v) in phases[at..at + n]
                    .iter_mut()
                    .zip(src[at_src..].iter().step_by(step))
                {
                    *d = v;
                }
            }
        });
    }

    /// The inverse of [`Phases::fill`]: the plane's `h * w` values read back from `phases`
    /// into `dst` (the padding is dropped).
    pub fn take<T: Copy>(&self, phases: &[T], dst: &mut [T]) {
        if self.stride == 2 {
            return self.rows2(|y, a, b| {
                let (ra, rb) = (
                    &phases[a..][..self.w.div_ceil(2)],
                    &phases[b..][..self.w / 2],
                );
                let row = &mut dst[y * self.w..][..self.w];
                for ((&va, &vb), pair) in ra.iter().zip(rb).zip(row.chunks_exact_mut(2)) {
                    pair[0] = va;
                    pair[1] = vb;
                }
                if self.w % 2 == 1 {
                    row[self.w - 1] = ra[self.w / 2];
                }
            });
        }
        self.runs(|at_src, at, n, step| {
            if step == 1 {
                copy_short(&mut dst[at_src..at_src + n], &phases[at..at + n]);
            } else {
                for (d, &v) in dst[at_src..]
                    .iter_mut()
                    .step_by(step)
                    .zip(&phases[at..at + n])
                {
                    *d = v;
                }
            }
        });
    }

    /// For stride 2: `f(y, a, b)` for each row `y` of the plane, whose even columns go to the
    /// phases from `a` on and odd ones from `b` on.
    fn rows2(&self, mut f: impl FnMut(usize, usize, usize)) {
        debug_assert_eq!(self.stride, 2);
        let (pad, pw) = (self.pad, self.pw);
        let phase = self.ph * pw;
        // Padded column x + pad goes to phase (x + pad) % 2, column (x + pad) / 2.
        let even = (pad % 2) * phase + pad / 2;
        let odd = ((pad + 1) % 2) * phase + pad.div_ceil(2);
        for y in 0..self.h {
            let py = y + pad;
            let row = (py % 2) * 2 * phase + (py / 2) * pw;
            f(y, row + even, row + odd);
        }
    }

    /// Where the plane's values go: `f(at_src, at, n, step)` for each run of `n` values of
    /// the plane, from index `at_src` every `step` values, that land at consecutive places
    /// from `at` in the phases. (Column `px = x + pad` of a row goes to phase `px % stride`,
    /// column `px / stride`.)
    fn runs(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (st, pad, w) = (self.stride, self.pad, self.w);
        let phase = self.ph * self.pw;
        for y in 0..self.h {
            let py = y + pad;
            if st == 1 {
                f(y * w, py * self.pw + pad, w, 1);
                continue;
            }
            let row = (py % st) * st * phase + (py / st) * self.pw;
            for rx in 0..st {
                let x0 = (rx + st - pad % st) % st;
                if x0 >= w {
                    continue;
                }
                let c0 = (x0 + pad) / st;
                let n = (self.pw - c0).min((w - x0).div_ceil(st));
                f(y * w + x0, row + rx * phase + c0, n, st);
            }
        }
    }

    /// Writes the `oh * ow` output plane `src` into `wide` (of [`Phases::span`] values) in rows
    /// of the phase's width, as the sweeps lay out their results; the extra columns are never
    /// written (start from zeros).
    pub fn widen<T: Copy>(&self, src: &[T], wide: &mut [T]) {
        for (oy, line) in src.chunks_exact(self.ow).enumerate() {
            copy_short(&mut wide[self.row(oy)..][..self.ow], line);
        }
    }
}

/// The disjoint runs `buf[a..]` and `buf[b..]` for a row of `w` values split by stride-2
/// phase: `ceil(w / 2)` values from `a`, `w / 2` from `b`.
fn two_rows<T>(buf: &mut [T], a: usize, b: usize, w: usize) -> (&mut [T], &mut [T]) {
    let (na, nb) = (w.div_ceil(2), w / 2);
    if a < b {
        let (lo, hi) = buf.split_at_mut(b);
        (&mut lo[a..][..na], &mut hi[..nb])
    } else {
        let (lo, hi) = buf.split_at_mut(a);
        (&mut hi[..na], &mut lo[b..][..nb])
    }
}

/// `acc[i] = act(bias + sum over taps t of filt[t] * phases[taps[t] + i])` for every `i` of
/// `acc` (one sweep over the span, every tap's share of a block of outputs summed in
/// registers, so each output is written once), with AVX2 and FMA where the machine has them.
fn sweep_taps_f32(
    acc: &mut [f32],
    phases: &[f32],
    taps: &[usize],
    filt: &[f32],
    (bias, act): (f32, Epilogue),
    fast: bool,
) {
    let span = acc.len();
    assert_eq!(filt.len(), taps.len(), "one weight per tap");
    assert!(
        taps.iter().all(|&at| at + span <= phases.len()),
        "a tap's sweep leaves the phases"
    );
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: the machine has AVX2 and FMA, and every read is in bounds (checked above).
        return unsafe { depthwise_avx2::sweep(acc, phases, taps, filt, bias, act) };
    }
    let _ = fast;
    // Blocks of outputs summed in a local array (which the compiler keeps in registers and
    // vectorizes as the target allows).
    const B: usize = 32;
    for (i, out) in (0..span).step_by(B).zip(acc.chunks_mut(B)) {
        let mut block = [bias; B];
        let n = out.len();
        for (&wv, &at) in filt.iter().zip(taps) {
            for (v, &x) in block[..n].iter_mut().zip(&phases[at + i..at + i + n]) {
                *v += wv * x;
            }
        }
        for (o, &v) in out.iter_mut().zip(&block) {
            *o = act.apply(v);
        }
    }
}

/// A depthwise layer (stride 1 or 2) as [`depthwise_avx512::plane`] runs it: each output row
/// in blocks of 16 outputs, each tap's 16 inputs loaded straight from the unpadded input row
/// (masked where they fall into the padding; at stride 2 two loads, then the even values),
/// so nothing is laid out or copied. Per block and kernel column, the load masks.
struct DepthwiseRows {
    g: Geom,
    /// Per block and kernel column: which of the 32 values from the block's first input
    /// column of that tap lie inside the row (the first 16 only, at stride 1).
    masks: Vec<u32>,
    /// For a layer whose output plane has the input's size at stride 1, the plane as one
    /// flat row instead ([`FlatTaps`]).
    flat: Option<FlatTaps>,
}

/// A depthwise layer computed over its flattened output plane: output `i` (of `oh * ow`)
/// reads its tap `t` at `i + offsets[t]` of a plane laid out with rows of `ow` values, so
/// blocks of 16 outputs run across row ends and no lane is spent on a row's tail (a 7x7
/// plane is 49 outputs in 4 registers, not 7 rows of 16). At stride 1 with the output the
/// input's size, that plane is the input itself; at stride 2, the input split into its four
/// phases (even and odd rows by even and odd columns, each `oh * ow`, one after the other),
/// where a tap's inputs are again `ow` apart. The inputs a tap must not read (in the padding,
/// or across a row's end) are masked.
struct FlatTaps {
    /// Per tap, the offset from an output's position to its input's in the layout.
    offsets: Vec<isize>,
    /// Per tap and block of 16 outputs (`masks[t * blocks + v]`): which outputs of the
    /// block have that tap's input inside the input plane.
    masks: Vec<u16>,
    /// At stride 2, how the input is split into the phases ([`FlatTaps::split`]); `None` at
    /// stride 1.
    split: Option<Vec<SplitChunk>>,
}

/// 16 columns of the four phases from `c0` (`from` 32 of an input row from column `2 * c0`):
/// the mask of the input row's values, and of the even and odd columns kept.
#[derive(Clone, Copy)]
struct SplitChunk {
    c0: usize,
    from: u32,
    even: u16,
    odd: u16,
}

impl FlatTaps {
    /// The taps of `g`, or `None` unless it is stride 1 with the output the input's size, or
    /// stride 2 with every input a tap reads inside its phase's `oh * ow` values.
    fn new(g: &Geom) -> Option<FlatTaps> {
        let s = g.stride as isize;
        if !(g.stride == 1 && (g.oh, g.ow) == (g.h, g.w) || g.stride == 2) {
            return None;
        }
        let (len, pad, ow) = (g.oh * g.ow, g.pad as isize, g.ow as isize);
        let taps: Vec<(isize, isize)> = (0..g.kh)
            .flat_map(|ky| (0..g.kw).map(move |kx| (ky, kx)))
            .map(|(ky, kx)| ((ky * g.dil) as isize - pad, (kx * g.dil) as isize - pad))
            .collect();
        // Where tap (dy, dx) of output (0, 0) lies: its phase plane, row and column.
        let place = |(dy, dx): (isize, isize)| {
            let phase = 2 * dy.rem_euclid(s) + dx.rem_euclid(s);
            (phase, dy.div_euclid(s), dx.div_euclid(s))
        };
        let offsets = taps
            .iter()
            .map(|&t| {
                let (phase, row, col) = place(t);
                phase * len as isize + row * ow + col
            })
            .collect();
        let mut masks = Vec::with_capacity(taps.len() * len.div_ceil(16));
        for &(dy, dx) in &taps {
            let (_, row, col) = place((dy, dx));
            for v in 0..len.div_ceil(16) {
                let mut m = 0u16;
                for i in (16 * v..16 * v + 16).filter(|&i| i < len) {
                    let (oy, ox) = ((i / g.ow) as isize, (i % g.ow) as isize);
                    let (iy, ix) = (oy * s + dy, ox * s + dx);
                    if (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix) {
                        // The input must lie inside its phase plane's rows of `ow`.
                        if !((0..g.oh as isize).contains(&(oy + row))
                            && (0..ow).contains(&(ox + col)))
                        {
                            return None;
                        }
                        m |= 1 << (i - 16 * v);
                    }
                }
                masks.push(m);
            }
        }
        Some(FlatTaps {
            offsets,
            masks,
            split: (g.stride == 2).then(|| FlatTaps::split(g)),
        })
    }

    /// The chunks that split each input row of `g` into its phases' rows of `ow` values: 32
    /// values of the row at a time (the same for every row).
    fn split(g: &Geom) -> Vec<SplitChunk> {
        let first = |n: usize| (u32::MAX >> (32 - n.min(16))) as u16;
        (0..g.ow)
            .step_by(16)
            .take_while(|&c0| 2 * c0 < g.w)
            .map(|c0| {
                let (n, left) = ((g.w - 2 * c0).min(32), g.ow - c0);
                SplitChunk {
                    c0,
                    from: u32::MAX >> (32 - n),
                    even: first(n.div_ceil(2).min(left)),
                    odd: if n >= 2 { first((n / 2).min(left)) } else { 0 },
                }
            })
            .collect()
    }
}

impl DepthwiseRows {
    /// The layout for `g`, or `None` for strides above 2.
    fn new(g: &Geom) -> Option<DepthwiseRows> {
        if g.stride > 2 || g.oh == 0 || g.ow == 0 || g.kh * g.kw == 0 {
            return None;
        }
        let span = if g.stride == 1 { 16 } else { 32 };
        let masks = (0..g.ow)
            .step_by(16)
            .flat_map(|ox0| {
                (0..g.kw).map(move |kx| {
                    let ix0 = (ox0 * g.stride + kx * g.dil) as isize - g.pad as isize;
                    (0..span)
                        .filter(|&j| (0..g.w as isize).contains(&(ix0 + j as isize)))
                        .fold(0u32, |m, j| m | 1 << j)
                })
            })
            .collect();
        let flat = FlatTaps::new(g);
        Some(DepthwiseRows { g: *g, masks, flat })
    }

    /// [`DepthwiseRows::new`] for the planes of `g` (the batch and channel counts aside),
    /// made the first time a layer of that geometry runs and kept for the next forwards.
    fn cached(g: &Geom) -> Option<Arc<DepthwiseRows>> {
        static KEPT: Memo<Geom, Option<Arc<DepthwiseRows>>> = Memo::new();
        let key = Geom { n: 0, c: 0, ..*g };
        KEPT.get(key, || DepthwiseRows::new(&key).map(Arc::new))
    }
}

#[cfg(target_arch = "x86_64")]
mod depthwise_avx512 {
    use std::arch::x86_64::*;

    use super::{DepthwiseRows, Epilogue, FlatTaps, SplitChunk};

    /// One plane of a depthwise convolution, `act(bias + sum over taps of filt[t] * x)`, the
    /// taps summed in row-major order with one fused multiply-add each (taps in the padding
    /// add the product with zero), as the phase sweeps sum them: the results are the same
    /// bits. `x` is the input plane (`h * w`), `y` the output plane (`oh * ow`).
    ///
    /// # Safety
    /// The machine has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane(
        rows: &DepthwiseRows,
        x: &[f32],
        filt: &[f32],
        epilogue: (f32, Epilogue),
        y: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let g = &rows.g;
        assert!(
            x.len() == g.h * g.w
                && filt.len() == g.kh * g.kw
                && y.len() == g.oh * g.ow
                && rows.masks.len() == g.ow.div_ceil(16) * g.kw,
            "a depthwise plane out of bounds"
        );
        // SAFETY: as the caller promises, and the slices are checked above.
        unsafe {
            if let Some(flat) = &rows.flat {
                assert!(
                    flat.offsets.len() == filt.len()
                        && flat.masks.len() == filt.len() * y.len().div_ceil(16),
                    "a depthwise plane's flat taps out of bounds"
                );
                if let Some(chunks) = &flat.split {
                    scratch.resize(scratch.len().max(4 * y.len()), 0.0);
                    split_phases(g, chunks, x, scratch);
                    flat_plane(flat, scratch, filt, epilogue, y)
                } else {
                    flat_plane(flat, x, filt, epilogue, y)
                }
            } else if g.stride == 1 {
                plane_by::<1>(rows, x, filt, epilogue, y)
            } else {
                plane_by::<2>(rows, x, filt, epilogue, y)
            }
        }
    }

    /// Plane `x` (`h * w`) split into its four phases at stride 2 in `to`, each `oh * ow`
    /// one after the other ([`FlatTaps`]): phase `2a + b` holds `x[2r + a][2c + b]` at row
    /// `r` and column `c`, for every such input inside the plane with `r < oh` and
    /// `c < ow`; 32 inputs of a row at a time, split by two permutes.
    ///
    /// # Safety
    /// The machine has AVX-512 F, and `chunks` are [`FlatTaps::split`]'s for `g`.
    #[target_feature(enable = "avx512f")]
    unsafe fn split_phases(g: &super::Geom, chunks: &[SplitChunk], x: &[f32], to: &mut [f32]) {
        let op = g.oh * g.ow;
        assert!(
            x.len() == g.h * g.w && to.len() >= 4 * op,
            "a plane's phases out of bounds"
        );
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let out = to.as_mut_ptr();
        // Chunk by chunk, each over every row: a chunk's masks stay in registers.
        for &SplitChunk {
            c0,
            from: m,
            even: keep_even,
            odd: keep_odd,
        } in chunks
        {
            for (y, row) in x.chunks_exact(g.w).enumerate().take(2 * g.oh) {
                let (a, r) = (y % 2, y / 2);
                let (to_even, to_odd) = ((2 * a) * op + r * g.ow, (2 * a + 1) * op + r * g.ow);
                // SAFETY: the masks select the row's values from column 2 * c0 on (masked-off
                // values are not read), and each phase's values `c0..c0 + 16` that the
                // stores' masks select lie before `c0 + (ow - c0)`, inside its row of `to`
                // (checked above: phase 2a + 1's row r ends by 4 * op).
                unsafe {
                    let p = row.as_ptr().add(2 * c0);
                    let lo = _mm512_maskz_loadu_ps(m as u16, p);
                    let hi = _mm512_maskz_loadu_ps((m >> 16) as u16, p.wrapping_add(16));
                    let (e, o) = (
                        _mm512_permutex2var_ps(lo, even, hi),
                        _mm512_permutex2var_ps(lo, odd, hi),
                    );
                    _mm512_mask_storeu_ps(out.add(to_even + c0), keep_even, e);
                    _mm512_mask_storeu_ps(out.add(to_odd + c0), keep_odd, o);
                }
            }
        }
    }

    /// Blocks of 16 outputs computed together over the flattened plane: independent chains
    /// of multiply-adds.
    const V: usize = 8;

    /// [`plane`] over the flattened plane ([`FlatTaps`]), `V` blocks of 16 outputs at a
    /// time; the plane's last blocks (fewer than `V`) together.
    ///
    /// # Safety
    /// The machine has AVX-512 F; `x` and `y` hold the plane, `flat` has one offset and the
    /// plane's blocks' masks per weight of `filt`.
    #[target_feature(enable = "avx512f")]
    unsafe fn flat_plane(
        flat: &FlatTaps,
        x: &[f32],
        filt: &[f32],
        (bias, act): (f32, Epilogue),
        y: &mut [f32],
    ) {
        let ends = (
            _mm512_set1_ps(bias),
            _mm512_set1_ps(act.lo),
            _mm512_set1_ps(act.hi),
        );
        let blocks = y.len().div_ceil(16);
        let mut v0 = 0;
        // SAFETY (whole body): as the caller promises.
        unsafe {
            while v0 + V <= blocks {
                flat_blocks::<V>(flat, x, filt, ends, y, v0);
                v0 += V;
            }
            match blocks - v0 {
                1 => flat_blocks::<1>(flat, x, filt, ends, y, v0),
                2 => flat_blocks::<2>(flat, x, filt, ends, y, v0),
                3 => flat_blocks::<3>(flat, x, filt, ends, y, v0),
                4 => flat_blocks::<4>(flat, x, filt, ends, y, v0),
                5 => flat_blocks::<5>(flat, x, filt, ends, y, v0),
                6 => flat_blocks::<6>(flat, x, filt, ends, y, v0),
                7 => flat_blocks::<7>(flat, x, filt, ends, y, v0),
                _ => {}
            }
        }
    }

    /// Blocks `v0..v0 + N` of [`flat_plane`]: from the bias, each tap's multiply-add in
    /// order (a masked input adds the product with zero, as in the rows), then the clamp.
    ///
    /// # Safety
    /// As [`flat_plane`], and the blocks lie inside the plane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn flat_blocks<const N: usize>(
        flat: &FlatTaps,
        x: &[f32],
        filt: &[f32],
        (bv, lo, hi): (__m512, __m512, __m512),
        y: &mut [f32],
        v0: usize,
    ) {
        let (len, blocks) = (y.len(), y.len().div_ceil(16));
        let mut acc = [bv; N];
        for (t, (&wv, &off)) in filt.iter().zip(&flat.offsets).enumerate() {
            let wt = _mm512_set1_ps(wv);
            let from = x.as_ptr().wrapping_offset(off).wrapping_add(16 * v0);
            let masks = &flat.masks[t * blocks + v0..][..N];
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: the mask selects inputs inside the plane (masked-off values are
                // not read).
                let v = unsafe { _mm512_maskz_loadu_ps(masks[j], from.wrapping_add(16 * j)) };
                *a = _mm512_fmadd_ps(wt, v, *a);
            }
        }
        for (j, &a) in acc.iter().enumerate() {
            let at = 16 * (v0 + j);
            let keep = (u32::MAX >> (32 - (len - at).min(16))) as u16;
            // max(lo, v) and min(hi, v) return v when v is NaN, as Epilogue does.
            let v = _mm512_min_ps(hi, _mm512_max_ps(lo, a));
            // SAFETY: outputs `at..at + 16` that `keep` selects lie inside `y`.
            unsafe { _mm512_mask_storeu_ps(y[at..].as_mut_ptr(), keep, v) };
        }
    }

    /// Output rows computed together: independent chains of multiply-adds.
    const R: usize = 4;

    /// [`plane`] at stride `S` (1 or 2), the slices checked.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn plane_by<const S: usize>(
        rows: &DepthwiseRows,
        x: &[f32],
        filt: &[f32],
        (bias, act): (f32, Epilogue),
        y: &mut [f32],
    ) {
        let g = &rows.g;
        let (bv, lo, hi) = (
            _mm512_set1_ps(bias),
            _mm512_set1_ps(act.lo),
            _mm512_set1_ps(act.hi),
        );
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let base = x.as_ptr();
        let (w, pad) = (g.w as isize, g.pad as isize);
        // The 16 inputs of a tap from `p` on (every `S`th value), those in `m` (the rest 0).
        let load = |p: *const f32, m: u32| {
            // SAFETY: the mask selects values inside the row (masked-off values are not
            // read).
            unsafe {
                if S == 1 {
                    _mm512_maskz_loadu_ps(m as u16, p)
                } else {
                    let a = _mm512_maskz_loadu_ps(m as u16, p);
                    let b = _mm512_maskz_loadu_ps((m >> 16) as u16, p.wrapping_add(16));
                    _mm512_permutex2var_ps(a, even, b)
                }
            }
        };
        for oy0 in (0..g.oh).step_by(R) {
            let nr = (g.oh - oy0).min(R);
            // Whether every input row these output rows read lies inside the plane.
            let inside = nr == R
                && (oy0 * S) as isize >= pad
                && (((oy0 + R - 1) * S + (g.kh - 1) * g.dil) as isize) < g.h as isize + pad;
            for (blk, ox0) in (0..g.ow).step_by(16).enumerate() {
                let n = (g.ow - ox0).min(16);
                let masks = &rows.masks[blk * g.kw..][..g.kw];
                let mut acc = [bv; R];
                for ky in 0..g.kh {
                    let iy: [isize; R] =
                        std::array::from_fn(|r| ((oy0 + r) * S + ky * g.dil) as isize - pad);
                    for (kx, &m) in masks.iter().enumerate() {
                        let wt = _mm512_set1_ps(filt[ky * g.kw + kx]);
                        let ix0 = (ox0 * S + kx * g.dil) as isize - pad;
                        if inside {
                            for r in 0..R {
                                let p = base.wrapping_offset(iy[r] * w + ix0);
                                acc[r] = _mm512_fmadd_ps(wt, load(p, m), acc[r]);
                            }
                        } else {
                            for r in 0..nr {
                                let v = if (0..g.h as isize).contains(&iy[r]) {
                                    load(base.wrapping_offset(iy[r] * w + ix0), m)
                                } else {
                                    _mm512_setzero_ps()
                                };
                                acc[r] = _mm512_fmadd_ps(wt, v, acc[r]);
                            }
                        }
                    }
                }
                let keep = (u32::MAX >> (32 - n)) as u16;
                for (r, &acc) in acc.iter().enumerate().take(nr) {
                    // max(lo, v) and min(hi, v) return v when v is NaN, as Epilogue does.
                    let v = _mm512_min_ps(hi, _mm512_max_ps(lo, acc));
                    let at = (oy0 + r) * g.ow + ox0;
                    // SAFETY: outputs `ox0..ox0 + n` of row `oy0 + r` lie inside `y`.
                    unsafe { _mm512_mask_storeu_ps(y[at..].as_mut_ptr(), keep, v) };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod depthwise_avx2 {
    use std::arch::x86_64::*;

    use super::Epilogue;

    /// [`super::tap_dots_f32`] for a group of `G` taps, their lanes in `G` registers.
    ///
    /// # Safety
    /// The machine has AVX2 and FMA; `taps` has `G` entries, `taps[t] + wide.len() <=
    /// phases.len()` for each, and `lanes` holds `G * DOT_LANES` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots<const G: usize>(
        lanes: &mut [f32],
        phases: &[f32],
        taps: &[usize],
        wide: &[f32],
    ) {
        const { assert!(super::DOT_LANES == 8) };
        let span = wide.len();
        // SAFETY (whole body): in bounds as the caller promises.
        unsafe {
            let at: [*const f32; G] = std::array::from_fn(|t| phases.as_ptr().add(taps[t]));
            let mut a: [__m256; G] =
                std::array::from_fn(|t| _mm256_loadu_ps(lanes.as_ptr().add(8 * t)));
            let g = wide.as_ptr();
            let mut i = 0;
            while i + 8 <= span {
                let gv = _mm256_loadu_ps(g.add(i));
                for (v, &p) in a.iter_mut().zip(&at) {
                    *v = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(i)), gv, *v);
                }
                i += 8;
            }
            for (t, &v) in a.iter().enumerate() {
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * t), v);
            }
            for j in i..span {
                for (t, &p) in at.iter().enumerate() {
                    lanes[8 * t + j - i] += *p.add(j) * *g.add(j);
                }
            }
        }
    }

    /// [`super::sweep_taps_f32`] in 4 vector registers per block of 32 outputs.
    ///
    /// # Safety
    /// The machine has AVX2 and FMA; `taps[t] + acc.len() <= phases.len()` for every tap and
    /// `filt` has one weight per tap.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sweep(
        acc: &mut [f32],
        phases: &[f32],
        taps: &[usize],
        filt: &[f32],
        bias: f32,
        act: Epilogue,
    ) {
        let span = acc.len();
        let (ph, out) = (phases.as_ptr(), acc.as_mut_ptr());
        // SAFETY (whole body): reads stay below taps[t] + span <= phases.len(), writes below
        // span, as the caller promises.
        unsafe {
            let (bv, lo, hi) = (
                _mm256_set1_ps(bias),
                _mm256_set1_ps(act.lo),
                _mm256_set1_ps(act.hi),
            );
            // max(lo, v) and min(hi, v) return v when v is NaN, as Epilogue does.
            let clamp = |v: __m256| _mm256_min_ps(hi, _mm256_max_ps(lo, v));
            let mut i = 0;
            while i + 32 <= span {
                let mut a = [bv; 4];
                for (&wv, &at) in filt.iter().zip(taps) {
                    let w = _mm256_set1_ps(wv);
                    let p = ph.add(at + i);
                    for (j, v) in a.iter_mut().enumerate() {
                        *v = _mm256_fmadd_ps(w, _mm256_loadu_ps(p.add(8 * j)), *v);
                    }
                }
                for (j, &v) in a.iter().enumerate() {
                    _mm256_storeu_ps(out.add(i + 8 * j), clamp(v));
                }
                i += 32;
            }
            while i + 8 <= span {
                let mut v = bv;
                for (&wv, &at) in filt.iter().zip(taps) {
                    v = _mm256_fmadd_ps(_mm256_set1_ps(wv), _mm256_loadu_ps(ph.add(at + i)), v);
                }
                _mm256_storeu_ps(out.add(i), clamp(v));
                i += 8;
            }
            for i in i..span {
                let mut v = bias;
                for (&wv, &at) in filt.iter().zip(taps) {
                    v = wv.mul_add(*ph.add(at + i), v);
                }
                *out.add(i) = act.apply(v);
            }
        }
    }
}

/// Partial sums per tap in [`tap_dots_f32`].
const DOT_LANES: usize = 8;

/// For each tap t: `lanes[t * DOT_LANES..][..DOT_LANES] += ` the products
/// `phases[taps[t] + i] * wide[i]` over `i` in the span, `i` spread over the tap's lanes (the
/// caller sums each tap's lanes once, at the end). With AVX2 and FMA the taps go in groups of
/// up to 9 whose sums stay in registers over one sweep of the span, so `wide` is read once per
/// group and no product is stored.
fn tap_dots_f32(lanes: &mut [f32], phases: &[f32], taps: &[usize], wide: &[f32], fast: bool) {
    let span = wide.len();
    assert_eq!(lanes.len(), taps.len() * DOT_LANES, "lanes per tap");
    assert!(
        taps.iter().all(|&at| at + span <= phases.len()),
        "a tap's sweep leaves the phases"
    );
    #[cfg(target_arch = "x86_64")]
    if fast {
        let groups = taps.len().div_ceil(9).max(1);
        let size = taps.len().div_ceil(groups).max(1);
        for (taps, lanes) in taps.chunks(size).zip(lanes.chunks_mut(size * DOT_LANES)) {
            macro_rules! group {
                ($($g:literal)*) => {
                    match taps.len() {
                        // SAFETY: the machine has AVX2 and FMA; the reads are in bounds
                        // (checked above) and `lanes` holds DOT_LANES per tap.
                        $($g => unsafe { depthwise_avx2::dots::<$g>(lanes, phases, taps, wide) },)*
                        _ => unreachable!("groups of 1..=9 taps"),
                    }
                };
            }
            group!(1 2 3 4 5 6 7 8 9);
        }
        return;
    }
    let _ = fast;
    for (&at, lane) in taps.iter().zip(lanes.chunks_exact_mut(DOT_LANES)) {
        let (xs, gs) = (
            phases[at..at + span].chunks_exact(DOT_LANES),
            wide.chunks_exact(DOT_LANES),
        );
        let (rx, rg) = (xs.remainder(), gs.remainder());
        for (x, g) in xs.zip(gs) {
            for j in 0..DOT_LANES {
                lane[j] += x[j] * g[j];
            }
        }
        for (j, (&x, &g)) in rx.iter().zip(rg).enumerate() {
            lane[j] += x * g;
        }
    }
}

/// Whether this machine runs AVX2 and FMA code (the register tiles and sweeps), and `SLIM_CPU`
/// allows it.
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::allows(crate::cpu::Level::Avx2)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Depthwise convolution `(x [N, C, H, W], w [C, 1, KH, KW])`.
struct Depthwise(Geom);
/// The gradients of [`Depthwise`], `(x, w, grad_y)` to one flat tensor: `dx`, then `dw`.
struct DepthwiseGrad(Geom);

/// The forward of a depthwise convolution, `act(w[c] ⋆ x[n, c] + b[c])` for every plane, in
/// parallel over blocks of planes.
fn depthwise_forward(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    act: Epilogue,
) -> Vec<f32> {
    let rows = if has_avx512f() {
        DepthwiseRows::cached(g)
    } else {
        None
    };
    depthwise_forward_by(g, x, w, bias, act, rows.as_deref())
}

/// Whether this machine has AVX-512 F (for [`DepthwiseRows`]), and `SLIM_CPU` allows it.
fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::allows(crate::cpu::Level::Avx512)
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`depthwise_forward`] with each output row computed straight from the unpadded plane
/// (`rows`, AVX-512) or, without it, each plane laid out by [`Phases`] and swept.
fn depthwise_forward_by(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    act: Epilogue,
    rows: Option<&DepthwiseRows>,
) -> Vec<f32> {
    let (ip, op, kk) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
    let layout = Phases::new(g.h, g.w, g.kh, g.kw, g.stride, g.pad, g.dil);
    debug_assert_eq!((layout.oh, layout.ow), (g.oh, g.ow));
    let fast = has_avx2_fma();
    let planes_per = (4096 / op).max(1);
    let len = g.n * g.c * op;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    let out = Disjoint(y.as_mut_ptr());
    let planes = g.n * g.c;
    let serial = len * kk < SERIAL_SWEEP;
    for_each_task(planes.div_ceil(planes_per), serial, |task| {
        #[cfg(target_arch = "x86_64")]
        if let Some(rows) = rows {
            let mut scratch = Vec::new();
            for idx in task * planes_per..((task + 1) * planes_per).min(planes) {
                let c = idx % g.c;
                let b = bias.map_or(0.0, |b| b[c]);
                // SAFETY: `rows` exists only where the machine has AVX-512 F (checked by the
                // caller); plane idx's outputs lie inside the buffer's capacity and belong
                // to this task alone.
                unsafe {
                    let plane = out.rows(idx * op, op);
                    depthwise_avx512::plane(
                        rows,
                        &x[idx * ip..(idx + 1) * ip],
                        &w[c * kk..(c + 1) * kk],
                        (b, act),
                        plane,
                        &mut scratch,
                    )
                };
            }
            return;
        }
        let _ = rows;
        let mut phases = vec![0f32; layout.len()];
        let mut acc = vec![0f32; layout.span()];
        for idx in task * planes_per..((task + 1) * planes_per).min(planes) {
            let c = idx % g.c;
            let b = bias.map_or(0.0, |b| b[c]);
            layout.fill(&x[idx * ip..(idx + 1) * ip], &mut phases);
            let filt = &w[c * kk..(c + 1) * kk];
            sweep_taps_f32(&mut acc, &phases, &layout.taps, filt, (b, act), fast);
            // SAFETY: plane idx's outputs lie inside the buffer's capacity and belong to
            // this task alone.
            let plane = unsafe { out.rows(idx * op, op) };
            for (oy, row) in plane.chunks_exact_mut(g.ow).enumerate() {
                copy_short(row, &acc[layout.row(oy)..][..g.ow]);
            }
        }
    });
    // SAFETY: every plane's outputs were written above.
    unsafe { y.set_len(len) };
    y
}

/// A convolution for inference, `act(conv(x, w) + b)` with the bias and activation applied
/// as each output is written (batch norm folded into `w` and `b` by the caller); it has no
/// backward.
struct FusedConv {
    g: Geom,
    o: usize,
    depthwise: bool,
    act: Epilogue,
}

impl candle_core::CustomOp3 for FusedConv {
    fn name(&self) -> &'static str {
        "slim-conv2d-fused"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.g;
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let y = if self.depthwise {
            depthwise_forward(&g, x, w, Some(b), self.act)
        } else {
            dense_forward(&g, self.o, x, w, b, self.act)
        };
        Ok((CpuStorage::F32(y), Shape::from((g.n, self.o, g.oh, g.ow))))
    }
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "slim-depthwise-conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let y = depthwise_forward(&g, x, w, None, Epilogue::NONE);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.c, g.oh, g.ow))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = depthwise_grads(x, w, grad, self.0)?;
        Ok((Some(gx), Some(gw)))
    }
}

/// The input and weight gradients of [`Depthwise`] for the output gradient `grad`.
fn depthwise_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    g: Geom,
) -> candle_core::Result<(Tensor, Tensor)> {
    let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &DepthwiseGrad(g))?;
    let nx = x.elem_count();
    let gx = all.narrow(0, 0, nx)?.reshape(x.dims())?;
    let gw = all.narrow(0, nx, w.elem_count())?.reshape(w.dims())?;
    Ok((gx, gw))
}

impl candle_core::CustomOp3 for DepthwiseGrad {
    fn name(&self) -> &'static str {
        "slim-depthwise-conv2d-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let gy = f32_slice(s3, l3, self.name())?;
        let (ip, op, kk) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
        let layout = Phases::new(g.h, g.w, g.kh, g.kw, g.stride, g.pad, g.dil);
        let fast = has_avx2_fma();
        let span = layout.span();
        // The input gradient as a forward sweep: the phases of the padded input's gradient
        // are `back[j] = sum over t of w[t] * wide[j - tap(t)]`, a correlation of the widened
        // output gradient (zero outside its span) with the taps reversed. The widened
        // gradient sits `lead` zeros into its buffer, so tap t reads from `lead - tap(t)`.
        let lead = layout.taps.iter().copied().max().unwrap_or(0);
        let flipped: Vec<usize> = layout.taps.iter().map(|&t| lead - t).collect();
        let nx = g.n * g.c * ip;
        // Every input-gradient plane is written whole below, so the buffer is not zeroed.
        let mut out: Vec<f32> = Vec::with_capacity(nx + g.c * kk);
        let planes = Disjoint(out.as_mut_ptr());
        // One task per channel, over every sample: each output-gradient plane is widened
        // once and serves both gradients while it is in cache.
        let gw: Vec<Vec<f32>> = (0..g.c)
            .into_par_iter()
            .map(|c| {
                let mut phases = vec![0f32; layout.len()];
                let mut back = vec![0f32; layout.len()];
                let mut padded = vec![0f32; lead + layout.len()];
                // Per tap, the products of the input's phase and the widened output gradient
                // (zero in the extra columns), summed in lanes over every sample, and across
                // the lanes once at the end.
                let mut lanes = vec![0f32; kk * DOT_LANES];
                let taps = &w[c * kk..(c + 1) * kk];
                for n in 0..g.n {
                    let idx = n * g.c + c;
                    // Only the span's valid columns are written, so the rest stays zero.
                    layout.widen(
                        &gy[idx * op..(idx + 1) * op],
                        &mut padded[lead..lead + span],
                    );
                    let wide = &padded[lead..lead + span];
                    layout.fill(&x[idx * ip..(idx + 1) * ip], &mut phases);
                    tap_dots_f32(&mut lanes, &phases, &layout.taps, wide, fast);
                    sweep_taps_f32(
                        &mut back,
                        &padded,
                        &flipped,
                        taps,
                        (0.0, Epilogue::NONE),
                        fast,
                    );
                    // SAFETY: plane `idx` lies inside the buffer's capacity and belongs to
                    // this channel's task alone.
                    layout.take(&back, unsafe { planes.rows(idx * ip, ip) });
                }
                lanes
                    .chunks_exact(DOT_LANES)
                    .map(|l| l.iter().sum::<f32>())
                    .collect()
            })
            .collect();
        // SAFETY: every plane of the input gradient was written above.
        unsafe { out.set_len(nx) };
        out.extend(gw.into_iter().flatten());
        Ok((CpuStorage::F32(out), Shape::from(nx + g.c * kk)))
    }
}

/// Per-channel mean and biased variance of `[N, C, H, W]`, accumulated in f64.
fn channel_stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut s, mut ss) = (0f64, 0f64);
            for i in 0..n {
                let plane = &x[(i * c + ch) * hw..][..hw];
                // The plane is in the cache for the second sum.
                let ps = lane_sum(plane, plane, |v, _| v);
                let pss = lane_sum(plane, plane, |v, _| v * v);
                s += f64::from(ps);
                ss += f64::from(pss);
            }
            let m = (n * hw) as f64;
            let mean = s / m;
            (mean, (ss / m - mean * mean).max(0.0))
        })
        .collect()
}

/// `Σ f(a, b)` over the pairs of `a` and `b`, summed in 16 lanes: a plain running sum is
/// one long chain of dependent additions that the compiler may not reorder, at a fraction of
/// the vector units' rate. One sum per call: asked for two at once, the compiler pairs them
/// up in half-used registers instead.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    const L: usize = 16;
    let mut s = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (ca, cb) in ca.zip(cb) {
        for i in 0..L {
            s[i] += f(ca[i], cb[i]);
        }
    }
    let mut t = s.iter().sum::<f32>();
    for (&x, &y) in ra.iter().zip(rb) {
        t += f(x, y);
    }
    t
}

/// Batch normalization in train mode, fused: `(x [N, C, H, W], gamma [C], beta [C])`,
/// normalizing with the batch's statistics (Ioffe & Szegedy, "Batch Normalization", 2015).
/// Made for one batch by [`BatchNormTrain::for_batch`], which computes the statistics once
/// for the forward, the backward and the running averages.
pub struct BatchNormTrain {
    eps: f64,
    /// Per channel: the mean and the biased variance of the batch.
    stats: Vec<(f64, f64)>,
    /// The ReLU (`∞`) or ReLU6 (`6`) applied to the output, if any: [`Clip`] fused in.
    clip: Option<f32>,
}

impl BatchNormTrain {
    /// The op for the batch `x` (f32 `[N, C, H, W]` on the CPU); apply it to that `x` alone.
    pub fn for_batch(x: &Tensor, eps: f64) -> candle_core::Result<Self> {
        let x = x.contiguous()?;
        let (n, c, h, w) = x.dims4()?;
        let (s, l) = x.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            candle_core::bail!("the fused batch norm runs on the CPU");
        };
        let stats = channel_stats(f32_slice(s, l, "slim-batchnorm-train")?, n, c, h * w);
        Ok(Self {
            eps,
            stats,
            clip: None,
        })
    }

    /// The same op followed by `clamp(·, 0, max)` (ReLU for `max = ∞`, ReLU6 for 6): one
    /// pass and one value fewer than running [`Clip`] after it, with the same values and
    /// gradients.
    pub fn with_clip(mut self, max: f32) -> Self {
        self.clip = Some(max);
        self
    }

    /// The batch's per-channel mean and biased variance.
    pub fn mean_var(&self) -> (Vec<f32>, Vec<f32>) {
        self.stats
            .iter()
            .map(|&(m, v)| (m as f32, v as f32))
            .unzip()
    }
}

impl candle_core::CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "slim-batchnorm-train"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let gamma = f32_slice(s2, l2, self.name())?;
        let beta = f32_slice(s3, l3, self.name())?;
        let (_, c, h, w) = l1.shape().dims4()?;
        let hw = h * w;
        if self.stats.len() != c || gamma.len() != c || beta.len() != c {
            candle_core::bail!(
                "batch norm over {c} channels given {} statistics, {} weights, {} biases",
                self.stats.len(),
                gamma.len(),
                beta.len()
            );
        }
        let st = &self.stats;
        let plane = |(idx, out): (usize, &mut [MaybeUninit<f32>])| {
            let ch = idx % c;
            let inv = (1.0 / (st[ch].1 + self.eps).sqrt()) as f32;
            let scale = gamma[ch] * inv;
            let shift = beta[ch] - st[ch].0 as f32 * scale;
            let x = &x[idx * hw..(idx + 1) * hw];
            match self.clip {
                None => {
                    for (o, &v) in out.iter_mut().zip(x) {
                        o.write(v * scale + shift);
                    }
                }
                Some(max) => {
                    for (o, &v) in out.iter_mut().zip(x) {
                        o.write((v * scale + shift).max(0.0).min(max));
                    }
                }
            }
        };
        // SAFETY: each plane writes all of its values.
        let y = unsafe { written(x.len(), hw, false, plane) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        // Through the clipping first: the output is inside (0, max) exactly where the
        // normalized value was.
        let grad = match self.clip {
            Some(max) => res
                .contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &clip::ClipGrad { max })?,
            None => grad.contiguous()?,
        };
        let all = x.apply_op2_no_bwd(
            &grad,
            &BatchNormGrad {
                eps: self.eps,
                gamma: gamma.to_vec1::<f32>()?,
                stats: &self.stats,
            },
        )?;
        let size = n * c * h * w;
        let gx = all.narrow(0, 0, size)?.reshape((n, c, h, w))?;
        let gg = all.narrow(0, size, c)?;
        let gb = all.narrow(0, size + c, c)?;
        Ok((Some(gx), Some(gg), Some(gb)))
    }
}

/// The gradients of [`BatchNormTrain`] as one flat tensor: `dx`, then `dgamma`, then `dbeta`.
struct BatchNormGrad<'a> {
    eps: f64,
    gamma: Vec<f32>,
    stats: &'a [(f64, f64)],
}

impl CustomOp2 for BatchNormGrad<'_> {
    fn name(&self) -> &'static str {
        "slim-batchnorm-train-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let gy = f32_slice(s2, l2, self.name())?;
        let (n, c, h, w) = l1.shape().dims4()?;
        let hw = h * w;
        let st = self.stats;
        // Per channel: sum of dy (dbeta) and of dy * xhat (dgamma).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let inv = 1.0 / (st[ch].1 + self.eps).sqrt();
                let mean = st[ch].0;
                let (mut db, mut dg) = (0f64, 0f64);
                let m = mean as f32;
                for i in 0..n {
                    let o = (i * c + ch) * hw;
                    let (gy, x) = (&gy[o..o + hw], &x[o..o + hw]);
                    let pb = lane_sum(gy, gy, |g, _| g);
                    let pg = lane_sum(gy, x, |g, v| g * (v - m));
                    db += f64::from(pb);
                    dg += f64::from(pg) * inv;
                }
                (db, dg)
            })
            .collect();
        let m = (n * hw) as f64;
        let mut out: Vec<f32> = Vec::with_capacity(x.len() + 2 * c);
        let (dx, rest) = out.spare_capacity_mut()[..x.len() + 2 * c].split_at_mut(x.len());
        dx.par_chunks_mut(hw).enumerate().for_each(|(idx, plane)| {
            let ch = idx % c;
            let inv = 1.0 / (st[ch].1 + self.eps).sqrt();
            let k = (f64::from(self.gamma[ch]) * inv / m) as f32;
            let (db, dg) = (sums[ch].0 as f32, sums[ch].1 as f32);
            let (mean, invf, mf) = (st[ch].0 as f32, inv as f32, m as f32);
            let o = idx * hw;
            for ((d, &g), &v) in plane.iter_mut().zip(&gy[o..o + hw]).zip(&x[o..o + hw]) {
                let xhat = (v - mean) * invf;
                d.write(k * (mf * g - db - xhat * dg));
            }
        });
        for ch in 0..c {
            rest[ch].write(sums[ch].1 as f32);
            rest[c + ch].write(sums[ch].0 as f32);
        }
        // SAFETY: every plane of dx and both gradients of every channel were written.
        unsafe { out.set_len(x.len() + 2 * c) };
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

/// Max pooling with a square window and implicit `-inf` padding; its backward sends each
/// output's gradient to the first maximal input of its window (candle's own max pooling has
/// no padding and no backward for overlapping windows).
pub struct MaxPool {
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl MaxPool {
    fn geom(&self, l: &Layout) -> candle_core::Result<Geom> {
        let (n, c, h, w) = l.shape().dims4()?;
        let out = |x: usize| {
            (x + 2 * self.pad)
                .checked_sub(self.kernel)
                .map(|v| v / self.stride + 1)
        };
        match (out(h), out(w)) {
            (Some(oh), Some(ow)) => Ok(Geom {
                n,
                c,
                h,
                w,
                kh: self.kernel,
                kw: self.kernel,
                oh,
                ow,
                stride: self.stride,
                pad: self.pad,
                dil: 1,
            }),
            _ => candle_core::bail!("max pool window {} does not fit {h}x{w}", self.kernel),
        }
    }

    /// The maxima of every window of one plane into `out` (filled with -inf): per output
    /// row, each window row and column offset is one sweep over the output row, which the
    /// compiler vectorizes where the stride is 1. The same values as [`MaxPool::argmax`]
    /// picks (a NaN is passed over where `argmax` would keep the first one).
    fn plane_max(g: &Geom, plane: &[f32], out: &mut [f32]) {
        for kh in 0..g.kh {
            for oh in g.valid(kh, g.oh, g.h) {
                let line = &plane[g.src(oh, kh) * g.w..][..g.w];
                let row = &mut out[oh * g.ow..][..g.ow];
                for kw in 0..g.kw {
                    let cols = g.valid(kw, g.ow, g.w);
                    if cols.is_empty() {
                        continue;
                    }
                    let start = g.src(cols.start, kw);
                    if g.stride == 1 {
                        let src = &line[start..start + cols.len()];
                        for (o, &v) in row[cols].iter_mut().zip(src) {
                            *o = o.max(v);
                        }
                    } else {
                        for (i, o) in row[cols].iter_mut().enumerate() {
                            *o = o.max(line[start + i * g.stride]);
                        }
                    }
                }
            }
        }
    }

    /// 2x2 windows at stride 2 without padding (LeNet's and VGG's pooling) over whole planes
    /// (`w` columns and `ip` values in, `ow` columns and `op` values out): each output row
    /// from its pair of input rows in one pass, which the compiler vectorizes (with AVX-512
    /// when `wide`). The values of [`MaxPool::plane_max`], taken in the same order.
    fn halvings(
        planes: &[f32],
        (w, ip): (usize, usize),
        outs: &mut [f32],
        (ow, op): (usize, usize),
        wide: bool,
    ) {
        #[inline(always)]
        fn halve(planes: &[f32], w: usize, ip: usize, outs: &mut [f32], ow: usize, op: usize) {
            for (plane, out) in planes.chunks_exact(ip).zip(outs.chunks_exact_mut(op)) {
                for (oh, row) in out.chunks_exact_mut(ow).enumerate() {
                    let top = &plane[2 * oh * w..][..2 * ow];
                    let bottom = &plane[(2 * oh + 1) * w..][..2 * ow];
                    let pairs = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                    for (o, (t, b)) in row.iter_mut().zip(pairs) {
                        *o = f32::NEG_INFINITY.max(t[0]).max(t[1]).max(b[0]).max(b[1]);
                    }
                }
            }
        }
        crate::with_target_feature!(
            "avx512f",
            wide,
            halve(planes: &[f32], w: usize, ip: usize, outs: &mut [f32], ow: usize, op: usize)
        )
    }

    /// The gradient of one plane: each output's gradient `gy` added at the first input of
    /// its window (in window order, rows then columns) that holds the window's maximum `y`,
    /// as [`MaxPool::argmax`] picks it; the windows are swept as in [`MaxPool::plane_max`].
    /// `taken` is scratch of one output row.
    fn plane_grad(
        g: &Geom,
        plane: &[f32],
        y: &[f32],
        gy: &[f32],
        gx: &mut [f32],
        taken: &mut [bool],
    ) {
        for oh in 0..g.oh {
            let (ymax, grow) = (&y[oh * g.ow..][..g.ow], &gy[oh * g.ow..][..g.ow]);
            taken.fill(false);
            // Window order: rows, then columns.
            for kh in (0..g.kh).filter(|&kh| g.valid(kh, g.oh, g.h).contains(&oh)) {
                let base = g.src(oh, kh) * g.w;
                for kw in 0..g.kw {
                    for ow in g.valid(kw, g.ow, g.w) {
                        let i = base + g.src(ow, kw);
                        if !taken[ow] && plane[i] == ymax[ow] {
                            gx[i] += grow[ow];
                            taken[ow] = true;
                        }
                    }
                }
            }
        }
    }

    /// Index (within the plane) of the first maximum of output `(oh, ow)`'s window: the
    /// definition the sweeps are tested against.
    #[cfg(test)]
    fn argmax(g: &Geom, plane: &[f32], oh: usize, ow: usize) -> usize {
        let mut best = usize::MAX;
        let mut best_v = f32::NEG_INFINITY;
        for kh in 0..g.kh {
            let ih = (oh * g.stride + kh) as i64 - g.pad as i64;
            if ih < 0 || ih as usize >= g.h {
                continue;
            }
            for kw in 0..g.kw {
                let iw = (ow * g.stride + kw) as i64 - g.pad as i64;
                if iw < 0 || iw as usize >= g.w {
                    continue;
                }
                let i = ih as usize * g.w + iw as usize;
                if best == usize::MAX || plane[i] > best_v {
                    best = i;
                    best_v = plane[i];
                }
            }
        }
        best
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "slim-maxpool2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geom(l)?;
        let x = f32_slice(s, l, self.name())?;
        let (ip, op) = (g.h * g.w, g.oh * g.ow);
        let mut y = vec![f32::NEG_INFINITY; g.n * g.c * op];
        // Planes per task: enough work to pay for a task.
        let per = (4096 / ip.max(1)).max(1);
        let halving = g.kh == 2 && g.stride == 2 && g.pad == 0;
        let wide = has_avx512f();
        let task = |(task, outs): (usize, &mut [f32])| {
            let planes = &x[task * per * ip..][..outs.len() / op * ip];
            if halving {
                MaxPool::halvings(planes, (g.w, ip), outs, (g.ow, op), wide);
                return;
            }
            for (plane, out) in planes.chunks_exact(ip).zip(outs.chunks_exact_mut(op)) {
                MaxPool::plane_max(&g, plane, out);
            }
        };
        for_each_chunk(&mut y, op * per, x.len() < SERIAL_VALUES, task);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.c, g.oh, g.ow))))
    }
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(
            &grad,
            &MaxPoolGrad(MaxPool {
                kernel: self.kernel,
                stride: self.stride,
                pad: self.pad,
            }),
        )?))
    }
}

struct MaxPoolGrad(MaxPool);

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "slim-maxpool2d-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0.geom(l1)?;
        let x = f32_slice(s1, l1, self.name())?;
        let gy = f32_slice(s2, l2, self.name())?;
        let (ip, op) = (g.h * g.w, g.oh * g.ow);
        let mut gx = vec![0f32; x.len()];
        let per = (4096 / ip.max(1)).max(1);
        gx.par_chunks_mut(ip * per)
            .enumerate()
            .for_each(|(task, gplanes)| {
                let (mut y, mut taken) = (vec![0f32; op], vec![false; g.ow]);
                for (j, gplane) in gplanes.chunks_exact_mut(ip).enumerate() {
                    let idx = task * per + j;
                    let plane = &x[idx * ip..(idx + 1) * ip];
                    y.fill(f32::NEG_INFINITY);
                    MaxPool::plane_max(&g, plane, &mut y);
                    MaxPool::plane_grad(
                        &g,
                        plane,
                        &y,
                        &gy[idx * op..(idx + 1) * op],
                        gplane,
                        &mut taken,
                    );
                }
            });
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}

/// The mean of each plane of `x` (`[N, C, ...]` to `[N, C]`), as candle's
/// `x.flatten_from(2)?.mean(D::Minus1)` computes it (the sum times `1 / plane size`), the sum
/// in 16 lanes at a time: where candle's reduction made a network's global pooling several
/// times its share of the arithmetic. Its gradient spreads each mean's gradient evenly over
/// the plane. Other devices and types go to candle.
pub fn plane_means(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() < 3 {
        return x.flatten_from(2)?.mean(candle_core::D::Minus1);
    }
    x.contiguous()?.apply_op1(PlaneMeans)
}

struct PlaneMeans;

impl PlaneMeans {
    fn mean(plane: &[f32], scale: f32) -> f32 {
        let mut lanes = [0f32; 16];
        let mut chunks = plane.chunks_exact(16);
        for chunk in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(chunk) {
                *l += v;
            }
        }
        for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
            *l += v;
        }
        // Halves folded onto each other (a tree, not a chain of 15 dependent additions).
        for half in [8, 4, 2, 1] {
            for i in 0..half {
                lanes[i] += lanes[i + half];
            }
        }
        lanes[0] * scale
    }
}

#[cfg(target_arch = "x86_64")]
mod plane_means_avx512 {
    use std::arch::x86_64::*;

    /// [`super::PlaneMeans::mean`] of each plane of `size` values in `planes` into `outs`,
    /// 16 values per addition (the last ones masked), the lanes summed by halves.
    ///
    /// # Safety
    /// The machine has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn means(planes: &[f32], size: usize, scale: f32, outs: &mut [f32]) {
        let tail = ((1u32 << (size % 16)) - 1) as u16;
        for (o, plane) in outs.iter_mut().zip(planes.chunks_exact(size)) {
            let mut acc = _mm512_setzero_ps();
            let mut chunks = plane.chunks_exact(16);
            for c in &mut chunks {
                // SAFETY: 16 values of the plane.
                acc = _mm512_add_ps(acc, unsafe { _mm512_loadu_ps(c.as_ptr()) });
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                // SAFETY: the mask selects the plane's last `size % 16` values.
                acc = _mm512_add_ps(acc, unsafe { _mm512_maskz_loadu_ps(tail, rest.as_ptr()) });
            }
            *o = _mm512_reduce_add_ps(acc) * scale;
        }
    }
}

impl CustomOp1 for PlaneMeans {
    fn name(&self) -> &'static str {
        "slim-plane-means"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let dims = l.dims();
        let (n, c) = (dims[0], dims[1]);
        let size: usize = dims[2..].iter().product();
        // As candle divides: a multiplication by the reciprocal, rounded to f32.
        let scale = (1.0 / size as f64) as f32;
        let mut out = vec![0f32; n * c];
        // Planes per task: about 16k values.
        if let Some(per) = (1usize << 14).checked_div(size).map(|p| p + 1) {
            let wide = has_avx512f();
            let means = |(outs, planes): (&mut [f32], &[f32])| {
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: the machine has AVX-512 F.
                    return unsafe { plane_means_avx512::means(planes, size, scale, outs) };
                }
                let _ = wide;
                for (o, plane) in outs.iter_mut().zip(planes.chunks_exact(size)) {
                    *o = PlaneMeans::mean(plane, scale);
                }
            };
            if x.len() >= 1 << 18 {
                out.par_chunks_mut(per)
                    .zip(x.par_chunks(per * size))
                    .for_each(means);
            } else {
                out.chunks_mut(per)
                    .zip(x.chunks(per * size))
                    .for_each(means);
            }
        } else {
            // Empty planes: the mean of nothing, as candle's 0 / 0.
            out.fill(f32::NAN);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims = arg.dims();
        let size: usize = dims[2..].iter().product();
        let g = (grad / size as f64)?;
        let mut spread = g.dims().to_vec();
        spread.extend(std::iter::repeat_n(1, dims.len() - 2));
        Ok(Some(g.reshape(spread)?.broadcast_as(dims)?.contiguous()?))
    }
}

/// True when the fused batch-norm kernel applies (f32 on the CPU).
pub fn fused_batch_norm(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The geometry of `x ⋆ w` when one of this module's kernels applies (f32 on the CPU, a
/// dense or depthwise convolution), with the number of output channels.
fn geometry(
    x: &Tensor,
    w: &Tensor,
    spec: &Conv2dSpec,
) -> candle_core::Result<Option<(Geom, usize)>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 || x.rank() != 4 {
        return Ok(None);
    }
    if spec.groups != 1 && !spec.is_depthwise() {
        return Ok(None);
    }
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    let Some((oh, ow)) = spec.out_size(h, wd) else {
        return Ok(None);
    };
    let g = Geom {
        n,
        c,
        h,
        w: wd,
        kh,
        kw,
        oh,
        ow,
        stride: spec.stride,
        pad: spec.padding,
        dil: spec.dilation,
    };
    Ok(Some((g, o)))
}

/// A 2-D convolution with the fastest kernel that applies; see the module docs.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    spec: &Conv2dSpec,
) -> candle_core::Result<Tensor> {
    let add_bias = |y: Tensor| -> candle_core::Result<Tensor> {
        match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
            None => Ok(y),
        }
    };
    let Some((g, o)) = geometry(x, w, spec)? else {
        return add_bias(x.conv2d(w, spec.padding, spec.stride, spec.dilation, spec.groups)?);
    };
    if spec.is_depthwise() {
        return add_bias(x.contiguous()?.apply_op2(&w.contiguous()?, Depthwise(g))?);
    }
    let b = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(o, DType::F32, x.device())?,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b, DenseConv { g, o })
}

/// The input and weight gradients of [`conv2d`] `(x, w)` (its bias's gradient is the sum of
/// `grad` per channel) for the output gradient `grad`, by the kernels its backward runs but
/// outside candle's autograd: what a training step spends in the convolution's own backward,
/// for benches and profiles. An error where [`conv2d`] runs candle's convolution instead.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    spec: &Conv2dSpec,
) -> candle_core::Result<(Tensor, Tensor)> {
    let Some((g, o)) = geometry(x, w, spec)? else {
        candle_core::bail!(
            "conv2d_backward: no Slim kernel for {spec:?} on {:?}",
            x.shape()
        );
    };
    if grad.dims() != [g.n, o, g.oh, g.ow] {
        candle_core::bail!(
            "conv2d_backward: output gradient {:?}, expected {:?}",
            grad.shape(),
            (g.n, o, g.oh, g.ow)
        );
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    if spec.is_depthwise() {
        return depthwise_grads(&x, &w, grad, g);
    }
    let (gx, gw, _) = dense_grads(&x, &w, grad, g, o)?;
    Ok((gx, gw))
}

/// A convolution for inference, `act(conv(x, w) + b)` with `b` of `[O]`, the bias and the
/// activation applied as each output is written (batch norm in evaluation is folded into `w`
/// and `b` by the caller). It records no gradient. Where no kernel here applies, candle's
/// convolution and a clamp compute the same.
pub fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    spec: &Conv2dSpec,
    act: Epilogue,
) -> candle_core::Result<Tensor> {
    if let Some((g, o)) = geometry(x, w, spec)? {
        let op = FusedConv {
            g,
            o,
            depthwise: spec.is_depthwise(),
            act,
        };
        return x
            .contiguous()?
            .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op);
    }
    let mut y = conv2d(x, w, Some(b), spec)?;
    if act.lo > f32::NEG_INFINITY {
        y = y.maximum(act.lo)?;
    }
    if act.hi < f32::INFINITY {
        y = y.minimum(act.hi)?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Forward and both gradients against candle's own convolution. (candle 0.11's own
    /// convolution backward fails on non-square inputs, so gradients are compared on square
    /// ones and non-square inputs are checked forward only.)
    fn check(n: usize, c: usize, o: usize, hw: usize, k: usize, spec: Conv2dSpec) {
        let dev = Device::Cpu;
        let xr = Tensor::randn(0f32, 1.0, (n, c, hw, hw + 3), &dev).unwrap();
        let wr = Tensor::randn(0f32, 1.0, (o, c / spec.groups, k, k), &dev).unwrap();
        let br = Tensor::randn(0f32, 1.0, o, &dev).unwrap();
        let ours = conv2d(&xr, &wr, Some(&br), &spec).unwrap();
        let theirs = xr
            .conv2d(&wr, spec.padding, spec.stride, spec.dilation, spec.groups)
            .unwrap()
            .broadcast_add(&br.reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "{spec:?}");
        assert!(
            max_diff(&ours, &theirs) < 1e-3 * (c * k * k) as f32,
            "forward {spec:?}"
        );

        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev).unwrap()).unwrap();
        let w =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (o, c / spec.groups, k, k), &dev).unwrap())
                .unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, &dev).unwrap()).unwrap();
        let ours = conv2d(&x, &w, Some(&b), &spec).unwrap();
        let theirs = x
            .conv2d(&w, spec.padding, spec.stride, spec.dilation, spec.groups)
            .unwrap()
            .broadcast_add(&b.reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "{spec:?}");
        let tol = 1e-3 * (c * k * k) as f32;
        assert!(max_diff(&ours, &theirs) < tol, "forward {spec:?}");
        let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let g1 = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            let (a, b) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(a, b) < tol * 4.0,
                "gradient {spec:?}: {}",
                max_diff(a, b)
            );
        }
    }

    #[test]
    fn depthwise_matches_candle() {
        for (k, stride, pad, dil) in [
            (3, 1, 1, 1),
            (3, 2, 1, 1),
            (5, 1, 2, 1),
            (3, 2, 0, 1),
            (3, 1, 2, 2),
            (1, 1, 0, 1),
            (5, 3, 1, 1),
            (3, 2, 3, 2),
            (4, 2, 1, 1),
        ] {
            let spec = Conv2dSpec::new(6, 6, k)
                .with_stride(stride)
                .with_padding(pad)
                .with_dilation(dil)
                .with_groups(6);
            check(3, 6, 6, 9, k, spec.clone());
            check(2, 6, 6, 8, k, spec);
        }
    }

    #[test]
    fn phases_place_every_value_and_give_it_back() {
        for (h, w) in [(5, 7), (6, 8), (1, 1), (4, 3), (2, 2)] {
            for stride in 1..=3 {
                for pad in 0..=3 {
                    let l = Phases::new(h, w, 1, 1, stride, pad, 1);
                    let src: Vec<f32> = (0..h * w).map(|i| i as f32 + 1.0).collect();
                    let mut phases = vec![0f32; l.len()];
                    l.fill(&src, &mut phases);
                    // Padded (py, px) lies in phase (py % s, px % s), row py / s, column px / s.
                    let mut expect = vec![0f32; l.len()];
                    for y in 0..h {
                        for x in 0..w {
                            let (py, px) = (y + pad, x + pad);
                            let phase = (py % stride) * stride + px % stride;
                            expect[phase * l.ph * l.pw + (py / stride) * l.pw + px / stride] =
                                src[y * w + x];
                        }
                    }
                    assert_eq!(phases, expect, "{h}x{w} stride {stride} pad {pad}");
                    let mut back = vec![0f32; h * w];
                    l.take(&phases, &mut back);
                    assert_eq!(back, src, "{h}x{w} stride {stride} pad {pad}");
                }
            }
        }
    }

    #[test]
    fn fused_batch_norm_matches_composed_ops() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2.0, (4, 3, 5, 6), &dev).unwrap()).unwrap();
        let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, 3, &dev).unwrap()).unwrap();
        let beta = Var::from_tensor(&Tensor::randn(0f32, 0.3, 3, &dev).unwrap()).unwrap();
        let op = BatchNormTrain::for_batch(&x, 1e-5).unwrap();
        let (op_mean, op_var) = op.mean_var();
        let ours = x
            .apply_op3(gamma.as_tensor(), beta.as_tensor(), op)
            .unwrap();
        // Reference: the same normalization written with candle's differentiable ops.
        let mean = x
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc
            .sqr()
            .unwrap()
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let theirs = xc
            .broadcast_div(&(&var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&gamma.reshape((1, 3, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape((1, 3, 1, 1)).unwrap())
            .unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-4);
        let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let g1 = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &gamma, &beta] {
            let d = max_diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "{d}");
        }
        let m = mean.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let v = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for ch in 0..3 {
            assert!((op_mean[ch] - m[ch]).abs() < 1e-5, "mean {ch}");
            assert!((op_var[ch] - v[ch]).abs() < 1e-4 * v[ch], "variance {ch}");
        }
    }

    #[test]
    fn max_pool_sweeps_agree_with_the_window_search() {
        // Every window size, stride and padding the geometry allows on odd and even planes:
        // the forward's and the backward's row sweeps against `argmax`, window by window. The
        // values take 8 levels, so that windows hold ties (the first maximum takes the
        // gradient).
        let mut seed = 7u32;
        for (h, w) in [(7, 9), (8, 8), (5, 3)] {
            let plane: Vec<f32> = (0..h * w)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 29) as f32 - 4.0
                })
                .collect();
            for kernel in 1..=3 {
                for stride in 1..=3 {
                    for pad in 0..kernel {
                        let op = MaxPool {
                            kernel,
                            stride,
                            pad,
                        };
                        let l = Layout::contiguous((1, 1, h, w));
                        let g = op.geom(&l).unwrap();
                        let mut out = vec![f32::NEG_INFINITY; g.oh * g.ow];
                        MaxPool::plane_max(&g, &plane, &mut out);
                        if (kernel, stride, pad) == (2, 2, 0) {
                            // The one-pass halvings, portable and vectorized, with a second
                            // plane after the first.
                            let planes = [&plane[..], &plane[..]].concat();
                            for wide in [false, has_avx512f()] {
                                let mut two = vec![f32::NAN; 2 * out.len()];
                                let (ip, op) = (h * w, out.len());
                                MaxPool::halvings(&planes, (w, ip), &mut two, (g.ow, op), wide);
                                assert_eq!(two, [&out[..], &out[..]].concat(), "{h}x{w} halvings");
                            }
                        }
                        let gy: Vec<f32> = (0..out.len()).map(|i| 1.0 + i as f32).collect();
                        let mut gx = vec![0f32; h * w];
                        let mut taken = vec![false; g.ow];
                        MaxPool::plane_grad(&g, &plane, &out, &gy, &mut gx, &mut taken);
                        let mut want = vec![0f32; h * w];
                        for oh in 0..g.oh {
                            for ow in 0..g.ow {
                                let i = MaxPool::argmax(&g, &plane, oh, ow);
                                assert_eq!(
                                    out[oh * g.ow + ow],
                                    plane[i],
                                    "{h}x{w} k{kernel} s{stride} p{pad} at ({oh}, {ow})"
                                );
                                want[i] += gy[oh * g.ow + ow];
                            }
                        }
                        assert_eq!(gx, want, "{h}x{w} k{kernel} s{stride} p{pad} gradient");
                    }
                }
            }
        }
    }

    #[test]
    fn max_pool_matches_candle_and_pads_with_minus_infinity() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap()).unwrap();
        let ours = x
            .apply_op1(MaxPool {
                kernel: 2,
                stride: 2,
                pad: 0,
            })
            .unwrap();
        let theirs = x.max_pool2d_with_stride(2, 2).unwrap();
        assert!(max_diff(&ours, &theirs) == 0.0);
        // Gradient: each window's output gradient lands on its maximum. (candle 0.11's own
        // max-pool backward scales it by 1/4, so the reference is written out here.)
        let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let g1 = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = g1
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ys = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ps = probe.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (&xv, &gv)) in xs.iter().zip(&gx).enumerate() {
            let (plane, r, c) = (i / 64, (i % 64) / 8, i % 8);
            let o = plane * 16 + (r / 2) * 4 + c / 2;
            let want = if xv == ys[o] { ps[o] } else { 0.0 };
            assert_eq!(gv, want, "input {i}");
        }
        // 3x3 stride 2 padding 1 on all-negative input: padding never wins, and each input
        // gets the gradient of every window it is the maximum of.
        let neg = Tensor::new(
            &[[[[-1f32, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]]]],
            &dev,
        )
        .unwrap();
        let v = Var::from_tensor(&neg).unwrap();
        let y = v
            .apply_op1(MaxPool {
                kernel: 3,
                stride: 2,
                pad: 1,
            })
            .unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![-1.0, -2.0, -4.0, -5.0]
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g
            .get(&v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(gx, vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }

    /// A seeded source of values uniform in [-1, 1).
    pub(super) fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut rng = seed;
        move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// The pointwise tiles against a plain sum in f64: full and partial tiles of rows,
    /// blocks of positions within a sample, across samples and at the end, one and several
    /// blocks of input channels, each clamp, the vector and the portable tiles, on one
    /// thread and on every core, and a NaN that passes through the clamp.
    #[test]
    fn pointwise_product_matches_a_plain_sum() {
        let mut next = uniform(7);
        let cases = [
            (1, 6, 4, 16),
            (2, 13, 300, 53),
            (1, 1, 1, 17),
            (2, 32, 16, 784),
            (3, 7, 513, 40),
            (5, 9, 20, 49),
            (19, 8, 12, 1),
        ];
        for (n, o, k, p) in cases {
            for act in [Epilogue::NONE, Epilogue::RELU, Epilogue::RELU6] {
                for (parallel, fast) in [
                    (false, false),
                    (true, false),
                    (false, has_avx2_fma()),
                    (true, has_avx2_fma()),
                ] {
                    let w: Vec<f32> = (0..o * k).map(|_| next() * 4.0).collect();
                    let mut x: Vec<f32> = (0..n * k * p).map(|_| next() * 4.0).collect();
                    let b: Vec<f32> = (0..o).map(|_| next()).collect();
                    // Sample 0's last position.
                    x[p - 1] = f32::NAN;
                    let mut out = vec![0f32; n * o * p];
                    // SAFETY: `out` holds n * o * p values and nothing else uses it
                    // meanwhile; `fast` only where the machine has AVX2 and FMA.
                    unsafe {
                        pointwise::product(
                            Disjoint(out.as_mut_ptr()),
                            (&w, k, 1),
                            &x,
                            Some(&b),
                            (n, o, k, p),
                            act,
                            parallel,
                            fast,
                        )
                    };
                    for (s, r, c) in (0..n * o * p).map(|i| (i / (o * p), (i / p) % o, i % p)) {
                        let sum: f64 = (0..k)
                            .map(|i| f64::from(w[r * k + i]) * f64::from(x[(s * k + i) * p + c]))
                            .sum::<f64>()
                            + f64::from(b[r]);
                        let want = act.apply(sum as f32);
                        let got = out[(s * o + r) * p + c];
                        let at = format!("({s}, {r}, {c}) of {n}x{o}x{k}x{p} {act:?} fast {fast}");
                        if s == 0 && c == p - 1 {
                            assert!(got.is_nan(), "NaN lost at {at}");
                        } else {
                            let tol = 1e-4 * (k as f32).sqrt() * 4.0;
                            assert!((got - want).abs() <= tol, "{at}: {got} != {want}");
                        }
                    }
                    // The same weights stored transposed and read through their strides,
                    // with no bias: `act` must then be NONE.
                    let wt: Vec<f32> = (0..k * o).map(|i| w[(i % o) * k + i / o]).collect();
                    let mut plain = vec![0f32; n * o * p];
                    // SAFETY: as above.
                    unsafe {
                        pointwise::product(
                            Disjoint(plain.as_mut_ptr()),
                            (&wt, 1, o),
                            &x,
                            None,
                            (n, o, k, p),
                            Epilogue::NONE,
                            parallel,
                            fast,
                        )
                    };
                    for (i, (&got, &with_b)) in plain.iter().zip(&out).enumerate() {
                        if act == Epilogue::NONE && !got.is_nan() {
                            let want = with_b - b[(i / p) % o];
                            let tol = 1e-4 * (k as f32).sqrt() * 4.0 + 1e-6 * want.abs();
                            assert!(
                                (got - want).abs() <= tol,
                                "transposed [{i}]: {got} != {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The weight gradient's tiles against a plain sum in f64, over several samples: more
    /// input rows than output channels and fewer (either operand transposed), partial tiles,
    /// sums over more positions than one block, the vector and portable tiles, one thread and
    /// every core.
    #[test]
    fn weight_gradient_matches_a_plain_sum() {
        let mut next = uniform(11);
        for (n, o, k, p) in [
            (3, 6, 16, 16),
            (2, 13, 5, 300),
            (1, 1, 1, 1),
            (2, 40, 70, 49),
            (4, 9, 288, 17),
            (1, 20, 3, 600),
        ] {
            for (parallel, fast) in [
                (false, false),
                (true, false),
                (false, has_avx2_fma()),
                (true, has_avx2_fma()),
            ] {
                let g: Vec<f32> = (0..n * o * p).map(|_| next()).collect();
                let x: Vec<f32> = (0..n * k * p).map(|_| next() * 2.0).collect();
                let mut grad = pointwise::WeightGrad::new(o, k, p);
                for s in 0..n {
                    grad.add(
                        &g[s * o * p..][..o * p],
                        &x[s * k * p..][..k * p],
                        parallel,
                        fast,
                    );
                }
                let dw = grad.finish();
                assert_eq!(dw.len(), o * k);
                for (i, &got) in dw.iter().enumerate() {
                    let (r, c) = (i / k, i % k);
                    let want: f64 = (0..n * p)
                        .map(|j| {
                            let (s, q) = (j / p, j % p);
                            f64::from(g[(s * o + r) * p + q]) * f64::from(x[(s * k + c) * p + q])
                        })
                        .sum();
                    let tol = 1e-5 * ((n * p) as f64).sqrt() * 4.0;
                    assert!(
                        (f64::from(got) - want).abs() <= tol,
                        "({r}, {c}) of {n}x{o}x{k}x{p} fast {fast}: {got} != {want}"
                    );
                }
            }
        }
    }

    /// The depthwise sweep in registers and the portable one agree (full blocks, single
    /// vectors and the scalar tail; a bias and a clamp), and both match a plain sum.
    #[test]
    fn depthwise_sweeps_agree() {
        let mut next = uniform(3);
        let taps = [0usize, 1, 2, 9, 10, 11, 18, 19, 20];
        for span in [1, 7, 8, 31, 32, 45, 100] {
            let phases: Vec<f32> = (0..span + 20).map(|_| next()).collect();
            let filt: Vec<f32> = (0..9).map(|_| next()).collect();
            for act in [Epilogue::NONE, Epilogue::RELU6] {
                let (mut plain, mut fast) = (vec![0f32; span], vec![0f32; span]);
                sweep_taps_f32(&mut plain, &phases, &taps, &filt, (0.25, act), false);
                let fma = has_avx2_fma();
                sweep_taps_f32(&mut fast, &phases, &taps, &filt, (0.25, act), fma);
                for i in 0..span {
                    let want: f32 = 0.25
                        + taps
                            .iter()
                            .zip(&filt)
                            .map(|(&t, &w)| w * phases[t + i])
                            .sum::<f32>();
                    let want = act.apply(want);
                    assert!((plain[i] - want).abs() < 1e-5, "plain [{i}] of {span}");
                    assert!((fast[i] - want).abs() < 1e-5, "fast [{i}] of {span}");
                }
            }
        }
    }

    /// A depthwise layer computed row by row from the unpadded planes (AVX-512), and over
    /// the flattened planes where it has them, gives the same bits as the phase sweeps (AVX2
    /// and FMA), on strides 1 and 2, dilations 1 and 2, kernels 1x1 to 7x7, odd and wide
    /// planes, blocks of 16 with and without a tail, and with a clamp; a stride of 3 has no
    /// row layout.
    /// The geometry of a `k`x`k` convolution of `n` samples of `c` planes `h`x`w` at the
    /// given stride, padding and dilation.
    fn square_geom(
        n: usize,
        c: usize,
        (h, w): (usize, usize),
        k: usize,
        (stride, pad, dil): (usize, usize, usize),
    ) -> Geom {
        let out = |size: usize| (size + 2 * pad - dil * (k - 1) - 1) / stride + 1;
        Geom {
            n,
            c,
            h,
            w,
            kh: k,
            kw: k,
            oh: out(h),
            ow: out(w),
            stride,
            pad,
            dil,
        }
    }

    #[test]
    fn depthwise_rows_give_the_sweeps_bits() {
        if !(has_avx512f() && has_avx2_fma()) {
            crate::note_skipped("this machine (or SLIM_CPU) lacks AVX-512 F, or AVX2 and FMA");
            return;
        }
        let mut next = uniform(5);
        // (h, w, kernel, stride, padding, dilation)
        for (h, w, k, stride, pad, dil) in [
            (28, 28, 3, 1, 1, 1),
            (28, 28, 3, 2, 1, 1),
            (14, 14, 3, 2, 1, 1),
            (7, 7, 3, 1, 1, 1),
            (32, 32, 3, 2, 1, 1),
            (33, 35, 3, 2, 1, 1),
            (5, 40, 5, 1, 2, 1),
            (9, 9, 3, 1, 2, 2),
            (12, 19, 7, 2, 3, 1),
            (3, 3, 1, 1, 0, 1),
            (6, 17, 2, 2, 0, 1),
            (1, 1, 3, 1, 1, 1),
            (7, 7, 3, 2, 1, 1),
            (4, 4, 3, 2, 1, 1),
            (17, 9, 3, 1, 1, 1),
            (30, 30, 5, 2, 2, 1),
            (8, 8, 3, 2, 0, 1),
            (9, 9, 3, 2, 0, 1),
        ] {
            let (n, c) = (2, 3);
            let g = square_geom(n, c, (h, w), k, (stride, pad, dil));
            let (oh, ow) = (g.oh, g.ow);
            let x: Vec<f32> = (0..n * c * h * w).map(|_| next()).collect();
            let wt: Vec<f32> = (0..c * k * k).map(|_| next()).collect();
            let bias: Vec<f32> = (0..c).map(|_| next()).collect();
            let rows = DepthwiseRows::new(&g).expect("strides 1 and 2 have rows");
            // The flat planes serve stride 1 with the output the input's size, and stride 2
            // but for 3x3 unpadded: there the last output column reads the even column
            // `ow`, past the phase's rows of `ow` values.
            let flat = if stride == 1 {
                (oh, ow) == (h, w)
            } else {
                (k, pad) != (3, 0)
            };
            assert_eq!(rows.flat.is_some(), flat, "{h}x{w} k{k} s{stride} p{pad}");
            let row_by_row = DepthwiseRows {
                g,
                masks: rows.masks.clone(),
                flat: None,
            };
            for act in [Epilogue::NONE, Epilogue::RELU6] {
                for b in [Some(&bias[..]), None] {
                    let swept = depthwise_forward_by(&g, &x, &wt, b, act, None);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    for (way, by) in [("flat", &rows), ("rows", &row_by_row)] {
                        assert_eq!(
                            bits(&depthwise_forward_by(&g, &x, &wt, b, act, Some(by))),
                            bits(&swept),
                            "{way}: {h}x{w} k{k} s{stride} p{pad} d{dil}"
                        );
                    }
                }
            }
        }
        let g3 = Geom {
            n: 1,
            c: 1,
            h: 9,
            w: 9,
            kh: 3,
            kw: 3,
            oh: 3,
            ow: 3,
            stride: 3,
            pad: 0,
            dil: 1,
        };
        assert!(DepthwiseRows::new(&g3).is_none());
    }

    /// Global average pooling gives candle's means (to rounding: the sums run in another
    /// order) and candle's gradient, on planes of 1, 7x7 and 13x5 values and a 3-D input.
    #[test]
    fn plane_means_match_candle() {
        let dev = Device::Cpu;
        for dims in [
            vec![3, 4, 1, 1],
            vec![5, 6, 7, 7],
            vec![2, 3, 13, 5],
            vec![4, 2, 9],
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, dims.as_slice(), &dev).unwrap())
                .unwrap();
            let ours = plane_means(x.as_tensor()).unwrap();
            let theirs = x
                .as_tensor()
                .flatten_from(2)
                .unwrap()
                .mean(candle_core::D::Minus1)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "{dims:?}");
            assert!(max_diff(&ours, &theirs) < 1e-6, "{dims:?}");
            // The portable sums (what a machine without AVX-512 runs) agree as well.
            let size: usize = dims[2..].iter().product();
            let planes = x
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let theirs_flat = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (plane, &t) in planes.chunks_exact(size).zip(&theirs_flat) {
                let m = PlaneMeans::mean(plane, (1.0 / size as f64) as f32);
                assert!((m - t).abs() < 1e-6, "portable {dims:?}: {m} vs {t}");
            }
            let weights = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (theirs * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (g1, g2) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
            assert_eq!(g1.dims(), x.dims());
            assert!(max_diff(g1, g2) < 1e-6, "gradient {dims:?}");
        }
    }

    /// A dense convolution straight over the flattened planes gives the bits of the unfolded
    /// columns' product, and runs where it should: stride 1, the output the input's size, at
    /// most four input channels.
    #[test]
    fn flat_dense_gives_the_columns_bits() {
        if !has_avx512f() {
            crate::note_skipped("this machine (or SLIM_CPU) lacks AVX-512 F");
            return;
        }
        let mut next = uniform(9);
        // (channels, h, w, kernel, padding, dilation, outputs, stride)
        for (c, h, w, k, pad, dil, o, stride) in [
            (1, 28, 28, 3, 1, 1, 16, 1),
            (1, 28, 28, 5, 2, 1, 6, 1),
            (3, 32, 32, 3, 1, 1, 16, 1),
            (3, 7, 7, 3, 1, 1, 20, 1),
            (2, 5, 9, 3, 1, 1, 3, 1),
            (4, 1, 1, 3, 1, 1, 9, 1),
            (1, 9, 9, 3, 2, 2, 8, 1),
            (2, 3, 17, 1, 0, 1, 5, 1),
            (5, 6, 6, 3, 1, 1, 4, 1),
            (1, 10, 10, 3, 0, 1, 4, 1),
            (1, 10, 10, 3, 1, 1, 4, 2),
        ] {
            let n = 3;
            let g = square_geom(n, c, (h, w), k, (stride, pad, dil));
            let (oh, ow) = (g.oh, g.ow);
            let what = format!("c{c} {h}x{w} k{k} p{pad} d{dil} o{o} s{stride}");
            let direct = c <= 4 && stride == 1 && (oh, ow) == (h, w) && k > 1;
            assert_eq!(flat_dense_taps(&g).is_some(), direct, "{what}");
            let x: Vec<f32> = (0..n * c * h * w).map(|_| next()).collect();
            let wt: Vec<f32> = (0..o * c * k * k).map(|_| next()).collect();
            let bias: Vec<f32> = (0..o).map(|_| next()).collect();
            for act in [Epilogue::NONE, Epilogue::RELU6] {
                let flat = dense_forward_by(&g, o, &x, &wt, &bias, act, true);
                let cols = dense_forward_by(&g, o, &x, &wt, &bias, act, false);
                assert_eq!(flat.len(), cols.len(), "{what}");
                if let Some(i) = (0..flat.len()).find(|&i| flat[i].to_bits() != cols[i].to_bits()) {
                    panic!(
                        "{what}: output {i} is {}, the columns give {}",
                        flat[i], cols[i]
                    );
                }
            }
        }
    }

    #[test]
    fn tap_dots_agree_with_a_plain_sum() {
        let mut next = uniform(11);
        // 1 tap, one group of 9, groups of 5 and 4 (9 + 1), 7 + 7 (14), 9 x 3 (25 taps).
        for ntaps in [1usize, 9, 10, 14, 25] {
            let taps: Vec<usize> = (0..ntaps).map(|t| (t * 7) % 23).collect();
            for span in [1, 7, 8, 13, 64, 222] {
                let phases: Vec<f32> = (0..span + 23).map(|_| next()).collect();
                let samples: Vec<Vec<f32>> = (0..3)
                    .map(|_| (0..span).map(|_| next()).collect())
                    .collect();
                for fast in [false, has_avx2_fma()] {
                    let mut lanes = vec![0f32; ntaps * DOT_LANES];
                    for wide in &samples {
                        tap_dots_f32(&mut lanes, &phases, &taps, wide, fast);
                    }
                    for (t, &at) in taps.iter().enumerate() {
                        let want: f64 = samples
                            .iter()
                            .map(|wide| {
                                (0..span)
                                    .map(|i| f64::from(phases[at + i] * wide[i]))
                                    .sum::<f64>()
                            })
                            .sum();
                        let got: f32 = lanes[t * DOT_LANES..][..DOT_LANES].iter().sum();
                        assert!(
                            (f64::from(got) - want).abs() < 1e-4 * (span as f64).sqrt(),
                            "tap {t} of {ntaps}, span {span}, fast {fast}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn short_copies_copy_every_value() {
        for n in 0..70 {
            let src: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
            let mut dst = vec![-1f32; n];
            copy_short(&mut dst, &src);
            assert_eq!(dst, src, "{n} f32");
            let src: Vec<i8> = (0..n).map(|i| i as i8 - 30).collect();
            let mut dst = vec![99i8; n];
            copy_short(&mut dst, &src);
            assert_eq!(dst, src, "{n} i8");
        }
    }

    #[test]
    fn row_gathers_take_what_the_definition_takes() {
        // Lengths around the 16-value blocks, strides 1 to 3, with room around each row
        // (`ow` past `len`, `step` past the span) that must be left as it was.
        let src: Vec<f32> = (0..4000).map(|i| i as f32).collect();
        for stride in 1..=3 {
            for len in [1, 5, 15, 16, 17, 31, 32, 33, 40] {
                for rows in [1, 3] {
                    let (ow, step) = (len + 3, stride * len + 7);
                    let mut want = vec![-1f32; rows * ow];
                    for r in 0..rows {
                        for i in 0..len {
                            want[r * ow + i] = src[r * step + i * stride];
                        }
                    }
                    // The source ends at its last value read.
                    let end = (rows - 1) * step + (len - 1) * stride + 1;
                    for wide in [false, has_avx512f()] {
                        let mut dst = vec![-1f32; rows * ow];
                        gather_rows(&src[..end], (step, stride), &mut dst, ow, (rows, len), wide);
                        assert_eq!(dst, want, "stride {stride}, {rows} rows of {len}, {wide}");
                    }
                }
            }
        }
    }

    #[test]
    fn dense_matches_candle() {
        for (k, stride, pad, dil) in [
            (3, 1, 1, 1),
            (3, 2, 1, 1),
            (5, 1, 2, 1),
            (1, 1, 0, 1),
            (1, 2, 0, 1),
            (7, 2, 3, 1),
            (3, 1, 2, 2),
            (2, 2, 0, 1),
        ] {
            let spec = Conv2dSpec::new(5, 7, k)
                .with_stride(stride)
                .with_padding(pad)
                .with_dilation(dil);
            check(2, 5, 7, 11, k, spec);
        }
        // One sample (the products over every core), and more samples than tasks.
        for n in [1, 9] {
            check(n, 5, 7, 6, 3, Conv2dSpec::new(5, 7, 3).with_padding(1));
        }
        // The pointwise path, one sample at a time and in parallel over samples.
        for n in [1, 3, 8] {
            check(n, 6, 4, 5, 1, Conv2dSpec::new(6, 4, 1));
        }
    }
}
