//! Graph transforms that keep what a model computes in evaluation mode.

use crate::error::Result;
use crate::graph::{Graph, GraphDef, NodeDef, Op};
use crate::model::Model;
use crate::params::ParamStore;

/// Folds every batch norm that directly follows a convolution (whose only consumer it is)
/// into that convolution: `w' = w * g / sqrt(v + eps)` per output channel and
/// `b' = (b - m) * g / sqrt(v + eps) + beta`, with the running mean `m` and variance `v`. The
/// folded model computes in evaluation mode what the original computes there (up to float
/// rounding), with fewer parameters and no batch norm to run. Returns the model and the
/// number of batch norms folded.
pub fn fold_batch_norms(model: &Model) -> Result<(Model, usize)> {
    let g = &model.graph;
    let uses = g.use_counts();
    let outputs = g.outputs();
    // conv node id -> bn node id
    let mut fold: Vec<(usize, usize)> = Vec::new();
    for (id, node) in g.nodes().iter().enumerate() {
        if let Op::BatchNorm2d(_) = node.op {
            let src = node.inputs[0];
            if matches!(g.node(src).op, Op::Conv2d(_)) && uses[src] == 1 && !outputs.contains(&src)
            {
                fold.push((src, id));
            }
        }
    }
    if fold.is_empty() {
        return Ok((model.deep_clone()?, 0));
    }
    let mut params = ParamStore::new();
    for (name, p) in model.params.iter() {
        params.insert(name, &p.var.as_tensor().copy()?, p.kind)?;
    }
    let def = g.to_def();
    let folded_bn: std::collections::HashMap<String, String> = fold
        .iter()
        .map(|&(c, b)| (g.node(b).name.clone(), g.node(c).name.clone()))
        .collect();
    let mut nodes: Vec<NodeDef> = Vec::with_capacity(def.nodes.len());
    for n in &def.nodes {
        if folded_bn.contains_key(&n.name) {
            continue;
        }
        let mut n = n.clone();
        // Consumers of a folded batch norm read its convolution instead.
        for i in n.inputs.iter_mut() {
            if let Some(c) = folded_bn.get(i) {
                *i = c.clone();
            }
        }
        nodes.push(n);
    }
    for &(c, b) in &fold {
        let conv = g.node(c);
        let bn = g.node(b);
        let Op::BatchNorm2d(spec) = &bn.op else {
            continue;
        };
        let Op::Conv2d(cs) = &conv.op else { continue };
        let gamma = model.params.tensor(&bn.param_name("weight"))?;
        let beta = model.params.tensor(&bn.param_name("bias"))?;
        let mean = model.params.tensor(&bn.param_name("running_mean"))?;
        let var = model.params.tensor(&bn.param_name("running_var"))?;
        let k = (gamma / (var + spec.eps)?.sqrt()?)?;
        let w = model.params.tensor(&conv.param_name("weight"))?;
        let w2 = w.broadcast_mul(&k.reshape((k.dim(0)?, 1, 1, 1))?)?;
        let b0 = if cs.bias {
            model.params.tensor(&conv.param_name("bias"))?
        } else {
            mean.zeros_like()?
        };
        let b2 = (((b0 - mean)? * &k)? + beta)?;
        params.set(&conv.param_name("weight"), &w2)?;
        let bias_name = conv.param_name("bias");
        if cs.bias {
            params.set(&bias_name, &b2)?;
        } else {
            params.insert(bias_name, &b2, crate::graph::ParamKind::Bias)?;
        }
        for role in ["weight", "bias", "running_mean", "running_var"] {
            params.remove(&bn.param_name(role));
        }
    }
    let fold_convs: std::collections::HashSet<String> =
        fold.iter().map(|&(c, _)| g.node(c).name.clone()).collect();
    for n in nodes.iter_mut() {
        if fold_convs.contains(&n.name) {
            if let Op::Conv2d(c) = &mut n.op {
                c.bias = true;
            }
        }
    }
    let outputs_def: Vec<String> = def
        .outputs
        .iter()
        .map(|o| folded_bn.get(o).cloned().unwrap_or_else(|| o.clone()))
        .collect();
    let graph = Graph::from_def(&GraphDef {
        nodes,
        outputs: outputs_def,
    })?;
    let mut out = Model::new(graph, params)?;
    out.provenance = model.provenance.clone();
    Ok((out, fold.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::{self, ZooConfig};
    use crate::Mode;
    use candle_core::{Device, Tensor};

    #[test]
    fn folding_keeps_the_eval_output() {
        for name in ["mobilenet_tiny", "resnet20", "mobilenet_v2"] {
            let m = zoo::model(name, &ZooConfig::new([1, 28, 28]), 3, &Device::Cpu).unwrap();
            // Non-trivial statistics, as after training.
            for (pname, p) in m.params.iter() {
                if pname.ends_with("running_var") || pname.ends_with("bn.weight") {
                    let t = (p.var.as_tensor().rand_like(0.5, 1.5).unwrap()).clone();
                    m.params.set(pname, &t).unwrap();
                } else if pname.ends_with("running_mean") || pname.ends_with("bn.bias") {
                    let t = p.var.as_tensor().rand_like(-0.2, 0.2).unwrap();
                    m.params.set(pname, &t).unwrap();
                }
            }
            let (f, n) = fold_batch_norms(&m).unwrap();
            assert!(n > 0, "{name}");
            assert!(
                !f.graph
                    .nodes()
                    .iter()
                    .any(|x| matches!(x.op, Op::BatchNorm2d(_))),
                "{name}"
            );
            let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
            let a = m.forward(&x, Mode::Eval).unwrap();
            let b = f.forward(&x, Mode::Eval).unwrap();
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-3, "{name}: {diff}");
        }
    }
}
