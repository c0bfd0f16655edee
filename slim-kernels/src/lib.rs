//! # slim-kernels
//!
//! Convolution kernels for training on a CPU, as candle custom ops with forward and backward:
//! Slim's f32 compute, and all of its unsafe f32 code. `slim-core` re-exports this crate as
//! `slim_core::kernels` (and [`cpu`] as `slim_core::cpu`), which is how the method crates
//! reach it.
//!
//! candle 0.11 runs a grouped convolution as one convolution per group, which makes a
//! depthwise convolution very slow, and computes a convolution's input gradient with a direct
//! transposed convolution. Here:
//! - **depthwise** convolution is a direct kernel over each `(sample, channel)` plane, in
//!   parallel, with its own input and weight gradients;
//! - a **dense** convolution is `W · im2col(x) + b` in one custom op, sample by sample; its
//!   backward recomputes each sample's unfold and makes two products of the same size
//!   (`dW += G · colsᵀ`, `dcols = Wᵀ · G`) and a fold, with no autograd intermediates; a
//!   **pointwise** one (1x1, stride 1, no padding) needs no unfold at all. Every product is
//!   made of the same register tiles (`pointwise`), which read each sample's planes (or
//!   columns) where they lie; for the weight gradient the operand with fewer rows is
//!   transposed into a panel once per sample;
//! - in evaluation a convolution can finish its outputs with a bias and a clamp as they are
//!   written ([`conv2d_fused`]), and layers under a size run on the calling thread;
//! - train-mode **batch norm** is one fused op with its own backward;
//! - **max pooling** supports padding and overlapping windows, with an exact backward.
//!
//! [`conv2d`] picks the kernel; other cases (grouped, non-f32, non-CPU) go to candle's own
//! convolution. Every kernel is tested against candle's convolution and its gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, OnceLock};

mod batch_norm;
pub mod channels_last;
mod clip;
pub mod cpu;
mod dense;
mod depthwise;
mod pointwise;
mod pooling;
mod spec;
pub use batch_norm::BatchNormTrain;
use batch_norm::*;
pub use clip::{clip, Clip};
use dense::*;
pub use depthwise::Phases;
use depthwise::*;
pub use pooling::*;
pub use spec::Conv2dSpec;

/// The geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    pad: usize,
    dil: usize,
}

impl Geom {
    /// The output columns `ow` whose input column `ow * stride + k * dil - pad` lies inside
    /// `0..w`, as a range (so the inner loops carry no bounds test).
    fn valid(&self, k: usize, out: usize, size: usize) -> std::ops::Range<usize> {
        let off = (k * self.dil) as i64 - self.pad as i64;
        let s = self.stride as i64;
        let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
        let hi = ((size as i64 - off + s - 1) / s).clamp(0, out as i64);
        (lo.min(hi) as usize)..(hi as usize)
    }
    fn src(&self, o: usize, k: usize) -> usize {
        // Only called for `o` in `valid(k, ..)`, where this is non-negative.
        o * self.stride + k * self.dil - self.pad
    }
    /// A 1x1 convolution with stride 1 and no padding: each sample's output is the product
    /// `W · X_n` of the weights and the sample's `[C, H*W]` planes, read where they lie.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
}

/// What a convolution does to each output value on its way out, after adding the channel's
/// bias: clamp it to `lo..=hi` (a fused ReLU is `0..=inf`, ReLU6 `0..=6`). NaN passes through.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Epilogue {
    pub lo: f32,
    pub hi: f32,
}

impl Epilogue {
    /// No clamp.
    pub const NONE: Epilogue = Epilogue {
        lo: f32::NEG_INFINITY,
        hi: f32::INFINITY,
    };
    /// ReLU.
    pub const RELU: Epilogue = Epilogue {
        lo: 0.0,
        hi: f32::INFINITY,
    };
    /// ReLU6.
    pub const RELU6: Epilogue = Epilogue { lo: 0.0, hi: 6.0 };

    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        // Two selects (not one if-else chain), so that the loops calling this vectorize.
        let v = if v < self.lo { self.lo } else { v };
        if v > self.hi {
            self.hi
        } else {
            v
        }
    }
}

/// A buffer that parallel tasks write at disjoint places which are not one contiguous chunk
/// per task (the planes of one channel over every sample, say).
#[derive(Clone, Copy)]
pub struct Disjoint<T>(pub *mut T);

// SAFETY: tasks write through the pointer only at places no other task reads or writes
// (see `Disjoint::rows`).
unsafe impl<T: Send> Send for Disjoint<T> {}
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    /// The place `count` values on.
    ///
    /// # Safety
    /// As for [`pointer::add`]: the result lies within (or one past) the buffer.
    pub unsafe fn add(&self, count: usize) -> Disjoint<T> {
        // SAFETY: as the caller promises.
        Disjoint(unsafe { self.0.add(count) })
    }

    /// `len` values from `start`.
    ///
    /// # Safety
    /// `start + len` is within the buffer, and no other live slice overlaps this one.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn rows(&self, start: usize, len: usize) -> &mut [T] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// `dst.copy_from_slice(src)` for the short runs of small planes (a row of 7 or 14 values),
