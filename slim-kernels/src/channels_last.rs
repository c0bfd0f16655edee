//! Evaluation kernels over channels-last values (`[N, H, W, C]`: each position's channels
//! side by side), for the chains of depthwise and pointwise convolutions of the mobile
//! networks.
//!
//! Over `[N, C, H, W]` planes a depthwise convolution's every tap is a load of 16 positions
//! at an offset that seldom lies on a vector's boundary, and the load slots, not the
//! arithmetic, set its pace; over channels-last values a tap of 16 channels is one load of
//! 16 neighbouring values, multiplied by a vector of 16 weights that stays in a register
//! for the whole layer, and one loaded vector serves the taps of several outputs in a row.
//! A pointwise convolution over channels-last values is one product of every position of the
//! batch (`[N·H·W, C_in]`) by the transposed weights (`[C_in, C_out]`), however small the
//! planes: no block of positions spans two samples, so nothing is copied into panels.
//!
//! The executor ([`crate::exec`]) runs such chains in this layout between one conversion at
//! the chain's entry and one where a value leaves it (global average pooling reads it as it
//! is). With AVX-512 F (checked at run time) the kernels run in 16-lane registers; elsewhere
//! plain loops compute the same sums in the same order (the vector ones with fused
//! multiply-adds). Evaluation only: no gradients.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{f32_slice, has_avx512f, written, Epilogue};
use crate::Conv2dSpec;

/// Positions per task of a pointwise product.
const POSITIONS_PER_TASK: usize = 192;
/// Rows of a pointwise tile (positions), by 32 output channels.
const TILE_ROWS: usize = 12;
/// The largest depthwise kernel side these kernels take.
const MAX_KERNEL: usize = 7;

/// A depthwise or pointwise convolution ready to run over channels-last values, its batch
/// norm folded in and its activation applied as each output is written.
#[derive(Clone, Debug)]
pub struct ChannelsLastConv {
    spec: Conv2dSpec,
    /// Depthwise: the taps, `[k·k, C]` (tap-major); pointwise: `Wᵀ`, `[C_in, C_out]`.
    weights: Vec<f32>,
    bias: Vec<f32>,
    act: Epilogue,
    /// Run the plain loops even where the machine has AVX-512 (to test them).
    portable: bool,
}

impl ChannelsLastConv {
    /// Whether a convolution of `spec` runs in this layout: a depthwise one with a square
    /// kernel of at most 7 and no dilation, or a pointwise one (1x1, stride 1, no padding).
    pub fn applies(spec: &Conv2dSpec) -> bool {
        let [kh, kw] = spec.kernel;
        if spec.is_depthwise() {
            kh == kw && kh <= MAX_KERNEL && (spec.dilation == 1 || kh == 1) && spec.stride >= 1
        } else {
            spec.groups == 1 && kh == 1 && kw == 1 && spec.stride == 1 && spec.padding == 0
        }
    }

    /// The convolution of `spec` with weights `w` (`[O, I/groups, k, k]`, row-major) and
    /// bias `b` (`[O]`), clamped by `act`; `None` where it does not [apply](Self::applies) or
    /// the weights are not of the spec's size.
    pub fn new(spec: &Conv2dSpec, w: &[f32], b: &[f32], act: Epilogue) -> Option<Self> {
        let (c_in, c_out, k) = (spec.in_channels, spec.out_channels, spec.kernel[0]);
        let per_out = if spec.is_depthwise() { k * k } else { c_in };
        if !Self::applies(spec) || w.len() != c_out * per_out || b.len() != c_out {
            return None;
        }
        // Either way the weights are transposed: `[O, per_out]` to `[per_out, O]`.
        let mut weights = vec![0f32; w.len()];
        transpose_matrix(w, c_out, per_out, &mut weights, super::has_avx2_fma());
        Some(ChannelsLastConv {
            spec: spec.clone(),
            weights,
            bias: b.to_vec(),
            act,
            portable: false,
        })
    }

    /// Whether this is a depthwise convolution (else a pointwise one).
    pub fn is_depthwise(&self) -> bool {
        self.spec.is_depthwise()
    }

