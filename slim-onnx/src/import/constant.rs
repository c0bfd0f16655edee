//! Constants at import: tensors read from the file, and what exporters compute from them
//! (shape arithmetic, weights filled from a shape), folded before any Slim node exists.

use super::*;

impl Builder {
    /// Which entries of a folded constant hold the batch size, when an input held it.
    pub(super) fn batch_flags(&self, n: &NodeProto, a: &Attrs, out: &Const) -> Option<Vec<bool>> {
        let flags: Vec<Option<&Vec<bool>>> = n.input.iter().map(|i| self.batchy.get(i)).collect();
        if flags.iter().all(|f| f.is_none_or(|f| !f.contains(&true))) {
            return None;
        }
        let of = |i: usize| -> Vec<bool> {
            match flags.get(i).copied().flatten() {
                Some(f) => f.clone(),
                None => {
                    let len = self.raw_const(n, i).map_or(0, |c| c.numel());
                    vec![false; len]
                }
            }
        };
        let all = vec![true; out.numel()];
        let picked = match n.op_type.as_str() {
            "Identity" | "Cast" | "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" => of(0),
            "Concat" => (0..n.input.len()).flat_map(of).collect(),
            "Gather" => {
                let f = of(0);
                let idx = self.raw_const(n, 1)?.ints();
                idx.iter()
                    .map(|&i| {
                        let j = if i < 0 { i + f.len() as i64 } else { i };
                        f.get(j as usize).copied().unwrap_or(true)
                    })
                    .collect()
            }
            "Slice" => {
                let f = of(0);
                let (s, e) = if self.opset < 10 {
                    let get = |k: &str| a.ints(k).and_then(|v| v.first().copied());
                    (get("starts"), get("ends"))
                } else {
                    let get =
                        |i: usize| self.raw_const(n, i).and_then(|c| c.ints().first().copied());
                    (get(1), get(2))
                };
                let len = f.len() as i64;
                let clamp = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) };
                let (s, e) = (clamp(s.unwrap_or(0)), clamp(e.unwrap_or(len)));
                f[s as usize..e.max(s) as usize].to_vec()
            }
            "Mul" | "Add" | "Sub" | "Div" => {
                let (x, y) = (of(0), of(1));
                (0..out.numel())
                    .map(|i| {
                        x.get(if x.len() == 1 { 0 } else { i })
                            .copied()
                            .unwrap_or(true)
                            || y.get(if y.len() == 1 { 0 } else { i })
                                .copied()
                                .unwrap_or(true)
                    })
                    .collect()
            }
            _ => all.clone(),
        };
        Some(if picked.len() == out.numel() {
            picked
        } else {
            all
        })
    }

    /// A constant input, without the batch-size check (folding propagates that).
    pub(super) fn raw_const(&self, n: &NodeProto, i: usize) -> Option<Const> {
        match self.values.get(n.input.get(i)?)? {
            Value::Const(c) => Some(c.clone()),
            Value::Node(_) => None,
        }
    }

    /// True when every input of `n` is a constant of integer type.
    pub(super) fn int_typed(&self, n: &NodeProto) -> bool {
        n.input
            .iter()
            .filter(|s| !s.is_empty())
            .all(|i| self.ints.contains(i))
    }

    /// Evaluates a node whose inputs are all constants, when it is one of the shape ops.
    pub(super) fn fold(&self, n: &NodeProto, a: &Attrs) -> Result<Option<Const>> {
        let c = |i| self.konst(n, i);
        Ok(Some(match n.op_type.as_str() {
            "Identity" => c(0)?,
            "Cast" => {
                let mut x = c(0)?;
                let to = a.int("to").unwrap_or(0);
                if to == i64::from(data_type::BOOL) {
                    x.values
                        .iter_mut()
                        .for_each(|v| *v = f64::from(u8::from(*v != 0.0)));
                } else if !cast_keeps_floats(to) {
                    // Integer types: toward zero, as C casts.
                    x.values.iter_mut().for_each(|v| *v = v.trunc());
                }
                x
            }
            "Reshape" => {
                let x = c(0)?;
                let shape = c(1)?.ints();
                let full = resolve_shape(&x.dims, &shape)?;
                Const {
                    dims: full,
                    values: x.values,
                }
            }
            "Unsqueeze" => {
                let x = c(0)?;
                let axes = self.axes(n, a)?.unwrap_or_default();
                let rank = (x.dims.len() + axes.len()) as i64;
                let mut axes: Vec<usize> = axes
                    .iter()
                    .map(|&ax| if ax < 0 { ax + rank } else { ax } as usize)
                    .collect();
                axes.sort();
                let mut dims = x.dims.clone();
                for ax in axes {
                    if ax > dims.len() {
                        return err(format!("axis {ax} out of range"));
                    }
                    dims.insert(ax, 1);
                }
                Const {
                    dims,
                    values: x.values,
                }
            }
            "Squeeze" => {
                let x = c(0)?;
                let axes = self.axes(n, a)?;
                Const {
                    dims: squeeze_dims(&x.dims, axes.as_deref())?,
                    values: x.values,
                }
            }
            "Concat" => {
                let parts: Vec<Const> = (0..n.input.len()).map(c).collect::<Result<_>>()?;
                if parts.iter().any(|p| p.dims.len() > 1) {
                    return err("Concat of constants of rank above 1 is not supported");
                }
                let values: Vec<f64> = parts
                    .iter()
                    .flat_map(|p| p.values.iter().copied())
                    .collect();
                Const {
                    dims: vec![values.len()],
                    values,
                }
            }
            "Gather" => {
                let x = c(0)?;
                let idx = c(1)?;
                let axis = a.int("axis").unwrap_or(0);
                if axis != 0 || x.dims.len() != 1 {
                    return err("Gather of constants other than from a vector along axis 0");
                }
                let len = x.dims[0] as i64;
                let mut values = Vec::with_capacity(idx.numel());
                for i in idx.ints() {
                    let j = if i < 0 { i + len } else { i };
                    if !(0..len).contains(&j) {
                        return err(format!("index {i} out of range for {len} values"));
                    }
                    values.push(x.values[j as usize]);
                }
                Const {
                    dims: idx.dims.clone(),
                    values,
                }
            }
            "Slice" => {
                let x = c(0)?;
                if x.dims.len() != 1 {
                    return err("Slice of constants other than vectors");
                }
                let (starts, ends, steps) = if self.opset < 10 {
                    (
                        a.ints("starts").unwrap_or_default(),
                        a.ints("ends").unwrap_or_default(),
                        vec![1],
                    )
                } else {
                    (
                        c(1)?.ints(),
                        c(2)?.ints(),
                        self.opt_const(n, 4)?.map(|s| s.ints()).unwrap_or(vec![1]),
                    )
                };
                let (Some(&s), Some(&e), Some(&st)) = (starts.first(), ends.first(), steps.first())
                else {
                    return err("Slice without starts and ends");
                };
                if st != 1 {
                    return err("Slice of constants with a step other than 1");
                }
                let len = x.dims[0] as i64;
                let clampi = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) };
                let (s, e) = (clampi(s), clampi(e));
                let values: Vec<f64> = if s < e {
                    x.values[s as usize..e as usize].to_vec()
                } else {
                    vec![]
                };
                Const {
                    dims: vec![values.len()],
                    values,
                }
            }
            "ConstantOfShape" => {
                let shape = c(0)?.ints();
                let dims = sizes("ConstantOfShape's shape", &shape, 0)
                    .ok()
                    .filter(|d| {
                        slim_core::graph::elements(d)
                            .is_some_and(|n| n <= slim_core::graph::MAX_ELEMENTS)
                    })
                    .ok_or_else(|| {
                        OnnxError::Model(format!(
                            "ConstantOfShape of shape {shape:?} is beyond Slim's limits"
                        ))
                    })?;
                let value = match a.tensor("value") {
                    Some(t) => {
                        let v = Const::from_proto(t)?;
                        if v.numel() != 1 {
                            return err(format!("its value holds {} elements, not one", v.numel()));
                        }
                        v.values[0]
                    }
                    None => 0.0,
                };
                let n = slim_core::graph::elements(&dims).unwrap_or(0);
                let left = self.generated_left.get();
                if n > left {
                    return err(format!(
                        "ConstantOfShape of shape {shape:?} ({n} values) exceeds the {left} values the import may still generate"
                    ));
                }
                self.generated_left.set(left - n);
                Const {
                    dims,
                    values: vec![value; n],
                }
            }
            "Transpose" => {
                let x = c(0)?;
                let rank = x.dims.len();
                let perm: Vec<usize> = match a.ints("perm") {
                    Some(p) => p.iter().map(|&v| v as usize).collect(),
                    None => (0..rank).rev().collect(),
                };
                let mut sorted = perm.clone();
                sorted.sort_unstable();
                if sorted != (0..rank).collect::<Vec<_>>() {
                    return err(format!("perm {perm:?} for a constant of rank {rank}"));
                }
                transpose_nd(&x, &perm)
            }
            "Shape" => {
                let x = c(0)?;
                let (s, e) = shape_range(a, x.dims.len());
                Const {
                    dims: vec![e - s],
                    values: x.dims[s..e].iter().map(|&d| d as f64).collect(),
                }
            }
            "Mul" | "Add" | "Sub" | "Div" => {
                let (x, y) = (c(0)?, c(1)?);
                let ints = self.int_typed(n);
                let f = |p: f64, q: f64| match n.op_type.as_str() {
                    "Mul" => p * q,
                    "Add" => p + q,
                    "Sub" => p - q,
                    // Shape arithmetic divides integers (toward zero).
                    _ if ints => (p / q).trunc(),
                    _ => p / q,
                };
                if x.numel() == y.numel() {
                    Const {
                        dims: x.dims.clone(),
                        values: x
                            .values
                            .iter()
                            .zip(&y.values)
                            .map(|(&p, &q)| f(p, q))
                            .collect(),
                    }
                } else if y.numel() == 1 {
                    Const {
                        dims: x.dims.clone(),
                        values: x.values.iter().map(|&p| f(p, y.values[0])).collect(),
                    }
                } else if x.numel() == 1 {
                    Const {
                        dims: y.dims.clone(),
                        values: y.values.iter().map(|&q| f(x.values[0], q)).collect(),
                    }
                } else {
                    return Ok(None);
                }
            }
            _ => return Ok(None),
        }))
    }
}

