//! Max pooling with padding and an exact backward, and per-plane means.

use super::*;

/// Max pooling with a square window and implicit `-inf` padding; its backward sends each
/// output's gradient to the first maximal input of its window (candle's own max pooling has
/// no padding and no backward for overlapping windows).
pub struct MaxPool {
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl MaxPool {
    pub(super) fn geom(&self, l: &Layout) -> candle_core::Result<Geom> {
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

    /// The maxima of every window of one plane into `out` (filled with -inf), with AVX-512
    /// when `wide`. At stride 1, per output row, each window row and column offset is one
    /// sweep over the output row, which the compiler vectorizes. At a larger stride, per
    /// output row, the window's rows are first reduced to one row of column maxima (`col`,
    /// scratch of `w + 1` values; one vectorized sweep per window row), which each column
    /// offset then reads at the stride: a k x k window costs k strided reads rather than k²
    /// (at stride 2, contiguous reads of the even or odd columns). The
    /// same values as [`MaxPool::argmax`] picks (a NaN is passed over where `argmax` would
    /// keep the first one).
    pub(super) fn plane_max(g: &Geom, plane: &[f32], out: &mut [f32], col: &mut [f32], wide: bool) {
        fn sweep(g: &Geom, plane: &[f32], out: &mut [f32], col: &mut [f32]) {
            if g.stride == 1 {
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
                            let src = &line[start..start + cols.len()];
                            for (o, &v) in row[cols].iter_mut().zip(src) {
                                *o = o.max(v);
                            }
                        }
                    }
                }
                return;
            }
            if g.stride == 2 {
                return halves(g, plane, out, col);
            }
            let col = &mut col[..g.w];
            for (oh, row) in out.chunks_exact_mut(g.ow).enumerate() {
                col.fill(f32::NEG_INFINITY);
                for kh in (0..g.kh).filter(|&kh| g.valid(kh, g.oh, g.h).contains(&oh)) {
                    let line = &plane[g.src(oh, kh) * g.w..][..g.w];
                    for (c, &v) in col.iter_mut().zip(line) {
                        *c = c.max(v);
                    }
                }
                for kw in 0..g.kw {
                    let cols = g.valid(kw, g.ow, g.w);
                    if cols.is_empty() {
                        continue;
                    }
                    let src = col[g.src(cols.start, kw)..].iter().step_by(g.stride);
                    for (o, &v) in row[cols].iter_mut().zip(src) {
                        *o = o.max(v);
                    }
                }
            }
        }
        // Stride 2: the column maxima kept as their even and odd columns (`col` holds both
        // halves), so that every read after the first sweep is contiguous.
        #[inline(always)]
        fn halves(g: &Geom, plane: &[f32], out: &mut [f32], col: &mut [f32]) {
            let (even, odd) = col[..g.w + 1].split_at_mut(g.w.div_ceil(2));
            for (oh, row) in out.chunks_exact_mut(g.ow).enumerate() {
                even.fill(f32::NEG_INFINITY);
                odd.fill(f32::NEG_INFINITY);
                for kh in (0..g.kh).filter(|&kh| g.valid(kh, g.oh, g.h).contains(&oh)) {
                    let line = &plane[g.src(oh, kh) * g.w..][..g.w];
                    let pairs = line.chunks_exact(2);
                    if let [last] = pairs.remainder() {
                        even[g.w / 2] = even[g.w / 2].max(*last);
                    }
                    for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(pairs) {
                        *e = e.max(pair[0]);
                        *o = o.max(pair[1]);
                    }
                }
                for kw in 0..g.kw {
                    let cols = g.valid(kw, g.ow, g.w);
                    if cols.is_empty() {
                        continue;
                    }
                    let start = g.src(cols.start, kw);
                    let half = if start.is_multiple_of(2) {
                        &*even
                    } else {
                        &*odd
                    };
                    let src = &half[start / 2..][..cols.len()];
                    for (o, &v) in row[cols].iter_mut().zip(src) {
                        *o = o.max(v);
                    }
                }
            }
        }
        crate::with_target_feature!(
            "avx512f",
            wide,
            sweep(g: &Geom, plane: &[f32], out: &mut [f32], col: &mut [f32])
        )
    }

    /// 2x2 windows at stride 2 without padding (LeNet's and VGG's pooling) over whole planes
    /// (`w` columns and `ip` values in, `ow` columns and `op` values out): each output row
    /// from its pair of input rows in one pass, which the compiler vectorizes (with AVX-512
    /// when `wide`). The values of [`MaxPool::plane_max`], taken in the same order.
    pub(super) fn halvings(
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
    pub(super) fn plane_grad(
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
    pub(super) fn argmax(g: &Geom, plane: &[f32], oh: usize, ow: usize) -> usize {
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
            let mut col = vec![0f32; g.w + 1];
            for (plane, out) in planes.chunks_exact(ip).zip(outs.chunks_exact_mut(op)) {
                MaxPool::plane_max(&g, plane, out, &mut col, wide);
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

pub(super) struct MaxPoolGrad(pub(super) MaxPool);

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
        let wide = has_avx512f();
        gx.par_chunks_mut(ip * per)
            .enumerate()
            .for_each(|(task, gplanes)| {
                let (mut y, mut taken) = (vec![0f32; op], vec![false; g.ow]);
                let mut col = vec![0f32; g.w + 1];
                for (j, gplane) in gplanes.chunks_exact_mut(ip).enumerate() {
                    let idx = task * per + j;
                    let plane = &x[idx * ip..(idx + 1) * ip];
                    y.fill(f32::NEG_INFINITY);
                    MaxPool::plane_max(&g, plane, &mut y, &mut col, wide);
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

pub(super) struct PlaneMeans;

impl PlaneMeans {
    pub(super) fn mean(plane: &[f32], scale: f32) -> f32 {
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
pub(super) mod plane_means_avx512 {
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
