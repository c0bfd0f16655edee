//! Depthwise convolutions: phase-split planes swept tap by tap, f32 forward and backward.

use super::*;

/// A convolution input plane laid out for whole-plane sweeps: zero-padded, and split by
/// stride phase (the rows `y` and columns `x` of the padded plane with one `y % stride` and
/// one `x % stride` side by side). Every kernel tap then reads one phase from one offset, and
/// one long sweep over the phase computes that tap's share of every output at once (output
/// rows as wide as the phase's rows; the extra columns are dropped at the end). On the small
/// planes of small networks (7x7, 14x14) a sweep per output row cost more in loop overhead
/// than in arithmetic. Depthwise convolutions, f32 and int8, run this way.
#[derive(Clone, Debug)]
pub struct Phases {
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    /// Rows and columns of one phase.
    pub(super) ph: usize,
    pub(super) pw: usize,
    /// Output rows and columns.
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// Per kernel tap (row-major): where its sweep starts in the phases.
    pub(super) taps: Vec<usize>,
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
    pub(super) fn rows2(&self, mut f: impl FnMut(usize, usize, usize)) {
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
    pub(super) fn runs(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
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
pub(super) fn two_rows<T>(buf: &mut [T], a: usize, b: usize, w: usize) -> (&mut [T], &mut [T]) {
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
pub(super) fn sweep_taps_f32(
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
pub(super) struct DepthwiseRows {
    pub(super) g: Geom,
    /// Per block and kernel column: which of the 32 values from the block's first input
    /// column of that tap lie inside the row (the first 16 only, at stride 1).
    pub(super) masks: Vec<u32>,
    /// For a layer whose output plane has the input's size at stride 1, the plane as one
    /// flat row instead ([`FlatTaps`]).
    pub(super) flat: Option<FlatTaps>,
}

/// A depthwise layer computed over its flattened output plane: output `i` (of `oh * ow`)
/// reads its tap `t` at `i + offsets[t]` of a plane laid out with rows of `ow` values, so
/// blocks of 16 outputs run across row ends and no lane is spent on a row's tail (a 7x7
/// plane is 49 outputs in 4 registers, not 7 rows of 16). At stride 1 with the output the
/// input's size, that plane is the input itself; at stride 2, the input split into its four
/// phases (even and odd rows by even and odd columns, each `oh * ow`, one after the other),
/// where a tap's inputs are again `ow` apart. The inputs a tap must not read (in the padding,
/// or across a row's end) are masked.
pub(super) struct FlatTaps {
    /// Per tap, the offset from an output's position to its input's in the layout.
    pub(super) offsets: Vec<isize>,
    /// Per tap and block of 16 outputs (`masks[t * blocks + v]`): which outputs of the
    /// block have that tap's input inside the input plane.
    pub(super) masks: Vec<u16>,
    /// At stride 2, how the input is split into the phases ([`FlatTaps::split`]); `None` at
    /// stride 1.
    pub(super) split: Option<Vec<SplitChunk>>,
}

/// 16 columns of the four phases from `c0` (`from` 32 of an input row from column `2 * c0`):
/// the mask of the input row's values, and of the even and odd columns kept.
#[derive(Clone, Copy)]
pub(super) struct SplitChunk {
    pub(super) c0: usize,
    pub(super) from: u32,
    pub(super) even: u16,
    pub(super) odd: u16,
}

impl FlatTaps {
    /// The taps of `g`, or `None` unless it is stride 1 with the output the input's size, or
    /// stride 2 with every input a tap reads inside its phase's `oh * ow` values.
    pub(super) fn new(g: &Geom) -> Option<FlatTaps> {
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
    pub(super) fn split(g: &Geom) -> Vec<SplitChunk> {
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
    pub(super) fn new(g: &Geom) -> Option<DepthwiseRows> {
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
    pub(super) fn cached(g: &Geom) -> Option<Arc<DepthwiseRows>> {
        static KEPT: Memo<Geom, Option<Arc<DepthwiseRows>>> = Memo::new();
        let key = Geom { n: 0, c: 0, ..*g };
        KEPT.get(key, || DepthwiseRows::new(&key).map(Arc::new))
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod depthwise_avx512 {
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
pub(super) mod depthwise_avx2 {
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
pub(super) const DOT_LANES: usize = 8;

/// For each tap t: `lanes[t * DOT_LANES..][..DOT_LANES] += ` the products
/// `phases[taps[t] + i] * wide[i]` over `i` in the span, `i` spread over the tap's lanes (the
/// caller sums each tap's lanes once, at the end). With AVX2 and FMA the taps go in groups of
/// up to 9 whose sums stay in registers over one sweep of the span, so `wide` is read once per
/// group and no product is stored.
pub(super) fn tap_dots_f32(
    lanes: &mut [f32],
    phases: &[f32],
    taps: &[usize],
    wide: &[f32],
    fast: bool,
) {
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
pub(super) fn has_avx2_fma() -> bool {
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
pub(super) struct Depthwise(pub(super) Geom);
/// The gradients of [`Depthwise`], `(x, w, grad_y)` to one flat tensor: `dx`, then `dw`.
pub(super) struct DepthwiseGrad(pub(super) Geom);

/// The forward of a depthwise convolution, `act(w[c] ⋆ x[n, c] + b[c])` for every plane, in
/// parallel over blocks of planes.
pub(super) fn depthwise_forward(
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
pub(super) fn has_avx512f() -> bool {
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
pub(super) fn depthwise_forward_by(
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
pub(super) fn depthwise_grads(
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