    /// The convolution of a channels-last batch `x` (`[N, H, W, C_in]`, f32 on the CPU), as a
    /// channels-last `[N, OH, OW, C_out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for ChannelsLastConv {
    fn name(&self) -> &'static str {
        "slim-conv2d-channels-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (n, h, w, c) = l.shape().dims4()?;
        let (spec, c_out) = (&self.spec, self.spec.out_channels);
        if c != spec.in_channels {
            candle_core::bail!(
                "{}: {c} input channels, the convolution takes {}",
                self.name(),
                spec.in_channels
            );
        }
        let Some((oh, ow)) = spec.out_size(h, w) else {
            candle_core::bail!("{}: the kernel does not fit a {h}x{w} input", self.name());
        };
        let wide = !self.portable && has_avx512f();
        let y = if spec.is_depthwise() {
            let k = spec.kernel[0];
            let g = Dw {
                h,
                w,
                c,
                k,
                stride: spec.stride,
                pad: spec.padding,
                oh,
                ow,
            };
            let serial = n * oh * ow * c * k * k < super::SERIAL_SWEEP;
            // SAFETY: every task writes each value of its output row.
            unsafe {
                written(n * oh * ow * c, (ow * c).max(1), serial, |(r, row)| {
                    self.depthwise_row(&g, x, r, row, wide)
                })
            }
        } else {
            let positions = n * h * w;
            let serial = positions * c * c_out < super::SERIAL_PRODUCT;
            let size = POSITIONS_PER_TASK * c_out;
            // SAFETY: every task writes each value of its block of positions.
            unsafe {
                written(positions * c_out, size.max(1), serial, |(t, out)| {
                    let p0 = t * POSITIONS_PER_TASK;
                    let rows = out.len() / c_out.max(1);
                    self.pointwise_rows(&x[p0 * c..(p0 + rows) * c], rows, out, wide)
                })
            }
        };
        Ok((CpuStorage::F32(y), Shape::from((n, oh, ow, c_out))))
    }
}

/// The geometry of a depthwise convolution over one channels-last sample.
#[derive(Clone, Copy, Debug)]
struct Dw {
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Dw {
    /// The kernel rows `ky` that land inside the input for output row `oy`.
    fn rows(&self, oy: usize) -> std::ops::Range<usize> {
        let top = oy * self.stride;
        self.pad.saturating_sub(top)..self.k.min((self.h + self.pad).saturating_sub(top))
    }

    /// The outputs of a row whose every tap lands inside the input: `lo..hi`.
    fn inner(&self) -> (usize, usize) {
        let lo = self.pad.div_ceil(self.stride);
        let hi = if self.w + self.pad >= self.k {
            ((self.w + self.pad - self.k) / self.stride + 1).min(self.ow)
        } else {
            0
        };
        (lo, hi.max(lo))
    }
}

impl ChannelsLastConv {
    /// Output row `r` (of `N·OH`) of a depthwise convolution into `out` (`OW·C` values).
    fn depthwise_row(&self, g: &Dw, x: &[f32], r: usize, out: &mut [MaybeUninit<f32>], wide: bool) {
        let (s, oy) = (r / g.oh, r % g.oh);
        let sample = &x[s * g.h * g.w * g.c..][..g.h * g.w * g.c];
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: the machine has AVX-512 F; `out` holds the row's OW·C values.
            return unsafe {
                avx512::depthwise_row(
                    g,
                    sample,
                    oy,
                    &self.weights,
                    &self.bias,
                    self.act,
                    out.as_mut_ptr().cast(),
                )
            };
        }
        let _ = wide;
        let out = super::zeroed(out);
        let rows = g.rows(oy);
        for (ox, acc) in out.chunks_exact_mut(g.c).enumerate() {
            acc.copy_from_slice(&self.bias);
            for ky in rows.clone() {
                let iy = oy * g.stride + ky - g.pad;
                for kx in 0..g.k {
                    let Some(ix) = (ox * g.stride + kx).checked_sub(g.pad).filter(|&i| i < g.w)
                    else {
                        continue;
                    };
                    let xs = &sample[(iy * g.w + ix) * g.c..][..g.c];
                    let ws = &self.weights[(ky * g.k + kx) * g.c..][..g.c];
                    for ((a, &xv), &wv) in acc.iter_mut().zip(xs).zip(ws) {
                        *a += xv * wv;
                    }
                }
            }
            for a in acc.iter_mut() {
                *a = self.act.apply(*a);
            }
        }
    }