/// A constant tensor, values held as f64 (exact for f32, int8 and the int64 shape values
/// exporters compute).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Const {
    pub dims: Vec<usize>,
    pub values: Vec<f64>,
}

impl Const {
    pub(super) fn from_proto(t: &TensorProto) -> Result<Const> {
        let bad = |m: String| OnnxError::Model(format!("tensor `{}`: {m}", t.name));
        if t.data_location == 1 || !t.external_data.is_empty() {
            return Err(bad(
                "its data is in an external file; import the model from its file, beside its data"
                    .into(),
            ));
        }
        let mut dims = Vec::with_capacity(t.dims.len());
        for &d in &t.dims {
            if d < 0 {
                return Err(bad(format!("negative dimension {d}")));
            }
            dims.push(d as usize);
        }
        let n = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 31)
            .ok_or_else(|| bad(format!("dimensions {dims:?} are too large")))?;
        let raw = &t.raw_data;
        let values: Vec<f64> = match t.data_type {
            data_type::FLOAT if !raw.is_empty() => le_chunks::<4>(raw, n, &bad)?
                .map(|c| f64::from(f32::from_le_bytes(c)))
                .collect(),
            data_type::FLOAT => t.float_data.iter().map(|&v| f64::from(v)).collect(),
            data_type::DOUBLE if !raw.is_empty() => le_chunks::<8>(raw, n, &bad)?
                .map(f64::from_le_bytes)
                .collect(),
            data_type::DOUBLE => t.double_data.clone(),
            data_type::INT64 if !raw.is_empty() => le_chunks::<8>(raw, n, &bad)?
                .map(|c| i64::from_le_bytes(c) as f64)
                .collect(),
            data_type::INT64 => t.int64_data.iter().map(|&v| v as f64).collect(),
            data_type::INT32 if !raw.is_empty() => le_chunks::<4>(raw, n, &bad)?
                .map(|c| f64::from(i32::from_le_bytes(c)))
                .collect(),
            data_type::INT32 | data_type::INT8 | data_type::UINT8 if raw.is_empty() => {
                t.int32_data.iter().map(|&v| f64::from(v)).collect()
            }
            data_type::INT8 => raw.iter().map(|&v| f64::from(v as i8)).collect(),
            data_type::UINT8 => raw.iter().map(|&v| f64::from(v)).collect(),
            other => {
                return Err(bad(format!(
                    "element type {} is not supported",
                    data_type::name(other)
                )))
            }
        };
        if values.len() != n {
            return Err(bad(format!(
                "holds {} values, its dimensions {dims:?} need {n}",
                values.len()
            )));
        }
        Ok(Const { dims, values })
    }

    pub(super) fn numel(&self) -> usize {
        self.values.len()
    }

    pub(super) fn scalar(v: f64) -> Const {
        Const {
            dims: vec![],
            values: vec![v],
        }
    }

    pub(super) fn ints(&self) -> Vec<i64> {
        self.values.iter().map(|&v| v as i64).collect()
    }

    pub(super) fn f32s(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }

    /// The values as one per channel, when the shape broadcasts that way over `[N, C, ...]`
    /// (or over `[N, C]` for a feature vector): `[C]`, `[C, 1, 1]`, `[1, C, 1, 1]`, `[1, C]`;
    /// a scalar gives `channels` copies.
    pub(super) fn per_channel(&self, channels: usize, rank: usize) -> Option<Vec<f64>> {
        if self.numel() == 1 {
            return Some(vec![self.values[0]; channels]);
        }
        if self.numel() != channels {
            return None;
        }
        let non_one: Vec<usize> = self
            .dims
            .iter()
            .enumerate()
            .filter(|(_, &d)| d != 1)
            .map(|(i, _)| i)
            .collect();
        // Broadcasting aligns trailing axes: the channel axis of an ONNX value of rank
        // `rank + 1` sits `rank` places from the end.
        let from_end = self.dims.len() - non_one.first().copied()?;
        (from_end == rank && self.dims.len() <= rank + 1).then(|| self.values.clone())
    }
}

