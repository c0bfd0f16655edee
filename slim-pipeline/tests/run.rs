//! A pipeline run from Rust: parsed, run into a folder, read back by a second run without
//! training again, and refused in a folder that holds another pipeline's results.

use std::cell::Cell;

use slim_pipeline::{Events, Pipeline, RunOptions, DEFAULT_CONFIG};

const SMALL: &str = r#"
[model]
zoo = "lenet"
width = 0.5

[data]
spec = "builtin:mnist-10k"
limit = 2048

[train]
epochs = 1
lr = 0.003

[[strategy]]
kind = "prune.uniform"
ratio = 0.25
bn_calibration = 64

[[strategy]]
kind = "quant.ptq"
name = "int8"
calib_batches = 2
"#;

#[test]
fn a_pipeline_runs_resumes_and_guards_its_folder() {
    assert_eq!(
        Pipeline::parse(DEFAULT_CONFIG, "default")
            .expect("default")
            .kinds(),
        ["prune.uniform", "quant.ptq"]
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = RunOptions {
        dir: Some(dir.path().join("out")),
        ..Default::default()
    };
    let (notes, epochs) = (std::cell::RefCell::new(Vec::new()), Cell::new(0));
    let run = |text: &str| {
        let mut pipeline = Pipeline::parse(text, "small.toml").expect("parse");
        let events = Events {
            note: &|m| notes.borrow_mut().push(m.to_string()),
            progress: &mut |p| {
                if matches!(p, slim_core::train::Progress::EpochEnd { .. }) {
                    epochs.set(epochs.get() + 1);
                }
            },
            status: &|_| {},
        };
        pipeline.run(&opts, events)
    };
    let report = run(SMALL).expect("run");
    let names: Vec<&str> = report.stages.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["baseline", "prune.uniform", "int8"]);
    let (base, pruned) = (&report.stages[0], &report.stages[1]);
    assert!(
        pruned.macs < base.macs,
        "{} against {}",
        pruned.macs,
        base.macs
    );
    assert!(base.top1.is_some_and(|t| t > 0.5), "{:?}", base.top1);
    assert!(report.stages.iter().all(|r| r.measured_ms.is_some()));
    for file in [
        "report.md",
        "report.json",
        "accuracy-size.svg",
        "pipeline.json",
    ] {
        assert!(report.dir.join(file).is_file(), "{file}");
    }
    assert!(report.table.contains("int8"), "{}", report.table);
    let trained = epochs.get();
    assert!(trained >= 1);
    // The same pipeline again: every stage read back, nothing trained.
    let again = run(SMALL).expect("again");
    assert_eq!(epochs.get(), trained);
    assert_eq!(again.stages[2].top1, report.stages[2].top1);
    assert!(notes.borrow().iter().any(|n| n.ends_with("int8 (done)")));
    // Another pipeline in the same folder is refused, naming the folder.
    let err = run(&SMALL.replace("ratio = 0.25", "ratio = 0.5"))
        .err()
        .expect("another pipeline");
    assert!(
        err.is_input() && err.to_string().contains("another pipeline"),
        "{err}"
    );
}
