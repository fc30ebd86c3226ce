//! The crate's modules depend on each other in one direction only, as the
//! module map in `src/lib.rs` says: no circle among the top-level modules,
//! the pure registry imports nothing of the crate, and nothing below the
//! HTTP layer reaches back up into it; nor do the files of one folder
//! (`src/bench/`, `src/api/`, ...) depend on each other in a circle.
//!
//! Read from the source as text: every `crate::name` path outside comments
//! and outside a file's `#[cfg(test)]` part counts as a dependency of the
//! file's top-level module on `name`.
//!
//! Shown to fail on a broken build: with `use crate::api::ApiError;` added to
//! `src/leader/writes.rs`, `layers_run_one_way` failed naming
//! `leader -> api`, and `no_circle_among_modules` failed with the circle
//! `api -> leader -> api`. `LAYERING_SELF_TEST=1` adds such an edge in
//! memory and checks that both checks catch it. The folder check failed on
//! the bench module as it stood before d723710, naming the circle
//! `backend -> fleet -> backend`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None`: the crate root
/// and the binary).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(m) => Some(m.to_string()),
        None => Some(first),
    }
}

/// The top-level modules named by `crate::` paths in `code`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    path_refs(code, "crate::")
}

/// The names right after `prefix` (`crate::`, `super::`, `crate::api::`)
/// in `code`, at the first level of a `{...}` group too.
fn path_refs(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue; // e.g. `my_crate::`, or `super::super::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the names at the first level.
            let (mut depth, mut start) = (0usize, true);
            let mut name = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if depth == 0 && start && (c.is_alphanumeric() || c == '_') => name.push(c),
                    _ => {
                        if !name.is_empty() {
                            found.insert(std::mem::take(&mut name));
                            start = false;
                        }
                    }
                }
            }
            if !name.is_empty() {
                found.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// A file's code without comments and without its `#[cfg(test)]` part.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let line = match line.find("//") {
            // A `//` inside a string (a URL) is rare in `crate::` lines;
            // cutting there only ever drops text.
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g = Graph::new();
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read a source file");
        let deps = g.entry(m.clone()).or_default();
        for r in crate_refs(&code_of(&text)) {
            if r != m && modules.contains(&r) {
                deps.insert(r);
            }
        }
    }
    if std::env::var_os("LAYERING_SELF_TEST").is_some() {
        g.entry("leader".into()).or_default().insert("api".into());
    }
    g
}

/// A circle of modules, if there is one.
fn find_circle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut circle = path[i..].to_vec();
            circle.push(m.to_string());
            return Some(circle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
}

#[test]
fn the_reader_finds_crate_paths() {
    let refs = crate_refs("use crate::api::{self, X};\nuse crate::{raft::Y, leader::{a, b}, clock};\nfoo_crate::x; crate::metrics::M");
    let want: BTreeSet<String> = ["api", "raft", "leader", "clock", "metrics"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(refs, want);
    assert!(code_of("a // crate::api\n#[cfg(test)]\nuse crate::node;")
        .find("crate::")
        .is_none());
}

#[test]
fn no_circle_among_modules() {
    let g = graph();
    assert!(g.len() > 10, "too few modules found: {g:?}");
    if let Some(c) = find_circle(&g) {
        panic!(
            "the modules depend on each other in a circle: {}",
            c.join(" -> ")
        );
    }
}

#[test]
fn layers_run_one_way() {
    let g = graph();
    // Each layer may use only what is below it: `registry` is pure;
    // nothing under the HTTP layer reaches into it or above it.
    let below_api = [
        "leader",
        "forwarding",
        "raft",
        "registry",
        "clock",
        "metrics",
    ];
    let above_api = ["api", "node", "gateway", "admin", "bench", "demo", "client"];
    let mut wrong = Vec::new();
    for (m, deps) in &g {
        for d in deps {
            let up = (m == "registry")
                || (below_api.contains(&m.as_str()) && above_api.contains(&d.as_str()))
                || (m == "raft" && ["leader", "forwarding"].contains(&d.as_str()))
                || (m == "forwarding" && d == "leader");
            if up {
                wrong.push(format!("{m} -> {d}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that run back up (see the module map in src/lib.rs): {wrong:?}\nwhole graph: {g:#?}"
    );
}

/// Inside each folder of `src/`: which file uses which sibling (through
/// `super::name` or the folder's full `crate::` path). `mod.rs` is left
/// out: it declares its children, and they may use what it re-exports.
fn sibling_graphs() -> BTreeMap<PathBuf, Graph> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out: BTreeMap<PathBuf, Graph> = BTreeMap::new();
    for f in &files {
        let dir = f.parent().expect("a file has a folder").to_path_buf();
        let me = f.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        if dir == src || me == "mod" {
            continue;
        }
        let siblings: BTreeSet<String> = std::fs::read_dir(&dir)
            .expect("read a folder")
            .filter_map(|e| {
                let p = e.ok()?.path();
                let stem = p.file_stem()?.to_str()?.to_string();
                (p.is_dir() || p.extension().is_some_and(|x| x == "rs")).then_some(stem)
            })
            .filter(|s| s != "mod" && s != me)
            .collect();
        let module_path = dir
            .strip_prefix(&src)
            .expect("under src")
            .components()
            .filter_map(|c| c.as_os_str().to_str())
            .collect::<Vec<_>>()
            .join("::");
        let code = code_of(&std::fs::read_to_string(f).expect("read a source file"));
        let mut refs = path_refs(&code, "super::");
        refs.extend(path_refs(&code, &format!("crate::{module_path}::")));
        let deps = out
            .entry(dir)
            .or_default()
            .entry(me.to_string())
            .or_default();
        deps.extend(refs.into_iter().filter(|r| siblings.contains(r)));
    }
    out
}

#[test]
fn no_circle_among_the_files_of_a_folder() {
    let graphs = sibling_graphs();
    assert!(graphs.len() > 5, "too few folders found: {graphs:?}");
    let mut circles = Vec::new();
    for (dir, g) in &graphs {
        if let Some(c) = find_circle(g) {
            circles.push(format!("{}: {}", dir.display(), c.join(" -> ")));
        }
    }
    assert!(
        circles.is_empty(),
        "files that depend on each other in a circle:\n{}",
        circles.join("\n")
    );
}
