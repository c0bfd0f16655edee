//! Int8 max pooling.

use super::*;

/// Max pooling of int8 values held as `U8` (see [`Int8Kernels::new`]); padding never wins.
/// Per output row, each window row and column offset is one sweep over the row.
pub(super) fn max_pool_i8(
    x: &Tensor,
    p: &slim_core::graph::PoolSpec,
    node: &str,
) -> slim_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let out = |axis: usize, d: usize| {
        p.out_size(axis, d)
            .ok_or_else(|| slim_core::CoreError::Node {
                node: node.to_string(),
                msg: format!("the pool window does not fit the {h}x{w} input"),
            })
    };
    let (oh, ow) = (out(0, h)?, out(1, w)?);
    let y = with_int8(x, node, |xs| {
        max_pool_values(xs, [n * c, h, w], [oh, ow], p)
    })?;
    int8_tensor(y, vec![n, c, oh, ow], x.device())
}

/// The pooled planes of [`max_pool_i8`]: `[planes, h, w]` values to `[planes, oh, ow]`.
pub(super) fn max_pool_values(
    xs: &[i8],
    [planes, h, w]: [usize; 3],
    [oh, ow]: [usize; 2],
    p: &slim_core::graph::PoolSpec,
) -> Vec<i8> {
    let per = (4096 / (h * w).max(1)).max(1);
    let mut y = vec![i8::MIN; planes * oh * ow];
    let work = y.len() * p.kernel[0] * p.kernel[1];
    // The common 2x2 window at stride 2 without padding: one pass over each pair of rows.
    let halving = p.kernel == [2, 2]
        && p.stride == [2, 2]
        && p.dilation == [1, 1]
        && p.pads == [0; 4]
        && 2 * oh <= h
        && 2 * ow <= w;
    let wide = crate::gemm::Kernel::Avx512Vnni.available();
    for_each_chunk(
        &mut y,
        oh * ow * per,
        work < SERIAL_VALUES,
        |(task, dst)| {
            for (j, plane_out) in dst.chunks_exact_mut(oh * ow).enumerate() {
                let plane = &xs[(task * per + j) * h * w..][..h * w];
                if halving {
                    max_pool_halving(plane, w, plane_out, ow, wide);
                } else {
                    max_pool_plane(plane, [h, w], plane_out, ow, p);
                }
            }
        },
    );
    y
}

/// One plane's max pooling, any window (`out` starts at `i8::MIN`).
pub(super) fn max_pool_plane(
    plane: &[i8],
    [h, w]: [usize; 2],
    out: &mut [i8],
    ow: usize,
    p: &slim_core::graph::PoolSpec,
) {
    let ([sy, sx], [dy, dx]) = (p.stride, p.dilation);
    let (top, left) = (p.pads[0] as isize, p.pads[1] as isize);
    for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
        for ky in 0..p.kernel[0] {
            let iy = (oy * sy + ky * dy) as isize - top;
            if iy < 0 || iy as usize >= h {
                continue;
            }
            let line = &plane[iy as usize * w..][..w];
            for kx in 0..p.kernel[1] {
                let off = (kx * dx) as isize - left;
                let (lo, hi) = valid_columns(off, sx, w, ow);
                if lo >= hi {
                    continue;
                }
                let start = ((lo * sx) as isize + off) as usize;
                for (i, v) in row[lo..hi].iter_mut().enumerate() {
                    *v = (*v).max(line[start + i * sx]);
                }
            }
        }
        // A window of padding only (which a valid pooling never has) reads as
        // the float graph's -inf clipped to the grid.
        row.iter_mut().for_each(|v| *v = (*v).max(-127));
    }
}

/// One plane's 2x2 max pooling at stride 2 without padding (`2 oh <= h`, `2 ow <= w`): the
/// same values as [`max_pool_plane`], from each pair of rows in one pass.
pub(super) fn max_pool_halving(plane: &[i8], w: usize, out: &mut [i8], ow: usize, wide: bool) {
    for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
        let a = &plane[2 * oy * w..][..2 * ow];
        let b = &plane[(2 * oy + 1) * w..][..2 * ow];
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: `wide` says the machine has AVX-512 F, BW and VL.
            unsafe { halve_bytes::pool_pairs(a, b, row) };
            continue;
        }
        for ((v, a), b) in row.iter_mut().zip(a.chunks_exact(2)).zip(b.chunks_exact(2)) {
            *v = a[0].max(a[1]).max(b[0]).max(b[1]).max(-127);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod halve_bytes {
    use std::arch::x86_64::*;

    /// One output row of [`super::max_pool_halving`] with AVX-512 BW, 32 outputs at a time:
    /// the two input rows' maxima, then each pair of neighbours' as the high and low bytes
    /// of 16-bit words (each sign-extended), at least -127, narrowed back to bytes.
    ///
    /// # Safety
    /// The machine has AVX-512 F, BW and VL; `a` and `b` hold `2 * out.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(in crate::runtime) unsafe fn pool_pairs(a: &[i8], b: &[i8], out: &mut [i8]) {
        let n = out.len();
        assert!(
            a.len() >= 2 * n && b.len() >= 2 * n,
            "pool_pairs: rows too short"
        );
        let floor = _mm512_set1_epi16(-127);
        let mut i = 0;
        while i < n {
            let count = (n - i).min(32);
            let m_in = u64::MAX >> (64 - 2 * count);
            let m_out = u32::MAX >> (32 - count);
            // SAFETY: the masks select values inside the slices (checked above); masked-off
            // values are neither read nor written.
            unsafe {
                let top = _mm512_maskz_loadu_epi8(m_in, a.as_ptr().add(2 * i));
                let bottom = _mm512_maskz_loadu_epi8(m_in, b.as_ptr().add(2 * i));
                let m = _mm512_max_epi8(top, bottom);
                let even = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(m));
                let odd = _mm512_srai_epi16::<8>(m);
                let pooled = _mm512_max_epi16(_mm512_max_epi16(even, odd), floor);
                let bytes = _mm512_cvtepi16_epi8(pooled);
                _mm256_mask_storeu_epi8(out.as_mut_ptr().add(i), m_out, bytes);
            }
            i += 32;
        }
    }

    /// [`super::every_nth`] at stride 2.
    ///
    /// # Safety
    /// The machine has AVX-512 F, BW and VL; `src` holds `2 * dst.len() - 1` values or more.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(in crate::runtime) unsafe fn evens(dst: &mut [i8], src: &[i8]) {
        let n = dst.len();
        let mut i = 0;
        while i < n {
            let count = (n - i).min(32);
            // The bytes read: up to the last even one wanted.
            let span = 2 * count - 1;
            let m_in = u64::MAX >> (64 - span);
            let m_out = u32::MAX >> (32 - count);
            // SAFETY: the masks select bytes inside both slices (`2 i + span <= 2 n - 1`);
            // masked-off bytes are neither read nor written.
            unsafe {
                let v = _mm512_maskz_loadu_epi8(m_in, src.as_ptr().add(2 * i));
                let evens = _mm512_cvtepi16_epi8(v);
                _mm256_mask_storeu_epi8(dst.as_mut_ptr().add(i), m_out, evens);
            }
            i += 32;
        }
    }
}
