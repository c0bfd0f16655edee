//! The int8 matrix product of the runtime: `C (m x n, i32) = A (m x k, i8) * B (k x n, i8)`,
//! with 32-bit accumulation.
//!
//! `A` holds filters (one row per output channel) and `B` input columns (for a convolution,
//! one row per kernel tap and channel, one column per output position; for a 1x1 convolution,
//! the input itself). The kernel is chosen at run time ([`Kernel::best`]):
//!
//! - AVX-512 VNNI: `B` packed in panels of 16 columns, four consecutive rows per int32 lane as
//!   unsigned bytes (`x + 128`); an 8x16 tile of `C` per `vpdpbusd`, which multiplies four
//!   u8 x i8 pairs and adds them to int32 with no intermediate rounding or saturation; the
//!   offset's share, `128 * sum(filter)`, is subtracted at the end.
//! - AVX2: where no activation is negative (every layer after a ReLU), `B` packed
//!   as for VNNI but not offset, and a 4x16 tile per `vpmaddubsw` (u8 x i8 pairs summed into
//!   int16, exact for values up to 127, where full-range unsigned bytes would saturate) and
//!   `vpmaddwd` by ones, finished in registers; otherwise `B` packed as interleaved int16
//!   pairs and a 6x16 tile per `vpmaddwd`, exact for every int8 input.
//! - Elsewhere a portable loop computes the same integers.

use std::mem::MaybeUninit;
use std::sync::Arc;

use slim_core::kernels::Memo;

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

/// The instruction set a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, on any machine.
    Portable,
    /// x86-64 AVX2: int16 pair products (`vpmaddwd`).
    Avx2,
    /// x86-64 AVX-512 with VNNI: four int8 products per int32 lane (`vpdpbusd`), on
    /// activations offset by 128 to unsigned bytes, with the offset's contribution
    /// (`128 * sum of the filter`) taken off after.
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this machine runs (detected once).
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            Kernel::all()
                .into_iter()
                .rev()
                .find(|k| k.available())
                .unwrap_or(Kernel::Portable)
        })
    }

    fn all() -> [Kernel; 3] {
        [Kernel::Portable, Kernel::Avx2, Kernel::Avx512Vnni]
    }

    /// Whether this machine can run the kernel, and `SLIM_CPU` ([`slim_core::cpu`]) allows it.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use slim_core::cpu::{allows, Level};
            use std::arch::is_x86_feature_detected as has;
            match self {
                Kernel::Portable => true,
                Kernel::Avx2 => allows(Level::Avx2) && has!("avx2"),
                Kernel::Avx512Vnni => {
                    allows(Level::Vnni)
                        && has!("avx512f")
                        && has!("avx512bw")
                        && has!("avx512vl")
                        && has!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernel::Portable
        }
    }

    /// Every kernel this machine can run.
    pub fn available_kernels() -> Vec<Kernel> {
        Kernel::all()
            .into_iter()
            .filter(|k| k.available())
            .collect()
    }
}

/// The left operand (filters) prepared once for many products, in the layout its kernel
/// broadcasts from: int32 words of two int16 values and of four int8 values (AVX2, for its
/// two products), of four int8 values with each row's sum (AVX-512 VNNI), or the plain rows.
#[derive(Clone, Debug)]
pub struct PackedA {
    kernel: Kernel,
    rows: usize,
    cols: usize,
    data: Vec<i8>,
    words: Vec<i32>,
    sums: Vec<i32>,
    /// AVX2's words of four int8 values, `cols / 4` rounded up per row.
    quads: Vec<i32>,
}

impl PackedA {
    /// Packs for the fastest kernel of this machine.
    pub fn new(a: MatRef<'_>) -> PackedA {
        PackedA::for_kernel(a, Kernel::best())
    }

    /// Packs for a given kernel (which must be available).
    pub fn for_kernel(a: MatRef<'_>, kernel: Kernel) -> PackedA {
        a.check();
        assert!(
            kernel.available(),
            "{kernel:?} is not available on this machine"
        );
        let (mut data, mut words, mut sums, mut quads) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        match kernel {
            Kernel::Portable => {
                data.reserve(a.rows * a.cols);
                for i in 0..a.rows {
                    data.extend_from_slice(a.row(i));
                }
            }
            Kernel::Avx2 => {
                let pairs = a.cols.div_ceil(2);
                words = vec![0i32; a.rows * pairs];
                // Two int16 values in one word: the first in the low half, as in memory.
                let word = |lo: i8, hi: i8| {
                    (u32::from(i16::from(lo) as u16) | (u32::from(i16::from(hi) as u16) << 16))
                        as i32
                };
                for i in 0..a.rows {
                    let (r, dst) = (a.row(i), &mut words[i * pairs..(i + 1) * pairs]);
                    for (w, pair) in dst.iter_mut().zip(r.chunks_exact(2)) {
                        *w = word(pair[0], pair[1]);
                    }
                    if a.cols % 2 == 1 {
                        dst[pairs - 1] = word(r[a.cols - 1], 0);
                    }
                }
                quads = quad_words(a).0;
            }
            Kernel::Avx512Vnni => (words, sums) = quad_words(a),
        }
        PackedA {
            kernel,
            rows: a.rows,
            cols: a.cols,
            data,
            words,
            sums,
            quads,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }
}

/// Each row of `a` as words of four consecutive int8 values (the first in the low byte, 0
/// past the row's end), `cols / 4` rounded up per row, and each row's sum.
fn quad_words(a: MatRef<'_>) -> (Vec<i32>, Vec<i32>) {
    let quads = a.cols.div_ceil(4);
    let mut words = vec![0i32; a.rows * quads];
    let mut sums = vec![0i32; a.rows];
    for (i, (dst, sum)) in words
        .chunks_exact_mut(quads.max(1))
        .zip(&mut sums)
        .enumerate()
    {
        let r = a.row(i);
        for (q, w) in dst.iter_mut().enumerate() {
            *w = i32::from_le_bytes(std::array::from_fn(|j| {
                r.get(4 * q + j).map_or(0, |&x| x as u8)
            }));
        }
        *sum = r.iter().map(|&x| i32::from(x)).sum();
    }
    (words, sums)
}

/// `out (a.rows x b.cols, row-major) = a * b`.
pub fn gemm(a: MatRef<'_>, b: MatRef<'_>, out: &mut [i32]) {
    let p = PackedA::new(a);
    gemm_rows(&p, 0..p.rows, b, out);
}

/// Whether no value is negative (where the AVX2 kernel takes its faster product).
pub fn nonnegative(values: &[i8]) -> bool {
    values.iter().fold(0u8, |acc, &v| acc | v as u8) < 0x80
}

/// `out = a[rows] * b`: the product of some rows of a packed left operand.
pub fn gemm_rows(a: &PackedA, rows: std::ops::Range<usize>, b: MatRef<'_>, out: &mut [i32]) {
    b.check();
    assert!(rows.end <= a.rows, "rows out of range");
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    assert!(out.len() >= rows.len() * b.cols);
    match a.kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was checked available when `a` was packed; views were checked.
        Kernel::Avx2 => unsafe {
            if !avx2::gemm_u7(a, rows.clone(), b, vnni::Sink::Sums(out)) {
                avx2::gemm(a, rows, b, out)
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Vnni => unsafe { vnni::gemm(a, rows, b, vnni::Sink::Sums(out)) },
        _ => {
            let view = MatRef {
                data: &a.data[rows.start * a.cols..rows.end * a.cols],
                rows: rows.len(),
                cols: a.cols,
                stride: a.cols,
            };
            gemm_portable(view, b, out);
        }
    }
}

/// What a product's sums become as they leave the registers, row `r` of the rows computed:
/// `y = sum as f32 * scales[r] + bias[r]` (a product, then a sum, each rounded to f32, as the
/// runtime's float output is computed), stored at `ld` values per row.
#[derive(Clone, Copy)]
pub struct Finish<'a> {
    pub scales: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub ld: usize,
    pub out: Output,
}

/// Where [`Finish`] stores a row's values.
#[derive(Clone, Copy)]
pub enum Output {
    /// `y` as f32, from this place on.
    F32(*mut f32),
    /// `y` rounded onto a quantizer's grid (`[lo, hi, 1 / scale]`) exactly as the runtime's
    /// quantizer rounds, as int8, from this place on.
    I8(*mut i8, [f32; 3]),
}

impl Output {
    /// The place `count` values on.
    ///
    /// # Safety
    /// As for [`pointer::add`]: the result lies within (or one past) the output.
    pub unsafe fn add(self, count: usize) -> Output {
        // SAFETY (both): as the caller promises.
        match self {
            Output::F32(p) => Output::F32(unsafe { p.add(count) }),
            Output::I8(p, grid) => Output::I8(unsafe { p.add(count) }, grid),
        }
    }
}

/// `rows` of the product finished as `finish` says, where the kernel finishes in registers
/// (AVX-512 VNNI, and AVX2 where `b` holds no negative value); returns `false`, having
/// written nothing, otherwise: the caller finishes the int32 sums of [`gemm_rows`] itself.
///
/// # Safety
/// For each row `r < rows.len()`, the `b.cols` values from `r * finish.ld` on from the output
/// place are valid for writes that nothing else reads or writes meanwhile; `finish.scales`
/// (and the bias) hold a value per row.
pub unsafe fn gemm_rows_finished(
    a: &PackedA,
    rows: std::ops::Range<usize>,
    b: MatRef<'_>,
    finish: &Finish<'_>,
) -> bool {
    b.check();
    assert!(rows.end <= a.rows, "rows out of range");
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    assert!(
        finish.scales.len() >= rows.len() && finish.bias.is_none_or(|v| v.len() >= rows.len()),
        "a scale and a bias per row"
    );
    match a.kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was checked available when `a` was packed; views were checked,
        // and the output as the caller promises.
        Kernel::Avx512Vnni => {
            unsafe { vnni::gemm(a, rows, b, vnni::Sink::Finish(finish)) };
            true
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe { avx2::gemm_u7(a, rows, b, vnni::Sink::Finish(finish)) },
        _ => false,
    }
}

/// Output rows of a panel's loads in [`Im2col`] at most: a panel of 16 positions touches at
/// most 7 rows of 3 or more columns.
const MAX_LOADS: usize = 8;

/// The input columns of a stride-1 convolution over a block of output rows, for products
/// that gather them from the input as they pack them ([`gemm_conv_finished`]) rather than
/// from a matrix written first. Row `(c * kh + ky) * kw + kx` and column
/// `(oy - rows.start) * ow + ox` of the matrix hold the input value at channel `c`, row
/// `oy + ky * dilation - padding`, column `ox + kx * dilation - padding` (0 outside the plane).
#[derive(Clone)]
pub struct Im2col<'a> {
    /// The input planes, `channels` of `h x w` values, one after another.
    pub planes: &'a [i8],
    pub channels: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: [usize; 2],
    pub padding: usize,
    pub dilation: usize,
    /// The output rows, and the output's columns.
    pub rows: std::ops::Range<usize>,
    pub ow: usize,
    /// The panels' loads worked out once for many blocks of columns of this geometry (every
    /// sample's, say); else the packing works them out.
    pub loads: Option<&'a ConvLoads>,
}

