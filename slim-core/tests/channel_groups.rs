//! Channel groups and surgery, checked against an independent reference: the original model
//! with the pruned channels zeroed in every member (a masked original) must compute exactly
//! what the physically pruned model computes.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use slim_core::analysis::analyze;
use slim_core::deps::{channel_groups, ChannelGroup};
use slim_core::graph::{ReduceKind, UnaryKind};
use slim_core::zoo::{self, ZooConfig};
use slim_core::{Conv2dSpec, GraphBuilder, Mode, Model, Op};

fn input_for(name: &str) -> [usize; 3] {
    if name == "lenet" || name == "mobilenet_tiny" {
        [1, 28, 28]
    } else {
        [3, 32, 32]
    }
}

/// An Inception/DenseNet-like graph: parallel branches concatenated, a dense concat feeding
/// a later layer, batch norm over a concatenation, an add of two concatenations, and a
/// flatten into a linear layer.
fn concat_graph() -> Model {
    let mut b = GraphBuilder::new([3, 12, 12]);
    b.conv("stem", 8, 3, 1, 1).relu("stem.relu");
    b.conv("a", 4, 1, 1, 0).relu("a.relu");
    b.at("stem.relu")
        .conv("b1", 6, 1, 1, 0)
        .relu("b1.relu")
        .conv("b2", 6, 3, 1, 1);
    b.at("stem.relu")
        .max_pool("c.pool", 1, 1)
        .conv("c", 5, 1, 1, 0);
    b.concat("cat", &["a.relu", "b2", "c"])
        .bn("cat.bn")
        .relu("cat.relu");
    // Dense connectivity: the stem is concatenated again after the block.
    // A second concatenation with the same channel ranges, added to the first: its segments
    // are unified pairwise.
    b.at("stem.relu").conv("p4", 4, 1, 1, 0);
    b.at("stem.relu").conv("p6", 6, 1, 1, 0);
    b.at("stem.relu").conv("p5", 5, 1, 1, 0);
    b.concat("cat2", &["p4", "p6", "p5"])
        .add("res", &["cat.relu", "cat2"]);
    b.concat("dense", &["stem.relu", "res"])
        .conv("mix", 10, 1, 1, 0);
    b.relu("mix.relu").max_pool("pool", 2, 2);
    b.conv("tail", 6, 3, 1, 1)
        .relu("tail.relu")
        .flatten("flat")
        .linear("fc1", 12)
        .relu("fc1.relu");
    b.linear("fc", 5);
    Model::init(b.build().unwrap(), 5, &Device::Cpu).unwrap()
}

/// A squeeze-and-excite block (channel-wise Mul) with hard-swish, sigmoid and a depthwise
/// convolution, as in MobileNetV3.
fn se_graph() -> Model {
    let mut b = GraphBuilder::new([3, 10, 10]);
    b.conv("c1", 8, 3, 1, 1).bn("c1.bn").hardswish("c1.act");
    b.dwconv("dw", 3, 1, 1).bn("dw.bn").relu6("dw.act");
    b.global_avg_pool("se.pool")
        .linear("se.fc1", 4)
        .relu("se.relu")
        .linear("se.fc2", 8)
        .sigmoid("se.gate");
    b.mul("se.scale", &["dw.act", "se.gate"]);
    b.conv("c2", 6, 1, 1, 0).bn("c2.bn").relu("c2.relu");
    b.global_avg_pool("gap")
        .dropout("drop", 0.3)
        .linear("fc", 4);
    Model::init(b.build().unwrap(), 9, &Device::Cpu).unwrap()
}

/// Ops along the plane between convolutions, each channel's values its own: a slice of rows
/// (every other one), ELU, a norm within each channel (instance norm's), a softmax over the
/// columns, a max over the rows, and reshapes that keep the channels first.
fn per_channel_graph() -> Model {
    let mut b = GraphBuilder::new([3, 9, 8]);
    b.conv("c1", 6, 3, 1, 1).relu("c1.relu");
    let slice = Op::Slice {
        axis: 1,
        start: 1,
        end: 9,
        step: 2,
        backward: false,
    };
    b.push("rows", slice)
        .push("elu", Op::Unary(UnaryKind::Elu { alpha: 0.5 }))
        .push(
            "norm",
            Op::LayerNorm {
                from: 1,
                shape: vec![4, 8],
                eps: 1e-5,
            },
        )
        .push("soft", Op::SoftmaxAt { axis: 2 })
        .push(
            "top",
            Op::Reduce {
                kind: ReduceKind::Max,
                axes: vec![1],
                keep: true,
            },
        )
        .push("tokens", Op::Reshape { shape: vec![6, 8] })
        .push(
            "plane",
            Op::Reshape {
                shape: vec![6, 1, 8],
            },
        );
    b.conv("c2", 5, 1, 1, 0).relu("c2.relu");
    b.global_avg_pool("gap").linear("fc", 3);
    Model::init(b.build().unwrap(), 4, &Device::Cpu).unwrap()
}