    /// `rows` positions of a pointwise convolution: `x` `[rows, C_in]` into `out`
    /// `[rows, C_out]`.
    fn pointwise_rows(&self, x: &[f32], rows: usize, out: &mut [MaybeUninit<f32>], wide: bool) {
        let (ci, co) = (self.spec.in_channels, self.spec.out_channels);
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: the machine has AVX-512 F; `x` and `out` hold `rows` positions.
            return unsafe {
                avx512::pointwise_rows(
                    x,
                    rows,
                    ci,
                    &self.weights,
                    co,
                    &self.bias,
                    self.act,
                    out.as_mut_ptr().cast(),
                )
            };
        }
        let _ = wide;
        let out = super::zeroed(out);
        for (xr, acc) in x.chunks_exact(ci.max(1)).zip(out.chunks_exact_mut(co)) {
            for (kk, &xv) in xr.iter().enumerate() {
                for (a, &wv) in acc.iter_mut().zip(&self.weights[kk * co..][..co]) {
                    *a += xv * wv;
                }
            }
            for (a, &b) in acc.iter_mut().zip(&self.bias) {
                *a = self.act.apply(*a + b);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Dw, Epilogue, TILE_ROWS};

    /// The lanes of the 16 channels from `c0` of `c` (fewer at the end).
    #[inline(always)]
    fn lanes(c: usize, c0: usize) -> __mmask16 {
        let left = c - c0;
        if left >= 16 {
            0xFFFF
        } else {
            ((1u32 << left) - 1) as __mmask16
        }
    }

    /// Output row `oy` of a depthwise convolution of one `sample` (`[H, W, C]`) into `out`
    /// (`OW·C` values), 16 channels at a time: the channels' weights in registers, the outputs
    /// whose taps all land inside the input four at a time (each loaded vector serving up to
    /// three of them), the others one by one, skipping the taps outside.
    ///
    /// # Safety
    /// The machine has AVX-512 F; `out` is valid for `OW·C` writes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn depthwise_row(
        g: &Dw,
        sample: &[f32],
        oy: usize,
        taps: &[f32],
        bias: &[f32],
        act: Epilogue,
        out: *mut f32,
    ) {
        let (c, k, s) = (g.c, g.k, g.stride);
        let rows = g.rows(oy);
        let (lo, hi) = g.inner();
        let (vlo, vhi) = (_mm512_set1_ps(act.lo), _mm512_set1_ps(act.hi));
        let x = sample.as_ptr();
        // SAFETY (whole body): every input read is of a position inside the sample (the
        // taps outside are skipped), every weight read inside `taps` (`k·k·C`), every write
        // inside the row; the lanes beyond C are masked off.
        unsafe {
            for c0 in (0..c).step_by(16) {
                let m = lanes(c, c0);
                let b = _mm512_maskz_loadu_ps(m, bias.as_ptr().add(c0));
                let finish = |v: __m512| _mm512_min_ps(vhi, _mm512_max_ps(vlo, v));
                let tap = |t: usize| _mm512_maskz_loadu_ps(m, taps.as_ptr().add(t * c + c0));
                let at = |iy: usize, ix: usize| x.add((iy * g.w + ix) * c + c0);
                let mut ox = 0;
                if k == 3 && (s == 1 || s == 2) {
                    let w: [__m512; 9] = std::array::from_fn(tap);
                    while ox < g.ow {
                        if ox >= lo && ox + 4 <= hi {
                            let mut acc = [b; 4];
                            for ky in rows.clone() {
                                let iy = oy * s + ky - g.pad;
                                let first = ox * s - g.pad;
                                if s == 1 {
                                    let v: [__m512; 6] = std::array::from_fn(|t| {
                                        _mm512_maskz_loadu_ps(m, at(iy, first + t))
                                    });
                                    for (j, a) in acc.iter_mut().enumerate() {
                                        for kx in 0..3 {
                                            *a = _mm512_fmadd_ps(v[j + kx], w[ky * 3 + kx], *a);
                                        }
                                    }
                                } else {
                                    let v: [__m512; 9] = std::array::from_fn(|t| {
                                        _mm512_maskz_loadu_ps(m, at(iy, first + t))
                                    });
                                    for (j, a) in acc.iter_mut().enumerate() {
                                        for kx in 0..3 {
                                            *a = _mm512_fmadd_ps(v[2 * j + kx], w[ky * 3 + kx], *a);
                                        }
                                    }
                                }
                            }
                            for (j, a) in acc.iter().enumerate() {
                                _mm512_mask_storeu_ps(out.add((ox + j) * c + c0), m, finish(*a));
                            }
                            ox += 4;
                            continue;
                        }
                        let mut a = b;
                        for ky in rows.clone() {
                            let iy = oy * s + ky - g.pad;
                            for (kx, &wv) in w[ky * 3..ky * 3 + 3].iter().enumerate() {
                                if let Some(ix) =
                                    (ox * s + kx).checked_sub(g.pad).filter(|&i| i < g.w)
                                {
                                    a = _mm512_fmadd_ps(
                                        _mm512_maskz_loadu_ps(m, at(iy, ix)),
                                        wv,
                                        a,
                                    );
                                }
                            }
                        }
                        _mm512_mask_storeu_ps(out.add(ox * c + c0), m, finish(a));
                        ox += 1;
                    }
                    continue;
                }
                for ox in 0..g.ow {
                    let mut a = b;
                    for ky in rows.clone() {
                        let iy = oy * s + ky - g.pad;
                        for kx in 0..k {
                            if let Some(ix) = (ox * s + kx).checked_sub(g.pad).filter(|&i| i < g.w)
                            {
                                a = _mm512_fmadd_ps(
                                    _mm512_maskz_loadu_ps(m, at(iy, ix)),
                                    tap(ky * k + kx),
                                    a,
                                );
                            }
                        }
                    }
                    _mm512_mask_storeu_ps(out.add(ox * c + c0), m, finish(a));
                }
            }
        }
    }

