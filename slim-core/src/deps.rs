//! Channel dependencies: which parameter axes must be pruned together, and the surgery that
//! removes channels.
//!
//! A **channel space** is a run of channels that some op creates: a dense convolution's or a
//! linear layer's outputs, or a model input. Every node output is laid out as a sequence of
//! segments, each a whole channel space (a concatenation lays its inputs' spaces side by
//! side). Ops say how spaces flow:
//! - a dense convolution or linear layer consumes its input's spaces on its weight's input
//!   axis and starts a new space on its output axis (weight axis 0 and bias);
//! - depthwise convolution, batch norm, per-channel affine and PReLU, activations, pooling,
//!   LRN (approximately: a channel's window loses the pruned neighbours), dropout and identity
//!   pass the spaces through, touching their own per-channel parameters on axis 0; so do ops
//!   along the plane (slices of rows or columns, softmaxes and reductions over spatial axes,
//!   a layer norm within each channel) and reshapes that keep the channel axis first;
//! - a channel shuffle interleaves its input's channels and blocks them;
//! - a grouped convolution ties channel `k` of every group, so that the groups stay equal:
//!   a space its group boundaries cut through is split into equal spaces (members shifted to
//!   their part), the parts unified; its outputs are one space per group, unified;
//! - `Add`, and `Mul` (element-wise, or channel-wise as in squeeze-and-excite), unify the
//!   spaces of their inputs: those channels must be pruned together;
//! - `Flatten` keeps the spaces but expands each channel into its `H * W` positions, so a
//!   following linear layer sees channel `k` of a segment at offset `o` as features
//!   `(o + k) * H * W .. (o + k + 1) * H * W`.
//!
//! A **channel group** is a class of unified spaces: all have the same number of channels and
//! every member `(parameter, axis, offset, expand)` touches indices
//! `(offset + k) * expand + j` for channel `k` and `j < expand`. A group is blocked (cannot be
//! pruned) when it reaches a model input or output, a grouped convolution whose groups do not
//! split its input's channel ranges alike, a softmax, a channel shuffle, an op across the
//! channels (attention, reshapes that move them, channel slices), or an add/concat whose
//! channel ranges do not line up; the
//! group then names the node that blocked it and why. Nothing is skipped silently.
//!
//! [`ChannelGroups::prune`] slices every member of every group in a plan at once and returns a
//! new model; on any error nothing is returned and the input model is untouched.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{CoreError, Result};
use crate::graph::{Graph, Op};
use crate::model::Model;
use crate::params::ParamStore;

/// One parameter axis a group touches: channel `k` of the group is at indices
/// `(offset + k) * expand + j`, `j < expand`, along `axis` of `param`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    pub node: String,
    pub param: String,
    pub axis: usize,
    pub offset: usize,
    pub expand: usize,
}

/// Why a group cannot be pruned, and which node says so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Blocker {
    pub node: String,
    pub op: String,
    pub reason: String,
}

/// Channels that must be pruned together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChannelGroup {
    pub id: usize,
    pub channels: usize,
    /// Nodes whose outputs create these channels (convolutions, linear layers).
    pub producers: Vec<String>,
    pub members: Vec<Member>,
    pub blocked: Option<Blocker>,
}

impl ChannelGroup {
    pub fn is_prunable(&self) -> bool {
        self.blocked.is_none() && !self.producers.is_empty() && self.channels > 1
    }
}