/// in pieces of 32, 16, 8, 4, 2 or 1 bytes, each one unaligned load and store (the last piece
/// overlapping the one before), where `copy_from_slice` calls `memmove`: per row, that call
/// cost more than the copy (a quarter of a depthwise convolution's backward). Panics if the
/// lengths differ.
#[inline(always)]
pub fn copy_short<T: Copy>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "copy_short: lengths differ");
    let n = std::mem::size_of_val(src);
    let (d, s) = (dst.as_mut_ptr().cast::<u8>(), src.as_ptr().cast::<u8>());
    macro_rules! pieces {
        ($($b:literal)*) => {$(
            if n >= $b {
                // SAFETY: every piece lies within the `n` bytes of both slices, which cannot
                // overlap (one is borrowed mutably); `T: Copy`, so bytes copy values.
                unsafe {
                    let piece = |at: usize| {
                        let v = s.add(at).cast::<[u8; $b]>().read_unaligned();
                        d.add(at).cast::<[u8; $b]>().write_unaligned(v);
                    };
                    let mut at = 0;
                    while at + $b < n {
                        piece(at);
                        at += $b;
                    }
                    piece(n - $b);
                }
                return;
            }
        )*};
    }
    pieces!(32 16 8 4 2 1);
}

/// Work below which an evaluation kernel runs on the calling thread: handing a small layer to
/// the pool and waking another worker (tens of microseconds on this kind of machine) costs
/// more than the second core saves. In multiply-adds for products and sweeps, in values for
/// pooling.
const SERIAL_PRODUCT: usize = 1 << 22;
const SERIAL_SWEEP: usize = 1 << 17;
const SERIAL_VALUES: usize = 1 << 15;

/// Values made once per key (a layer's geometry) and kept for the life of the process, for
/// the kernels' layouts that depend on a layer's shape alone: a `static` of this type.
pub struct Memo<K, V>(OnceLock<Mutex<HashMap<K, V>>>);

impl<K: Eq + std::hash::Hash, V: Clone> Memo<K, V> {
    /// An empty memo.
    pub const fn new() -> Memo<K, V> {
        Memo(OnceLock::new())
    }

    /// The value kept for `key`, made by `make` the first time.
    pub fn get(&self, key: K, make: impl FnOnce() -> V) -> V {
        let mut kept = self
            .0
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        kept.entry(key).or_insert_with(make).clone()
    }
}

impl<K: Eq + std::hash::Hash, V: Clone> Default for Memo<K, V> {
    fn default() -> Memo<K, V> {
        Memo::new()
    }
}

/// `f(i)` for every `i` in `0..n`: over the pool, or in order on this thread when `serial`.
pub fn for_each_task(n: usize, serial: bool, f: impl Fn(usize) + Sync + Send) {
    if serial {
        (0..n).for_each(f)
    } else {
        (0..n).into_par_iter().for_each(f)
    }
}

/// `f((i, chunk))` for the chunks of `size` values of `out`, as [`for_each_task`] does.
pub fn for_each_chunk<T: Send>(
    out: &mut [T],
    size: usize,
    serial: bool,
    f: impl Fn((usize, &mut [T])) + Sync + Send,
) {
    if serial {
        out.chunks_mut(size).enumerate().for_each(f)
    } else {
        out.par_chunks_mut(size).enumerate().for_each(f)
    }
}

/// `len` values written by `f((i, chunk))` for the chunks of `size` values, as
/// [`for_each_chunk`] runs them, into memory that is not zeroed first (a fill that every
/// value of an elementwise op's output would pay for again).
///
/// # Safety
/// `f` writes every value of every chunk it is given.
pub(crate) unsafe fn written(
    len: usize,
    size: usize,
    serial: bool,
    f: impl Fn((usize, &mut [MaybeUninit<f32>])) + Sync + Send,
) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(len);
    for_each_chunk(&mut y.spare_capacity_mut()[..len], size, serial, f);
    // SAFETY: the caller's `f` wrote every one of the `len` values.
    unsafe { y.set_len(len) };
    y
}

/// `values` set to zero, as the initialized slice they now are.
fn zeroed(values: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    values.fill(MaybeUninit::new(0.0));
    // SAFETY: every value was just written.
    unsafe { assume_written(values) }
}

/// `values` as the initialized slice they are.
///
/// # Safety
/// Every value of `values` has been written.
unsafe fn assume_written(values: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the caller vouches that every
    // value is initialized.
    unsafe { &mut *(values as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Runs `f(n, chunk, scratch, parallel)` over the `chunk`-sized pieces of `out`, one per
/// sample: in parallel when there are enough samples to keep every core busy (then `f` is
/// told to stay on its thread), else one after another with `f` free to use every core; the
/// scratch value is made by `init` for each worker's run of samples. With `serial`, all of it
/// on the calling thread.
fn per_sample_with<T: Send, S>(
    out: &mut [T],
    chunk: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(usize, &mut [T], &mut S, bool) + Sync,
    serial: bool,
) {
    if chunk == 0 {
        return;
    }
    let samples = out.len() / chunk;
    if serial {
        let mut s = init();
        for (n, c) in out.chunks_mut(chunk).enumerate() {
            f(n, c, &mut s, false);
        }
    } else if samples >= rayon::current_num_threads() {
        // Runs of at least half a core's share: rayon makes a scratch value for every run
        // it splits off, and a scratch of columns is zeroed when made.
        let run = samples.div_ceil(2 * rayon::current_num_threads());
        out.par_chunks_mut(chunk)
            .with_min_len(run)
            .enumerate()
            .for_each_init(&init, |s, (n, c)| f(n, c, s, false));
    } else {
        let mut s = init();
        for (n, c) in out.chunks_mut(chunk).enumerate() {
            f(n, c, &mut s, true);
        }
    }
}

/// A convolution for inference, `act(conv(x, w) + b)` with the bias and activation applied
/// as each output is written (batch norm folded into `w` and `b` by the caller); it has no
/// backward.
struct FusedConv {
    g: Geom,
    o: usize,
    depthwise: bool,
    act: Epilogue,
}

impl candle_core::CustomOp3 for FusedConv {
    fn name(&self) -> &'static str {
        "slim-conv2d-fused"
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
        let g = self.g;
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let y = if self.depthwise {
            depthwise_forward(&g, x, w, Some(b), self.act)
        } else {
            dense_forward(&g, self.o, x, w, b, self.act)
        };
        Ok((CpuStorage::F32(y), Shape::from((g.n, self.o, g.oh, g.ow))))
    }
}

/// True when the fused batch-norm kernel applies (f32 on the CPU).
pub fn fused_batch_norm(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The geometry of `x ⋆ w` when one of this module's kernels applies (f32 on the CPU, a
/// dense or depthwise convolution), with the number of output channels.
fn geometry(
    x: &Tensor,
    w: &Tensor,
    spec: &Conv2dSpec,
) -> candle_core::Result<Option<(Geom, usize)>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 || x.rank() != 4 {
        return Ok(None);
    }
    if spec.groups != 1 && !spec.is_depthwise() {
        return Ok(None);
    }
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    let Some((oh, ow)) = spec.out_size(h, wd) else {
        return Ok(None);
    };
    let g = Geom {
        n,
        c,
        h,
        w: wd,
        kh,
        kw,
        oh,
        ow,
        stride: spec.stride,
        pad: spec.padding,
        dil: spec.dilation,
    };
    Ok(Some((g, o)))
}

/// A 2-D convolution with the fastest kernel that applies; see the module docs.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    spec: &Conv2dSpec,
) -> candle_core::Result<Tensor> {
    let add_bias = |y: Tensor| -> candle_core::Result<Tensor> {
        match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
            None => Ok(y),
        }
    };
    let Some((g, o)) = geometry(x, w, spec)? else {
        return add_bias(x.conv2d(w, spec.padding, spec.stride, spec.dilation, spec.groups)?);
    };
    if spec.is_depthwise() {
        return add_bias(x.contiguous()?.apply_op2(&w.contiguous()?, Depthwise(g))?);
    }
    let b = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(o, DType::F32, x.device())?,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b, DenseConv { g, o })
}