/// Every zoo model and the two hand-built graphs, built once per test binary.
/// Grouped convolutions (AlexNet's and ResNeXt's): over one producer's channels (split per
/// group), over a concatenation whose parts are the groups, and after a residual sum.
fn grouped_graph() -> Model {
    let mut b = GraphBuilder::new([3, 10, 10]);
    b.conv("c1", 8, 3, 1, 1).bn("bn1").relu("r1");
    b.conv_with(
        "g1",
        Conv2dSpec::new(0, 12, 3).with_padding(1).with_groups(2),
    )
    .bn("bn2")
    .relu("r2");
    b.conv("a", 6, 1, 1, 0);
    b.at("r2").conv("b", 6, 1, 1, 0);
    b.concat("cat", &["a", "b"]);
    b.conv_with(
        "g2",
        Conv2dSpec::new(0, 8, 3).with_padding(1).with_groups(2),
    )
    .relu("r3");
    b.add("res", &["r3", "r1"]);
    b.conv_with(
        "g3",
        Conv2dSpec::new(0, 8, 1).with_groups(4).with_bias(true),
    );
    b.global_avg_pool("gap").linear("fc", 5);
    Model::init(b.build().unwrap(), 3, &Device::Cpu).unwrap()
}

/// ShuffleNet units: a grouped 1x1 convolution, a channel shuffle, a depthwise convolution
/// and a grouped 1x1 convolution, added to the unit's input; a strided unit whose shortcut is
/// pooled and concatenated; a shuffle of a concatenation (blocks of two segments), and a
/// shuffle straight after a dense convolution, flattened into a linear layer.
fn shuffle_graph() -> Model {
    let grouped = |out, groups| Conv2dSpec::new(0, out, 1).with_groups(groups);
    let shuffle = |groups| Op::ChannelShuffle { groups };
    let mut b = GraphBuilder::new([3, 12, 12]);
    b.conv("stem", 12, 3, 1, 1).bn("stem.bn").relu("stem.relu");
    b.conv_with("u1.g1", grouped(18, 3))
        .bn("u1.bn1")
        .relu("u1.r1")
        .push("u1.shuffle", shuffle(3))
        .dwconv("u1.dw", 3, 1, 1)
        .bn("u1.bn2")
        .conv_with("u1.g2", grouped(12, 3))
        .bn("u1.bn3");
    b.add("u1.add", &["u1.bn3", "stem.relu"]).relu("u1.out");
    b.conv_with("u2.g1", grouped(24, 2))
        .bn("u2.bn1")
        .relu("u2.r1")
        .push("u2.shuffle", shuffle(2))
        .dwconv("u2.dw", 3, 2, 1)
        .bn("u2.bn2")
        .conv_with("u2.g2", grouped(8, 4))
        .bn("u2.bn3");
    b.at("u1.out").avg_pool("u2.pool", 2, 2);
    b.concat("u2.cat", &["u2.pool", "u2.bn3"]).relu("u2.out");
    b.conv("a", 4, 1, 1, 0);
    b.at("u2.out").conv("b", 8, 1, 1, 0);
    b.concat("ab", &["a", "b"])
        .push("ab.shuffle", shuffle(2))
        .conv("c", 8, 3, 1, 1)
        .push("c.shuffle", shuffle(4))
        .flatten("flat")
        .linear("fc", 5);
    Model::init(b.build().unwrap(), 7, &Device::Cpu).unwrap()
}

fn models() -> &'static [(String, Model)] {
    static MODELS: std::sync::OnceLock<Vec<(String, Model)>> = std::sync::OnceLock::new();
    MODELS.get_or_init(build_models)
}

