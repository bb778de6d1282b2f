//! The module graph stays layered: reads `src/` and fails when a top-level module imports one
//! that comes after it in the order `src/lib.rs`'s module docs declare ("Layers, bottom to
//! top"). No cycle can come back without this test failing.

use std::collections::HashMap;
use std::path::Path;

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// The declared order: the backquoted names on the doc lines after "Layers, bottom to top".
fn declared_order() -> Vec<String> {
    let lib = std::fs::read_to_string(format!("{SRC}/lib.rs")).unwrap();
    let mut lines = lib.lines().skip_while(|l| !l.contains("Layers, bottom to top"));
    lines.next().expect("src/lib.rs declares \"Layers, bottom to top\"");
    let mut order = Vec::new();
    for line in lines.take_while(|l| l.starts_with("//!") && l.trim() != "//!") {
        let mut rest = line;
        while let Some(start) = rest.find('`') {
            let Some(len) = rest[start + 1..].find('`') else { break };
            order.push(rest[start + 1..start + 1 + len].to_string());
            rest = &rest[start + len + 2..];
        }
    }
    order
}

/// The top-level modules a file's code names through `crate::`.
fn imports(text: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c}` (one line): the first name of each item.
                let body = group.split('}').next().unwrap_or("");
                out.extend(body.split(',').map(|item| ident(item.trim())).filter(|s| !s.is_empty()));
            } else {
                out.push(ident(rest));
            }
        }
    }
    out
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_one_above_it() {
    let order = declared_order();
    assert!(
        order.len() >= 10,
        "the layer list in src/lib.rs is too short: {order:?}"
    );
    let rank: HashMap<&str, usize> = order.iter().enumerate().map(|(i, m)| (m.as_str(), i)).collect();
    let mut wrong = Vec::new();
    for module in &order {
        let mut paths = Vec::new();
        let file = Path::new(SRC).join(format!("{module}.rs"));
        if file.exists() {
            paths.push(file);
        }
        let dir = Path::new(SRC).join(module);
        if dir.is_dir() {
            files(&dir, &mut paths);
        }
        if module != "proto" {
            assert!(!paths.is_empty(), "src/lib.rs lists `{module}`, which has no file");
        }
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap();
            for used in imports(&text) {
                match rank.get(used.as_str()) {
                    Some(&r) if r > rank[module.as_str()] => {
                        wrong.push(format!("{} imports `{used}`, a layer above `{module}`", path.display()))
                    }
                    Some(_) => {}
                    None => wrong.push(format!(
                        "{} imports `{used}`, which is not in the layer list",
                        path.display()
                    )),
                }
            }
        }
    }
    // Every top-level module is placed.
    for entry in std::fs::read_dir(SRC).unwrap() {
        let name = entry
            .unwrap()
            .file_name()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if !["lib", "main", "bin"].contains(&name.as_str()) {
            assert!(
                rank.contains_key(name.as_str()),
                "src/{name} is not in src/lib.rs's layer list"
            );
        }
    }
    assert!(
        wrong.is_empty(),
        "the module graph is not layered:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_import_scanner_sees_grouped_and_nested_paths() {
    let found =
        imports("use crate::{keys, backend::Backend};\nlet x = crate::error::Error::NotReady;\n// crate::ops\n");
    assert_eq!(found, ["keys", "backend", "error"]);
}
