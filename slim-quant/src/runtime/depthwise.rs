//! Int8 depthwise convolutions: phase-split planes swept tap by tap with VNNI, AVX2 or portable code.

use super::*;

/// The output columns `[lo, hi)` whose input column `ox * stride + off` lies in `0..w`.
pub(super) fn valid_columns(off: isize, stride: usize, w: usize, ow: usize) -> (usize, usize) {
    let lo = if off < 0 { (-off) as usize } else { 0 }.div_ceil(stride);
    let hi =
        ((w as isize - off + stride as isize - 1) / stride as isize).clamp(0, ow as isize) as usize;
    (lo.min(ow), hi)
}

/// A depthwise convolution run by `sweeps`: small planes gathered from registers, or each
/// plane laid out by [`Phases`] (zero-padded and split by stride phase), so that every kernel
/// tap is one long sweep.
#[allow(clippy::too_many_arguments)]
pub(super) fn depthwise_by<T: Sink>(
    sweeps: &Sweeps,
    xq: &[i8],
    wq: &[i8],
    geo: &Geometry<'_>,
    n: usize,
    scales: &[f32],
    bias: Option<&[f32]>,
    to: &Requant,
) -> Vec<T> {
    let c = geo.spec;
    let (kh, kw) = (c.kernel[0], c.kernel[1]);
    let (h, w, oh, ow) = (geo.h, geo.w, geo.oh, geo.ow);
    let ch = geo.cin;
    let layout = Phases::new(h, w, kh, kw, c.stride, c.padding, c.dilation);
    // (a multiple of `SmallPlanes::planes`, which divides 16 / (oh * ow))
    let planes_per = (4096 / (oh * ow)).max(1);
    let avx2 = crate::gemm::Kernel::Avx2.available();
    let len = n * ch * oh * ow;
    let work = len * kh * kw;
    let per_task = oh * ow * planes_per;
    #[cfg(target_arch = "x86_64")]
    if matches!(sweeps, Sweeps::Small(_) | Sweeps::Windows(_)) {
        let tasks = (planes_per, work < SERIAL_DEPTHWISE);
        return gathered(sweeps, xq, (h, w, oh, ow, ch), tasks, scales, bias, to, len);
    }
    let mut out = vec![T::default(); len];
    for_each_chunk(
        &mut out,
        per_task,
        work < SERIAL_DEPTHWISE,
        |(task, dsts)| {
            let mut phases = vec![0i8; layout.len() + SWEEP_SLACK];
            #[cfg(target_arch = "x86_64")]
            if matches!(sweeps, Sweeps::Quads(_) | Sweeps::Pairs(_)) {
                let at = (task * planes_per, ch, h * w, oh, ow);
                swept(
                    sweeps,
                    &layout,
                    xq,
                    at,
                    dsts,
                    &mut phases,
                    (scales, bias),
                    to,
                );
                return;
            }
            let mut acc = vec![0i32; layout.span()];
            // The task's sums, plane after plane without the layout's gaps.
            let mut sums = vec![0i32; dsts.len()];
            for (j, plane_sums) in sums.chunks_exact_mut(oh * ow).enumerate() {
                let plane = task * planes_per + j;
                let ci = plane % ch;
                layout.fill(&xq[plane * h * w..(plane + 1) * h * w], &mut phases);
                let filt = &wq[ci * kh * kw..(ci + 1) * kh * kw];
                accumulate_taps(&mut acc, &phases, &layout, filt, avx2);
                for (oy, row) in plane_sums.chunks_exact_mut(ow).enumerate() {
                    copy_short(row, &acc[layout.row(oy)..][..ow]);
                }
            }
            // Finished in runs of consecutive channels (a run ends where a sample does).
            let mut j = 0;
            let planes = dsts.len() / (oh * ow);
            while j < planes {
                let ci = (task * planes_per + j) % ch;
                let run = (ch - ci).min(planes - j);
                let span = j * oh * ow..(j + run) * oh * ow;
                let block = Sums {
                    acc: &sums[span.clone()],
                    plane: oh * ow,
                    scales: &scales[ci..ci + run],
                    bias: bias.map(|b| &b[ci..ci + run]),
                };
                T::finish(&mut dsts[span], block, to);
                j += run;
            }
        },
    );
    out
}

/// Small planes gathered from registers (`Sweeps::Small`, `Sweeps::Windows`) and finished
/// there, `planes_per` planes a task (`serial`: on this thread), every output written once.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn gathered<T: Sink>(
    sweeps: &Sweeps,
    xq: &[i8],
    (h, w, oh, ow, ch): (usize, usize, usize, usize, usize),
    (planes_per, serial): (usize, bool),
    scales: &[f32],
    bias: Option<&[f32]>,
    to: &Requant,
    len: usize,
) -> Vec<T> {
    let per_task = oh * ow * planes_per;
    let (o, channels) = match sweeps {
        Sweeps::Small(sp) => (sp.o, sp.offsets.len()),
        Sweeps::Windows(wp) => (wp.o, wp.offsets.len()),
        _ => unreachable!("only register gathers come here"),
    };
    // (The kernels place each plane's outputs by the sweeps' own sizes.)
    assert!(
        o == oh * ow && channels == ch,
        "sweeps made for another layer"
    );
    // Gathered from registers and finished there, every output written through
    // `written`: the output is not zeroed first.
    let mut out: Vec<T> = unwritten(len);
    let written = Disjoint(out.as_mut_ptr());
    for_each_task(len.div_ceil(per_task), serial, |task| {
        let first = task * planes_per;
        let planes = (len - task * per_task).min(per_task) / (oh * ow);
        let x = &xq[first * h * w..(first + planes) * h * w];
        // SAFETY: `Sweeps::made` checked the machine; from `task * per_task` on lie the
        // outputs of the task's planes, which no other task writes (for small planes
        // whole units of them: `planes_per` and the layer's planes are multiples of the
        // unit's).
        unsafe {
            let out = T::output(written.add(task * per_task).0, to);
            match sweeps {
                Sweeps::Small(sp) => small_planes(sp, x, first, scales, bias, out),
                Sweeps::Windows(wp) => window_planes(wp, x, first, scales, bias, out),
                _ => unreachable!("only register gathers come here"),
            }
        };
    });
    // SAFETY: the tasks wrote every output of every plane (each block's lanes in its
    // mask, the blocks covering each plane).
    unsafe { out.set_len(len) };
    out
}

