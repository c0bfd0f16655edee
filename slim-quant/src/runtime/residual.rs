//! Residual sums computed with the value before them: where a float value that the int8
//! runtime computes (an integer layer's output, or the floats a quantizer makes of the int8
//! values of the layer before it) goes only to a sum of two values (a ResNet block's
//! `conv + shortcut`, an inverted residual's projection plus its input), the node adds the
//! other term, and applies the ReLU or ReLU6 that alone reads the sum, to its values as soon
//! as they are written, in place. The sum and the activation then pass that value on: two
//! passes over the values and two new tensors fewer per block. The float operations are the
//! graph's own, in its order (`acc * scale + bias` or `q * scale`, then `+ other`, then the
//! activation), so the values are the same to the bit.

use super::*;

/// How an integer layer finishes with the sum after it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Residual {
    /// The sum's other term: a node computed before the layer.
    pub other: usize,
    /// The activation that alone reads the sum, applied too.
    pub activation: Option<Activation>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Activation {
    Relu,
    Relu6,
}

/// The layers that compute the sum after them ([`Residual`]), by node; the sums they
/// compute, with the position of the layer among each sum's inputs; and the activations
/// they apply.
pub(super) type Residuals = (
    HashMap<usize, Residual>,
    HashMap<usize, usize>,
    HashSet<usize>,
);

/// The residual sums of `model` that the int8 runtime can compute with the value before
/// them (see the module's documentation): a value it computes as floats (an integer layer's
/// output, none of `requant`'s, or a quantizer of `dequantized`), read only by a sum of
/// exactly two values of its shape, neither a graph output (the sum may be one when no
/// activation is applied with it), whose other term comes earlier in evaluation order (so
/// that it is there when the value is computed).
pub(super) fn residual_sums(
    model: &Model,
    requant: &HashMap<usize, Requant>,
    dequantized: &HashMap<usize, f32>,
) -> Residuals {
    let g = &model.graph;
    let outputs = g.outputs();
    let (mut layers, mut sums, mut activated) = (HashMap::new(), HashMap::new(), HashSet::new());
    // (Nodes are evaluated in the order of their ids.)
    for id in g.eval_order() {
        let node = g.node(id);
        let floats = (is_integer_layer(model, node) && !requant.contains_key(&id))
            || dequantized.contains_key(&id);
        if !floats || outputs.contains(&id) {
            continue;
        }
        let [sum] = g.successors(id)[..] else {
            continue;
        };
        let s = g.node(sum);
        let (Op::Add, [a, b]) = (&s.op, &s.inputs[..]) else {
            continue;
        };
        let (at, other) = if *a == id { (0, *b) } else { (1, *a) };
        if other == id
            || sums.contains_key(&sum)
            || other >= id
            || g.node(other).shape != node.shape
            || s.shape != node.shape
        {
            continue;
        }
        let activation = match g.successors(sum)[..] {
            [r] if !outputs.contains(&sum) => match g.node(r).op {
                Op::Relu => Some((r, Activation::Relu)),
                Op::Relu6 => Some((r, Activation::Relu6)),
                _ => None,
            },
            _ => None,
        };
        if let Some((r, _)) = activation {
            activated.insert(r);
        }
        layers.insert(
            id,
            Residual {
                other,
                activation: activation.map(|(_, a)| a),
            },
        );
        sums.insert(sum, at);
    }
    (layers, sums, activated)
}

/// `out[i] = activation(out[i] + other[i])` for every value, in place: the sum after an
/// integer layer ([`Residual`]), with `other` its other term; `what` names the layer for the
/// errors.
pub(super) fn add_residual(
    out: &mut [f32],
    other: &Tensor,
    activation: Option<Activation>,
    what: &str,
) -> slim_core::Result<()> {
    let (storage, layout) = other.storage_and_layout();
    let terms = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => {
            return Err(slim_core::CoreError::Node {
                node: what.to_string(),
                msg: "the sum's other term must be a contiguous f32 tensor on the CPU".into(),
            })
        }
    };
    if terms.len() != out.len() {
        return Err(slim_core::CoreError::Node {
            node: what.to_string(),
            msg: format!(
                "the sum's other term has {} values, the node's output {}",
                terms.len(),
                out.len()
            ),
        });
    }
    const CHUNK: usize = 1 << 14;
    let avx2 = crate::gemm::Kernel::Avx2.available();
    for_each_chunk(out, CHUNK, out.len() < SERIAL_VALUES, move |(i, dst)| {
        let src = &terms[i * CHUNK..][..dst.len()];
        sum_chunk(dst, src, activation, avx2)
    });
    Ok(())
}

/// The loop of [`add_residual`] over one chunk, compiled for AVX2 where the machine has it.
/// The activations are the float graph's: `max(v, 0)`, then `min(v, 6)` for ReLU6.
fn sum_chunk(dst: &mut [f32], src: &[f32], activation: Option<Activation>, avx2: bool) {
    // (`max` then `min`, not `clamp`: a NaN comes out as the graph's ReLU6 makes it, 0.)
    #[allow(clippy::manual_clamp)]
    #[inline(always)]
    fn run(dst: &mut [f32], src: &[f32], activation: Option<Activation>) {
        match activation {
            None => dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s),
            Some(Activation::Relu) => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = (*d + s).max(0.0)),
            Some(Activation::Relu6) => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = (*d + s).max(0.0).min(6.0)),
        }
    }
    slim_core::with_target_feature!(
        "avx2",
        avx2,
        run(dst: &mut [f32], src: &[f32], activation: Option<Activation>)
    )
}
