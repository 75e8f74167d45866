//! `cargo xtask fuzz [--seconds N]`: runs every cargo-fuzz target in `fuzz/` for
//! a fixed time each and fails if any of them finds a crash.
//!
//! Needs a nightly toolchain (libFuzzer instrumentation); installs
//! cargo-fuzz with `cargo install --locked cargo-fuzz` when it is missing.
//! The fuzz crate keeps cargo-fuzz's own target dir (`fuzz/target`).
//!
//! The targets are built first (cargo's output shown), then each runs with
//! libFuzzer's output (thousands of progress lines) in
//! `target/fuzz-logs/<target>.log`: a passing target prints one line of
//! libFuzzer's final figures, a failing one the log's last lines.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{self, heading, render};

/// libFuzzer's memory limit per target, in MiB.
const RSS_LIMIT_MB: u32 = 2048;

/// Lines of a failing target's log printed to the terminal.
const TAIL_LINES: usize = 20;

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

/// libFuzzer's final figures for one run, from its last status line
/// (`#N DONE cov: C ft: F corp: U/S lim: L exec/s: E rss: R`) and its
/// `Done N runs in S second(s)` line.
#[derive(Debug, Default, PartialEq, Eq)]
struct FinalStats {
    runs: Option<u64>,
    seconds: Option<u64>,
    exec_per_second: Option<u64>,
    coverage: Option<u64>,
    features: Option<u64>,
    corpus: Option<String>,
}

impl FinalStats {
    fn parse(log: &str) -> FinalStats {
        let mut st = FinalStats::default();
        // The last status line: `DONE` at the end of a timed run, otherwise
        // the last `pulse`/`NEW`/`REDUCE` line before the run stopped.
        if let Some(line) = log
            .lines()
            .rev()
            .find(|l| l.starts_with('#') && l.contains(" cov: "))
        {
            let words: Vec<&str> = line.split_whitespace().collect();
            st.runs = words
                .first()
                .and_then(|w| w.trim_start_matches('#').parse().ok());
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .copied()
            };
            st.coverage = after("cov:").and_then(|v| v.parse().ok());
            st.features = after("ft:").and_then(|v| v.parse().ok());
            st.corpus = after("corp:").map(str::to_owned);
            st.exec_per_second = after("exec/s:").and_then(|v| v.parse().ok());
        }
        if let Some(line) = log.lines().rev().find(|l| l.starts_with("Done ")) {
            // Done 1234567 runs in 5 second(s)
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [_, runs, "runs", "in", secs, ..] = words.as_slice() {
                st.runs = runs.parse().ok().or(st.runs);
                st.seconds = secs.parse().ok();
            }
        }
        st
    }

    /// `1234567 runs, 246913 exec/s, cov 1210, ft 5843, corpus 612/48Kb, 5 s`.
    fn summary(&self) -> String {
        fn or_unknown<T: std::fmt::Display>(v: &Option<T>) -> String {
            v.as_ref().map_or_else(|| "?".to_owned(), T::to_string)
        }
        format!(
            "{} runs, {} exec/s, cov {}, ft {}, corpus {}, {} s",
            or_unknown(&self.runs),
            or_unknown(&self.exec_per_second),
            or_unknown(&self.coverage),
            or_unknown(&self.features),
            or_unknown(&self.corpus),
            or_unknown(&self.seconds),
        )
    }
}

/// The lines of a failing run's log that say what failed (a Rust panic and
/// its message, a sanitizer or libFuzzer error), at most a few.
fn error_lines(log: &str) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.contains("panicked at") {
            out.push(*l);
            if let Some(next) = lines.get(i + 1) {
                out.push(*next);
            }
        } else if (l.starts_with("==") && l.contains("ERROR:")) || l.starts_with("ERROR: libFuzzer")
        {
            out.push(*l);
        }
        if out.len() >= 4 {
            break;
        }
    }
    out
}

