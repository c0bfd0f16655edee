//! The ops added for the light ONNX networks (local response normalization, channel shuffle,
//! and pooling with extra end padding or a divisor that excludes the padding), checked against
//! plain loops written from their definitions: ONNX's LRN window, ShuffleNet's permutation,
//! the pooling windows counted position by position. Forward values in evaluation; input
//! gradients in training against central differences of those loops (in f64), against the
//! permutation's own transpose, and against finite differences of the model itself; the
//! wiring errors; model files and older JSON without the new fields; and channel groups.
//! Then the exporters' element-wise and per-channel ops (Clip, LeakyReLU, PReLU, Tanh, SiLU,
//! exact GELU, Erf, the per-channel affine) the same way, on maps and on feature vectors:
//! forward values and gradients (of the inputs and of PReLU's and the affine's parameters)
//! against their definitions, wiring errors, pruning through them, and model files.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use slim_core::deps::channel_groups;
use slim_core::graph::{ConvTransposeSpec, GraphDef, LrnSpec};
use slim_core::{Conv2dSpec, Graph, GraphBuilder, Mode, Model, Op, PoolSpec};

// ---------------------------------------------------------------------------------------
// Plain values and the references.

/// A `[N, C, H, W]` batch of f64 values, row-major.
#[derive(Clone, Debug)]
struct Arr {
    dims: [usize; 4],
    v: Vec<f64>,
}

impl Arr {
    fn zeros(dims: [usize; 4]) -> Arr {
        Arr {
            dims,
            v: vec![0.0; dims.iter().product()],
        }
    }
    /// Uniform values in `[-scale, scale]`, seeded.
    fn random(dims: [usize; 4], seed: u64, scale: f64) -> Arr {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = dims.iter().product();
        // Rounded to f32, so that the model sees exactly these values.
        let v = (0..n)
            .map(|_| f64::from((rng.random::<f64>() * 2.0 - 1.0) as f32 * scale as f32))
            .collect();
        Arr { dims, v }
    }
    fn at(&self, n: usize, c: usize, h: usize, w: usize) -> usize {
        let [_, cc, hh, ww] = self.dims;
        ((n * cc + c) * hh + h) * ww + w
    }
    fn get(&self, n: usize, c: usize, h: usize, w: usize) -> f64 {
        self.v[self.at(n, c, h, w)]
    }
    fn tensor(&self) -> Tensor {
        let v: Vec<f32> = self.v.iter().map(|&x| x as f32).collect();
        Tensor::from_vec(v, self.dims.to_vec(), &Device::Cpu).unwrap()
    }
    fn from_tensor(t: &Tensor) -> Arr {
        let d = t.dims4().unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        Arr {
            dims: [d.0, d.1, d.2, d.3],
            v: v.into_iter().map(f64::from).collect(),
        }
    }
}

/// ONNX LRN: the window of channel `c` runs from `c - (size - 1) / 2` to `c + size / 2`,
/// clipped to the channels there are.
fn lrn_ref(x: &Arr, size: usize, alpha: f64, beta: f64, bias: f64) -> Arr {
    let [n, c, h, w] = x.dims;
    let mut y = Arr::zeros(x.dims);
    for b in 0..n {
        for ch in 0..c {
            let lo = ch.saturating_sub((size - 1) / 2);
            let hi = (ch + size / 2).min(c - 1);
            for i in 0..h {
                for j in 0..w {
                    let mut sum = 0.0;
                    for k in lo..=hi {
                        sum += x.get(b, k, i, j) * x.get(b, k, i, j);
                    }
                    let at = y.at(b, ch, i, j);
                    y.v[at] = x.get(b, ch, i, j) / (bias + alpha / size as f64 * sum).powf(beta);
                }
            }
        }
    }
    y
}