/// Planes laid out by `layout` and swept per kernel tap (`Sweeps::Quads`, `Sweeps::Pairs`),
/// from plane `first` on (of `ch` channels, `hw` positions, `oh` by `ow` outputs), each
/// plane's sums finished in registers (scale, bias, and the int8 grid for an int8 sink) and
/// written in rows of the phase's width, whose valid part is copied to `dsts`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn swept<T: Sink>(
    sweeps: &Sweeps,
    layout: &Phases,
    xq: &[i8],
    (first, ch, hw, oh, ow): (usize, usize, usize, usize, usize),
    dsts: &mut [T],
    phases: &mut [i8],
    (scales, bias): (&[f32], Option<&[f32]>),
    to: &Requant,
) {
    let mut wide = vec![T::default(); layout.span().next_multiple_of(16)];
    for (j, dst) in dsts.chunks_exact_mut(oh * ow).enumerate() {
        let plane = first + j;
        let ci = plane % ch;
        layout.fill(&xq[plane * hw..(plane + 1) * hw], phases);
        match sweeps {
            Sweeps::Quads(q) => {
                let per = q.starts.len();
                let finish = crate::gemm::Finish {
                    scales: &scales[ci..ci + 1],
                    bias: bias.map(|b| &b[ci..ci + 1]),
                    ld: 0,
                    out: T::output(wide.as_mut_ptr(), to),
                };
                // SAFETY: `Sweeps::made` checked the machine; `wide` holds
                // the sweep's whole blocks of 16, and every sweep lies inside the
                // phases and their slack (checked).
                unsafe {
                    dpbusd_sweep(
                        &finish,
                        wide.len(),
                        phases,
                        &q.starts,
                        &q.weights[ci * per..][..per],
                        q.offsets[ci],
                    )
                };
            }
            Sweeps::Pairs(p) => {
                let b = bias.map_or(0.0, |b| b[ci]);
                let to = T::sweep_out(&mut wide, scales[ci], b, to);
                let weights = &p.weights[ci * p.starts.len()..][..p.starts.len()];
                // SAFETY: the machine has AVX2; `wide` is whole blocks of 16, and
                // every sweep over them lies inside the phases and their slack.
                unsafe { madd_sweep(to, phases, &p.starts, weights) };
            }
            _ => unreachable!("only sweeps over phases come here"),
        }
        for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
            copy_short(row, &wide[layout.row(oy)..][..ow]);
        }
    }
}

/// The ways a depthwise layer can run.
pub(super) enum Sweeps {
    /// Planes of at most 64 values, gathered tap by tap from one register by byte permutes,
    /// four taps per multiply-add (AVX-512 VBMI and VNNI): no layout, no copies.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Small(SmallPlanes),
    /// Larger planes whose every block of outputs reads at most 128 consecutive input values,
    /// gathered from two registers by byte permutes, four taps per multiply-add (AVX-512 VBMI
    /// and VNNI): no layout, no copies.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Windows(WindowPlanes),
    /// Sweeps over [`Phases`] with four taps per multiply-add (AVX-512 VBMI and VNNI).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Quads(TapQuads),
    /// Sweeps over [`Phases`] with two taps per multiply-add (AVX2).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Pairs(TapPairs),
    /// One pass per tap over [`Phases`], on any machine.
    Plain,
}

impl Sweeps {
    /// Every way this machine runs the layer, fastest first (the last is [`Sweeps::Plain`]).
    #[cfg(test)]
    pub(super) fn available(geo: &Geometry<'_>, wq: &[i8]) -> Vec<Sweeps> {
        Sweeps::made(geo, wq, usize::MAX)
    }

    /// The fastest way this machine runs the layer.
    pub(super) fn fastest(geo: &Geometry<'_>, wq: &[i8]) -> Sweeps {
        Sweeps::made(geo, wq, 1).swap_remove(0)
    }

    /// The first `most` ways of [`Sweeps::available`] (at least one).
    pub(super) fn made(geo: &Geometry<'_>, wq: &[i8], most: usize) -> Vec<Sweeps> {
        let c = geo.spec;
        let (kh, kw) = (c.kernel[0], c.kernel[1]);
        let layout = Phases::new(geo.h, geo.w, kh, kw, c.stride, c.padding, c.dilation);
        let vnni = cfg!(target_arch = "x86_64") && vnni_sweeps_available();
        let avx2 = cfg!(target_arch = "x86_64") && crate::gemm::Kernel::Avx2.available();
        let mut all = Vec::new();
        if vnni {
            all.extend(SmallPlanes::new(geo, wq).map(Sweeps::Small));
        }
        if vnni && all.len() < most {
            all.extend(WindowPlanes::new(geo, wq, 16).map(Sweeps::Windows));
        }
        if vnni && all.len() < most {
            all.push(Sweeps::Quads(TapQuads::new(&layout, wq, kh * kw)));
        }
        if avx2 && all.len() < most {
            all.push(Sweeps::Pairs(TapPairs::new(&layout, wq, kh * kw)));
        }
        if all.len() < most {
            all.push(Sweeps::Plain);
        }
        all
    }
}

