//! Dense and grouped int8 convolutions: columns gathered into packed panels, products by the int8 GEMM, outputs requantized as they are written.

use super::*;
use crate::gemm::Kernel;

/// Output positions per task of a convolution (whole output rows, at least one): enough work
/// to amortize a task, small enough that a batch of one still spreads over the cores.
pub(super) const POSITIONS_PER_TASK: usize = 256;

/// A dense or grouped convolution as int8 matrix products: per (sample, group, block of output
/// rows), the group's filters times the block's input columns (one row per channel and kernel
/// tap, gathered by row segments; a 1x1 convolution reads its input as it is).
pub(super) fn grouped<T: Sink>(
    xq: &[i8],
    (pa, quad): (&PackedA, Option<&PackedA>),
    geo: &Geometry<'_>,
    n: usize,
    scales: &[f32],
    bias: Option<&[f32]>,
    to: &Requant,
) -> Vec<T> {
    let c = geo.spec;
    let g = c.groups.max(1);
    let (cg, og) = (geo.cin / g, c.out_channels / g);
    let (h, w, oh, ow) = (geo.h, geo.w, geo.oh, geo.ow);
    let rows_per = (POSITIONS_PER_TASK / ow).max(1);
    let blocks = oh.div_ceil(rows_per);
    let pointwise = c.kernel == [1, 1] && c.stride == 1 && c.padding == 0;
    // AVX2 takes its faster product, and finishes it in registers, where no input value is
    // negative: every layer after a ReLU.
    let u7 = pa.kernel() == Kernel::Avx2 && crate::gemm::nonnegative(xq);
    // With the VNNI kernel (and AVX2's product of non-negative values) every value is
    // finished in registers and written through `written`, so the output is not zeroed
    // first; the other kernels' sums are finished in slices of it, which must hold values.
    let in_kernel = pa.kernel() == Kernel::Avx512Vnni || u7;
    let len = n * c.out_channels * oh * ow;
    let mut out: Vec<T> = if in_kernel {
        unwritten(len)
    } else {
        vec![T::default(); len]
    };
    let macs = len * cg * c.kernel[0] * c.kernel[1];
    let gathered = !pointwise && c.stride == 1 && cg >= GATHERED_CHANNELS;
    let block_rows = |blk: usize| blk * rows_per..((blk + 1) * rows_per).min(oh);
    // The panels' loads of each block of rows, the same for every sample and group: worked
    // out the first time a layer of this geometry runs, and kept.
    let block_loads: Vec<_> = match gathered && (Kernel::Avx512Vnni.available() || u7) {
        true => (0..blocks)
            .map(|blk| crate::gemm::ConvLoads::cached(&geo.columns(&[], cg, block_rows(blk))))
            .collect(),
        false => Vec::new(),
    };
    // Each sample's (and group's) planes laid out four channels together, once, for layers
    // with filters in tap order (with AVX2, only planes without a negative value).
    let quad = quad.filter(|qa| qa.kernel() != Kernel::Avx2 || u7);
    let quads = quad
        .filter(|_| !pointwise && c.stride == 1)
        .map(|qa| quad_planes_of(xq, n * g, [cg, h, w], qa.kernel()));
    let serial = macs < SERIAL_PRODUCT;
    let tasks = n * g * blocks;
    let share = channel_share(og, tasks, serial);
    let plan = Plan {
        xq,
        pa,
        quad: quad.zip(quads.as_deref()),
        geo,
        scales,
        bias,
        to,
        written: Disjoint(out.as_mut_ptr()),
        block_loads,
        groups: g,
        rows_per,
        blocks,
        share,
        shares: og.div_ceil(share),
        in_kernel,
        gathered,
        pointwise,
    };
    for_each_task(tasks * plan.shares, serial, |task| plan.task(task));
    if in_kernel {
        // SAFETY: the kernel finished and wrote every value of every task's rows: all
        // samples, groups and blocks of rows, every column (its masks cover the tails).
        unsafe { out.set_len(len) };
    }
    out
}

