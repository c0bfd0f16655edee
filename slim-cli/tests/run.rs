//! End-to-end tests of `slim run`: NumPy inputs through the binary against the library's own
//! forward (float, int8 and ONNX files), several inputs and outputs, the JSON, refused inputs
//! (status 2, nothing written), and, with `$SLIM_ONNX_PYTHON` (a Python with numpy), files
//! that numpy itself writes and reads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use slim_core::zoo::{self, ZooConfig};
use slim_core::{ForwardOptions, GraphBuilder, Mode, Model, Op};

fn slim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slim"))
        .args(args)
        .output()
        .expect("slim runs")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn ok(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

/// A `.npy` file as numpy writes one: the header dict, padded with spaces and a newline so
/// that the data start at a multiple of 64 bytes, in format `version` (1, 2 or 3).
fn npy(version: u8, descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let dims = match shape.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let fortran = if fortran { "True" } else { "False" };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {dims}, }}");
    let prefix = if version == 1 { 10 } else { 12 };
    while !(prefix + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
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

fn f32_npy(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    npy(1, "<f4", false, shape, &data)
}

/// Reads a float32 `.npy` file, checking its header as numpy would.
fn read_f32_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).expect("output file");
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let hlen = usize::from(u16::from_le_bytes([b[8], b[9]]));
    assert_eq!((10 + hlen) % 64, 0, "data aligned to 64 bytes");
    let h = std::str::from_utf8(&b[10..10 + hlen]).expect("ASCII header");
    assert!(h.ends_with('\n'), "{h:?}");
    assert!(
        h.contains("'descr': '<f4'") && h.contains("'fortran_order': False"),
        "{h:?}"
    );
    let dims = &h[h.find("'shape': (").expect("shape") + 10..];
    let dims = &dims[..dims.find(')').expect("tuple")];
    let shape: Vec<usize> = dims
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse().expect("dimension"))
        .collect();
    let values: Vec<f32> = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(values.len(), shape.iter().product::<usize>());
    (shape, values)
}

/// Deterministic values in [-1, 1), exact in f32 and f64.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 256) as f32 / 128.0 - 1.0)
        .collect()
}

fn vec_of(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-6 * scale, "{what}[{i}]: {a} vs {b}");
    }
}

/// LeNet on 1x28x28 with seeded weights, saved as `DIR/lenet.safetensors`.
fn lenet(dir: &Path) -> (PathBuf, Model) {
    let m = zoo::model("lenet", &ZooConfig::new([1, 28, 28]), 3, &Device::Cpu).unwrap();
    let path = dir.join("lenet.safetensors");
    m.save(&path).unwrap();
    (path, m)
}

/// Two inputs (`input` 1x8x8, `aux` 4x8x8) and two outputs (`sum` 4x8x8, `fc` 5), saved as
/// `DIR/two.safetensors`.
fn two_headed(dir: &Path) -> (PathBuf, Model) {
    let mut g = GraphBuilder::new([1, 8, 8])
        .conv("conv", 4, 3, 1, 1)
        .relu("relu")
        .add_node(
            "aux",
            Op::Input {
                shape: vec![4, 8, 8],
            },
            &[],
        )
        .add("sum", &["relu", "aux"])
        .flatten("flat")
        .linear("fc", 5)
        .build()
        .unwrap();
    g.set_outputs(&["sum", "fc"]).unwrap();
    let m = Model::init(g, 5, &Device::Cpu).unwrap();
    let path = dir.join("two.safetensors");
    m.save(&path).unwrap();
    (path, m)
}