/// Runs one target with its output in `log`; its final figures on success.
fn run_target(
    fuzz_dir: &Path,
    target: &str,
    seconds: u64,
    log: &Path,
) -> Result<FinalStats, String> {
    let before = artifacts(fuzz_dir, target);
    let corpus = Path::new("corpus").join(target);
    let seeds = Path::new("seeds").join(target);
    std::fs::create_dir_all(fuzz_dir.join(&corpus))
        .map_err(|e| format!("creating {}: {e}", corpus.display()))?;
    let mut cmd = nightly(fuzz_dir);
    cmd.args(["fuzz", "run", target]).arg(&corpus);
    if fuzz_dir.join(&seeds).is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"));
    let file = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let file2 = file
        .try_clone()
        .map_err(|e| format!("opening {}: {e}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(file2)
        .status()
        .map_err(|e| format!("cannot run `{}`: {e}", render(&cmd)));
    let new: Vec<PathBuf> = artifacts(fuzz_dir, target)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    let text = std::fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    match status {
        Ok(s) if s.success() && new.is_empty() => return Ok(FinalStats::parse(&text)),
        _ => {}
    }
    let mut msg = format!("{target}: `{}` found a failure", render(&cmd));
    match &status {
        Ok(s) if !s.success() => msg.push_str(&format!(" ({s})")),
        Err(e) => msg.push_str(&format!("\n  {e}")),
        Ok(_) => {}
    }
    let tail = util::tail(log, TAIL_LINES);
    let errors: Vec<&str> = error_lines(&text)
        .into_iter()
        .filter(|l| !tail.contains(l))
        .collect();
    if !errors.is_empty() {
        msg.push_str("\n  first error lines:");
        for l in errors {
            msg.push_str(&format!("\n  | {l}"));
        }
    }
    msg.push_str(&format!(
        "\n  last {TAIL_LINES} lines of {}:",
        log.display()
    ));
    for l in tail.lines() {
        msg.push_str(&format!("\n  | {l}"));
    }
    for p in &new {
        msg.push_str(&format!("\n  artifact: {}", p.display()));
    }
    if !new.is_empty() {
        msg.push_str(&format!(
            "\n  replay: cd fuzz && cargo +nightly fuzz run {target} <artifact>; \
             keep it under fuzz/regressions/{target}/ (see fuzz/README.md)"
        ));
    }
    Err(msg)
}

/// Runs every fuzz target for `seconds` each; fails if any finds a crash.
/// Returns a one-line summary of the whole run.
pub(crate) fn run(seconds: u64) -> Result<String, String> {
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
    heading(&format!(
        "fuzz: {} targets, {seconds} s each",
        targets.len()
    ));
    // Build all targets first, with cargo's output in view; `fuzz run`
    // below then finds them built.
    util::run(nightly(&fuzz_dir).args(["fuzz", "build"])).map_err(|e| e.to_string())?;
    let log_dir = util::target_dir().join("fuzz-logs");
    std::fs::create_dir_all(&log_dir)
        .map_err(|e| format!("creating {}: {e}", log_dir.display()))?;
    eprintln!(
        "fuzz: libFuzzer's output goes to {}/<target>.log",
        log_dir.display()
    );
    let mut failed = Vec::new();
    let mut total_runs = 0u64;
    for target in &targets {
        eprint!("fuzz {target:<12} ");
        let log = log_dir.join(format!("{target}.log"));
        match run_target(&fuzz_dir, target, seconds, &log) {
            Ok(stats) => {
                total_runs += stats.runs.unwrap_or(0);
                eprintln!("ok: {}", stats.summary());
            }
            Err(msg) => {
                eprintln!("FAILED\n{msg}");
                failed.push(msg);
            }
        }
    }
    if failed.is_empty() {
        Ok(format!(
            "{} targets ran {seconds} s each without a crash ({total_runs} runs in all)",
            targets.len()
        ))
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

    #[test]
    fn final_stats_from_a_timed_run() {
        let log = "\
INFO: Running with entropic power schedule (0xFF, 100).
#2\tINITED cov: 210 ft: 211 corp: 1/1b exec/s: 0 rss: 40Mb
#262144\tpulse  cov: 1204 ft: 5801 corp: 600/47Kb lim: 4096 exec/s: 131072 rss: 80Mb
#1234567\tDONE   cov: 1210 ft: 5843 corp: 612/48Kb lim: 4096 exec/s: 246913 rss: 86Mb
Done 1234567 runs in 5 second(s)
";
        let st = FinalStats::parse(log);
        assert_eq!(
            st,
            FinalStats {
                runs: Some(1234567),
                seconds: Some(5),
                exec_per_second: Some(246913),
                coverage: Some(1210),
                features: Some(5843),
                corpus: Some("612/48Kb".to_owned()),
            }
        );
        assert_eq!(
            st.summary(),
            "1234567 runs, 246913 exec/s, cov 1210, ft 5843, corpus 612/48Kb, 5 s"
        );
    }

    #[test]
    fn final_stats_without_the_done_lines() {
        let cases = [
            ("", "? runs, ? exec/s, cov ?, ft ?, corpus ?, ? s"),
            (
                "#8\tNEW    cov: 5 ft: 6 corp: 2/3b lim: 4 exec/s: 0 rss: 30Mb L: 2/2 MS: 1 ChangeBit-\n",
                "8 runs, 0 exec/s, cov 5, ft 6, corpus 2/3b, ? s",
            ),
            ("Done 10 runs in 1 second(s)\n", "10 runs, ? exec/s, cov ?, ft ?, corpus ?, 1 s"),
        ];
        for (log, want) in cases {
            assert_eq!(FinalStats::parse(log).summary(), want, "{log:?}");
        }
    }

    #[test]
    fn error_lines_find_the_panic_and_sanitizer_report() {
        let log = "\
#1\tINITED
thread '<unnamed>' panicked at src/checks.rs:10:5:
line longer than max: 9 > 8
note: run with `RUST_BACKTRACE=1`
==1234== ERROR: libFuzzer: deadly signal
";
        assert_eq!(
            error_lines(log),
            [
                "thread '<unnamed>' panicked at src/checks.rs:10:5:",
                "line longer than max: 9 > 8",
                "==1234== ERROR: libFuzzer: deadly signal",
            ]
        );
        assert!(error_lines("#1\tDONE cov: 1\nDone 1 runs in 1 second(s)\n").is_empty());
    }
}
