//! docs/cli.md stays true to the binary: its option tables are rendered from the command
//! line's own definitions (`SLIM_BLESS=1` rewrites them), every option its examples use exists,
//! and every command has an example.

use std::collections::BTreeSet;
use std::path::PathBuf;

const MARK: &str = "<!-- The part below is rendered from the command line's definitions. -->";

/// Every command that runs something, as its words after `slim`, with its clap definition.
fn leaves(cmd: &clap::Command, path: &[String], out: &mut Vec<(Vec<String>, clap::Command)>) {
    let subs: Vec<&clap::Command> = cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help")
        .collect();
    // A command runs something when it has no subcommands or options of its own beside them
    // (the options of `slim` itself are every command's).
    if !path.is_empty()
        && (subs.is_empty() || cmd.get_arguments().any(|a| shown(a) && !a.is_global_set()))
    {
        out.push((path.to_vec(), cmd.clone()));
    }
    for s in subs {
        let mut p = path.to_vec();
        p.push(s.get_name().to_string());
        leaves(s, &p, out);
    }
}

/// The command line with its global options given to every command, as clap does when it
/// parses.
fn built() -> clap::Command {
    let mut cmd = slim_cli::command();
    cmd.build();
    cmd
}

/// One line of a table cell: the help text on one line, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn shown(arg: &clap::Arg) -> bool {
    !arg.is_hide_set() && !matches!(arg.get_id().as_str(), "help" | "version")
}

/// `--name VALUE`, `-q, --quiet` or `MODEL`.
fn spelling(arg: &clap::Arg) -> String {
    let values: Vec<String> = arg
        .get_value_names()
        .map(|v| v.iter().map(|s| s.to_string()).collect())
        .unwrap_or_else(|| vec![arg.get_id().as_str().to_uppercase()]);
    let takes_value = arg.get_action().takes_values();
    match arg.get_long() {
        None => values.join(" "),
        Some(long) => {
            let mut s = match arg.get_short() {
                Some(c) => format!("-{c}, --{long}"),
                None => format!("--{long}"),
            };
            if takes_value {
                s.push(' ');
                s.push_str(&values.join(" "));
            }
            s
        }
    }
}

fn row(arg: &clap::Arg) -> String {
    let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
    let mut extra = Vec::new();
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| v.get_name().to_string())
        .collect();
    if arg.get_action().takes_values() && !possible.is_empty() {
        extra.push(format!("one of {}", possible.join(", ")));
    }
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|d| d.to_string_lossy().into_owned())
        .collect();
    if !defaults.is_empty() && arg.get_action().takes_values() {
        extra.push(format!("default {}", defaults.join(" ")));
    }
    if arg.is_required_set() && arg.get_long().is_some() {
        extra.push("required".into());
    }
    let mut meaning = cell(&help);
    if !extra.is_empty() {
        if !meaning.is_empty() {
            meaning.push(' ');
        }
        meaning.push_str(&format!("({})", extra.join("; ")));
    }
    format!("| `{}` | {} |\n", spelling(arg), meaning)
}

/// The rendered part of docs/cli.md: the options every command shares once, then each
/// command's own.
fn render() -> String {
    let mut commands = Vec::new();
    leaves(&built(), &[], &mut commands);
    // Options most commands take with the same meaning are listed once.
    let key = |a: &clap::Arg| row(a);
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for (_, c) in &commands {
        for a in c.get_arguments().filter(|a| shown(a)) {
            *counts.entry(key(a)).or_default() += 1;
        }
    }
    let shared: BTreeSet<String> = counts
        .into_iter()
        .filter(|(_, n)| 2 * n > commands.len())
        .map(|(r, _)| r)
        .collect();
    let mut out = String::from(MARK);
    out.push_str("\n\n## Options of every command\n\n");
    out.push_str(
        "Rendered from the definitions `slim COMMAND --help` prints; a test fails when this part \
         is stale (`SLIM_BLESS=1 cargo test -p slim-cli --test docs` rewrites it).\n\n",
    );
    out.push_str("Most commands take:\n\n| option | meaning |\n|---|---|\n");
    let mut listed = BTreeSet::new();
    for (_, c) in &commands {
        for a in c.get_arguments().filter(|a| shown(a)) {
            if shared.contains(&key(a)) && listed.insert(key(a)) {
                out.push_str(&row(a));
            }
        }
    }
    for (path, c) in &commands {
        let positional: Vec<String> = c
            .get_positionals()
            .filter(|a| shown(a))
            .map(spelling)
            .collect();
        let title = std::iter::once("slim".to_string())
            .chain(path.iter().cloned())
            .chain(positional)
            .collect::<Vec<_>>()
            .join(" ");
        out.push_str(&format!("\n### `{title}`\n\n"));
        if let Some(about) = c.get_about() {
            out.push_str(&cell(&about.to_string()));
            out.push_str("\n\n");
        }
        let own: Vec<&clap::Arg> = c
            .get_arguments()
            .filter(|a| shown(a) && !shared.contains(&key(a)))
            .collect();
        if !own.is_empty() {
            out.push_str("| option | meaning |\n|---|---|\n");
            for a in &own {
                out.push_str(&row(a));
            }
        }
        let common: Vec<String> = c
            .get_arguments()
            .filter(|a| shown(a) && shared.contains(&key(a)))
            .map(|a| format!("`{}`", spelling(a)))
            .collect();
        if !common.is_empty() {
            if !own.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("And {} (above).\n", common.join(", ")));
        }
    }
    out
}

