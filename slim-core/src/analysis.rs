//! Analysis: multiply-accumulates, parameters and bytes, per layer and in total.
//!
//! Compute is counted in **multiply-accumulates (MACs)** of convolutions and fully connected
//! layers, which is what PaddleSlim's FLOPs tables and the usual published figures count
//! (ResNet-50 "4.1 G FLOPs" is 4.1 G MACs). Batch norm, activations, pooling, additions and
//! products are not counted: they are a small fraction and are folded or fused at deployment.
//!
//! Parameters are the trainable scalars (weights and biases, including batch norm's scale and
//! shift); running statistics are counted apart as buffers. Bytes are the size of all tensors
//! stored as f32.

use serde::Serialize;

use crate::graph::{Graph, Node, Op};

/// The cost of one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerStats {
    pub name: String,
    pub op: String,
    pub shape: Vec<usize>,
    pub macs: u64,
    pub params: u64,
}

/// The cost of a whole graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelStats {
    pub layers: Vec<LayerStats>,
    /// Multiply-accumulates of one sample's forward pass.
    pub macs: u64,
    /// Trainable scalars.
    pub params: u64,
    /// Non-trainable scalars (batch norm running statistics).
    pub buffers: u64,
    /// Bytes of all tensors as f32.
    pub bytes: u64,
}

/// MACs of one node for one sample.
pub fn node_macs(node: &Node) -> u64 {
    match &node.op {
        Op::Conv2d(c) => {
            let [oc, oh, ow] = node.shape[..] else {
                return 0;
            };
            (oc * oh * ow * (c.in_channels / c.groups.max(1)) * c.kernel[0] * c.kernel[1]) as u64
        }
        Op::Linear(l) => (l.in_features * l.out_features) as u64,
        Op::Dense(l) => {
            let rows: usize = node.shape[..node.shape.len().saturating_sub(1)]
                .iter()
                .product();
            (rows * l.in_features * l.out_features) as u64
        }
        // Each input value meets every tap of its group's filters.
        Op::ConvTranspose2d(c) => {
            let [oc, oh, ow] = node.shape[..] else {
                return 0;
            };
            let taps = c.kernel[0] * c.kernel[1];
            // The input plane, from the output's: every tap of every input position lands once.
            let (ih, iw) = (c.in_size(0, oh), c.in_size(1, ow));
            (c.in_channels * ih * iw * (oc / c.groups.max(1)) * taps) as u64
        }
        _ => 0,
    }
}

/// Counts MACs, parameters and bytes of every node and of the graph.
pub fn analyze(graph: &Graph) -> ModelStats {
    let mut layers = Vec::with_capacity(graph.len());
    let (mut macs, mut params, mut buffers) = (0u64, 0u64, 0u64);
    for node in graph.nodes() {
        let m = node_macs(node);
        let mut p = 0u64;
        for spec in node.op.params() {
            let n: u64 = spec.shape.iter().product::<usize>() as u64;
            if spec.kind.is_trainable() {
                p += n;
            } else {
                buffers += n;
            }
        }
        macs += m;
        params += p;
        layers.push(LayerStats {
            name: node.name.clone(),
            op: node.op.kind().to_string(),
            shape: node.shape.clone(),
            macs: m,
            params: p,
        });
    }
    ModelStats {
        layers,
        macs,
        params,
        buffers,
        bytes: 4 * (params + buffers),
    }
}

/// A model as `slim info` shows it: its cost layer by layer and in total, and its channel
/// groups (the ones some layer produces) with whether each can be pruned.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// The file or zoo name it came from.
    pub model: String,
    pub input: Vec<usize>,
    pub macs: u64,
    pub params: u64,
    pub buffers: u64,
    /// The size of its file.
    pub bytes: u64,
    pub layers: Vec<LayerStats>,
    pub groups: Vec<GroupInfo>,
}

/// A channel group in [`ModelInfo`].
#[derive(Clone, Debug, Serialize)]
pub struct GroupInfo {
    pub id: usize,
    pub channels: usize,
    pub producers: Vec<String>,
    pub prunable: bool,
    pub blocked_by: Option<crate::deps::Blocker>,
}

impl ModelInfo {
    /// `model`'s figures, named `label`, whose file holds `bytes`.
    pub fn of(label: &str, model: &crate::model::Model, bytes: u64) -> ModelInfo {
        let stats = analyze(&model.graph);
        let groups = crate::deps::channel_groups(&model.graph)
            .groups
            .into_iter()
            .filter(|g| !g.producers.is_empty())
            .map(|g| GroupInfo {
                id: g.id,
                channels: g.channels,
                prunable: g.is_prunable(),
                producers: g.producers,
                blocked_by: g.blocked,
            })
            .collect();
        ModelInfo {
            model: label.to_string(),
            input: model.input_shape(),
            macs: stats.macs,
            params: stats.params,
            buffers: stats.buffers,
            bytes,
            layers: stats.layers,
            groups,
        }
    }

    /// The layers' table with the totals, then the channel groups' table.
    pub fn table(&self) -> String {
        let blank_zero = |n: u64| if n > 0 { human(n) } else { String::new() };
        let layers: Vec<Vec<String>> = self
            .layers
            .iter()
            .map(|l| {
                let shape = format!("{:?}", l.shape);
                vec![
                    l.name.clone(),
                    l.op.clone(),
                    shape,
                    blank_zero(l.macs),
                    blank_zero(l.params),
                ]
            })
            .collect();
        let groups: Vec<Vec<String>> = self
            .groups
            .iter()
            .map(|g| {
                let status = match &g.blocked_by {
                    None if g.prunable => "prunable".to_string(),
                    None => "single channel".to_string(),
                    Some(b) => format!("blocked by `{}` ({}): {}", b.node, b.op, b.reason),
                };
                vec![
                    g.id.to_string(),
                    g.channels.to_string(),
                    g.producers.join(","),
                    status,
                ]
            })
            .collect();
        format!(
            "{}  input {:?}\n{}total: {} MACs (multiply-accumulates), {} parameters, {} bytes on \
             disk\n\nchannel groups: {} prunable of {}\n{}",
            self.model,
            self.input,
            crate::plot::table(&["node", "op", "output", "MACs", "params"], &layers),
            human(self.macs),
            human(self.params),
            self.bytes,
            self.groups.iter().filter(|g| g.prunable).count(),
            groups.len(),
            crate::plot::table(&["group", "channels", "produced by", "status"], &groups),
        )
    }
}

/// A number with a G/M/K suffix, for tables.
pub fn human(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2}G", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2}M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1}K", f / 1e3)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::GraphBuilder;

    #[test]
    fn hand_counted_lenet_like() {
        // conv 1->6 5x5 pad 2 on 28x28: 6*28*28*25 = 117,600 MACs, 150 + 6 params.
        let g = GraphBuilder::new([1, 28, 28])
            .conv_with(
                "c",
                crate::graph::Conv2dSpec::new(1, 6, 5)
                    .with_padding(2)
                    .with_bias(true),
            )
            .relu("r")
            .max_pool("p", 2, 2)
            .flatten("f")
            .linear("fc", 10)
            .build()
            .unwrap();
        let s = analyze(&g);
        assert_eq!(s.layers[1].macs, 117_600);
        assert_eq!(s.layers[1].params, 156);
        assert_eq!(s.layers[5].macs, 6 * 14 * 14 * 10);
        assert_eq!(s.macs, 117_600 + 11_760);
        assert_eq!(s.params, 156 + 11_760 + 10);
        assert_eq!(s.bytes, 4 * s.params);
        assert_eq!(human(4_100_000_000), "4.10G");
    }
}
