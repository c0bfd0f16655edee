//! The model zoo: LeNet-5, VGG-11/16 (with batch norm), ResNet-20/56 (CIFAR style),
//! ResNet-18/50 (ImageNet style; 50 with bottlenecks), MobileNet V1 and V2 with a width
//! multiplier, and `mobilenet_tiny`, for 1x28x28, 3x32x32 and 3x224x224 inputs; and
//! `segnet_tiny`, a small encoder-decoder with a per-pixel output (`[classes, H, W]`) for
//! dense prediction, trained by reproducing another model (it has no class scores to learn
//! from labels).
//!
//! Inputs of at most 64 pixels get the small-image variant of each network (a 3x3 stride-1
//! stem and no stem pooling, as for CIFAR), larger inputs the ImageNet one. Parameter names
//! follow the PyTorch state-dict style (`layer1.0.conv1.weight`).

use candle_core::Device;

use crate::error::{CoreError, Result};
use crate::graph::{
    Conv2dSpec, ConvTransposeSpec, CoordMode, Graph, GraphBuilder, NearestRounding, Op, PoolSpec,
    ResizeMode, ResizeSpec,
};
use crate::model::Model;

/// Every model name the zoo knows.
pub const NAMES: &[&str] = &[
    "lenet",
    "vgg11",
    "vgg16",
    "resnet20",
    "resnet56",
    "resnet18",
    "resnet50",
    "mobilenet_v1",
    "mobilenet_v2",
    "mobilenet_tiny",
    "segnet_tiny",
];

/// Which variant of a zoo model to build.
#[derive(Clone, Debug, PartialEq)]
pub struct ZooConfig {
    /// Width multiplier on every layer's channels (1.0 is the published network).
    pub width: f64,
    /// Input shape `[C, H, W]`.
    pub input: [usize; 3],
    /// Number of classes.
    pub classes: usize,
}

impl ZooConfig {
    /// Width 1 and the usual number of classes for the input: 1000 for large inputs
    /// (ImageNet), 10 for small ones (MNIST, CIFAR-10).
    pub fn new(input: [usize; 3]) -> Self {
        let classes = if input[1] > 64 { 1000 } else { 10 };
        ZooConfig {
            width: 1.0,
            input,
            classes,
        }
    }
    pub fn with_width(mut self, width: f64) -> Self {
        self.width = width;
        self
    }
    pub fn with_classes(mut self, classes: usize) -> Self {
        self.classes = classes;
        self
    }
    /// Whether the input gets the small-image variant (at most 64 pixels high).
    pub fn small(&self) -> bool {
        self.input[1] <= 64
    }
    /// `c` channels times the width multiplier, rounded, at least 1.
    pub fn scale(&self, c: usize) -> usize {
        ((c as f64 * self.width).round() as usize).max(1)
    }
}

/// Builds the graph of a zoo model.
pub fn build(name: &str, cfg: &ZooConfig) -> Result<Graph> {
    if !(cfg.width > 0.0 && cfg.width <= 8.0) {
        return Err(CoreError::Invalid(format!(
            "width {} is out of range (0, 8]",
            cfg.width
        )));
    }
    if cfg.classes == 0 {
        return Err(CoreError::Invalid(
            "the number of classes must be at least 1".into(),
        ));
    }
    let g = match name {
        "lenet" => lenet(cfg),
        "vgg11" => vgg(cfg, &VGG11),
        "vgg16" => vgg(cfg, &VGG16),
        "resnet20" => resnet_cifar(cfg, 3),
        "resnet56" => resnet_cifar(cfg, 9),
        "resnet18" => resnet_imagenet(cfg, [2, 2, 2, 2], false),
        "resnet50" => resnet_imagenet(cfg, [3, 4, 6, 3], true),
        "mobilenet_v1" => mobilenet_v1(cfg),
        "mobilenet_v2" => mobilenet_v2(cfg),
        "mobilenet_tiny" => mobilenet_tiny(cfg),
        "segnet_tiny" => segnet_tiny(cfg),
        _ => {
            return Err(CoreError::Invalid(format!(
                "unknown zoo model `{name}` (known: {})",
                NAMES.join(", ")
            )))
        }
    };
    g.map_err(|e| CoreError::Invalid(format!("{name} does not fit input {:?}: {e}", cfg.input)))
}