/// Output positions per panel of packed columns (the VNNI kernel's `NR`).
const PANEL: usize = 16;

/// One tap's loads of a panel ([`ConvLoads`]): per load, the offset from the channel's plane
/// at which lane 0 would read, and which lanes read.
type TapLoads = [(isize, u16); MAX_LOADS];

/// Where the packing of an [`Im2col`]'s columns reads, for every panel of 16 output
/// positions and kernel tap: one masked load per output row the panel touches, as the
/// offset from the channel's plane at which lane 0 would read (the lanes read consecutive
/// values) and which lanes read. The same for every sample and channel of one geometry.
pub struct ConvLoads {
    /// The geometry they were made for: `[h, w, kh, kw, padding, dilation, first row, rows,
    /// ow]`.
    geometry: [usize; 9],
    taps: usize,
    loads: Vec<TapLoads>,
    counts: Vec<u8>,
}

impl ConvLoads {
    /// [`ConvLoads::new`] for `src`'s geometry, made the first time a layer of that geometry
    /// runs and kept for the next forwards (they do not depend on the channels or the
    /// values).
    pub fn cached(src: &Im2col<'_>) -> Arc<ConvLoads> {
        static KEPT: Memo<[usize; 9], Arc<ConvLoads>> = Memo::new();
        KEPT.get(Self::geometry(src), || Arc::new(ConvLoads::new(src)))
    }

    /// The loads of every panel of `src`'s columns.
    pub fn new(src: &Im2col<'_>) -> ConvLoads {
        let [kh, kw] = src.kernel;
        let (pad, dil) = (src.padding as isize, src.dilation);
        let (taps, n) = (kh * kw, src.cols());
        let panels = n.div_ceil(PANEL);
        let mut loads = vec![[(0isize, 0u16); MAX_LOADS]; panels * taps];
        let mut counts = vec![0u8; panels * taps];
        // Each tap's offset from an output position to its input (row, column).
        let shifts: Vec<(isize, isize)> = (0..taps)
            .map(|r| ((r / kw * dil) as isize - pad, (r % kw * dil) as isize - pad))
            .collect();
        for panel in 0..panels {
            let p0 = panel * PANEL;
            // The panel's runs of positions in one output row: first lane, row, column, length.
            let mut runs = [(0, 0, 0, 0); MAX_LOADS];
            let mut nruns = 0;
            let (mut oy, mut ox, mut lane) = (src.rows.start + p0 / src.ow, p0 % src.ow, 0);
            while lane < PANEL && p0 + lane < n {
                let run = (src.ow - ox).min(PANEL - lane).min(n - p0 - lane);
                runs[nruns] = (lane as isize, oy as isize, ox as isize, run as isize);
                (nruns, lane, oy, ox) = (nruns + 1, lane + run, oy + 1, 0);
            }
            let at = panel * taps..(panel + 1) * taps;
            let each = loads[at.clone()].iter_mut().zip(&mut counts[at]);
            for ((l, count), &(dy, dx)) in each.zip(&shifts) {
                for &(lane, oy, ox, run) in &runs[..nruns] {
                    let iy = oy + dy;
                    // Columns ox..ox + run read ix = ox + dx: those inside 0..w.
                    let (lo, hi) = (ox.max(-dx), (ox + run).min(src.w as isize - dx));
                    if (0..src.h as isize).contains(&iy) && lo < hi {
                        let (a, b) = (lane + lo - ox, lane + hi - ox);
                        let mask = (((1u32 << b) - 1) & !((1u32 << a) - 1)) as u16;
                        l[*count as usize] = (iy * src.w as isize + ox + dx - lane, mask);
                        *count += 1;
                    }
                }
            }
        }
        ConvLoads {
            geometry: Self::geometry(src),
            taps,
            loads,
            counts,
        }
    }

    fn geometry(src: &Im2col<'_>) -> [usize; 9] {
        let [kh, kw] = src.kernel;
        let rows = src.rows.clone();
        [
            src.h,
            src.w,
            kh,
            kw,
            src.padding,
            src.dilation,
            rows.start,
            rows.len(),
            src.ow,
        ]
    }

    /// The loads `src` carries, or else `src`'s made into `made`; panics if it carries
    /// another geometry's.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn of<'r>(src: &Im2col<'r>, made: &'r mut Option<ConvLoads>) -> &'r ConvLoads {
        let all = match src.loads {
            Some(l) => l,
            None => made.insert(ConvLoads::new(src)),
        };
        assert!(all.fits(src), "panel loads of another convolution");
        all
    }

    /// Whether these are the loads of `src`'s geometry.
    fn fits(&self, src: &Im2col<'_>) -> bool {
        self.geometry == Self::geometry(src)
    }

    /// Panel `panel`'s loads and their number, tap by tap.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn panel(&self, panel: usize) -> (&[TapLoads], &[u8]) {
        let at = panel * self.taps..(panel + 1) * self.taps;
        (&self.loads[at.clone()], &self.counts[at])
    }
}

impl Im2col<'_> {
    /// Rows of the matrix: one per channel and kernel tap.
    pub fn depth(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// Columns of the matrix: one per output position of the block.
    pub fn cols(&self) -> usize {
        self.rows.len() * self.ow
    }

    /// Output rows of the whole convolution.
    fn oh(&self) -> usize {
        (self.h + 2 * self.padding + 1).saturating_sub(self.dilation * (self.kernel[0] - 1) + 1)
    }

    /// Whether [`gemm_conv_finished`] gathers these columns: output rows of at least 3
    /// columns, as wide as the input allows.
    pub fn fused(&self) -> bool {
        self.ow >= 3
            && self.kernel[0] >= 1
            && self.kernel[1] >= 1
            && self.ow + self.dilation * (self.kernel[1] - 1) == self.w + 2 * self.padding
    }

    /// The matrix, written out (the reference the gathering is tested against).
    pub fn matrix(&self) -> Vec<i8> {
        let [kh, kw] = self.kernel;
        let n = self.cols();
        let mut m = vec![0i8; self.depth() * n];
        for (t, row) in m.chunks_exact_mut(n.max(1)).enumerate() {
            let (c, ky, kx) = (t / (kh * kw), t / kw % kh, t % kw);
            for (j, v) in row.iter_mut().enumerate() {
                let (oy, ox) = (self.rows.start + j / self.ow, j % self.ow);
                let iy = (oy + ky * self.dilation) as isize - self.padding as isize;
                let ix = (ox + kx * self.dilation) as isize - self.padding as isize;
                if (0..self.h as isize).contains(&iy) && (0..self.w as isize).contains(&ix) {
                    *v = self.planes[c * self.h * self.w + iy as usize * self.w + ix as usize];
                }
            }
        }
        m
    }
}

/// `rows` of the product of `a` with the convolution columns `src`, finished as `finish`
/// says, where the kernel gathers the columns as it packs them (AVX-512 VNNI, and
/// [`Im2col::fused`]); returns `false`, having written nothing, otherwise.
///
/// # Safety
/// As for [`gemm_rows_finished`], with `src.cols()` columns.
pub unsafe fn gemm_conv_finished(
    a: &PackedA,
    rows: std::ops::Range<usize>,
    src: &Im2col<'_>,
    finish: &Finish<'_>,
) -> bool {
    assert!(rows.end <= a.rows, "rows out of range");
    assert_eq!(a.cols, src.depth(), "inner dimensions differ");
    assert!(
        finish.scales.len() >= rows.len() && finish.bias.is_none_or(|v| v.len() >= rows.len()),
        "a scale and a bias per row"
    );
    match a.kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was checked available when `a` was packed; the output as the
        // caller promises.
        Kernel::Avx512Vnni if src.fused() => {
            unsafe { vnni::gemm_conv(a, rows, src, finish) };
            true
        }
        _ => false,
    }
}