    /// `rows` positions of a pointwise convolution, `x` `[rows, ci]` by `wt` `[ci, co]` into
    /// `out` `[rows, co]`, plus the bias and clamped: tiles of up to `TILE_ROWS` positions by
    /// 32 output channels, the columns of `wt` outer (a block of them stays in the first-level
    /// cache while the positions pass).
    ///
    /// # Safety
    /// The machine has AVX-512 F; `out` is valid for `rows·co` writes.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pointwise_rows(
        x: &[f32],
        rows: usize,
        ci: usize,
        wt: &[f32],
        co: usize,
        bias: &[f32],
        act: Epilogue,
        out: *mut f32,
    ) {
        assert!(x.len() >= rows * ci && wt.len() >= ci * co && bias.len() >= co);
        for n0 in (0..co).step_by(32) {
            let m0 = lanes(co, n0);
            let m1 = if n0 + 16 < co { lanes(co, n0 + 16) } else { 0 };
            let mut p0 = 0;
            while p0 < rows {
                let m = TILE_ROWS.min(rows - p0);
                let t = Tile {
                    x: x[p0 * ci..].as_ptr(),
                    ci,
                    wt: wt[n0..].as_ptr(),
                    co,
                    bias: bias[n0..].as_ptr(),
                    masks: (m0, m1),
                    act,
                    // SAFETY: position p0, column n0 lies inside the output.
                    out: unsafe { out.add(p0 * co + n0) },
                };
                macro_rules! rows {
                    ($($r:literal)*) => {
                        match (m, m1 != 0) {
                            // SAFETY: the tile's reads and writes lie inside x, wt, the bias
                            // and the output, its lanes beyond co masked off.
                            $(($r, true) => unsafe { tile::<$r, 2>(t) },
                              ($r, false) => unsafe { tile::<$r, 1>(t) },)*
                            _ => unreachable!("a tile has 1..=TILE_ROWS rows"),
                        }
                    };
                }
                rows!(1 2 3 4 5 6 7 8 9 10 11 12);
                p0 += m;
            }
        }
    }

    /// Where a pointwise tile reads and writes.
    #[derive(Clone, Copy)]
    struct Tile {
        x: *const f32,
        ci: usize,
        wt: *const f32,
        co: usize,
        bias: *const f32,
        masks: (__mmask16, __mmask16),
        act: Epilogue,
        out: *mut f32,
    }

    /// `M` positions by `V` vectors of 16 output channels.
    ///
    /// # Safety
    /// The machine has AVX-512 F; the tile's `M` rows of `x` (`ci` each), `ci` rows of `wt`
    /// (`V·16` columns from `wt`, masked) and the bias are readable, its outputs writable.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const M: usize, const V: usize>(t: Tile) {
        let masks = [t.masks.0, t.masks.1];
        // SAFETY (whole body): in bounds as the caller promises.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; M];
            let mut wrow = t.wt;
            for kk in 0..t.ci {
                let wv: [__m512; V] =
                    std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], wrow.add(16 * v)));
                for (r, row) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*t.x.add(r * t.ci + kk));
                    for (v, acc) in row.iter_mut().enumerate() {
                        *acc = _mm512_fmadd_ps(a, wv[v], *acc);
                    }
                }
                wrow = wrow.add(t.co);
            }
            let (lo, hi) = (_mm512_set1_ps(t.act.lo), _mm512_set1_ps(t.act.hi));
            let b: [__m512; V] =
                std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], t.bias.add(16 * v)));
            for (r, row) in acc.iter().enumerate() {
                for (v, acc) in row.iter().enumerate() {
                    let y = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_add_ps(*acc, b[v])));
                    _mm512_mask_storeu_ps(t.out.add(r * t.co + 16 * v), masks[v], y);
                }
            }
        }
    }
}