/// Per channel of a depthwise layer's weights `wq` (`taps` each), the share that inputs
/// flipped to unsigned bytes (`x + 128`) add to its sums: `128 * sum of the filter`.
pub(super) fn flip_offsets(wq: &[i8], taps: usize) -> Vec<i32> {
    wq.chunks_exact(taps)
        .map(|filt| 128 * filt.iter().map(|&v| i32::from(v)).sum::<i32>())
        .collect()
}

/// A depthwise layer whose input planes hold at most 64 values, as [`small_planes`] runs it:
/// in units of `planes` consecutive planes (channels of one sample), whose inputs fit one
/// 64-byte register, and blocks of 16 outputs. Where an output plane is smaller than 16 and
/// divides it, a unit is as many planes as fill one block; otherwise a unit is one plane.
pub(super) struct SmallPlanes {
    /// Values of an input plane and of an output plane.
    pub(super) m: usize,
    pub(super) o: usize,
    pub(super) planes: usize,
    pub(super) blocks: usize,
    /// Groups of four taps (taps `4g..4g + 4`, row-major).
    pub(super) groups: usize,
    /// Per block and group: for lane `j`, the places in the unit's input of its four taps'
    /// values (bytes `4j..4j + 4`), and which of them exist (not padding, not past the taps).
    pub(super) index: Vec<[u8; 64]>,
    pub(super) keep: Vec<u64>,
    /// Each lane's plane within the unit.
    pub(super) lane_plane: [u32; 16],
    /// Per group, then per channel: the group's four weights as bytes of one value.
    pub(super) weights: Vec<i32>,
    /// Per channel: `128 * sum of the filter`.
    pub(super) offsets: Vec<i32>,
}

impl SmallPlanes {
    /// The layout for `geo`, or `None` where an input plane or the kernel is too large.
    pub(super) fn new(geo: &Geometry<'_>, wq: &[i8]) -> Option<SmallPlanes> {
        let c = geo.spec;
        let (kh, kw) = (c.kernel[0], c.kernel[1]);
        let taps = kh * kw;
        let (m, o, ch) = (geo.h * geo.w, geo.oh * geo.ow, geo.cin);
        if m > 64 || taps > 64 || o == 0 || wq.len() != ch * taps {
            return None;
        }
        let fill = 16 / o.min(16);
        let planes = if o < 16 && 16 % o == 0 && ch % fill == 0 && fill * m <= 64 {
            fill
        } else {
            1
        };
        let blocks = if planes > 1 { 1 } else { o.div_ceil(16) };
        let groups = taps.div_ceil(4);
        let (mut index, mut keep) = (Vec::new(), Vec::new());
        for b in 0..blocks {
            for g in 0..groups {
                let (mut at, mut kept) = ([0u8; 64], 0u64);
                for j in 0..16 {
                    let (plane, q) = if planes > 1 {
                        (j / o, j % o)
                    } else {
                        (0, 16 * b + j)
                    };
                    for d in 0..4 {
                        let t = 4 * g + d;
                        if t >= taps || q >= o {
                            continue;
                        }
                        if let Some(p) = geo.tap_place(q, t) {
                            at[4 * j + d] = (plane * m + p) as u8;
                            kept |= 1 << (4 * j + d);
                        }
                    }
                }
                index.push(at);
                keep.push(kept);
            }
        }
        let lane_plane = std::array::from_fn(|j| if planes > 1 { (j / o) as u32 } else { 0 });
        let weights = group_weights(wq, taps, groups);
        let offsets = flip_offsets(wq, taps);
        Some(SmallPlanes {
            m,
            o,
            planes,
            blocks,
            groups,
            index,
            keep,
            lane_plane,
            weights,
            offsets,
        })
    }
}

/// Per group of four taps, then per channel of the weights `wq` (`taps` each): the group's
/// four weights as the bytes of one value (0 past the last tap).
pub(super) fn group_weights(wq: &[i8], taps: usize, groups: usize) -> Vec<i32> {
    (0..groups)
        .flat_map(|g| {
            wq.chunks_exact(taps).map(move |filt| {
                let mut bytes = [0u8; 4];
                for (d, b) in bytes.iter_mut().enumerate() {
                    *b = filt.get(4 * g + d).map_or(0, |&v| v as u8);
                }
                i32::from_le_bytes(bytes)
            })
        })
        .collect()
}

/// A depthwise layer run as [`window_planes`] runs it: each output plane in blocks of at
/// most 16 consecutive outputs, each block reading at most 128 consecutive values of its
/// input plane (its window). Blocks are runs of 16 outputs where every run's window fits;
/// otherwise whole output rows, as many as fit in 16 outputs (or a row in pieces of 16).
/// Layers where neither fits (large kernels or dilations on wide planes) run otherwise.
pub(super) struct WindowPlanes {
    pub(super) m: usize,
    pub(super) o: usize,
    /// Per block: its first output, its number of outputs and where its window starts.
    pub(super) blocks: Vec<[usize; 3]>,
    /// Per block: which bytes of the window's two halves lie in the plane.
    pub(super) loads: Vec<[u64; 2]>,
    pub(super) groups: usize,
    /// Per block and group: for lane `j`, the places in the block's window of its four
    /// taps' values (bytes `4j..4j + 4`), 128 (the flipped zero) where a tap is padding or
    /// missing, and which of them exist.
    pub(super) index: Vec<[u8; 64]>,
    pub(super) keep: Vec<u64>,
    /// Per group, then per channel: the group's four weights as bytes of one value.
    pub(super) weights: Vec<i32>,
    /// Per channel: `128 * sum of the filter`.
    pub(super) offsets: Vec<i32>,
}

