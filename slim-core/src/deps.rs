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
//! - a channel shuffle of `g` groups cuts its input into `g` blocks of one pattern (splitting
//!   the spaces a block boundary cuts through), unifies them so that they keep one size, and
//!   weaves them: its output lays segment `i` of every block side by side, channel `k` of
//!   block `a`'s segment at `k * g + a`, so the members after it step by `g` (a grouped
//!   convolution after it takes one bundle, split into its groups, per group);
//! - a grouped convolution ties channel `k` of every group, so that the groups stay equal:
//!   a space its group boundaries cut through is split into equal spaces (members shifted to
//!   their part), the parts unified; its outputs are one space per group, unified;
//! - `Add`, and `Mul` (element-wise, or channel-wise as in squeeze-and-excite), unify the
//!   spaces of their inputs: those channels must be pruned together (an add first splits
//!   spaces until its inputs' segments line up);
//! - `Flatten` keeps the spaces but expands each channel into its `H * W` positions, so a
//!   following linear layer sees channel `k` of a segment at offset `o` as features
//!   `(o + k) * H * W .. (o + k + 1) * H * W`.
//!
//! A **channel group** is a class of unified spaces: all have the same number of channels and
//! every member `(parameter, axis, offset, expand, stride)` touches indices
//! `(offset + k * stride) * expand + j` for channel `k` and `j < expand`. A group is blocked
//! (cannot be pruned) when it reaches a model input or output, a grouped convolution or
//! channel shuffle whose groups do not split its input's channel ranges alike, a softmax, an op
//! across the channels (attention, reshapes that move them, channel slices), or an
//! add/concat whose channel ranges do not line up; the
//! group then names the node that blocked it and why. Nothing is skipped silently.
//!
//! [`ChannelGroups::prune`] slices every member of every group in a plan at once and returns a
//! new model; on any error nothing is returned and the input model is untouched.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{CoreError, Result};
use crate::graph::{Conv2dSpec, Graph, Node, Op};
use crate::model::Model;
use crate::params::ParamStore;

/// One parameter axis a group touches: channel `k` of the group is at indices
/// `(offset + k * stride) * expand + j`, `j < expand`, along `axis` of `param` (a stride
/// above 1 after a channel shuffle, which interleaves groups of channels).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    pub node: String,
    pub param: String,
    pub axis: usize,
    pub offset: usize,
    pub expand: usize,
    #[serde(skip_serializing_if = "is_one")]
    pub stride: usize,
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

impl Member {
    /// The index along the axis of channel `k`'s `j`-th value (`j < expand`).
    pub fn index(&self, k: usize, j: usize) -> usize {
        (self.offset + k * self.stride) * self.expand + j
    }
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
    /// `(space or group id, channels)` in channel order, or, woven, in bundles of `weave`.
    segs: Vec<(usize, usize)>,
    expand: usize,
    /// 1: the segments lie one after another. Above 1 (after a channel shuffle): the segments
    /// come in bundles of `weave` of one length `len`, each bundle taking `weave * len`
    /// channels in which channel `k` of its segment `a` is at `k * weave + a`.
    weave: usize,
}

