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

    /// Counts a folded constant of `dims` made from inputs of `from` values against the
    /// values the import may still generate, when it is larger.
    pub(super) fn charge(&self, dims: &[usize], from: usize) -> Result<()> {
        let count = slim_core::graph::elements(dims)
            .filter(|&n| n <= slim_core::graph::MAX_ELEMENTS)
            .ok_or_else(|| {
                OnnxError::Model(format!(
                    "a constant of shape {dims:?} is beyond Slim's limits"
                ))
            })?;
        if count > from {
            let left = self.generated_left.get();
            if count > left {
                return err(format!(
                    "a constant of shape {dims:?} ({count} values) exceeds the {left} values the import may still generate"
                ));
            }
            self.generated_left.set(left - count);
        }
        Ok(())
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
            "Cast" => self.cast_const(n, a)?,
            "Reshape" => {
                let x = c(0)?;
                let shape = c(1)?.ints();
                let full = resolve_shape(&x.dims, &shape)?;
                Const {
                    dims: full,
                    values: x.values,
                }
            }
            "Unsqueeze" => self.unsqueeze_const(n, a)?,
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
                concat(&parts, a.int("axis").unwrap_or(0))?
            }
            "Gather" => gather(&c(0)?, &c(1)?, a.int("axis").unwrap_or(0))?,
            "Slice" => self.slice_const(n, a)?,
            // An Expand over the batch (its shape read from the data's) makes a constant node.
            "Expand" if n.input.get(1).is_some_and(|i| self.batchy.contains_key(i)) => {
                return Ok(None)
            }
            "Expand" => self.expand_const(n)?,
            "Sqrt" | "Reciprocal" | "Neg" | "Relu" | "Sigmoid" | "Tanh" | "Round" => {
                self.unary_const(n)?
            }
            "ConstantOfShape" => self.constant_of_shape(n, a)?,
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
            "Mul" | "Add" | "Sub" | "Div" | "Pow" => self.binary_const(n)?,
            "Max" | "Min" if n.input.len() == 2 => self.binary_const(n)?,
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
            data_type::BOOL if !raw.is_empty() => raw.iter().map(|&v| f64::from(v)).collect(),
            data_type::INT16 if !raw.is_empty() => le_chunks::<2>(raw, n, &bad)?
                .map(|c| f64::from(i16::from_le_bytes(c)))
                .collect(),
            data_type::UINT16 if !raw.is_empty() => le_chunks::<2>(raw, n, &bad)?
                .map(|c| f64::from(u16::from_le_bytes(c)))
                .collect(),
            data_type::FLOAT16 if !raw.is_empty() => le_chunks::<2>(raw, n, &bad)?
                .map(|c| f16_value(u16::from_le_bytes(c)))
                .collect(),
            data_type::BFLOAT16 if !raw.is_empty() => le_chunks::<2>(raw, n, &bad)?
                .map(|c| bf16_value(u16::from_le_bytes(c)))
                .collect(),
            // Without raw data, the 16-bit types (and bool) are held in `int32_data`, the
            // floats as their bits.
            data_type::BOOL | data_type::INT16 | data_type::UINT16 => {
                t.int32_data.iter().map(|&v| f64::from(v)).collect()
            }
            data_type::FLOAT16 => t.int32_data.iter().map(|&v| f16_value(v as u16)).collect(),
            data_type::BFLOAT16 => t.int32_data.iter().map(|&v| bf16_value(v as u16)).collect(),
            data_type::UINT32 if !raw.is_empty() => le_chunks::<4>(raw, n, &bad)?
                .map(|c| f64::from(u32::from_le_bytes(c)))
                .collect(),
            data_type::UINT64 if !raw.is_empty() => le_chunks::<8>(raw, n, &bad)?
                .map(|c| u64::from_le_bytes(c) as f64)
                .collect(),
            data_type::UINT32 | data_type::UINT64 => {
                t.uint64_data.iter().map(|&v| v as f64).collect()
            }
            // 8-bit floats: a byte each in the raw data, else in `int32_data`.
            other if Float8::of_onnx(other).is_some() => {
                let format = Float8::of_onnx(other).unwrap_or(Float8::E5M2);
                let bytes: Vec<u8> = if raw.is_empty() {
                    t.int32_data.iter().map(|&v| v as u8).collect()
                } else {
                    raw.clone()
                };
                bytes
                    .iter()
                    .map(|&b| f64::from(format.from_bits(b)))
                    .collect()
            }
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