fn page_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md")
}

#[test]
fn the_option_tables_are_the_binarys() {
    let path = page_path();
    let current = std::fs::read_to_string(&path).expect("docs/cli.md");
    let written = current.split(MARK).next().unwrap_or("").trim_end();
    let page = format!("{written}\n\n{}", render());
    if std::env::var("SLIM_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &page).expect("write docs/cli.md");
        return;
    }
    assert!(
        current == page,
        "docs/cli.md's option tables differ from the command line; run SLIM_BLESS=1 cargo \
         test -p slim-cli --test docs"
    );
}

/// The hand-written part: every `--option` its examples use is an option of some command,
/// and every command appears in an example.
#[test]
fn the_examples_use_real_commands_and_options() {
    let current = std::fs::read_to_string(page_path()).expect("docs/cli.md");
    let written = current.split(MARK).next().unwrap_or("");
    let mut commands = Vec::new();
    leaves(&built(), &[], &mut commands);
    let mut longs = BTreeSet::new();
    for (_, c) in &commands {
        for a in c.get_arguments() {
            if let Some(l) = a.get_long() {
                longs.insert(l.to_string());
            }
        }
    }
    let mut unknown = BTreeSet::new();
    for part in written.split("--").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        // `--` alone, or a markdown rule.
        if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_lowercase()) || name == "help"
        {
            continue;
        }
        if !longs.contains(&name) {
            unknown.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "docs/cli.md uses options no command has: {unknown:?}"
    );
    let missing: Vec<String> = commands
        .iter()
        .map(|(p, _)| format!("slim {}", p.join(" ")))
        .filter(|c| !written.contains(c.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "commands without an example in docs/cli.md: {missing:?}"
    );
}