impl WindowPlanes {
    /// Values a window holds.
    pub(super) const WINDOW: usize = 128;

    /// Block `b` of a plane (`plane`, `m` values): its window loaded into two registers
    /// (bytes past the plane's end masked off) and flipped to unsigned bytes (`x + 128`), and
    /// per group one two-register byte permute of each lane's four tap values (128, the
    /// flipped zero, where a tap is padding or missing), handed to `each` with its group.
    ///
    /// # Safety
    /// The machine has AVX-512 F, BW and VBMI. The slices are checked.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn gather(
        &self,
        plane: &[i8],
        b: usize,
        mut each: impl FnMut(usize, std::arch::x86_64::__m512i),
    ) {
        use std::arch::x86_64::*;
        let ([_, _, base], [lo, hi]) = (self.blocks[b], self.loads[b]);
        let p = plane[base..].as_ptr();
        // SAFETY: the masks cover the plane's bytes from `base` on and no further (masked-off
        // bytes are not read).
        let (lo, hi) = unsafe {
            (
                _mm512_maskz_loadu_epi8(lo, p),
                _mm512_maskz_loadu_epi8(hi, p.wrapping_add(64)),
            )
        };
        let flip = _mm512_set1_epi8(-128);
        let (lo, hi) = (_mm512_xor_si512(lo, flip), _mm512_xor_si512(hi, flip));
        for g in 0..self.groups {
            let at = b * self.groups + g;
            // SAFETY: each index holds 64 bytes.
            let idx = unsafe { _mm512_loadu_si512(self.index[at].as_ptr().cast()) };
            each(
                g,
                _mm512_mask2_permutex2var_epi8(lo, idx, self.keep[at], hi),
            );
        }
    }

    /// The layout for `geo`, or `None` where no choice of blocks keeps every window within
    /// 128 values. Blocks of `narrowest` to 16 outputs are tried, widest first (a depthwise
    /// layer takes only 16: narrower blocks lose to its sweeps over phases).
    pub(super) fn new(geo: &Geometry<'_>, wq: &[i8], narrowest: usize) -> Option<WindowPlanes> {
        let c = geo.spec;
        let (kh, kw) = (c.kernel[0], c.kernel[1]);
        let taps = kh * kw;
        let (m, o, ch) = (geo.h * geo.w, geo.oh * geo.ow, geo.cin);
        if taps > 64 || o == 0 || wq.len() != ch * taps {
            return None;
        }
        // A block's window start, if its places span fewer than 128 values.
        let window = |q0: usize, len: usize| {
            let places =
                (q0..q0 + len).flat_map(|q| (0..taps).filter_map(move |t| geo.tap_place(q, t)));
            let (lo, hi) = places.fold((usize::MAX, 0), |(lo, hi), p| (lo.min(p), hi.max(p)));
            match lo {
                usize::MAX => Some(0),
                _ => (hi - lo < Self::WINDOW).then_some(lo),
            }
        };
        let runs: Vec<(usize, usize)> = (0..o).step_by(16).map(|q| (q, (o - q).min(16))).collect();
        // Whole rows, as many as fit in a block, or rows in pieces of `piece`.
        let rows = |piece: usize| -> Vec<(usize, usize)> {
            if geo.ow <= piece {
                let per = piece / geo.ow;
                (0..geo.oh)
                    .step_by(per)
                    .map(|y| (y * geo.ow, (geo.oh - y).min(per) * geo.ow))
                    .collect()
            } else {
                (0..geo.oh)
                    .flat_map(|y| {
                        (0..geo.ow)
                            .step_by(piece)
                            .map(move |x| (y * geo.ow + x, (geo.ow - x).min(piece)))
                    })
                    .collect()
            }
        };
        let layouts = std::iter::once(runs).chain((narrowest.clamp(1, 16)..=16).rev().map(rows));
        let blocks: Vec<[usize; 3]> = layouts.into_iter().find_map(|layout| {
            layout
                .into_iter()
                .map(|(q0, len)| window(q0, len).map(|base| [q0, len, base]))
                .collect::<Option<Vec<_>>>()
        })?;
        let groups = taps.div_ceil(4);
        let (mut index, mut keep) = (Vec::new(), Vec::new());
        for &[q0, len, base] in &blocks {
            for g in 0..groups {
                let (mut at, mut kept) = ([128u8; 64], 0u64);
                for j in 0..len {
                    for d in 0..4 {
                        let t = 4 * g + d;
                        if let Some(p) = (t < taps).then(|| geo.tap_place(q0 + j, t)).flatten() {
                            at[4 * j + d] = (p - base) as u8;
                            kept |= 1 << (4 * j + d);
                        }
                    }
                }
                index.push(at);
                keep.push(kept);
            }
        }
        let loads = blocks
            .iter()
            .map(|&[_, _, base]| {
                let n = (m - base).min(Self::WINDOW);
                let bits = |k: usize| if k >= 64 { u64::MAX } else { (1u64 << k) - 1 };
                [bits(n.min(64)), bits(n.saturating_sub(64))]
            })
            .collect();
        Some(WindowPlanes {
            m,
            o,
            blocks,
            loads,
            groups,
            index,
            keep,
            weights: group_weights(wq, taps, groups),
            offsets: flip_offsets(wq, taps),
        })
    }
}