/// The input planes of an [`Im2col`] laid out for [`gemm_conv_quads_finished`] on `kernel`,
/// into `out` (every byte written): channels in groups of four, each position's four values
/// side by side, `[channels / 4 rounded up][h][w][4]`, as unsigned bytes (`x + 128`) for
/// AVX-512 VNNI and as they are for the others (AVX2's product takes planes without a
/// negative value); channels past the last hold the 0 of that form. One word of `out` is
/// then four rows of the columns at one position.
pub fn quad_planes(
    planes: &[i8],
    [channels, h, w]: [usize; 3],
    out: &mut [MaybeUninit<u8>],
    kernel: Kernel,
) {
    let plane = h * w;
    assert!(
        planes.len() >= channels * plane && out.len() == channels.div_ceil(4) * plane * 4,
        "quad planes of {channels} channels of {h}x{w} out of bounds"
    );
    let flip = if kernel == Kernel::Avx512Vnni {
        0x80
    } else {
        0
    };
    for (q, block) in out.chunks_exact_mut(4 * plane).enumerate() {
        let four: [Option<&[i8]>; 4] = std::array::from_fn(|j| {
            let c = 4 * q + j;
            (c < channels).then(|| &planes[c * plane..(c + 1) * plane])
        });
        #[cfg(target_arch = "x86_64")]
        if four.iter().all(Option::is_some) {
            vnni::interleave_planes(four.map(|r| r.unwrap_or_default()), block, flip);
            continue;
        }
        for (i, word) in block.chunks_exact_mut(4).enumerate() {
            for (v, row) in word.iter_mut().zip(&four) {
                v.write(row.map_or(flip, |r| r[i] as u8 ^ flip));
            }
        }
    }
}

/// [`quad_planes`] into a new buffer.
pub fn quad_planes_vec(planes: &[i8], [channels, h, w]: [usize; 3], kernel: Kernel) -> Vec<u8> {
    let len = channels.div_ceil(4) * h * w * 4;
    let mut out = Vec::with_capacity(len);
    quad_planes(
        planes,
        [channels, h, w],
        &mut out.spare_capacity_mut()[..len],
        kernel,
    );
    // SAFETY: `quad_planes` wrote all `len` bytes.
    unsafe { out.set_len(len) };
    out
}

/// Filters `[rows, channels * taps]` in the order convolution weights are stored (channel,
/// then tap) put in the order of [`quad_planes`]' columns: column `(t * quads + q) * 4 + j`
/// holds channel `4 q + j` at tap `t` (0 past the last channel), with `quads` the channels
/// in groups of four.
pub fn tap_major(a: MatRef<'_>, channels: usize, taps: usize) -> Vec<i8> {
    a.check();
    assert_eq!(
        a.cols,
        channels * taps,
        "filters of {channels} channels by {taps} taps"
    );
    let quads = channels.div_ceil(4);
    let width = taps * quads * 4;
    let mut out = vec![0i8; a.rows * width];
    for (i, row) in out.chunks_exact_mut(width).enumerate() {
        let filt = a.row(i);
        for c in 0..channels {
            for t in 0..taps {
                row[(t * quads + c / 4) * 4 + c % 4] = filt[c * taps + t];
            }
        }
    }
    out
}

/// [`gemm_conv_finished`] with the columns gathered from `quads`, `src`'s planes laid out by
/// [`quad_planes`] for `a`'s kernel, and `a` the filters in [`tap_major`] order: each block
/// of four rows of the columns is one tap of four channels, whose 16 positions come in one
/// masked load (one per output row the positions touch; two with AVX2). Returns `false`,
/// having written nothing, where the kernel is neither AVX-512 VNNI nor AVX2 or the columns
/// are not [`Im2col::fused`]. With AVX2, no plane value may be negative (checked).
///
/// # Safety
/// As for [`gemm_rows_finished`], with `src.cols()` columns.
pub unsafe fn gemm_conv_quads_finished(
    a: &PackedA,
    rows: std::ops::Range<usize>,
    src: &Im2col<'_>,
    quads: &[u8],
    finish: &Finish<'_>,
) -> bool {
    let taps = src.kernel[0] * src.kernel[1];
    let width = taps * src.channels.div_ceil(4) * 4;
    assert!(rows.end <= a.rows, "rows out of range");
    assert_eq!(a.cols, width, "filters not in the quads' order");
    assert_eq!(
        quads.len(),
        src.channels.div_ceil(4) * src.h * src.w * 4,
        "quad planes of another size"
    );
    assert!(
        finish.scales.len() >= rows.len() && finish.bias.is_none_or(|v| v.len() >= rows.len()),
        "a scale and a bias per row"
    );
    match a.kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was checked available when `a` was packed; the output as the
        // caller promises.
        Kernel::Avx512Vnni if src.fused() => {
            unsafe { vnni::gemm_conv_quads(a, rows, src, quads, finish) };
            true
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 if src.fused() => {
            let negative = quads.iter().fold(0u8, |acc, &v| acc | v) >= 0x80;
            assert!(!negative, "AVX2 quad planes hold a negative value");
            unsafe { avx2::gemm_conv_quads(a, rows, src, quads, finish) };
            true
        }
        _ => false,
    }
}

/// The packing of an [`Im2col`]'s columns gathered from its quad planes: the plane's size,
/// the groups of four channels, rows of four packed per panel (one per tap and group), and
/// panels of 16 positions.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct QuadPacking {
    plane: usize,
    groups: usize,
    depth: usize,
    panels: usize,
}

impl QuadPacking {
    /// `src`'s packing, checking that `quads` holds its planes and that it gathers.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn of(src: &Im2col<'_>, quads: &[u8]) -> QuadPacking {
        let (plane, groups) = (src.h * src.w, src.channels.div_ceil(4));
        assert!(
            src.fused() && quads.len() == groups * plane * 4 && src.rows.end <= src.oh(),
            "convolution columns out of the input"
        );
        QuadPacking {
            plane,
            groups,
            depth: src.kernel[0] * src.kernel[1] * groups,
            panels: src.cols().div_ceil(PANEL),
        }
    }
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
mod avx2;