impl Layout {
    /// The segments with the position of each one's channel 0 and the step between its
    /// channels.
    fn placed(&self) -> Vec<(usize, usize, usize, usize)> {
        let mut out = Vec::with_capacity(self.segs.len());
        let mut base = 0;
        for bundle in self.segs.chunks(self.weave.max(1)) {
            for (a, &(s, len)) in bundle.iter().enumerate() {
                out.push((s, len, base + a, bundle.len()));
            }
            base += bundle.iter().map(|s| s.1).sum::<usize>();
        }
        out
    }
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
    /// A fresh layout for `node`'s output that no layer produces, blocked for `reason`, as
    /// are its inputs' layouts `ins`.
    fn block_through(
        &mut self,
        ins: &[&Layout],
        node: &crate::graph::Node,
        reason: &str,
    ) -> Layout {
        for l in ins {
            self.block_layout(l, &node.name, &node.op, reason);
        }
        let len = node.shape.first().copied().unwrap_or(1);
        let l = self.produce(len, &node.name, &[]);
        self.spaces[l.segs[0].0].producers.clear();
        self.block_layout(&l, &node.name, &node.op, reason);
        l
    }
    /// Adds a member on every segment of a layout.
    fn touch(&mut self, l: &Layout, node: &str, param: String, axis: usize) {
        for (s, _, offset, stride) in l.placed() {
            self.spaces[s].members.push(Member {
                node: node.to_string(),
                param: param.clone(),
                axis,
                offset,
                expand: l.expand,
                stride,
            });
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
                stride: 1,
            });
        }
        Layout {
            segs: vec![(s, len)],
            expand: 1,
            weave: 1,
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
                            offset: m.offset + i * len * m.stride,
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
        let pieces_of = &pieces;
        for l in layouts.iter_mut() {
            // A woven bundle whose segments are all split becomes `parts` bundles, part `i`
            // of each segment in bundle `i` (its channels lie together); the split spaces of
            // a class are all in it, so a bundle is split whole or not at all.
            let w = l.weave.max(1);
            l.segs = l
                .segs
                .chunks(w)
                .flat_map(|bundle| match bundle_split(bundle, pieces_of) {
                    true => (0..parts)
                        .flat_map(|i| {
                            bundle
                                .iter()
                                .map(move |&(sp, len)| (pieces_of[&sp][i], len / parts))
                        })
                        .collect::<Vec<_>>(),
                    false => bundle.to_vec(),
                })
                .collect();
        }
        pieces.remove(&s).unwrap_or_default()
    }

    fn unify(&mut self, layouts: &[&Layout], node: &str, op: &Op) {
        let first = layouts[0];
        let aligned = layouts.iter().all(|l| {
            l.expand == first.expand
                && l.weave == first.weave
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

/// Whether every segment of a woven bundle is among the split spaces (a bundle's segments
/// are unified by the shuffle that made it, and a split cuts a whole class: never some).
fn bundle_split(bundle: &[(usize, usize)], pieces: &HashMap<usize, Vec<usize>>) -> bool {
    let split = bundle.iter().filter(|s| pieces.contains_key(&s.0)).count();
    debug_assert!(
        split == 0 || split == bundle.len(),
        "a bundle split in part"
    );
    split == bundle.len()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A layout cut into parts: each part's `(space, channels)` segments.
type Parts = Vec<Vec<(usize, usize)>>;

/// A layout cut into `g` parts of one pattern of segment lengths at segment boundaries (the
/// input of a grouped convolution), or `None`.
fn grouped_parts(l: &Layout, g: usize) -> Option<Parts> {
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

/// The layout of node `input`'s output cut into `g` parts of one pattern of segment lengths
/// (the groups of a grouped convolution, the blocks of a channel shuffle), splitting the
/// spaces that a part boundary cuts through (every layout rewritten); the layout as it then
/// is, and the parts (`None` where it cannot be cut so). A woven layout (a shuffle's output)
/// is cut at its bundles: one bundle is first split into `g`, so that bundle `i` holds part
/// `i` of each of its segments.
fn cut_into_groups(
    b: &mut Builder,
    layouts: &mut [Layout],
    input: usize,
    g: usize,
) -> (Layout, Option<Parts>) {
    let mut l = layouts[input].clone();
    if g < 2 || l.expand != 1 {
        return (l, None);
    }
    if l.weave > 1 {
        let w = l.weave;
        let len = l.segs[0].1;
        let even = l.segs.iter().all(|s| s.1 == len);
        if l.segs.len() == w && even && len.is_multiple_of(g) {
            b.split(l.segs[0].0, g, layouts);
            l = layouts[input].clone();
        }
        let bundles: Vec<Vec<(usize, usize)>> = l.segs.chunks(w).map(<[_]>::to_vec).collect();
        let alike = bundles.len() == g
            && bundles.iter().all(|p| {
                p.len() == bundles[0].len() && p.iter().zip(&bundles[0]).all(|(x, y)| x.1 == y.1)
            });
        return (l, alike.then_some(bundles));
    }
    for _ in 0..=l.segs.len() + g {
        if let Some(p) = grouped_parts(&l, g) {
            return (l, Some(p));
        }
        let total: usize = l.segs.iter().map(|s| s.1).sum();
        if !total.is_multiple_of(g) {
            break;
        }
        let per = total / g;
        let mut offset = 0;
        let mut cut = None;
        for &(sp, len) in &l.segs {
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
        // No segment crosses a boundary, but the parts differ in pattern: down to the
        // segments' common length (not to single channels, which could not be pruned).
        let common = l.segs.iter().fold(per, |d, s| gcd(d, s.1));
        let cut = cut.or_else(|| {
            if common < 2 {
                return None;
            }
            let &(sp, len) = l.segs.iter().find(|s| s.1 > common)?;
            Some((sp, len / common))
        });
        let Some((sp, pieces)) = cut else { break };
        b.split(sp, pieces, layouts);
        l = layouts[input].clone();
    }
    (l, None)
}

/// Splits the spaces of the layouts of `inputs` (an add's) until their segments line up:
/// while a segment of one layout holds a boundary between segments of another inside it, its
/// class is split into pieces of the greatest length that those boundaries allow (never
/// single channels, which could not be pruned). Layouts of other lengths, expands or weaves
/// are left as they are (the add blocks them).
fn align(b: &mut Builder, layouts: &mut [Layout], inputs: &[usize]) {
    for _ in 0..64 {
        let ls: Vec<&Layout> = inputs.iter().map(|&i| &layouts[i]).collect();
        let total = |l: &Layout| l.segs.iter().map(|s| s.1).sum::<usize>();
        let alike = ls
            .iter()
            .all(|l| l.weave == 1 && l.expand == ls[0].expand && total(l) == total(ls[0]));
        if !alike {
            return;
        }
        let mut bounds: Vec<usize> = ls
            .iter()
            .flat_map(|l| {
                l.segs.iter().scan(0, |at, s| {
                    *at += s.1;
                    Some(*at)
                })
            })
            .collect();
        bounds.sort_unstable();
        bounds.dedup();
        let mut cut = None;
        'find: for l in &ls {
            let mut start = 0;
            for &(sp, len) in &l.segs {
                let inside = bounds.iter().filter(|&&x| x > start && x < start + len);
                let piece = inside.fold(len, |d, &x| gcd(d, x - start));
                if piece < len {
                    cut = Some((sp, len, piece));
                    break 'find;
                }
                start += len;
            }
        }
        match cut {
            Some((sp, len, piece)) if piece >= 2 => {
                b.split(sp, len / piece, layouts);
            }
            _ => return,
        }
    }
}

/// The layout after a channel shuffle of `g` groups (`node`): block `a` of the `g` (channels
/// `a * C / g ..`) goes to channels `a`, `a + g`, ...; the blocks must keep one size, so they
/// are unified, and the output weaves them, segment `i` of every block into bundle `i`.
fn shuffle(b: &mut Builder, layouts: &mut [Layout], node: &crate::graph::Node, g: usize) -> Layout {
    if g == 1 {
        // One group: the channels stay where they are.
        return layouts[node.inputs[0]].clone();
    }
    let (input, parts) = match layouts[node.inputs[0]].weave {
        1 => cut_into_groups(b, layouts, node.inputs[0], g),
        _ => (layouts[node.inputs[0]].clone(), None),
    };
    let Some(parts) = parts else {
        let reason = match input.weave {
            1 => format!(
                "channel shuffle of {g} groups over channel ranges that do not split into them"
            ),
            _ => "a channel shuffle of channels shuffled before".to_string(),
        };
        return b.block_through(&[&input], node, &reason);
    };
    for part in &parts[1..] {
        for (x, y) in parts[0].iter().zip(part) {
            b.union(x.0, y.0);
        }
    }
    Layout {
        segs: (0..parts[0].len())
            .flat_map(|i| parts.iter().map(move |p| p[i]))
            .collect(),
        expand: 1,
        weave: g,
    }
}

/// The channel groups of a graph, and how each node's output is laid out over them.
#[derive(Clone, Debug)]
pub struct ChannelGroups {
    pub groups: Vec<ChannelGroup>,
    layouts: Vec<Layout>,
    graph: Graph,
}

/// The names of `node`'s parameters of the given roles.
fn param_names(node: &Node, roles: &[&str]) -> Vec<String> {
    node.op
        .params()
        .iter()
        .filter(|p| roles.contains(&p.role))
        .map(|p| node.param_name(p.role))
        .collect()
}

/// The output layout of a layer (the model input, a convolution, a linear layer, a batch
/// norm or per-channel scale), with its parameters joined to the channel spaces they slice;
/// `None` for the other ops.
fn layer_layout(b: &mut Builder, layouts: &mut [Layout], node: &Node) -> Option<Layout> {
    let name = node.name.as_str();
    let ins: Vec<&Layout> = node.inputs.iter().map(|&i| &layouts[i]).collect();
    let pnames = |roles: &[&str]| param_names(node, roles);
    Some(match &node.op {
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
        Op::Conv2d(c) => grouped_conv(b, layouts, node, c),
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
                stride: 1,
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
        _ => return None,
    })
}

/// A grouped convolution's output layout: channel k of every group of its input pruned
/// together (so that the groups stay equal), its outputs one space per group, unified.
fn grouped_conv(b: &mut Builder, layouts: &mut [Layout], node: &Node, c: &Conv2dSpec) -> Layout {
    let name = node.name.as_str();
    let pnames = |roles: &[&str]| param_names(node, roles);
    // Channel k of every group is pruned together, so that the groups stay equal.
    let g = c.groups;
    let (input, parts) = cut_into_groups(b, layouts, node.inputs[0], g);
    match parts {
        Some(parts) => {
            for part in &parts {
                let first = Layout {
                    segs: part.clone(),
                    expand: 1,
                    weave: input.weave,
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
                stride: 1,
            });
        }
        segs.push((s, opg));
    }
    for i in 1..g {
        b.union(segs[0].0, segs[i].0);
    }
    Layout {
        segs,
        expand: 1,
        weave: 1,
    }
}

/// The output layout of an op without channel parameters: passed through, joined (sums,
/// products, concatenations), permuted (a channel shuffle), or blocked where Slim does not
/// follow the channels.
fn flow_layout(b: &mut Builder, layouts: &mut [Layout], graph: &Graph, node: &Node) -> Layout {
    let name = node.name.as_str();
    let ins: Vec<&Layout> = node.inputs.iter().map(|&i| &layouts[i]).collect();
    match &node.op {
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
        Op::Lrn(_) | Op::Pad { .. } | Op::Resize(_) | Op::Sqrt | Op::Reciprocal => ins[0].clone(),
        // Ops along other axes than the channels, each channel's values its own: a
        // slice of rows or columns, a reduction or softmax over the plane, a norm within
        // each channel (instance norm's).
        Op::Slice { axis, .. } | Op::SoftmaxAt { axis } if *axis > 0 => ins[0].clone(),
        Op::Reduce { axes, .. } if !axes.contains(&0) => ins[0].clone(),
        Op::LayerNorm { from, .. } if *from > 0 => ins[0].clone(),
        // A reshape that keeps the channel axis first (`[C, H, W]` to `[C, H·W]` and
        // back): each channel's values stay together, in order.
        Op::Reshape { .. } if keeps_channels(graph, node) && ins[0].expand == 1 => ins[0].clone(),
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
            b.block_through(&ins, node, &reason)
        }
        // A constant's channels are its own, not its input's (which gives only the batch
        // size): a fresh, blocked layout.
        Op::Constant { .. } => b.block_through(
            &[],
            node,
            "Slim does not yet prune the channels of a constant",
        ),
        Op::ChannelShuffle { groups } => shuffle(b, layouts, node, *groups),
        Op::Flatten => {
            let mut l = ins[0].clone();
            let in_shape = &graph.node(node.inputs[0]).shape;
            l.expand *= in_shape[1..].iter().product::<usize>();
            l
        }
        Op::Add => {
            align(b, layouts, &node.inputs);
            let ins: Vec<&Layout> = node.inputs.iter().map(|&i| &layouts[i]).collect();
            b.unify(&ins, name, &node.op);
            ins[0].clone()
        }
        Op::Mul => product(b, graph, node, &ins),
        Op::Concat if ins.iter().all(|l| l.weave == ins[0].weave) => Layout {
            segs: ins.iter().flat_map(|l| l.segs.iter().copied()).collect(),
            expand: 1,
            weave: ins[0].weave,
        },
        Op::Concat => b.block_through(
            &ins,
            node,
            "joins shuffled (interleaved) channels with others",
        ),
        Op::Softmax => {
            let input = ins[0].clone();
            b.block_layout(&input, name, &node.op, "softmax normalizes across channels");
            input
        }
        // The layers: `layer_layout` lays them out.
        Op::Input { .. }
        | Op::Conv2d(_)
        | Op::Linear(_)
        | Op::BatchNorm2d(_)
        | Op::PRelu { .. }
        | Op::ChannelAffine { .. }
        | Op::ConvTranspose2d(_) => b.block_through(&ins, node, "a layer laid out elsewhere"),
    }
}

/// A product's layout: its first input's, joined with the second's (a gate of one value per
/// channel, or a value of the same shape).
fn product(b: &mut Builder, graph: &Graph, node: &Node, ins: &[&Layout]) -> Layout {
    let name = node.name.as_str();
    let (x, g) = (ins[0].clone(), ins[1].clone());
    let channel_wise = graph.node(node.inputs[0]).shape != graph.node(node.inputs[1]).shape;
    if channel_wise {
        // The gate's expand is over its own (1x1) positions: compare channels only.
        let gate = Layout {
            segs: g.segs.clone(),
            expand: x.expand,
            weave: g.weave,
        };
        b.unify(&[&x, &gate], name, &node.op);
    } else {
        b.unify(&[&x, &g], name, &node.op);
    }
    x
}

/// Computes the channel groups of a graph.
pub fn channel_groups(graph: &Graph) -> ChannelGroups {
    let mut b = Builder { spaces: Vec::new() };
    let mut layouts: Vec<Layout> = Vec::with_capacity(graph.len());
    for node in graph.nodes() {
        let out = match layer_layout(&mut b, &mut layouts, node) {
            Some(l) => l,
            None => flow_layout(&mut b, &mut layouts, graph, node),
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
                        let idx = m.index(k, j);
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

        let params = sliced_params(model, &masks)?;
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

/// The model's parameters with the indices each mask drops (by parameter and axis) removed;
/// the others copied.
fn sliced_params(
    model: &Model,
    masks: &BTreeMap<(String, usize), Vec<bool>>,
) -> Result<ParamStore> {
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
    Ok(params)
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
