//! NumPy `.npy` files, as much of the format as feeding models and keeping their outputs needs: reading C-order arrays of
//! float32, float64, int64 or uint8 (little-endian) into f32, and writing f32 arrays.
//!
//! A file is the magic `\x93NUMPY`, a format version (1.0 with a 2-byte header length; 2.0
//! and 3.0 with a 4-byte one), and a header that is a Python dict literal (`descr`,
//! `fortran_order`, `shape`) padded with spaces to a multiple of 64 bytes and ended by a
//! newline; the data follow. Reading checks the whole file before converting anything: the
//! data must be exactly what the header's shape and type need.

use std::path::Path;

use crate::error::{CoreError, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// An array read from or written to a `.npy` file, in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads a `.npy` file into f32; every error names the file and is an input error.
pub fn read(path: &Path) -> Result<Array> {
    let file = |msg: String| CoreError::File {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|e| file(format!("cannot read it: {e}")))?;
    parse(&bytes).map_err(file)
}

/// The element types read, with their size in bytes.
#[derive(Clone, Copy)]
enum Dtype {
    F4,
    F8,
    I8,
    U1,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F4 => 4,
            Dtype::F8 | Dtype::I8 => 8,
            Dtype::U1 => 1,
        }
    }
}

/// Parses the bytes of a `.npy` file into f32 (float64 and int64 values rounded to the
/// nearest f32). The error says what is wrong, without the file's name.
pub fn parse(bytes: &[u8]) -> Result<Array, String> {
    if bytes.len() < MAGIC.len() + 2 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a NumPy .npy file (it does not begin with \\x93NUMPY)".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len_bytes, utf8) = match (major, minor) {
        (1, 0) => (2, false),
        (2, 0) => (4, false),
        (3, 0) => (4, true),
        _ => {
            return Err(format!(
                ".npy format version {major}.{minor} is not supported (1.0, 2.0 and 3.0 are)"
            ))
        }
    };
    let start = 8 + len_bytes;
    let truncated = || "truncated: the file ends inside its header".to_string();
    let len_field = bytes.get(8..start).ok_or_else(truncated)?;
    let header_len = len_field
        .iter()
        .rev()
        .fold(0usize, |n, &b| (n << 8) | usize::from(b));
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(truncated)?;
    let raw = &bytes[start..end];
    let header = if utf8 {
        std::str::from_utf8(raw).map_err(|_| "the header is not UTF-8 text".to_string())?
    } else {
        std::str::from_utf8(raw)
            .ok()
            .filter(|s| s.is_ascii())
            .ok_or_else(|| "the header is not ASCII text".to_string())?
    };
    let (dtype, shape) = read_header(header)?;
    let data = &bytes[end..];
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("the shape {shape:?} is too large"))?;
    let need = count
        .checked_mul(dtype.size())
        .ok_or_else(|| format!("the shape {shape:?} is too large"))?;
    if data.len() != need {
        let what = if data.len() < need {
            "truncated"
        } else {
            "corrupt"
        };
        return Err(format!(
            "{what}: an array of shape {shape:?} needs {need} bytes of data, the file holds {}",
            data.len()
        ));
    }
    let values = match dtype {
        Dtype::F4 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F8 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::I8 => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::U1 => data.iter().map(|&b| f32::from(b)).collect(),
    };
    Ok(Array {
        shape,
        data: values,
    })
}