/// The keys the pipeline parser takes in one table, read from its answer to a key it does not
/// know (serde lists the expected fields).
fn parser_keys(config: &str) -> BTreeSet<String> {
    let e = match slim_cli::check_config(config, "probe.toml") {
        Ok(_) => panic!("the parser took an unknown key:\n{config}"),
        Err(f) => format!("{:#}", f.error),
    };
    let expected = e
        .split("expected")
        .nth(1)
        .unwrap_or_else(|| panic!("no list of keys in: {e}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// docs/pipeline.md lists every key of every table the parser takes, and no other, and each
/// TOML example on it is a valid pipeline.
#[test]
fn the_pipeline_page_is_the_parsers() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/pipeline.md");
    let page = std::fs::read_to_string(path).expect("docs/pipeline.md");
    // The keys of each `### ` section's table.
    let mut sections: Vec<(String, BTreeSet<String>)> = Vec::new();
    for line in page.lines() {
        if let Some(title) = line.strip_prefix("### ") {
            sections.push((title.to_string(), BTreeSet::new()));
        } else if let (Some(key), Some(last)) = (line.strip_prefix("| `"), sections.last_mut()) {
            last.1
                .insert(key.split('`').next().unwrap_or("").to_string());
        }
    }
    let documented = |title: &str| -> BTreeSet<String> {
        sections
            .iter()
            .find(|(t, _)| t == title)
            .unwrap_or_else(|| panic!("docs/pipeline.md has no section `### {title}`"))
            .1
            .clone()
    };
    let zoo = "[model]\nzoo = \"lenet\"\n";
    let top = parser_keys(&format!("zz_probe = 1\n{zoo}"));
    for table in &top {
        let title = if table == "strategy" {
            "Every [[strategy]]".to_string()
        } else {
            format!("[{table}]")
        };
        let docs = documented(&title);
        if table == "strategy" {
            // The runner takes these itself; the stage's options are per kind below.
            let own: BTreeSet<String> = ["kind", "name", "from"].map(String::from).into();
            assert_eq!(docs, own, "docs/pipeline.md, {title}");
            continue;
        }
        let probe = if table == "model" {
            "[model]\nzz_probe = 1\n".to_string()
        } else {
            format!("{zoo}[{table}]\nzz_probe = 1\n")
        };
        assert_eq!(docs, parser_keys(&probe), "docs/pipeline.md, {title}");
    }
    let kinds = [
        "prune.uniform, prune.sensitivity, prune.auto",
        "quant.ptq",
        "quant.qat",
        "distill",
        "nas.sa, nas.oneshot",
    ];
    for title in kinds {
        let docs = documented(title);
        for kind in title.split(", ") {
            let probe = format!("{zoo}[[strategy]]\nkind = \"{kind}\"\nzz_probe = 1\n");
            assert_eq!(docs, parser_keys(&probe), "docs/pipeline.md, {kind}");
        }
    }
    let documented_kinds: BTreeSet<&str> = kinds.iter().flat_map(|t| t.split(", ")).collect();
    for kind in slim_cli::check_config(&format!("{zoo}[[strategy]]\nkind = \"zz\"\n"), "p")
        .err()
        .map(|f| format!("{:#}", f.error))
        .unwrap_or_default()
        .split("expected")
        .nth(1)
        .unwrap_or("")
        .split([' ', ',', ')'])
        .filter(|w| w.contains('.') || *w == "distill")
    {
        assert!(
            documented_kinds.contains(kind),
            "docs/pipeline.md has no section for strategy kind {kind}"
        );
    }
    let examples: Vec<&str> = page
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or(""))
        .collect();
    assert!(examples.len() >= 2, "docs/pipeline.md lost its examples");
    for (i, example) in examples.iter().enumerate() {
        if let Err(f) = slim_cli::check_config(example, "docs/pipeline.md") {
            panic!("example {} of docs/pipeline.md: {:#}", i + 1, f.error);
        }
    }
}

/// A crate's README (its crates.io page): the crate documentation of its `src/lib.rs`, with
/// rustdoc's links to items turned into plain code, and where to find the rest.
fn crate_readme(name: &str, lib_rs: &str) -> String {
    let docs: Vec<&str> = lib_rs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take_while(|l| l.starts_with("//!"))
        .map(|l| {
            l.strip_prefix("//! ")
                .unwrap_or(l.trim_start_matches("//!"))
        })
        .collect();
    let mut text = String::new();
    if !docs.first().is_some_and(|l| l.starts_with("# ")) {
        text.push_str(&format!("# {name}\n\n"));
    }
    // Outside code, `[X]` or `[`X`]` with no `(address)` after it is an intra-doc link: keep
    // its text. In code blocks, the lines rustdoc hides (`# ...`) are left out.
    let mut fenced = false;
    for line in &docs {
        if line.starts_with("```") {
            // rustdoc's own attributes (`no_run`, `ignore`, ...) mean Rust to it; a README
            // says `rust`.
            let rustdoc = ["", "no_run", "ignore", "should_panic", "compile_fail"];
            text.push_str(if !fenced && rustdoc.contains(&&line[3..]) {
                "```rust"
            } else {
                line
            });
            text.push('\n');
            fenced = !fenced;
            continue;
        }
        if fenced {
            if *line != "#" && !line.starts_with("# ") {
                text.push_str(line);
                text.push('\n');
            }
            continue;
        }
        let mut in_code = false;
        let mut rest = *line;
        while let Some(c) = rest.chars().next() {
            if c == '`' {
                in_code = !in_code;
            } else if c == '[' && !in_code {
                if let Some(end) = rest.find(']') {
                    let after = rest[end + 1..].chars().next();
                    if !rest[1..end].contains('[') && after != Some('(') && after != Some('[') {
                        text.push_str(&rest[1..end]);
                        rest = &rest[end + 1..];
                        continue;
                    }
                }
            }
            text.push(c);
            rest = &rest[c.len_utf8()..];
        }
        text.push('\n');
    }
    text.push_str(
        "\n---\n\nPart of Slim, a model-compression toolkit in Rust over candle: the \
         [repository](https://github.com/slim-rs/slim) has the `slim` command, the other \
         crates and the docs. License: MIT OR Apache-2.0.\n",
    );
    text
}

/// Every published crate's README.md is its crate documentation (`SLIM_BLESS=1` rewrites
/// them), so that its crates.io page says what its docs say.
#[test]
fn every_crate_readme_is_its_crate_documentation() {
    let root = page_path()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let bless = std::env::var("SLIM_BLESS").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for name in [
        "slim-kernels",
        "slim-core",
        "slim-prune",
        "slim-quant",
        "slim-distill",
        "slim-nas",
        "slim-latency",
        "slim-onnx",
        "slim-dist",
        "slim-pipeline",
        "slim-cli",
    ] {
        let dir = root.join(name);
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        let want = crate_readme(name, &lib);
        let path = dir.join("README.md");
        if bless {
            std::fs::write(&path, &want).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(want.as_str()) {
            stale.push(name);
        }
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains("\nreadme = \"README.md\""),
            "{name}/Cargo.toml: its readme is its own README.md"
        );
    }
    assert!(
        stale.is_empty(),
        "{stale:?}: README.md differs from the crate documentation; run SLIM_BLESS=1 cargo \
         test -p slim-cli --test docs"
    );
}
