//! Dense and pointwise convolutions: im2col, the per-sample products, their backward.

use super::*;

/// im2col, `[N, C, H, W]` to `[C*KH*KW, N*OH*OW]`, into `cols`, whose padding positions must
/// hold zeros (they are never written, so one buffer serves every batch of one geometry);
/// over every core with `parallel`.
pub(super) fn unfold_into(g: &Geom, x: &[f32], cols: &mut [f32], parallel: bool) {
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
pub(super) fn gather_rows(
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
pub(super) mod gather_avx512 {
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
pub(super) fn fold_into(g: &Geom, cols: &[f32], x: &mut [f32], parallel: bool) {
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
/// The forward of a dense convolution, `act(W · im2col(x) + b)` as `[N, O, OH, OW]`, sample
/// by sample: each sample's product is written where it belongs and finished while it is
/// still in cache. A pointwise convolution reads the sample's planes where they lie; others
/// unfold one sample at a time into a buffer of the worker's.
pub(super) fn dense_forward(
    g: &Geom,
    o: usize,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    act: Epilogue,
) -> Vec<f32> {
    dense_forward_by(g, o, x, w, b, act, true)
}

/// Input channels up to which a dense convolution at stride 1 whose output plane is its
/// input's always runs straight over the flattened planes ([`flat_dense`]) instead of through
/// unfolded columns: a network's first layer, on one or three channels, where the columns
/// cost more than the arithmetic (per 16 samples, `mobilenet_tiny`'s stem 0.08 -> 0.055 ms
/// and LeNet's first layer 0.09 -> 0.05 ms).
pub(super) const FLAT_DENSE_CHANNELS: usize = 4;

/// With more input channels, the flattened planes need the weights repacked by tile on
/// every forward ([`flat_dense::forward`]), which pays where they stay in the second-level
/// cache, as 256 KiB of them do, or are used on at least [`FLAT_DENSE_POSITIONS`] output
/// positions (samples times plane): ResNet-20's 3x3 convolutions at batch 64 (1x28x28 input,
/// one thread) 55 -> 37 ms per forward, ResNet-18's 658 -> 517 ms, with no unfolded columns;
/// at batch 1, ResNet-18's 7x7 planes of 256 channels, whose 2.4 MB of weights would be
/// copied to be used on 49 positions, stay faster as columns.
pub(super) const FLAT_DENSE_PACKED_BYTES: usize = 256 << 10;

/// See [`FLAT_DENSE_PACKED_BYTES`].
pub(super) const FLAT_DENSE_POSITIONS: usize = 512;

/// The flattened planes' taps (in [`DepthwiseRows::flat`]) where a dense convolution of
/// geometry `g` into `o` output channels runs over them ([`flat_dense`]): on AVX-512 F,
/// stride 1 with the output the input's size, not pointwise (which reads its planes in place
/// already), and at most [`FLAT_DENSE_CHANNELS`] input channels or weights that are cheap to
/// repack ([`FLAT_DENSE_PACKED_BYTES`]).
pub(super) fn flat_dense_taps(g: &Geom, o: usize) -> Option<Arc<DepthwiseRows>> {
    let repack_pays = o * g.c * g.kh * g.kw * 4 <= FLAT_DENSE_PACKED_BYTES
        || g.n * g.oh * g.ow >= FLAT_DENSE_POSITIONS;
    if !cfg!(target_arch = "x86_64")
        || g.pointwise()
        || g.stride != 1
        || (g.c > FLAT_DENSE_CHANNELS && !repack_pays)
        || (g.oh, g.ow) != (g.h, g.w)
        || !has_avx512f()
    {
        return None;
    }
    DepthwiseRows::cached(g).filter(|r| r.flat.as_ref().is_some_and(|f| f.split.is_none()))
}

/// [`dense_forward`], straight over the flattened planes where that applies and `direct`.
pub(super) fn dense_forward_by(
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
    if let Some(rows) = direct.then(|| flat_dense_taps(g, o)).flatten() {
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
pub(super) mod flat_dense {
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
        // The weights by tile of M output channels, tap-major within it (`[group][ci * kk +
        // t][M]`, rows past `o` zero): each tap's M weights lie side by side.
        let mut packed = vec![0f32; groups * k * M];
        for (i, row) in w[..o * k].chunks_exact(k).enumerate() {
            let tile = &mut packed[i / M * k * M..][..k * M];
            for (j, &v) in row.iter().enumerate() {
                tile[j * M + i % M] = v;
            }
        }
        let len = g.n * o * p;
        let mut y: Vec<f32> = Vec::with_capacity(len);
        let out = Disjoint(y.as_mut_ptr());
        super::for_each_task(g.n * groups, len * k < super::SERIAL_PRODUCT, |task| {
            let (n, gi) = (task / groups, task % groups);
            let i0 = gi * M;
            let m = M.min(o - i0);
            // SAFETY: rows i0..i0 + m of sample n's outputs belong to this task alone and
            // lie inside the buffer's capacity.
            let ys = unsafe { out.rows((n * o + i0) * p, m * p) };
            let tile = Tile {
                flat,
                planes: &x[n * g.c * p..][..g.c * p],
                c: g.c,
                w: &packed[gi * k * M..][..k * M],
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

    /// One sample's input planes and a tile's output channels (weights packed `[c * taps][M]`).
    struct Tile<'a> {
        flat: &'a FlatTaps,
        planes: &'a [f32],
        c: usize,
        w: &'a [f32],
        b: &'a [f32],
        act: Epilogue,
    }

    impl Tile<'_> {
        /// All `R` output planes of the tile into `ys` (`R` planes one after another), three
        /// blocks of 16 positions at a time.
        ///
        /// # Safety
        /// The machine has AVX-512 F; `w` holds the packed weights of `c * taps` taps, `b`
        /// `R` biases, and `ys` `R` planes.
        #[target_feature(enable = "avx512f")]
        unsafe fn rows<const R: usize>(&self, ys: &mut [f32]) {
            let p = ys.len() / R;
            let blocks = p.div_ceil(16);
            assert!(
                self.w.len() >= self.c * self.flat.offsets.len() * M
                    && self.planes.len() >= self.c * p
                    && self.b.len() >= R
                    && self.flat.masks.len() >= self.flat.offsets.len() * blocks,
                "a flat dense tile out of bounds"
            );
            let mut v = 0;
            // SAFETY: as the caller promises and checked above; the blocks lie inside the
            // planes.
            unsafe {
                while v + 3 <= blocks {
                    self.blocks::<R, 3>(ys, p, v);
                    v += 3;
                }
                match blocks - v {
                    2 => self.blocks::<R, 2>(ys, p, v),
                    1 => self.blocks::<R, 1>(ys, p, v),
                    _ => {}
                }
            }
        }

        /// Blocks `v..v + N` of the tile's planes.
        ///
        /// # Safety
        /// As [`Tile::rows`] (whose check covers the reads here), and the blocks lie inside
        /// the planes.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn blocks<const R: usize, const N: usize>(
            &self,
            ys: &mut [f32],
            p: usize,
            v: usize,
        ) {
            let (flat, kk) = (self.flat, self.flat.offsets.len());
            let blocks = p.div_ceil(16);
            let mut acc = [[_mm512_setzero_ps(); N]; R];
            let mut wp = self.w.as_ptr();
            for ci in 0..self.c {
                let plane = self.planes.as_ptr().wrapping_add(ci * p + 16 * v);
                for t in 0..kk {
                    // SAFETY: t < kk and v + N <= blocks index inside the offsets and masks
                    // (checked by `rows`).
                    let (off, masks) = unsafe {
                        (
                            *flat.offsets.get_unchecked(t),
                            flat.masks.as_ptr().add(t * blocks + v),
                        )
                    };
                    let from = plane.wrapping_offset(off);
                    // SAFETY: each mask selects inputs inside the plane (masked-off values
                    // are not read).
                    let xs: [__m512; N] = std::array::from_fn(|j| unsafe {
                        _mm512_maskz_loadu_ps(*masks.add(j), from.wrapping_add(16 * j))
                    });
                    for (r, row) in acc.iter_mut().enumerate() {
                        // SAFETY: tap ci * kk + t's M weights lie inside `w` (checked by
                        // `rows`), and r < R <= M.
                        let wv = _mm512_set1_ps(unsafe { *wp.add(r) });
                        for (a, &xv) in row.iter_mut().zip(&xs) {
                            *a = _mm512_fmadd_ps(wv, xv, *a);
                        }
                    }
                    wp = wp.wrapping_add(M);
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
pub(super) fn pointwise_forward(
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
pub(super) struct DenseConv {
    pub(super) g: Geom,
    pub(super) o: usize,
}

/// The gradients of [`DenseConv`] as one flat tensor: `dx`, then `dw`, then `db`.
pub(super) struct DenseConvGrad {
    pub(super) g: Geom,
    pub(super) o: usize,
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
pub(super) fn dense_grads(
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