/// What the tasks of one [`grouped`] convolution share.
struct Plan<'a, T> {
    xq: &'a [i8],
    pa: &'a PackedA,
    /// The filters in tap order and every sample's (and group's) quad planes, where the
    /// layer gathers from them.
    quad: Option<(&'a PackedA, &'a [u8])>,
    geo: &'a Geometry<'a>,
    scales: &'a [f32],
    bias: Option<&'a [f32]>,
    to: &'a Requant,
    written: Disjoint<T>,
    block_loads: Vec<Arc<crate::gemm::ConvLoads>>,
    groups: usize,
    rows_per: usize,
    blocks: usize,
    /// Output channels per task, and tasks per group of a sample and block of rows.
    share: usize,
    shares: usize,
    in_kernel: bool,
    gathered: bool,
    pointwise: bool,
}

impl<T: Sink> Plan<'_, T> {
    /// Task `task`: one share of one group's output channels, over one block of output rows
    /// of one sample.
    fn task(&self, task: usize) {
        let geo = self.geo;
        let (g, blocks) = (self.groups, self.blocks);
        let (cg, og) = (geo.cin / g, geo.spec.out_channels / g);
        let (h, w, ow, p) = (geo.h, geo.w, geo.ow, geo.oh * geo.ow);
        let (task, part) = (task / self.shares, task % self.shares);
        let (sg, blk) = (task / blocks, task % blocks);
        let (s, gi) = (sg / g, sg % g);
        let rows = blk * self.rows_per..((blk + 1) * self.rows_per).min(geo.oh);
        let (oy0, np) = (rows.start, rows.len() * ow);
        let plane0 = (s * geo.cin + gi * cg) * h * w;
        let planes = &self.xq[plane0..plane0 + cg * h * w];
        // This task's output channels: its share of the group's.
        let o0 = gi * og + part * self.share;
        let filters = o0..o0 + self.share.min((gi + 1) * og - o0);
        // Where the kernel finishes the sums in registers, they go straight to the output:
        // row `o` of this block at `(s * oc + o) * p + oy0 * ow` (with oy0 = 0 for whole planes).
        let at = (s * geo.spec.out_channels + o0) * p + oy0 * ow;
        let finish = crate::gemm::Finish {
            scales: &self.scales[filters.clone()],
            bias: self.bias.map(|b| &b[filters.clone()]),
            ld: p,
            // SAFETY: `at` lies inside the output.
            out: T::output(unsafe { self.written.add(at) }.0, self.to),
        };
        if self.gathered {
            // The columns gathered from the input as the product packs them, where it can.
            let src = crate::gemm::Im2col {
                loads: self.block_loads.get(blk).map(|l| &**l),
                ..geo.columns(planes, cg, rows.clone())
            };
            if let Some((qa, quads)) = self.quad {
                let per = cg.div_ceil(4) * h * w * 4;
                let mine = &quads[(s * g + gi) * per..][..per];
                // SAFETY: as for `gemm_rows_finished` below.
                let f = filters.clone();
                if unsafe { crate::gemm::gemm_conv_quads_finished(qa, f, &src, mine, &finish) } {
                    return;
                }
            }
            // SAFETY: as for `gemm_rows_finished` below.
            let f = filters.clone();
            if unsafe { crate::gemm::gemm_conv_finished(self.pa, f, &src, &finish) } {
                return;
            }
        }
        let cols;
        let b = if self.pointwise {
            MatRef {
                data: &self.xq[plane0 + oy0 * ow..],
                rows: cg,
                cols: np,
                stride: h * w,
            }
        } else {
            cols = columns_matrix(&geo.columns(planes, cg, rows.clone()), geo.spec.stride);
            MatRef::new(&cols, cols.len() / np, np)
        };
        // SAFETY: rows o0..o0 + og of sample s, positions oy0 * ow.. (np of them, p apart):
        // no other task writes them (tasks differ in sample, group, share of its channels or
        // block of rows), and they lie inside the output.
        if unsafe { crate::gemm::gemm_rows_finished(self.pa, filters.clone(), b, &finish) } {
            return;
        }
        assert!(
            !self.in_kernel,
            "a product left unfinished where the output was not zeroed"
        );
        self.finish_sums(b, filters, s, rows);
    }

    /// The int32 sums of output channels `filters` of sample `s` over output rows `rows`
    /// (the product of their filters with `b`), finished into the output.
    fn finish_sums(
        &self,
        b: MatRef<'_>,
        filters: std::ops::Range<usize>,
        s: usize,
        rows: std::ops::Range<usize>,
    ) {
        let (ow, p, oc) = (
            self.geo.ow,
            self.geo.oh * self.geo.ow,
            self.geo.spec.out_channels,
        );
        let np = b.cols;
        ACC.with_borrow_mut(|acc| {
            let len = filters.len() * np;
            if acc.len() < len {
                acc.resize(len, 0);
            }
            let acc = &mut acc[..len];
            gemm_rows(self.pa, filters.clone(), b, acc);
            // The sums `acc` of output channels `o`, `plane` values each.
            let sums = |acc, plane, o: std::ops::Range<usize>| Sums {
                acc,
                plane,
                scales: &self.scales[o.clone()],
                bias: self.bias.map(|b| &b[o]),
            };
            if self.blocks == 1 {
                // The task's whole output planes, one after another.
                // SAFETY: these channels of sample `s`: no other task writes them (tasks
                // differ in sample, group or share of it), and they lie inside the output.
                let d = unsafe { self.written.rows((s * oc + filters.start) * p, len) };
                T::finish(d, sums(acc, p, filters), self.to);
            } else {
                for (row, o) in acc.chunks_exact(np).zip(filters) {
                    // SAFETY: output rows `rows` of channel `o` of sample `s`: no other task
                    // writes them (tasks differ in sample, group, share or block of rows),
                    // and they lie inside the output.
                    let d = unsafe { self.written.rows((s * oc + o) * p + rows.start * ow, np) };
                    T::finish(d, sums(row, np, o..o + 1), self.to);
                }
            }
        });
    }
}

