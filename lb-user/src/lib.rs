//! xlb's control plane and CLI. The `xlb` binary is a thin shell over this
//! library; tests drive it directly too.
//!
//! Layers, each using only those before it: `model` (shared vocabulary),
//! `config`, `net` (netlink), `dataplane` (the maps' contract and the
//! loader), `discovery` and `health` (active checks), `control` (desired
//! state, Maglev, reconciler), `observe` (status, metrics, admin API),
//! `daemon`, `cli`.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod errors;
pub mod files;
pub mod health;
pub mod model;
pub mod net;
pub mod observe;

#[cfg(test)]
mod layering {
    //! Each layer uses only those listed before it in the crate docs.

    const LAYERS: [&[&str]; 9] = [
        &["model", "errors", "files"],
        &["config"],
        &["net"],
        &["dataplane"],
        &["discovery", "health"],
        &["control"],
        &["observe"],
        &["daemon"],
        &["cli"],
    ];

    fn rank(module: &str) -> usize {
        LAYERS
            .iter()
            .position(|l| l.contains(&module))
            .unwrap_or_else(|| panic!("module {module} has no layer"))
    }

    /// The top-level modules a source text names after `crate::`.
    fn used(text: &str) -> Vec<String> {
        let mut found = Vec::new();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let (mut depth, mut item) = (0, String::new());
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => found.push(std::mem::take(&mut item)),
                        _ if depth == 0 => item.push(c),
                        _ => {}
                    }
                }
                found.push(item);
            } else {
                found.push(rest.to_owned());
            }
        }
        found
            .iter()
            .map(|item| {
                item.trim()
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .filter(|m| !m.is_empty())
            .collect()
    }

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn no_module_uses_one_above_it() {
        let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
        let mut files = Vec::new();
        sources(root, &mut files);
        let mut wrong = Vec::new();
        for file in files {
            let relative = file.strip_prefix(root).unwrap();
            let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
            let module = top.trim_end_matches(".rs");
            if matches!(module, "lib" | "main") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for used in used(&text) {
                if rank(&used) > rank(module) {
                    wrong.push(format!("{} uses crate::{used}", relative.display()));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn the_scanner_reads_use_trees() {
        assert_eq!(used("use crate::{a::b, c, d::{e, f}};\nlet x = crate::g::h();"), ["a", "c", "d", "g"]);
    }
}