#[test]
fn outputs_equal_the_library_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (model, m) = lenet(dir.path());
    let shape = [3, 1, 28, 28];
    let x = values(3 * 784, 1);
    let xf4 = dir.path().join("x.npy");
    std::fs::write(&xf4, f32_npy(&shape, &x)).unwrap();
    let want = m
        .forward(
            &Tensor::from_vec(x.clone(), &shape, &Device::Cpu).unwrap(),
            Mode::Eval,
        )
        .unwrap();
    let out = dir.path().join("out");
    let o = slim(&["run", s(&model), "--input", s(&xf4), "--out", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("fc3") && text.contains("[3, 10]") && text.contains("(f32)"),
        "{text}"
    );
    let (got_shape, got) = read_f32_npy(&out.join("fc3.npy"));
    assert_eq!(got_shape, vec![3, 10]);
    assert_close(&got, &vec_of(&want), "f32 file");

    // The same values as float64 in every format version, and as C-order data numpy writes
    // for other types: the same outputs.
    let f8: Vec<u8> = x.iter().flat_map(|&v| f64::from(v).to_le_bytes()).collect();
    for version in [1, 2, 3] {
        let p = dir.path().join(format!("x{version}.npy"));
        std::fs::write(&p, npy(version, "<f8", false, &shape, &f8)).unwrap();
        let r = ok(&slim(&[
            "run",
            s(&model),
            "--input",
            s(&p),
            "--out",
            s(&out),
            "--json",
        ]));
        assert_eq!(r["outputs"][0]["name"], "fc3");
        assert_eq!(read_f32_npy(&out.join("fc3.npy")).1, got, "<f8 v{version}");
    }
    let pixels: Vec<u8> = (0..3 * 784).map(|i| (i * 31 % 256) as u8).collect();
    let as_f32: Vec<f32> = pixels.iter().map(|&p| f32::from(p)).collect();
    let want = vec_of(
        &m.forward(
            &Tensor::from_vec(as_f32, &shape, &Device::Cpu).unwrap(),
            Mode::Eval,
        )
        .unwrap(),
    );
    let i8: Vec<u8> = pixels
        .iter()
        .flat_map(|&p| i64::from(p).to_le_bytes())
        .collect();
    for (descr, data) in [("|u1", pixels.clone()), ("<i8", i8)] {
        let p = dir.path().join("ints.npy");
        std::fs::write(&p, npy(1, descr, false, &shape, &data)).unwrap();
        ok(&slim(&[
            "run",
            s(&model),
            "--input",
            s(&p),
            "--out",
            s(&out),
            "--json",
        ]));
        assert_close(&read_f32_npy(&out.join("fc3.npy")).1, &want, descr);
    }

    // The int8 file of the same model runs on the int8 runtime, as `slim eval` runs it.
    let q = dir.path().join("q.safetensors");
    ok(&slim(&[
        "quant",
        "ptq",
        s(&model),
        "--calib-batches",
        "1",
        "-q",
        "--json",
        "--out",
        s(&q),
    ]));
    let r = ok(&slim(&[
        "run",
        s(&q),
        "--input",
        s(&xf4),
        "--out",
        s(&out),
        "--json",
    ]));
    assert_eq!(r["runtime"], "int8");
    let qm = Model::load(&q, &Device::Cpu).unwrap();
    let want = slim_quant::runtime::forward(
        &qm,
        &Tensor::from_vec(x.clone(), &shape, &Device::Cpu).unwrap(),
    )
    .unwrap();
    assert_close(
        &read_f32_npy(&out.join("fc3.npy")).1,
        &vec_of(&want),
        "int8",
    );

    // An ONNX file runs as the model it imports to.
    let onnx = dir.path().join("lenet.onnx");
    slim_onnx::export_file(&m, &onnx, &Default::default()).unwrap();
    let r = ok(&slim(&[
        "run",
        s(&onnx),
        "--input",
        s(&xf4),
        "--out",
        s(&out),
        "--json",
    ]));
    let name = r["outputs"][0]["name"].as_str().unwrap();
    let imported = slim_onnx::import_file(&onnx, &Default::default()).unwrap();
    let want = imported
        .forward(
            &Tensor::from_vec(x.clone(), &shape, &Device::Cpu).unwrap(),
            Mode::Eval,
        )
        .unwrap();
    assert_close(
        &read_f32_npy(&out.join(format!("{name}.npy"))).1,
        &vec_of(&want),
        "onnx",
    );
}

#[test]
fn several_inputs_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (model, m) = two_headed(dir.path());
    let (x, aux) = (values(2 * 64, 2), values(2 * 256, 3));
    let (px, paux) = (dir.path().join("x.npy"), dir.path().join("aux.npy"));
    std::fs::write(&px, f32_npy(&[2, 1, 8, 8], &x)).unwrap();
    std::fs::write(&paux, f32_npy(&[2, 4, 8, 8], &aux)).unwrap();
    let want = m
        .forward_with(
            &[
                Tensor::from_vec(x, &[2, 1, 8, 8], &Device::Cpu).unwrap(),
                Tensor::from_vec(aux, &[2, 4, 8, 8], &Device::Cpu).unwrap(),
            ],
            Mode::Eval,
            ForwardOptions::default(),
        )
        .unwrap()
        .outputs;
    let out = dir.path().join("nested/out");
    let r = ok(&slim(&[
        "run",
        s(&model),
        "--input",
        s(&px),
        "--input",
        s(&paux),
        "--out",
        s(&out),
        "--json",
    ]));
    let outputs = r["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2, "{r}");
    for (o, (name, shape, want)) in outputs.iter().zip([
        ("sum", vec![2, 4, 8, 8], &want[0]),
        ("fc", vec![2, 5], &want[1]),
    ]) {
        assert_eq!(o["name"], name);
        assert_eq!(o["shape"], serde_json::json!(shape));
        let path = out.join(format!("{name}.npy"));
        assert_eq!(o["path"], s(&path));
        let (got_shape, got) = read_f32_npy(&path);
        assert_eq!(got_shape, shape);
        assert_close(&got, &vec_of(want), name);
    }
    // Exactly the two files: no temporary file left behind.
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["fc.npy", "sum.npy"]);
}

