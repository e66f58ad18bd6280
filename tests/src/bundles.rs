//! Deploy bundles (`PUT /v1/pipelines/{name}`): eco-scan's files as a tar, for the deploy tests
//! and the propagation benchmark.

use std::collections::BTreeMap;

use crate::{plugin_bytes, repo_root};

/// A bundle's files: path in the bundle -> bytes.
pub type Files = BTreeMap<String, Vec<u8>>;

/// eco-scan's files as a bundle holds them: `pipeline.toml` naming `c/<stage>.wasm` and the kv
/// files beside it; `edit` is applied to the pipeline file's text, and the bundle holds the
/// components the edited file names.
pub fn eco_bundle(edit: impl FnOnce(String) -> String) -> Files {
    let example = repo_root().join("examples/eco-scan");
    let text = edit(
        std::fs::read_to_string(example.join("pipeline.toml"))
            .unwrap()
            .replace("\"../../target/wasm32-wasip2/release/", "\"c/"),
    );
    let mut files = BTreeMap::new();
    for component in [
        "vision",
        "rule",
        "answer",
        "reward",
        "character_match",
        "save_ownership",
        "save_character",
    ] {
        let path = format!("c/{component}.wasm");
        if text.contains(&path) {
            files.insert(path, plugin_bytes(component));
        }
    }
    for kv in ["disposal_rules.json", "characters.json"] {
        files.insert(kv.to_string(), std::fs::read(example.join(kv)).unwrap());
    }
    files.insert("pipeline.toml".to_string(), text.into_bytes());
    files
}

/// The eco-scan pipeline file without its `reward` stage: a revision of another shape.
pub fn without_reward(text: String) -> String {
    let start = text
        .find("[[stage]]\nname = \"reward\"")
        .expect("a reward stage");
    let end = start + text[start..].find("\n\n").expect("a blank line after it");
    format!("{}{}", &text[..start], &text[end + 2..])
}

pub fn tar(files: &Files) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, path, bytes.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap()
}
