//! Windows and borders in the forward: pooling (square windows on the fast kernels, any
//! other by gathering its taps), transposed convolution as a convolution, and padding.

use super::*;

/// Pads the planes of `[N, C, H, W]` values with `value`: `[top, left, bottom, right]`.
fn pad_sides(x: &Tensor, [top, left, bottom, right]: [usize; 4], value: f32) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let fill = |rows: usize, cols: usize| -> Result<Tensor> {
        Ok(Tensor::full(value, (n, c, rows, cols), x.device())?.to_dtype(x.dtype())?)
    };
    let mut x = x.clone();
    if top + bottom > 0 {
        x = Tensor::cat(&[&fill(top, w)?, &x, &fill(bottom, w)?], 2)?;
    }
    if left + right > 0 {
        let rows = h + top + bottom;
        x = Tensor::cat(&[&fill(rows, left)?, &x, &fill(rows, right)?], 3)?;
    }
    Ok(x)
}

/// Max pooling: padding (and the partial windows of ceil mode) is -inf, which no window
/// maximum can pick over a value of the input.
pub(super) fn max_pool(x: &Tensor, p: &PoolSpec) -> Result<Tensor> {
    let Some(q) = p.square() else {
        return Ok(pool_windows(x, p, f32::NEG_INFINITY)?.max(4)?.max(2)?);
    };
    let x = pad_sides(x, [0, 0, q.pad_end[0], q.pad_end[1]], f32::NEG_INFINITY)?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let op = crate::kernels::MaxPool {
            kernel: q.kernel,
            stride: q.stride,
            pad: q.padding,
        };
        Ok(x.contiguous()?.apply_op1(op)?)
    } else {
        let padded = pad_sides(&x, [q.padding; 4], f32::NEG_INFINITY)?;
        Ok(padded.max_pool2d_with_stride(q.kernel, q.stride)?)
    }
}

/// Average pooling. A square window is a depthwise convolution with a filter of ones, whose
/// gradient (unlike candle's pooling, which back-propagates only windows that tile the
/// plane) covers overlapping windows, strides and padding; other windows sum
/// [`pool_windows`].
pub(super) fn avg_pool(x: &Tensor, p: &PoolSpec) -> Result<Tensor> {
    // Each window's mean over its whole extent, padding included.
    let mean = |x: &Tensor, channels: usize| -> Result<Tensor> {
        let Some(q) = p.square() else {
            let sums = pool_windows(x, p, 0.0)?.sum(4)?.sum(2)?;
            return Ok((sums / (p.kernel[0] * p.kernel[1]) as f64)?);
        };
        let k = q.kernel;
        let padded = pad_sides(x, [0, 0, q.pad_end[0], q.pad_end[1]], 0.0)?;
        let w = Tensor::full(1.0 / (k * k) as f32, (channels, 1, k, k), x.device())?
            .to_dtype(x.dtype())?;
        let spec = Conv2dSpec::new(channels, channels, k)
            .with_stride(q.stride)
            .with_padding(q.padding)
            .with_groups(channels);
        Ok(crate::kernels::conv2d(&padded, &w, None, &spec)?)
    };
    let means = mean(x, x.dim(1)?)?;
    if !p.exclude_pad || p.pads == [0; 4] {
        return Ok(means);
    }
    // The share of each window that lies inside the input, from a plane of ones.
    let (_, _, h, w) = x.dims4()?;
    let ones = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?;
    let share = mean(&ones, 1)?;
    Ok(means.broadcast_div(&share)?)
}

/// Every window of a pool over `[N, C, H, W]` values padded with `fill`, as
/// `[N, C, kh, OH, kw, OW]`: the general path, for windows the square kernels do not take
/// (rectangular, dilated, unequal strides or padding). Its gradient is index_select's.
fn pool_windows(x: &Tensor, p: &PoolSpec, fill: f32) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let padded = pad_sides(x, p.pads, fill)?.contiguous()?;
    let size = |axis: usize, len: usize| {
        p.out_size(axis, len).ok_or_else(|| {
            CoreError::Invalid(format!(
                "pool window {}x{} does not fit the {h}x{w} input",
                p.span(0),
                p.span(1)
            ))
        })
    };
    let (oh, ow) = (size(0, h)?, size(1, w)?);
    let taps = |axis: usize, out: usize| -> Result<Tensor> {
        let (s, d) = (p.stride[axis], p.dilation[axis]);
        let idx: Vec<u32> = (0..p.kernel[axis])
            .flat_map(|k| (0..out).map(move |o| (o * s + k * d) as u32))
            .collect();
        let len = idx.len();
        Ok(Tensor::from_vec(idx, len, x.device())?)
    };
    let rows = padded.index_select(&taps(0, oh)?, 2)?;
    let windows = rows.index_select(&taps(1, ow)?, 3)?;
    Ok(windows.reshape((n, c, p.kernel[0], oh, p.kernel[1], ow))?)
}

