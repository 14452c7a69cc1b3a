//! Every TOML config shipped in the repository loads and validates and shows no secret in
//! `{:?}`, and a misspelled key is reported by name and line.

use std::path::{Path, PathBuf};

use dedupd::config::Config;

/// TOML files in the repository that are not dedupd configs.
const NOT_CONFIGS: &[&str] = &[
    "Cargo.toml",
    "rustfmt.toml",
    ".rustfmt.toml",
    "clippy.toml",
    ".clippy.toml",
    "deny.toml",
    "rust-toolchain.toml",
    "typos.toml",
    "_typos.toml",
];

/// Every `*.toml` under `dir`, skipping build output and hidden directories.
fn toml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("directory entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                toml_files(&path, found);
            }
        } else if name.ends_with(".toml") && !NOT_CONFIGS.contains(&name) {
            found.push(path);
        }
    }
}

/// Sets every `${VAR}` that `text` uses and the environment lacks to a dummy value (also those
/// in comments, which is harmless).
fn set_dummy_env(text: &str) {
    for (i, _) in text.match_indices("${") {
        if text[..i].ends_with('$') {
            continue; // `$${` is a literal
        }
        let name = text[i + 2..].split_once('}').map_or("", |(n, _)| n);
        let is_name =
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if is_name && std::env::var_os(name).is_none() {
            std::env::set_var(name, "dummy-secret");
        }
    }
}

#[test]
fn every_shipped_config_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    toml_files(root, &mut files);
    for expected in [
        "proxy.toml",
        "deploy/proxy.cluster.toml",
        "deploy/proxy.postgres.toml",
        "deploy/proxy.embedded.toml",
    ] {
        assert!(
            files.contains(&root.join(expected)),
            "{expected} not found in {files:?}"
        );
    }
    for file in &files {
        set_dummy_env(&std::fs::read_to_string(file).expect("readable config"));
        let config = match Config::load(file) {
            Ok(config) => config,
            Err(e) => panic!("{} does not load:\n{e}", file.display()),
        };
        // Neither a password written in the file nor a value from the environment.
        for shown in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(
                !shown.contains("dummy-secret") && !shown.contains(":guest@"),
                "{} shows a secret:\n{shown}",
                file.display()
            );
        }
    }
}

#[test]
fn misspelled_key_is_named_with_its_line() {
    let dir = std::env::temp_dir().join(format!("dedupd-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("typo.toml");
    let text = "[upstream]\nurl = \"amqp://127.0.0.1:5672/%2f\"\nprefecth = 10\n\n\
                [routes.a]\nqueue = \"a\"\nexchange = \"x\"\n";
    std::fs::write(&file, text).expect("write temp config");
    let result = Config::load(&file);
    let _ = std::fs::remove_dir_all(&dir);
    let message = result
        .expect_err("a misspelled key must be refused")
        .to_string();
    assert!(message.contains("prefecth"), "{message}");
    assert!(message.contains("line 3"), "{message}");
}