/// Planes of [`WindowPlanes`]: their input `x` (whole planes), from plane `first` of the
/// layer's input on, to their outputs at `out` (`o` values a plane), finished as the runtime
/// finishes. For each block, its window is loaded into two registers (bytes past the plane's
/// end masked off) and flipped to unsigned bytes (`x + 128`); per group, one two-register
/// byte permute gathers each lane's four tap values (128, the flipped zero, where a tap is
/// padding or missing) and `vpdpbusd` adds their products to the lane's sum, which starts at
/// `-128 * sum of the filter`.
///
/// # Safety
/// The machine has AVX-512 F, BW, VL, VBMI and VNNI; `out` is valid for writes of the
/// planes' outputs that nothing else reads or writes meanwhile. The slices are checked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
pub(super) unsafe fn window_planes(
    wp: &WindowPlanes,
    x: &[i8],
    first: usize,
    scales: &[f32],
    bias: Option<&[f32]>,
    out: crate::gemm::Output,
) {
    use std::arch::x86_64::*;
    let ch = wp.offsets.len();
    assert!(
        x.len().is_multiple_of(wp.m)
            && scales.len() >= ch
            && bias.is_none_or(|b| b.len() >= ch)
            && wp.groups <= 16
            && wp.blocks.iter().all(|&[_, _, base]| base < wp.m),
        "planes of windows out of bounds"
    );
    // SAFETY: the machine has AVX-512 F (as the caller promises).
    let place = unsafe { crate::gemm::vnni::Lanes::new(out) };
    let mut weights = [_mm512_setzero_si512(); 16];
    for (u, xu) in x.chunks_exact(wp.m).enumerate() {
        let ci = (first + u) % ch;
        for (g, w) in weights.iter_mut().take(wp.groups).enumerate() {
            *w = _mm512_set1_epi32(wp.weights[g * ch + ci]);
        }
        let start = _mm512_set1_epi32(-wp.offsets[ci]);
        let scale = _mm512_set1_ps(scales[ci]);
        let bias = _mm512_set1_ps(bias.map_or(0.0, |b| b[ci]));
        for (b, &[q0, len, _]) in wp.blocks.iter().enumerate() {
            let mut acc = start;
            // SAFETY: the machine has AVX-512 F, BW and VBMI (as the caller promises).
            unsafe { wp.gather(xu, b, |g, v| acc = _mm512_dpbusd_epi32(acc, v, weights[g])) };
            let mask = (u32::MAX >> (32 - len)) as u16;
            // SAFETY: the plane's outputs `q0..q0 + len` are the caller's to write.
            unsafe {
                crate::gemm::vnni::finish_lanes(&place, u * wp.o + q0, mask, acc, scale, bias)
            };
        }
    }
}

/// A convolution of one input channel (a network's first layer on grey images) run as
/// [`window_planes`] runs a depthwise layer, with `wp` made for as many "channels" as the
/// layer has filters: per sample and block of outputs, the window is loaded and each group's
/// four taps gathered once, and every filter's sums are then that many multiply-adds and a
/// finish. No columns are written out or packed. Writes filters `filters` of sample `sample`
/// (the outputs `(sample * oc + o) * wp.o..` from `out`'s place on, `oc` the layer's filters).
///
/// # Safety
/// The machine has AVX-512 F, BW, VL, VBMI and VNNI; `out` is valid for writes of those
/// outputs, which nothing else reads or writes meanwhile. The slices are checked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
pub(super) unsafe fn fan_out_windows(
    wp: &WindowPlanes,
    x: &[i8],
    (sample, filters): (usize, std::ops::Range<usize>),
    scales: &[f32],
    bias: Option<&[f32]>,
    out: crate::gemm::Output,
) {
    use std::arch::x86_64::*;
    let oc = wp.offsets.len();
    assert!(
        x.len() >= (sample + 1) * wp.m
            && filters.end <= oc
            && scales.len() >= oc
            && bias.is_none_or(|b| b.len() >= oc)
            && wp.groups <= 16
            && wp.blocks.iter().all(|&[_, _, base]| base < wp.m),
        "fanned-out windows out of bounds"
    );
    let xu = &x[sample * wp.m..(sample + 1) * wp.m];
    // SAFETY: the machine has AVX-512 F (as the caller promises).
    let place = unsafe { crate::gemm::vnni::Lanes::new(out) };
    let mut taps = [_mm512_setzero_si512(); 16];
    for (b, &[q0, len, _]) in wp.blocks.iter().enumerate() {
        // SAFETY: the machine has AVX-512 F, BW and VBMI (as the caller promises).
        unsafe { wp.gather(xu, b, |g, v| taps[g] = v) };
        let mask = (u32::MAX >> (32 - len)) as u16;
        for o in filters.clone() {
            let mut acc = _mm512_set1_epi32(-wp.offsets[o]);
            for (g, &v) in taps.iter().take(wp.groups).enumerate() {
                acc = _mm512_dpbusd_epi32(acc, v, _mm512_set1_epi32(wp.weights[g * oc + o]));
            }
            let scale = _mm512_set1_ps(scales[o]);
            let bias = _mm512_set1_ps(bias.map_or(0.0, |b| b[o]));
            let at = (sample * oc + o) * wp.o + q0;
            // SAFETY: filter `o`'s outputs `q0..q0 + len` of this sample are the caller's to
            // write.
            unsafe { crate::gemm::vnni::finish_lanes(&place, at, mask, acc, scale, bias) };
        }
    }
}

