//! The import graph of src/ runs one way (ARCHITECTURE.md): a module names only modules of
//! its own layer or below.

use std::collections::BTreeMap;
use std::path::Path;

/// Layer rank of each top-level module; a module may import modules of equal or lower rank.
fn rank(module: &str) -> Option<u32> {
    Some(match module {
        "rng" | "sys" | "atomic" | "tensor_file" | "pickle" | "tokenizer" | "schedulers"
        | "world" => 0,
        "ops" => 1,
        "models" => 2,
        "hub" => 3,
        "lora" => 4,
        "formats" => 5,
        "pipeline" => 6,
        "train" => 7,
        "bench" => 8,
        "cli" | "bin" => 9,
        _ => return None,
    })
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut checked = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        let Some(own) = rank(&top) else { continue };
        let text = std::fs::read_to_string(f).unwrap();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if let Some(r) = rank(&name) {
                checked += 1;
                if r > own {
                    wrong
                        .entry(rel.display().to_string())
                        .or_default()
                        .push(name);
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} crate paths found");
    assert!(wrong.is_empty(), "imports of higher layers: {wrong:#?}");
}