fn build_models() -> Vec<(String, Model)> {
    let mut v: Vec<(String, Model)> = zoo::NAMES
        .iter()
        .map(|n| {
            (
                n.to_string(),
                zoo::model(n, &ZooConfig::new(input_for(n)), 1, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    v.push(("concat".into(), concat_graph()));
    v.push(("squeeze-excite".into(), se_graph()));
    v.push(("grouped".into(), grouped_graph()));
    v.push(("per-channel".into(), per_channel_graph()));
    v.push(("shuffle".into(), shuffle_graph()));
    v
}

/// Makes running statistics and biases non-trivial, so that masking really matters.
fn perturb(model: &Model) {
    for (name, p) in model.params.iter() {
        let t = p.var.as_tensor();
        let noise = Tensor::rand(0.2f32, 1.0, t.dims(), t.device()).unwrap();
        if name.ends_with("running_var") || name.ends_with("bn.weight") {
            p.var.set(&noise).unwrap();
        } else if name.ends_with("bias") || name.ends_with("running_mean") {
            p.var.set(&(noise - 0.6).unwrap()).unwrap();
        }
    }
}

/// Zeroes the dropped channels of a group in every member: the reference for surgery.
fn mask(model: &Model, group: &ChannelGroup, keep: &[usize]) {
    for m in &group.members {
        let t = model.params.tensor(&m.param).unwrap();
        let mut along = vec![1f32; t.dims()[m.axis]];
        for k in (0..group.channels).filter(|k| !keep.contains(k)) {
            for j in 0..m.expand {
                along[m.index(k, j)] = 0.0;
            }
        }
        let mut shape = vec![1; t.rank()];
        shape[m.axis] = along.len();
        let mask = Tensor::from_vec(along, shape, t.device()).unwrap();
        model
            .params
            .set(&m.param, &t.broadcast_mul(&mask).unwrap())
            .unwrap();
    }
}

fn batch(model: &Model, n: usize) -> Tensor {
    let mut shape = vec![n];
    shape.extend(model.input_shape());
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = a.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f32::max)
}

fn check_zero_channels(model: &Model, picks: &[(usize, u64)]) -> Result<(), TestCaseError> {
    let model = model.deep_clone().unwrap();
    perturb(&model);
    let groups = channel_groups(&model.graph);
    let prunable: Vec<&ChannelGroup> = groups.prunable().collect();
    prop_assume!(!prunable.is_empty());
    let mut plan = Vec::new();
    for &(pick, bits) in picks {
        let g = prunable[pick % prunable.len()];
        if plan.iter().any(|(id, _)| *id == g.id) {
            continue;
        }
        // A pseudo-random keep-set from the bits, never empty.
        let mut keep: Vec<usize> = (0..g.channels)
            .filter(|k| (bits >> (k % 64)) & 1 == 1)
            .collect();
        if keep.is_empty() {
            keep.push((bits as usize) % g.channels);
        }
        mask(&model, g, &keep);
        plan.push((g.id, keep));
    }
    let pruned = groups.prune(&model, &plan).unwrap();
    let x = batch(&model, 2);
    let want = model.forward(&x, Mode::Eval).unwrap();
    let got = pruned.forward(&x, Mode::Eval).unwrap();
    let d = max_rel_diff(&want, &got);
    prop_assert!(d < 1e-4, "outputs differ by {d} after pruning {plan:?}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn pruning_zero_channels_leaves_outputs_unchanged(
        picks in proptest::collection::vec((0usize..1000, any::<u64>()), 1..4)
    ) {
        for (name, model) in models() {
            check_zero_channels(model, &picks).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
        }
    }
}

/// Channel shuffles pass channels through: the groups of the layers before them are
/// prunable (a shuffle's blocks unified, and, before a grouped convolution, cut into its
/// groups), and every one of them at once, a channel in three kept, gives exactly what the
/// masked original computes.
#[test]
fn channel_shuffles_pass_channels_through_as_a_permutation() {
    let model = shuffle_graph().deep_clone().unwrap();
    perturb(&model);
    let groups = channel_groups(&model.graph);
    for producer in ["u1.g1", "u2.g1", "a", "b", "c"] {
        let found = groups
            .groups
            .iter()
            .filter(|g| g.producers.iter().any(|p| p == producer))
            .collect::<Vec<_>>();
        assert!(
            !found.is_empty() && found.iter().all(|g| g.is_prunable()),
            "{producer}: {found:?}"
        );
    }
    // The convolution after a shuffle reads channel k of a block every `groups` channels.
    let strided = groups
        .groups
        .iter()
        .flat_map(|g| &g.members)
        .filter(|m| m.param == "c.weight" && m.axis == 1)
        .collect::<Vec<_>>();
    assert!(strided.iter().all(|m| m.stride == 2), "{strided:?}");
    let plan: Vec<(usize, Vec<usize>)> = groups
        .prunable()
        .map(|g| (g.id, (0..g.channels).filter(|k| k % 3 != 1).collect()))
        .collect();
    for (id, keep) in &plan {
        mask(&model, &groups.groups[*id], keep);
    }
    let pruned = groups.prune(&model, &plan).unwrap();
    let x = batch(&model, 2);
    let want = model.forward(&x, Mode::Eval).unwrap();
    let got = pruned.forward(&x, Mode::Eval).unwrap();
    let d = max_rel_diff(&want, &got);
    assert!(d < 1e-4, "outputs differ by {d} after pruning {plan:?}");
    assert!(analyze(&pruned.graph).macs < analyze(&model.graph).macs);
}

/// An add whose two sides' channel ranges do not line up (a concatenation of 4 and 8
/// channels plus a convolution's 12) has its spaces split until they do: every producer's
/// channels stay prunable, tied by position, and pruning them gives what the masked original
/// computes.
#[test]
fn adds_of_ranges_that_do_not_line_up_split_them_until_they_do() {
    let mut b = GraphBuilder::new([3, 8, 8]);
    b.conv("stem", 6, 3, 1, 1).relu("stem.relu");
    b.conv("a", 4, 1, 1, 0);
    b.at("stem.relu").conv("b", 8, 1, 1, 0);
    b.concat("ab", &["a", "b"]);
    b.at("stem.relu").conv("c", 12, 3, 1, 1);
    b.add("sum", &["ab", "c"])
        .relu("sum.relu")
        .conv("d", 5, 1, 1, 0)
        .global_avg_pool("gap")
        .linear("fc", 3);
    let model = Model::init(b.build().unwrap(), 4, &Device::Cpu).unwrap();
    perturb(&model);
    let groups = channel_groups(&model.graph);
    for producer in ["a", "b", "c"] {
        let of: Vec<&ChannelGroup> = groups
            .groups
            .iter()
            .filter(|g| g.producers.iter().any(|p| p == producer))
            .collect();
        assert!(
            !of.is_empty() && of.iter().all(|g| g.is_prunable() && g.channels == 4),
            "{producer}: {of:?}"
        );
    }
    let plan: Vec<(usize, Vec<usize>)> = groups
        .prunable()
        .map(|g| (g.id, (0..g.channels).filter(|k| k % 2 == 0).collect()))
        .collect();
    for (id, keep) in &plan {
        mask(&model, &groups.groups[*id], keep);
    }
    let pruned = groups.prune(&model, &plan).unwrap();
    let x = batch(&model, 2);
    let d = max_rel_diff(
        &model.forward(&x, Mode::Eval).unwrap(),
        &pruned.forward(&x, Mode::Eval).unwrap(),
    );
    assert!(d < 1e-4, "outputs differ by {d} after pruning {plan:?}");
    assert_eq!(pruned.graph.find("sum").unwrap().shape[0], 6);
}

#[test]
fn half_of_every_group_gives_a_valid_smaller_graph_with_predicted_macs() {
    for (name, model) in models() {
        let groups = channel_groups(&model.graph);
        let plan: Vec<(usize, Vec<usize>)> = groups
            .prunable()
            .map(|g| (g.id, (0..g.channels).step_by(2).collect()))
            .collect();
        assert!(!plan.is_empty(), "{name}: no prunable group");
        let kept: HashMap<usize, usize> = plan.iter().map(|(g, k)| (*g, k.len())).collect();
        let predicted = groups.predict_macs(&kept);
        let pruned = groups.prune(&model, &plan).unwrap();
        let before = analyze(&model.graph);
        let after = analyze(&pruned.graph);
        assert_eq!(after.macs, predicted, "{name}");
        assert!(
            after.macs < before.macs && after.params < before.params,
            "{name}"
        );
        assert_eq!(
            after.params as usize,
            pruned.params.trainable_count(),
            "{name}"
        );
        // The pruned model runs in both modes, and in train mode gives gradients.
        let x = batch(&pruned, 4);
        let y = pruned.forward(&x, Mode::Eval).unwrap();
        assert_eq!(y.dims()[0], 4);
        let loss = pruned
            .forward(&x, Mode::Train)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        loss.backward().unwrap();
        // The original is untouched.
        assert_eq!(
            model.graph,
            channel_groups(&model.graph)
                .prune(&model, &[])
                .unwrap()
                .graph
        );
    }
}

#[test]
fn ops_along_the_plane_pass_the_channels_through() {
    let m = per_channel_graph();
    let groups = channel_groups(&m.graph);
    let first = groups
        .groups
        .iter()
        .find(|g| g.producers.iter().any(|p| p == "c1"))
        .unwrap();
    assert!(first.is_prunable(), "{first}");
    // Pruning its channels (every other one) equals zeroing them in the original.
    let keep: Vec<usize> = (0..first.channels).step_by(2).collect();
    let masked = m.deep_clone().unwrap();
    perturb(&masked);
    let pruned_from = masked.deep_clone().unwrap();
    mask(&masked, first, &keep);
    mask(&pruned_from, first, &keep);
    let pruned = groups.prune(&pruned_from, &[(first.id, keep)]).unwrap();
    let x = batch(&m, 2);
    let d = max_rel_diff(
        &masked.forward(&x, Mode::Eval).unwrap(),
        &pruned.forward(&x, Mode::Eval).unwrap(),
    );
    assert!(d < 1e-5, "pruned differs from masked by {d}");
    assert_eq!(pruned.graph.find("c1").unwrap().shape[0], 3);
    assert_eq!(
        pruned.graph.find("tokens").unwrap().op,
        Op::Reshape { shape: vec![3, 8] }
    );
}

#[test]
fn residual_adds_unify_groups() {
    let m = zoo::model("resnet20", &ZooConfig::new([3, 32, 32]), 0, &Device::Cpu).unwrap();
    let groups = channel_groups(&m.graph);
    // Stage 1 of ResNet-20: the stem and the second conv of every block feed one residual
    // stream, so they are one group with 4 producers.
    let stream = groups
        .groups
        .iter()
        .find(|g| g.producers.iter().any(|p| p == "stem.conv"))
        .unwrap();
    assert_eq!(stream.producers.len(), 4, "{stream}");
    assert!(stream.is_prunable());
    // Each block's inner channels are a group of their own: 9 of them, plus 3 streams.
    assert_eq!(groups.prunable().count(), 12);
    assert!(groups
        .groups
        .iter()
        .any(|g| g.blocked.as_ref().is_some_and(|b| b.node == "fc")));
}

#[test]
fn blocked_groups_name_the_op() {
    // A grouped convolution whose groups cut through a producer's channels, and a softmax
    // over channels.
    let mut b = GraphBuilder::new([4, 8, 8]);
    b.conv("c1", 5, 3, 1, 1).relu("r1");
    b.at("r1").conv("c2", 3, 3, 1, 1);
    b.concat("cat", &["r1", "c2"]);
    b.conv_with(
        "grouped",
        Conv2dSpec::new(0, 8, 3).with_padding(1).with_groups(2),
    )
    .relu("r2");
    b.conv("c3", 6, 1, 1, 0)
        .softmax("attn")
        .conv("c4", 4, 1, 1, 0);
    b.global_avg_pool("gap").linear("fc", 3);
    let model = Model::init(b.build().unwrap(), 0, &Device::Cpu).unwrap();
    let groups = channel_groups(&model.graph);
    let of = |producer: &str| {
        groups
            .groups
            .iter()
            .find(|g| g.producers.iter().any(|p| p == producer))
            .unwrap()
    };
    let g1 = of("c1");
    let b1 = g1.blocked.as_ref().unwrap();
    assert_eq!((b1.node.as_str(), b1.op.as_str()), ("grouped", "conv2d"));
    assert!(b1.reason.contains("groups=2"), "{g1}");
    // The grouped convolution's own outputs: four channels, each pruned in both groups.
    let gg = of("grouped");
    assert!(gg.is_prunable() && gg.channels == 4, "{gg}");
    let offsets: Vec<usize> = gg
        .members
        .iter()
        .filter(|m| m.param == "grouped.weight" && m.axis == 0)
        .map(|m| m.offset)
        .collect();
    assert_eq!(offsets, [0, 4]);
    let g3 = of("c3");
    assert_eq!(g3.blocked.as_ref().unwrap().op, "softmax");
    assert!(g3.to_string().contains("`attn` (softmax)"), "{g3}");
    assert!(of("c4").is_prunable());
    // Pruning a blocked group is an error that names the blocker, and nothing changes.
    let mut m2 = model.deep_clone().unwrap();
    let e = m2.prune_channels(g3, &[0, 1]).unwrap_err().to_string();
    assert!(e.contains("attn"), "{e}");
    assert_eq!(m2.graph, model.graph);
}

/// A grouped convolution over one producer ties channel k of every group: pruning the
/// producer's group keeps the convolution's groups equal.
#[test]
fn grouped_convolutions_prune_every_group_alike() {
    let model = grouped_graph();
    let groups = channel_groups(&model.graph);
    let c1 = groups
        .groups
        .iter()
        .find(|g| g.producers.iter().any(|p| p == "c1"))
        .unwrap();
    // c1's 8 channels feed g1 (2 groups) and g3 (4 groups, through the residual sum): the
    // finest split, 2 channels repeated 4 times.
    assert!(c1.is_prunable() && c1.channels == 2, "{c1}");
    let mut pruned = model.deep_clone().unwrap();
    pruned.prune_channels(c1, &[1]).unwrap();
    let spec = |name: &str| match &pruned.graph.find(name).unwrap().op {
        Op::Conv2d(c) => c.clone(),
        _ => unreachable!(),
    };
    assert_eq!((spec("c1").out_channels, spec("g1").in_channels), (4, 4));
    assert_eq!((spec("g3").in_channels, spec("g3").groups), (4, 4));
    let x = batch(&model, 2);
    assert_eq!(pruned.forward(&x, Mode::Eval).unwrap().dims(), [2, 5]);
}

#[test]
fn bad_plans_are_errors_and_change_nothing() {
    let mut model = zoo::model("lenet", &ZooConfig::new([1, 28, 28]), 0, &Device::Cpu).unwrap();
    let groups = channel_groups(&model.graph);
    let g = groups.prunable().next().unwrap().clone();
    let before = model.graph.clone();
    for keep in [vec![], vec![0, g.channels]] {
        assert!(model.prune_channels(&g, &keep).is_err());
        assert_eq!(model.graph, before);
    }
    assert!(groups
        .prune(&model, &[(999, vec![0])])
        .unwrap_err()
        .to_string()
        .contains("999"));
    assert!(groups
        .prune(&model, &[(g.id, vec![0]), (g.id, vec![1])])
        .is_err());
    // Keeping channels 1 and 3 of conv1 (6 channels) leaves a 2-channel conv1.
    model.prune_channels(&g, &[1, 3]).unwrap();
    match &model.graph.find("conv1").unwrap().op {
        Op::Conv2d(c) => assert_eq!(c.out_channels, 2),
        op => panic!("{op:?}"),
    }
    // Groups computed before the surgery no longer apply.
    assert!(groups.prune(&model, &[]).is_err());
    let x = Tensor::zeros((1, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.forward(&x, Mode::Eval).unwrap().dims(), &[1, 10]);
}

/// A random valid graph from a seed: a stem, then two to six blocks drawn from plain, strided
/// and grouped convolutions with batch norm and any activation, depthwise convolutions,
/// residual additions, two-branch concatenations, squeeze-and-excite gates (HardSigmoid or
/// Sigmoid), pooling, dropout and identity; then a pooled or flattened linear head, sometimes
/// with a softmax.
fn random_model(seed: u64) -> Model {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let hw = rng.random_range(8..17);
    let mut b = GraphBuilder::new([rng.random_range(1..4), hw, hw]);
    b.conv("stem", rng.random_range(4..10), 3, 1, 1);
    let act = |b: &mut GraphBuilder, name: &str, r: u32| {
        match r % 6 {
            0 => b.relu(name),
            1 => b.relu6(name),
            2 => b.hardswish(name),
            3 => b.sigmoid(name),
            4 => b.hardsigmoid(name, 1.0 / 6.0, 0.5),
            _ => b.push(name, Op::Identity),
        };
    };
    for i in 0..rng.random_range(2..7) {
        let x = b.cursor().to_string();
        let shape = b.shape();
        let (c, s) = (shape[0], shape[1]);
        let p = format!("b{i}");
        match rng.random_range(0..9) {
            0 => {
                let (k, stride) = if s >= 6 && rng.random() {
                    (3, 2)
                } else {
                    (rng.random_range(0..2) * 2 + 1, 1)
                };
                b.conv(
                    &format!("{p}.conv"),
                    rng.random_range(3..12),
                    k,
                    stride,
                    k / 2,
                )
                .bn(&format!("{p}.bn"));
                act(&mut b, &format!("{p}.act"), rng.random());
            }
            1 => {
                b.dwconv(&format!("{p}.dw"), 3, 1, 1).bn(&format!("{p}.bn"));
                act(&mut b, &format!("{p}.act"), rng.random());
            }
            2 => {
                b.conv(&format!("{p}.conv"), c, 3, 1, 1)
                    .bn(&format!("{p}.bn"));
                let y = b.cursor().to_string();
                b.add(&format!("{p}.add"), &[&x, &y])
                    .relu(&format!("{p}.relu"));
            }
            3 => {
                b.conv(&format!("{p}.a"), rng.random_range(2..8), 1, 1, 0);
                let a = b.cursor().to_string();
                b.at(&x)
                    .conv(&format!("{p}.b"), rng.random_range(2..8), 3, 1, 1);
                let bb = b.cursor().to_string();
                b.concat(&format!("{p}.cat"), &[&a, &bb]);
            }
            4 => {
                b.global_avg_pool(&format!("{p}.pool"))
                    .linear(&format!("{p}.fc1"), (c / 2).max(1))
                    .relu(&format!("{p}.relu"))
                    .linear(&format!("{p}.fc2"), c);
                if rng.random() {
                    b.hardsigmoid(&format!("{p}.gate"), 0.2, 0.5);
                } else {
                    b.sigmoid(&format!("{p}.gate"));
                }
                let g = b.cursor().to_string();
                b.mul(&format!("{p}.scale"), &[&x, &g]);
            }
            5 if s >= 4 => {
                if rng.random() {
                    b.max_pool(&format!("{p}.pool"), 2, 2);
                } else {
                    b.avg_pool(&format!("{p}.pool"), 3, 1);
                }
            }
            6 if c % 2 == 0 => {
                b.conv_with(
                    &format!("{p}.grouped"),
                    Conv2dSpec::new(c, c, 3)
                        .with_groups(2)
                        .with_padding(1)
                        .with_bias(true),
                );
            }
            _ => {
                b.dropout(&format!("{p}.drop"), 0.2);
            }
        }
    }
    if rng.random() {
        b.global_avg_pool("head.pool");
    } else {
        b.flatten("head.flat");
    }
    b.linear("head.fc", rng.random_range(2..6));
    if rng.random() {
        b.softmax("head.prob");
    }
    Model::init(b.build().unwrap(), seed, &Device::Cpu).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_graphs_survive_files_analysis_grouping_and_surgery(
        seed in any::<u64>(),
        picks in proptest::collection::vec((0usize..1000, any::<u64>()), 1..4)
    ) {
        let model = random_model(seed);
        let x = batch(&model, 2);
        let y = model.forward(&x, Mode::Eval).unwrap();
        // A model file round trip keeps the function.
        let back = Model::from_bytes(&model.to_bytes().unwrap(), &Device::Cpu).unwrap();
        prop_assert_eq!(back.graph.to_def(), model.graph.to_def());
        prop_assert!(max_rel_diff(&y, &back.forward(&x, Mode::Eval).unwrap()) == 0.0);
        // Analysis counts something.
        let stats = analyze(&model.graph);
        prop_assert!(stats.macs > 0 && stats.params > 0);
        // Half of every prunable group removed: a valid, smaller graph with the same outputs'
        // shape.
        let groups = channel_groups(&model.graph);
        let plan: Vec<(usize, Vec<usize>)> = groups
            .prunable()
            .map(|g| (g.id, (0..g.channels.div_ceil(2)).collect()))
            .collect();
        if !plan.is_empty() {
            let half = groups.prune(&model, &plan).unwrap();
            let z = half.forward(&x, Mode::Eval).unwrap();
            prop_assert_eq!(z.dims(), y.dims());
            prop_assert!(analyze(&half.graph).macs < stats.macs);
        }
        // Zeroed channels pruned away leave the outputs unchanged.
        check_zero_channels(&model, &picks)?;
    }
}
