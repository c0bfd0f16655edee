//! Quantization-aware training: prepared, trained with fake-quantized weights and
//! activations, converted to an int8 model that the int8 runtime runs.

use candle_core::Device;
use slim_core::data::{load_spec, DataSplits, DEFAULT_SPEC};
use slim_core::train::{evaluate, train, TrainConfig, TrainOptions};
use slim_core::zoo::{self, ZooConfig};
use slim_core::Op;
use slim_quant::ptq::{quantize, PtqConfig};
use slim_quant::qat::{convert, prepare, QatKernels};
use slim_quant::quantizer::WeightQuant;

/// A LeNet trained for an epoch on the first `images` digits, the data (500 test images),
/// per-channel calibration over `batches`, and its PTQ int8 model's top-1.
fn trained(images: usize, batches: usize) -> (slim_core::Model, DataSplits, PtqConfig, f64) {
    let mut data = load_spec(DEFAULT_SPEC).unwrap();
    data.train = data.train.take(images);
    data.test = data.test.take(500);
    let mut m = zoo::model("lenet", &ZooConfig::new([1, 28, 28]), 0, &Device::Cpu).unwrap();
    let base = TrainConfig::default().with_epochs(1).with_lr(0.003);
    train(&mut m, &data, &base, Default::default(), &mut |_| {}).unwrap();
    let cfg = PtqConfig {
        weights: WeightQuant::ChannelWiseAbsMax,
        batches,
        ..PtqConfig::default()
    };
    let (ptq, _) = quantize(&m, &data.train, &data.normalize, &cfg).unwrap();
    let ptq_top1 = slim_quant::runtime::evaluate(&ptq, &data.test, &data.normalize, 250)
        .unwrap()
        .top1;
    (m, data, cfg, ptq_top1)
}

#[test]
fn qat_trains_converts_and_at_least_matches_ptq() {
    let (m, data, cfg, ptq_top1) = trained(2000, 4);

    let mut q = prepare(&m, &data.train, &data.normalize, &cfg).unwrap();
    let fq: Vec<String> = q
        .graph
        .nodes()
        .iter()
        .filter(|n| matches!(&n.op, Op::FakeQuant(s) if s.moving_rate > 0.0))
        .map(|n| n.param_name("scale"))
        .collect();
    assert_eq!(
        fq.len(),
        5,
        "one fake-quantization node per convolution and linear layer"
    );
    let before: Vec<f32> = fq
        .iter()
        .map(|n| q.params.tensor(n).unwrap().to_vec1::<f32>().unwrap()[0])
        .collect();
    let kernels = QatKernels {
        weights: cfg.weights,
        bits: 8,
    };
    let ft = TrainConfig::default().with_epochs(1).with_lr(0.0005);
    train(
        &mut q,
        &data,
        &ft,
        TrainOptions {
            kernels: Some(&kernels),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    let after: Vec<f32> = fq
        .iter()
        .map(|n| q.params.tensor(n).unwrap().to_vec1::<f32>().unwrap()[0])
        .collect();
    assert_ne!(before, after, "the activation scales follow the batches");

    let int8 = convert(&q, cfg.weights, 8).unwrap();
    assert_eq!(int8.int8.len(), 5);
    let qat_top1 = slim_quant::runtime::evaluate(&int8, &data.test, &data.normalize, 250)
        .unwrap()
        .top1;
    let sim = evaluate(&int8, &data.test, &data.normalize, 250)
        .unwrap()
        .top1;
    assert!(
        (qat_top1 - sim).abs() <= 0.005,
        "runtime {qat_top1} vs graph {sim}"
    );
    assert!(
        qat_top1 >= ptq_top1 - 0.01,
        "QAT {qat_top1} vs PTQ {ptq_top1}"
    );
    let back = slim_core::Model::from_bytes(&int8.to_bytes().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(back.int8, int8.int8);
}

/// With `range_abs_max` the activation scales follow the largest of the last batches while
/// training, the converted model keeps no window, says how it was made, and stays as accurate
/// as PTQ; a window of 0 or an unknown quantizer is refused by name.
#[test]
fn range_abs_max_trains_and_converts_without_its_window() {
    use slim_quant::qat::{prepare_with, ActivationScale};
    let (m, data, cfg, ptq_top1) = trained(1024, 2);
    let act = ActivationScale::Range { window: 4 };
    let mut q = prepare_with(&m, &data.train, &data.normalize, &cfg, act).unwrap();
    let ring = q
        .graph
        .nodes()
        .iter()
        .find(|n| matches!(&n.op, Op::FakeQuant(s) if s.window == 4))
        .map(|n| n.param_name("window_step"))
        .expect("a fake quantizer with a window of 4");
    let kernels = QatKernels {
        weights: cfg.weights,
        bits: 8,
    };
    let ft = TrainConfig::default().with_epochs(1).with_lr(0.0005);
    let opts = TrainOptions {
        kernels: Some(&kernels),
        ..Default::default()
    };
    train(&mut q, &data, &ft, opts, &mut |_| {}).unwrap();
    let steps = q.params.tensor(&ring).unwrap().to_vec1::<f32>().unwrap()[0];
    // The calibrated scale, then one per training batch (1024 images, batches of 64).
    assert_eq!(steps, 17.0);
    let int8 = convert(&q, cfg.weights, 8).unwrap();
    assert!(int8.params.names().all(|n| !n.contains("window")));
    assert!(int8.provenance["quantization"].contains("range_abs_max"));
    let top1 = slim_quant::runtime::evaluate(&int8, &data.test, &data.normalize, 250)
        .unwrap()
        .top1;
    assert!(top1 >= ptq_top1 - 0.01, "QAT {top1} vs PTQ {ptq_top1}");
    let e = ActivationScale::parse("range_abs_max", 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("window_size 0"), "{e}");
    let e = ActivationScale::parse("kl", 10).unwrap_err().to_string();
    assert!(e.contains("`kl`"), "{e}");
}