/// The input and weight gradients of [`conv2d`] `(x, w)` (its bias's gradient is the sum of
/// `grad` per channel) for the output gradient `grad`, by the kernels its backward runs but
/// outside candle's autograd: what a training step spends in the convolution's own backward,
/// for benches and profiles. An error where [`conv2d`] runs candle's convolution instead.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    spec: &Conv2dSpec,
) -> candle_core::Result<(Tensor, Tensor)> {
    let Some((g, o)) = geometry(x, w, spec)? else {
        candle_core::bail!(
            "conv2d_backward: no Slim kernel for {spec:?} on {:?}",
            x.shape()
        );
    };
    if grad.dims() != [g.n, o, g.oh, g.ow] {
        candle_core::bail!(
            "conv2d_backward: output gradient {:?}, expected {:?}",
            grad.shape(),
            (g.n, o, g.oh, g.ow)
        );
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    if spec.is_depthwise() {
        return depthwise_grads(&x, &w, grad, g);
    }
    let (gx, gw, _) = dense_grads(&x, &w, grad, g, o)?;
    Ok((gx, gw))
}

/// A convolution for inference, `act(conv(x, w) + b)` with `b` of `[O]`, the bias and the
/// activation applied as each output is written (batch norm in evaluation is folded into `w`
/// and `b` by the caller). It records no gradient. Where no kernel here applies, candle's
/// convolution and a clamp compute the same.
pub fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    spec: &Conv2dSpec,
    act: Epilogue,
) -> candle_core::Result<Tensor> {
    if let Some((g, o)) = geometry(x, w, spec)? {
        let op = FusedConv {
            g,
            o,
            depthwise: spec.is_depthwise(),
            act,
        };
        return x
            .contiguous()?
            .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op);
    }
    let mut y = conv2d(x, w, Some(b), spec)?;
    if act.lo > f32::NEG_INFINITY {
        y = y.maximum(act.lo)?;
    }
    if act.hi < f32::INFINITY {
        y = y.minimum(act.hi)?;
    }
    Ok(y)
}