/// Builds a zoo model with freshly initialized, seeded parameters.
pub fn model(name: &str, cfg: &ZooConfig, seed: u64, device: &Device) -> Result<Model> {
    let mut m = Model::init(build(name, cfg)?, seed, device)?;
    m.provenance.insert("zoo".into(), name.into());
    m.provenance.insert("width".into(), cfg.width.to_string());
    let [c, h, w] = cfg.input;
    m.provenance.insert("input".into(), format!("{c}x{h}x{w}"));
    Ok(m)
}

/// Convolution + batch norm (+ activation), named `<p>.conv`, `<p>.bn`, `<p>.<act>`.
fn cba(b: &mut GraphBuilder, p: &str, spec: Conv2dSpec, act: Option<Op>) {
    b.conv_with(&format!("{p}.conv"), spec)
        .bn(&format!("{p}.bn"));
    if let Some(a) = act {
        let n = format!("{p}.{}", a.kind());
        b.push(&n, a);
    }
}

fn k(out: usize, kernel: usize, stride: usize) -> Conv2dSpec {
    Conv2dSpec::new(0, out, kernel)
        .with_stride(stride)
        .with_padding(kernel / 2)
}

fn dw(c: usize, kernel: usize, stride: usize) -> Conv2dSpec {
    Conv2dSpec::new(c, c, kernel)
        .with_stride(stride)
        .with_padding(kernel / 2)
        .with_groups(c)
}

fn lenet(cfg: &ZooConfig) -> Result<Graph> {
    let mut b = GraphBuilder::new(cfg.input);
    b.conv_with(
        "conv1",
        Conv2dSpec::new(0, cfg.scale(6), 5)
            .with_padding(2)
            .with_bias(true),
    )
    .relu("relu1")
    .max_pool("pool1", 2, 2)
    .conv_with(
        "conv2",
        Conv2dSpec::new(0, cfg.scale(16), 5).with_bias(true),
    )
    .relu("relu2")
    .max_pool("pool2", 2, 2)
    .flatten("flatten")
    .linear("fc1", cfg.scale(120))
    .relu("relu3")
    .linear("fc2", cfg.scale(84))
    .relu("relu4")
    .linear("fc3", cfg.classes);
    b.build()
}

const M: usize = 0;
const VGG11: [usize; 13] = [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M];
const VGG16: [usize; 18] = [
    64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M,
];

fn vgg(cfg: &ZooConfig, layers: &[usize]) -> Result<Graph> {
    let mut b = GraphBuilder::new(cfg.input);
    let (mut stage, mut j) = (1, 1);
    for &c in layers {
        if c == M {
            // Small inputs skip a pooling that would leave less than one pixel.
            if b.shape().get(1).is_some_and(|&h| h >= 2) {
                b.max_pool(&format!("block{stage}.pool"), 2, 2);
            }
            stage += 1;
            j = 1;
        } else {
            cba(
                &mut b,
                &format!("block{stage}.{j}"),
                k(cfg.scale(c), 3, 1),
                Some(Op::Relu),
            );
            j += 1;
        }
    }
    if cfg.small() {
        b.global_avg_pool("avgpool").linear("fc", cfg.classes);
    } else {
        let hidden = cfg.scale(4096);
        b.flatten("flatten")
            .linear("fc1", hidden)
            .relu("fc1.relu")
            .dropout("fc1.dropout", 0.5)
            .linear("fc2", hidden)
            .relu("fc2.relu")
            .dropout("fc2.dropout", 0.5)
            .linear("fc3", cfg.classes);
    }
    b.build()
}

/// A residual block (basic: two 3x3; bottleneck: 1x1, 3x3, 1x1 with expansion 4), with a
/// 1x1 convolution + batch norm on the shortcut when the shape changes.
fn residual(b: &mut GraphBuilder, p: &str, planes: usize, stride: usize, bottleneck: bool) {
    let input = b.cursor().to_string();
    let in_c = b.shape()[0];
    let out_c = if bottleneck { planes * 4 } else { planes };
    if bottleneck {
        cba(b, &format!("{p}.1"), k(planes, 1, 1), Some(Op::Relu));
        cba(b, &format!("{p}.2"), k(planes, 3, stride), Some(Op::Relu));
        cba(b, &format!("{p}.3"), k(out_c, 1, 1), None);
    } else {
        cba(b, &format!("{p}.1"), k(planes, 3, stride), Some(Op::Relu));
        cba(b, &format!("{p}.2"), k(out_c, 3, 1), None);
    }
    let main = b.cursor().to_string();
    let short = if stride != 1 || in_c != out_c {
        b.at(&input);
        cba(b, &format!("{p}.downsample"), k(out_c, 1, stride), None);
        b.cursor().to_string()
    } else {
        input
    };
    b.add(&format!("{p}.add"), &[&main, &short])
        .relu(&format!("{p}.relu"));
}

