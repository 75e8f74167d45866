//! `cargo xtask test`: everything CI runs, in order, with a timed summary.
//!
//! deps → fmt → clippy → dependency review → unit/integration tests → fuzz
//! targets (30 s each) → Windows check → packages
//! (+ package test) → real-VM tests (QEMU, libvirt). Every stage runs even
//! after a failure (so one run shows every problem), except that the VM
//! stage needs the packages' build to have worked; the exit status is
//! non-zero if any stage failed.

use std::time::{Duration, Instant};

use crate::deps::{self, WINDOWS_TARGET};
use crate::suite::{vm_test, VmTestOptions};
use crate::util::{bail, cargo, heading, is_ci, run, Result};

/// Seconds each fuzz target runs in the test command (`cargo xtask fuzz
/// --seconds N` for longer runs).
const FUZZ_SECONDS: u64 = 30;

/// One stage's outcome.
struct Stage {
    name: &'static str,
    took: Duration,
    outcome: std::result::Result<(), String>,
}

/// `cargo xtask test`.
pub(crate) fn test() -> Result<()> {
    let started = Instant::now();
    let mut stages: Vec<Stage> = Vec::new();
    let mut stage = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> bool {
        heading(&format!("test: {name}"));
        let t = Instant::now();
        let outcome = f().map_err(|e| e.to_string());
        let ok = outcome.is_ok();
        if let Err(e) = &outcome {
            eprintln!("test: stage {name} FAILED: {e}");
        }
        stages.push(Stage {
            name,
            took: t.elapsed(),
            outcome,
        });
        ok
    };

    let deps_ok = stage("deps", &mut || deps::deps());
    stage("fmt", &mut || {
        run(cargo().args(["fmt", "--all", "--", "--check"]))
    });
    stage("clippy", &mut || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    });
    stage("deny", &mut || {
        // Licences, banned and duplicate crates, sources; advisories need the
        // network's advisory database and are not checked here.
        run(cargo().args(["deny", "check", "licenses", "bans", "sources"]))
    });
    stage("unit-tests", &mut || {
        run(cargo().args(["test", "--workspace"]))
    });
    stage("fuzz", &mut || Ok(crate::fuzz::run(FUZZ_SECONDS)?));
    stage("windows-check", &mut || {
        if !deps::has_target(WINDOWS_TARGET) {
            if is_ci() {
                bail!("the {WINDOWS_TARGET} target is not installed (cargo xtask deps)");
            }
            eprintln!("SKIP: target {WINDOWS_TARGET} is not installed");
            return Ok(());
        }
        run(cargo().args(["check", "-p", "agent-windows", "--target", WINDOWS_TARGET]))
    });
    stage("dist", &mut || {
        let pkgs = crate::dist::build()?;
        crate::dist::check_packages(&pkgs)
    });
    if deps_ok {
        stage("vm-test", &mut || vm_test(VmTestOptions::ALL));
    }

    println!("\n==> test: summary");
    let mut failed = 0;
    for s in &stages {
        let status = match &s.outcome {
            Ok(()) => "ok",
            Err(_) => {
                failed += 1;
                "FAILED"
            }
        };
        println!("  {:<14} {:>7.1} s  {status}", s.name, s.took.as_secs_f64());
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
