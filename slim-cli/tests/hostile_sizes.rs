//! Small files that claim enormous tensors are refused before anything that size is
//! allocated: each command exits with status 2, names the file, and its peak memory stays
//! under 100 MB (read from the kernel's accounting of that one child process).
//!
//! One test in its own binary, so that no other test's processes share the accounting.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use prost::Message;
use slim_onnx::proto::{
    data_type, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto,
};

const LIMIT: u64 = 100 << 20;

/// Runs `slim ARGS`, returning its exit status, its stderr and its peak resident memory.
fn run(args: &[&str]) -> (i32, String, u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_slim"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let mut status = 0;
    // SAFETY: `rusage` is plain data that the call fills in; `status` likewise.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: the child is ours and not yet reaped (std's `wait` is never called on it).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    // ru_maxrss is in kilobytes on Linux.
    (code, reader.join().unwrap(), usage.ru_maxrss as u64 * 1024)
}

fn check(what: &str, args: &[&str], file: &Path) {
    let (code, stderr, peak) = run(args);
    eprintln!(
        "{what}: exit {code}, peak {} MB: {}",
        peak >> 20,
        stderr.trim()
    );
    assert_eq!(code, 2, "{what}: {stderr}");
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(
        stderr.contains(name.as_ref()),
        "{what}: not named: {stderr}"
    );
    assert!(peak < LIMIT, "{what}: peak memory {} MB", peak >> 20);
}

/// A safetensors file whose one tensor claims 2^20 x 2^20 floats (4 TiB), with no data.
fn huge_safetensors(path: &Path) {
    let header =
        r#"{"w":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,4398046511104]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            dim_value: Some(d),
                            dim_param: None,
                        })
                        .collect(),
                }),
            }),
        }),
        doc_string: String::new(),
    }
}

/// An ONNX model of `nodes` reading `initializer`, input x of [1, 1, 28, 28].
fn onnx(path: &Path, nodes: Vec<NodeProto>, initializer: Vec<TensorProto>) {
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: nodes,
            name: "hostile".into(),
            initializer,
            input: vec![value("x", &[1, 1, 28, 28])],
            output: vec![value("y", &[])],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, model.encode_to_vec()).unwrap();
}

fn node(op: &str, inputs: &[&str]) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec!["y".into()],
        name: "n".into(),
        op_type: op.into(),
        ..Default::default()
    }
}

/// The CRC-32 of PNG chunks (ISO 3309), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn small_files_that_claim_huge_tensors_are_refused_in_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };

    // A model file: 4 TiB claimed in 100 bytes.
    let model = p("huge.safetensors");
    huge_safetensors(&model);
    check("model file", &["info", model.to_str().unwrap()], &model);

    // ONNX: a convolution whose weight claims 2^20 x 2^20 x 3 x 3 floats with 100 bytes of
    // data, and a ConstantOfShape asked for 2^20 x 2^20 x 2^10 values.
    let conv = p("huge-weight.onnx");
    let w = TensorProto {
        dims: vec![1 << 20, 1 << 20, 3, 3],
        data_type: data_type::FLOAT,
        name: "w".into(),
        raw_data: vec![0; 100],
        ..Default::default()
    };
    onnx(&conv, vec![node("Conv", &["x", "w"])], vec![w]);
    check("ONNX weight", &["info", conv.to_str().unwrap()], &conv);
    let generated = p("huge-constant.onnx");
    let shape = TensorProto {
        dims: vec![3],
        data_type: data_type::INT64,
        name: "shape".into(),
        int64_data: vec![1 << 20, 1 << 20, 1 << 10],
        ..Default::default()
    };
    let mut add = node("Add", &["x", "c"]);
    add.output = vec!["y".into()];
    let mut fill = node("ConstantOfShape", &["shape"]);
    fill.output = vec!["c".into()];
    fill.name = "fill".into();
    onnx(&generated, vec![fill, add], vec![shape]);
    check(
        "ONNX constant",
        &["info", generated.to_str().unwrap()],
        &generated,
    );

    // IDX data: 2^31 images of 2^16 x 2^16 pixels claimed, 84 bytes of pixels.
    let mnist = p("mnist");
    std::fs::create_dir(&mnist).unwrap();
    let mut images = vec![0, 0, 8, 3];
    for d in [1u32 << 31, 1 << 16, 1 << 16] {
        images.extend_from_slice(&d.to_be_bytes());
    }
    images.extend_from_slice(&[0; 84]);
    let idx = mnist.join("train-images-idx3-ubyte");
    std::fs::write(&idx, &images).unwrap();
    let mut labels = vec![0, 0, 8, 1];
    labels.extend_from_slice(&(1u32 << 31).to_be_bytes());
    labels.extend_from_slice(&[0; 92]);
    std::fs::write(mnist.join("train-labels-idx1-ubyte"), &labels).unwrap();
    for (src, dst) in [
        ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"),
        ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"),
    ] {
        std::fs::copy(mnist.join(src), mnist.join(dst)).unwrap();
    }
    let spec = format!("mnist:{}", mnist.display());
    let out = p("never.safetensors");
    let args = [
        "train", "--model", "lenet", "--data", &spec, "--epochs", "1", "--out",
    ];
    let mut args: Vec<&str> = args.to_vec();
    args.push(out.to_str().unwrap());
    check("IDX images", &args, &idx);
    assert!(!out.exists());

    // An image folder whose PNGs claim 60000 x 60000 pixels (3.6 GB) in 65 bytes.
    let folder = p("images");
    std::fs::create_dir_all(folder.join("a")).unwrap();
    std::fs::create_dir_all(folder.join("b")).unwrap();
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    png.extend_from_slice(&60000u32.to_be_bytes());
    png.extend_from_slice(&60000u32.to_be_bytes());
    png.extend_from_slice(&[8, 0, 0, 0, 0]);
    let crc = crc32(&png[12..]);
    png.extend_from_slice(&crc.to_be_bytes());
    // An IDAT chunk holding an empty zlib stream, then IEND: a whole file of 65 bytes.
    for (kind, data) in [
        (&b"IDAT"[..], &[0x78, 0x9c, 0x03, 0, 0, 0, 0, 1][..]),
        (&b"IEND"[..], &[][..]),
    ] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    let big = folder.join("a").join("big.png");
    std::fs::write(&big, &png).unwrap();
    std::fs::write(folder.join("b").join("big2.png"), &png).unwrap();
    let spec = format!("images:{}", folder.display());
    let mut args: Vec<&str> = [
        "train", "--model", "lenet", "--data", &spec, "--epochs", "1", "--out",
    ]
    .to_vec();
    args.push(out.to_str().unwrap());
    let (code, stderr, peak) = run(&args);
    eprintln!(
        "PNG: exit {code}, peak {} MB: {}",
        peak >> 20,
        stderr.trim()
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("big"), "not named: {stderr}");
    assert!(peak < LIMIT, "PNG: peak memory {} MB", peak >> 20);
}