/// A `[N, C, H, W]` batch as channels-last `[N, H, W, C]` (f32 on the CPU; other values go
/// through candle's permutation).
pub fn to_channels_last(x: &Tensor) -> candle_core::Result<Tensor> {
    transposed(x, true)
}

/// A channels-last `[N, H, W, C]` batch as `[N, C, H, W]`.
pub fn to_channels_first(x: &Tensor) -> candle_core::Result<Tensor> {
    transposed(x, false)
}

fn transposed(x: &Tensor, to_last: bool) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        let order = if to_last { (0, 2, 3, 1) } else { (0, 3, 1, 2) };
        return x.permute(order)?.contiguous();
    }
    x.contiguous()?.apply_op1_no_bwd(&Transpose { to_last })
}

/// Each sample's `[A, B]` matrix transposed: `(C, H·W)` to channels-last, `(H·W, C)` back.
struct Transpose {
    to_last: bool,
}

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "slim-channels-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (n, d1, d2, d3) = l.shape().dims4()?;
        // Rows and columns of each sample's matrix, and the output's shape.
        let (a, b, shape) = if self.to_last {
            (d1, d2 * d3, Shape::from((n, d2, d3, d1)))
        } else {
            (d1 * d2, d3, Shape::from((n, d3, d1, d2)))
        };
        let size = (a * b).max(1);
        let fast = super::has_avx2_fma();
        // SAFETY: every task writes each value of its sample.
        let y = unsafe {
            written(
                n * a * b,
                size,
                n * a * b < super::SERIAL_VALUES,
                |(i, out)| {
                    transpose_matrix(&x[i * a * b..][..a * b], a, b, super::zeroed(out), fast)
                },
            )
        };
        Ok((CpuStorage::F32(y), shape))
    }
}

/// `dst[j·a + i] = src[i·b + j]` for an `a` x `b` matrix: in 8 x 8 blocks in registers with
/// AVX2 (`fast`), the edges one by one.
fn transpose_matrix(src: &[f32], a: usize, b: usize, dst: &mut [f32], fast: bool) {
    let (a8, b8) = if fast { (a / 8 * 8, b / 8 * 8) } else { (0, 0) };
    #[cfg(target_arch = "x86_64")]
    for i in (0..a8).step_by(8) {
        for j in (0..b8).step_by(8) {
            // SAFETY: the machine has AVX2 (`fast`); rows i..i + 8 of src and j..j + 8 of
            // dst hold 8 values from the block's corner.
            unsafe {
                super::pointwise::transpose8(
                    src.as_ptr().add(i * b + j),
                    b,
                    dst.as_mut_ptr().add(j * a + i),
                    a,
                )
            };
        }
    }
    for i in 0..a {
        let from = if i < a8 { b8 } else { 0 };
        for j in from..b {
            dst[j * a + i] = src[i * b + j];
        }
    }
}

/// The mean over the positions of each channel of a channels-last batch (`[N, H, W, C]` to
/// `[N, C]`), as [`super::plane_means`] of the same values in `[N, C, H, W]`, the sums taken
/// position by position.
pub fn channel_means(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&ChannelMeans)
}

struct ChannelMeans;

