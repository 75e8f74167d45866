//! Replays the fuzz seeds and every input kept under `fuzz/regressions/`
//! through the fuzz targets' properties, so they run in `cargo test` without
//! nightly or libFuzzer.

// The functions are `pub` for the fuzz crate; here they are used privately.
#[allow(unreachable_pub)]
mod checks {
    include!("../../fuzz/src/checks.rs");
}

use std::path::Path;

fn inputs(dir: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for sub in ["seeds", "regressions"] {
        let path = root.join(sub).join(dir);
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries {
            let entry = entry.expect("a directory entry");
            if entry.file_name().to_string_lossy().starts_with("README") {
                continue;
            }
            let data = std::fs::read(entry.path()).expect("a readable input");
            out.push((entry.path().display().to_string(), data));
        }
    }
    out
}

#[test]
fn codec_inputs_hold_the_codec_properties() {
    let all = inputs("codec");
    assert!(!all.is_empty(), "fuzz/seeds/codec is missing");
    for (name, data) in all {
        let result = std::panic::catch_unwind(|| checks::check_codec(&data));
        assert!(result.is_ok(), "{name} fails the codec properties");
    }
}

#[test]
fn jsonrpc_inputs_hold_the_parser_properties() {
    let all = inputs("jsonrpc");
    assert!(!all.is_empty(), "fuzz/seeds/jsonrpc is missing");
    for (name, data) in all {
        let result = std::panic::catch_unwind(|| checks::check_jsonrpc(&data));
        assert!(result.is_ok(), "{name} fails the jsonrpc properties");
    }
}