/// One stage of a ResNet: `blocks` residual blocks of `planes` channels (times 4 at the
/// output of a bottleneck), the first with `stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResStage {
    pub planes: usize,
    pub blocks: usize,
    pub stride: usize,
}

/// A ResNet of the given stages (channels taken as they are: the width multiplier is not
/// applied to them) after a stem of `stem` channels: 3x3 stride 1 for small inputs, 7x7
/// stride 2 and a max pooling for large ones. Stage `i` is named `layer{i+1}`.
pub fn resnet_with(
    cfg: &ZooConfig,
    stem: usize,
    stages: &[ResStage],
    bottleneck: bool,
) -> Result<Graph> {
    let mut b = GraphBuilder::new(cfg.input);
    if cfg.small() {
        cba(&mut b, "stem", k(stem, 3, 1), Some(Op::Relu));
    } else {
        cba(&mut b, "stem", k(stem, 7, 2), Some(Op::Relu));
        b.push("stem.maxpool", Op::MaxPool2d(PoolSpec::new(3, 2, 1)));
    }
    for (i, st) in stages.iter().enumerate() {
        for j in 0..st.blocks {
            let stride = if j == 0 { st.stride } else { 1 };
            residual(
                &mut b,
                &format!("layer{}.{j}", i + 1),
                st.planes,
                stride,
                bottleneck,
            );
        }
    }
    b.global_avg_pool("avgpool").linear("fc", cfg.classes);
    b.build()
}

/// The stages of a CIFAR-style ResNet with `n` blocks per stage (ResNet-20: 3), widened.
pub fn resnet_cifar_stages(cfg: &ZooConfig, n: usize) -> Vec<ResStage> {
    [16, 32, 64]
        .into_iter()
        .enumerate()
        .map(|(i, planes)| ResStage {
            planes: cfg.scale(planes),
            blocks: n,
            stride: if i > 0 { 2 } else { 1 },
        })
        .collect()
}

/// The stages of an ImageNet-style ResNet with `blocks` per stage (ResNet-18: 2, 2, 2, 2).
pub fn resnet_imagenet_stages(cfg: &ZooConfig, blocks: [usize; 4]) -> Vec<ResStage> {
    blocks
        .iter()
        .zip([64, 128, 256, 512])
        .enumerate()
        .map(|(i, (&n, planes))| ResStage {
            planes: cfg.scale(planes),
            blocks: n,
            stride: if i > 0 { 2 } else { 1 },
        })
        .collect()
}

fn resnet_cifar(cfg: &ZooConfig, n: usize) -> Result<Graph> {
    resnet_with(cfg, cfg.scale(16), &resnet_cifar_stages(cfg, n), false)
}

fn resnet_imagenet(cfg: &ZooConfig, blocks: [usize; 4], bottleneck: bool) -> Result<Graph> {
    resnet_with(
        cfg,
        cfg.scale(64),
        &resnet_imagenet_stages(cfg, blocks),
        bottleneck,
    )
}

/// Depthwise-separable block: depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU.
fn separable(b: &mut GraphBuilder, p: &str, out: usize, stride: usize) {
    let c = b.shape()[0];
    cba(b, &format!("{p}.dw"), dw(c, 3, stride), Some(Op::Relu));
    cba(b, &format!("{p}.pw"), k(out, 1, 1), Some(Op::Relu));
}

/// The published MobileNetV1's blocks: (output channels, stride) of each depthwise-separable
/// block, before the width multiplier.
pub const MOBILENET_V1_BLOCKS: [(usize, usize); 13] = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
];

/// A MobileNetV1 with a stem of `stem` channels and the given depthwise-separable blocks
/// (output channels, stride), channels taken as they are. Block `i` is named `block{i+1}`.
pub fn mobilenet_v1_with(cfg: &ZooConfig, stem: usize, blocks: &[(usize, usize)]) -> Result<Graph> {
    let mut b = GraphBuilder::new(cfg.input);
    cba(
        &mut b,
        "stem",
        k(stem, 3, if cfg.small() { 1 } else { 2 }),
        Some(Op::Relu),
    );
    for (i, &(c, s)) in blocks.iter().enumerate() {
        separable(&mut b, &format!("block{}", i + 1), c, s);
    }
    b.global_avg_pool("avgpool").linear("fc", cfg.classes);
    b.build()
}