impl Geometry<'_> {
    /// The columns of output rows `rows` over `channels` input planes (see
    /// [`crate::gemm::Im2col`]; for a strided convolution, [`Im2col::strided_matrix`]).
    fn columns<'p>(
        &self,
        planes: &'p [i8],
        channels: usize,
        rows: std::ops::Range<usize>,
    ) -> crate::gemm::Im2col<'p> {
        crate::gemm::Im2col {
            planes,
            channels,
            h: self.h,
            w: self.w,
            kernel: self.spec.kernel,
            padding: self.spec.padding,
            dilation: self.spec.dilation,
            rows,
            ow: self.ow,
            loads: None,
        }
    }
}

/// The columns of `src` (see [`crate::gemm::Im2col`]) written out, for a convolution at
/// `stride`: row `(c * kh + ky) * kw + kx`, column `(oy - rows.start) * ow + ox` holds the
/// input at channel `c`, row `oy * stride + ky * dilation - padding`, column `ox * stride + kx
/// * dilation - padding` (0 outside the plane); each output row's run of valid columns is
/// copied in one piece (every `stride`-th value).
fn columns_matrix(src: &crate::gemm::Im2col<'_>, stride: usize) -> Vec<i8> {
    let (h, w, ow) = (src.h, src.w, src.ow);
    let [kh, kw] = src.kernel;
    let (pad, dil) = (src.padding as isize, src.dilation);
    let np = src.rows.len() * ow;
    let halving = stride == 2 && Kernel::Avx512Vnni.available();
    let mut buf = vec![0i8; src.depth() * np];
    for (ci, plane) in src
        .planes
        .chunks_exact(h * w)
        .take(src.channels)
        .enumerate()
    {
        for ky in 0..kh {
            for kx in 0..kw {
                let t = (ci * kh + ky) * kw + kx;
                let row = &mut buf[t * np..(t + 1) * np];
                let off = (kx * dil) as isize - pad;
                let (lo, hi) = valid_columns(off, stride, w, ow);
                for (i, oy) in src.rows.clone().enumerate() {
                    let iy = (oy * stride + ky * dil) as isize - pad;
                    if iy < 0 || iy as usize >= h || lo >= hi {
                        continue;
                    }
                    let line = &plane[iy as usize * w..(iy as usize + 1) * w];
                    let dst = &mut row[i * ow..(i + 1) * ow];
                    let start = ((lo * stride) as isize + off) as usize;
                    if stride == 1 {
                        copy_short(&mut dst[lo..hi], &line[start..start + hi - lo]);
                    } else {
                        every_nth(&mut dst[lo..hi], &line[start..], stride, halving);
                    }
                }
            }
        }
    }
    buf
}

/// The output channels of a group that one task computes: all of them, unless samples,
/// groups and blocks of rows (`tasks`) leave a thread without a task (a batch of one through
/// layers of small planes); then the group's channels are shared out as well, in whole tiles
/// of 16 rows, each share's task packing the same columns for its filters.
fn channel_share(og: usize, tasks: usize, serial: bool) -> usize {
    let threads = rayon::current_num_threads();
    match serial || tasks >= threads {
        true => og,
        false => og
            .div_ceil(threads.div_ceil(tasks))
            .next_multiple_of(16)
            .min(og),
    }
}

