//! ReLU and ReLU6 as one clipping op with a one-pass gradient.
//!
//! candle writes ReLU6 as `relu(x).minimum(6)`; its backward builds comparison masks for
//! both steps (and a gradient for the constant 6, summed over the whole tensor): about ten
//! passes over every activation of a training step. Here the forward is one pass and the
//! backward another, `dy` where `0 < x < max` and zero elsewhere (PyTorch's convention at
//! the two edges).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use std::mem::MaybeUninit;

use super::{f32_slice, written, SERIAL_VALUES};

/// `clamp(x, 0, max)`: ReLU with `max = ∞`, ReLU6 with `max = 6`. f32 on the CPU.
pub struct Clip {
    pub max: f32,
}

/// Values per task: enough to pay for a handoff to the pool.
const CHUNK: usize = 1 << 14;

impl CustomOp1 for Clip {
    fn name(&self) -> &'static str {
        "slim-clip"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let max = self.max;
        let chunk = |(i, out): (usize, &mut [MaybeUninit<f32>])| {
            for (o, &v) in out.iter_mut().zip(&x[i * CHUNK..]) {
                // `max(0)` first: a NaN input comes out as 0, as candle's ReLU gives.
                o.write(v.max(0.0).min(max));
            }
        };
        // SAFETY: each chunk's values are written (`x` has as many as the output).
        let y = unsafe { written(x.len(), CHUNK, x.len() < SERIAL_VALUES, chunk) };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad, &ClipGrad { max: self.max })?,
        ))
    }
}

/// `(x, dy) → dy where 0 < x < max, else 0`.
pub(super) struct ClipGrad {
    pub(super) max: f32,
}

impl CustomOp2 for ClipGrad {
    fn name(&self) -> &'static str {
        "slim-clip-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        if x.len() != g.len() {
            candle_core::bail!("{}: {} inputs, {} gradients", self.name(), x.len(), g.len());
        }
        let max = self.max;
        let chunk = |(i, out): (usize, &mut [MaybeUninit<f32>])| {
            let at = i * CHUNK;
            let (x, g) = (&x[at..at + out.len()], &g[at..at + out.len()]);
            for j in 0..out.len() {
                // The gradient's bits under an all-ones or all-zeros mask: the compiler
                // vectorizes this (compare, and), where `if keep { g } else { 0 }` became a
                // branch on the sign of every value.
                let keep = ((x[j] > 0.0) & (x[j] < max)) as u32;
                out[j].write(f32::from_bits(g[j].to_bits() & keep.wrapping_neg()));
            }
        };
        // SAFETY: each chunk's values are written, one per index.
        let dx = unsafe { written(x.len(), CHUNK, x.len() < SERIAL_VALUES, chunk) };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `clamp(x, 0, max)` with [`Clip`] where it applies (f32 on the CPU), else with candle's
/// ops.
pub fn clip(x: &Tensor, max: f32) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Clip { max })
    } else if max.is_finite() {
        x.relu()?.minimum(max)
    } else {
        x.relu()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::max_diff;
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients against candle's `relu` and `relu().minimum(6)`, on inputs that
    /// avoid the edges (where the two conventions differ), and the edges by hand.
    #[test]
    fn clip_agrees_with_candle() {
        let dev = Device::Cpu;
        // Enough values for several parallel chunks and a partial one.
        let n = 3 * CHUNK + 77;
        // Steps of 0.01 offset by 0.005: never exactly 0 or 6.
        let vals: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1600) as f32 / 100.0 - 5.005)
            .collect();
        let x = Var::from_vec(vals, n, &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        for max in [6f32, f32::INFINITY] {
            let ours = clip(x.as_tensor(), max).unwrap();
            let theirs = if max.is_finite() {
                x.relu().unwrap().minimum(max).unwrap()
            } else {
                x.relu().unwrap()
            };
            assert_eq!(max_diff(&ours, &theirs), 0.0, "values, max {max}");
            let grad = |y: &Tensor| {
                let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(&x).unwrap().clone()
            };
            let diff = max_diff(&grad(&ours), &grad(&theirs));
            assert_eq!(diff, 0.0, "gradients, max {max}");
        }
        // The edges and a NaN: the gradient passes strictly inside (0, max) only.
        let x = Var::from_vec(vec![-1f32, 0.0, 3.0, 6.0, 7.0, f32::NAN], 6, &dev).unwrap();
        let y = clip(x.as_tensor(), 6.0).unwrap();
        assert_eq!(
            y.to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0, 3.0, 6.0, 6.0, 0.0]
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(&x).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        );
    }
}