/// An IEEE half-precision float from its bits.
fn f16_value(bits: u16) -> f64 {
    let sign = if bits >> 15 == 1 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f64::from(bits & 0x3ff);
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// A bfloat16 from its bits: the upper half of an f32's.
fn bf16_value(bits: u16) -> f64 {
    f64::from(f32::from_bits(u32::from(bits) << 16))
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

/// `x` with only the positions `picks` of `axis`, in that order.
fn take(x: &Const, axis: usize, picks: &[usize]) -> Const {
    let outer: usize = x.dims[..axis].iter().product();
    let inner: usize = x.dims[axis + 1..].iter().product();
    let len = x.dims[axis];
    let mut values = Vec::with_capacity(outer * picks.len() * inner);
    for o in 0..outer {
        for &p in picks {
            let at = (o * len + p) * inner;
            values.extend_from_slice(&x.values[at..at + inner]);
        }
    }
    let mut dims = x.dims.clone();
    dims[axis] = picks.len();
    Const { dims, values }
}

/// An axis of a rank-`rank` constant, negative counting from the end.
fn const_axis(axis: i64, rank: usize) -> Result<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if !(0..rank as i64).contains(&a) {
        return err(format!("axis {axis} of a constant of rank {rank}"));
    }
    Ok(a as usize)
}

/// ONNX Gather of a constant: `indices` (any shape) take the place of `axis`.
fn gather(x: &Const, indices: &Const, axis: i64) -> Result<Const> {
    let axis = const_axis(axis, x.dims.len())?;
    let len = x.dims[axis] as i64;
    let picks = indices
        .ints()
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + len } else { i };
            if (0..len).contains(&j) {
                Ok(j as usize)
            } else {
                err(format!("index {i} out of range for an axis of {len}"))
            }
        })
        .collect::<Result<Vec<usize>>>()?;
    let taken = take(x, axis, &picks);
    let mut dims = x.dims[..axis].to_vec();
    dims.extend(&indices.dims);
    dims.extend(&x.dims[axis + 1..]);
    Ok(Const {
        dims,
        values: taken.values,
    })
}

/// ONNX Slice of a constant: on `axes` (default the first ones), with steps of either sign.
fn slice(x: &Const, [starts, ends, axes, steps]: &[Vec<i64>; 4]) -> Result<Const> {
    let mut out = x.clone();
    for (k, &axis) in axes.iter().enumerate() {
        let axis = const_axis(axis, x.dims.len())?;
        let len = x.dims[axis] as i64;
        let step = steps[k];
        if step == 0 {
            return err("Slice with a step of 0");
        }
        let at = |v: i64| if v < 0 { v.saturating_add(len) } else { v };
        if len == 0 {
            continue;
        }
        let (start, end) = if step > 0 {
            (at(starts[k]).clamp(0, len), at(ends[k]).clamp(0, len))
        } else {
            (
                at(starts[k]).clamp(0, len - 1),
                at(ends[k]).clamp(-1, len - 1),
            )
        };
        let mut picks = Vec::new();
        let mut i = start;
        while (step > 0 && i < end) || (step < 0 && i > end) {
            picks.push(i as usize);
            i += step;
        }
        out = take(&out, axis, &picks);
    }
    Ok(out)
}

/// ONNX Concat of constants along `axis`.
fn concat(parts: &[Const], axis: i64) -> Result<Const> {
    // Scalars among vectors count as vectors of one (some exporters write them so).
    let vectors = parts.iter().all(|p| p.dims.len() <= 1);
    let parts: Vec<Const> = parts
        .iter()
        .map(|p| Const {
            dims: if vectors {
                vec![p.numel()]
            } else {
                p.dims.clone()
            },
            values: p.values.clone(),
        })
        .collect();
    let Some(first) = parts.first() else {
        return err("Concat of nothing");
    };
    let rank = first.dims.len();
    let axis = const_axis(axis, rank)?;
    for p in &parts {
        let same =
            p.dims.len() == rank && (0..rank).all(|i| i == axis || p.dims[i] == first.dims[i]);
        if !same {
            return err(format!(
                "Concat on axis {axis} of constants of shapes {:?} and {:?}",
                first.dims, p.dims
            ));
        }
    }
    let outer: usize = first.dims[..axis].iter().product();
    let mut values = Vec::with_capacity(parts.iter().map(Const::numel).sum());
    for o in 0..outer {
        for p in &parts {
            let chunk = p.numel() / outer.max(1);
            values.extend_from_slice(&p.values[o * chunk..(o + 1) * chunk]);
        }
    }
    let mut dims = first.dims.clone();
    dims[axis] = parts.iter().map(|p| p.dims[axis]).sum();
    Ok(Const { dims, values })
}

