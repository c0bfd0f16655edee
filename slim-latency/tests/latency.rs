//! Latency tables: built from a model, read back, used for estimates, and refused when they
//! cannot answer.

use candle_core::Device;
use slim_core::search::CostModel;
use slim_core::zoo::{self, ZooConfig};
use slim_core::Model;
use slim_latency::{
    build, estimate, validate, BuildOptions, DeviceInfo, LatencyCost, Runtime, Subject, Table,
};

fn lenet(width: f64) -> Model {
    let cfg = ZooConfig::new([1, 28, 28]).with_width(width);
    zoo::model("lenet", &cfg, 0, &Device::Cpu).unwrap()
}

fn built(m: &Model) -> Table {
    let table = Table::new(DeviceInfo::this_machine(Runtime::F32, 1, 1));
    let opts = BuildOptions {
        runs: 5,
        warmup: 1,
        warmup_ms: 0.0,
    };
    let subjects = [Subject {
        name: "lenet".into(),
        model: m,
    }];
    let mut calls = 0;
    let (table, report) = build(table, &subjects, None, &opts, &mut |_| calls += 1).unwrap();
    assert_eq!(calls, 5);
    assert_eq!(report.remeasured, 0);
    assert_eq!(report.added, table.entries.len());
    table
}

#[test]
fn a_built_table_estimates_its_model_and_reads_back() {
    let m = lenet(1.0);
    let table = built(&m);
    // Every op but the input has a signature; a repeated one is stored once.
    let ops = m.graph.len() - 1;
    assert!(table.entries.len() <= ops && !table.entries.is_empty());
    for e in &table.entries {
        assert!(e.p25_ms <= e.median_ms && e.median_ms <= e.p75_ms, "{e:?}");
        assert!(e.samples >= 5);
    }
    let e = estimate(&table, &m, false).unwrap();
    assert_eq!(e.ops.len(), ops);
    let sum: f64 = e.ops.iter().map(|o| o.ms).sum();
    assert!((sum - e.ops_ms).abs() < 1e-9);
    assert!((e.total_ms - e.ops_ms - e.overhead_ms).abs() < 1e-9);
    // The same estimate through the cost-model trait, from the graph alone.
    let cost = LatencyCost {
        table: table.clone(),
        fallback: false,
    };
    assert!((cost.cost(&m.graph).unwrap() - e.total_ms).abs() < 1e-9);
    assert!(cost.unit().contains("f32 runtime"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.json");
    table.save(&path).unwrap();
    assert_eq!(Table::load(&path).unwrap(), table);
    table.check(&path, Runtime::F32).unwrap();
    let err = table.check(&path, Runtime::Int8).unwrap_err().to_string();
    assert!(
        err.contains("t.json") && err.contains("f32 runtime"),
        "{err}"
    );

    // The measurement of the whole model agrees with the sum of its parts here.
    let v = validate(
        &table,
        &[Subject {
            name: "lenet".into(),
            model: &m,
        }],
        None,
        &BuildOptions {
            runs: 5,
            warmup: 1,
            warmup_ms: 0.0,
        },
        false,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(v.models.len(), 1);
    assert!(v.mape.is_finite() && v.models[0].measured_ms > 0.0);
}

#[test]
fn missing_ops_are_listed_unless_the_fallback_is_asked_for() {
    let table = built(&lenet(1.0));
    let wider = lenet(2.0);
    let err = estimate(&table, &wider, false).unwrap_err().to_string();
    assert!(
        err.contains("conv2d") && err.contains("--fallback"),
        "{err}"
    );
    // One line per missing signature.
    let listed = err.lines().filter(|l| l.starts_with("  ")).count();
    assert!(listed >= 2, "{err}");
    let e = estimate(&table, &wider, true).unwrap();
    assert!(!e.fallback.is_empty());
    assert!(e.ops.iter().any(|o| o.fallback) && e.total_ms > 0.0);
    // An int8 table wants the int8 runtime's kernels and an int8 model.
    let int8 = Table::new(DeviceInfo::this_machine(Runtime::Int8, 1, 1));
    let m = lenet(1.0);
    let subjects = [Subject {
        name: "lenet".into(),
        model: &m,
    }];
    let err = build(int8, &subjects, None, &BuildOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("kernels"), "{err}");
    let err = estimate(
        &Table::new(DeviceInfo::this_machine(Runtime::Int8, 1, 1)),
        &m,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no int8 layers"), "{err}");
}

#[test]
fn damaged_tables_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    for (text, want) in [
        ("{not json", "is not JSON"),
        ("{\"format\": \"other\"}", "is not a latency table"),
        (
            "{\"format\": \"slim-latency-table\", \"version\": 1}",
            "damaged",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = Table::load(&path).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains(want), "{err}");
    }
    let table = built(&lenet(1.0));
    let mut v = serde_json::to_value(&table).unwrap();
    v["entries"][0]["median_ms"] = serde_json::json!(-1.0);
    std::fs::write(&path, v.to_string()).unwrap();
    let err = Table::load(&path).unwrap_err().to_string();
    assert!(err.contains("invalid time"), "{err}");
    assert!(Table::load(&dir.path().join("none.json")).is_err());
}
