//! The int8 runtime: quantized convolutions and linear layers computed in integers.
//!
//! A layer runs in integers when its weight is held as int8 ([`Model::int8`]) and its input
//! comes from a fake-quantization node: the input is taken to its int8 grid
//! (`round(x / s_in)`), multiplied with the int8 weights with 32-bit accumulation, and the sums
//! are scaled back (`acc * s_in * s_w[o] + bias[o]`). Everything else (activations, pooling,
//! additions) runs as in the float model. The dot products run over contiguous rows of int8
//! values (an input patch and a filter), which the compiler vectorizes; rayon spreads the
//! output rows over the cores.

use candle_core::Tensor;
use rayon::prelude::*;
use slim_core::exec::NodeKernels;
use slim_core::train::EvalReport;
use slim_core::{ForwardOptions, Mode, Model, Node, Op};

use crate::gemm::dots;
use crate::Result;

/// The shapes of one convolution.
struct Geometry<'a> {
    cin: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    spec: &'a slim_core::Conv2dSpec,
}

/// Output positions per task of a convolution: enough work to amortize a task, small enough
/// that a batch of one still spreads over the cores.
const PATCHES_PER_TASK: usize = 64;

/// A dense or grouped convolution: per (sample, group, block of output positions), the input
/// patches are gathered as int8 rows and every filter of the group is dotted with them.
fn grouped(
    xq: &[i8],
    wq: &[i8],
    geo: &Geometry<'_>,
    n: usize,
    scales: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let c = geo.spec;
    let g = c.groups.max(1);
    let (cg, og) = (geo.cin / g, c.out_channels / g);
    let (kh, kw) = (c.kernel[0], c.kernel[1]);
    let k = cg * kh * kw;
    let p = geo.oh * geo.ow;
    let blocks = p.div_ceil(PATCHES_PER_TASK);
    let results: Vec<(usize, Vec<f32>)> = (0..n * g * blocks)
        .into_par_iter()
        .map(|task| {
            let (sg, blk) = (task / blocks, task % blocks);
            let (s, gi) = (sg / g, sg % g);
            let p0 = blk * PATCHES_PER_TASK;
            let np = PATCHES_PER_TASK.min(p - p0);
            let mut cols = vec![0i8; np * k];
            for (pi, col) in cols.chunks_exact_mut(k).enumerate() {
                let (oy, ox) = ((p0 + pi) / geo.ow, (p0 + pi) % geo.ow);
                let mut idx = 0;
                for ci in 0..cg {
                    let plane = (s * geo.cin + gi * cg + ci) * geo.h * geo.w;
                    for ky in 0..kh {
                        let iy = (oy * c.stride + ky * c.dilation) as isize - c.padding as isize;
                        for kx in 0..kw {
                            let ix =
                                (ox * c.stride + kx * c.dilation) as isize - c.padding as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < geo.h && (ix as usize) < geo.w
                            {
                                col[idx] = xq[plane + iy as usize * geo.w + ix as usize];
                            }
                            idx += 1;
                        }
                    }
                }
            }
            let mut acc = vec![0i32; og * np];
            dots(&wq[gi * og * k..(gi + 1) * og * k], og, &cols, np, k, &mut acc);
            let vals: Vec<f32> = acc
                .chunks_exact(np)
                .enumerate()
                .flat_map(|(oi, row)| {
                    let o = gi * og + oi;
                    let (sc, b) = (scales[o], bias.map_or(0.0, |b| b[o]));
                    row.iter().map(move |&a| a as f32 * sc + b)
                })
                .collect();
            (task, vals)
        })
        .collect();
    let oc = c.out_channels;
    let mut out = vec![0f32; n * oc * p];
    for (task, vals) in results {
        let (sg, blk) = (task / blocks, task % blocks);
        let (s, gi) = (sg / g, sg % g);
        let p0 = blk * PATCHES_PER_TASK;
        let np = PATCHES_PER_TASK.min(p - p0);
        for (oi, row) in vals.chunks_exact(np).enumerate() {
            let base = (s * oc + gi * og + oi) * p + p0;
            out[base..base + np].copy_from_slice(row);
        }
    }
    out
}