pub(super) fn le_chunks<'a, const K: usize>(
    raw: &'a [u8],
    n: usize,
    bad: &dyn Fn(String) -> OnnxError,
) -> Result<impl Iterator<Item = [u8; K]> + 'a> {
    if raw.len() != n * K {
        return Err(bad(format!(
            "raw data has {} bytes, {n} values need {}",
            raw.len(),
            n * K
        )));
    }
    Ok(raw.chunks_exact(K).map(|c| std::array::from_fn(|i| c[i])))
}

pub(super) fn transpose(w: &Const) -> Const {
    let (r, c) = (w.dims[0], w.dims[1]);
    let mut values = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            values[j * r + i] = w.values[i * c + j];
        }
    }
    Const {
        dims: vec![c, r],
        values,
    }
}

/// The `start..end` of a Shape (opset 15), clamped to a rank.
pub(super) fn shape_range(a: &Attrs, rank: usize) -> (usize, usize) {
    let r = rank as i64;
    let clamp = |v: i64| if v < 0 { (v + r).max(0) } else { v.min(r) } as usize;
    let s = clamp(a.int("start").unwrap_or(0));
    let e = clamp(a.int("end").unwrap_or(r));
    (s, e.max(s))
}

/// True for ONNX element types that hold floats: a Cast to them leaves Slim's values as
/// they are.
pub(super) fn cast_keeps_floats(to: i64) -> bool {
    [
        data_type::FLOAT,
        data_type::DOUBLE,
        data_type::FLOAT16,
        data_type::BFLOAT16,
    ]
    .contains(&(to as i32))
}