/// The element type and shape of a header (`{'descr': '<f4', 'fortran_order': False,
/// 'shape': (2, 3), }`).
fn read_header(header: &str) -> Result<(Dtype, Vec<usize>), String> {
    let shown: String = header.chars().take(120).collect();
    let bad = |why: &str| format!("the header is not a NumPy array header ({why}): {shown:?}");
    let mut p = Literal {
        s: header.as_bytes(),
        at: 0,
    };
    let entries = match p.value() {
        Some(Value::Dict(entries)) => entries,
        _ => return Err(bad("not a dict")),
    };
    p.skip_space();
    if p.at != p.s.len() {
        return Err(bad("text after the dict"));
    }
    let get = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .ok_or_else(|| bad(&format!("no `{key}`")))
    };
    let dtype = match get("descr")? {
        Value::Str(d) => match d.as_str() {
            "<f4" => Dtype::F4,
            "<f8" => Dtype::F8,
            "<i8" => Dtype::I8,
            "|u1" => Dtype::U1,
            other => {
                return Err(format!(
                    "unsupported dtype '{other}' (supported: '<f4', '<f8', '<i8', '|u1')"
                ))
            }
        },
        _ => return Err("unsupported dtype (a structured array)".into()),
    };
    match get("fortran_order")? {
        Value::Bool(false) => {}
        Value::Bool(true) => {
            return Err(
                "the array is in Fortran order (fortran_order: True); only C order is \
                        read: write it with numpy.ascontiguousarray"
                    .into(),
            )
        }
        _ => return Err(bad("`fortran_order` is not True or False")),
    }
    let shape = match get("shape")? {
        Value::Tuple(dims) => dims
            .iter()
            .map(|d| match d {
                Value::Int(n) => Ok(*n),
                _ => Err(bad("a dimension that is not a number")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(bad("`shape` is not a tuple")),
    };
    Ok((dtype, shape))
}

/// A value of the Python literals a header holds.
enum Value {
    Str(String),
    Bool(bool),
    Int(usize),
    Tuple(Vec<Value>),
    Dict(Vec<(String, Value)>),
    /// A list (a structured dtype's fields): read, never used.
    List,
}

/// A cursor over a Python literal. Depth is bounded, so a hostile header cannot overflow
/// the stack.
struct Literal<'a> {
    s: &'a [u8],
    at: usize,
}

impl Literal<'_> {
    const MAX_DEPTH: usize = 16;

    fn skip_space(&mut self) {
        while self.s.get(self.at).is_some_and(|c| c.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_space();
        if self.s.get(self.at) == Some(&c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Option<Value> {
        self.value_at(0)
    }

    fn value_at(&mut self, depth: usize) -> Option<Value> {
        if depth > Self::MAX_DEPTH {
            return None;
        }
        self.skip_space();
        let c = *self.s.get(self.at)?;
        match c {
            b'\'' | b'"' => {
                let from = self.at + 1;
                let len = self.s[from..].iter().position(|&b| b == c)?;
                self.at = from + len + 1;
                Some(Value::Str(
                    String::from_utf8_lossy(&self.s[from..from + len]).into(),
                ))
            }
            b'{' => {
                self.at += 1;
                let mut entries = Vec::new();
                while !self.eat(b'}') {
                    let Value::Str(key) = self.value_at(depth + 1)? else {
                        return None;
                    };
                    if !self.eat(b':') {
                        return None;
                    }
                    entries.push((key, self.value_at(depth + 1)?));
                    if !self.eat(b',') {
                        return self.eat(b'}').then_some(Value::Dict(entries));
                    }
                }
                Some(Value::Dict(entries))
            }
            b'(' | b'[' => {
                let close = if c == b'(' { b')' } else { b']' };
                self.at += 1;
                let mut items = Vec::new();
                while !self.eat(close) {
                    items.push(self.value_at(depth + 1)?);
                    if !self.eat(b',') {
                        if !self.eat(close) {
                            return None;
                        }
                        break;
                    }
                }
                Some(if c == b'(' {
                    Value::Tuple(items)
                } else {
                    Value::List
                })
            }
            b'0'..=b'9' => {
                let from = self.at;
                while self.s.get(self.at).is_some_and(u8::is_ascii_digit) {
                    self.at += 1;
                }
                let n = std::str::from_utf8(&self.s[from..self.at])
                    .ok()?
                    .parse()
                    .ok()?;
                // Python 2 wrote long integers with an `L`.
                if self.s.get(self.at) == Some(&b'L') {
                    self.at += 1;
                }
                Some(Value::Int(n))
            }
            _ => {
                for (word, v) in [("True", true), ("False", false)] {
                    if self.s[self.at..].starts_with(word.as_bytes()) {
                        self.at += word.len();
                        return Some(Value::Bool(v));
                    }
                }
                None
            }
        }
    }
}

/// The bytes of a `.npy` file holding `data` (C order) as float32 of the given shape: format
/// 1.0, or 2.0 when the header does not fit 1.0's 2-byte length.
pub fn to_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    let v1 = header.len() + 1 + 10 <= usize::from(u16::MAX);
    let prefix = if v1 { 10 } else { 12 };
    // Spaces, then a newline, so that the data start at a multiple of 64 bytes.
    let total = (prefix + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - prefix - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total + 4 * data.len());
    out.extend_from_slice(MAGIC);
    if v1 {
        out.extend_from_slice(&[1, 0]);
        // `v1` bounds the length to 16 bits.
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The arrays of `.npy` files as a model's inputs, one file per input in order: each must be
/// `[N, ...the input's shape]`, with the same `N` for all. The tensors, and `N`. `what` names
/// the files in messages (`--input file(s)`).
pub fn read_inputs(
    model: &crate::model::Model,
    files: &[std::path::PathBuf],
    what: &str,
    device: &candle_core::Device,
) -> Result<(Vec<candle_core::Tensor>, usize)> {
    let g = &model.graph;
    let input_ids = g.inputs();
    if files.len() != input_ids.len() {
        let names: Vec<String> = input_ids
            .iter()
            .map(|&i| format!("`{}` {:?}", g.node(i).name, g.node(i).shape))
            .collect();
        return Err(CoreError::Invalid(format!(
            "the model has {} input(s) ({}); {} {what} were given",
            input_ids.len(),
            names.join(", "),
            files.len()
        )));
    }
    let bad = |path: &Path, msg: String| CoreError::File {
        path: path.to_path_buf(),
        msg,
    };
    let mut batch: Option<(usize, &Path)> = None;
    let mut xs = Vec::with_capacity(input_ids.len());
    for (path, &id) in files.iter().zip(&input_ids) {
        let a = read(path)?;
        let node = g.node(id);
        if a.shape.len() != node.shape.len() + 1 || a.shape[1..] != node.shape[..] {
            let per_sample: Vec<String> = node.shape.iter().map(usize::to_string).collect();
            return Err(bad(
                path,
                format!(
                    "the array's shape is {:?}; the model's input `{}` takes [N, {}] (N samples \
                     of {:?})",
                    a.shape,
                    node.name,
                    per_sample.join(", "),
                    node.shape
                ),
            ));
        }
        let n = a.shape[0];
        if n == 0 {
            let msg = format!("the array holds no samples (shape {:?})", a.shape);
            return Err(bad(path, msg));
        }
        match batch {
            Some((m, first)) if m != n => {
                let msg = format!(
                    "{n} sample(s), but {} has {m}; every input needs the same batch",
                    first.display()
                );
                return Err(bad(path, msg));
            }
            _ => batch = Some((n, path)),
        }
        xs.push(candle_core::Tensor::from_vec(a.data, a.shape, device)?);
    }
    Ok((xs, batch.map_or(0, |(n, _)| n)))
}

/// One output of a model written as a `.npy` file, with its range.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WrittenOutput {
    pub name: String,
    pub shape: Vec<usize>,
    pub path: std::path::PathBuf,
    pub min: f32,
    pub max: f32,
    pub mean: f64,
}

/// Writes each of `outputs` (the model's, in order) to `dir` as `<output name>.npy` (each
/// through a temporary file and a rename).
pub fn write_outputs(
    model: &crate::model::Model,
    outputs: &[candle_core::Tensor],
    dir: &Path,
) -> Result<Vec<WrittenOutput>> {
    let g = &model.graph;
    let mut written = Vec::new();
    for (&id, t) in g.outputs().iter().zip(outputs) {
        let name = g.node(id).name.clone();
        let shape = t.dims().to_vec();
        let values = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Node names are made of A-Z a-z 0-9 _ . - only (the graph checks), so each is a file
        // name in `dir`.
        let path = dir.join(format!("{name}.npy"));
        crate::io::write_atomic(&path, &to_bytes(&shape, &values))?;
        written.push(WrittenOutput {
            min: values.iter().copied().fold(f32::NAN, f32::min),
            max: values.iter().copied().fold(f32::NAN, f32::max),
            mean: values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len().max(1) as f64,
            name,
            shape,
            path,
        });
    }
    Ok(written)
}

/// The written outputs as a table: name, shape, minimum, maximum, mean.
pub fn outputs_table(written: &[WrittenOutput]) -> String {
    // Four decimals, or scientific notation where that would hide the value.
    let number = |v: f64| {
        if v == 0.0 || !v.is_finite() || (1e-3..1e6).contains(&v.abs()) {
            format!("{v:.4}")
        } else {
            format!("{v:.3e}")
        }
    };
    let rows: Vec<Vec<String>> = written
        .iter()
        .map(|w| {
            vec![
                w.name.clone(),
                format!("{:?}", w.shape),
                number(f64::from(w.min)),
                number(f64::from(w.max)),
                number(w.mean),
            ]
        })
        .collect();
    crate::plot::table(&["output", "shape", "min", "max", "mean"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file as numpy writes one: `header` (the dict) padded for format `version`.
    fn npy(version: u8, header: &str, data: &[u8]) -> Vec<u8> {
        let prefix = if version == 1 { 10 } else { 12 };
        let mut h = header.to_string();
        while !(prefix + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[version, 0]);
        if version == 1 {
            out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn writes_what_it_reads() {
        for shape in [vec![3], vec![2, 3], vec![2, 1, 2, 2], vec![0, 4]] {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let bytes = to_bytes(&shape, &data);
            assert_eq!((bytes.len() - 4 * n) % 64, 0, "aligned data");
            assert_eq!(&bytes[6..8], &[1, 0]);
            let a = parse(&bytes).expect("read");
            assert_eq!((a.shape, a.data), (shape, data));
        }
        // A shape whose header outgrows format 1.0.
        let shape = vec![1; 30_000];
        let bytes = to_bytes(&shape, &[7.0]);
        assert_eq!(&bytes[6..8], &[2, 0]);
        assert_eq!(parse(&bytes).expect("read").data, vec![7.0]);
    }

    #[test]
    fn reads_every_version_and_dtype() {
        let f4: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f8: Vec<u8> = [1.5f64, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let i8: Vec<u8> = [3i64, -4].iter().flat_map(|v| v.to_le_bytes()).collect();
        for version in [1, 2, 3] {
            for (descr, data, want) in [
                ("<f4", &f4[..], [1.5, -2.0]),
                ("<f8", &f8[..], [1.5, -2.0]),
                ("<i8", &i8[..], [3.0, -4.0]),
                ("|u1", &[0u8, 255][..], [0.0, 255.0]),
            ] {
                let h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2,), }}");
                let a = parse(&npy(version, &h, data)).expect("read");
                assert_eq!(
                    (a.shape, a.data),
                    (vec![2], want.to_vec()),
                    "{descr} v{version}"
                );
            }
        }
        // Keys in another order, double quotes, no trailing comma, a Python 2 long.
        let h = r#"{"shape": (1L, 2), "fortran_order": False, "descr": "<f4"}"#;
        assert_eq!(parse(&npy(1, h, &f4)).expect("read").shape, vec![1, 2]);
        // A scalar.
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (), }";
        let a = parse(&npy(1, h, &f4[..4])).expect("read");
        assert_eq!((a.shape, a.data), (vec![], vec![1.5]));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let h = |descr: &str, fortran: &str, shape: &str| {
            format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}")
        };
        let ok = npy(1, &h("<f4", "False", "(2, 2)"), &[0; 16]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"PK\x03\x04 not numpy".to_vec(), "\\x93NUMPY"),
            (ok[..12].to_vec(), "ends inside its header"),
            (
                ok[..ok.len() - 1].to_vec(),
                "truncated: an array of shape [2, 2] needs 16",
            ),
            ([&ok[..], &[0]].concat(), "holds 17"),
            (
                npy(1, &h(">f4", "False", "(2,)"), &[0; 8]),
                "unsupported dtype '>f4'",
            ),
            (
                npy(1, &h("<i4", "False", "(2,)"), &[0; 8]),
                "unsupported dtype '<i4'",
            ),
            (
                npy(1, &h("<f4", "True", "(2, 2)"), &[0; 16]),
                "Fortran order",
            ),
            (
                npy(1, &h("<f4", "False", "[2, 2]"), &[0; 16]),
                "not a tuple",
            ),
            (
                npy(1, &h("<f4", "False", "(2, -2)"), &[0; 16]),
                "not a dict",
            ),
            (
                npy(
                    1,
                    &h("<f4", "False", "(4294967296, 4294967296, 4294967296)"),
                    &[],
                ),
                "too large",
            ),
            (
                npy(
                    1,
                    "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
                    &[],
                ),
                "structured",
            ),
            (
                {
                    let mut v = ok.clone();
                    v[6] = 4;
                    v
                },
                "version 4.0",
            ),
        ];
        for (bytes, needle) in cases {
            let e = parse(&bytes).expect_err("refused");
            assert!(e.contains(needle), "expected `{needle}` in: {e}");
        }
    }

    #[test]
    fn damaged_files_are_errors_not_panics() {
        let good = to_bytes(&[2, 3], &[1.0; 6]);
        for cut in 0..good.len() {
            let _ = parse(&good[..cut]);
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state % b.len() as u64) as usize;
                b[at] = (state >> 32) as u8;
            }
            let _ = parse(&b);
        }
        let deep = format!("{{'shape': {}", "(".repeat(100_000));
        assert!(parse(&npy(2, &deep, &[])).is_err());
    }
}