/// Folds of single ops (from [`Builder::fold`]).
impl Builder {
    fn cast_const(&self, n: &NodeProto, a: &Attrs) -> Result<Const> {
        let c = |i| self.konst(n, i);
        let mut x = c(0)?;
        let to = a.int("to").unwrap_or(0);
        if to == i64::from(data_type::BOOL) {
            x.values
                .iter_mut()
                .for_each(|v| *v = f64::from(u8::from(*v != 0.0)));
        } else if let Some(format) = Float8::of_onnx(to as i32) {
            let saturate = a.int("saturate").unwrap_or(1) != 0;
            x.values
                .iter_mut()
                .for_each(|v| *v = f64::from(format.round(*v as f32, saturate)));
        } else if !cast_keeps_floats(to) {
            // Integer types: toward zero, as C casts.
            x.values.iter_mut().for_each(|v| *v = v.trunc());
        }
        Ok(x)
    }

    fn expand_const(&self, n: &NodeProto) -> Result<Const> {
        let c = |i| self.konst(n, i);
        let x = c(0)?;
        let target: Vec<usize> = c(1)?.ints().iter().map(|&t| t.max(1) as usize).collect();
        let dims = slim_core::graph::broadcast_shape(&x.dims, &target).ok_or_else(|| {
            OnnxError::Model(format!("shape {:?} does not expand to {target:?}", x.dims))
        })?;
        self.charge(&dims, x.numel())?;
        Ok(Const {
            values: broadcast_values(&x, &dims),
            dims,
        })
    }

    fn unary_const(&self, n: &NodeProto) -> Result<Const> {
        let c = |i| self.konst(n, i);
        let mut x = c(0)?;
        let f: fn(f64) -> f64 = match n.op_type.as_str() {
            "Sqrt" => f64::sqrt,
            "Reciprocal" => f64::recip,
            "Neg" => |v| -v,
            "Relu" => |v| v.max(0.0),
            "Sigmoid" => |v| 1.0 / (1.0 + (-v).exp()),
            "Round" => f64::round_ties_even,
            _ => f64::tanh,
        };
        // In f32, as the data would be computed.
        x.values
            .iter_mut()
            .for_each(|v| *v = f64::from(f(*v) as f32));
        Ok(x)
    }

    pub(super) fn binary_const(&self, n: &NodeProto) -> Result<Const> {
        let c = |i| self.konst(n, i);
        let (x, y) = (c(0)?, c(1)?);
        let ints = self.int_typed(n);
        let f = |p: f64, q: f64| match n.op_type.as_str() {
            "Mul" => p * q,
            "Add" => p + q,
            "Sub" => p - q,
            "Pow" => p.powf(q),
            "Max" => p.max(q),
            "Min" => p.min(q),
            // Shape arithmetic divides integers (toward zero).
            _ if ints => (p / q).trunc(),
            _ => p / q,
        };
        let dims = slim_core::graph::broadcast_shape(&x.dims, &y.dims).ok_or_else(|| {
            OnnxError::Model(format!(
                "constants of shapes {:?} and {:?} do not broadcast",
                x.dims, y.dims
            ))
        })?;
        self.charge(&dims, x.numel().max(y.numel()))?;
        let (xs, ys) = (broadcast_values(&x, &dims), broadcast_values(&y, &dims));
        Ok(Const {
            values: xs.iter().zip(&ys).map(|(&p, &q)| f(p, q)).collect(),
            dims,
        })
    }

    fn constant_of_shape(&self, n: &NodeProto, a: &Attrs) -> Result<Const> {
        let c = |i| self.konst(n, i);
        let shape = c(0)?.ints();
        let dims = sizes("ConstantOfShape's shape", &shape, 0)
            .ok()
            .filter(|d| {
                slim_core::graph::elements(d).is_some_and(|n| n <= slim_core::graph::MAX_ELEMENTS)
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
        Ok(Const {
            dims,
            values: vec![value; n],
        })
    }

    fn slice_const(&self, n: &NodeProto, a: &Attrs) -> Result<Const> {
        let x = self.konst(n, 0)?;
        slice(&x, &self.slice_args(n, a)?)
    }

    /// A Slice's starts, ends, axes and steps (attributes before opset 10, constant inputs
    /// since), the axes defaulting to the first ones and the steps to one, of one length.
    pub(super) fn slice_args(&self, n: &NodeProto, a: &Attrs) -> Result<[Vec<i64>; 4]> {
        let (starts, ends, axes, steps) = if self.opset < 10 {
            (
                a.ints("starts").unwrap_or_default(),
                a.ints("ends").unwrap_or_default(),
                a.ints("axes"),
                None,
            )
        } else {
            (
                self.konst(n, 1)?.ints(),
                self.konst(n, 2)?.ints(),
                self.opt_const(n, 3)?.map(|c| c.ints()),
                self.opt_const(n, 4)?.map(|c| c.ints()),
            )
        };
        let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return err("Slice with starts, ends, axes and steps of different lengths");
        }
        Ok([starts, ends, axes, steps])
    }

    fn unsqueeze_const(&self, n: &NodeProto, a: &Attrs) -> Result<Const> {
        let c = |i| self.konst(n, i);
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
        Ok(Const {
            dims,
            values: x.values,
        })
    }
}