/// A transposed convolution as a convolution: the inputs spread `stride` apart, bordered by
/// `dilation * (k - 1)` zeros less the padding on that side (cropped where that is negative,
/// `output_padding` more at the end), convolved with the filters' channel axes swapped per group and their
/// taps reversed. Its gradient is the convolution's.
pub(super) fn conv_transpose(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    c: &ConvTransposeSpec,
) -> Result<Tensor> {
    let (n, ci, h, wd) = x.dims4()?;
    let [sh, sw] = c.stride;
    let mut y = if sh > 1 || sw > 1 {
        x.reshape((n, ci, h, 1, wd, 1))?
            .pad_with_zeros(3, 0, sh - 1)?
            .pad_with_zeros(5, 0, sw - 1)?
            .reshape((n, ci, h * sh, wd * sw))?
            .narrow(2, 0, (h - 1) * sh + 1)?
            .narrow(3, 0, (wd - 1) * sw + 1)?
    } else {
        x.clone()
    };
    for (i, k) in c.kernel.into_iter().enumerate() {
        let (axis, full) = (i + 2, (c.dilation * (k - 1)) as isize);
        let before = full - c.pads[i] as isize;
        let after = full - c.pads[i + 2] as isize + c.output_padding[i] as isize;
        // Padded first, then cropped: one side's crop may exceed the input where the other
        // side's padding makes up for it (the output size is positive).
        y = y.pad_with_zeros(axis, before.max(0) as usize, after.max(0) as usize)?;
        let len = y.dim(axis)?;
        let crop_before = (-before).max(0) as usize;
        let crop_after = (-after).max(0) as usize;
        if crop_before + crop_after > 0 {
            y = y.narrow(axis, crop_before, len - crop_before - crop_after)?;
        }
    }
    let (g, [kh, kw]) = (c.groups, c.kernel);
    let (ipg, opg) = (ci / g, c.out_channels / g);
    let flip =
        |len: usize| Tensor::from_vec((0..len as u32).rev().collect::<Vec<u32>>(), len, x.device());
    let filters = w
        .reshape((g, ipg, opg, kh, kw))?
        .transpose(1, 2)?
        .reshape((c.out_channels, ipg, kh, kw))?
        .index_select(&flip(kh)?, 2)?
        .index_select(&flip(kw)?, 3)?
        .contiguous()?;
    let spec = Conv2dSpec {
        in_channels: ci,
        out_channels: c.out_channels,
        kernel: c.kernel,
        stride: 1,
        padding: 0,
        dilation: c.dilation,
        groups: g,
        bias: b.is_some(),
    };
    Ok(crate::kernels::conv2d(
        &y.contiguous()?,
        &filters,
        b,
        &spec,
    )?)
}

/// Source indices of a padded axis of `len` values, `before` and `after` added.
fn pad_indices(len: usize, before: usize, after: usize, mode: PadMode) -> Vec<u32> {
    let last = len as isize - 1;
    (-(before as isize)..len as isize + after as isize)
        .map(|i| match mode {
            PadMode::Reflect if i < 0 => -i,
            PadMode::Reflect if i > last => 2 * last - i,
            _ => i.clamp(0, last),
        })
        .map(|i| i as u32)
        .collect()
}

pub(super) fn pad(x: &Tensor, [t, l, b, r]: [usize; 4], mode: PadMode) -> Result<Tensor> {
    let zeros =
        |x: &Tensor| -> Result<Tensor> { Ok(x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?) };
    match mode {
        PadMode::Constant(0.0) => zeros(x),
        PadMode::Constant(v) => {
            // Zeros, then `v` wherever a plane of ones padded with zeros is zero.
            let (_, _, h, w) = x.dims4()?;
            let inside = zeros(&Tensor::ones((1, 1, h, w), x.dtype(), x.device())?)?;
            let border = inside.affine(-f64::from(v), f64::from(v))?;
            Ok(zeros(x)?.broadcast_add(&border)?)
        }
        PadMode::Edge | PadMode::Reflect => {
            let (_, _, h, w) = x.dims4()?;
            let rows = pad_indices(h, t, b, mode);
            let cols = pad_indices(w, l, r, mode);
            let rows = Tensor::from_vec(rows.clone(), rows.len(), x.device())?;
            let cols = Tensor::from_vec(cols.clone(), cols.len(), x.device())?;
            Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
        }
    }
}