/// `count` runs of `[channels, h, w]` planes of `xq` laid out by [`crate::gemm::quad_planes`]
/// for `kernel`, one after another.
fn quad_planes_of(xq: &[i8], count: usize, [c, h, w]: [usize; 3], kernel: Kernel) -> Vec<u8> {
    let per = c.div_ceil(4) * h * w * 4;
    let len = count * per;
    let mut buf = Vec::with_capacity(len);
    for_each_chunk(
        &mut buf.spare_capacity_mut()[..len],
        per,
        len < SERIAL_VALUES,
        |(i, out)| {
            crate::gemm::quad_planes(&xq[i * c * h * w..][..c * h * w], [c, h, w], out, kernel)
        },
    );
    // SAFETY: `quad_planes` wrote every byte of every run's share.
    unsafe { buf.set_len(len) };
    buf
}

/// An empty vector with room for `len` outputs that kernels write through its pointer
/// before it is given its length. In tests the room is filled with a pattern first (bytes
/// 0xA5: -91 as int8, a tiny negative f32), so that an output a kernel fails to write shows
/// as a wrong value rather than as the zeros of fresh memory.
pub(super) fn unwritten<T: Sink>(len: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    if cfg!(test) {
        // SAFETY: the room holds `len` values of `T`, a plain number of whole bytes.
        unsafe { std::ptr::write_bytes(out.as_mut_ptr(), 0xA5, len) };
    }
    out
}

/// `dst[i] = src[i * stride]` for every `i`; at stride 2 with AVX-512 BW (`halving`), 32
/// values per masked load of 64 bytes, narrowed by keeping each 16-bit word's low byte.
pub(super) fn every_nth(dst: &mut [i8], src: &[i8], stride: usize, halving: bool) {
    if dst.is_empty() {
        return;
    }
    assert!(
        src.len() > (dst.len() - 1) * stride,
        "every_nth: a source too short"
    );
    #[cfg(target_arch = "x86_64")]
    if halving && stride == 2 {
        // SAFETY: `halving` says the machine has AVX-512 F, BW and VL; the lengths were
        // checked above.
        unsafe { halve_bytes::evens(dst, src) };
        return;
    }
    for (i, d) in dst.iter_mut().enumerate() {
        *d = src[i * stride];
    }
}

/// Whether a convolution gathers its columns from quad planes ([`crate::gemm::quad_planes`],
/// one load per tap and four channels) on `kernel`: with AVX-512 VNNI or AVX2 (where the
/// planes hold no negative value), a dense convolution at stride 1 with whole groups of four
/// input channels (a partial group would add products with 0).
pub(super) fn quad_layer(
    c: &slim_core::graph::Conv2dSpec,
    channels: usize,
    kernel: Kernel,
) -> bool {
    let pointwise = c.kernel == [1, 1] && c.stride == 1 && c.padding == 0;
    !c.is_depthwise()
        && !pointwise
        && c.stride == 1
        && channels >= GATHERED_CHANNELS
        && channels.is_multiple_of(4)
        && matches!(kernel, Kernel::Avx512Vnni | Kernel::Avx2)
        && kernel.available()
}

/// A convolution's int8 filters in tap order, packed for this machine's kernel, where
/// [`quad_layer`] says it gathers from quad planes; `None` for any other layer.
pub(super) fn quad_filters(node: &Node, values: &[i8]) -> Option<PackedA> {
    quad_filters_for(node, values, Kernel::best())
}

/// [`quad_filters`] for a given kernel.
pub(super) fn quad_filters_for(node: &Node, values: &[i8], kernel: Kernel) -> Option<PackedA> {
    let Op::Conv2d(c) = &node.op else {
        return None;
    };
    let taps = c.kernel[0] * c.kernel[1];
    let channels = values.len() / (c.out_channels * taps).max(1);
    if !quad_layer(c, channels, kernel) || values.len() != c.out_channels * channels * taps {
        return None;
    }
    let filters = MatRef::new(values, c.out_channels, channels * taps);
    let ordered = crate::gemm::tap_major(filters, channels, taps);
    let cols = ordered.len() / c.out_channels;
    Some(PackedA::for_kernel(
        MatRef::new(&ordered, c.out_channels, cols),
        kernel,
    ))
}
