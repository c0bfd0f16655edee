//! Every seed of the fuzz targets (`fuzz/seeds/`) and every input the fuzzers once failed on
//! (`fuzz/regressions/TARGET/`) goes through the same readers as the targets do: each must
//! return a value or an error, never panic. The seeds are real files, so they must also read.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// What the fuzz target `target` does with `data`; true when the input was read.
fn run(target: &str, data: &[u8], tmp: &Path) -> bool {
    let file = || {
        let p = tmp.join(target);
        std::fs::write(&p, data).unwrap();
        p
    };
    match target {
        "model_file" => match slim_core::Model::from_bytes(data, &candle_core::Device::Cpu) {
            Ok(m) => {
                let _ = slim_core::analysis::analyze(&m.graph);
                m.fingerprint().is_ok()
            }
            Err(_) => false,
        },
        "idx" => {
            let p = Path::new("fuzz.idx");
            let a = slim_core::data::parse_idx(p, data, 3).is_ok();
            let b = slim_core::data::parse_idx(p, data, 1).is_ok();
            a || b
        }
        "cifar10" => slim_core::data::load_cifar10(&[file()]).is_ok(),
        "sensitivity" => match slim_prune::sensitivity::Sensitivities::load(&file()) {
            Ok(s) => {
                let _ = slim_prune::sensitivity::to_svg(&s);
                slim_prune::sensitivity::Sensitivities::merge(vec![s.clone(), s]).is_ok()
            }
            Err(_) => false,
        },
        "latency_table" => {
            let p = file();
            match slim_latency::Table::load(&p) {
                Ok(t) => t.check(&p, slim_latency::Runtime::F32).is_ok(),
                Err(_) => false,
            }
        }
        "onnx" => slim_onnx::import(data, &slim_onnx::ImportOptions::default()).is_ok(),
        "dist_messages" => {
            let a = serde_json::from_slice::<slim_core::study::StudyState>(data).is_ok();
            let b = slim_dist::teacher::fuzzing::request(data);
            let c = slim_dist::teacher::fuzzing::answer(data);
            a || b || c
        }
        "config" => match std::str::from_utf8(data) {
            Ok(text) => slim_cli::check_config(text, "fuzz.toml").is_ok(),
            Err(_) => false,
        },
        other => panic!("no fuzz target `{other}`"),
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_seed_reads_and_no_regression_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let targets = [
        "model_file",
        "idx",
        "cifar10",
        "sensitivity",
        "latency_table",
        "onnx",
        "dist_messages",
        "config",
    ];
    let mut seen = 0;
    for t in targets {
        for f in files(&fuzz_dir().join("seeds").join(t)) {
            let data = std::fs::read(&f).unwrap();
            assert!(
                run(t, &data, tmp.path()),
                "the seed {} does not read",
                f.display()
            );
            seen += 1;
        }
        // Every input kept so far is damaged: it must be refused, not only survived.
        for f in files(&fuzz_dir().join("regressions").join(t)) {
            let data = std::fs::read(&f).unwrap();
            assert!(
                !run(t, &data, tmp.path()),
                "the damaged input {} is read",
                f.display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 12, "{seen} inputs");
}