impl CustomOp1 for ChannelMeans {
    fn name(&self) -> &'static str {
        "slim-channel-means"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (n, h, w, c) = l.shape().dims4()?;
        let size = h * w;
        // As candle divides: a multiplication by the reciprocal, rounded to f32.
        let scale = (1.0 / size as f64) as f32;
        let mut out = vec![0f32; n * c];
        if size == 0 {
            // The mean of nothing, as candle's 0 / 0.
            out.fill(f32::NAN);
        }
        for (sample, acc) in x
            .chunks_exact((size * c).max(1))
            .zip(out.chunks_exact_mut(c.max(1)))
        {
            for row in sample.chunks_exact(c) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            for a in acc.iter_mut() {
                *a *= scale;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The convolution by candle's own, `[N, C, H, W]`, with the bias added and clamped.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, spec: &Conv2dSpec, act: Epilogue) -> Tensor {
        let y = x
            .conv2d(w, spec.padding, spec.stride, spec.dilation, spec.groups)
            .unwrap()
            .broadcast_add(&b.reshape((1, spec.out_channels, 1, 1)).unwrap())
            .unwrap();
        y.maximum(act.lo).unwrap().minimum(act.hi).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}");
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!((p - q).abs() <= 2e-5 * scale, "{what}[{i}]: {p} vs {q}");
        }
    }

    /// Depthwise and pointwise convolutions over channels-last values give candle's
    /// convolution of the same values (with the vector kernels where the machine has them,
    /// and with the plain loops), over interior blocks, edges, tails of channels and
    /// positions, both strides, a kernel of 5, no padding and 1x1 planes.
    #[test]
    fn channels_last_convolutions_match_candle() {
        let dev = Device::Cpu;
        let acts = [Epilogue::NONE, Epilogue::RELU, Epilogue::RELU6];
        // (n, c_in, c_out, h, w, k, stride, pad, depthwise)
        let cases = [
            (2, 16, 16, 9, 9, 3, 1, 1, true),
            (1, 37, 37, 28, 28, 3, 1, 1, true),
            (2, 20, 20, 15, 15, 3, 2, 1, true),
            (1, 20, 20, 14, 14, 3, 2, 1, true),
            (2, 16, 16, 6, 7, 3, 1, 0, true),
            (1, 8, 8, 7, 7, 5, 1, 2, true),
            (3, 32, 32, 1, 1, 3, 1, 1, true),
            (2, 32, 32, 2, 2, 3, 2, 1, true),
            (2, 64, 64, 7, 7, 3, 2, 1, true),
            (2, 16, 32, 28, 28, 1, 1, 0, false),
            (1, 37, 20, 5, 6, 1, 1, 0, false),
            (2, 8, 16, 3, 3, 1, 1, 0, false),
            (13, 24, 50, 1, 1, 1, 1, 0, false),
            (2, 12, 17, 4, 4, 1, 1, 0, false),
        ];
        for (i, &(n, ci, co, h, w, k, stride, pad, dw)) in cases.iter().enumerate() {
            let act = acts[i % 3];
            let mut spec = Conv2dSpec::new(ci, co, k)
                .with_stride(stride)
                .with_padding(pad);
            if dw {
                spec.groups = ci;
            }
            assert!(ChannelsLastConv::applies(&spec), "case {i}");
            let wt = Tensor::randn(0f32, 1.0, (co, ci / spec.groups, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (n, ci, h, w), &dev).unwrap();
            let expected = reference(&x, &wt, &b, &spec, act);
            let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let conv = ChannelsLastConv::new(&spec, &values(&wt), &values(&b), act).unwrap();
            assert_eq!(conv.is_depthwise(), dw);
            let xl = to_channels_last(&x).unwrap();
            for portable in [false, true] {
                let conv = ChannelsLastConv {
                    portable,
                    ..conv.clone()
                };
                let y = to_channels_first(&conv.forward(&xl).unwrap()).unwrap();
                close(&y, &expected, &format!("case {i}, portable {portable}"));
            }
        }
        // Not taken: a dilated depthwise, a dense 3x3, a strided or padded pointwise.
        let mut dilated = Conv2dSpec::new(8, 8, 3).with_padding(2);
        dilated.groups = 8;
        dilated.dilation = 2;
        for spec in [
            dilated,
            Conv2dSpec::new(8, 8, 3).with_padding(1),
            Conv2dSpec::new(8, 16, 1).with_stride(2),
            Conv2dSpec::new(8, 16, 1).with_padding(1),
        ] {
            assert!(!ChannelsLastConv::applies(&spec), "{spec:?}");
        }
    }

    /// The conversions are candle's permutations, and global pooling of channels-last values
    /// is the planes' means.
    #[test]
    fn conversions_and_means_match_candle() {
        let dev = Device::Cpu;
        for dims in [(2, 13, 5, 7), (3, 16, 8, 8), (1, 8, 1, 1), (2, 9, 16, 3)] {
            let x = Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
            let last = to_channels_last(&x).unwrap();
            let expected = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            assert_eq!(
                last.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{dims:?}"
            );
            let back = to_channels_first(&last).unwrap();
            assert_eq!(back.dims(), x.dims());
            assert_eq!(
                back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{dims:?}"
            );
            close(
                &channel_means(&last).unwrap(),
                &super::super::plane_means(&x).unwrap(),
                &format!("means {dims:?}"),
            );
        }
    }
}
