//! The loss of training without labels: a model learns to reproduce a reference model (its
//! original, before compression) on the training images. Every output the two share by
//! position is compared: score vectors by cross-entropy against the reference's softmax (soft
//! labels at temperature 1), any other shape (maps, boxes, embeddings) by mean squared error.

use candle_core::{Tensor, D};

use crate::data::Batch;
use crate::error::{CoreError, Result};
use crate::exec::{ForwardOptions, ForwardOutput, Mode};
use crate::model::Model;
use crate::train::LossTerm;

/// A [`LossTerm`] that pulls a model's outputs towards a reference model's.
pub struct Reproduce {
    reference: Model,
    fingerprint: String,
}

impl Reproduce {
    /// `reference` runs in evaluation mode beside the model being trained.
    pub fn new(reference: Model) -> Result<Reproduce> {
        let fingerprint = format!("reproduce:{}", reference.fingerprint()?);
        Ok(Reproduce {
            reference,
            fingerprint,
        })
    }
}

impl LossTerm for Reproduce {
    fn name(&self) -> &str {
        "reproduce"
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn loss(&mut self, batch: &Batch, out: &ForwardOutput) -> Result<Tensor> {
        let want = self
            .reference
            .forward_with(
                std::slice::from_ref(&batch.images),
                Mode::Eval,
                ForwardOptions::default(),
            )?
            .outputs;
        let mut total: Option<Tensor> = None;
        for (i, (y, r)) in out.outputs.iter().zip(&want).enumerate() {
            if y.dims() != r.dims() {
                return Err(CoreError::Invalid(format!(
                    "output {} has shape {:?}, the model it reproduces gives {:?}",
                    i + 1,
                    y.dims(),
                    r.dims()
                )));
            }
            let r = r.detach();
            let term = if y.rank() == 2 {
                // Cross-entropy of the model's scores against the reference's softmax.
                let p = candle_nn::ops::softmax(&r, D::Minus1)?;
                let log_q = candle_nn::ops::log_softmax(y, D::Minus1)?;
                (p * log_q)?.sum(D::Minus1)?.mean_all()?.neg()?
            } else {
                (y - r)?.sqr()?.mean_all()?
            };
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        total.ok_or_else(|| CoreError::Invalid("the model has no output to reproduce".into()))
    }
}