fn mobilenet_v1(cfg: &ZooConfig) -> Result<Graph> {
    let blocks: Vec<(usize, usize)> = MOBILENET_V1_BLOCKS
        .iter()
        .map(|&(c, s)| (cfg.scale(c), s))
        .collect();
    mobilenet_v1_with(cfg, cfg.scale(32), &blocks)
}

fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut n = ((v + d / 2.0) / d).floor() as usize * divisor;
    n = n.max(divisor);
    if (n as f64) < 0.9 * v {
        n += divisor;
    }
    n
}

/// One stage of a MobileNetV2: `repeats` inverted-residual blocks with the given expansion,
/// depthwise kernel and output channels, the first with `stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V2Stage {
    pub expansion: usize,
    pub channels: usize,
    pub repeats: usize,
    pub stride: usize,
    pub kernel: usize,
}

/// The published MobileNetV2's stages for this input and width (small inputs keep the
/// 24-channel stage at full resolution, as CIFAR variants do).
pub fn mobilenet_v2_stages(cfg: &ZooConfig) -> Vec<V2Stage> {
    [
        (1, 16, 1, 1),
        (6, 24, 2, if cfg.small() { 1 } else { 2 }),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    .into_iter()
    .map(|(expansion, c, repeats, stride)| V2Stage {
        expansion,
        channels: v2_channels(cfg, c),
        repeats,
        stride,
        kernel: 3,
    })
    .collect()
}

/// Channels of a MobileNetV2 layer: the width multiplier applied, rounded to a multiple of 8.
pub fn v2_channels(cfg: &ZooConfig, c: usize) -> usize {
    make_divisible(c as f64 * cfg.width, 8)
}

/// A MobileNetV2 with a stem of `stem` channels, the given stages and a head of `head`
/// channels. Blocks are numbered across stages (`block1`, `block2`, ...).
pub fn mobilenet_v2_with(
    cfg: &ZooConfig,
    stem: usize,
    stages: &[V2Stage],
    head: usize,
) -> Result<Graph> {
    let mut b = GraphBuilder::new(cfg.input);
    cba(
        &mut b,
        "stem",
        k(stem, 3, if cfg.small() { 1 } else { 2 }),
        Some(Op::Relu6),
    );
    let mut idx = 1;
    for st in stages {
        for r in 0..st.repeats {
            let stride = if r == 0 { st.stride } else { 1 };
            let p = format!("block{idx}");
            let input = b.cursor().to_string();
            let in_c = b.shape()[0];
            let out = st.channels;
            if st.expansion != 1 {
                cba(
                    &mut b,
                    &format!("{p}.expand"),
                    k(in_c * st.expansion, 1, 1),
                    Some(Op::Relu6),
                );
            }
            let hidden = b.shape()[0];
            cba(
                &mut b,
                &format!("{p}.dw"),
                dw(hidden, st.kernel, stride),
                Some(Op::Relu6),
            );
            cba(&mut b, &format!("{p}.project"), k(out, 1, 1), None);
            if stride == 1 && in_c == out {
                let main = b.cursor().to_string();
                b.add(&format!("{p}.add"), &[&main, &input]);
            }
            idx += 1;
        }
    }
    cba(&mut b, "head", k(head, 1, 1), Some(Op::Relu6));
    b.global_avg_pool("avgpool")
        .dropout("dropout", 0.2)
        .linear("fc", cfg.classes);
    b.build()
}

/// The head's channels of a MobileNetV2 of this width.
pub fn mobilenet_v2_head(cfg: &ZooConfig) -> usize {
    if cfg.width > 1.0 {
        v2_channels(cfg, 1280)
    } else {
        1280
    }
}

fn mobilenet_v2(cfg: &ZooConfig) -> Result<Graph> {
    mobilenet_v2_with(
        cfg,
        v2_channels(cfg, 32),
        &mobilenet_v2_stages(cfg),
        mobilenet_v2_head(cfg),
    )
}

fn mobilenet_tiny(cfg: &ZooConfig) -> Result<Graph> {
    let mut b = GraphBuilder::new(cfg.input);
    cba(&mut b, "stem", k(cfg.scale(16), 3, 1), Some(Op::Relu));
    for (i, (c, s)) in [(32, 1), (64, 2), (128, 2), (128, 1)]
        .into_iter()
        .enumerate()
    {
        separable(&mut b, &format!("block{}", i + 1), cfg.scale(c), s);
    }
    b.global_avg_pool("avgpool").linear("fc", cfg.classes);
    b.build()
}

/// A small encoder-decoder for dense prediction: two stride-2 stages down, a transposed
/// convolution up (with a skip connection added from the encoder) and a nearest resize up,
/// then a 1x1 convolution to `classes` scores per pixel. The input's height and width must
/// be multiples of 4.
fn segnet_tiny(cfg: &ZooConfig) -> Result<Graph> {
    let [_, h, w] = cfg.input;
    if h % 4 != 0 || w % 4 != 0 {
        return Err(CoreError::Invalid(format!(
            "segnet_tiny needs a height and width that are multiples of 4, not {h}x{w}"
        )));
    }
    let (c1, c2, c3) = (cfg.scale(16), cfg.scale(32), cfg.scale(64));
    let mut b = GraphBuilder::new(cfg.input);
    cba(&mut b, "enc1", k(c1, 3, 1), Some(Op::Relu));
    cba(&mut b, "enc2", k(c2, 3, 2), Some(Op::Relu));
    cba(&mut b, "enc3", k(c3, 3, 2), Some(Op::Relu));
    let up = ConvTransposeSpec {
        in_channels: c3,
        out_channels: c2,
        kernel: [2, 2],
        stride: [2, 2],
        pads: [0; 4],
        output_padding: [0, 0],
        dilation: 1,
        groups: 1,
        bias: false,
    };
    b.push("dec1.up", Op::ConvTranspose2d(up))
        .bn("dec1.bn")
        .add("dec1.skip", &["dec1.bn", "enc2.bn"])
        .relu("dec1.relu");
    b.push(
        "dec2.resize",
        Op::Resize(ResizeSpec {
            out: [h, w],
            scale: [2.0, 2.0],
            mode: ResizeMode::Nearest(NearestRounding::Floor),
            coord: CoordMode::Asymmetric,
            antialias: false,
            crop: None,
        }),
    );
    cba(&mut b, "dec2", k(c1, 3, 1), Some(Op::Relu));
    b.conv_with("head", Conv2dSpec::new(0, cfg.classes, 1).with_bias(true));
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyze;

    fn within(actual: u64, expected: f64, tol: f64) -> bool {
        ((actual as f64 - expected) / expected).abs() <= tol
    }

    #[test]
    fn published_totals_at_224() {
        // (name, MACs, params) as published for the ImageNet networks.
        let cases = [
            ("resnet50", 4.1e9, 25.6e6),
            ("mobilenet_v1", 569e6, 4.2e6),
            ("mobilenet_v2", 300e6, 3.5e6),
            ("vgg16", 15.5e9, 138e6),
            ("resnet18", 1.82e9, 11.7e6),
        ];
        for (name, macs, params) in cases {
            let s = analyze(&build(name, &ZooConfig::new([3, 224, 224])).unwrap());
            assert!(
                within(s.macs, macs, 0.02),
                "{name}: {} MACs, expected {macs}",
                s.macs
            );
            assert!(
                within(s.params, params, 0.02),
                "{name}: {} params, expected {params}",
                s.params
            );
        }
    }

    #[test]
    fn every_model_builds_for_every_input() {
        for name in NAMES {
            for input in [[1, 28, 28], [3, 32, 32]] {
                let g = build(name, &ZooConfig::new(input)).unwrap();
                let want = if *name == "segnet_tiny" {
                    vec![10, input[1], input[2]]
                } else {
                    vec![10]
                };
                assert_eq!(g.node(g.outputs()[0]).shape, want, "{name} {input:?}");
            }
        }
        let e = build("segnet_tiny", &ZooConfig::new([1, 30, 30])).unwrap_err();
        assert!(e.to_string().contains("multiples of 4"), "{e}");
        let g = build("resnet20", &ZooConfig::new([3, 32, 32])).unwrap();
        assert!(within(analyze(&g).params, 0.27e6, 0.02));
        let e = build("resnet7", &ZooConfig::new([3, 32, 32]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("resnet7") && e.contains("resnet20"), "{e}");
        let e = build("lenet", &ZooConfig::new([1, 28, 28]).with_width(0.0)).unwrap_err();
        assert!(e.to_string().contains("width"));
    }
}
