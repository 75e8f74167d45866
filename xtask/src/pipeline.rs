//! `cargo xtask test`: everything CI runs, in order, with a timed summary.
//!
//! deps → fmt → clippy → docs → dependency review → unit/integration tests → fuzz
//! targets (30 s each) → Windows check → packages
//! (+ package test) → real-VM tests (QEMU, libvirt). Every stage runs even
//! after a failure (so one run shows every problem), except that the VM
//! stage needs the prerequisites to be there; the exit status is
//! non-zero if any stage failed. Each stage ends with a one-line summary
//! (`test: NAME ok (T s): ...`), and the run with a table of them all.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::deps::{self, WINDOWS_TARGET};
use crate::suite::{vm_test, VmTestOptions};
use crate::util::{bail, cargo, heading, is_ci, render, run, Result};

/// Seconds each fuzz target runs in the test command (`cargo xtask fuzz
/// --seconds N` for longer runs).
const FUZZ_SECONDS: u64 = 30;

/// One stage's outcome: its summary line, or what failed.
struct Stage {
    name: &'static str,
    took: Duration,
    outcome: std::result::Result<String, String>,
}

/// Totals of the `test result:` lines of `cargo test`.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestTotals {
    binaries: u32,
    passed: u32,
    failed: u32,
    ignored: u32,
}

impl TestTotals {
    /// Adds one line of `cargo test`'s output if it is a `test result:` line
    /// (`test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; ...`).
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.binaries += 1;
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            // The first part is `ok. 12 passed` or `FAILED. 3 passed`.
            if let [.., n, what] = words.as_slice() {
                let n: u32 = n.parse().unwrap_or(0);
                match *what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} ignored ({} test targets)",
            self.passed, self.failed, self.ignored, self.binaries
        )
    }
}

/// `cargo test --workspace`, its output shown as it comes, totalled.
fn unit_tests() -> Result<String> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]);
    eprintln!("$ {}", render(&cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", render(&cmd)))?;
    let mut totals = TestTotals::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            totals.add_line(&line);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{}` failed: {status}; {}", render(&cmd), totals.summary());
    }
    Ok(totals.summary())
}

/// `cargo xtask test`.
pub(crate) fn test() -> Result<()> {
    let started = Instant::now();
    let mut stages: Vec<Stage> = Vec::new();
    let mut stage = |name: &'static str, f: &mut dyn FnMut() -> Result<String>| -> bool {
        heading(&format!("test: {name}"));
        let t = Instant::now();
        let outcome = f().map_err(|e| e.to_string());
        let took = t.elapsed().as_secs_f64();
        match &outcome {
            Ok(summary) => eprintln!("test: {name} ok ({took:.1} s): {summary}"),
            Err(e) => eprintln!("test: {name} FAILED ({took:.1} s): {e}"),
        }
        let ok = outcome.is_ok();
        stages.push(Stage {
            name,
            took: t.elapsed(),
            outcome,
        });
        ok
    };

    let deps_ok = stage("deps", &mut || {
        deps::deps()?;
        Ok("every prerequisite installed".to_owned())
    });
    stage("fmt", &mut || {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        Ok("formatted".to_owned())
    });
    stage("clippy", &mut || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        Ok("no warnings".to_owned())
    });
    stage("doc", &mut || {
        // Broken or private links in the API docs fail, as warnings do in
        // clippy.
        run(cargo()
            .args(["doc", "--no-deps", "--workspace"])
            .env("RUSTDOCFLAGS", "-D warnings"))?;
        Ok("API docs build without warnings".to_owned())
    });
    stage("deny", &mut || {
        // Licences, banned and duplicate crates, sources; advisories need the
        // network's advisory database and are not checked here.
        run(cargo().args(["deny", "check", "licenses", "bans", "sources"]))?;
        Ok("licenses, bans and sources accepted (advisories not checked)".to_owned())
    });
    stage("unit-tests", &mut unit_tests);
    stage("fuzz", &mut || Ok(crate::fuzz::run(FUZZ_SECONDS)?));
    stage("windows-check", &mut || {
        if !deps::has_target(WINDOWS_TARGET) {
            if is_ci() {
                bail!("the {WINDOWS_TARGET} target is not installed (cargo xtask deps)");
            }
            eprintln!("SKIP: target {WINDOWS_TARGET} is not installed");
            return Ok(format!("SKIPPED: target {WINDOWS_TARGET} is not installed"));
        }
        run(cargo().args(["check", "-p", "agent-windows", "--target", WINDOWS_TARGET]))?;
        Ok(format!("agent-windows checks for {WINDOWS_TARGET}"))
    });
    stage("dist", &mut || {
        let pkgs = crate::dist::build()?;
        crate::dist::check_packages(&pkgs)
    });
    if deps_ok {
        stage("vm-test", &mut || {
            let passed = vm_test(VmTestOptions::ALL)?;
            Ok(format!(
                "{passed} real-VM checks passed (initramfs and Debian 12 guests, QEMU and libvirt)"
            ))
        });
    }

    println!("\n==> test: summary");
    let mut failed = 0;
    for s in &stages {
        let (status, text) = match &s.outcome {
            Ok(summary) => ("ok", summary.as_str()),
            Err(e) => {
                failed += 1;
                ("FAILED", e.lines().next().unwrap_or(""))
            }
        };
        println!(
            "  {:<14} {:>7.1} s  {status:<6}  {text}",
            s.name,
            s.took.as_secs_f64()
        );
    }
    println!(
        "  {:<14} {:>7.1} s",
        "total",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} stage(s) failed");
    }
    println!("all stages passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_totals_add_up_result_lines_only() {
        let out = "\
running 3 tests
test a ... ok
test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

test result: FAILED. 5 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.20s
test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
test results are fine: 7 passed
";
        let mut t = TestTotals::default();
        for l in out.lines() {
            t.add_line(l);
        }
        assert_eq!(
            t,
            TestTotals {
                binaries: 3,
                passed: 8,
                failed: 2,
                ignored: 1
            }
        );
        assert_eq!(
            t.summary(),
            "8 passed, 2 failed, 1 ignored (3 test targets)"
        );
    }
}
