//! Train-mode batch norm as one fused op with its own backward.

use super::*;

/// Per-channel mean and biased variance of `[N, C, H, W]`, accumulated in f64.
pub(super) fn channel_stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut s, mut ss) = (0f64, 0f64);
            for i in 0..n {
                let plane = &x[(i * c + ch) * hw..][..hw];
                // The plane is in the cache for the second sum.
                let ps = lane_sum(plane, plane, |v, _| v);
                let pss = lane_sum(plane, plane, |v, _| v * v);
                s += f64::from(ps);
                ss += f64::from(pss);
            }
            let m = (n * hw) as f64;
            let mean = s / m;
            (mean, (ss / m - mean * mean).max(0.0))
        })
        .collect()
}

/// `Σ f(a, b)` over the pairs of `a` and `b`, summed in 16 lanes: a plain running sum is
/// one long chain of dependent additions that the compiler may not reorder, at a fraction of
/// the vector units' rate. One sum per call: asked for two at once, the compiler pairs them
/// up in half-used registers instead.
#[inline(always)]
pub(super) fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    const L: usize = 16;
    let mut s = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (ca, cb) in ca.zip(cb) {
        for i in 0..L {
            s[i] += f(ca[i], cb[i]);
        }
    }
    let mut t = s.iter().sum::<f32>();
    for (&x, &y) in ra.iter().zip(rb) {
        t += f(x, y);
    }
    t
}

/// Batch normalization in train mode, fused: `(x [N, C, H, W], gamma [C], beta [C])`,
/// normalizing with the batch's statistics (Ioffe & Szegedy, "Batch Normalization", 2015).
/// Made for one batch by [`BatchNormTrain::for_batch`], which computes the statistics once
/// for the forward, the backward and the running averages.
pub struct BatchNormTrain {
    pub(super) eps: f64,
    /// Per channel: the mean and the biased variance of the batch.
    pub(super) stats: Vec<(f64, f64)>,
    /// The ReLU (`∞`) or ReLU6 (`6`) applied to the output, if any: [`Clip`] fused in.
    pub(super) clip: Option<f32>,
}

impl BatchNormTrain {
    /// The op for the batch `x` (f32 `[N, C, H, W]` on the CPU); apply it to that `x` alone.
    pub fn for_batch(x: &Tensor, eps: f64) -> candle_core::Result<Self> {
        let x = x.contiguous()?;
        let (n, c, h, w) = x.dims4()?;
        let (s, l) = x.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            candle_core::bail!("the fused batch norm runs on the CPU");
        };
        let stats = channel_stats(f32_slice(s, l, "slim-batchnorm-train")?, n, c, h * w);
        Ok(Self {
            eps,
            stats,
            clip: None,
        })
    }

    /// The same op followed by `clamp(·, 0, max)` (ReLU for `max = ∞`, ReLU6 for 6): one
    /// pass and one value fewer than running [`Clip`] after it, with the same values and
    /// gradients.
    pub fn with_clip(mut self, max: f32) -> Self {
        self.clip = Some(max);
        self
    }

    /// The batch's per-channel mean and biased variance.
    pub fn mean_var(&self) -> (Vec<f32>, Vec<f32>) {
        self.stats
            .iter()
            .map(|&(m, v)| (m as f32, v as f32))
            .unzip()
    }
}

