//! `docs/onnx.md` is the importer's own table: every supported op listed once, and the page
//! equal to what `slim_onnx::ops::markdown` renders (`SLIM_BLESS=1` rewrites it).

use std::path::PathBuf;

use slim_onnx::ops::{markdown, OP_TABLE};

#[test]
fn the_onnx_page_is_the_importers_table() {
    let mut names: Vec<&str> = OP_TABLE.iter().map(|(op, _)| *op).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "an op is listed twice");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/onnx.md");
    let page = markdown();
    if std::env::var("SLIM_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &page).expect("write docs/onnx.md");
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == page,
        "docs/onnx.md differs from the importer's table; run SLIM_BLESS=1 cargo test -p slim-onnx --test docs"
    );
}

/// Every relative link in README.md and docs/ names a file that exists.
#[test]
fn relative_links_in_the_docs_resolve() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut pages = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).expect("docs") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).expect("page");
        for part in text.split("](").skip(1) {
            let Some(target) = part.split(')').next() else {
                continue;
            };
            let path = target.split('#').next().unwrap_or("");
            if path.is_empty() || path.contains("://") || path.starts_with("mailto:") {
                continue;
            }
            let dir = page.parent().expect("folder");
            if !dir.join(path).exists() {
                broken.push(format!("{}: {target}", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "links to nothing: {broken:?}");
}