/// Units of [`SmallPlanes`]: their input `x` (whole units), from plane `first` of the layer's
/// input on, to their outputs at `out` (`planes * o` values a unit), finished as the runtime
/// finishes (`sum * scale + bias` per channel, then the int8 grid for an int8 output). A
/// unit's input is loaded once into a register and flipped to unsigned bytes (`x + 128`);
/// per block and group, one byte permute gathers each lane's four tap values (128, the
/// flipped zero, where a tap is padding or missing) and `vpdpbusd` adds their products with
/// the lane's channel's weights to its 32-bit sum, exactly. The sums start at `-128 * sum of
/// the filter`, which takes the flip's share back off.
///
/// # Safety
/// The machine has AVX-512 F, BW, VL, VBMI and VNNI; `out` is valid for writes of the units'
/// outputs that nothing else reads or writes meanwhile. The slices are checked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
pub(super) unsafe fn small_planes(
    sp: &SmallPlanes,
    x: &[i8],
    first: usize,
    scales: &[f32],
    bias: Option<&[f32]>,
    out: crate::gemm::Output,
) {
    use std::arch::x86_64::*;
    let (p, ch, unit) = (sp.planes, sp.offsets.len(), sp.planes * sp.m);
    assert!(
        unit <= 64
            && x.len().is_multiple_of(unit)
            && first.is_multiple_of(p)
            && ch.is_multiple_of(p)
            && scales.len() >= ch
            && bias.is_none_or(|b| b.len() >= ch)
            && sp.groups <= 16,
        "units of small planes out of bounds"
    );
    let flip = _mm512_set1_epi8(-128);
    // SAFETY: the machine has AVX-512 F (as the caller promises).
    let place = unsafe { crate::gemm::vnni::Lanes::new(out) };
    let bytes = if unit == 64 {
        u64::MAX
    } else {
        (1u64 << unit) - 1
    };
    let lanes = ((1u32 << p) - 1) as u16;
    // SAFETY: `lane_plane` holds 16 values.
    let rep = unsafe { _mm512_loadu_si512(sp.lane_plane.as_ptr().cast()) };
    // The values of channels `c0..c0 + p` spread over their lanes (`c0 + p <= ch`).
    let spread = |v: &[i32], c0: usize| {
        if p == 1 {
            _mm512_set1_epi32(v[c0])
        } else {
            // SAFETY: the mask covers `v[c0..c0 + p]`.
            let part = unsafe { _mm512_maskz_loadu_epi32(lanes, v[c0..c0 + p].as_ptr()) };
            _mm512_permutexvar_epi32(rep, part)
        }
    };
    let spread_f = |v: &[f32], c0: usize| {
        if p == 1 {
            _mm512_set1_ps(v[c0])
        } else {
            // SAFETY: the mask covers `v[c0..c0 + p]`.
            let part = unsafe { _mm512_maskz_loadu_ps(lanes, v[c0..c0 + p].as_ptr()) };
            _mm512_permutexvar_ps(rep, part)
        }
    };
    let mut weights = [_mm512_setzero_si512(); 16];
    for (u, xu) in x.chunks_exact(unit).enumerate() {
        // Channels `c0..c0 + p`, in one sample (`first` and `ch` are multiples of `p`).
        let c0 = (first + u * p) % ch;
        // SAFETY: the mask covers `xu`'s bytes.
        let window = _mm512_xor_si512(unsafe { _mm512_maskz_loadu_epi8(bytes, xu.as_ptr()) }, flip);
        for (g, w) in weights.iter_mut().take(sp.groups).enumerate() {
            *w = spread(&sp.weights[g * ch..(g + 1) * ch], c0);
        }
        let start = _mm512_sub_epi32(_mm512_setzero_si512(), spread(&sp.offsets, c0));
        let scale = spread_f(scales, c0);
        let bias = bias.map_or(_mm512_setzero_ps(), |b| spread_f(b, c0));
        for b in 0..sp.blocks {
            let mut acc = start;
            for (g, &w) in weights.iter().take(sp.groups).enumerate() {
                let at = b * sp.groups + g;
                // SAFETY: each index holds 64 bytes.
                let idx = unsafe { _mm512_loadu_si512(sp.index[at].as_ptr().cast()) };
                let v = _mm512_mask_permutexvar_epi8(flip, sp.keep[at], idx, window);
                acc = _mm512_dpbusd_epi32(acc, v, w);
            }
            let valid = (p * sp.o - 16 * b).min(16);
            let mask = (u32::MAX >> (32 - valid)) as u16;
            let at = u * p * sp.o + 16 * b;
            // SAFETY: the unit's outputs `16 b..16 b + valid` are the caller's to write.
            unsafe { crate::gemm::vnni::finish_lanes(&place, at, mask, acc, scale, bias) };
        }
    }
}

/// Whether this machine runs [`dpbusd_sweep`]: AVX-512 F, BW, VL, VBMI (byte permutes) and VNNI.
pub(super) fn vnni_sweeps_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        crate::gemm::Kernel::Avx512Vnni.available() && has!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A depthwise layer's taps as [`dpbusd_sweep`] takes them: taps whose sweeps start less
/// than four values apart share a group (for a stride-1 3x3 kernel, each kernel row is one
/// group; with stride 2, the even and odd columns of a row are two), whose sweep starts at
/// its first tap. For every channel, each group's weights in one 32-bit value, byte `d` the
/// weight of the tap that starts `d` values after the group (0 where there is none), and the
/// offset `128 * sum of the filter` that the sweep's unsigned inputs add.
pub(super) struct TapQuads {
    pub(super) starts: Vec<usize>,
    pub(super) weights: Vec<i32>,
    pub(super) offsets: Vec<i32>,
}