#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni {
    use super::{
        ConvLoads, Finish, Im2col, MatRef, MaybeUninit, Output, PackedA, QuadPacking, TapLoads,
    };
    use std::arch::x86_64::*;

    const NR: usize = 16;
    const MR: usize = 8;

    /// `b` in panels of 16 columns; within a panel, for each group of four rows, the 16
    /// columns' four values as bytes `x ^ flip`, 64 bytes: unsigned (`x + 128`) with `flip`
    /// 0x80, as they are with 0 (the AVX2 kernel's non-negative values). Missing rows read
    /// as 0 (their filter values are 0), missing columns as `flip`.
    pub(crate) fn pack_b(b: MatRef<'_>, flip: u8) -> (Vec<u8>, usize) {
        let quads = b.rows.div_ceil(4);
        let panels = b.cols.div_ceil(NR);
        let mut packed = vec![flip; panels * quads * 4 * NR];
        // Whole quads of rows and whole panels: four rows' 16 values interleaved by
        // byte and word unpacks (SSE2, which every x86-64 machine has).
        let (full_quads, full_panels) = (b.rows / 4, b.cols / NR);
        for q in 0..full_quads {
            let rows = [0, 1, 2, 3].map(|j| b.row(4 * q + j));
            for panel in 0..full_panels {
                let c0 = panel * NR;
                let dst = &mut packed[(panel * quads + q) * 4 * NR..][..4 * NR];
                // SAFETY: each row has `b.cols >= c0 + 16` values, `dst` has 64 bytes, and
                // SSE2 is part of x86-64.
                unsafe {
                    let four = rows.map(|r| _mm_loadu_si128(r[c0..c0 + NR].as_ptr().cast()));
                    store_interleaved(four, dst.as_mut_ptr(), flip);
                }
            }
        }
        for t in 0..b.rows {
            let q = t / 4;
            let j = t % 4;
            let row = b.row(t);
            // (the panels done above are skipped)
            let first = if q < full_quads { full_panels } else { 0 };
            for panel in first..panels {
                let c0 = panel * NR;
                let w = NR.min(b.cols - c0);
                let dst = &mut packed[(panel * quads + q) * 4 * NR..][..4 * NR];
                for c in 0..w {
                    dst[4 * c + j] = (row[c0 + c] as u8) ^ flip;
                }
            }
        }
        (packed, quads)
    }

    /// The columns of a convolution (see [`Im2col`]) packed as [`pack_b`] packs a matrix,
    /// gathered straight from the input planes: for each panel of 16 output positions and
    /// each kernel tap, the positions' input values come in a few masked loads (one per output
    /// row the panel touches; padding and positions past the last are masked off and read as
    /// 0), and four taps' vectors are interleaved into the panel's 64 bytes.
    ///
    /// # Safety
    /// The machine has AVX-512 F, BW and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pack_conv(src: &Im2col<'_>) -> (Vec<u8>, usize) {
        let [kh, kw] = src.kernel;
        let (taps, plane, n) = (kh * kw, src.h * src.w, src.cols());
        let k = src.channels * taps;
        assert!(
            src.fused() && src.planes.len() >= src.channels * plane && src.rows.end <= src.oh(),
            "convolution columns out of the input"
        );
        let (quads, panels) = (k.div_ceil(4), n.div_ceil(NR));
        let len = panels * quads * 4 * NR;
        let mut packed: Vec<u8> = Vec::with_capacity(len);
        let out = packed.as_mut_ptr();
        let mut made = None;
        let all = ConvLoads::of(src, &mut made);
        for panel in 0..panels {
            let (loads, counts) = all.panel(panel);
            let taps = Taps {
                loads,
                counts,
                plane,
            };
            // SAFETY: the panel's `quads` blocks of 64 bytes lie inside the `len` reserved.
            unsafe { interleave(src, &taps, quads, out.add(panel * quads * 4 * NR)) };
        }
        // SAFETY: every block of every panel was written above.
        unsafe { packed.set_len(len) };
        (packed, quads)
    }

    /// The columns of a convolution gathered from its [`super::quad_planes`] (`quads`) and
    /// packed as [`pack_b`] packs a matrix, for filters in [`super::tap_major`] order: for
    /// each panel of 16 output positions, tap and group of four channels, the positions' four
    /// values each come in one masked load of 16 words per output row the panel touches
    /// (padding and positions past the last keep the flipped 0).
    ///
    /// # Safety
    /// The machine has AVX-512 F; `quads` holds `src`'s planes laid out by `quad_planes`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_quads(src: &Im2col<'_>, quads: &[u8]) -> (Vec<u8>, usize) {
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
        let zero = _mm512_set1_epi8(-128);
        let mut made = None;
        let all = ConvLoads::of(src, &mut made);
        for panel in 0..panels {
            let (loads, counts) = all.panel(panel);
            let blocks = out.wrapping_add(panel * depth * 4 * NR);
            for (t, (l, &count)) in loads.iter().zip(counts).enumerate() {
                for q in 0..groups {
                    let base = words.wrapping_add(q * plane);
                    let mut v = zero;
                    for &(at, mask) in &l[..usize::from(count)] {
                        // SAFETY: the lanes in `mask` read words of the plane (rows and
                        // columns inside it), which `quads` holds (checked above); masked-off
                        // lanes are not read.
                        v = unsafe { _mm512_mask_loadu_epi32(v, mask, base.wrapping_offset(at)) };
                    }
                    // SAFETY: block `t * groups + q` of the panel lies inside the `len`
                    // reserved.
                    unsafe { _mm512_storeu_si512(blocks.add((t * groups + q) * 4 * NR).cast(), v) };
                }
            }
        }
        // SAFETY: every block of every panel was written above.
        unsafe { packed.set_len(len) };
        (packed, depth)
    }

    /// Four planes interleaved into `out` (position `i`'s four values at bytes `4 i..4 i + 4`),
    /// each byte `x ^ flip`: 16 positions per [`store_interleaved`], the rest one by one.
    /// Each row holds as many values as the others, and `out` four times as many.
    pub(super) fn interleave_planes(rows: [&[i8]; 4], out: &mut [MaybeUninit<u8>], flip: u8) {
        let n = rows[0].len();
        assert!(rows.iter().all(|r| r.len() == n) && out.len() == 4 * n);
        let full = n / NR * NR;
        for i in (0..full).step_by(NR) {
            // SAFETY: SSE2 is part of x86-64; values i..i + 16 of each row, and bytes
            // 4 i..4 i + 64 of `out`, lie inside them (checked above).
            unsafe {
                let four = rows.map(|r| _mm_loadu_si128(r.as_ptr().add(i).cast()));
                store_interleaved(four, out.as_mut_ptr().add(4 * i).cast(), flip);
            }
        }
        for i in full..n {
            for (j, r) in rows.iter().enumerate() {
                out[4 * i + j].write(r[i] as u8 ^ flip);
            }
        }
    }

    /// A panel's loads for every kernel tap (see [`pack_conv`]), and the planes' size.
    struct Taps<'a> {
        loads: &'a [TapLoads],
        counts: &'a [u8],
        plane: usize,
    }

    /// Tap `r` of channel `ci` gathered into the 16 bytes from `16 j` of `v` (`j < 4`).
    ///
    /// # Safety
    /// The machine has AVX-512 BW; the loads are `src`'s for this panel.
    #[inline(always)]
    unsafe fn gather(
        src: &Im2col<'_>,
        taps: &Taps<'_>,
        ci: usize,
        r: usize,
        j: usize,
        v: __m512i,
    ) -> __m512i {
        let base = src
            .planes
            .as_ptr()
            .wrapping_add(ci * taps.plane)
            .wrapping_sub(16 * j);
        let mut v = v;
        for &(at, mask) in &taps.loads[r][..usize::from(taps.counts[r])] {
            // SAFETY: the lanes in `mask` read values of channel `ci`'s plane (rows and
            // columns inside it), which `planes` holds (checked by `pack_conv`); masked-off
            // lanes are not read.
            v = unsafe {
                _mm512_mask_loadu_epi8(v, u64::from(mask) << (16 * j), base.wrapping_offset(at))
            };
        }
        v
    }

    /// A panel's blocks from its taps: four taps gathered into one register (a tap to each
    /// 16 bytes), then put in the packed order by byte and word unpacks (as [`pack_b`] does;
    /// a single byte permute, with VBMI, was compiled to the same unpacks).
    ///
    /// # Safety
    /// The machine has AVX-512 F, BW and VL; `out` is valid for `quads` blocks of 64 bytes;
    /// the loads are `src`'s for this panel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn interleave(src: &Im2col<'_>, taps: &Taps<'_>, quads: usize, out: *mut u8) {
        let kernel_taps = taps.loads.len();
        let (mut ci, mut r) = (0, 0);
        for q in 0..quads {
            let mut v = _mm512_setzero_si512();
            for j in 0..4 {
                if ci == src.channels {
                    break;
                }
                // SAFETY: as this function's caller promises.
                v = unsafe { gather(src, taps, ci, r, j, v) };
                r += 1;
                if r == kernel_taps {
                    (ci, r) = (ci + 1, 0);
                }
            }
            let (r0, r1) = (
                _mm512_extracti32x4_epi32::<0>(v),
                _mm512_extracti32x4_epi32::<1>(v),
            );
            let (r2, r3) = (
                _mm512_extracti32x4_epi32::<2>(v),
                _mm512_extracti32x4_epi32::<3>(v),
            );
            // SAFETY: block q lies inside `out`'s blocks.
            unsafe { store_interleaved([r0, r1, r2, r3], out.add(q * 4 * NR), 0x80) };
        }
    }

    /// Four rows' 16 values each, interleaved by byte and word unpacks into one packed block
    /// (column `c`'s four values at bytes `4c..4c + 4`), each byte `x ^ flip`, stored at
    /// `dst`.
    ///
    /// # Safety
    /// `dst` is valid for writes of 64 bytes (SSE2 is part of x86-64).
    #[inline(always)]
    unsafe fn store_interleaved([r0, r1, r2, r3]: [__m128i; 4], dst: *mut u8, flip: u8) {
        // SAFETY: SSE2 is part of x86-64; the stores write bytes 16 i..16 i + 16 of the 64
        // the caller promises.
        unsafe {
            let (a, bb) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
            let (c, d) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
            let flip = _mm_set1_epi8(flip as i8);
            let block = [
                _mm_unpacklo_epi16(a, c),
                _mm_unpackhi_epi16(a, c),
                _mm_unpacklo_epi16(bb, d),
                _mm_unpackhi_epi16(bb, d),
            ];
            for (i, v) in block.into_iter().enumerate() {
                _mm_storeu_si128(dst.add(16 * i).cast(), _mm_xor_si128(v, flip));
            }
        }
    }

    /// Where a tile's rows go: the int32 sums (row-major, `b.cols` per row), or finished.
    pub enum Sink<'a, 'f> {
        Sums(&'a mut [i32]),
        Finish(&'a Finish<'f>),
    }

    /// See [`super::gemm_rows`] and [`super::gemm_rows_finished`]; needs AVX-512 F, BW, VL and
    /// VNNI. A finished output must be valid as `gemm_rows_finished` requires.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn gemm(a: &PackedA, rows: std::ops::Range<usize>, b: MatRef<'_>, sink: Sink) {
        if rows.is_empty() || b.cols == 0 {
            return;
        }
        if b.cols <= DOT_COLUMNS {
            // SAFETY: as the caller promises.
            return unsafe { dots(a, rows, b, sink) };
        }
        // One column past an odd number of whole panels (a 7x7 plane: 3 x 16 + 1) would
        // take a pair of panels for 17 values: the last whole panel goes alone, and the last
        // column as dot products.
        if let Sink::Finish(f) = sink {
            if b.cols % NR == 1 && (b.cols / NR) % 2 == 1 {
                let c = b.cols - 1;
                let head = MatRef { cols: c, ..b };
                let last = MatRef {
                    data: &b.data[c..],
                    cols: 1,
                    ..b
                };
                // SAFETY: column `c` of every row lies inside the caller's output rows.
                let moved = Finish {
                    out: unsafe { f.out.add(c) },
                    ..*f
                };
                let (pb, quads) = pack_b(head, 0x80);
                // SAFETY: as the caller promises; `pb` is `head` packed, and `moved` writes
                // the column after `head`'s.
                unsafe {
                    product(a, rows.clone(), &pb, quads, c, Sink::Finish(f));
                    dots(a, rows, last, Sink::Finish(&moved));
                }
                return;
            }
        }
        let (pb, quads) = pack_b(b, 0x80);
        // SAFETY: as the caller promises; `pb` is `b` packed.
        unsafe { product(a, rows, &pb, quads, b.cols, sink) }
    }

    /// Columns up to which [`gemm`] takes each output as one dot product of a filter row and
    /// a column (a linear layer at batch 1, say): a panel of 16 columns would hold 15
    /// padding columns, and each broadcast weight would serve one useful value.
    const DOT_COLUMNS: usize = 4;

    /// [`gemm`] column by column: the column flipped to unsigned bytes once, then each row's
    /// packed weights (its bytes in order) times it, 64 bytes per multiply-add, four rows at
    /// a time, each row's 16 lanes summed at the end.
    ///
    /// # Safety
    /// As for [`gemm`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dots(a: &PackedA, rows: std::ops::Range<usize>, b: MatRef<'_>, mut sink: Sink) {
        let quads = a.cols.div_ceil(4);
        let (k, n, width) = (b.rows, b.cols, 4 * quads);
        assert!(a.words.len() >= rows.end * quads && a.sums.len() >= rows.end);
        let chunks = width.div_ceil(64);
        // The last chunk's bytes (the rest of a row's 4 * quads).
        let tail = u64::MAX >> (64 * chunks - width);
        let mut x = vec![0x80u8; 64 * chunks];
        for j in 0..n {
            for (t, v) in x[..k].iter_mut().enumerate() {
                *v = b.data[t * b.stride + j] as u8 ^ 0x80;
            }
            let mut r = rows.start;
            while r < rows.end {
                let count = 4.min(rows.end - r);
                let mut acc = [_mm512_setzero_si512(); 4];
                for c in 0..chunks {
                    let m = if c + 1 == chunks { tail } else { u64::MAX };
                    // SAFETY: `x` holds `chunks` blocks of 64 bytes; each row's `width`
                    // bytes lie inside `a.words` (asserted above), and the mask keeps the
                    // last chunk's loads inside them.
                    unsafe {
                        let xv = _mm512_loadu_si512(x.as_ptr().add(64 * c).cast());
                        for (i, acc) in acc.iter_mut().enumerate().take(count) {
                            let w = a.words.as_ptr().add((r + i) * quads).cast::<i8>();
                            let wv = _mm512_maskz_loadu_epi8(m, w.add(64 * c));
                            *acc = _mm512_dpbusd_epi32(*acc, xv, wv);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate().take(count) {
                    let row = r + i;
                    // The 128 added to every value contributed 128 * (sum of the filter).
                    let v = _mm512_reduce_add_epi32(*acc) - 128 * a.sums[row];
                    let at = row - rows.start;
                    match sink {
                        Sink::Sums(ref mut out) => out[at * n + j] = v,
                        // SAFETY: the caller promises the output's rows.
                        Sink::Finish(f) => unsafe { finish_one(f, at, j, v) },
                    }
                }
                r += count;
            }
        }
    }

    /// See [`super::gemm_conv_finished`]; needs AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn gemm_conv(
        a: &PackedA,
        rows: std::ops::Range<usize>,
        src: &Im2col<'_>,
        finish: &Finish<'_>,
    ) {
        let n = src.cols();
        if rows.is_empty() || n == 0 {
            return;
        }
        // SAFETY: the machine has AVX-512 F, BW and VL.
        let (pb, quads) = unsafe { pack_conv(src) };
        // SAFETY: as the caller promises; `pb` is the columns packed.
        unsafe { product(a, rows, &pb, quads, n, Sink::Finish(finish)) }
    }

    /// See [`super::gemm_conv_quads_finished`]; needs AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
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
        // SAFETY: the machine has AVX-512 F.
        let (pb, depth) = unsafe { pack_quads(src, quads) };
        // SAFETY: as the caller promises; `pb` is the columns packed.
        unsafe { product(a, rows, &pb, depth, n, Sink::Finish(finish)) }
    }

    /// The product of `a`'s `rows` with the packed `pb` (`quads` groups of four rows, `n`
    /// columns), to `sink`: two panels at a time (tiles of `MR` rows by 32 columns, two
    /// registers a row, so that each broadcast weight serves two multiply-adds), and a last
    /// odd panel alone.
    ///
    /// # Safety
    /// As for [`gemm`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn product(
        a: &PackedA,
        rows: std::ops::Range<usize>,
        pb: &[u8],
        quads: usize,
        n: usize,
        mut sink: Sink,
    ) {
        assert!(pb.len() >= n.div_ceil(NR) * quads * 4 * NR && a.words.len() >= rows.end * quads);
        let pa = &a.words[rows.start * quads..rows.end * quads];
        let sums = &a.sums[rows.clone()];
        let panels = n.div_ceil(NR);
        // (a finished sink's output; unused for sums)
        // SAFETY: the machine has AVX-512 F (as the caller promises).
        let lanes = unsafe {
            match sink {
                Sink::Finish(f) => Lanes::new(f.out),
                Sink::Sums(_) => Lanes::new(Output::F32(std::ptr::null_mut())),
            }
        };
        let mut panel = 0;
        while panel < panels {
            // SAFETY: the panels lie inside `pb` (checked above); the sink's rows are the
            // caller's.
            unsafe {
                if panel + 1 < panels {
                    panel_tiles::<2>(pa, sums, pb, quads, n, panel, (&mut sink, &lanes));
                    panel += 2;
                } else {
                    panel_tiles::<1>(pa, sums, pb, quads, n, panel, (&mut sink, &lanes));
                    panel += 1;
                }
            }
        }
    }

    /// Every row of `pa` (`quads` words each) by the `P` panels from `panel` on, in tiles of
    /// `MR` rows, to the sink (a finished sink's output made ready as the lanes).
    ///
    /// # Safety
    /// As for [`product`]; the panels lie inside `pb`, and `pa` holds `quads` words for
    /// each of `sums`' rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn panel_tiles<const P: usize>(
        pa: &[i32],
        sums: &[i32],
        pb: &[u8],
        quads: usize,
        n: usize,
        panel: usize,
        (sink, lanes): (&mut Sink, &Lanes),
    ) {
        let m = sums.len();
        assert!(pa.len() >= m * quads && pb.len() >= (panel + P) * quads * 4 * NR);
        let c0: [usize; P] = std::array::from_fn(|p| (panel + p) * NR);
        let mask: [__mmask16; P] =
            std::array::from_fn(|p| ((1u32 << NR.min(n - c0[p])) - 1) as u16);
        let bp: [*const u8; P] =
            std::array::from_fn(|p| pb[(panel + p) * quads * 4 * NR..].as_ptr());
        let mut i = 0;
        while i < m {
            let rs = MR.min(m - i);
            // Rows past `m` repeat the last one; their sums are not stored.
            let ap: [*const i32; MR] =
                std::array::from_fn(|r| pa[(i + r).min(m - 1) * quads..].as_ptr());
            // The sums start at -128 * (sum of the filter): the 128 added to every
            // activation contributes that back.
            let mut acc: [[__m512i; P]; MR] =
                std::array::from_fn(|r| [_mm512_set1_epi32(-128 * sums[(i + r).min(m - 1)]); P]);
            for q in 0..quads {
                // SAFETY: each panel holds `quads` blocks of 64 bytes, and each row `quads`
                // words (asserted above).
                unsafe {
                    let x: [__m512i; P] =
                        std::array::from_fn(|p| _mm512_loadu_si512(bp[p].add(q * 4 * NR).cast()));
                    for (acc, &row) in acc.iter_mut().zip(&ap) {
                        let wv = _mm512_set1_epi32(*row.add(q));
                        for (acc, &x) in acc.iter_mut().zip(&x) {
                            *acc = _mm512_dpbusd_epi32(*acc, x, wv);
                        }
                    }
                }
            }
            // Row by row with constant indices (a loop over `rs` rows kept the sums in memory).
            let mut put = |r: usize, acc: &[__m512i; P]| {
                if r >= rs {
                    return;
                }
                for (p, &s) in acc.iter().enumerate() {
                    let w = NR.min(n - c0[p]);
                    match sink {
                        Sink::Sums(ref mut out) => {
                            let row = &mut out[(i + r) * n + c0[p]..(i + r) * n + c0[p] + w];
                            // SAFETY: the mask covers the row's `w` values.
                            unsafe {
                                _mm512_mask_storeu_epi32(row.as_mut_ptr().cast(), mask[p], s)
                            };
                        }
                        // SAFETY: the caller promises the output's rows.
                        Sink::Finish(f) => unsafe {
                            finish_row(f, lanes, i + r, c0[p], mask[p], s)
                        },
                    }
                }
            };
            let [a0, a1, a2, a3, a4, a5, a6, a7] = &acc;
            put(0, a0);
            put(1, a1);
            put(2, a2);
            put(3, a3);
            put(4, a4);
            put(5, a5);
            put(6, a6);
            put(7, a7);
            i += MR;
        }
    }

    /// Row `r`, column `c` of a finished product, the sum `v`: see [`Finish`] (as
    /// [`finish_lanes`] computes each lane).
    ///
    /// # Safety
    /// As for [`super::gemm_rows_finished`].
    unsafe fn finish_one(f: &Finish<'_>, r: usize, c: usize, v: i32) {
        let y = v as f32 * f.scales[r] + f.bias.map_or(0.0, |b| b[r]);
        let at = r * f.ld + c;
        // SAFETY (both): the value at `at` is the caller's to write.
        match f.out {
            Output::F32(p) => unsafe { *p.add(at) = y },
            Output::I8(p, [lo, hi, inv]) => unsafe {
                *p.add(at) = crate::grid::round_to_grid(y, lo, hi, inv)
            },
        }
    }

    /// An output place ready for [`finish_lanes`]: its grid's bounds in registers, and
    /// whether rounding onto it may take the short way ([`super::relu_grid`]), worked out
    /// once for the many calls of a layer.
    #[derive(Clone, Copy)]
    pub(crate) struct Lanes {
        out: Output,
        lo: __m512,
        hi: __m512,
        inv: __m512,
        relu: bool,
    }

    impl Lanes {
        /// # Safety
        /// The machine has AVX-512 F.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub(crate) unsafe fn new(out: Output) -> Lanes {
            let grid = match out {
                Output::F32(_) => [0.0; 3],
                Output::I8(_, grid) => grid,
            };
            Lanes {
                out,
                lo: _mm512_set1_ps(grid[0]),
                hi: _mm512_set1_ps(grid[1]),
                inv: _mm512_set1_ps(grid[2]),
                relu: super::relu_grid(grid),
            }
        }
    }

    /// Row `r`, columns `c0..` (those in `mask`) of a finished product: see [`Finish`]
    /// (`lanes` made from its output).
    ///
    /// # Safety
    /// As for [`super::gemm_rows_finished`]; the machine has AVX-512 F, BW and VL.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn finish_row(
        f: &Finish<'_>,
        lanes: &Lanes,
        r: usize,
        c0: usize,
        mask: __mmask16,
        s: __m512i,
    ) {
        let bias = f.bias.map_or(0.0, |b| b[r]);
        let (scale, bias) = (_mm512_set1_ps(f.scales[r]), _mm512_set1_ps(bias));
        // SAFETY: as the caller promises.
        unsafe { finish_lanes(lanes, r * f.ld + c0, mask, s, scale, bias) }
    }

    /// Sixteen sums (those in `mask`), each with its own scale and bias, finished as
    /// [`Finish`] says and stored at `at` values from the output place of `lanes` on.
    ///
    /// # Safety
    /// The 16 values from `at` on (those in `mask`) are valid for writes that nothing else
    /// reads or writes meanwhile; the machine has AVX-512 F, BW and VL.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn finish_lanes(
        lanes: &Lanes,
        at: usize,
        mask: __mmask16,
        s: __m512i,
        scale: __m512,
        bias: __m512,
    ) {
        let y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), scale), bias);
        match lanes.out {
            // SAFETY (both): the values at `at` are the caller's to write.
            Output::F32(p) => unsafe {
                if mask == u16::MAX {
                    _mm512_storeu_ps(p.add(at), y)
                } else {
                    _mm512_mask_storeu_ps(p.add(at), mask, y)
                }
            },
            Output::I8(p, _) => {
                let clipped = _mm512_min_ps(_mm512_max_ps(y, lanes.lo), lanes.hi);
                let q = _mm512_mul_ps(clipped, lanes.inv);
                let ints = if lanes.relu {
                    // `q` is +0 or more and below 1e9 (see `relu_grid`): the half added is
                    // positive, and the clamp to 127 happens as the narrowing saturates.
                    _mm512_cvttps_epi32(_mm512_add_ps(q, _mm512_set1_ps(crate::grid::HALF_DOWN)))
                } else {
                    // As `round_to_grid`: max(y, lo) is lo for NaN (the second operand), then
                    // min, times 1 / scale, plus 1/2 less an ulp with q's sign, clamped,
                    // truncated.
                    let sign =
                        _mm512_and_si512(_mm512_castps_si512(q), _mm512_set1_epi32(i32::MIN));
                    let half = _mm512_castsi512_ps(_mm512_or_si512(
                        sign,
                        _mm512_castps_si512(_mm512_set1_ps(crate::grid::HALF_DOWN)),
                    ));
                    let v = _mm512_min_ps(
                        _mm512_max_ps(_mm512_add_ps(q, half), _mm512_set1_ps(-127.0)),
                        _mm512_set1_ps(127.0),
                    );
                    _mm512_cvttps_epi32(v)
                };
                // Narrowed with saturation (the values of the second way are within ±127
                // already).
                unsafe {
                    if mask == u16::MAX {
                        // Narrowed in a register, then stored: a narrowing store to memory
                        // is slow.
                        _mm_storeu_si128(p.add(at).cast(), _mm512_cvtsepi32_epi8(ints))
                    } else {
                        // A narrowing store, not a masked store of the narrowed register:
                        // where the compiler knew the mask to be one lane (1), it turned
                        // that into a 4-byte store of the lane's 32-bit value (rustc 1.95;
                        // LLVM's truncated masked stores, llvm/llvm-project#179489),
                        // clobbering the three bytes after it.
                        _mm512_mask_cvtsepi32_storeu_epi8(p.add(at).cast(), mask, ints)
                    }
                }
            }
        }
    }
}

