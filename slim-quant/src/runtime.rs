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

use crate::Result;

/// The integer kernels, to pass to a forward as [`ForwardOptions::kernels`].
pub struct Int8Kernels;

fn dot(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

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
                let mut out = vec![0f32; n * o];
                out.par_chunks_mut(o).enumerate().for_each(|(i, row)| {
                    let a = &xq[i * k..(i + 1) * k];
                    for (j, y) in row.iter_mut().enumerate() {
                        let acc = dot(a, &w.values[j * k..(j + 1) * k]);
                        let s = w.scales[(j * k) / per_scale];
                        *y = acc as f32 * s_in * s + bias.as_ref().map_or(0.0, |b| b[j]);
                    }
                });
                Ok(Some(Tensor::from_vec(out, (n, o), &device)?))
            }
            Op::Conv2d(c) => {
                let (n, cin, h, wd) = x.dims4()?;
                let [oc, oh, ow] = node.shape[..] else {
                    return Ok(None);
                };
                let g = c.groups.max(1);
                let (cg, og) = (cin / g, oc / g);
                let (kh, kw) = (c.kernel[0], c.kernel[1]);
                let k = cg * kh * kw;
                let p = oh * ow;
                let mut out = vec![0f32; n * oc * p];
                // One task per (sample, group): gather that group's input patches, then every
                // output channel of the group is a row of dot products against them.
                out.par_chunks_mut(og * p)
                    .enumerate()
                    .for_each(|(task, dst)| {
                        let (s, gi) = (task / g, task % g);
                        let mut cols = vec![0i8; p * k];
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let col = &mut cols[(oy * ow + ox) * k..(oy * ow + ox + 1) * k];
                                let mut idx = 0;
                                for ci in 0..cg {
                                    let plane = (s * cin + gi * cg + ci) * h * wd;
                                    for ky in 0..kh {
                                        let iy = (oy * c.stride + ky * c.dilation) as isize
                                            - c.padding as isize;
                                        for kx in 0..kw {
                                            let ix = (ox * c.stride + kx * c.dilation) as isize
                                                - c.padding as isize;
                                            col[idx] = if iy >= 0
                                                && ix >= 0
                                                && (iy as usize) < h
                                                && (ix as usize) < wd
                                            {
                                                xq[plane + iy as usize * wd + ix as usize]
                                            } else {
                                                0
                                            };
                                            idx += 1;
                                        }
                                    }
                                }
                            }
                        }
                        for oi in 0..og {
                            let o = gi * og + oi;
                            let filt = &w.values[o * k..(o + 1) * k];
                            let s_w = w.scales[(o * k) / per_scale];
                            let b = bias.as_ref().map_or(0.0, |b| b[o]);
                            let row = &mut dst[oi * p..(oi + 1) * p];
                            for (pi, y) in row.iter_mut().enumerate() {
                                let acc = dot(&cols[pi * k..(pi + 1) * k], filt);
                                *y = acc as f32 * s_in * s_w + b;
                            }
                        }
                    });
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