impl TapQuads {
    pub(super) fn new(layout: &Phases, wq: &[i8], taps: usize) -> TapQuads {
        let mut order: Vec<usize> = (0..taps).collect();
        order.sort_by_key(|&t| layout.tap(t));
        // Per group: where it starts, and its taps with their byte in the lane.
        let mut groups: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
        for t in order {
            let at = layout.tap(t);
            match groups.last_mut() {
                Some((start, members)) if at < *start + 4 => members.push((t, at - *start)),
                _ => groups.push((at, vec![(t, 0)])),
            }
        }
        let weights = wq
            .chunks_exact(taps)
            .flat_map(|filt| {
                groups.iter().map(move |(_, members)| {
                    let mut bytes = [0u8; 4];
                    for &(t, d) in members {
                        bytes[d] = filt[t] as u8;
                    }
                    i32::from_le_bytes(bytes)
                })
            })
            .collect();
        let offsets = flip_offsets(wq, taps);
        TapQuads {
            starts: groups.into_iter().map(|(start, _)| start).collect(),
            weights,
            offsets,
        }
    }
}

/// `sum over taps t of filt[t] * phases[start(t)..][..span]` in blocks of 16 outputs, with
/// AVX-512 VNNI, finished in registers as `finish` says (its row 0, columns from 0).
/// For each group of [`TapQuads`], one load of 32 values from the group's start, flipped to
/// unsigned bytes (`x + 128`), and one byte permute that gives lane `j` values `j..j + 4`;
/// `vpdpbusd` multiplies them with the group's four weights and adds the four products to
/// the lane's 32-bit sum, exactly. The sums start at `-offset`, which takes the flip's share,
/// `128 * sum of the filter`, back off.
///
/// # Safety
/// The machine has AVX-512 F, BW, VL, VBMI and VNNI; `finish` may write `span` values (a
/// multiple of 16) of its row 0; `weights` has one value per start, and every sweep, with 16
/// values more, lies inside `phases` (checked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
pub(super) unsafe fn dpbusd_sweep(
    finish: &crate::gemm::Finish<'_>,
    span: usize,
    phases: &[i8],
    starts: &[usize],
    weights: &[i32],
    offset: i32,
) {
    use std::arch::x86_64::*;
    assert!(
        span.is_multiple_of(16)
            && weights.len() == starts.len()
            && starts.iter().all(|&a| a + span + 16 <= phases.len()),
        "sweeps out of the phases"
    );
    let base = phases.as_ptr();
    let lanes: [u8; 64] = std::array::from_fn(|b| (b / 4 + b % 4) as u8);
    // SAFETY: `lanes` has 64 bytes.
    let gather = unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
    let flip = _mm256_set1_epi8(-128);
    // SAFETY: the machine has AVX-512 F (as the caller promises).
    let place = unsafe { crate::gemm::vnni::Lanes::new(finish.out) };
    for i in (0..span).step_by(16) {
        let mut acc = _mm512_set1_epi32(-offset);
        for (&a, &w) in starts.iter().zip(weights) {
            // SAFETY: a + i + 32 <= a + span + 16 <= phases.len().
            let v = unsafe { _mm256_loadu_si256(base.add(a + i).cast()) };
            let x =
                _mm512_permutexvar_epi8(gather, _mm512_castsi256_si512(_mm256_xor_si256(v, flip)));
            acc = _mm512_dpbusd_epi32(acc, x, _mm512_set1_epi32(w));
        }
        // SAFETY: the caller promises row 0's values up to `span`.
        unsafe { crate::gemm::vnni::finish_row(finish, &place, 0, i, 0xffff, acc) };
    }
}

/// A depthwise layer's taps as [`madd_sweep`] takes them: pairs of taps (where their sweeps
/// start in the phases; an odd last tap pairs with itself at a zero weight), and for every
/// channel each pair's two weights in one 32-bit value, the first tap's in the low half.
pub(super) struct TapPairs {
    pub(super) starts: Vec<(usize, usize)>,
    pub(super) weights: Vec<i32>,
}

impl TapPairs {
    pub(super) fn new(layout: &Phases, wq: &[i8], taps: usize) -> TapPairs {
        let pairs = taps.div_ceil(2);
        let second = |j: usize| (2 * j + 1).min(taps - 1);
        let starts = (0..pairs)
            .map(|j| (layout.tap(2 * j), layout.tap(second(j))))
            .collect();
        let weights = wq
            .chunks_exact(taps)
            .flat_map(|filt| {
                (0..pairs).map(move |j| {
                    let w1 = if 2 * j + 1 < taps { filt[2 * j + 1] } else { 0 };
                    ((u32::from(i16::from(w1) as u16) << 16)
                        | u32::from(i16::from(filt[2 * j]) as u16)) as i32
                })
            })
            .collect();
        TapPairs { starts, weights }
    }
}

/// Slack after a plane's phases, so that the sweeps may run whole blocks of 16 past the last
/// output (the extra sums are never read) and [`dpbusd_sweep`] load 32 values for each.
pub(super) const SWEEP_SLACK: usize = 32;

/// Where [`madd_sweep`] writes a plane's outputs, in rows of the phase's width (a multiple of
/// 16 values): the int32 sums, or the finished values, `sum * scale + bias` in f32 or that
/// value rounded to an int8 grid (`[lo, hi, 1 / scale]`), computed as [`Sink::finish`]
/// computes them.
pub(super) enum SweepOut<'a> {
    #[cfg_attr(not(test), allow(dead_code))]
    Sums(&'a mut [i32]),
    F32(&'a mut [f32], f32, f32),
    I8(&'a mut [i8], f32, f32, [f32; 3]),
}

impl SweepOut<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            SweepOut::Sums(a) => a.len(),
            SweepOut::F32(a, ..) => a.len(),
            SweepOut::I8(a, ..) => a.len(),
        }
    }
}

