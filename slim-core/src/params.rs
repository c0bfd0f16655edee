//! Parameters: a store of candle `Var`s under stable dotted names (`block3.dw.weight`).
//!
//! A name is `<node>.<role>`; the roles are `weight` and `bias` (trained) and `running_mean`
//! and `running_var` (buffers, updated by execution in train mode, never by an optimizer).
//! Selections take a pattern where `*` matches any run of characters and `?` one character,
//! so `layer1.*.weight` or `*.bias` pick parameters the way a user would say it.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::error::{CoreError, Result};
use crate::graph::ParamKind;

/// One stored parameter.
#[derive(Clone, Debug)]
pub struct Param {
    pub var: Var,
    pub kind: ParamKind,
}

/// Named parameters, kept sorted by name.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    entries: BTreeMap<String, Param>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a parameter.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        tensor: &Tensor,
        kind: ParamKind,
    ) -> Result<()> {
        let var = Var::from_tensor(tensor)?;
        self.entries.insert(name.into(), Param { var, kind });
        Ok(())
    }

    /// Removes a parameter, returning it.
    pub fn remove(&mut self, name: &str) -> Option<Param> {
        self.entries.remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.entries.get(name)
    }
    pub fn var(&self, name: &str) -> Option<&Var> {
        self.entries.get(name).map(|p| &p.var)
    }

    /// The current value of a parameter, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.var(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| CoreError::param(name, "no such parameter"))
    }

    /// Replaces a parameter's value in place (same shape), keeping the `Var` identity.
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let var = self
            .var(name)
            .ok_or_else(|| CoreError::param(name, "no such parameter"))?;
        if var.dims() != value.dims() {
            return Err(CoreError::param(
                name,
                format!(
                    "new value has shape {:?}, expected {:?}",
                    value.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(value)?;
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Param)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Names matching a pattern (`*` any run, `?` one character), in sorted order.
    pub fn select(&self, pattern: &str) -> Vec<&str> {
        self.names()
            .filter(|n| matches_pattern(pattern, n))
            .collect()
    }

    /// The `Var`s an optimizer should update (weights and biases, not buffers).
    pub fn trainable(&self) -> Vec<Var> {
        self.entries
            .values()
            .filter(|p| p.kind.is_trainable())
            .map(|p| p.var.clone())
            .collect()
    }

    /// Number of scalars in trainable parameters.
    pub fn trainable_count(&self) -> usize {
        self.entries
            .values()
            .filter(|p| p.kind.is_trainable())
            .map(|p| p.var.elem_count())
            .sum()
    }

    /// A deep copy: new `Var`s holding copies of the values, so training one copy leaves the
    /// other untouched.
    pub fn deep_clone(&self) -> Result<ParamStore> {
        let mut out = ParamStore::new();
        for (name, p) in &self.entries {
            out.insert(name.clone(), &p.var.as_tensor().copy()?, p.kind)?;
        }
        Ok(out)
    }
}

/// Glob matching with `*` (any run, possibly empty) and `?` (exactly one character).
pub fn matches_pattern(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with backtracking to the last star: linear in practice.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches_pattern("*.weight", "block1.conv.weight"));
        assert!(matches_pattern("block?.conv.*", "block3.conv.bias"));
        assert!(!matches_pattern("block?.conv.*", "block10.conv.bias"));
        assert!(matches_pattern("*", ""));
        assert!(matches_pattern("a*b*c", "axxbyyc"));
        assert!(!matches_pattern("a*b*c", "axxbyy"));
        assert!(matches_pattern("conv1.weight", "conv1.weight"));
        assert!(!matches_pattern("conv1", "conv1.weight"));
    }
}