/// Says on stderr that a test skipped a part, and why; where `SLIM_SKIP_LOG` names a file
/// (`.ci/run` sets it), appends the reason there too, so that a test run ends with the count
/// of what was skipped rather than hiding it in the captured output of passing tests.
#[doc(hidden)]
pub fn note_skipped(why: &str) {
    use std::io::Write;
    eprintln!("skipped: {why}");
    if let Some(path) = std::env::var_os("SLIM_SKIP_LOG") {
        let line = format!("{}\n", why.replace('\n', " "));
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

/// Calls `f(args)` compiled with the target feature `feature` (say `"avx2"`) when `on` (the
/// caller's check that this machine has it), and as the portable build compiles it
/// otherwise; it returns from the enclosing function in the first case. `f` is an
/// `#[inline(always)]` function of the caller's, so that its loops are compiled again inside
/// the feature's function; the arguments are written with their types.
#[macro_export]
macro_rules! with_target_feature {
    ($feature:literal, $on:expr, $f:ident($($arg:ident: $ty:ty),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = $feature)]
            unsafe fn with_feature($($arg: $ty),*) {
                $f($($arg),*)
            }
            if $on {
                // SAFETY: the caller checked that this machine has the feature.
                return unsafe { with_feature($($arg),*) };
            }
        }
        let _ = $on;
        $f($($arg),*)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Forward and both gradients against candle's own convolution. (candle 0.11's own
    /// convolution backward fails on non-square inputs, so gradients are compared on square
    /// ones and non-square inputs are checked forward only.)
    fn check(n: usize, c: usize, o: usize, hw: usize, k: usize, spec: Conv2dSpec) {
        let dev = Device::Cpu;
        let xr = Tensor::randn(0f32, 1.0, (n, c, hw, hw + 3), &dev).unwrap();
        let wr = Tensor::randn(0f32, 1.0, (o, c / spec.groups, k, k), &dev).unwrap();
        let br = Tensor::randn(0f32, 1.0, o, &dev).unwrap();
        let ours = conv2d(&xr, &wr, Some(&br), &spec).unwrap();
        let theirs = xr
            .conv2d(&wr, spec.padding, spec.stride, spec.dilation, spec.groups)
            .unwrap()
            .broadcast_add(&br.reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "{spec:?}");
        assert!(
            max_diff(&ours, &theirs) < 1e-3 * (c * k * k) as f32,
            "forward {spec:?}"
        );

        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev).unwrap()).unwrap();
        let w =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (o, c / spec.groups, k, k), &dev).unwrap())
                .unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, &dev).unwrap()).unwrap();
        let ours = conv2d(&x, &w, Some(&b), &spec).unwrap();
        let theirs = x
            .conv2d(&w, spec.padding, spec.stride, spec.dilation, spec.groups)
            .unwrap()
            .broadcast_add(&b.reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "{spec:?}");
        let tol = 1e-3 * (c * k * k) as f32;
        assert!(max_diff(&ours, &theirs) < tol, "forward {spec:?}");
        let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let g1 = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            let (a, b) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(a, b) < tol * 4.0,
                "gradient {spec:?}: {}",
                max_diff(a, b)
            );
        }
    }

    #[test]
    fn depthwise_matches_candle() {
        for (k, stride, pad, dil) in [
            (3, 1, 1, 1),
            (3, 2, 1, 1),
            (5, 1, 2, 1),
            (3, 2, 0, 1),
            (3, 1, 2, 2),
            (1, 1, 0, 1),
            (5, 3, 1, 1),
            (3, 2, 3, 2),
            (4, 2, 1, 1),
        ] {
            let spec = Conv2dSpec::new(6, 6, k)
                .with_stride(stride)
                .with_padding(pad)
                .with_dilation(dil)
                .with_groups(6);
            check(3, 6, 6, 9, k, spec.clone());
            check(2, 6, 6, 8, k, spec);
        }
    }

    #[test]
    fn phases_place_every_value_and_give_it_back() {
        for (h, w) in [(5, 7), (6, 8), (1, 1), (4, 3), (2, 2)] {
            for stride in 1..=3 {
                for pad in 0..=3 {
                    let l = Phases::new(h, w, 1, 1, stride, pad, 1);
                    let src: Vec<f32> = (0..h * w).map(|i| i as f32 + 1.0).collect();
                    let mut phases = vec![0f32; l.len()];
                    l.fill(&src, &mut phases);
                    // Padded (py, px) lies in phase (py % s, px % s), row py / s, column px / s.
                    let mut expect = vec![0f32; l.len()];
                    for y in 0..h {
                        for x in 0..w {
                            let (py, px) = (y + pad, x + pad);
                            let phase = (py % stride) * stride + px % stride;
                            expect[phase * l.ph * l.pw + (py / stride) * l.pw + px / stride] =
                                src[y * w + x];
                        }
                    }
                    assert_eq!(phases, expect, "{h}x{w} stride {stride} pad {pad}");
                    let mut back = vec![0f32; h * w];
                    l.take(&phases, &mut back);
                    assert_eq!(back, src, "{h}x{w} stride {stride} pad {pad}");
                }
            }
        }
    }

    #[test]
    fn fused_batch_norm_matches_composed_ops() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2.0, (4, 3, 5, 6), &dev).unwrap()).unwrap();
        let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, 3, &dev).unwrap()).unwrap();
        let beta = Var::from_tensor(&Tensor::randn(0f32, 0.3, 3, &dev).unwrap()).unwrap();
        let op = BatchNormTrain::for_batch(&x, 1e-5).unwrap();
        let (op_mean, op_var) = op.mean_var();
        let ours = x
            .apply_op3(gamma.as_tensor(), beta.as_tensor(), op)
            .unwrap();
        // Reference: the same normalization written with candle's differentiable ops.
        let mean = x
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc
            .sqr()
            .unwrap()
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let theirs = xc
            .broadcast_div(&(&var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&gamma.reshape((1, 3, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape((1, 3, 1, 1)).unwrap())
            .unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-4);
        let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let g1 = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &gamma, &beta] {
            let d = max_diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "{d}");
        }
        let m = mean.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let v = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for ch in 0..3 {
            assert!((op_mean[ch] - m[ch]).abs() < 1e-5, "mean {ch}");
            assert!((op_var[ch] - v[ch]).abs() < 1e-4 * v[ch], "variance {ch}");
        }
    }

    #[test]
    fn max_pool_sweeps_agree_with_the_window_search() {
        // Every window size, stride and padding the geometry allows on odd and even planes:
        // the forward's and the backward's row sweeps against `argmax`, window by window. The
        // values take 8 levels, so that windows hold ties (the first maximum takes the
        // gradient).
        let mut seed = 7u32;
        for (h, w) in [(7, 9), (8, 8), (5, 3)] {
            let plane: Vec<f32> = (0..h * w)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 29) as f32 - 4.0
                })
                .collect();
            for kernel in 1..=3 {
                for stride in 1..=3 {
                    for pad in 0..kernel {
                        let op = MaxPool {
                            kernel,
                            stride,
                            pad,
                        };
                        let l = Layout::contiguous((1, 1, h, w));
                        let g = op.geom(&l).unwrap();
                        let mut out = vec![f32::NEG_INFINITY; g.oh * g.ow];
                        let mut col = vec![f32::NAN; w + 1];
                        MaxPool::plane_max(&g, &plane, &mut out, &mut col, false);
                        if has_avx512f() {
                            let mut wide = vec![f32::NEG_INFINITY; g.oh * g.ow];
                            MaxPool::plane_max(&g, &plane, &mut wide, &mut col, true);
                            assert_eq!(wide, out, "{h}x{w} k{kernel} s{stride} p{pad} wide");
                        }
                        if (kernel, stride, pad) == (2, 2, 0) {
                            // The one-pass halvings, portable and vectorized, with a second
                            // plane after the first.
                            let planes = [&plane[..], &plane[..]].concat();
                            for wide in [false, has_avx512f()] {
                                let mut two = vec![f32::NAN; 2 * out.len()];
                                let (ip, op) = (h * w, out.len());
                                MaxPool::halvings(&planes, (w, ip), &mut two, (g.ow, op), wide);
                                assert_eq!(two, [&out[..], &out[..]].concat(), "{h}x{w} halvings");
                            }
                        }
                        let gy: Vec<f32> = (0..out.len()).map(|i| 1.0 + i as f32).collect();
                        let mut gx = vec![0f32; h * w];
                        let mut taken = vec![false; g.ow];
                        MaxPool::plane_grad(&g, &plane, &out, &gy, &mut gx, &mut taken);
                        let mut want = vec![0f32; h * w];
                        for oh in 0..g.oh {
                            for ow in 0..g.ow {
                                let i = MaxPool::argmax(&g, &plane, oh, ow);
                                assert_eq!(
                                    out[oh * g.ow + ow],
                                    plane[i],
                                    "{h}x{w} k{kernel} s{stride} p{pad} at ({oh}, {ow})"
                                );
                                want[i] += gy[oh * g.ow + ow];
                            }
                        }
                        assert_eq!(gx, want, "{h}x{w} k{kernel} s{stride} p{pad} gradient");
                    }
                }
            }
        }
    }

    #[test]
    fn max_pool_matches_candle_and_pads_with_minus_infinity() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap()).unwrap();
        let ours = x
            .apply_op1(MaxPool {
                kernel: 2,
                stride: 2,
                pad: 0,
            })
            .unwrap();
        let theirs = x.max_pool2d_with_stride(2, 2).unwrap();
        assert!(max_diff(&ours, &theirs) == 0.0);
        // Gradient: each window's output gradient lands on its maximum. (candle 0.11's own
        // max-pool backward scales it by 1/4, so the reference is written out here.)
        let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let g1 = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = g1
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ys = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ps = probe.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (&xv, &gv)) in xs.iter().zip(&gx).enumerate() {
            let (plane, r, c) = (i / 64, (i % 64) / 8, i % 8);
            let o = plane * 16 + (r / 2) * 4 + c / 2;
            let want = if xv == ys[o] { ps[o] } else { 0.0 };
            assert_eq!(gv, want, "input {i}");
        }
        // 3x3 stride 2 padding 1 on all-negative input: padding never wins, and each input
        // gets the gradient of every window it is the maximum of.
        let neg = Tensor::new(
            &[[[[-1f32, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]]]],
            &dev,
        )
        .unwrap();
        let v = Var::from_tensor(&neg).unwrap();
        let y = v
            .apply_op1(MaxPool {
                kernel: 3,
                stride: 2,
                pad: 1,
            })
            .unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![-1.0, -2.0, -4.0, -5.0]
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g
            .get(&v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(gx, vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }

    /// A seeded source of values uniform in [-1, 1).
    pub(super) fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut rng = seed;
        move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// The pointwise tiles against a plain sum in f64: full and partial tiles of rows,
    /// blocks of positions within a sample, across samples and at the end, one and several
    /// blocks of input channels, each clamp, the vector and the portable tiles, on one
    /// thread and on every core, and a NaN that passes through the clamp.
    #[test]
    fn pointwise_product_matches_a_plain_sum() {
        let mut next = uniform(7);
        let cases = [
            (1, 6, 4, 16),
            (2, 13, 300, 53),
            (1, 1, 1, 17),
            (2, 32, 16, 784),
            (3, 7, 513, 40),
            (5, 9, 20, 49),
            (19, 8, 12, 1),
            // Few blocks of positions, many rows: in parallel, each block's rows in runs.
            (1, 50, 70, 20),
            (2, 97, 33, 7),
        ];
        for (n, o, k, p) in cases {
            for act in [Epilogue::NONE, Epilogue::RELU, Epilogue::RELU6] {
                for (parallel, fast) in [
                    (false, false),
                    (true, false),
                    (false, has_avx2_fma()),
                    (true, has_avx2_fma()),
                ] {
                    let w: Vec<f32> = (0..o * k).map(|_| next() * 4.0).collect();
                    let mut x: Vec<f32> = (0..n * k * p).map(|_| next() * 4.0).collect();
                    let b: Vec<f32> = (0..o).map(|_| next()).collect();
                    // Sample 0's last position.
                    x[p - 1] = f32::NAN;
                    let mut out = vec![0f32; n * o * p];
                    // SAFETY: `out` holds n * o * p values and nothing else uses it
                    // meanwhile; `fast` only where the machine has AVX2 and FMA.
                    unsafe {
                        pointwise::product(
                            Disjoint(out.as_mut_ptr()),
                            (&w, k, 1),
                            &x,
                            Some(&b),
                            (n, o, k, p),
                            act,
                            parallel,
                            fast,
                        )
                    };
                    for (s, r, c) in (0..n * o * p).map(|i| (i / (o * p), (i / p) % o, i % p)) {
                        let sum: f64 = (0..k)
                            .map(|i| f64::from(w[r * k + i]) * f64::from(x[(s * k + i) * p + c]))
                            .sum::<f64>()
                            + f64::from(b[r]);
                        let want = act.apply(sum as f32);
                        let got = out[(s * o + r) * p + c];
                        let at = format!("({s}, {r}, {c}) of {n}x{o}x{k}x{p} {act:?} fast {fast}");
                        if s == 0 && c == p - 1 {
                            assert!(got.is_nan(), "NaN lost at {at}");
                        } else {
                            let tol = 1e-4 * (k as f32).sqrt() * 4.0;
                            assert!((got - want).abs() <= tol, "{at}: {got} != {want}");
                        }
                    }
                    // The same weights stored transposed and read through their strides,
                    // with no bias: `act` must then be NONE.
                    let wt: Vec<f32> = (0..k * o).map(|i| w[(i % o) * k + i / o]).collect();
                    let mut plain = vec![0f32; n * o * p];
                    // SAFETY: as above.
                    unsafe {
                        pointwise::product(
                            Disjoint(plain.as_mut_ptr()),
                            (&wt, 1, o),
                            &x,
                            None,
                            (n, o, k, p),
                            Epilogue::NONE,
                            parallel,
                            fast,
                        )
                    };
                    for (i, (&got, &with_b)) in plain.iter().zip(&out).enumerate() {
                        if act == Epilogue::NONE && !got.is_nan() {
                            let want = with_b - b[(i / p) % o];
                            let tol = 1e-4 * (k as f32).sqrt() * 4.0 + 1e-6 * want.abs();
                            assert!(
                                (got - want).abs() <= tol,
                                "transposed [{i}]: {got} != {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The weight gradient's tiles against a plain sum in f64, over several samples: more
    /// input rows than output channels and fewer (either operand transposed), partial tiles,
    /// sums over more positions than one block, the vector and portable tiles, one thread and
    /// every core.
    #[test]
    fn weight_gradient_matches_a_plain_sum() {
        let mut next = uniform(11);
        for (n, o, k, p) in [
            (3, 6, 16, 16),
            (2, 13, 5, 300),
            (1, 1, 1, 1),
            (2, 40, 70, 49),
            (4, 9, 288, 17),
            (1, 20, 3, 600),
        ] {
            for (parallel, fast) in [
                (false, false),
                (true, false),
                (false, has_avx2_fma()),
                (true, has_avx2_fma()),
            ] {
                let g: Vec<f32> = (0..n * o * p).map(|_| next()).collect();
                let x: Vec<f32> = (0..n * k * p).map(|_| next() * 2.0).collect();
                let mut grad = pointwise::WeightGrad::new(o, k, p);
                for s in 0..n {
                    grad.add(
                        &g[s * o * p..][..o * p],
                        &x[s * k * p..][..k * p],
                        parallel,
                        fast,
                    );
                }
                let dw = grad.finish();
                assert_eq!(dw.len(), o * k);
                for (i, &got) in dw.iter().enumerate() {
                    let (r, c) = (i / k, i % k);
                    let want: f64 = (0..n * p)
                        .map(|j| {
                            let (s, q) = (j / p, j % p);
                            f64::from(g[(s * o + r) * p + q]) * f64::from(x[(s * k + c) * p + q])
                        })
                        .sum();
                    let tol = 1e-5 * ((n * p) as f64).sqrt() * 4.0;
                    assert!(
                        (f64::from(got) - want).abs() <= tol,
                        "({r}, {c}) of {n}x{o}x{k}x{p} fast {fast}: {got} != {want}"
                    );
                }
            }
        }
    }

    /// The depthwise sweep in registers and the portable one agree (full blocks, single
    /// vectors and the scalar tail; a bias and a clamp), and both match a plain sum.
    #[test]
    fn depthwise_sweeps_agree() {
        let mut next = uniform(3);
        let taps = [0usize, 1, 2, 9, 10, 11, 18, 19, 20];
        for span in [1, 7, 8, 31, 32, 45, 100] {
            let phases: Vec<f32> = (0..span + 20).map(|_| next()).collect();
            let filt: Vec<f32> = (0..9).map(|_| next()).collect();
            for act in [Epilogue::NONE, Epilogue::RELU6] {
                let (mut plain, mut fast) = (vec![0f32; span], vec![0f32; span]);
                sweep_taps_f32(&mut plain, &phases, &taps, &filt, (0.25, act), false);
                let fma = has_avx2_fma();
                sweep_taps_f32(&mut fast, &phases, &taps, &filt, (0.25, act), fma);
                for i in 0..span {
                    let want: f32 = 0.25
                        + taps
                            .iter()
                            .zip(&filt)
                            .map(|(&t, &w)| w * phases[t + i])
                            .sum::<f32>();
                    let want = act.apply(want);
                    assert!((plain[i] - want).abs() < 1e-5, "plain [{i}] of {span}");
                    assert!((fast[i] - want).abs() < 1e-5, "fast [{i}] of {span}");
                }
            }
        }
    }

    /// A depthwise layer computed row by row from the unpadded planes (AVX-512), and over
    /// the flattened planes where it has them, gives the same bits as the phase sweeps (AVX2
    /// and FMA), on strides 1 and 2, dilations 1 and 2, kernels 1x1 to 7x7, odd and wide
    /// planes, blocks of 16 with and without a tail, and with a clamp; a stride of 3 has no
    /// row layout.
    /// The geometry of a `k`x`k` convolution of `n` samples of `c` planes `h`x`w` at the
    /// given stride, padding and dilation.
    fn square_geom(
        n: usize,
        c: usize,
        (h, w): (usize, usize),
        k: usize,
        (stride, pad, dil): (usize, usize, usize),
    ) -> Geom {
        let out = |size: usize| (size + 2 * pad - dil * (k - 1) - 1) / stride + 1;
        Geom {
            n,
            c,
            h,
            w,
            kh: k,
            kw: k,
            oh: out(h),
            ow: out(w),
            stride,
            pad,
            dil,
        }
    }

    #[test]
    fn depthwise_rows_give_the_sweeps_bits() {
        if !(has_avx512f() && has_avx2_fma()) {
            crate::note_skipped("this machine (or SLIM_CPU) lacks AVX-512 F, or AVX2 and FMA");
            return;
        }
        let mut next = uniform(5);
        // (h, w, kernel, stride, padding, dilation)
        for (h, w, k, stride, pad, dil) in [
            (28, 28, 3, 1, 1, 1),
            (28, 28, 3, 2, 1, 1),
            (14, 14, 3, 2, 1, 1),
            (7, 7, 3, 1, 1, 1),
            (32, 32, 3, 2, 1, 1),
            (33, 35, 3, 2, 1, 1),
            (5, 40, 5, 1, 2, 1),
            (9, 9, 3, 1, 2, 2),
            (12, 19, 7, 2, 3, 1),
            (3, 3, 1, 1, 0, 1),
            (6, 17, 2, 2, 0, 1),
            (1, 1, 3, 1, 1, 1),
            (7, 7, 3, 2, 1, 1),
            (4, 4, 3, 2, 1, 1),
            (17, 9, 3, 1, 1, 1),
            (30, 30, 5, 2, 2, 1),
            (8, 8, 3, 2, 0, 1),
            (9, 9, 3, 2, 0, 1),
        ] {
            let (n, c) = (2, 3);
            let g = square_geom(n, c, (h, w), k, (stride, pad, dil));
            let (oh, ow) = (g.oh, g.ow);
            let x: Vec<f32> = (0..n * c * h * w).map(|_| next()).collect();
            let wt: Vec<f32> = (0..c * k * k).map(|_| next()).collect();
            let bias: Vec<f32> = (0..c).map(|_| next()).collect();
            let rows = DepthwiseRows::new(&g).expect("strides 1 and 2 have rows");
            // The flat planes serve stride 1 with the output the input's size, and stride 2
            // but for 3x3 unpadded: there the last output column reads the even column
            // `ow`, past the phase's rows of `ow` values.
            let flat = if stride == 1 {
                (oh, ow) == (h, w)
            } else {
                (k, pad) != (3, 0)
            };
            assert_eq!(rows.flat.is_some(), flat, "{h}x{w} k{k} s{stride} p{pad}");
            let row_by_row = DepthwiseRows {
                g,
                masks: rows.masks.clone(),
                flat: None,
            };
            for act in [Epilogue::NONE, Epilogue::RELU6] {
                for b in [Some(&bias[..]), None] {
                    let swept = depthwise_forward_by(&g, &x, &wt, b, act, None);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    for (way, by) in [("flat", &rows), ("rows", &row_by_row)] {
                        assert_eq!(
                            bits(&depthwise_forward_by(&g, &x, &wt, b, act, Some(by))),
                            bits(&swept),
                            "{way}: {h}x{w} k{k} s{stride} p{pad} d{dil}"
                        );
                    }
                }
            }
        }
        let g3 = Geom {
            n: 1,
            c: 1,
            h: 9,
            w: 9,
            kh: 3,
            kw: 3,
            oh: 3,
            ow: 3,
            stride: 3,
            pad: 0,
            dil: 1,
        };
        assert!(DepthwiseRows::new(&g3).is_none());
    }

    /// Global average pooling gives candle's means (to rounding: the sums run in another
    /// order) and candle's gradient, on planes of 1, 7x7 and 13x5 values and a 3-D input.
    #[test]
    fn plane_means_match_candle() {
        let dev = Device::Cpu;
        for dims in [
            vec![3, 4, 1, 1],
            vec![5, 6, 7, 7],
            vec![2, 3, 13, 5],
            vec![4, 2, 9],
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, dims.as_slice(), &dev).unwrap())
                .unwrap();
            let ours = plane_means(x.as_tensor()).unwrap();
            let theirs = x
                .as_tensor()
                .flatten_from(2)
                .unwrap()
                .mean(candle_core::D::Minus1)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "{dims:?}");
            assert!(max_diff(&ours, &theirs) < 1e-6, "{dims:?}");
            // The portable sums (what a machine without AVX-512 runs) agree as well.
            let size: usize = dims[2..].iter().product();
            let planes = x
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let theirs_flat = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (plane, &t) in planes.chunks_exact(size).zip(&theirs_flat) {
                let m = PlaneMeans::mean(plane, (1.0 / size as f64) as f32);
                assert!((m - t).abs() < 1e-6, "portable {dims:?}: {m} vs {t}");
            }
            let weights = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (theirs * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (g1, g2) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
            assert_eq!(g1.dims(), x.dims());
            assert!(max_diff(g1, g2) < 1e-6, "gradient {dims:?}");
        }
    }

    /// A dense convolution straight over the flattened planes gives the bits of the unfolded
    /// columns' product, and runs where it should: stride 1, the output the input's size, at
    /// most four input channels or weights that pay for their repacking.
    #[test]
    fn flat_dense_gives_the_columns_bits() {
        if !has_avx512f() {
            crate::note_skipped("this machine (or SLIM_CPU) lacks AVX-512 F");
            return;
        }
        let mut next = uniform(9);
        // (channels, h, w, kernel, padding, dilation, outputs, stride)
        for (c, h, w, k, pad, dil, o, stride) in [
            (1, 28, 28, 3, 1, 1, 16, 1),
            (1, 28, 28, 5, 2, 1, 6, 1),
            (3, 32, 32, 3, 1, 1, 16, 1),
            (3, 7, 7, 3, 1, 1, 20, 1),
            (2, 5, 9, 3, 1, 1, 3, 1),
            (4, 1, 1, 3, 1, 1, 9, 1),
            (1, 9, 9, 3, 2, 2, 8, 1),
            (2, 3, 17, 1, 0, 1, 5, 1),
            (5, 6, 6, 3, 1, 1, 4, 1),
            (1, 10, 10, 3, 0, 1, 4, 1),
            (1, 10, 10, 3, 1, 1, 4, 2),
            (16, 14, 14, 3, 1, 1, 20, 1),
            (64, 7, 7, 3, 1, 1, 24, 1),
            (9, 5, 11, 5, 2, 1, 17, 1),
            (256, 4, 4, 3, 1, 1, 40, 1),
        ] {
            let n = 3;
            let g = square_geom(n, c, (h, w), k, (stride, pad, dil));
            let (oh, ow) = (g.oh, g.ow);
            let what = format!("c{c} {h}x{w} k{k} p{pad} d{dil} o{o} s{stride}");
            let repack_pays = o * c * k * k * 4 <= 256 << 10 || n * oh * ow >= 512;
            let direct = (c <= 4 || repack_pays) && stride == 1 && (oh, ow) == (h, w) && k > 1;
            assert_eq!(flat_dense_taps(&g, o).is_some(), direct, "{what}");
            let x: Vec<f32> = (0..n * c * h * w).map(|_| next()).collect();
            let wt: Vec<f32> = (0..o * c * k * k).map(|_| next()).collect();
            let bias: Vec<f32> = (0..o).map(|_| next()).collect();
            for act in [Epilogue::NONE, Epilogue::RELU6] {
                let flat = dense_forward_by(&g, o, &x, &wt, &bias, act, true);
                let cols = dense_forward_by(&g, o, &x, &wt, &bias, act, false);
                assert_eq!(flat.len(), cols.len(), "{what}");
                if let Some(i) = (0..flat.len()).find(|&i| flat[i].to_bits() != cols[i].to_bits()) {
                    panic!(
                        "{what}: output {i} is {}, the columns give {}",
                        flat[i], cols[i]
                    );
                }
            }
        }
    }

    #[test]
    fn tap_dots_agree_with_a_plain_sum() {
        let mut next = uniform(11);
        // 1 tap, one group of 9, groups of 5 and 4 (9 + 1), 7 + 7 (14), 9 x 3 (25 taps).
        for ntaps in [1usize, 9, 10, 14, 25] {
            let taps: Vec<usize> = (0..ntaps).map(|t| (t * 7) % 23).collect();
            for span in [1, 7, 8, 13, 64, 222] {
                let phases: Vec<f32> = (0..span + 23).map(|_| next()).collect();
                let samples: Vec<Vec<f32>> = (0..3)
                    .map(|_| (0..span).map(|_| next()).collect())
                    .collect();
                for fast in [false, has_avx2_fma()] {
                    let mut lanes = vec![0f32; ntaps * DOT_LANES];
                    for wide in &samples {
                        tap_dots_f32(&mut lanes, &phases, &taps, wide, fast);
                    }
                    for (t, &at) in taps.iter().enumerate() {
                        let want: f64 = samples
                            .iter()
                            .map(|wide| {
                                (0..span)
                                    .map(|i| f64::from(phases[at + i] * wide[i]))
                                    .sum::<f64>()
                            })
                            .sum();
                        let got: f32 = lanes[t * DOT_LANES..][..DOT_LANES].iter().sum();
                        assert!(
                            (f64::from(got) - want).abs() < 1e-4 * (span as f64).sqrt(),
                            "tap {t} of {ntaps}, span {span}, fast {fast}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn short_copies_copy_every_value() {
        for n in 0..70 {
            let src: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
            let mut dst = vec![-1f32; n];
            copy_short(&mut dst, &src);
            assert_eq!(dst, src, "{n} f32");
            let src: Vec<i8> = (0..n).map(|i| i as i8 - 30).collect();
            let mut dst = vec![99i8; n];
            copy_short(&mut dst, &src);
            assert_eq!(dst, src, "{n} i8");
        }
    }

    #[test]
    fn row_gathers_take_what_the_definition_takes() {
        // Lengths around the 16-value blocks, strides 1 to 3, with room around each row
        // (`ow` past `len`, `step` past the span) that must be left as it was.
        let src: Vec<f32> = (0..4000).map(|i| i as f32).collect();
        for stride in 1..=3 {
            for len in [1, 5, 15, 16, 17, 31, 32, 33, 40] {
                for rows in [1, 3] {
                    let (ow, step) = (len + 3, stride * len + 7);
                    let mut want = vec![-1f32; rows * ow];
                    for r in 0..rows {
                        for i in 0..len {
                            want[r * ow + i] = src[r * step + i * stride];
                        }
                    }
                    // The source ends at its last value read.
                    let end = (rows - 1) * step + (len - 1) * stride + 1;
                    for wide in [false, has_avx512f()] {
                        let mut dst = vec![-1f32; rows * ow];
                        gather_rows(&src[..end], (step, stride), &mut dst, ow, (rows, len), wide);
                        assert_eq!(dst, want, "stride {stride}, {rows} rows of {len}, {wide}");
                    }
                }
            }
        }
    }

    #[test]
    fn dense_matches_candle() {
        for (k, stride, pad, dil) in [
            (3, 1, 1, 1),
            (3, 2, 1, 1),
            (5, 1, 2, 1),
            (1, 1, 0, 1),
            (1, 2, 0, 1),
            (7, 2, 3, 1),
            (3, 1, 2, 2),
            (2, 2, 0, 1),
        ] {
            let spec = Conv2dSpec::new(5, 7, k)
                .with_stride(stride)
                .with_padding(pad)
                .with_dilation(dil);
            check(2, 5, 7, 11, k, spec);
        }
        // One sample (the products over every core), and more samples than tasks.
        for n in [1, 9] {
            check(n, 5, 7, 6, 3, Conv2dSpec::new(5, 7, 3).with_padding(1));
        }
        // The pointwise path, one sample at a time and in parallel over samples.
        for n in [1, 3, 8] {
            check(n, 6, 4, 5, 1, Conv2dSpec::new(6, 4, 1));
        }
    }
}