#[test]
fn json_is_one_object_with_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = lenet(dir.path());
    let x = dir.path().join("x.npy");
    // NaN is data: it goes through.
    let mut v = values(784, 4);
    v[5] = f32::NAN;
    std::fs::write(&x, f32_npy(&[1, 1, 28, 28], &v)).unwrap();
    let out = dir.path().join("out");
    let o = slim(&[
        "run",
        s(&model),
        "--input",
        s(&x),
        "--out",
        s(&out),
        "--json",
    ]);
    let r = ok(&o);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim().lines().count(), 1);
    assert_eq!(r["model"], s(&model));
    assert_eq!(r["out"], s(&out));
    let outputs = r["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    let o = &outputs[0];
    assert_eq!(o["name"], "fc3");
    assert_eq!(o["shape"], serde_json::json!([1, 10]));
    assert_eq!(o["path"], s(&out.join("fc3.npy")));
    assert!(out.join("fc3.npy").is_file());
}

/// Status 2, each needle in the message, no panic, nothing on stdout.
fn refused(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{needles:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
}

#[test]
fn bad_inputs_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (lenet, _) = lenet(d);
    let (two, _) = two_headed(d);
    let file = |name: &str, bytes: Vec<u8>| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let good = file("good.npy", f32_npy(&[2, 1, 28, 28], &values(2 * 784, 5)));
    let small = file("small.npy", f32_npy(&[2, 1, 8, 8], &values(128, 6)));
    let aux3 = file("aux3.npy", f32_npy(&[3, 4, 8, 8], &values(3 * 256, 7)));
    let wrong = file("wrong.npy", f32_npy(&[2, 1, 28, 27], &values(2 * 756, 8)));
    let unbatched = file("unbatched.npy", f32_npy(&[1, 28, 28], &values(784, 9)));
    let bytes = std::fs::read(&good).unwrap();
    let data = &bytes[bytes.len() - 2 * 784 * 4..];
    let truncated = file("truncated.npy", bytes[..bytes.len() - 3].to_vec());
    let fortran = file("fortran.npy", npy(1, "<f4", true, &[2, 1, 28, 28], data));
    let int32 = file("int32.npy", npy(1, "<i4", false, &[2, 1, 28, 28], data));
    let magic = file("magic.npy", b"PK\x03\x04 a zip, not an array".to_vec());
    let missing = d.join("missing.npy");
    let not_dir = file("not-a-dir", b"".to_vec());

    let cases: Vec<(&Path, Vec<&Path>, Vec<String>)> = vec![
        (
            &lenet,
            vec![&wrong],
            vec![
                "wrong.npy".into(),
                "[2, 1, 28, 27]".into(),
                "[N, 1, 28, 28]".into(),
            ],
        ),
        (
            &lenet,
            vec![&unbatched],
            vec!["unbatched.npy".into(), "[1, 28, 28]".into()],
        ),
        (
            &lenet,
            vec![&truncated],
            vec!["truncated.npy".into(), "truncated".into()],
        ),
        (
            &lenet,
            vec![&fortran],
            vec!["fortran.npy".into(), "Fortran order".into()],
        ),
        (
            &lenet,
            vec![&int32],
            vec!["int32.npy".into(), "unsupported dtype '<i4'".into()],
        ),
        (
            &lenet,
            vec![&magic],
            vec!["magic.npy".into(), "NUMPY".into()],
        ),
        (&lenet, vec![&missing], vec!["missing.npy".into()]),
        (
            &lenet,
            vec![&good, &good],
            vec!["1 input(s)".into(), "2 --input".into()],
        ),
        (
            &two,
            vec![&small],
            vec!["2 input(s)".into(), "`aux`".into(), "1 --input".into()],
        ),
        (
            &two,
            vec![&small, &aux3],
            vec!["aux3.npy".into(), "same batch".into()],
        ),
    ];
    let existing = d.join("existing");
    std::fs::create_dir(&existing).unwrap();
    let fresh = d.join("fresh");
    for (model, inputs, needles) in &cases {
        for out in [&existing, &fresh] {
            let mut args = vec!["run", s(model)];
            for i in inputs {
                args.extend(["--input", s(i)]);
            }
            args.extend(["--out", s(out)]);
            let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
            refused(&slim(&args), &needles);
        }
        assert!(!fresh.exists(), "{needles:?}: {} created", fresh.display());
        assert_eq!(
            std::fs::read_dir(&existing).unwrap().count(),
            0,
            "{needles:?}"
        );
    }
    refused(
        &slim(&["run", s(&lenet), "--input", s(&good), "--out", s(&not_dir)]),
        &["not-a-dir", "not a directory"],
    );
    // No --input at all is a usage error.
    refused(&slim(&["run", s(&lenet), "--out", s(&fresh)]), &["--input"]);
    assert!(!fresh.exists());
}

