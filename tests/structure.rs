//! The source tree's shape: no import cycle between files, so that each concept has one
//! home and data flows one way (see the README's layout table).
//!
//! An edge A → B is drawn when file A names a path (`crate::…`, `super::…`) that resolves
//! to file B. A child naming its own parent module's items is how Rust modules work and
//! draws no edge; everything else does, tests inside a file included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`["backend", "prefect3"]`) of every source file.
fn modules(root: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap();
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            // main.rs is the binary's root, not a module of the library.
            if rel != Path::new("main.rs") {
                out.insert(parts, path);
            }
        }
    }
    out
}

/// The code of a file without comments (doc comments name modules in prose).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a file names: `use` trees expanded, and inline `crate::`/`super::` paths.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices("use ") {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = code[i..].find(';') else {
            continue;
        };
        expand(&code[i + 4..i + end], &[], &mut out);
    }
    let bytes = code.as_bytes();
    for start in ["crate::", "super::"] {
        for (i, _) in code.match_indices(start) {
            if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
                continue;
            }
            let path: Vec<String> = code[i..]
                .split("::")
                .map(|seg| {
                    seg.chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect::<String>()
                })
                .take_while(|s| !s.is_empty())
                .collect();
            out.push(path);
        }
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into whole paths.
fn expand(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut depth = 0;
        let mut from = 0;
        let mut prefix = prefix.to_vec();
        prefix.extend(head);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[from..i], &prefix, out);
                    from = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[from..], &prefix, out);
    } else if !tree.is_empty() {
        let mut path = prefix.to_vec();
        path.extend(
            tree.split(" as ")
                .next()
                .unwrap_or(tree)
                .split("::")
                .map(|s| s.trim().to_string()),
        );
        out.push(path);
    }
}

/// The file a path names, from `module`: the longest prefix that is a module.
fn resolve(
    module: &[String],
    path: &[String],
    all: &BTreeMap<Vec<String>, PathBuf>,
) -> Option<Vec<String>> {
    let mut abs: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        // Each `super` is the parent module (a folder's mod.rs is the folder's module).
        Some("super") => {
            let ups = path.iter().take_while(|s| *s == "super").count();
            module[..module.len().saturating_sub(ups)].to_vec()
        }
        _ => return None,
    };
    abs.extend(
        path.iter()
            .skip_while(|s| *s == "super" || *s == "crate")
            .cloned(),
    );
    (0..=abs.len())
        .rev()
        .map(|n| abs[..n].to_vec())
        .find(|p| all.contains_key(p))
}

#[test]
fn no_source_file_imports_in_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let all = modules(&root);
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &all {
        for path in paths(&code(file)) {
            let Some(target) = resolve(module, &path, &all) else {
                continue;
            };
            // Itself, or one of its ancestors (a child using its parent's items).
            if target.len() <= module.len() && module[..target.len()] == target[..] {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    // Sanity: the graph was read (the agent uses the backend).
    let agent = vec!["agent".to_string()];
    assert!(
        edges
            .get(&agent)
            .is_some_and(|e| e.iter().any(|t| t.first().is_some_and(|s| s == "backend"))),
        "no edge agent → backend: the source was not read as expected"
    );
    // Depth-first search for a back edge.
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for start in all.keys() {
        let mut stack: Vec<(Vec<String>, Vec<Vec<String>>)> =
            vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, trail)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                if next == start {
                    let names: Vec<String> = trail.iter().map(|m| m.join("::")).collect();
                    cycles.push(format!("{} → {}", names.join(" → "), start.join("::")));
                } else if !done.contains(next) && seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
        done.insert(start.clone());
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn use_trees_expand_to_whole_paths() {
    let mut out = Vec::new();
    expand(
        "crate::work_pool::{template::apply_values, References as R, a::{b, c}}",
        &[],
        &mut out,
    );
    let joined: Vec<String> = out.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        joined,
        [
            "crate::work_pool::template::apply_values",
            "crate::work_pool::References",
            "crate::work_pool::a::b",
            "crate::work_pool::a::c"
        ]
    );
}