/// A depthwise convolution, directly: per (sample, channel) plane, each kernel tap adds its
/// weight times a shifted input row into 32-bit accumulators of an output row.
fn depthwise(
    xq: &[i8],
    wq: &[i8],
    geo: &Geometry<'_>,
    n: usize,
    scales: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let c = geo.spec;
    let (kh, kw) = (c.kernel[0], c.kernel[1]);
    let (h, w, oh, ow) = (geo.h, geo.w, geo.oh, geo.ow);
    let ch = geo.cin;
    let mut out = vec![0f32; n * ch * oh * ow];
    out.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(plane, dst)| {
            let ci = plane % ch;
            let src = &xq[plane * h * w..(plane + 1) * h * w];
            let filt = &wq[ci * kh * kw..(ci + 1) * kh * kw];
            let (sc, b) = (scales[ci], bias.map_or(0.0, |b| b[ci]));
            let mut acc = vec![0i32; ow];
            for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
                acc.iter_mut().for_each(|a| *a = 0);
                for ky in 0..kh {
                    let iy = (oy * c.stride + ky * c.dilation) as isize - c.padding as isize;
                    if iy < 0 || iy as usize >= h {
                        continue;
                    }
                    let line = &src[iy as usize * w..(iy as usize + 1) * w];
                    for kx in 0..kw {
                        let wv = i32::from(filt[ky * kw + kx]);
                        let off = (kx * c.dilation) as isize - c.padding as isize;
                        // Output columns whose input column is inside the row.
                        let lo = if off < 0 { (-off) as usize } else { 0 }.div_ceil(c.stride);
                        let hi = ((w as isize - off + c.stride as isize - 1) / c.stride as isize)
                            .clamp(0, ow as isize) as usize;
                        if c.stride == 1 {
                            let start = (lo as isize + off) as usize;
                            for (a, &v) in acc[lo..hi.max(lo)].iter_mut().zip(&line[start..]) {
                                *a += i32::from(v) * wv;
                            }
                        } else {
                            for (ox, a) in acc.iter_mut().enumerate().take(hi).skip(lo) {
                                let ix = (ox * c.stride) as isize + off;
                                *a += i32::from(line[ix as usize]) * wv;
                            }
                        }
                    }
                }
                for (y, &a) in row.iter_mut().zip(&acc) {
                    *y = a as f32 * sc + b;
                }
            }
        });
    out
}

/// The integer kernels, to pass to a forward as [`ForwardOptions::kernels`].
pub struct Int8Kernels;

/// The input's fake-quantization scale, when the node reads one.
fn input_scale(model: &Model, node: &Node) -> slim_core::Result<Option<f32>> {
    let src = model.graph.node(node.inputs[0]);
    if !matches!(src.op, Op::FakeQuant(_)) {
        return Ok(None);
    }
    Ok(Some(
        model
            .params
            .tensor(&src.param_name("scale"))?
            .to_vec1::<f32>()?[0],
    ))
}

fn to_i8(x: &Tensor, scale: f32) -> slim_core::Result<Vec<i8>> {
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter()
        .map(|&a| (a / scale).round().clamp(-127.0, 127.0) as i8)
        .collect())
}