impl fmt::Display for ChannelGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "group {} ({} channels", self.id, self.channels)?;
        if !self.producers.is_empty() {
            write!(f, ", from {}", self.producers.join(", "))?;
        }
        write!(f, ")")?;
        if let Some(b) = &self.blocked {
            write!(f, ": blocked by `{}` ({}): {}", b.node, b.op, b.reason)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Layout {
    /// `(space or group id, channels)` in channel order.
    segs: Vec<(usize, usize)>,
    expand: usize,
}

struct Space {
    len: usize,
    /// Split into equal parts (for a grouped convolution): no longer part of any layout.
    dead: bool,
    parent: usize,
    blocked: Option<Blocker>,
    members: Vec<Member>,
    producers: Vec<String>,
}

struct Builder {
    spaces: Vec<Space>,
}

impl Builder {
    fn new_space(&mut self, len: usize) -> usize {
        let id = self.spaces.len();
        self.spaces.push(Space {
            len,
            dead: false,
            parent: id,
            blocked: None,
            members: Vec::new(),
            producers: Vec::new(),
        });
        id
    }
    fn find(&mut self, s: usize) -> usize {
        let mut r = s;
        while self.spaces[r].parent != r {
            r = self.spaces[r].parent;
        }
        let mut c = s;
        while self.spaces[c].parent != r {
            let next = self.spaces[c].parent;
            self.spaces[c].parent = r;
            c = next;
        }
        r
    }
    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.spaces[rb].parent = ra;
            if self.spaces[ra].blocked.is_none() {
                self.spaces[ra].blocked = self.spaces[rb].blocked.take();
            }
        }
    }
    fn block(&mut self, s: usize, node: &str, op: &Op, reason: &str) {
        let r = self.find(s);
        if self.spaces[r].blocked.is_none() {
            self.spaces[r].blocked = Some(Blocker {
                node: node.to_string(),
                op: op.kind().to_string(),
                reason: reason.to_string(),
            });
        }
    }
    fn block_layout(&mut self, l: &Layout, node: &str, op: &Op, reason: &str) {
        for &(s, _) in &l.segs {
            self.block(s, node, op, reason);
        }
    }
    /// Adds a member on every segment of a layout.
    fn touch(&mut self, l: &Layout, node: &str, param: String, axis: usize) {
        let mut offset = 0;
        for &(s, len) in &l.segs {
            self.spaces[s].members.push(Member {
                node: node.to_string(),
                param: param.clone(),
                axis,
                offset,
                expand: l.expand,
            });
            offset += len;
        }
    }
    /// A new space produced by `node`, with its output-axis parameters as members.
    fn produce(&mut self, len: usize, node: &str, params: &[String]) -> Layout {
        let s = self.new_space(len);
        self.spaces[s].producers.push(node.to_string());
        for p in params {
            self.spaces[s].members.push(Member {
                node: node.to_string(),
                param: p.clone(),
                axis: 0,
                offset: 0,
                expand: 1,
            });
        }
        Layout {
            segs: vec![(s, len)],
            expand: 1,
        }
    }
    /// Splits every space of the class of `s` into `parts` equal spaces, space `i` holding
    /// channels `i * len / parts ..`: members are shifted to their part, parts `i` of the
    /// class's spaces unified, and every layout rewritten. Returns the new spaces of `s`.
    fn split(&mut self, s: usize, parts: usize, layouts: &mut [Layout]) -> Vec<usize> {
        let root = self.find(s);
        let class: Vec<usize> = (0..self.spaces.len())
            .filter(|&x| !self.spaces[x].dead && self.find(x) == root)
            .collect();
        let blocked = self.spaces[root].blocked.clone();
        let mut pieces: HashMap<usize, Vec<usize>> = HashMap::new();
        for &x in &class {
            let len = self.spaces[x].len / parts;
            let members = std::mem::take(&mut self.spaces[x].members);
            let producers = std::mem::take(&mut self.spaces[x].producers);
            self.spaces[x].dead = true;
            let ids: Vec<usize> = (0..parts)
                .map(|i| {
                    let id = self.new_space(len);
                    self.spaces[id].blocked = blocked.clone();
                    self.spaces[id].producers = producers.clone();
                    self.spaces[id].members = members
                        .iter()
                        .map(|m| Member {
                            offset: m.offset + i * len,
                            ..m.clone()
                        })
                        .collect();
                    id
                })
                .collect();
            pieces.insert(x, ids);
        }
        for &x in &class[1..] {
            let pairs: Vec<(usize, usize)> = pieces[&class[0]]
                .iter()
                .copied()
                .zip(pieces[&x].iter().copied())
                .take(parts)
                .collect();
            for (a, b) in pairs {
                self.union(a, b);
            }
        }
        for l in layouts.iter_mut() {
            l.segs = l
                .segs
                .iter()
                .flat_map(|&(sp, len)| match pieces.get(&sp) {
                    Some(ids) => ids.iter().map(|&id| (id, len / parts)).collect(),
                    None => vec![(sp, len)],
                })
                .collect();
        }
        pieces.remove(&s).unwrap_or_default()
    }

    fn unify(&mut self, layouts: &[&Layout], node: &str, op: &Op) {
        let first = layouts[0];
        let aligned = layouts.iter().all(|l| {
            l.expand == first.expand
                && l.segs.len() == first.segs.len()
                && l.segs.iter().zip(&first.segs).all(|(a, b)| a.1 == b.1)
        });
        if aligned {
            for l in &layouts[1..] {
                for (a, b) in first.segs.iter().zip(&l.segs) {
                    self.union(a.0, b.0);
                }
            }
        } else {
            for l in layouts {
                self.block_layout(l, node, op, "joins channel ranges that do not line up");
            }
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A layout cut into `g` parts of one pattern of segment lengths at segment boundaries (the
/// input of a grouped convolution), or `None`.
fn grouped_parts(l: &Layout, g: usize) -> Option<Vec<Vec<(usize, usize)>>> {
    if g < 2 || l.expand != 1 {
        return None;
    }
    let total: usize = l.segs.iter().map(|s| s.1).sum();
    let per = total / g;
    let (mut parts, mut cur, mut len) = (Vec::new(), Vec::new(), 0);
    for &seg in &l.segs {
        cur.push(seg);
        len += seg.1;
        if len == per {
            parts.push(std::mem::take(&mut cur));
            len = 0;
        } else if len > per {
            return None;
        }
    }
    let same = parts.len() == g
        && parts.iter().all(|p: &Vec<(usize, usize)>| {
            p.len() == parts[0].len() && p.iter().zip(&parts[0]).all(|(a, b)| a.1 == b.1)
        });
    same.then_some(parts)
}

/// The channel groups of a graph, and how each node's output is laid out over them.
#[derive(Clone, Debug)]
pub struct ChannelGroups {
    pub groups: Vec<ChannelGroup>,
    layouts: Vec<Layout>,
    graph: Graph,
}

/// Computes the channel groups of a graph.
pub fn channel_groups(graph: &Graph) -> ChannelGroups {
    let mut b = Builder { spaces: Vec::new() };
    let mut layouts: Vec<Layout> = Vec::with_capacity(graph.len());
    for node in graph.nodes() {
        let name = node.name.as_str();
        let ins: Vec<&Layout> = node.inputs.iter().map(|&i| &layouts[i]).collect();
        let pnames = |roles: &[&str]| -> Vec<String> {
            node.op
                .params()
                .iter()
                .filter(|p| roles.contains(&p.role))
                .map(|p| node.param_name(p.role))
                .collect()
        };
        let out = match &node.op {
            Op::Input { shape } => {
                let l = b.produce(shape[0], name, &[]);
                b.spaces[l.segs[0].0].producers.clear();
                b.block_layout(&l, name, &node.op, "the model input's channels are fixed");
                l
            }
            Op::Conv2d(c) if c.groups == 1 => {
                let input = ins[0].clone();
                b.touch(&input, name, node.param_name("weight"), 1);
                b.produce(c.out_channels, name, &pnames(&["weight", "bias"]))
            }
            Op::Conv2d(c) if c.is_depthwise() => {
                let input = ins[0].clone();
                for p in pnames(&["weight", "bias"]) {
                    b.touch(&input, name, p, 0);
                }
                input
            }
            Op::Conv2d(c) => {
                // Channel k of every group is pruned together, so that the groups stay equal.
                let g = c.groups;
                let mut input = ins[0].clone();
                // Split the spaces that a group boundary cuts through, until the input falls
                // into `g` parts of one pattern (or cannot).
                let mut parts = None;
                for _ in 0..=input.segs.len() + g {
                    if let Some(p) = grouped_parts(&input, g) {
                        parts = Some(p);
                        break;
                    }
                    let total: usize = input.segs.iter().map(|s| s.1).sum();
                    if input.expand != 1 || !total.is_multiple_of(g) {
                        break;
                    }
                    let per = total / g;
                    let mut offset = 0;
                    let mut cut = None;
                    for &(sp, len) in &input.segs {
                        let piece = gcd(
                            gcd(len, per),
                            offset % per + per * usize::from(offset % per == 0),
                        );
                        if piece < len && (offset / per != (offset + len - 1) / per || len > per) {
                            cut = Some((sp, len / piece));
                            break;
                        }
                        offset += len;
                    }
                    let Some((sp, pieces)) = cut else { break };
                    b.split(sp, pieces, &mut layouts);
                    input = layouts[node.inputs[0]].clone();
                }
                let input = match &parts {
                    Some(p) => Layout {
                        segs: p.concat(),
                        expand: input.expand,
                    },
                    None => input,
                };
                match parts {
                    Some(parts) => {
                        for part in &parts {
                            let first = Layout {
                                segs: part.clone(),
                                expand: 1,
                            };
                            b.touch(&first, name, node.param_name("weight"), 1);
                        }
                        for i in 1..g {
                            for (a, bb) in parts[0].iter().zip(&parts[i]) {
                                b.union(a.0, bb.0);
                            }
                        }
                    }
                    None => {
                        let reason = format!(
                            "grouped convolution (groups={g}) over channel ranges that do not split into its groups"
                        );
                        b.block_layout(&input, name, &node.op, &reason);
                    }
                }
                // The outputs: one space per group, unified.
                let opg = c.out_channels / g;
                let mut segs = Vec::with_capacity(g);
                for i in 0..g {
                    let l = b.produce(opg, name, &[]);
                    let s = l.segs[0].0;
                    for p in pnames(&["weight", "bias"]) {
                        b.spaces[s].members.push(Member {
                            node: name.to_string(),
                            param: p,
                            axis: 0,
                            offset: i * opg,
                            expand: 1,
                        });
                    }
                    segs.push((s, opg));
                }
                for i in 1..g {
                    b.union(segs[0].0, segs[i].0);
                }
                Layout { segs, expand: 1 }
            }
            Op::Linear(l) => {
                let input = ins[0].clone();
                b.touch(&input, name, node.param_name("weight"), 1);
                b.produce(l.out_features, name, &pnames(&["weight", "bias"]))
            }
            Op::BatchNorm2d(_) | Op::PRelu { .. } | Op::ChannelAffine { .. } => {
                let input = ins[0].clone();
                for p in pnames(&["weight", "bias", "running_mean", "running_var"]) {
                    b.touch(&input, name, p, 0);
                }
                input
            }
            Op::Relu
            | Op::Relu6
            | Op::HardSwish
            | Op::HardSigmoid { .. }
            | Op::Sigmoid
            | Op::Clip { .. }
            | Op::LeakyRelu { .. }
            | Op::Tanh
            | Op::Silu
            | Op::Gelu
            | Op::GeluTanh
            | Op::Erf
            | Op::Unary(_)
            | Op::Dropout { .. }
            | Op::Identity
            | Op::FakeQuant(_)
            | Op::MaxPool2d(_)
            | Op::AvgPool2d(_)
            | Op::GlobalAvgPool => ins[0].clone(),
            // A channel's normalization reads its neighbours, so removing a channel changes
            // its neighbours' windows: an approximation that pruning (which fine-tunes after)
            // tolerates, as it tolerates removing the channel itself.
            Op::Lrn(_) | Op::Pad { .. } | Op::Resize(_) | Op::Sqrt | Op::Reciprocal => {
                ins[0].clone()
            }
            // Ops along other axes than the channels, each channel's values its own: a
            // slice of rows or columns, a reduction or softmax over the plane, a norm within
            // each channel (instance norm's).
            Op::Slice { axis, .. } | Op::SoftmaxAt { axis } if *axis > 0 => ins[0].clone(),
            Op::Reduce { axes, .. } if !axes.contains(&0) => ins[0].clone(),
            Op::LayerNorm { from, .. } if *from > 0 => ins[0].clone(),
            // A reshape that keeps the channel axis first (`[C, H, W]` to `[C, H·W]` and
            // back): each channel's values stay together, in order.
            Op::Reshape { .. } if keeps_channels(graph, node) && ins[0].expand == 1 => {
                ins[0].clone()
            }
            // Ops over the channels among other axes, or between tokens: their groups are
            // blocked (named in `slim info`), never the import.
            Op::Dense(_)
            | Op::MatMul
            | Op::Binary(_)
            | Op::ConstBinary { .. }
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::SoftmaxAt { .. }
            | Op::Reduce { .. }
            | Op::LayerNorm { .. }
            | Op::ConcatAt { .. }
            | Op::Slice { .. } => {
                let reason = format!(
                    "Slim does not yet follow channels through {}",
                    node.op.kind()
                );
                for l in &ins {
                    b.block_layout(l, name, &node.op, &reason);
                }
                let len = node.shape.first().copied().unwrap_or(1);
                let l = b.produce(len, name, &[]);
                b.spaces[l.segs[0].0].producers.clear();
                b.block_layout(&l, name, &node.op, &reason);
                l
            }
            // A constant's channels are its own, not its input's (which gives only the batch
            // size): a fresh, blocked layout.
            Op::Constant { .. } => {
                let reason = "Slim does not yet prune the channels of a constant".to_string();
                let len = node.shape.first().copied().unwrap_or(1);
                let l = b.produce(len, name, &[]);
                b.spaces[l.segs[0].0].producers.clear();
                b.block_layout(&l, name, &node.op, &reason);
                l
            }
            Op::ConvTranspose2d(c) if c.groups == 1 => {
                // The weight is [in, out, kh, kw]: input channels on axis 0, outputs on 1.
                let input = ins[0].clone();
                b.touch(&input, name, node.param_name("weight"), 0);
                let l = b.produce(c.out_channels, name, &pnames(&["bias"]));
                let s = l.segs[0].0;
                b.spaces[s].members.push(Member {
                    node: name.to_string(),
                    param: node.param_name("weight"),
                    axis: 1,
                    offset: 0,
                    expand: 1,
                });
                l
            }
            Op::ConvTranspose2d(c) => {
                let input = ins[0].clone();
                let reason = format!(
                    "grouped transposed convolution (groups={}) ties channels in groups",
                    c.groups
                );
                b.block_layout(&input, name, &node.op, &reason);
                let l = b.produce(c.out_channels, name, &pnames(&["bias"]));
                b.block_layout(&l, name, &node.op, &reason);
                l
            }
            Op::ChannelShuffle { groups } => {
                let reason = format!(
                    "channel shuffle interleaves {groups} groups, which must keep one size"
                );
                b.block_layout(ins[0], name, &node.op, &reason);
                let l = b.produce(node.shape[0], name, &[]);
                b.spaces[l.segs[0].0].producers.clear();
                b.block_layout(&l, name, &node.op, &reason);
                l
            }
            Op::Flatten => {
                let mut l = ins[0].clone();
                let in_shape = &graph.node(node.inputs[0]).shape;
                l.expand *= in_shape[1..].iter().product::<usize>();
                l
            }
            Op::Add => {
                b.unify(&ins, name, &node.op);
                ins[0].clone()
            }
            Op::Mul => {
                let (x, g) = (ins[0].clone(), ins[1].clone());
                let channel_wise =
                    graph.node(node.inputs[0]).shape != graph.node(node.inputs[1]).shape;
                if channel_wise {
                    // The gate's expand is over its own (1x1) positions: compare channels only.
                    let gate = Layout {
                        segs: g.segs.clone(),
                        expand: x.expand,
                    };
                    b.unify(&[&x, &gate], name, &node.op);
                } else {
                    b.unify(&[&x, &g], name, &node.op);
                }
                x
            }
            Op::Concat => Layout {
                segs: ins.iter().flat_map(|l| l.segs.iter().copied()).collect(),
                expand: 1,
            },
            Op::Softmax => {
                let input = ins[0].clone();
                b.block_layout(&input, name, &node.op, "softmax normalizes across channels");
                input
            }
        };
        layouts.push(out);
    }
    for o in graph.outputs() {
        let node = graph.node(o);
        let l = layouts[o].clone();
        b.block_layout(
            &l,
            &node.name,
            &node.op,
            "the model output's channels are fixed",
        );
    }

    // Number the classes in order of first appearance; gather members and producers.
    let mut group_of: HashMap<usize, usize> = HashMap::new();
    let mut groups: Vec<ChannelGroup> = Vec::new();
    for s in 0..b.spaces.len() {
        if b.spaces[s].dead {
            continue;
        }
        let r = b.find(s);
        let gid = *group_of.entry(r).or_insert_with(|| {
            groups.push(ChannelGroup {
                id: groups.len(),
                channels: b.spaces[r].len,
                producers: Vec::new(),
                members: Vec::new(),
                blocked: b.spaces[r].blocked.clone(),
            });
            groups.len() - 1
        });
        let members = std::mem::take(&mut b.spaces[s].members);
        let producers = std::mem::take(&mut b.spaces[s].producers);
        groups[gid].members.extend(members);
        for p in producers {
            if !groups[gid].producers.contains(&p) {
                groups[gid].producers.push(p);
            }
        }
    }
    for l in &mut layouts {
        for seg in &mut l.segs {
            seg.0 = group_of[&b.find(seg.0)];
        }
    }
    ChannelGroups {
        groups,
        layouts,
        graph: graph.clone(),
    }
}

impl ChannelGroups {
    /// The groups that can be pruned.
    pub fn prunable(&self) -> impl Iterator<Item = &ChannelGroup> {
        self.groups.iter().filter(|g| g.is_prunable())
    }

    /// The group ids that make up a node's output channels, in channel order.
    pub fn node_groups(&self, node: usize) -> Vec<usize> {
        self.layouts[node].segs.iter().map(|s| s.0).collect()
    }

    /// MACs of the graph after each group `g` keeps `kept[g]` channels (others unchanged),
    /// computed from the layouts alone, without any surgery.
    pub fn predict_macs(&self, kept: &HashMap<usize, usize>) -> u64 {
        let count = |l: &Layout| -> usize {
            l.segs
                .iter()
                .map(|&(g, len)| kept.get(&g).copied().unwrap_or(len))
                .sum::<usize>()
        };
        let mut total = 0u64;
        for (i, node) in self.graph.nodes().iter().enumerate() {
            total += match &node.op {
                Op::Conv2d(c) => {
                    let out = count(&self.layouts[i]);
                    let input = count(&self.layouts[node.inputs[0]]);
                    let per_group = if c.is_depthwise() {
                        1
                    } else {
                        input / c.groups
                    };
                    (out * node.shape[1] * node.shape[2] * per_group * c.kernel[0] * c.kernel[1])
                        as u64
                }
                Op::Linear(_) => {
                    let l = &self.layouts[node.inputs[0]];
                    (count(l) * l.expand * count(&self.layouts[i])) as u64
                }
                Op::ConvTranspose2d(c) => {
                    let input = self.graph.node(node.inputs[0]);
                    let (ci, co) = (
                        count(&self.layouts[node.inputs[0]]),
                        count(&self.layouts[i]),
                    );
                    let plane = input.shape[1..].iter().product::<usize>();
                    (ci * plane * (co / c.groups) * c.kernel[0] * c.kernel[1]) as u64
                }
                _ => 0,
            };
        }
        total
    }

    /// Prunes several groups at once: for each `(group id, kept channel indices)`, every member
    /// of the group is sliced. Returns the smaller model; `model` is not modified.
    pub fn prune(&self, model: &Model, plan: &[(usize, Vec<usize>)]) -> Result<Model> {
        if !model.int8.is_empty() {
            return Err(CoreError::Invalid(
                "this is an int8 model: prune the float model it came from, then quantize".into(),
            ));
        }
        if model.graph != self.graph {
            return Err(CoreError::Invalid(
                "these channel groups were computed for another graph; recompute them".into(),
            ));
        }
        // For every (parameter, axis): which indices survive.
        let mut masks: BTreeMap<(String, usize), Vec<bool>> = BTreeMap::new();
        let mut seen = vec![false; self.groups.len()];
        for (gid, keep) in plan {
            let group = self
                .groups
                .get(*gid)
                .ok_or_else(|| CoreError::Invalid(format!("there is no channel group {gid}")))?;
            if seen[*gid] {
                return Err(CoreError::Invalid(format!(
                    "group {gid} appears twice in the plan"
                )));
            }
            seen[*gid] = true;
            if let Some(b) = &group.blocked {
                return Err(CoreError::Invalid(format!(
                    "{group} cannot be pruned (blocked by `{}`)",
                    b.node
                )));
            }
            let mut kept = vec![false; group.channels];
            for &k in keep {
                if k >= group.channels {
                    return Err(CoreError::Invalid(format!(
                        "channel {k} is out of range for group {gid} of {} channels",
                        group.channels
                    )));
                }
                kept[k] = true;
            }
            if !kept.iter().any(|&k| k) {
                return Err(CoreError::Invalid(format!(
                    "group {gid} must keep at least one channel"
                )));
            }
            for m in &group.members {
                let dim = model
                    .params
                    .var(&m.param)
                    .ok_or_else(|| CoreError::param(&m.param, "no such parameter"))?
                    .dims()[m.axis];
                let mask = masks
                    .entry((m.param.clone(), m.axis))
                    .or_insert_with(|| vec![true; dim]);
                for (k, _) in kept.iter().enumerate().filter(|(_, &keep)| !keep) {
                    for j in 0..m.expand {
                        let idx = (m.offset + k) * m.expand + j;
                        let slot = mask.get_mut(idx).ok_or_else(|| {
                            CoreError::param(
                                &m.param,
                                format!("index {idx} out of range on axis {}", m.axis),
                            )
                        })?;
                        *slot = false;
                    }
                }
            }
        }

        let mut params = ParamStore::new();
        for (name, p) in model.params.iter() {
            let mut t: Tensor = p.var.as_tensor().clone();
            let mut sliced = false;
            for axis in 0..t.rank() {
                if let Some(mask) = masks.get(&(name.to_string(), axis)) {
                    let idx: Vec<u32> = (0..mask.len())
                        .filter(|&i| mask[i])
                        .map(|i| i as u32)
                        .collect();
                    let idx = Tensor::from_vec(idx.clone(), idx.len(), t.device())?;
                    t = t.index_select(&idx, axis)?;
                    sliced = true;
                }
            }
            if !sliced {
                t = t.copy()?;
            }
            params.insert(name, &t, p.kind)?;
        }
        let graph = model.graph.map_ops_on(|node, inputs| match &node.op {
            // A reshape that keeps the channels first takes the new channel count.
            Op::Reshape { shape } if keeps_channels(&model.graph, node) => {
                let mut shape = shape.clone();
                shape[0] = inputs[0][0];
                Op::Reshape { shape }
            }
            _ => resized_op(node, &params),
        })?;
        let mut pruned = Model::new(graph, params)?;
        pruned.provenance = model.provenance.clone();
        Ok(pruned)
    }
}

/// Whether `node` is a reshape whose output keeps its input's channel count as the first axis.
fn keeps_channels(graph: &Graph, node: &crate::graph::Node) -> bool {
    let Op::Reshape { shape } = &node.op else {
        return false;
    };
    let input = node.inputs.first().map(|&i| graph.node(i).shape.as_slice());
    matches!((input, shape.first()), (Some([c, ..]), Some(d)) if c == d)
}

/// The node's op with its channel counts read back from its (sliced) parameters.
fn resized_op(node: &crate::graph::Node, params: &ParamStore) -> Op {
    let dims = |role: &str| {
        params
            .var(&node.param_name(role))
            .map(|v| v.dims().to_vec())
            .unwrap_or_default()
    };
    match &node.op {
        Op::Conv2d(c) => {
            let w = dims("weight");
            let mut c = c.clone();
            if c.is_depthwise() {
                c.in_channels = w[0];
                c.out_channels = w[0];
                c.groups = w[0];
            } else {
                c.out_channels = w[0];
                c.in_channels = w[1] * c.groups;
            }
            Op::Conv2d(c)
        }
        Op::Linear(l) => {
            let w = dims("weight");
            let mut l = l.clone();
            l.out_features = w[0];
            l.in_features = w[1];
            Op::Linear(l)
        }
        Op::BatchNorm2d(b) => {
            let mut b = b.clone();
            b.channels = dims("weight")[0];
            Op::BatchNorm2d(b)
        }
        Op::ConvTranspose2d(c) => {
            let w = dims("weight");
            let mut c = c.clone();
            c.in_channels = w[0];
            c.out_channels = w[1] * c.groups;
            Op::ConvTranspose2d(c)
        }
        Op::PRelu { .. } => Op::PRelu {
            channels: dims("weight")[0],
        },
        Op::ChannelAffine { .. } => Op::ChannelAffine {
            channels: dims("weight")[0],
        },
        other => other.clone(),
    }
}

impl Model {
    /// Prunes one channel group, keeping the given channel indices. On error the model is
    /// unchanged.
    pub fn prune_channels(&mut self, group: &ChannelGroup, keep: &[usize]) -> Result<()> {
        let groups = channel_groups(&self.graph);
        let same = groups.groups.get(group.id).is_some_and(|g| g == group);
        if !same {
            return Err(CoreError::Invalid(format!(
                "{group} does not belong to this model's current graph; recompute the groups"
            )));
        }
        *self = groups.prune(self, &[(group.id, keep.to_vec())])?;
        Ok(())
    }
}
