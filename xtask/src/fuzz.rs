//! `cargo xtask fuzz [--seconds N]`: runs every cargo-fuzz target in `fuzz/` for
//! a fixed time each and fails if any of them finds a crash.
//!
//! Needs a nightly toolchain (libFuzzer instrumentation); installs
//! cargo-fuzz with `cargo install --locked cargo-fuzz` when it is missing.
//! The fuzz crate keeps cargo-fuzz's own target dir (`fuzz/target`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, heading, render};

/// libFuzzer's memory limit per target, in MiB.
const RSS_LIMIT_MB: u32 = 2048;

/// A `cargo +nightly ...` command run from `fuzz/`, with the fuzz crate's
/// own target dir (not the workspace's).
fn nightly(fuzz_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly")
        .current_dir(fuzz_dir)
        .env_remove("CARGO_TARGET_DIR")
        // rustup picks the toolchain from `+nightly` only when cargo is the
        // rustup proxy, not the toolchain cargo xtask itself runs under.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    cmd
}

fn ensure_nightly(fuzz_dir: &Path) -> Result<(), String> {
    if util::succeeds(nightly(fuzz_dir).arg("--version")) {
        return Ok(());
    }
    Err(
        "no nightly toolchain: cargo-fuzz needs one (libFuzzer instrumentation). \
         Install it with `rustup toolchain install nightly --profile minimal`"
            .to_owned(),
    )
}

fn ensure_cargo_fuzz(fuzz_dir: &Path) -> Result<(), String> {
    if util::succeeds(nightly(fuzz_dir).args(["fuzz", "--version"])) {
        return Ok(());
    }
    eprintln!("cargo-fuzz is missing; installing it (about a minute)");
    util::run(
        Command::new("cargo")
            .args(["install", "--locked", "cargo-fuzz"])
            .env_remove("CARGO_TARGET_DIR"),
    )
    .map_err(|e| format!("installing cargo-fuzz: {e}"))?;
    if util::succeeds(nightly(fuzz_dir).args(["fuzz", "--version"])) {
        Ok(())
    } else {
        Err(
            "cargo-fuzz was installed but `cargo +nightly fuzz` still does not run; \
             is ~/.cargo/bin on PATH?"
                .to_owned(),
        )
    }
}

/// The targets `cargo fuzz list` prints, one per line.
fn parse_targets(list: &str) -> Vec<String> {
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Crash/leak/timeout/OOM inputs libFuzzer left in `artifacts/<target>/`.
fn artifacts(fuzz_dir: &Path, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir.join("artifacts").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_artifact_name)
        })
        .collect();
    found.sort();
    found
}

fn is_artifact_name(name: &str) -> bool {
    ["crash-", "leak-", "timeout-", "oom-", "slow-unit-"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Runs every fuzz target for `seconds` each; fails if any finds a crash.
pub(crate) fn run(seconds: u64) -> Result<(), String> {
    if seconds == 0 {
        return Err("the fuzz time per target must be at least 1 second".to_owned());
    }
    let fuzz_dir = util::root().join("fuzz");
    if !fuzz_dir.join("Cargo.toml").is_file() {
        return Err(format!("no fuzz crate at {}", fuzz_dir.display()));
    }
    ensure_nightly(&fuzz_dir)?;
    ensure_cargo_fuzz(&fuzz_dir)?;
    let list =
        util::output(nightly(&fuzz_dir).args(["fuzz", "list"])).map_err(|e| e.to_string())?;
    let targets = parse_targets(&list);
    if targets.is_empty() {
        return Err("`cargo +nightly fuzz list` printed no targets".to_owned());
    }
    let mut failed = Vec::new();
    for target in &targets {
        heading(&format!("fuzz {target} for {seconds} s"));
        let before = artifacts(&fuzz_dir, target);
        let corpus = Path::new("corpus").join(target);
        let seeds = Path::new("seeds").join(target);
        std::fs::create_dir_all(fuzz_dir.join(&corpus))
            .map_err(|e| format!("creating {}: {e}", corpus.display()))?;
        let mut cmd = nightly(&fuzz_dir);
        cmd.args(["fuzz", "run", target.as_str()]).arg(&corpus);
        if fuzz_dir.join(&seeds).is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"));
        let result = util::run(&mut cmd);
        let new: Vec<PathBuf> = artifacts(&fuzz_dir, target)
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        if result.is_err() || !new.is_empty() {
            let mut msg = format!("{target}: `{}` found a failure", render(&cmd));
            for p in &new {
                msg.push_str(&format!("\n  artifact: {}", p.display()));
            }
            if new.is_empty() {
                if let Err(e) = result {
                    msg.push_str(&format!("\n  {e}"));
                }
            }
            msg.push_str(&format!(
                "\n  replay: cd fuzz && cargo +nightly fuzz run {target} <artifact>; \
                 keep it under fuzz/regressions/{target}/ (see fuzz/README.md)"
            ));
            eprintln!("{msg}");
            failed.push(msg);
        }
    }
    if failed.is_empty() {
        eprintln!(
            "fuzz: {} targets ran {seconds} s each without a crash",
            targets.len()
        );
        Ok(())
    } else {
        Err(format!(
            "{} of {} fuzz targets failed:\n{}",
            failed.len(),
            targets.len(),
            failed.join("\n")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_targets_skips_blank_lines() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            ("codec\njsonrpc\n", &["codec", "jsonrpc"]),
            ("  codec \n\n dispatch\n", &["codec", "dispatch"]),
        ];
        for (input, want) in cases {
            assert_eq!(parse_targets(input), *want, "{input:?}");
        }
    }

    #[test]
    fn artifact_names() {
        let cases = [
            ("crash-0123abcd", true),
            ("leak-ff", true),
            ("timeout-1", true),
            ("oom-2", true),
            ("slow-unit-3", true),
            (".gitignore", false),
            ("README", false),
        ];
        for (name, want) in cases {
            assert_eq!(is_artifact_name(name), want, "{name}");
        }
    }
}