impl candle_core::CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "slim-batchnorm-train"
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
        let x = f32_slice(s1, l1, self.name())?;
        let gamma = f32_slice(s2, l2, self.name())?;
        let beta = f32_slice(s3, l3, self.name())?;
        let (_, c, h, w) = l1.shape().dims4()?;
        let hw = h * w;
        if self.stats.len() != c || gamma.len() != c || beta.len() != c {
            candle_core::bail!(
                "batch norm over {c} channels given {} statistics, {} weights, {} biases",
                self.stats.len(),
                gamma.len(),
                beta.len()
            );
        }
        let st = &self.stats;
        let plane = |(idx, out): (usize, &mut [MaybeUninit<f32>])| {
            let ch = idx % c;
            let inv = (1.0 / (st[ch].1 + self.eps).sqrt()) as f32;
            let scale = gamma[ch] * inv;
            let shift = beta[ch] - st[ch].0 as f32 * scale;
            let x = &x[idx * hw..(idx + 1) * hw];
            match self.clip {
                None => {
                    for (o, &v) in out.iter_mut().zip(x) {
                        o.write(v * scale + shift);
                    }
                }
                Some(max) => {
                    for (o, &v) in out.iter_mut().zip(x) {
                        o.write((v * scale + shift).max(0.0).min(max));
                    }
                }
            }
        };
        // SAFETY: each plane writes all of its values.
        let y = unsafe { written(x.len(), hw, false, plane) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        // Through the clipping first: the output is inside (0, max) exactly where the
        // normalized value was.
        let grad = match self.clip {
            Some(max) => res
                .contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &clip::ClipGrad { max })?,
            None => grad.contiguous()?,
        };
        let all = x.apply_op2_no_bwd(
            &grad,
            &BatchNormGrad {
                eps: self.eps,
                gamma: gamma.to_vec1::<f32>()?,
                stats: &self.stats,
            },
        )?;
        let size = n * c * h * w;
        let gx = all.narrow(0, 0, size)?.reshape((n, c, h, w))?;
        let gg = all.narrow(0, size, c)?;
        let gb = all.narrow(0, size + c, c)?;
        Ok((Some(gx), Some(gg), Some(gb)))
    }
}

/// The gradients of [`BatchNormTrain`] as one flat tensor: `dx`, then `dgamma`, then `dbeta`.
pub(super) struct BatchNormGrad<'a> {
    pub(super) eps: f64,
    pub(super) gamma: Vec<f32>,
    pub(super) stats: &'a [(f64, f64)],
}

impl CustomOp2 for BatchNormGrad<'_> {
    fn name(&self) -> &'static str {
        "slim-batchnorm-train-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let gy = f32_slice(s2, l2, self.name())?;
        let (n, c, h, w) = l1.shape().dims4()?;
        let hw = h * w;
        let st = self.stats;
        // Per channel: sum of dy (dbeta) and of dy * xhat (dgamma).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let inv = 1.0 / (st[ch].1 + self.eps).sqrt();
                let mean = st[ch].0;
                let (mut db, mut dg) = (0f64, 0f64);
                let m = mean as f32;
                for i in 0..n {
                    let o = (i * c + ch) * hw;
                    let (gy, x) = (&gy[o..o + hw], &x[o..o + hw]);
                    let pb = lane_sum(gy, gy, |g, _| g);
                    let pg = lane_sum(gy, x, |g, v| g * (v - m));
                    db += f64::from(pb);
                    dg += f64::from(pg) * inv;
                }
                (db, dg)
            })
            .collect();
        let m = (n * hw) as f64;
        let mut out: Vec<f32> = Vec::with_capacity(x.len() + 2 * c);
        let (dx, rest) = out.spare_capacity_mut()[..x.len() + 2 * c].split_at_mut(x.len());
        dx.par_chunks_mut(hw).enumerate().for_each(|(idx, plane)| {
            let ch = idx % c;
            let inv = 1.0 / (st[ch].1 + self.eps).sqrt();
            let k = (f64::from(self.gamma[ch]) * inv / m) as f32;
            let (db, dg) = (sums[ch].0 as f32, sums[ch].1 as f32);
            let (mean, invf, mf) = (st[ch].0 as f32, inv as f32, m as f32);
            let o = idx * hw;
            for ((d, &g), &v) in plane.iter_mut().zip(&gy[o..o + hw]).zip(&x[o..o + hw]) {
                let xhat = (v - mean) * invf;
                d.write(k * (mf * g - db - xhat * dg));
            }
        });
        for ch in 0..c {
            rest[ch].write(sums[ch].1 as f32);
            rest[c + ch].write(sums[ch].0 as f32);
        }
        // SAFETY: every plane of dx and both gradients of every channel were written.
        unsafe { out.set_len(x.len() + 2 * c) };
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}