/// The axes of a constant permuted: axis `i` of the result is axis `perm[i]` of `x`.
pub(super) fn transpose_nd(x: &Const, perm: &[usize]) -> Const {
    let dims: Vec<usize> = perm.iter().map(|&p| x.dims[p]).collect();
    let mut strides = vec![1usize; x.dims.len()];
    for i in (0..x.dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * x.dims[i + 1];
    }
    let mut values = Vec::with_capacity(x.numel());
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..x.numel() {
        let src: usize = idx.iter().zip(perm).map(|(&i, &p)| i * strides[p]).sum();
        values.push(x.values[src]);
        for ax in (0..dims.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < dims[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    Const { dims, values }
}

/// A constant's new dimensions under a Reshape (0 copies, -1 is inferred).
pub(super) fn resolve_shape(dims: &[usize], shape: &[i64]) -> Result<Vec<usize>> {
    let too_large = || OnnxError::Model(format!("reshape of {dims:?} to {shape:?} is too large"));
    let total = slim_core::graph::elements(dims).ok_or_else(too_large)?;
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            0 => out.push(
                *dims
                    .get(i)
                    .ok_or_else(|| OnnxError::Model("reshape copies a missing axis".into()))?,
            ),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            s if s > 0 => out.push(s as usize),
            s => return err(format!("reshape to a dimension of {s}")),
        }
    }
    let known = slim_core::graph::elements(&out).ok_or_else(too_large)?;
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return err(format!("cannot reshape {dims:?} to {shape:?}"));
        }
        out[i] = total / known;
    }
    if slim_core::graph::elements(&out) != Some(total) {
        return err(format!("cannot reshape {dims:?} to {shape:?}"));
    }
    Ok(out)
}