/// ShuffleNet's shuffle: output channel `j * groups + i` is input channel `i * (C / groups) + j`.
fn shuffle_ref(x: &Arr, groups: usize) -> Arr {
    let [n, c, h, w] = x.dims;
    let per = c / groups;
    let mut y = Arr::zeros(x.dims);
    for b in 0..n {
        for i in 0..groups {
            for j in 0..per {
                for r in 0..h {
                    for s in 0..w {
                        let at = y.at(b, j * groups + i, r, s);
                        y.v[at] = x.get(b, i * per + j, r, s);
                    }
                }
            }
        }
    }
    y
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pool {
    Max,
    Avg,
}

/// Output size along one axis, from the definition (`None` when no window fits).
fn pool_out(x: usize, p: &PoolSpec, axis: usize) -> Option<usize> {
    let padded = x + p.pads[axis] + p.pads[axis + 2];
    let span = p.dilation[axis] * (p.kernel[axis] - 1) + 1;
    (padded >= span).then(|| (padded - span) / p.stride[axis] + 1)
}

/// Pooling by windows: each window of the padded plane, tap by tap; a tap is inside the
/// input or padding (`pads`: top, left, bottom, right).
fn pool_ref(x: &Arr, kind: Pool, p: &PoolSpec) -> Arr {
    let [n, c, h, w] = x.dims;
    let oh = pool_out(h, p, 0).unwrap();
    let ow = pool_out(w, p, 1).unwrap();
    let mut y = Arr::zeros([n, c, oh, ow]);
    for b in 0..n {
        for ch in 0..c {
            for i in 0..oh {
                for j in 0..ow {
                    let mut max = f64::NEG_INFINITY;
                    let mut sum = 0.0;
                    let mut inside = 0usize;
                    for di in 0..p.kernel[0] {
                        for dj in 0..p.kernel[1] {
                            // Position in the padded plane, then in the input.
                            let pr = i * p.stride[0] + di * p.dilation[0];
                            let pc = j * p.stride[1] + dj * p.dilation[1];
                            let (r, s) = (
                                pr as isize - p.pads[0] as isize,
                                pc as isize - p.pads[1] as isize,
                            );
                            if r < 0 || s < 0 || r >= h as isize || s >= w as isize {
                                continue;
                            }
                            let v = x.get(b, ch, r as usize, s as usize);
                            max = max.max(v);
                            sum += v;
                            inside += 1;
                        }
                    }
                    let at = y.at(b, ch, i, j);
                    y.v[at] = match kind {
                        Pool::Max => max,
                        Pool::Avg if p.exclude_pad => sum / inside as f64,
                        Pool::Avg => sum / (p.kernel[0] * p.kernel[1]) as f64,
                    };
                }
            }
        }
    }
    y
}

/// Whether `got` and `want` have the same dims and differ by at most `tol` times `want`'s
/// largest magnitude (at least 1); if not, the first difference.
fn close(got: &Arr, want: &Arr, tol: f64, what: &str) -> Result<(), String> {
    if got.dims != want.dims {
        return Err(format!(
            "{what}: dims {:?}, expected {:?}",
            got.dims, want.dims
        ));
    }
    let scale = want.v.iter().fold(1f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.v.iter().zip(&want.v).enumerate() {
        if (g - w).abs() > tol * scale {
            return Err(format!(
                "{what}: [{i}] got {g}, expected {w} (scale {scale})"
            ));
        }
    }
    Ok(())
}

fn assert_close(got: &Arr, want: &Arr, tol: f64, what: &str) {
    if let Err(e) = close(got, want, tol, what) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------
// Models of one op.

/// A model of a single op on a `[C, H, W]` input.
fn one_op(op: Op, chw: [usize; 3]) -> Model {
    let g = GraphBuilder::new(chw).push("op", op).build().unwrap();
    Model::init(g, 0, &Device::Cpu).unwrap()
}

fn eval(model: &Model, x: &Arr) -> Arr {
    Arr::from_tensor(&model.forward(&x.tensor(), Mode::Eval).unwrap())
}

fn chw(x: &Arr) -> [usize; 3] {
    [x.dims[1], x.dims[2], x.dims[3]]
}

fn lrn(size: usize, alpha: f32, beta: f32, bias: f32) -> Op {
    Op::Lrn(LrnSpec {
        size,
        alpha,
        beta,
        bias,
    })
}

fn pool_op(kind: Pool, p: PoolSpec) -> Op {
    match kind {
        Pool::Max => Op::MaxPool2d(p),
        Pool::Avg => Op::AvgPool2d(p),
    }
}

fn pool(
    kernel: usize,
    stride: usize,
    padding: usize,
    pad_end: [usize; 2],
    exclude: bool,
) -> PoolSpec {
    PoolSpec {
        exclude_pad: exclude,
        ..PoolSpec::new(kernel, stride, padding).with_end_padding(pad_end)
    }
}

/// A pool of any window: `[kh, kw]`, strides, dilations and `[top, left, bottom, right]`.
fn window(
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    pads: [usize; 4],
    exclude_pad: bool,
) -> PoolSpec {
    PoolSpec {
        kernel,
        stride,
        dilation,
        pads,
        exclude_pad,
    }
}

// ---------------------------------------------------------------------------------------
// Forward values.

#[test]
fn lrn_matches_the_onnx_window() {
    // (size, alpha, beta, bias, channels, input magnitude)
    let cases: [(usize, f32, f32, f32, usize, f64); 9] = [
        (1, 0.5, 0.75, 1.0, 4, 2.0),
        (2, 0.8, 0.6, 1.0, 5, 2.0),
        (3, 0.5, 0.75, 2.0, 6, 2.0),
        (3, 1.5, 1.0, 0.5, 4, 2.0),
        (4, 1.0, 0.5, 1.5, 7, 2.0),
        // AlexNet's and ZFNet's (activations of tens, so that the normalization shows).
        (5, 1e-4, 0.75, 1.0, 8, 40.0),
        (5, 5e-4, 0.75, 2.0, 8, 40.0),
        // Fewer channels than the window.
        (5, 1.0, 0.75, 1.0, 3, 2.0),
        (4, 2.0, 0.75, 1.0, 2, 2.0),
    ];
    for (k, &(size, alpha, beta, bias, c, mag)) in cases.iter().enumerate() {
        let x = Arr::random([2, c, 3, 5], 10 + k as u64, mag);
        let m = one_op(lrn(size, alpha, beta, bias), chw(&x));
        let want = lrn_ref(&x, size, f64::from(alpha), f64::from(beta), f64::from(bias));
        // The normalization is not the identity here, beyond the tolerance.
        let moved =
            x.v.iter()
                .zip(&want.v)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
        assert!(
            moved > 1e-3 * mag,
            "case {k}: the reference barely moves ({moved})"
        );
        let what = format!("lrn size {size} alpha {alpha} beta {beta} bias {bias} C {c}");
        assert_close(&eval(&m, &x), &want, 1e-5, &what);
    }
}

#[test]
fn lrn_wiring_refuses_a_zero_size_and_non_finite_constants() {
    for op in [
        lrn(0, 1e-4, 0.75, 1.0),
        lrn(3, f32::NAN, 0.75, 1.0),
        lrn(3, 1e-4, f32::INFINITY, 1.0),
        lrn(3, 1e-4, 0.75, f32::NEG_INFINITY),
    ] {
        let mut g = Graph::new();
        g.wire(
            "x",
            Op::Input {
                shape: vec![4, 3, 3],
            },
            &[],
        )
        .unwrap();
        let e = g.wire("norm1", op.clone(), &["x"]).unwrap_err().to_string();
        assert!(e.contains("norm1"), "{op:?}: {e}");
    }
    // A feature vector is not a [C, H, W] map.
    let mut g = Graph::new();
    g.wire("x", Op::Input { shape: vec![4] }, &[]).unwrap();
    let e = g
        .wire("norm1", lrn(3, 1e-4, 0.75, 1.0), &["x"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("norm1"), "{e}");
}

#[test]
fn channel_shuffle_is_the_shufflenet_permutation() {
    let (c, h, w) = (12, 3, 5);
    // Each value names its sample, channel and position: the permutation shows exactly.
    let mut x = Arr::zeros([2, c, h, w]);
    for i in 0..x.v.len() {
        x.v[i] = i as f64;
    }
    // Output channel -> input channel, written out by hand for 3 and 4 groups.
    let by_hand: [(usize, [usize; 12]); 4] = [
        (1, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
        (2, [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]),
        (3, [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]),
        (4, [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]),
    ];
    for (groups, perm) in by_hand {
        let m = one_op(Op::ChannelShuffle { groups }, [c, h, w]);
        let got = eval(&m, &x);
        let want = shuffle_ref(&x, groups);
        assert_eq!(got.v, want.v, "groups {groups}: against the loops");
        for b in 0..2 {
            for (out, &inp) in perm.iter().enumerate() {
                for r in 0..h {
                    for s in 0..w {
                        assert_eq!(
                            got.get(b, out, r, s),
                            x.get(b, inp, r, s),
                            "groups {groups}: output channel {out} should be input channel {inp}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn channel_shuffle_groups_that_do_not_divide_the_channels_are_refused_naming_the_node() {
    for groups in [0, 5, 7, 24] {
        let mut g = Graph::new();
        g.wire(
            "x",
            Op::Input {
                shape: vec![12, 4, 4],
            },
            &[],
        )
        .unwrap();
        let e = g
            .wire("stage2.shuffle", Op::ChannelShuffle { groups }, &["x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("stage2.shuffle"), "groups {groups}: {e}");
        assert!(g.find("stage2.shuffle").is_none());
        // The builder reports it the same way.
        let e = GraphBuilder::new([12, 4, 4])
            .push("shuf", Op::ChannelShuffle { groups })
            .relu("r")
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("shuf"), "groups {groups}: {e}");
    }
    // 12 channels in 6 or 12 groups is fine.
    for groups in [6, 12] {
        let x = Arr::random([1, 12, 2, 3], 3, 1.0);
        let m = one_op(Op::ChannelShuffle { groups }, chw(&x));
        assert_eq!(eval(&m, &x).v, shuffle_ref(&x, groups).v, "groups {groups}");
    }
}

/// Whether a pool is valid by the rules stated for it: a window fits, and no side's padding
/// spans a whole window.
fn pool_valid(p: &PoolSpec, h: usize, w: usize) -> bool {
    let span = |axis: usize| p.dilation[axis] * (p.kernel[axis] - 1) + 1;
    p.pads
        .iter()
        .enumerate()
        .all(|(side, &pad)| pad < span(side % 2))
        && pool_out(h, p, 0).is_some()
        && pool_out(w, p, 1).is_some()
}

#[test]
fn pooling_with_end_padding_and_excluded_padding_matches_the_windows() {
    let mut checked = 0;
    let mut refused = 0;
    for (seed, dims) in [[2, 3, 9, 11], [1, 2, 7, 5]].into_iter().enumerate() {
        let x = Arr::random(dims, 100 + seed as u64, 2.0);
        let (h, w) = (dims[2], dims[3]);
        for kind in [Pool::Max, Pool::Avg] {
            for kernel in [2, 3, 7] {
                for stride in [1, 2] {
                    for padding in [0, 1, 3] {
                        for pad_end in [[0, 0], [1, 1], [1, 0], [0, 1]] {
                            for exclude in [false, true] {
                                let p = pool(kernel, stride, padding, pad_end, exclude);
                                let what = format!("{kind:?} {p:?} on {h}x{w}");
                                let op = pool_op(kind, p.clone());
                                let built = GraphBuilder::new(chw(&x)).push("pool", op).build();
                                if !pool_valid(&p, h, w) {
                                    let e = built.expect_err(&what).to_string();
                                    assert!(e.contains("pool"), "{what}: {e}");
                                    refused += 1;
                                    continue;
                                }
                                let g = built.unwrap_or_else(|e| panic!("{what}: {e}"));
                                let out = &g.node(g.outputs()[0]).shape;
                                let (oh, ow) = (pool_out(h, &p, 0), pool_out(w, &p, 1));
                                assert_eq!(
                                    out,
                                    &vec![dims[1], oh.unwrap(), ow.unwrap()],
                                    "{what}: shape"
                                );
                                let m = Model::init(g, 0, &Device::Cpu).unwrap();
                                let want = pool_ref(&x, kind, &p);
                                assert_close(&eval(&m, &x), &want, 1e-5, &what);
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    // Both sides of the rules were exercised.
    assert!(
        checked > 150 && refused > 50,
        "{checked} checked, {refused} refused"
    );
}

/// Windows the square kernels do not take: rectangular, unequal strides, dilated, and
/// padding that differs per side (more before than after, as SAME_LOWER pads) or exceeds half
/// the window. Shapes, values and both sides of the padding rule.
#[test]
fn general_pools_match_the_windows() {
    let x = Arr::random([2, 3, 9, 10], 150, 2.0);
    let (h, w) = (9, 10);
    let mut checked = 0;
    let mut refused = 0;
    for kind in [Pool::Max, Pool::Avg] {
        for kernel in [[1, 3], [3, 2], [2, 2]] {
            for stride in [[1, 1], [2, 1], [1, 3]] {
                for dilation in [[1, 1], [2, 1], [2, 3]] {
                    for pads in [
                        [0; 4],
                        [1, 0, 0, 0],
                        [2, 1, 1, 2],
                        [0, 2, 1, 0],
                        [3, 0, 0, 3],
                    ] {
                        for exclude in [false, true] {
                            let p = window(kernel, stride, dilation, pads, exclude);
                            let what = format!("{kind:?} {p:?} on {h}x{w}");
                            let built = GraphBuilder::new(chw(&x))
                                .push("pool", pool_op(kind, p.clone()))
                                .build();
                            if !pool_valid(&p, h, w) {
                                let e = built.expect_err(&what).to_string();
                                assert!(e.contains("padding"), "{what}: {e}");
                                refused += 1;
                                continue;
                            }
                            let g = built.unwrap_or_else(|e| panic!("{what}: {e}"));
                            let (oh, ow) =
                                (pool_out(h, &p, 0).unwrap(), pool_out(w, &p, 1).unwrap());
                            assert_eq!(g.node(g.outputs()[0]).shape, vec![3, oh, ow], "{what}");
                            let m = Model::init(g, 0, &Device::Cpu).unwrap();
                            assert_close(&eval(&m, &x), &pool_ref(&x, kind, &p), 1e-5, &what);
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(
        checked >= 200 && refused >= 100,
        "{checked} checked, {refused} refused"
    );
}

#[test]
fn general_pool_gradients_match_central_differences() {
    let max = [
        (
            window([1, 3], [1, 2], [1, 1], [0, 1, 0, 1], false),
            [1, 2, 4, 7],
        ),
        (
            window([3, 2], [2, 1], [2, 1], [2, 0, 1, 1], false),
            [2, 2, 8, 5],
        ),
        (
            window([2, 2], [1, 1], [1, 2], [1, 1, 0, 0], false),
            [1, 2, 5, 6],
        ),
    ];
    check_pool_gradients(Pool::Max, &max, 700);
    let avg = [
        (
            window([1, 3], [1, 2], [1, 1], [0, 1, 0, 1], true),
            [1, 2, 4, 7],
        ),
        (
            window([3, 2], [2, 1], [2, 1], [2, 0, 1, 1], false),
            [2, 2, 8, 5],
        ),
        (
            window([2, 2], [1, 1], [1, 2], [1, 1, 0, 0], true),
            [1, 2, 5, 6],
        ),
    ];
    check_pool_gradients(Pool::Avg, &avg, 800);
}

#[test]
fn a_square_pool_is_written_as_before_and_a_general_one_round_trips() {
    let v = serde_json::to_value(Op::MaxPool2d(pool(3, 2, 1, [1, 0], false))).unwrap();
    assert_eq!(v["kernel"], 3, "{v}");
    assert_eq!(v["stride"], 2, "{v}");
    assert_eq!(v["padding"], 1, "{v}");
    assert_eq!(v["pad_end"], serde_json::json!([1, 0]), "{v}");
    assert!(
        v.get("pads").is_none() && v.get("dilation").is_none(),
        "{v}"
    );
    let general = window([3, 1], [2, 1], [2, 1], [2, 1, 0, 1], true);
    let v = serde_json::to_value(Op::AvgPool2d(general.clone())).unwrap();
    assert_eq!(v["kernel"], serde_json::json!([3, 1]), "{v}");
    assert_eq!(v["pads"], serde_json::json!([2, 1, 0, 1]), "{v}");
    assert!(v.get("padding").is_none(), "{v}");
    let back: Op = serde_json::from_value(v).unwrap();
    assert_eq!(back, Op::AvgPool2d(general));
}

#[test]
fn excluding_the_padding_changes_only_the_border_windows() {
    // A plane of ones: with exclude_pad every average is exactly 1; counting the padding as
    // zeros, a corner window of a 3x3 kernel with padding 1 covers 4 of 9 positions.
    let x = Arr {
        dims: [1, 1, 5, 5],
        v: vec![1.0; 25],
    };
    let incl = eval(
        &one_op(Op::AvgPool2d(pool(3, 2, 1, [1, 1], false)), [1, 5, 5]),
        &x,
    );
    let excl = eval(
        &one_op(Op::AvgPool2d(pool(3, 2, 1, [1, 1], true)), [1, 5, 5]),
        &x,
    );
    // (5 + 2 + 1 - 3) / 2 + 1 = 3 windows a side, starting at -1, 1, 3 in input coordinates:
    // rows covered -1..2 (2 inside), 1..4 (3 inside), 3..6 (2 inside: 3 and 4).
    assert_eq!(incl.dims, [1, 1, 3, 3]);
    let inside = [2.0, 3.0, 2.0];
    for i in 0..3 {
        for j in 0..3 {
            let want = inside[i] * inside[j] / 9.0;
            assert!(
                (incl.get(0, 0, i, j) - want).abs() < 1e-6,
                "({i}, {j}): {incl:?}"
            );
            assert!(
                (excl.get(0, 0, i, j) - 1.0).abs() < 1e-6,
                "({i}, {j}): {excl:?}"
            );
        }
    }
    // Max pooling never takes the padding, even over negative values.
    let neg = Arr {
        dims: [1, 1, 4, 4],
        v: (0..16).map(|i| -1.0 - i as f64).collect(),
    };
    let y = eval(
        &one_op(Op::MaxPool2d(pool(2, 2, 0, [1, 1], false)), [1, 4, 4]),
        &neg,
    );
    assert_eq!(y.dims, [1, 1, 2, 2]);
    assert_eq!(y.v, vec![-1.0, -3.0, -9.0, -11.0]);
    let y = eval(
        &one_op(Op::MaxPool2d(pool(3, 2, 1, [1, 0], false)), [1, 4, 4]),
        &neg,
    );
    // Rows: windows at -1..2, 1..4, (4 + 2 + 1 - 3) / 2 + 1 = 3; columns (4 + 2 - 3) / 2 + 1 = 2.
    assert_eq!(y.dims, [1, 1, 3, 2]);
    assert_eq!(y.v, vec![-1.0, -2.0, -5.0, -6.0, -13.0, -14.0]);
}

#[test]
fn end_padding_that_reaches_the_kernel_is_refused_naming_the_node() {
    let refused = [
        pool(2, 2, 0, [2, 0], false),
        pool(2, 2, 0, [0, 2], false),
        pool(2, 1, 1, [1, 0], false),
        pool(3, 2, 1, [2, 0], true),
        pool(3, 2, 1, [0, 2], false),
        pool(3, 1, 0, [3, 3], false),
    ];
    for p in refused {
        for kind in [Pool::Max, Pool::Avg] {
            let mut g = Graph::new();
            g.wire(
                "x",
                Op::Input {
                    shape: vec![2, 8, 8],
                },
                &[],
            )
            .unwrap();
            let e = g
                .wire("pool3", pool_op(kind, p.clone()), &["x"])
                .unwrap_err()
                .to_string();
            assert!(e.contains("pool3"), "{kind:?} {p:?}: {e}");
        }
    }
    // Just below the kernel is fine.
    for p in [
        pool(2, 2, 0, [1, 1], false),
        pool(3, 2, 1, [1, 1], true),
        pool(3, 1, 0, [2, 2], false),
    ] {
        let mut g = Graph::new();
        g.wire(
            "x",
            Op::Input {
                shape: vec![2, 8, 8],
            },
            &[],
        )
        .unwrap();
        g.wire("pool3", Op::MaxPool2d(p.clone()), &["x"])
            .unwrap_or_else(|e| panic!("{p:?}: {e}"));
    }
}

// ---------------------------------------------------------------------------------------
// Gradients.

/// A training forward of `model` on `x` and the gradient of `sum(y * weights)` with respect
/// to the input, with the weights drawn from `seed`; also the weights.
fn input_gradient(model: &Model, x: &Arr, seed: u64) -> (Arr, Arr) {
    let xv = Var::from_tensor(&x.tensor()).unwrap();
    let y = model.forward(xv.as_tensor(), Mode::Train).unwrap();
    let d = y.dims4().unwrap();
    let wts = Arr::random([d.0, d.1, d.2, d.3], seed, 1.0);
    let loss = (&y * wts.tensor()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(xv.as_tensor()).expect("a gradient for the input");
    (Arr::from_tensor(g), wts)
}

fn dot(a: &Arr, b: &Arr) -> f64 {
    assert_eq!(a.dims, b.dims);
    a.v.iter().zip(&b.v).map(|(p, q)| p * q).sum()
}

/// The gradient of `sum(f(x) * wts)` by central differences of `f` in f64, at every input.
fn numeric_gradient(x: &Arr, wts: &Arr, f: &dyn Fn(&Arr) -> Arr) -> Arr {
    let eps = 1e-6;
    let mut g = Arr::zeros(x.dims);
    for i in 0..x.v.len() {
        let mut up = x.clone();
        up.v[i] += eps;
        let mut down = x.clone();
        down.v[i] -= eps;
        g.v[i] = (dot(&f(&up), wts) - dot(&f(&down), wts)) / (2.0 * eps);
    }
    g
}

#[test]
fn lrn_gradients_match_central_differences_of_the_definition() {
    for (k, &(size, alpha, beta, bias, c)) in [
        (3usize, 0.8f32, 0.75f32, 1.0f32, 5usize),
        (4, 1.0, 0.6, 2.0, 3),
        (5, 1e-4, 0.75, 1.0, 6),
        (1, 0.5, 1.0, 0.5, 2),
    ]
    .iter()
    .enumerate()
    {
        let x = Arr::random([2, c, 3, 4], 200 + k as u64, 2.0);
        let m = one_op(lrn(size, alpha, beta, bias), chw(&x));
        let (got, wts) = input_gradient(&m, &x, 300 + k as u64);
        let f = |x: &Arr| lrn_ref(x, size, f64::from(alpha), f64::from(beta), f64::from(bias));
        let want = numeric_gradient(&x, &wts, &f);
        assert_close(&got, &want, 1e-4, &format!("lrn size {size} gradient"));
    }
}

#[test]
fn channel_shuffle_gradient_is_the_inverse_permutation() {
    for groups in [2, 3, 4] {
        let x = Arr::random([2, 12, 2, 3], 7, 1.0);
        let m = one_op(Op::ChannelShuffle { groups }, chw(&x));
        let (got, wts) = input_gradient(&m, &x, 8);
        // d/dx[i * per + j] of sum(y * w) is w[j * groups + i], exactly.
        let per = 12 / groups;
        let mut want = Arr::zeros(x.dims);
        for b in 0..2 {
            for i in 0..groups {
                for j in 0..per {
                    for r in 0..2 {
                        for s in 0..3 {
                            let at = want.at(b, i * per + j, r, s);
                            want.v[at] = wts.get(b, j * groups + i, r, s);
                        }
                    }
                }
            }
        }
        assert_eq!(got.v, want.v, "groups {groups}");
    }
}

/// The smallest case of a window equal to its stride that leaves a column out: a 2x3 plane
/// pooled 2x2 at stride 2 has one window, over the first two columns, so the third column
/// gets no gradient.
#[test]
fn avg_pool_gradient_skips_what_no_window_covers() {
    for (kind, exclude) in [(Pool::Max, false), (Pool::Avg, false), (Pool::Avg, true)] {
        let x = Arr {
            dims: [1, 1, 2, 3],
            v: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let m = one_op(pool_op(kind, pool(2, 2, 0, [0, 0], exclude)), [1, 2, 3]);
        let (got, wts) = input_gradient(&m, &x, 1);
        let w = wts.v[0];
        let want = match kind {
            Pool::Avg => vec![w / 4.0, w / 4.0, 0.0, w / 4.0, w / 4.0, 0.0],
            Pool::Max => vec![0.0, 0.0, 0.0, 0.0, w, 0.0],
        };
        let want = Arr {
            dims: [1, 1, 2, 3],
            v: want,
        };
        assert_close(
            &got,
            &want,
            1e-6,
            &format!("{kind:?} exclude_pad {exclude}"),
        );
    }
}

/// Pooling gradients in training, against central differences of the window loops: `Err`
/// says which case failed and how.
fn pool_gradient(kind: Pool, p: &PoolSpec, dims: [usize; 4], seed: u64) -> Result<(), String> {
    let x = Arr::random(dims, seed, 2.0);
    let m = one_op(pool_op(kind, p.clone()), chw(&x));
    let what = format!("{kind:?} {p:?} on {dims:?}");
    let xv = Var::from_tensor(&x.tensor()).unwrap();
    let y = m
        .forward(xv.as_tensor(), Mode::Train)
        .map_err(|e| format!("{what}: training forward: {e}"))?;
    let d = y.dims4().unwrap();
    let wts = Arr::random([d.0, d.1, d.2, d.3], seed + 1, 1.0);
    let grads = (&y * wts.tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .map_err(|e| format!("{what}: backward: {e}"))?;
    let got = grads
        .get(xv.as_tensor())
        .ok_or_else(|| format!("{what}: no gradient for the input"))?;
    let want = numeric_gradient(&x, &wts, &|x| pool_ref(x, kind, p));
    close(
        &Arr::from_tensor(got),
        &want,
        1e-4,
        &format!("{what}: gradient"),
    )
}

/// Runs every case and fails with all the failures listed.
fn check_pool_gradients(kind: Pool, cases: &[(PoolSpec, [usize; 4])], seed: u64) {
    let failures: Vec<String> = cases
        .iter()
        .enumerate()
        .filter_map(|(k, (p, dims))| pool_gradient(kind, p, *dims, seed + 10 * k as u64).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn max_pool_gradients_with_end_padding_match_central_differences() {
    let cases = [
        (pool(3, 2, 1, [1, 1], false), [2, 3, 7, 8]),
        (pool(3, 2, 0, [1, 0], false), [1, 2, 8, 7]),
        (pool(2, 2, 0, [1, 1], false), [2, 2, 5, 7]),
        (pool(3, 1, 1, [0, 1], false), [1, 2, 5, 6]),
        (pool(7, 2, 3, [1, 1], false), [1, 2, 9, 8]),
    ];
    check_pool_gradients(Pool::Max, &cases, 400);
}

/// Average pooling whose window equals its stride, over a padded plane that the windows tile
/// exactly.
#[test]
fn avg_pool_gradients_match_central_differences_when_windows_tile() {
    let cases = [
        (pool(2, 2, 0, [1, 1], true), [2, 3, 7, 9]),
        (pool(2, 2, 0, [1, 0], true), [1, 2, 5, 6]),
        (pool(3, 3, 1, [1, 1], true), [1, 2, 6, 9]),
        (pool(2, 2, 0, [0, 1], false), [1, 2, 6, 5]),
    ];
    check_pool_gradients(Pool::Avg, &cases, 500);
}

/// Average pooling as the light networks use it: overlapping 3x3 windows at stride 2 or 1
/// (ceil mode, `count_include_pad = 0`), and windows equal to the stride over a padded plane
/// that they do not tile (the last row or column is in no window).
#[test]
fn avg_pool_gradients_match_central_differences_in_general() {
    let cases = [
        (pool(3, 2, 1, [1, 1], true), [2, 3, 7, 8]),
        (pool(3, 1, 1, [0, 0], true), [1, 2, 5, 6]),
        (pool(3, 2, 0, [0, 0], false), [1, 2, 7, 7]),
        (pool(2, 2, 1, [0, 0], true), [1, 2, 7, 5]),
        (pool(2, 2, 0, [0, 0], false), [1, 2, 5, 7]),
        (pool(3, 3, 0, [1, 0], true), [1, 2, 7, 8]),
    ];
    check_pool_gradients(Pool::Avg, &cases, 600);
}

/// A chain of the new ops in one training forward: the model's own gradient against its own
/// forward, by f32 central differences on a few inputs, and against the composed loops.
#[test]
fn a_chain_of_the_new_ops_backpropagates_like_its_finite_differences() {
    let dims = [1, 6, 6, 7];
    let mut b = GraphBuilder::new([dims[1], dims[2], dims[3]]);
    b.push("norm", lrn(3, 0.8, 0.75, 1.0))
        .push("shuffle", Op::ChannelShuffle { groups: 3 })
        .push("pool", Op::MaxPool2d(pool(2, 2, 0, [0, 1], false)))
        .push("avg", Op::AvgPool2d(pool(2, 2, 0, [1, 0], true)));
    let m = Model::init(b.build().unwrap(), 0, &Device::Cpu).unwrap();
    let x = Arr::random(dims, 900, 2.0);
    let reference = |x: &Arr| {
        let y = lrn_ref(x, 3, f64::from(0.8f32), 0.75, 1.0);
        let y = shuffle_ref(&y, 3);
        let y = pool_ref(&y, Pool::Max, &pool(2, 2, 0, [0, 1], false));
        pool_ref(&y, Pool::Avg, &pool(2, 2, 0, [1, 0], true))
    };
    assert_close(&eval(&m, &x), &reference(&x), 1e-5, "chain forward");
    let xv = Var::from_tensor(&x.tensor()).unwrap();
    let y = m.forward(xv.as_tensor(), Mode::Train).unwrap();
    let d = y.dims4().unwrap();
    let wts = Arr::random([d.0, d.1, d.2, d.3], 901, 1.0);
    let grads = match (&y * wts.tensor()).unwrap().sum_all().unwrap().backward() {
        Ok(g) => g,
        Err(e) => panic!("chain backward: {e}"),
    };
    let got = Arr::from_tensor(grads.get(xv.as_tensor()).unwrap());
    // f32 finite differences through the model itself, on every seventh input, except where
    // the step crosses a kink (a window's maximum changes hands: the one-sided differences
    // disagree).
    let loss = |x: &Arr| -> f64 {
        let y = m.forward(&x.tensor(), Mode::Eval).unwrap();
        dot(&Arr::from_tensor(&y), &wts)
    };
    let (eps, at_x) = (1e-2, loss(&x));
    let (mut moved, mut kinks) = (0, 0);
    for i in (0..x.v.len()).step_by(7) {
        let mut up = x.clone();
        up.v[i] += eps;
        let mut down = x.clone();
        down.v[i] -= eps;
        let (right, left) = ((loss(&up) - at_x) / eps, (at_x - loss(&down)) / eps);
        if (right - left).abs() > 0.1 * right.abs().max(left.abs()) + 1e-3 {
            kinks += 1;
            continue;
        }
        let fd = (right + left) / 2.0;
        assert!(
            (fd - got.v[i]).abs() <= 2e-2 * fd.abs() + 1e-4,
            "input {i}: backward {} vs finite difference {fd}",
            got.v[i]
        );
        moved += usize::from(fd.abs() > 1e-3);
    }
    assert!(
        moved >= 10 && kinks <= 3,
        "{moved} inputs with a gradient checked, {kinks} kinks skipped"
    );
    let want = numeric_gradient(&x, &wts, &reference);
    assert_close(&got, &want, 1e-4, "chain gradient");
}

// ---------------------------------------------------------------------------------------
// Model files and JSON.

fn new_ops_model() -> Model {
    let mut b = GraphBuilder::new([3, 11, 9]);
    b.conv("conv1", 6, 3, 1, 1)
        .push("norm1", lrn(5, 1e-4, 0.75, 2.0))
        .push("shuffle", Op::ChannelShuffle { groups: 3 })
        .push("pool1", Op::MaxPool2d(pool(3, 2, 0, [1, 1], false)))
        .push("pool2", Op::AvgPool2d(pool(3, 2, 1, [1, 0], true)))
        .push("pool3", Op::AvgPool2d(pool(2, 1, 0, [0, 1], false)))
        .global_avg_pool("gap")
        .linear("fc", 4);
    Model::init(b.build().unwrap(), 3, &Device::Cpu).unwrap()
}

#[test]
fn model_files_keep_the_new_ops() {
    let m = new_ops_model();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("light.safetensors");
    m.save(&path).unwrap();
    let back = Model::load(&path, &Device::Cpu).unwrap();
    let from_bytes = Model::from_bytes(&m.to_bytes().unwrap(), &Device::Cpu).unwrap();
    for loaded in [&back, &from_bytes] {
        assert_eq!(loaded.graph, m.graph);
        for (a, b) in loaded.graph.nodes().iter().zip(m.graph.nodes()) {
            assert_eq!(a.op, b.op, "{}", b.name);
        }
        let x = Arr::random([2, 3, 11, 9], 1, 1.0);
        let ya = loaded.forward(&x.tensor(), Mode::Eval).unwrap();
        let yb = m.forward(&x.tensor(), Mode::Eval).unwrap();
        assert_eq!(
            ya.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            yb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    // The specific values survive, not just the kinds.
    let n = back.graph.find("pool2").unwrap();
    assert_eq!(n.op, Op::AvgPool2d(pool(3, 2, 1, [1, 0], true)));
    let n = back.graph.find("norm1").unwrap();
    assert_eq!(n.op, lrn(5, 1e-4, 0.75, 2.0));
    let n = back.graph.find("shuffle").unwrap();
    assert_eq!(n.op, Op::ChannelShuffle { groups: 3 });
}

#[test]
fn pool_json_without_the_new_fields_reads_with_the_defaults() {
    // The tags as they are written.
    let v = serde_json::to_value(Op::MaxPool2d(PoolSpec::new(3, 2, 1))).unwrap();
    let max_tag = v["op"].as_str().unwrap().to_string();
    // A symmetric pool is written as before: no new fields.
    assert!(
        v.get("pad_end").is_none() && v.get("exclude_pad").is_none(),
        "{v}"
    );
    let v = serde_json::to_value(Op::AvgPool2d(PoolSpec::new(2, 2, 0))).unwrap();
    let avg_tag = v["op"].as_str().unwrap().to_string();
    assert!(
        v.get("pad_end").is_none() && v.get("exclude_pad").is_none(),
        "{v}"
    );

    // An older file's ops.
    let old = format!(r#"{{"op": "{max_tag}", "kernel": 3, "stride": 2, "padding": 1}}"#);
    let op: Op = serde_json::from_str(&old).unwrap();
    assert_eq!(op, Op::MaxPool2d(PoolSpec::new(3, 2, 1)));
    let old = format!(r#"{{"op": "{avg_tag}", "kernel": 2, "stride": 2, "padding": 0}}"#);
    let op: Op = serde_json::from_str(&old).unwrap();
    match &op {
        Op::AvgPool2d(p) => {
            assert_eq!(p.pads, [0; 4]);
            assert!(!p.exclude_pad);
        }
        other => panic!("{other:?}"),
    }
    // One of the two new fields alone.
    let half = format!(
        r#"{{"op": "{avg_tag}", "kernel": 3, "stride": 2, "padding": 1, "exclude_pad": true}}"#
    );
    let op: Op = serde_json::from_str(&half).unwrap();
    assert_eq!(op, Op::AvgPool2d(pool(3, 2, 1, [0, 0], true)));

    // An older graph description, where the op is flattened into the node.
    let def = format!(
        r#"{{"nodes": [
            {{"name": "input", "op": "input", "shape": [2, 7, 7]}},
            {{"name": "pool", "op": "{max_tag}", "kernel": 3, "stride": 2, "padding": 1, "inputs": ["input"]}},
            {{"name": "avg", "op": "{avg_tag}", "kernel": 2, "stride": 2, "padding": 0, "inputs": ["pool"]}}
        ], "outputs": ["avg"]}}"#
    );
    let def: GraphDef = serde_json::from_str(&def).unwrap();
    let g = Graph::from_def(&def).unwrap();
    assert_eq!(
        g.find("pool").unwrap().op,
        Op::MaxPool2d(PoolSpec::new(3, 2, 1))
    );
    assert_eq!(
        g.find("avg").unwrap().op,
        Op::AvgPool2d(PoolSpec::new(2, 2, 0))
    );
    assert_eq!(g.find("avg").unwrap().shape, vec![2, 2, 2]);

    // The new fields and the new ops round-trip, as ops and in a graph description.
    for op in [
        Op::MaxPool2d(pool(3, 2, 1, [1, 0], false)),
        Op::AvgPool2d(pool(3, 2, 1, [0, 1], true)),
        Op::AvgPool2d(pool(2, 2, 0, [1, 1], false)),
        lrn(5, 1e-4, 0.75, 2.0),
        Op::ChannelShuffle { groups: 4 },
    ] {
        let s = serde_json::to_string(&op).unwrap();
        let back: Op = serde_json::from_str(&s).unwrap();
        assert_eq!(back, op, "{s}");
    }
    let g = new_ops_model().graph;
    let s = serde_json::to_string(&g.to_def()).unwrap();
    let def: GraphDef = serde_json::from_str(&s).unwrap();
    assert_eq!(Graph::from_def(&def).unwrap(), g);
}

// ---------------------------------------------------------------------------------------
// Channel groups.

#[test]
fn lrn_and_channel_shuffles_pass_channels_through() {
    let chain = |middle: Op| {
        let mut b = GraphBuilder::new([3, 8, 8]);
        b.conv("conv1", 8, 3, 1, 1)
            .push("mid", middle)
            .conv_with("conv2", Conv2dSpec::new(0, 5, 3).with_padding(1));
        b.build().unwrap()
    };
    let conv1_group = |g: &Graph| {
        let groups = channel_groups(g);
        let found = groups
            .groups
            .iter()
            .find(|gr| gr.producers == ["conv1"])
            .cloned()
            .expect("conv1's group");
        (groups, found)
    };

    // conv -> LRN -> conv: conv1's channels are prunable, and conv2 reads them.
    let g = chain(lrn(5, 1e-4, 0.75, 1.0));
    let (groups, c1) = conv1_group(&g);
    assert!(c1.is_prunable(), "{c1}");
    assert_eq!(c1.channels, 8);
    assert!(
        c1.members
            .iter()
            .any(|m| m.param == "conv2.weight" && m.axis == 1),
        "{:?}",
        c1.members
    );
    // Pruning it gives a model whose LRN runs on the channels kept.
    let m = Model::init(g, 1, &Device::Cpu).unwrap();
    let pruned = groups.prune(&m, &[(c1.id, vec![0, 2, 3, 7])]).unwrap();
    assert_eq!(pruned.graph.find("mid").unwrap().shape, vec![4, 8, 8]);
    let x = Tensor::zeros((2, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        pruned.forward(&x, Mode::Eval).unwrap().dims(),
        &[2, 5, 8, 8]
    );

    // conv -> ChannelShuffle -> conv: the shuffle's two blocks of four are pruned alike, and
    // conv2 reads channel k of block a at 2 k + a.
    let g = chain(Op::ChannelShuffle { groups: 2 });
    let (groups, c1) = conv1_group(&g);
    assert!(c1.is_prunable() && c1.channels == 4, "{c1}");
    let reads: Vec<(usize, usize)> = c1
        .members
        .iter()
        .filter(|m| m.param == "conv2.weight")
        .map(|m| (m.offset, m.stride))
        .collect();
    assert_eq!(reads, [(0, 2), (1, 2)]);
    let m = Model::init(g, 1, &Device::Cpu).unwrap();
    let pruned = groups.prune(&m, &[(c1.id, vec![1, 3])]).unwrap();
    assert_eq!(pruned.graph.find("mid").unwrap().shape, vec![4, 8, 8]);
}

// ---------------------------------------------------------------------------------------
// The exporters' element-wise and per-channel ops: Clip, LeakyRelu, PRelu, Tanh, SiLU, GELU,
// Erf and the per-channel affine, against the same kind of loops, on `[C, H, W]` maps and on
// `[F]` feature vectors (held here as `[N, F, 1, 1]`).

/// The error function in f64, by the series `erf(x) = 2/√π · e^(-x²) · Σ 2ⁿ x^(2n+1) / (1·3···(2n+1))`,
/// whose terms all have one sign (nothing cancels); beyond |x| = 6, erf is ±1 to within 1e-17.
fn erf_ref(x: f64) -> f64 {
    let a = x.abs();
    if a >= 6.0 {
        return x.signum();
    }
    let (mut term, mut sum, mut n) = (a, a, 0.0);
    while term > 1e-17 * sum {
        n += 1.0;
        term *= 2.0 * a * a / (2.0 * n + 1.0);
        sum += term;
    }
    (2.0 / std::f64::consts::PI.sqrt() * (-a * a).exp() * sum).copysign(x)
}

#[test]
fn the_erf_reference_matches_tabulated_values() {
    // erf to 19 digits (Abramowitz and Stegun's table 7.1; Wolfram for the far tail), as the
    // nearest f64.
    let table = [
        (0.0, 0.0),
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (1.5, 0.966_105_146_475_310_8),
        (2.0, 0.995_322_265_018_952_7),
        (3.0, 0.999_977_909_503_001_4),
        (4.5, 0.999_999_999_803_383_9),
    ];
    for (x, want) in table {
        for (x, want) in [(x, want), (-x, -want)] {
            let got = erf_ref(x);
            assert!(
                (got - want).abs() < 1e-15,
                "erf({x}) = {got}, expected {want}"
            );
        }
    }
}

/// `v` rounded to f32, so that the model holds exactly the value the reference uses.
fn f32r(v: f64) -> f64 {
    f64::from(v as f32)
}

/// `n` values uniform in `[center - half, center + half]`, rounded to f32, seeded.
fn values(n: usize, seed: u64, center: f64, half: f64) -> Vec<f64> {
    Arr::random([1, n, 1, 1], seed, half)
        .v
        .into_iter()
        .map(|v| f32r(center + v))
        .collect()
}

/// One of the ops, with its parameters' values where it has some.
#[derive(Clone, Debug)]
enum Act {
    Clip(Option<f32>, Option<f32>),
    Leaky(f32),
    PRelu(Vec<f64>),
    Tanh,
    Silu,
    Gelu,
    Erf,
    Affine(Vec<f64>, Vec<f64>),
}

impl Act {
    fn op(&self) -> Op {
        match self {
            Act::Clip(min, max) => Op::Clip {
                min: *min,
                max: *max,
            },
            Act::Leaky(alpha) => Op::LeakyRelu { alpha: *alpha },
            Act::PRelu(w) => Op::PRelu { channels: w.len() },
            Act::Tanh => Op::Tanh,
            Act::Silu => Op::Silu,
            Act::Gelu => Op::Gelu,
            Act::Erf => Op::Erf,
            Act::Affine(w, _) => Op::ChannelAffine { channels: w.len() },
        }
    }
    /// The parameters, by role.
    fn params(&self) -> Vec<(&'static str, Vec<f64>)> {
        match self {
            Act::PRelu(w) => vec![("weight", w.clone())],
            Act::Affine(w, b) => vec![("weight", w.clone()), ("bias", b.clone())],
            _ => Vec::new(),
        }
    }
    /// The same op with one parameter replaced.
    fn with(&self, role: &str, v: Vec<f64>) -> Act {
        match (self, role) {
            (Act::PRelu(_), "weight") => Act::PRelu(v),
            (Act::Affine(_, b), "weight") => Act::Affine(v, b.clone()),
            (Act::Affine(w, _), "bias") => Act::Affine(w.clone(), v),
            _ => panic!("{self:?} has no parameter {role}"),
        }
    }
    /// The definition, at one value of channel `c`.
    fn apply(&self, x: f64, c: usize) -> f64 {
        match self {
            Act::Clip(min, max) => {
                let mut y = x;
                if let Some(lo) = min {
                    y = y.max(f64::from(*lo));
                }
                if let Some(hi) = max {
                    y = y.min(f64::from(*hi));
                }
                y
            }
            Act::Leaky(alpha) => {
                if x > 0.0 {
                    x
                } else {
                    f64::from(*alpha) * x
                }
            }
            Act::PRelu(w) => {
                if x > 0.0 {
                    x
                } else {
                    w[c] * x
                }
            }
            Act::Tanh => x.tanh(),
            Act::Silu => x / (1.0 + (-x).exp()),
            Act::Gelu => 0.5 * x * (1.0 + erf_ref(x / std::f64::consts::SQRT_2)),
            Act::Erf => erf_ref(x),
            Act::Affine(w, b) => x * w[c] + b[c],
        }
    }
}

/// The op applied value by value, knowing each value's channel.
fn act_ref(x: &Arr, a: &Act) -> Arr {
    let [n, c, h, w] = x.dims;
    let mut y = x.clone();
    for b in 0..n {
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    let at = x.at(b, ch, i, j);
                    y.v[at] = a.apply(x.v[at], ch);
                }
            }
        }
    }
    y
}

/// Global average pooling: `[N, C, H, W]` to `[N, C, 1, 1]`.
fn gap_ref(x: &Arr) -> Arr {
    let [n, c, h, w] = x.dims;
    let mut y = Arr::zeros([n, c, 1, 1]);
    for b in 0..n {
        for ch in 0..c {
            let mut sum = 0.0;
            for i in 0..h {
                for j in 0..w {
                    sum += x.get(b, ch, i, j);
                }
            }
            y.v[b * c + ch] = sum / (h * w) as f64;
        }
    }
    y
}

fn set_param(m: &Model, name: &str, v: &[f64]) {
    let shape = m
        .params
        .var(name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .dims()
        .to_vec();
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    m.params.set(name, &t).unwrap();
}

fn param_values(m: &Model, name: &str) -> Vec<f32> {
    m.params
        .tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// A model of the op alone (node `op`) on `[C, H, W]` inputs, or on `[F]` vectors when
/// `vector` (then `dims` is `[N, F, 1, 1]`), its parameters set to the op's values.
fn act_model(a: &Act, dims: [usize; 4], vector: bool) -> Model {
    let shape = if vector {
        vec![dims[1]]
    } else {
        vec![dims[1], dims[2], dims[3]]
    };
    let g = GraphBuilder::new(shape).push("op", a.op()).build().unwrap();
    let m = Model::init(g, 0, &Device::Cpu).unwrap();
    for (role, v) in a.params() {
        set_param(&m, &format!("op.{role}"), &v);
    }
    m
}

/// The model's input: `[N, C, H, W]`, or `[N, F]` for a vector model.
fn input_of(x: &Arr, vector: bool) -> Tensor {
    let t = x.tensor();
    if vector {
        t.reshape((x.dims[0], x.dims[1])).unwrap()
    } else {
        t
    }
}

/// A model's output, `[N, F]` read as `[N, F, 1, 1]`.
fn out_arr(t: &Tensor) -> Arr {
    let mut d = t.dims().to_vec();
    d.resize(4, 1);
    Arr::from_tensor(&t.reshape(d).unwrap())
}

/// The cases, on `c` channels, with the input magnitude each is tried at: wide enough that
/// the inputs reach past the clip bounds, into both signs, into the saturated tails.
fn act_cases(c: usize, seed: u64) -> Vec<(Act, f64)> {
    vec![
        (Act::Clip(Some(-0.5), Some(0.75)), 2.0),
        (Act::Clip(Some(-1.0), None), 2.0),
        (Act::Clip(None, Some(0.3)), 2.0),
        (Act::Clip(None, None), 2.0),
        (Act::Clip(Some(0.25), Some(0.25)), 2.0),
        (Act::Leaky(0.01), 2.0),
        (Act::Leaky(0.2), 2.0),
        (Act::Leaky(1.5), 2.0),
        // Slopes of both signs and above 1.
        (Act::PRelu(values(c, seed, 0.5, 1.0)), 2.0),
        (Act::Tanh, 4.0),
        (Act::Silu, 8.0),
        (Act::Gelu, 5.0),
        (Act::Erf, 3.5),
        (
            Act::Affine(values(c, seed + 1, 0.0, 2.0), values(c, seed + 2, 0.0, 1.0)),
            2.0,
        ),
    ]
}

/// That `x` reaches the points where the op changes behaviour: both signs, and beyond each
/// clip bound.
fn assert_crosses(x: &Arr, a: &Act, what: &str) {
    let below = |t: f64| x.v.iter().filter(|&&v| v < t).count();
    let above = |t: f64| x.v.iter().filter(|&&v| v > t).count();
    assert!(below(0.0) > 2 && above(0.0) > 2, "{what}: one sign only");
    if let Act::Clip(min, max) = a {
        if let Some(lo) = min {
            assert!(below(f64::from(*lo)) > 2, "{what}: nothing below {lo}");
        }
        if let Some(hi) = max {
            assert!(above(f64::from(*hi)) > 2, "{what}: nothing above {hi}");
        }
    }
}

#[test]
fn exporter_activations_and_the_channel_affine_match_their_definitions() {
    for vector in [false, true] {
        let (c, dims) = if vector {
            (9, [6, 9, 1, 1])
        } else {
            (5, [2, 5, 3, 4])
        };
        for (k, (a, mag)) in act_cases(c, 40).into_iter().enumerate() {
            let x = Arr::random(dims, 50 + k as u64, mag);
            let what = format!("{a:?} on {dims:?} (vector: {vector})");
            assert_crosses(&x, &a, &what);
            let m = act_model(&a, dims, vector);
            let got = out_arr(&m.forward(&input_of(&x, vector), Mode::Eval).unwrap());
            assert_close(&got, &act_ref(&x, &a), 1e-5, &what);
        }
    }
}

/// Central differences of `loss` in f64 with respect to each of `p`.
fn numeric_param_gradient(p: &[f64], loss: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let eps = 1e-6;
    (0..p.len())
        .map(|i| {
            let mut up = p.to_vec();
            up[i] += eps;
            let mut down = p.to_vec();
            down[i] -= eps;
            (loss(&up) - loss(&down)) / (2.0 * eps)
        })
        .collect()
}

/// `v` as an `Arr` of dims `[1, len, 1, 1]`, for [`close`].
fn vec_arr(v: Vec<f64>) -> Arr {
    Arr {
        dims: [1, v.len(), 1, 1],
        v,
    }
}

/// A training forward of one op and the gradients of `sum(y * wts)` with respect to the input
/// and to each parameter, against central differences of the definition: `Err` says which
/// case failed and how.
fn act_gradient(
    a: &Act,
    dims: [usize; 4],
    vector: bool,
    mag: f64,
    seed: u64,
) -> Result<(), String> {
    let x = Arr::random(dims, seed, mag);
    let m = act_model(a, dims, vector);
    let what = format!("{a:?} on {dims:?} (vector: {vector})");
    let xv = Var::from_tensor(&input_of(&x, vector)).unwrap();
    let y = m
        .forward(xv.as_tensor(), Mode::Train)
        .map_err(|e| format!("{what}: training forward: {e}"))?;
    let wts = Arr::random(x.dims, seed + 1, 1.0);
    let grads = (&y * wts.tensor().reshape(y.dims()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .map_err(|e| format!("{what}: backward: {e}"))?;
    let got = grads
        .get(xv.as_tensor())
        .ok_or_else(|| format!("{what}: no gradient for the input"))?;
    let want = numeric_gradient(&x, &wts, &|x| act_ref(x, a));
    close(
        &out_arr(got),
        &want,
        1e-4,
        &format!("{what}: input gradient"),
    )?;
    for (role, p) in a.params() {
        let name = format!("op.{role}");
        let var = m.params.var(&name).unwrap();
        let got = grads
            .get(var.as_tensor())
            .ok_or_else(|| format!("{what}: no gradient for {name}"))?;
        let got: Vec<f64> = got
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let want =
            numeric_param_gradient(&p, &|p| dot(&act_ref(&x, &a.with(role, p.to_vec())), &wts));
        close(
            &vec_arr(got),
            &vec_arr(want),
            1e-4,
            &format!("{what}: gradient of {name}"),
        )?;
    }
    Ok(())
}

#[test]
fn exporter_activation_gradients_match_central_differences_of_the_definitions() {
    let mut failures = Vec::new();
    let mut cases = 0;
    for vector in [false, true] {
        let (c, dims) = if vector {
            (7, [5, 7, 1, 1])
        } else {
            (4, [2, 4, 3, 3])
        };
        for (k, (a, mag)) in act_cases(c, 60).into_iter().enumerate() {
            cases += 1;
            if let Err(e) = act_gradient(&a, dims, vector, mag, 70 + 2 * k as u64) {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The parameters of [`param_chain`], by name.
type Params = std::collections::BTreeMap<String, Vec<f64>>;

/// A chain of the per-channel ops on a map and, after global pooling, on a vector:
/// affine, PReLU, clip, GELU, pool, affine, PReLU, SiLU.
fn param_chain(c: usize) -> (Model, Params) {
    let mut b = GraphBuilder::new([c, 3, 4]);
    b.push("a1", Op::ChannelAffine { channels: c })
        .push("p1", Op::PRelu { channels: c })
        .push(
            "clip",
            Op::Clip {
                min: Some(-0.8),
                max: Some(1.0),
            },
        )
        .push("gelu", Op::Gelu)
        .global_avg_pool("gap")
        .push("a2", Op::ChannelAffine { channels: c })
        .push("p2", Op::PRelu { channels: c })
        .push("silu", Op::Silu);
    let m = Model::init(b.build().unwrap(), 0, &Device::Cpu).unwrap();
    let mut p = Params::new();
    p.insert("a1.weight".into(), values(c, 1, 0.0, 2.0));
    p.insert("a1.bias".into(), values(c, 2, 0.0, 0.5));
    p.insert("p1.weight".into(), values(c, 3, 0.25, 0.5));
    p.insert("a2.weight".into(), values(c, 4, 0.0, 3.0));
    p.insert("a2.bias".into(), values(c, 5, 0.0, 0.3));
    p.insert("p2.weight".into(), values(c, 6, -0.2, 0.5));
    for (name, v) in &p {
        set_param(&m, name, v);
    }
    (m, p)
}

fn param_chain_ref(x: &Arr, p: &Params) -> Arr {
    let y = act_ref(
        x,
        &Act::Affine(p["a1.weight"].clone(), p["a1.bias"].clone()),
    );
    let y = act_ref(&y, &Act::PRelu(p["p1.weight"].clone()));
    let y = act_ref(&y, &Act::Clip(Some(-0.8), Some(1.0)));
    let y = act_ref(&y, &Act::Gelu);
    let y = gap_ref(&y);
    let y = act_ref(
        &y,
        &Act::Affine(p["a2.weight"].clone(), p["a2.bias"].clone()),
    );
    let y = act_ref(&y, &Act::PRelu(p["p2.weight"].clone()));
    act_ref(&y, &Act::Silu)
}

#[test]
fn a_chain_of_per_channel_ops_backpropagates_to_its_input_and_parameters() {
    let c = 5;
    let (m, p) = param_chain(c);
    let x = Arr::random([3, c, 3, 4], 77, 1.5);
    assert_close(
        &out_arr(&m.forward(&x.tensor(), Mode::Eval).unwrap()),
        &param_chain_ref(&x, &p),
        1e-5,
        "chain forward",
    );
    let xv = Var::from_tensor(&x.tensor()).unwrap();
    let y = m.forward(xv.as_tensor(), Mode::Train).unwrap();
    assert_eq!(y.dims(), &[3, c]);
    let wts = Arr::random([3, c, 1, 1], 78, 1.0);
    let grads = (&y * wts.tensor().reshape((3, c)).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let got = Arr::from_tensor(grads.get(xv.as_tensor()).unwrap());
    let want = numeric_gradient(&x, &wts, &|x| param_chain_ref(x, &p));
    assert_close(&got, &want, 1e-4, "chain: input gradient");
    // Every parameter of the chain, the vector ones after the pooling included.
    assert_eq!(m.params.len(), p.len());
    for (name, v) in &p {
        let g = grads
            .get(m.params.var(name).unwrap().as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let got: Vec<f64> = g
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let want = numeric_param_gradient(v, &|q| {
            let mut p = p.clone();
            p.insert(name.clone(), q.to_vec());
            dot(&param_chain_ref(&x, &p), &wts)
        });
        // The gradient is not zero: the check has something to compare.
        assert!(want.iter().any(|g| g.abs() > 1e-3), "{name}: {want:?}");
        assert_close(
            &vec_arr(got),
            &vec_arr(want),
            1e-4,
            &format!("chain: gradient of {name}"),
        );
    }
}

#[test]
fn clip_prelu_and_affine_wiring_refuses_bad_bounds_and_channel_counts_naming_the_node() {
    let input = |g: &mut Graph, shape: Vec<usize>| {
        g.wire("x", Op::Input { shape }, &[]).unwrap();
    };
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    for (min, max) in [
        (Some(nan), None),
        (None, Some(nan)),
        (Some(inf), None),
        (Some(-inf), None),
        (None, Some(inf)),
        (None, Some(-inf)),
        (Some(-inf), Some(1.0)),
        (Some(0.0), Some(nan)),
        (Some(1.0), Some(0.5)),
        (Some(0.0), Some(-1e-6)),
    ] {
        let mut g = Graph::new();
        input(&mut g, vec![4, 3, 3]);
        let e = g
            .wire("act7", Op::Clip { min, max }, &["x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("act7"), "{min:?} {max:?}: {e}");
        assert!(g.find("act7").is_none());
    }
    // Equal bounds, one bound, or none are fine, on maps and on vectors.
    for (min, max) in [
        (Some(0.5), Some(0.5)),
        (Some(-3.0), None),
        (None, Some(6.0)),
        (None, None),
    ] {
        for shape in [vec![4, 3, 3], vec![4]] {
            let mut g = Graph::new();
            input(&mut g, shape.clone());
            g.wire("act7", Op::Clip { min, max }, &["x"])
                .unwrap_or_else(|e| panic!("{min:?} {max:?}: {e}"));
            assert_eq!(g.find("act7").unwrap().shape, shape);
        }
    }
    // PReLU and the affine: the channel count must be the input's first axis.
    for make in [
        (|channels| Op::PRelu { channels }) as fn(usize) -> Op,
        |channels| Op::ChannelAffine { channels },
    ] {
        for (shape, channels) in [
            (vec![4, 3, 3], 3),
            (vec![4, 3, 3], 5),
            (vec![4, 3, 3], 1),
            (vec![6], 4),
            (vec![6], 1),
            (vec![3, 6, 6], 6),
        ] {
            let op = make(channels);
            let mut g = Graph::new();
            input(&mut g, shape.clone());
            let e = g
                .wire("stage1.act", op.clone(), &["x"])
                .unwrap_err()
                .to_string();
            assert!(e.contains("stage1.act"), "{op:?} on {shape:?}: {e}");
            let e = GraphBuilder::new(shape.clone())
                .push("scale3", op.clone())
                .build()
                .unwrap_err()
                .to_string();
            assert!(e.contains("scale3"), "{op:?} on {shape:?}: {e}");
        }
        for shape in [vec![4, 3, 3], vec![6]] {
            let op = make(shape[0]);
            let g = GraphBuilder::new(shape.clone())
                .push("scale3", op.clone())
                .build()
                .unwrap_or_else(|e| panic!("{op:?} on {shape:?}: {e}"));
            assert_eq!(g.find("scale3").unwrap().shape, shape);
            // Its parameters are per channel.
            let specs = g.param_specs();
            assert!(!specs.is_empty());
            for (name, spec) in specs {
                assert_eq!(spec.shape, vec![shape[0]], "{name}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pruning through the per-channel ops.

/// conv1 (with bias) -> affine -> PReLU -> conv2 on a map, or conv1 -> pool -> affine ->
/// PReLU -> linear on the pooled vector; the consumer's weight reads conv1's channels on
/// axis 1. Parameters drawn so that every channel matters.
fn prune_chain(vector: bool) -> Model {
    let mut b = GraphBuilder::new([3, 7, 6]);
    b.conv_with(
        "conv1",
        Conv2dSpec::new(0, 8, 3).with_padding(1).with_bias(true),
    );
    if vector {
        b.global_avg_pool("gap");
    }
    b.push("aff", Op::ChannelAffine { channels: 8 })
        .push("prelu", Op::PRelu { channels: 8 });
    if vector {
        b.linear("out", 5);
    } else {
        b.conv_with(
            "out",
            Conv2dSpec::new(0, 5, 3).with_padding(1).with_bias(true),
        );
    }
    let m = Model::init(b.build().unwrap(), 11, &Device::Cpu).unwrap();
    set_param(&m, "conv1.bias", &values(8, 12, 0.0, 0.5));
    set_param(&m, "aff.weight", &values(8, 13, 0.0, 2.0));
    set_param(&m, "aff.bias", &values(8, 14, 0.0, 1.0));
    set_param(&m, "prelu.weight", &values(8, 15, 0.2, 0.6));
    if vector {
        set_param(&m, "out.bias", &values(5, 16, 0.0, 0.5));
    }
    m
}

/// `name`'s values with the indices along `axis` outside `keep` dropped.
fn kept_slice(m: &Model, name: &str, axis: usize, keep: &[usize]) -> Vec<f32> {
    let t = m.params.tensor(name).unwrap();
    let idx = Tensor::from_vec(
        keep.iter().map(|&k| k as u32).collect::<Vec<_>>(),
        keep.len(),
        &Device::Cpu,
    )
    .unwrap();
    t.index_select(&idx, axis)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn pruning_through_the_affine_and_prelu_keeps_their_channels_in_step() {
    for vector in [false, true] {
        let m = prune_chain(vector);
        let groups = channel_groups(&m.graph);
        let c1 = groups
            .groups
            .iter()
            .find(|g| g.producers == ["conv1"])
            .cloned()
            .expect("conv1's group");
        assert!(c1.is_prunable(), "vector {vector}: {c1}");
        assert_eq!(c1.channels, 8);
        for (param, axis) in [
            ("conv1.weight", 0),
            ("conv1.bias", 0),
            ("aff.weight", 0),
            ("aff.bias", 0),
            ("prelu.weight", 0),
            ("out.weight", 1),
        ] {
            assert!(
                c1.members
                    .iter()
                    .any(|mb| mb.param == param && mb.axis == axis),
                "vector {vector}: {param} (axis {axis}) not among {:?}",
                c1.members
            );
        }
        // Every member is a parameter of the model.
        for mb in &c1.members {
            assert!(m.params.contains(&mb.param), "{mb:?}");
        }

        let keep = [0usize, 2, 3, 6];
        let removed: Vec<usize> = (0..8).filter(|k| !keep.contains(k)).collect();
        let pruned = groups.prune(&m, &[(c1.id, keep.to_vec())]).unwrap();
        let mut by_method = m.deep_clone().unwrap();
        by_method.prune_channels(&c1, &keep).unwrap();

        // The ops' channel counts, the shapes, and the parameters: the kept slices.
        for p in [&pruned, &by_method] {
            assert_eq!(
                p.graph.find("aff").unwrap().op,
                Op::ChannelAffine { channels: 4 }
            );
            assert_eq!(p.graph.find("prelu").unwrap().op, Op::PRelu { channels: 4 });
            let shape = if vector { vec![4] } else { vec![4, 7, 6] };
            assert_eq!(p.graph.find("aff").unwrap().shape, shape);
            assert_eq!(p.graph.find("prelu").unwrap().shape, shape);
            for (name, axis) in [
                ("conv1.weight", 0),
                ("conv1.bias", 0),
                ("aff.weight", 0),
                ("aff.bias", 0),
                ("prelu.weight", 0),
                ("out.weight", 1),
            ] {
                assert_eq!(
                    param_values(p, name),
                    kept_slice(&m, name, axis, &keep),
                    "vector {vector}: {name}"
                );
            }
            assert_eq!(param_values(p, "out.bias"), param_values(&m, "out.bias"));
        }

        // The original, with the consumer's weights on the removed channels zeroed (zeroing
        // conv1's filters would not do: the affine's bias would still come through), gives
        // the pruned model's outputs.
        let masked = m.deep_clone().unwrap();
        let w = masked.params.tensor("out.weight").unwrap();
        let mut mask = vec![1f32; 8];
        for &k in &removed {
            mask[k] = 0.0;
        }
        let mut mshape = vec![1; w.rank()];
        mshape[1] = 8;
        let mask = Tensor::from_vec(mask, mshape, &Device::Cpu).unwrap();
        masked
            .params
            .set("out.weight", &w.broadcast_mul(&mask).unwrap())
            .unwrap();
        let x = Arr::random([2, 3, 7, 6], 21, 1.5);
        let want = out_arr(&masked.forward(&x.tensor(), Mode::Eval).unwrap());
        let full = out_arr(&m.forward(&x.tensor(), Mode::Eval).unwrap());
        // The removed channels did matter.
        assert!(
            close(&full, &want, 1e-3, "").is_err(),
            "vector {vector}: masking changed nothing"
        );
        for p in [&pruned, &by_method] {
            let got = out_arr(&p.forward(&x.tensor(), Mode::Eval).unwrap());
            assert_close(
                &got,
                &want,
                1e-5,
                &format!("vector {vector}: pruned output"),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Model files of the exporters' ops.

/// Every one of the ops, with parameters that are not their initial zeros, on a map and
/// after pooling on a vector.
fn exporter_ops_model() -> Model {
    let mut b = GraphBuilder::new([3, 6, 5]);
    b.conv("conv1", 6, 3, 1, 1)
        .push("aff", Op::ChannelAffine { channels: 6 })
        .push("prelu", Op::PRelu { channels: 6 })
        .push(
            "clip_hi",
            Op::Clip {
                min: None,
                max: Some(1.5),
            },
        )
        .push("leaky", Op::LeakyRelu { alpha: 0.1 })
        .push(
            "clip_lo",
            Op::Clip {
                min: Some(-0.3),
                max: None,
            },
        )
        .push("tanh", Op::Tanh)
        .push(
            "clip_none",
            Op::Clip {
                min: None,
                max: None,
            },
        )
        .push("silu", Op::Silu)
        .push("gelu", Op::Gelu)
        .push("erf", Op::Erf)
        .push(
            "clip_both",
            Op::Clip {
                min: Some(-0.9),
                max: Some(0.9),
            },
        )
        .global_avg_pool("gap")
        .push("aff_v", Op::ChannelAffine { channels: 6 })
        .push("prelu_v", Op::PRelu { channels: 6 })
        .linear("fc", 4);
    let m = Model::init(b.build().unwrap(), 5, &Device::Cpu).unwrap();
    for (k, name) in ["aff", "prelu", "aff_v", "prelu_v"].iter().enumerate() {
        set_param(
            &m,
            &format!("{name}.weight"),
            &values(6, 30 + k as u64, 0.3, 1.0),
        );
    }
    set_param(&m, "aff.bias", &values(6, 40, 0.0, 0.5));
    set_param(&m, "aff_v.bias", &values(6, 41, 0.0, 0.5));
    m
}

#[test]
fn model_files_keep_the_exporter_ops_and_their_parameters() {
    let m = exporter_ops_model();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exported.safetensors");
    m.save(&path).unwrap();
    let back = Model::load(&path, &Device::Cpu).unwrap();
    let from_bytes = Model::from_bytes(&m.to_bytes().unwrap(), &Device::Cpu).unwrap();
    let x = Arr::random([2, 3, 6, 5], 3, 2.0);
    let y = m.forward(&x.tensor(), Mode::Eval).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    for loaded in [&back, &from_bytes] {
        assert_eq!(loaded.graph, m.graph);
        for (a, b) in loaded.graph.nodes().iter().zip(m.graph.nodes()) {
            assert_eq!(a.op, b.op, "{}", b.name);
            assert_eq!(a.shape, b.shape, "{}", b.name);
        }
        // The parameters, bit for bit, with their kinds.
        let names: Vec<&str> = m.params.names().collect();
        assert_eq!(loaded.params.names().collect::<Vec<_>>(), names);
        for name in names {
            assert_eq!(
                bits(&loaded.params.tensor(name).unwrap()),
                bits(&m.params.tensor(name).unwrap()),
                "{name}"
            );
            assert_eq!(
                loaded.params.param(name).unwrap().kind,
                m.params.param(name).unwrap().kind,
                "{name}"
            );
        }
        assert_eq!(
            bits(&loaded.forward(&x.tensor(), Mode::Eval).unwrap()),
            bits(&y)
        );
    }
    // The specific values survive, not just the kinds; a missing bound stays missing.
    let op = |name: &str| back.graph.find(name).unwrap().op.clone();
    assert_eq!(
        op("clip_none"),
        Op::Clip {
            min: None,
            max: None
        }
    );
    assert_eq!(
        op("clip_hi"),
        Op::Clip {
            min: None,
            max: Some(1.5)
        }
    );
    assert_eq!(
        op("clip_lo"),
        Op::Clip {
            min: Some(-0.3),
            max: None
        }
    );
    assert_eq!(
        op("clip_both"),
        Op::Clip {
            min: Some(-0.9),
            max: Some(0.9)
        }
    );
    assert_eq!(op("leaky"), Op::LeakyRelu { alpha: 0.1 });
    assert_eq!(op("prelu_v"), Op::PRelu { channels: 6 });
    assert_eq!(op("aff"), Op::ChannelAffine { channels: 6 });

    // As ops and as a graph description in JSON.
    for op in [
        Op::Clip {
            min: None,
            max: None,
        },
        Op::Clip {
            min: Some(-1.5),
            max: None,
        },
        Op::Clip {
            min: None,
            max: Some(6.0),
        },
        Op::Clip {
            min: Some(f32::MIN_POSITIVE),
            max: Some(f32::MAX),
        },
        Op::LeakyRelu { alpha: 0.01 },
        Op::PRelu { channels: 7 },
        Op::Tanh,
        Op::Silu,
        Op::Gelu,
        Op::Erf,
        Op::ChannelAffine { channels: 3 },
    ] {
        let s = serde_json::to_string(&op).unwrap();
        let back: Op = serde_json::from_str(&s).unwrap();
        assert_eq!(back, op, "{s}");
    }
    let s = serde_json::to_string(&m.graph.to_def()).unwrap();
    let def: GraphDef = serde_json::from_str(&s).unwrap();
    assert_eq!(Graph::from_def(&def).unwrap(), m.graph);
}

/// A LeakyReLU slope that wiring accepts must survive a model file. Clip and LRN refuse
/// non-finite constants at wiring; a non-finite `alpha` is accepted, written (JSON has no NaN
/// or infinity: serde writes `null`), and the file then fails to load. Any of refusing at
/// wiring (naming the node), refusing to write, or reading back the same value passes.
#[test]
fn a_leaky_relu_slope_that_wiring_accepts_survives_a_model_file() {
    let mut failures = Vec::new();
    for alpha in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let built = GraphBuilder::new([2, 3, 3])
            .push("leaky", Op::LeakyRelu { alpha })
            .build();
        let g = match built {
            Err(e) => {
                assert!(e.to_string().contains("leaky"), "alpha {alpha}: {e}");
                continue;
            }
            Ok(g) => g,
        };
        let m = Model::init(g, 0, &Device::Cpu).unwrap();
        let Ok(bytes) = m.to_bytes() else { continue };
        match Model::from_bytes(&bytes, &Device::Cpu) {
            Ok(back) => match back.graph.find("leaky").map(|n| &n.op) {
                Some(Op::LeakyRelu { alpha: a }) if a.to_bits() == alpha.to_bits() => {}
                other => failures.push(format!("alpha {alpha}: read back as {other:?}")),
            },
            Err(e) => failures.push(format!(
                "alpha {alpha}: wired and written, but the file does not load: {e}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// At exactly zero, PReLU's gradient should lie between its two one-sided slopes (the slope
/// and 1), as LeakyReLU's does, and a PReLU of slope `a` should train like a LeakyReLU of
/// alpha `a`. Zeros are common inputs (after a clip at 0, a ReLU, or pooling of zeros).
#[test]
fn prelu_gradient_at_zero_lies_between_its_one_sided_slopes() {
    let x = Arr {
        dims: [1, 3, 1, 2],
        v: vec![0.0, -1.0, 0.0, 2.0, 0.0, 0.5],
    };
    let slopes = vec![0.25, 0.5, 1.5];
    let grad_of = |a: &Act| -> Vec<f64> {
        let m = act_model(a, x.dims, false);
        let xv = Var::from_tensor(&x.tensor()).unwrap();
        let y = m.forward(xv.as_tensor(), Mode::Train).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        Arr::from_tensor(grads.get(xv.as_tensor()).unwrap()).v
    };
    let prelu = grad_of(&Act::PRelu(slopes.clone()));
    for (c, &s) in slopes.iter().enumerate() {
        let leaky = grad_of(&Act::Leaky(s as f32));
        let (lo, hi) = (s.min(1.0), s.max(1.0));
        for (what, g) in [("prelu", &prelu), ("leaky", &leaky)] {
            // Away from zero, the one-sided slope.
            let away = g[2 * c + 1];
            let want = if x.v[2 * c + 1] > 0.0 { 1.0 } else { s };
            assert!((away - want).abs() < 1e-6, "{what} slope {s}: {away}");
            let at_zero = g[2 * c];
            assert!(
                (lo..=hi).contains(&at_zero),
                "{what} slope {s}: gradient at 0 is {at_zero}, outside [{lo}, {hi}] \
                 (LeakyReLU of alpha {s} gives {})",
                leaky[2 * c]
            );
        }
    }
}

/// A constant node gives its value to every sample of any batch, whatever its input holds
/// (which gives only the batch size), concatenates with data like data, keeps its value
/// through a model file, blocks only its own channel groups, and is refused empty.
#[test]
fn a_constant_is_the_same_for_every_sample() {
    let mut b = GraphBuilder::new([3, 4]);
    b.add_node("token", Op::Constant { shape: vec![1, 4] }, &["input"])
        .add_node("joined", Op::ConcatAt { axis: 0 }, &["token", "input"]);
    let m = Model::init(b.build().expect("graph"), 0, &Device::Cpu).expect("init");
    let value: Vec<f32> = vec![0.5, -1.0, 2.0, 0.25];
    let t = Tensor::from_vec(value.clone(), (1, 4), &Device::Cpu).expect("t");
    m.params.set("token.value", &t).expect("set");
    let x = Tensor::rand(-1f32, 1f32, (5, 3, 4), &Device::Cpu).expect("x");
    for mode in [Mode::Eval, Mode::Train] {
        let y = m.forward(&x, mode).expect("forward");
        assert_eq!(y.dims(), [5, 4, 4]);
        let rows: Vec<Vec<Vec<f32>>> = y.to_vec3().expect("rows");
        let xs: Vec<Vec<Vec<f32>>> = x.to_vec3().expect("x");
        for (r, xr) in rows.iter().zip(&xs) {
            assert_eq!(r[0], value);
            assert_eq!(&r[1..], xr.as_slice());
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("c.safetensors");
    m.save(&file).expect("save");
    let back = Model::load(&file, &Device::Cpu).expect("load");
    let again: Vec<f32> = back
        .params
        .tensor("token.value")
        .expect("value")
        .flatten_all()
        .expect("f")
        .to_vec1()
        .expect("v");
    assert_eq!(again, value);
    assert!(channel_groups(&m.graph).prunable().next().is_none());
    let mut bad = GraphBuilder::new([3, 4]);
    bad.add_node("token", Op::Constant { shape: vec![0, 4] }, &["input"]);
    let e = bad.build().expect_err("empty").to_string();
    assert!(e.contains("token") && e.contains("[0, 4]"), "{e}");
}

/// range_abs_max: in training a fake quantizer's scale is the largest absolute maximum of
/// the last `window` batches (a ring in its buffers), and evaluation uses the last scale.
#[test]
fn range_abs_max_keeps_the_largest_of_the_last_batches() {
    use slim_core::graph::FakeQuantSpec;
    let spec = FakeQuantSpec {
        bits: 8,
        moving_rate: 0.0,
        window: 3,
    };
    let mut b = GraphBuilder::new([4]);
    b.push("q", Op::FakeQuant(spec));
    let m = Model::init(b.build().expect("graph"), 0, &Device::Cpu).expect("init");
    assert_eq!(m.params.tensor("q.window_max").expect("ring").dims(), [3]);
    let qmax = 127.0f32;
    let scale = |m: &Model| {
        m.params
            .tensor("q.scale")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    };
    let mut expected = Vec::new();
    let maxima = [1.0f32, 4.0, 2.0, 0.5, 0.5, 0.5, 3.0];
    for (i, &peak) in maxima.iter().enumerate() {
        let x = Tensor::new(
            &[[0.1f32, -peak, 0.2, 0.0], [0.0, 0.3, -0.1, 0.05]],
            &Device::Cpu,
        )
        .expect("x");
        m.forward(&x, Mode::Train).expect("train forward");
        let last3 = &maxima[i.saturating_sub(2)..=i];
        let want = last3.iter().copied().fold(0.0f32, f32::max) / qmax;
        expected.push(want);
        assert!(
            (scale(&m) - want).abs() <= 1e-7,
            "batch {i}: {} against {want}",
            scale(&m)
        );
    }
    // 4 at the second batch, out of the window from the fifth on.
    assert_eq!(expected[4], 2.0 / qmax);
    let before = scale(&m);
    let x = Tensor::new(&[[9.0f32, 0.0, 0.0, 0.0]], &Device::Cpu).expect("x");
    m.forward(&x, Mode::Eval).expect("eval forward");
    assert_eq!(scale(&m), before);
}

/// A transposed convolution by its definition: every input value scatters its filter taps to
/// `i * stride + k * dilation - pad_before` on each axis, where that lands in the output.
fn conv_transpose_ref(x: &Arr, w: &[f64], bias: &[f64], c: &ConvTransposeSpec) -> Arr {
    let [n, ci, h, wd] = x.dims;
    let (oh, ow) = c.out_size(h, wd).unwrap();
    let (g, [kh, kw]) = (c.groups, c.kernel);
    let (ipg, opg) = (ci / g, c.out_channels / g);
    let mut y = Arr::zeros([n, c.out_channels, oh, ow]);
    for b in 0..n {
        for i in 0..ci {
            let grp = i / ipg;
            for (iy, ix) in (0..h).flat_map(|iy| (0..wd).map(move |ix| (iy, ix))) {
                let v = x.get(b, i, iy, ix);
                for o in 0..opg {
                    for (ky, kx) in (0..kh).flat_map(|ky| (0..kw).map(move |kx| (ky, kx))) {
                        let r = (iy * c.stride[0] + ky * c.dilation) as isize - c.pads[0] as isize;
                        let q = (ix * c.stride[1] + kx * c.dilation) as isize - c.pads[1] as isize;
                        if r < 0 || q < 0 || r >= oh as isize || q >= ow as isize {
                            continue;
                        }
                        let tap = ((i * opg + o) * kh + ky) * kw + kx;
                        let at = y.at(b, grp * opg + o, r as usize, q as usize);
                        y.v[at] += v * w[tap];
                    }
                }
            }
        }
    }
    for (i, v) in y.v.iter_mut().enumerate() {
        *v += bias[(i / (oh * ow)) % c.out_channels];
    }
    y
}

/// Transposed convolutions with a stride and output padding per axis and padding per side,
/// against the definition; among them one whose leading padding crops more than the input
/// holds, made up by the output padding after it (its output is the bias alone).
#[test]
fn transposed_convolutions_of_any_stride_and_padding_match_the_definition() {
    let spec = |ci, co, kernel, stride, pads, output_padding, dilation, groups| ConvTransposeSpec {
        in_channels: ci,
        out_channels: co,
        kernel,
        stride,
        pads,
        output_padding,
        dilation,
        groups,
        bias: true,
    };
    let cases = [
        (
            spec(4, 6, [3, 2], [2, 1], [1, 0, 0, 1], [1, 0], 1, 1),
            [2, 4, 5, 6],
        ),
        (
            spec(4, 4, [3, 3], [3, 2], [2, 1, 1, 2], [2, 1], 1, 2),
            [1, 4, 4, 5],
        ),
        (
            spec(2, 3, [2, 3], [1, 3], [0, 2, 1, 0], [0, 2], 2, 1),
            [2, 2, 3, 4],
        ),
        (
            spec(1, 2, [1, 1], [3, 3], [2, 2, 0, 0], [2, 2], 1, 1),
            [1, 1, 1, 1],
        ),
    ];
    for (k, (c, dims)) in cases.into_iter().enumerate() {
        let x = Arr::random(dims, 1000 + k as u64, 2.0);
        let m = one_op(Op::ConvTranspose2d(c.clone()), chw(&x));
        let bias = Arr::random([1, c.out_channels, 1, 1], 2000 + k as u64, 1.0);
        let bias = bias.tensor().flatten_all().unwrap();
        m.params.set("op.bias", &bias).unwrap();
        let read = |name: &str| -> Vec<f64> {
            let t = m.params.tensor(&format!("op.{name}")).unwrap();
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        };
        let (w, b) = (read("weight"), read("bias"));
        let want = conv_transpose_ref(&x, &w, &b, &c);
        assert_close(&eval(&m, &x), &want, 1e-5, &format!("{c:?}"));
    }
}