/// Whether values clipped to the grid `[lo, hi, inv]` and scaled (`min(max(y, lo), hi) * inv`)
/// are never negative and stay below 1e9: then rounding them half away from zero is adding
/// the half below 1/2 and truncating, and the clamp to ±127 is the saturation of the narrowing
/// to int8 (the grid of an output after a ReLU or ReLU6).
#[inline(always)]
pub(crate) fn relu_grid([lo, hi, inv]: [f32; 3]) -> bool {
    lo == 0.0 && hi >= 0.0 && inv >= 0.0 && f64::from(hi) * f64::from(inv) < 1e9
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Rows finished in registers give what the runtime computes from the int32 sums: the
    /// float output bit for bit, and the same int8 values on a grid (half-steps included,
    /// with and without a ReLU's lower bound); the VNNI kernel finishes, AVX2 where no
    /// activation is negative, and the others decline and write nothing.
    #[test]
    fn finished_rows_round_as_the_runtime_does() {
        let mut rng = StdRng::seed_from_u64(11);
        for &(m, n, k) in &[
            (1, 1, 1),
            (9, 17, 20),
            (8, 49, 64),
            (13, 40, 300),
            (11, 3, 130),
        ] {
            let a: Vec<i8> = (0..m * k).map(|_| rng.random()).collect();
            let signed: Vec<i8> = (0..k * n).map(|_| rng.random()).collect();
            let unsigned: Vec<i8> = signed.iter().map(|&v| v & 0x7f).collect();
            for b in [signed, unsigned] {
                let (av, bv) = (MatRef::new(&a, m, k), MatRef::new(&b, k, n));
                let mut sums = vec![0; m * n];
                gemm_portable(av, bv, &mut sums);
                let scales: Vec<f32> = (0..m).map(|_| rng.random_range(1e-4f32..1e-2)).collect();
                let bias: Vec<f32> = (0..m).map(|_| rng.random_range(-1f32..1.0)).collect();
                let y = |i: usize| sums[i] as f32 * scales[i / n] + bias[i / n];
                for kernel in Kernel::available_kernels() {
                    let p = PackedA::for_kernel(av, kernel);
                    // Two values per row apart, to see that nothing is written between rows.
                    let ld = n + 2;
                    let mut f = vec![f32::NAN; m * ld];
                    let finish = Finish {
                        scales: &scales,
                        bias: Some(&bias),
                        ld,
                        out: Output::F32(f.as_mut_ptr()),
                    };
                    // SAFETY: `f` has m rows of ld >= n values.
                    let done = unsafe { gemm_rows_finished(&p, 0..m, bv, &finish) };
                    let finishes = match kernel {
                        Kernel::Avx512Vnni => true,
                        Kernel::Avx2 => nonnegative(&b),
                        Kernel::Portable => false,
                    };
                    assert_eq!(done, finishes, "{kernel:?}");
                    if !done {
                        assert!(f.iter().all(|v| v.is_nan()), "{kernel:?} wrote");
                        continue;
                    }
                    for i in 0..m * n {
                        let got = f[(i / n) * ld + i % n];
                        assert_eq!(got.to_bits(), y(i).to_bits(), "f32 [{i}] {m}x{n}x{k}");
                    }
                    assert!(f.chunks(ld).all(|r| r[n..].iter().all(|v| v.is_nan())));
                    let grid = rng.random_range(0.01f32..0.1);
                    for relu in [false, true] {
                        let [mut lo, hi, inv] = crate::grid::bounds(grid);
                        if relu {
                            lo = 0.0;
                        }
                        let mut q = vec![99i8; m * ld];
                        let finish = Finish {
                            out: Output::I8(q.as_mut_ptr(), [lo, hi, inv]),
                            ..finish
                        };
                        // SAFETY: as above.
                        assert!(unsafe { gemm_rows_finished(&p, 0..m, bv, &finish) });
                        for i in 0..m * n {
                            let want = crate::grid::round_to_grid(y(i), lo, hi, inv);
                            let got = q[(i / n) * ld + i % n];
                            assert_eq!(got, want, "i8 [{i}] {m}x{n}x{k} relu {relu}");
                        }
                        assert!(
                            q.chunks(ld).all(|r| r[n..].iter().all(|&v| v == 99)),
                            "{m}x{n}x{k} {q:?}"
                        );
                    }
                }
            }
        }
    }

    /// Convolution columns gathered as they are packed give the product with the matrix
    /// written out: channel counts that are not multiples of four, padding, dilation,
    /// non-square kernels, blocks of rows in the middle, rows of 3 and more columns, and
    /// panels that end past the last position. Too narrow an output is declined, unwritten.
    #[test]
    fn gathered_convolution_columns_agree_with_the_matrix() {
        let mut rng = StdRng::seed_from_u64(21);
        // (channels, h, w, kernel, padding, dilation, output rows)
        for (channels, h, w, kernel, padding, dilation, rows) in [
            (16, 32, 32, [3, 3], 1, 1, 0..8),
            (3, 8, 8, [3, 3], 1, 1, 0..8),
            (5, 7, 9, [3, 3], 1, 1, 2..5),
            (2, 5, 5, [5, 5], 2, 1, 0..5),
            (4, 10, 10, [3, 3], 2, 2, 1..10),
            (3, 6, 4, [3, 3], 1, 1, 0..6),
            (2, 3, 3, [3, 3], 1, 1, 0..3),
            (1, 4, 4, [2, 2], 0, 1, 0..3),
            (2, 5, 6, [1, 3], 1, 1, 1..7),
            (7, 12, 12, [3, 3], 0, 1, 3..10),
            (2, 2, 2, [3, 3], 1, 1, 0..2),
        ] {
            let planes: Vec<i8> = (0..channels * h * w)
                .map(|i| match i % 11 {
                    0 => -128,
                    1 => 127,
                    _ => rng.random(),
                })
                .collect();
            let src = Im2col {
                planes: &planes,
                channels,
                h,
                w,
                kernel,
                padding,
                dilation,
                rows,
                ow: w + 2 * padding - dilation * (kernel[1] - 1),
                loads: None,
            };
            let (k, n) = (src.depth(), src.cols());
            let m = 9;
            let a: Vec<i8> = (0..m * k).map(|_| rng.random()).collect();
            let cols = src.matrix();
            // The packed bytes themselves.
            #[cfg(target_arch = "x86_64")]
            if Kernel::Avx512Vnni.available() && src.fused() {
                let want = vnni::pack_b(MatRef::new(&cols, k, n), 0x80);
                // SAFETY: the machine has AVX-512 F, BW and VL.
                let got = unsafe { vnni::pack_conv(&src) };
                assert_eq!(got, want, "{channels}x{h}x{w} {kernel:?}: packed");
                // With the loads worked out beforehand, as blocks of one geometry share them.
                let loads = ConvLoads::new(&src);
                let shared = Im2col {
                    loads: Some(&loads),
                    ..src.clone()
                };
                // SAFETY: as above.
                let got = unsafe { vnni::pack_conv(&shared) };
                assert_eq!(
                    got, want,
                    "{channels}x{h}x{w} {kernel:?}: packed, shared loads"
                );
            }
            let mut want = vec![0; m * n];
            gemm_portable(MatRef::new(&a, m, k), MatRef::new(&cols, k, n), &mut want);
            let ones = vec![1f32; m];
            for kernel in Kernel::available_kernels() {
                let p = PackedA::for_kernel(MatRef::new(&a, m, k), kernel);
                let mut y = vec![f32::NAN; m * n];
                let finish = Finish {
                    scales: &ones,
                    bias: None,
                    ld: n,
                    out: Output::F32(y.as_mut_ptr()),
                };
                // SAFETY: `y` has m rows of n values.
                let done = unsafe { gemm_conv_finished(&p, 0..m, &src, &finish) };
                let case =
                    format!("{kernel:?} {channels}x{h}x{w} k{kernel:?} p{padding} d{dilation}");
                assert_eq!(done, kernel == Kernel::Avx512Vnni && src.ow >= 3, "{case}");
                if !done {
                    assert!(y.iter().all(|v| v.is_nan()), "{case}: wrote");
                    continue;
                }
                let got: Vec<i32> = y.iter().map(|&v| v as i32).collect();
                assert_eq!(got, want, "{case}");
            }
            // From the planes in groups of four channels, with the filters in tap order (for
            // AVX2, planes without a negative value).
            let unsigned: Vec<i8> = planes.iter().map(|&v| v & 0x7f).collect();
            let filters = tap_major(MatRef::new(&a, m, k), channels, kernel[0] * kernel[1]);
            for kernel in Kernel::available_kernels() {
                let planes = if kernel == Kernel::Avx2 {
                    &unsigned
                } else {
                    &planes
                };
                let src = Im2col {
                    planes,
                    ..src.clone()
                };
                let mut want = vec![0; m * n];
                let cols = src.matrix();
                gemm_portable(MatRef::new(&a, m, k), MatRef::new(&cols, k, n), &mut want);
                let quads = quad_planes_vec(planes, [channels, h, w], kernel);
                let p = PackedA::for_kernel(MatRef::new(&filters, m, filters.len() / m), kernel);
                let mut y = vec![f32::NAN; m * n];
                let finish = Finish {
                    scales: &ones,
                    bias: None,
                    ld: n,
                    out: Output::F32(y.as_mut_ptr()),
                };
                // SAFETY: `y` has m rows of n values.
                let done = unsafe { gemm_conv_quads_finished(&p, 0..m, &src, &quads, &finish) };
                let case = format!("quads {kernel:?} {channels}x{h}x{w} p{padding} d{dilation}");
                let gathers = matches!(kernel, Kernel::Avx512Vnni | Kernel::Avx2);
                assert_eq!(done, gathers && src.ow >= 3, "{case}");
                if done {
                    let got: Vec<i32> = y.iter().map(|&v| v as i32).collect();
                    assert_eq!(got, want, "{case}");
                } else {
                    assert!(y.iter().all(|v| v.is_nan()), "{case}: wrote");
                }
            }
        }
    }

    #[test]
    fn quad_planes_and_tap_major_filters_follow_their_definitions() {
        // Five channels (a partial group of four) of 7x9 planes (whole blocks of 16
        // positions and a rest).
        let (channels, h, w) = (5, 7, 9);
        let planes: Vec<i8> = (0..channels * h * w)
            .map(|i| (i * 37 % 256) as u8 as i8)
            .collect();
        // Offset to unsigned bytes for VNNI, as they are for AVX2.
        for (kernel, flip) in [(Kernel::Avx512Vnni, 0x80), (Kernel::Avx2, 0)] {
            let quads = quad_planes_vec(&planes, [channels, h, w], kernel);
            assert_eq!(quads.len(), 2 * h * w * 4);
            for q in 0..2 {
                for i in 0..h * w {
                    for j in 0..4 {
                        let c = 4 * q + j;
                        let want = if c < channels {
                            planes[c * h * w + i] as u8 ^ flip
                        } else {
                            flip
                        };
                        assert_eq!(
                            quads[(q * h * w + i) * 4 + j],
                            want,
                            "{kernel:?}: group {q}, position {i}"
                        );
                    }
                }
            }
        }
        let taps = 9;
        let a: Vec<i8> = (0..2 * channels * taps).map(|i| i as i8).collect();
        let t = tap_major(MatRef::new(&a, 2, channels * taps), channels, taps);
        assert_eq!(t.len(), 2 * taps * 8);
        for (r, row) in t.chunks_exact(taps * 8).enumerate() {
            for tap in 0..taps {
                for c in 0..8 {
                    let want = if c < channels {
                        a[r * channels * taps + c * taps + tap]
                    } else {
                        0
                    };
                    assert_eq!(
                        row[(tap * 2 + c / 4) * 4 + c % 4],
                        want,
                        "row {r}, tap {tap}"
                    );
                }
            }
        }
    }

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
            (9, 64, 40),
            (10, 80, 7),
            (5, 200, 13),
            // Few columns: a dot product per output, over 64-byte chunks and a rest.
            (9, 3, 70),
            (17, 4, 200),
            (6, 2, 64),
            (120, 1, 400),
        ] {
            let a: Vec<i8> = (0..m * k).map(|_| rng.random()).collect();
            // B as a view with a row stride wider than its columns; of any values, then of
            // none negative (AVX2's second product).
            let stride = n + 3;
            let signed: Vec<i8> = (0..k * stride).map(|_| rng.random()).collect();
            let unsigned: Vec<i8> = signed.iter().map(|&v| v & 0x7f).collect();
            for b in [signed, unsigned] {
                let (av, bv) = (
                    MatRef::new(&a, m, k),
                    MatRef {
                        data: &b,
                        rows: k,
                        cols: n,
                        stride,
                    },
                );
                let mut y = vec![0; m * n];
                gemm_portable(av, bv, &mut y);
                for kernel in Kernel::available_kernels() {
                    let mut x = vec![7; m * n];
                    let p = PackedA::for_kernel(av, kernel);
                    gemm_rows(&p, 0..m, bv, &mut x);
                    assert_eq!(x, y, "{kernel:?} {m}x{n}x{k}");
                    // A band of rows, as grouped convolutions use.
                    if m > 2 {
                        let mut z = vec![0; (m - 2) * n];
                        gemm_rows(&p, 1..m - 1, bv, &mut z);
                        assert_eq!(z, y[n..(m - 1) * n], "{kernel:?} rows");
                    }
                }
                // And by the definition.
                let (i, j) = (m - 1, n - 1);
                let d: i32 = (0..k)
                    .map(|t| i32::from(a[i * k + t]) * i32::from(b[t * stride + j]))
                    .sum();
                assert_eq!(y[i * n + j], d);
            }
        }
        // The extremes, where 16-bit pair sums (or unsigned offsets) would overflow.
        let (m, n, k) = (4, 16, 4096);
        for (va, vb) in [(-128i8, -128i8), (127, -128), (-128, 127), (127, 127)] {
            let a = vec![va; m * k];
            let b = vec![vb; k * n];
            for kernel in Kernel::available_kernels() {
                let mut x = vec![0; m * n];
                let p = PackedA::for_kernel(MatRef::new(&a, m, k), kernel);
                gemm_rows(&p, 0..m, MatRef::new(&b, k, n), &mut x);
                let want = i32::from(va) * i32::from(vb) * k as i32;
                assert!(x.iter().all(|&v| v == want), "{kernel:?} {va} {vb}");
            }
        }
        eprintln!("kernels tested: {:?}", Kernel::available_kernels());
    }

    /// Lanes finished onto a grid round exactly as the runtime's quantizer rounds, on the
    /// short way of ReLU grids (`relu_grid`: values above the grid's top saturate as the
    /// narrowing saturates) and the long way of the others: sums at the ends of the int32
    /// range, sums whose values land on and next to halves, -0, grids whose top scales past
    /// 127, and grids the short way must not take (an infinite top, a top times 1 / scale of
    /// 1e9 or more; NaN bounds).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn finished_lanes_round_as_the_quantizer_on_every_grid() {
        if !Kernel::Avx2.available() {
            slim_core::note_skipped("this machine (or SLIM_CPU) lacks AVX2");
            return;
        }
        let [lo, hi, inv] = crate::grid::bounds(0.05);
        let grids: [([f32; 3], bool); 8] = [
            ([lo, hi, inv], false),
            ([0.0, hi, inv], true),
            ([-0.0, hi.min(6.0), inv], true),
            ([0.0, 1000.0, 1.0], true),
            ([0.0, f32::INFINITY, 1.0], false),
            ([0.0, f32::NAN, 1.0], false),
            ([0.0, 1e10, 1.0], false),
            ([0.0, hi, f32::NAN], false),
        ];
        let mut rng = StdRng::seed_from_u64(5);
        let mut sums: Vec<i32> = vec![i32::MIN, i32::MAX, 0, 1, -1, 2, 3, 2539, 2540, 2541];
        // Sums that are halves of the grid (scale 0.5 below, grid 0.05: every 0.1 in y).
        sums.extend((-300..300).map(|h| h * 2 + 1));
        sums.extend((0..2000).map(|_| rng.random_range(-5_000_000..5_000_000)));
        sums.resize(sums.len().next_multiple_of(16), 7);
        for (grid, short) in grids {
            assert_eq!(relu_grid(grid), short, "{grid:?}");
            if grid.iter().any(|b| b.is_nan()) {
                // (No quantizer has such a grid; the scalar `min` and the vector one also
                // differ on NaN: only that it takes the long way matters.)
                continue;
            }
            for (scale, bias) in [(0.05f32, 0.0f32), (0.5, -0.0), (1e-3, 0.25), (3.0, -1.0)] {
                let mut q = vec![99i8; sums.len()];
                let scales = [scale];
                let biases = [bias];
                let f = Finish {
                    scales: &scales,
                    bias: Some(&biases),
                    ld: 0,
                    out: Output::I8(q.as_mut_ptr(), grid),
                };
                let check = |q: &[i8], kernel: Kernel| {
                    for (&s, &got) in sums.iter().zip(q) {
                        let y = s as f32 * scale + bias;
                        let want = crate::grid::round_to_grid(y, grid[0], grid[1], grid[2]);
                        assert_eq!(
                            got, want,
                            "{kernel:?}: sum {s} scale {scale} bias {bias} grid {grid:?}"
                        );
                    }
                };
                if Kernel::Avx512Vnni.available() {
                    for (c, lanes) in sums.chunks_exact(16).enumerate() {
                        // SAFETY: the machine has AVX-512 (checked above); `lanes` holds 16
                        // values and `q` 16 from `16 c` on.
                        unsafe {
                            let s = std::arch::x86_64::_mm512_loadu_si512(lanes.as_ptr().cast());
                            vnni::finish_row(&f, &vnni::Lanes::new(f.out), 0, 16 * c, u16::MAX, s)
                        }
                    }
                    check(&q, Kernel::Avx512Vnni);
                }
                // AVX2's rows of two registers; the last one's first 7 columns only.
                let mut q = vec![99i8; sums.len()];
                let f = Finish {
                    out: Output::I8(q.as_mut_ptr(), grid),
                    ..f
                };
                let chunks = sums.len() / 16;
                for (c, lanes) in sums.chunks_exact(16).enumerate() {
                    let w = if c + 1 == chunks { 7 } else { 16 };
                    // SAFETY: the machine has AVX2 (checked above); `lanes` holds 16 values and
                    // `q` 16 from `16 c` on.
                    unsafe {
                        use std::arch::x86_64::_mm256_loadu_si256;
                        let s = [0, 8].map(|i| _mm256_loadu_si256(lanes[i..].as_ptr().cast()));
                        avx2::finish_row(&f, &avx2::Lanes::new(f.out), 0, 16 * c, w, s)
                    }
                }
                let last = 16 * (chunks - 1) + 7;
                check(&q[..last], Kernel::Avx2);
                assert!(
                    q[last..].iter().all(|&v| v == 99),
                    "AVX2 wrote past its columns"
                );
            }
        }
    }

    /// A row finished through a mask writes the lanes in the mask and nothing else, as f32
    /// and as int8, with a mask the compiler knows to be one lane (which it once turned into
    /// a 4-byte store of the int8 lane) and with masks it does not know.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn finished_lanes_write_only_their_mask() {
        if !Kernel::Avx512Vnni.available() {
            slim_core::note_skipped("this machine (or SLIM_CPU) lacks AVX-512 VNNI");
            return;
        }
        let scales = [0.5f32; 2];
        let bias = [1.0f32, -1.0];
        let finish = |out: Output| Finish {
            scales: &scales,
            bias: Some(&bias),
            ld: 20,
            out,
        };
        // Column c of row r gets (3 + c) * 0.5 + bias[r] (all positive); int8 on a grid of
        // 0.1, with and without a ReLU (the short way of rounding, see `relu_grid`).
        let want = |r: usize, c: usize| (3 + c) as f32 * 0.5 + bias[r];
        // SAFETY: the machine has AVX-512 (checked above).
        let sums = |c: usize| unsafe { std::arch::x86_64::_mm512_set1_epi32(3 + c as i32) };
        let grid = [-10.0, 10.0, 10.0];
        let relu = [0.0, 10.0, 10.0];
        /// `finish_row` compiled into a caller with its features, the mask a constant.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn one_lane(f: &Finish<'_>, r: usize, c: usize, s: std::arch::x86_64::__m512i) {
            // SAFETY: as the caller promises.
            unsafe { vnni::finish_row(f, &vnni::Lanes::new(f.out), r, c, 1, s) }
        }
        for way in ["one lane, known", "one lane", "lanes 0 and 15"] {
            let mut f32s = vec![-7.0f32; 2 * 20];
            let mut i8s = vec![-7i8; 2 * 20];
            let mut relu8s = vec![-7i8; 2 * 20];
            for out in [
                Output::F32(f32s.as_mut_ptr()),
                Output::I8(i8s.as_mut_ptr(), grid),
                Output::I8(relu8s.as_mut_ptr(), relu),
            ] {
                let f = finish(out);
                for r in 0..2 {
                    for c in 0..3 {
                        // SAFETY: lanes 0 and 15 from column c of row r lie inside the rows
                        // of 20; the machine has AVX-512 (checked above).
                        unsafe {
                            match way {
                                "one lane, known" => one_lane(&f, r, c, sums(c)),
                                "one lane" => vnni::finish_row(
                                    &f,
                                    &vnni::Lanes::new(f.out),
                                    r,
                                    c,
                                    std::hint::black_box(1),
                                    sums(c),
                                ),
                                _ => vnni::finish_row(
                                    &f,
                                    &vnni::Lanes::new(f.out),
                                    r,
                                    c,
                                    std::hint::black_box(0x8001),
                                    sums(c),
                                ),
                            }
                        }
                    }
                }
            }
            for r in 0..2 {
                for c in 0..20 {
                    let written = c < 3 || way == "lanes 0 and 15" && (15..18).contains(&c);
                    let (f, q) = if !written {
                        (-7.0, -7)
                    } else {
                        let c = if c < 3 { c } else { c - 15 };
                        (want(r, c), (want(r, c) * 10.0).round() as i8)
                    };
                    assert_eq!(f32s[r * 20 + c], f, "{way}: f32 row {r} column {c}");
                    assert_eq!(i8s[r * 20 + c], q, "{way}: int8 row {r} column {c}");
                    assert_eq!(relu8s[r * 20 + c], q, "{way}: ReLU int8 row {r} column {c}");
                }
            }
        }
    }
}