impl NodeKernels for Int8Kernels {
    fn run(
        &self,
        model: &Model,
        node: &Node,
        inputs: &[&Tensor],
        _mode: Mode,
    ) -> slim_core::Result<Option<Tensor>> {
        if let Op::FakeQuant(_) = node.op {
            // When every reader of a quantizer is an integer layer, those layers round the
            // input to the same grid themselves: the float rounding would be done twice.
            let id = model.graph.id(&node.name)?;
            let readers = model.graph.successors(id);
            let all_int = !readers.is_empty()
                && readers.iter().all(|&r| {
                    let n = model.graph.node(r);
                    matches!(n.op, Op::Conv2d(_) | Op::Linear(_))
                        && model.int8.contains_key(&n.param_name("weight"))
                });
            let is_output = model.graph.outputs().contains(&id);
            return Ok((all_int && !is_output).then(|| inputs[0].clone()));
        }
        let (Some(w), Some(s_in)) = (
            model.int8.get(&node.param_name("weight")),
            input_scale(model, node)?,
        ) else {
            return Ok(None);
        };
        let x = inputs[0];
        let device = x.device().clone();
        let bias: Option<Vec<f32>> = match model.params.tensor(&node.param_name("bias")) {
            Ok(b) => Some(b.to_vec1::<f32>()?),
            Err(_) => None,
        };
        let xq = to_i8(x, s_in)?;
        let per_scale = w.values.len() / w.scales.len();
        match &node.op {
            Op::Linear(l) => {
                let (n, k, o) = (x.dim(0)?, l.in_features, l.out_features);
                // Output rows in parallel: each a block of samples against every filter.
                let rows = n.div_ceil(rayon::current_num_threads().max(1)).max(1);
                let mut out = vec![0f32; n * o];
                out.par_chunks_mut(rows * o)
                    .enumerate()
                    .for_each(|(t, dst)| {
                        let s0 = t * rows;
                        let ns = dst.len() / o;
                        let mut acc = vec![0i32; o * ns];
                        dots(&w.values, o, &xq[s0 * k..(s0 + ns) * k], ns, k, &mut acc);
                        for j in 0..o {
                            let scale = s_in * w.scales[(j * k) / per_scale];
                            let b = bias.as_ref().map_or(0.0, |b| b[j]);
                            for si in 0..ns {
                                dst[si * o + j] = acc[j * ns + si] as f32 * scale + b;
                            }
                        }
                    });
                Ok(Some(Tensor::from_vec(out, (n, o), &device)?))
            }
            Op::Conv2d(c) => {
                let (n, cin, h, wd) = x.dims4()?;
                let [oc, oh, ow] = node.shape[..] else {
                    return Ok(None);
                };
                let scales: Vec<f32> = (0..oc)
                    .map(|o| s_in * w.scales[(o * w.values.len() / oc) / per_scale])
                    .collect();
                let geo = Geometry { cin, h, w: wd, oh, ow, spec: c };
                let out = if c.is_depthwise() {
                    depthwise(&xq, &w.values, &geo, n, &scales, bias.as_deref())
                } else {
                    grouped(&xq, &w.values, &geo, n, &scales, bias.as_deref())
                };
                Ok(Some(Tensor::from_vec(out, (n, oc, oh, ow), &device)?))
            }
            _ => Ok(None),
        }
    }
}

/// The forward of a quantized model with its quantized layers computed in integers.
pub fn forward(model: &Model, x: &Tensor) -> Result<Tensor> {
    let out = model.forward_with(
        std::slice::from_ref(x),
        Mode::Eval,
        ForwardOptions {
            kernels: Some(&Int8Kernels),
            ..Default::default()
        },
    )?;
    Ok(out
        .outputs
        .into_iter()
        .next()
        .ok_or_else(|| slim_core::CoreError::Invalid("the graph has no output".into()))?)
}

/// Top-1 and top-5 of a quantized model run by the int8 runtime.
pub fn evaluate(
    model: &Model,
    set: &slim_core::data::ImageSet,
    normalize: &slim_core::data::Normalize,
    batch_size: usize,
) -> Result<EvalReport> {
    Ok(slim_core::train::evaluate_with(
        model,
        set,
        normalize,
        batch_size,
        &|m, x| {
            forward(m, x).map_err(|e| match e {
                crate::QuantError::Core(c) => c,
                other => slim_core::CoreError::Invalid(other.to_string()),
            })
        },
    )?)
}

/// How many of the samples in `x` get the same top-1 class from the int8 runtime and from the
/// model's float forward (the fake-quantized graph).
pub fn agreement(model: &Model, x: &Tensor) -> Result<(usize, usize)> {
    let a = forward(model, x)?.argmax(1)?.to_vec1::<u32>()?;
    let b = model.forward(x, Mode::Eval)?.argmax(1)?.to_vec1::<u32>()?;
    Ok((a.iter().zip(&b).filter(|(x, y)| x == y).count(), a.len()))
}