/// numpy writes the inputs (float32 by `numpy.save`, format 1.0; float64, int64 and uint8;
/// formats 2.0 and 3.0) and reads the outputs back.
#[test]
fn numpy_reads_and_writes_the_files() {
    let python = match std::env::var("SLIM_ONNX_PYTHON") {
        Ok(p) => PathBuf::from(p),
        Err(_) => {
            slim_core::note_skipped(
                "set SLIM_ONNX_PYTHON to a Python with numpy to check with numpy",
            );
            return;
        }
    };
    let has_numpy = Command::new(&python)
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_numpy {
        let msg = format!("{} has no numpy", python.display());
        if std::env::var("SLIM_REQUIRE_ORT").is_ok_and(|v| v == "1") {
            panic!("{msg}");
        }
        slim_core::note_skipped(&msg);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (model, m) = lenet(dir.path());
    let write = r#"
import sys, numpy as np
from numpy.lib import format as npf
d = sys.argv[1]
x = ((np.arange(2 * 784) % 17 - 8) / 8).reshape(2, 1, 28, 28)
np.save(d + "/f4.npy", x.astype(np.float32))
np.save(d + "/f8.npy", x)
ints = (np.arange(2 * 784) % 7).reshape(2, 1, 28, 28)
np.save(d + "/i8.npy", ints.astype(np.int64))
np.save(d + "/u1.npy", ints.astype(np.uint8))
for v in [(2, 0), (3, 0)]:
    with open(d + "/f4v%d.npy" % v[0], "wb") as f:
        npf.write_array(f, x.astype(np.float32), version=v)
"#;
    let o = Command::new(&python)
        .args(["-c", write, s(dir.path())])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let header = std::fs::read(dir.path().join("f4.npy")).unwrap();
    assert_eq!(&header[6..8], &[1, 0], "numpy.save writes format 1.0");
    let x: Vec<f32> = (0..2 * 784)
        .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
        .collect();
    let ints: Vec<f32> = (0..2 * 784).map(|i| (i % 7) as f32).collect();
    let forward = |v: Vec<f32>| {
        vec_of(
            &m.forward(
                &Tensor::from_vec(v, &[2, 1, 28, 28], &Device::Cpu).unwrap(),
                Mode::Eval,
            )
            .unwrap(),
        )
    };
    let (want_x, want_ints) = (forward(x), forward(ints));
    let read = r#"
import sys, json, numpy as np
a = np.load(sys.argv[1])
print(json.dumps({"dtype": str(a.dtype), "shape": list(a.shape), "values": [float(v) for v in a.ravel()]}))
"#;
    for (input, want) in [
        ("f4", &want_x),
        ("f8", &want_x),
        ("f4v2", &want_x),
        ("f4v3", &want_x),
        ("i8", &want_ints),
        ("u1", &want_ints),
    ] {
        let out = dir.path().join(format!("out-{input}"));
        ok(&slim(&[
            "run",
            s(&model),
            "--input",
            s(&dir.path().join(format!("{input}.npy"))),
            "--out",
            s(&out),
            "--json",
        ]));
        let o = Command::new(&python)
            .args(["-c", read, s(&out.join("fc3.npy"))])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["dtype"], "float32");
        assert_eq!(r["shape"], serde_json::json!([2, 10]));
        let got: Vec<f32> = r["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_close(&got, want, input);
    }
}