/// A data value's per-sample shape under a Reshape whose first entry is the batch axis,
/// whatever the exporter wrote there (1, 0, -1 or a fixed batch size).
pub(super) fn resolve_reshape(onnx: &[usize], shape: &[i64]) -> Result<Vec<usize>> {
    let Some((_, rest)) = shape.split_first() else {
        return err("reshape to a scalar");
    };
    let mut dims = vec![1];
    dims.extend_from_slice(onnx);
    let mut target = vec![1i64];
    target.extend(rest.iter().map(|&v| if v == 0 { 0 } else { v }));
    let out = resolve_shape(&dims, &target)?;
    Ok(out[1..].to_vec())
}

pub(super) fn squeeze_dims(dims: &[usize], axes: Option<&[i64]>) -> Result<Vec<usize>> {
    let rank = dims.len() as i64;
    match axes {
        None => Ok(dims.iter().copied().filter(|&d| d != 1).collect()),
        Some(axes) => {
            let axes: Vec<usize> = axes
                .iter()
                .map(|&a| if a < 0 { a + rank } else { a } as usize)
                .collect();
            for &a in &axes {
                if dims.get(a) != Some(&1) {
                    return err(format!("squeeze of axis {a} of shape {dims:?}"));
                }
            }
            Ok(dims
                .iter()
                .enumerate()
                .filter(|(i, _)| !axes.contains(i))
                .map(|(_, &d)| d)
                .collect())
        }
    }
}
