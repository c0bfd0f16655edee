//! Quantization from start to end, as `slim quant` and the pipeline's `quant.*` stages run it:
//! [`ptq`] calibrates and quantizes, [`qat`] fine-tunes with fake-quantization and converts;
//! both measure the int8 model, on the int8 runtime, against the float one (accuracy on the
//! labels, or without them its fidelity to the float model).

use serde::Serialize;
use slim_core::compare::{measure, Comparison, Figures};
use slim_core::data::DataSplits;
use slim_core::pipeline::Finetuning;
use slim_core::train::{evaluate, Fidelity, Progress, TrainReport};
use slim_core::Model;

use crate::ptq::{quantize, PtqConfig, PtqReport};
use crate::qat::QatSettings;
use crate::runtime::{forward_with, Int8Kernels};
use crate::Result;

/// The int8 model beside the float one it came from.
#[derive(Clone, Debug, Serialize)]
pub struct QuantOutcome {
    /// The float model and the int8 one (its accuracy from the int8 runtime); bytes as the
    /// caller fills them in, from the files.
    pub before: Figures,
    pub after: Figures,
    /// Post-training quantization on labels: the top-1 of the fake-quantized float graph,
    /// the reference the int8 runtime is checked against.
    pub simulated_top1: Option<f64>,
    /// Without labels: the int8 model's fidelity to the float one.
    pub fidelity: Option<Fidelity>,
    /// Post-training quantization's calibration.
    pub calibration: Option<PtqReport>,
    /// Quantization-aware training's epochs.
    pub train: Option<TrainReport>,
}

impl QuantOutcome {
    /// The float-against-int8 table (`label` names the int8 column): top-1, or the fidelity
    /// rows without labels, and bytes.
    pub fn table(&self, label: &str) -> String {
        let mut t = Comparison::new(["f32", label], &self.before, &self.after)
            .fidelity(self.fidelity.as_ref())
            .without_cost()
            .table();
        if let Some(f) = &self.fidelity {
            t += &format!(
                "no labels: the int8 model (int8 runtime) against the float one on {} held-out \
                 images\n",
                f.samples
            );
        }
        t
    }
}

/// The int8 model `q` measured against `model` on `data`'s test split, by the int8 runtime.
fn outcome(model: &Model, q: &Model, data: &DataSplits, label_free: bool) -> Result<QuantOutcome> {
    let kernels = Int8Kernels::new(q);
    let m = measure(
        q,
        model,
        data,
        label_free,
        Some(&|m, x| forward_with(m, &kernels, x)),
    )?;
    Ok(QuantOutcome {
        before: Figures::of(model, m.before.as_ref()),
        after: Figures::of(q, m.after.as_ref()),
        simulated_top1: None,
        fidelity: m.fidelity,
        calibration: None,
        train: None,
    })
}

/// Post-training quantization: calibrated on `data`'s training split, measured on its test
/// split (with labels, also the fake-quantized float graph's top-1).
pub fn ptq(model: &Model, data: &DataSplits, cfg: &PtqConfig) -> Result<(Model, QuantOutcome)> {
    let (q, report) = quantize(model, &data.train, &data.normalize, cfg)?;
    let mut o = outcome(model, &q, data, false)?;
    if o.fidelity.is_none() {
        o.simulated_top1 = Some(evaluate(&q, &data.test, &data.normalize, 256)?.top1);
    }
    o.calibration = Some(report);
    Ok((q, o))
}

/// Quantization-aware training ([`train_int8`]), then the int8 model measured against the
/// float one.
pub fn qat(
    model: &Model,
    data: &DataSplits,
    settings: &QatSettings,
    how: &Finetuning<'_>,
    label_free: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Model, QuantOutcome)> {
    let (int8, report) = train_int8(model, data, settings, how, label_free, progress)?;
    let mut o = outcome(model, &int8, data, label_free)?;
    o.train = Some(report);
    Ok((int8, o))
}

/// Quantization-aware training alone: fake-quantization calibrated on `data`, trained as
/// `how` says (its recipe; on the labels, or without them, `label_free`, to reproduce the
/// float model), converted to int8. For a caller that measures models itself (a pipeline).
pub fn train_int8(
    model: &Model,
    data: &DataSplits,
    settings: &QatSettings,
    how: &Finetuning<'_>,
    label_free: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Model, TrainReport)> {
    let mut q = crate::qat::prepare_with(
        model,
        &data.train,
        &data.normalize,
        &settings.calibration,
        settings.activations,
    )?;
    let kernels = crate::qat::QatKernels {
        weights: settings.weights,
        bits: 8,
    };
    let how = Finetuning {
        kernels: Some(&kernels),
        ..how.clone()
    };
    let report = how.run(&mut q, model, data, label_free, progress)?;
    Ok((crate::qat::convert(&q, settings.weights, 8)?, report))
}