/// `sum over taps t of filt[t] * phases[start(t)..][..]` in blocks of 16 outputs, with AVX2:
/// every tap's share of a block is summed in registers, two taps per multiply-add, and the
/// block is written as `out` asks (finished in registers where it asks for finished values).
/// Each pair's values are widened to 16 bits and interleaved, and `vpmaddwd` multiplies them
/// by the pair's weights and adds the two products into each 32-bit lane (no saturation: two
/// products of int8 values are at most 2 * 128 * 128). A block's lanes come out as outputs
/// 0-3 and 8-11 in one register and 4-7 and 12-15 in the other, and are put in order on the
/// way out.
///
/// # Safety
/// The machine has AVX2; `out`'s length is a multiple of 16, `weights` has one value per
/// pair, and every pair's sweeps lie inside `phases` (checked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn madd_sweep(
    mut out: SweepOut<'_>,
    phases: &[i8],
    starts: &[(usize, usize)],
    weights: &[i32],
) {
    use std::arch::x86_64::*;
    let span = out.len();
    assert!(
        span.is_multiple_of(16)
            && weights.len() == starts.len()
            && starts.iter().all(|&(a, b)| a.max(b) + span <= phases.len()),
        "sweeps out of the phases"
    );
    let base = phases.as_ptr();
    // `sum * scale + bias` for a register of sums (a multiply, then an add: no fused
    // multiply-add, so that the result is the scalar finish's bit for bit).
    let affine = |s: __m256i, scale: f32, bias: f32| {
        _mm256_add_ps(
            _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scale)),
            _mm256_set1_ps(bias),
        )
    };
    // As `round_to_grid`: max(y, lo) is lo for NaN (the second operand), then min, times
    // 1 / scale, plus 1/2 less an ulp with q's sign, clamped to ±127, truncated.
    let grid = |y: __m256, [lo, hi, inv]: [f32; 3]| {
        let q = _mm256_mul_ps(
            _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(lo)), _mm256_set1_ps(hi)),
            _mm256_set1_ps(inv),
        );
        let sign = _mm256_and_ps(q, _mm256_set1_ps(-0.0));
        let half = _mm256_or_ps(sign, _mm256_set1_ps(HALF_DOWN));
        let v = _mm256_min_ps(
            _mm256_max_ps(_mm256_add_ps(q, half), _mm256_set1_ps(-127.0)),
            _mm256_set1_ps(127.0),
        );
        _mm256_cvttps_epi32(v)
    };
    for i in (0..span).step_by(16) {
        // SAFETY (block): every load reads 16 values from a start + i, i + 16 <= span, and
        // every store writes 16 values from i.
        unsafe {
            let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (&(a, b), &w) in starts.iter().zip(weights) {
                let w = _mm256_set1_epi32(w);
                let va = _mm256_cvtepi8_epi16(_mm_loadu_si128(base.add(a + i).cast()));
                let vb = _mm256_cvtepi8_epi16(_mm_loadu_si128(base.add(b + i).cast()));
                lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_unpacklo_epi16(va, vb), w));
                hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_unpackhi_epi16(va, vb), w));
            }
            match &mut out {
                SweepOut::Sums(acc) => {
                    let dst = acc.as_mut_ptr().add(i);
                    _mm256_storeu_si256(dst.cast(), _mm256_permute2x128_si256::<0x20>(lo, hi));
                    _mm256_storeu_si256(
                        dst.add(8).cast(),
                        _mm256_permute2x128_si256::<0x31>(lo, hi),
                    );
                }
                SweepOut::F32(y, scale, bias) => {
                    let (a, b) = (affine(lo, *scale, *bias), affine(hi, *scale, *bias));
                    let dst = y.as_mut_ptr().add(i);
                    _mm256_storeu_ps(dst, _mm256_permute2f128_ps::<0x20>(a, b));
                    _mm256_storeu_ps(dst.add(8), _mm256_permute2f128_ps::<0x31>(a, b));
                }
                SweepOut::I8(q, scale, bias, bounds) => {
                    let a = grid(affine(lo, *scale, *bias), *bounds);
                    let b = grid(affine(hi, *scale, *bias), *bounds);
                    // Packing pairs lane by lane puts the outputs in order: 0-3 with 4-7, 8-11
                    // with 12-15 (as 16-bit values), then the low 8 bytes of each lane.
                    let words = _mm256_packs_epi32(a, b);
                    let bytes =
                        _mm256_permute4x64_epi64::<0b1000>(_mm256_packs_epi16(words, words));
                    _mm_storeu_si128(q.as_mut_ptr().add(i).cast(), _mm256_castsi256_si128(bytes));
                }
            }
        }
    }
}

/// `acc = sum over taps t of filt[t] * phases[tap(t)..][..acc.len()]`, one pass per tap:
/// compiled for AVX2 where the machine has it (the portable build vectorizes it with SSE2
/// only, which has no 32-bit multiply), plainly elsewhere.
pub(super) fn accumulate_taps(
    acc: &mut [i32],
    phases: &[i8],
    layout: &Phases,
    filt: &[i8],
    avx2: bool,
) {
    #[inline(always)]
    fn sweep(acc: &mut [i32], phases: &[i8], layout: &Phases, filt: &[i8]) {
        acc.iter_mut().for_each(|a| *a = 0);
        let span = acc.len();
        for (t, &f) in filt.iter().enumerate() {
            // Products of two int8 values fit in int16 (at most 127 * 128).
            let wv = i16::from(f);
            let at = layout.tap(t);
            for (a, &v) in acc.iter_mut().zip(&phases[at..at + span]) {
                *a += i32::from(i16::from(v) * wv);
            }
        }
    }
    slim_core::with_target_feature!(
        "avx2",
        avx2,
        sweep(acc: &mut [i32], phases: &[i8], layout: &Phases, filt: &[i8])
    )
}
