//! `cargo xtask bench`: our agent against Debian's qemu-ga in one TCG guest.
//!
//! One QEMU guest holds both agents, each on its own virtio-serial port, plus
//! a raw port that a guest `dd` writes into (the transport ceiling). Our agent
//! is driven with the real `host_client` library; qemu-ga with its own
//! line protocol (`guest-sync-delimited` handshake, then one command a line).
//! Every figure is a median over repeated runs, printed with its spread
//! (min..max), in one table, also written to `target/bench/bench.json`.
//!
//! Each figure is one function, named as in [`SECTIONS`]: the in-guest ones
//! are methods of [`harness::Bench`], which holds what they share, in
//! `latency` (ping, exec, load), `transfer` (raw, read, write, window, push,
//! bigmsg) and `resources` (rss, wake, flood, size); the host fan-out is in
//! `fanout`. [`measure`] calls the in-guest ones in [`SECTIONS`] order.

mod dialect;
mod fanout;
mod harness;
mod latency;
mod metrics;
pub(crate) mod qga;
mod resources;
mod stats;
mod streams;
mod transfer;
mod vm;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::guest;
use crate::util::{bail, cargo, heading, run, target_dir, Result};
use harness::Bench;
use stats::Figure;
use vm::Vm;

/// Size of the transfer test file.
const FILE_SIZE: u64 = 32 * 1024 * 1024;
/// Guest path of the read test file.
const GUEST_FILE: &str = "/tmp/bench32";

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> crate::util::XtaskError + '_ {
    move |e| format!("{what}: {e}").into()
}

/// The figures `--only` can pick, by name, in the order they are measured.
const SECTIONS: &[(&str, &str)] = &[
    ("ping", "ping round trip"),
    ("exec", "exec `true`, result in hand"),
    ("metrics", "get_metrics round trip and agent CPU per call"),
    (
        "qga",
        "qemu-ga dialect vs qemu-ga: guest-ping, guest-exec, 16 MiB guest-file-read",
    ),
    ("raw", "raw port ceilings, both directions"),
    (
        "read",
        "read 32 MiB to host (and its share of the raw ceiling with `raw`)",
    ),
    (
        "write",
        "write 32 MiB into guest (with `raw`, its share of the ceiling and of the write floor)",
    ),
    ("load", "ping p99 during a 32 MiB read"),
    ("rss", "agent RSS idle and peak in the file transfers"),
    (
        "streams",
        "streamed exec first byte; forward throughput (and share of `raw`); ping p99 during a forward",
    ),
    ("window", "read with 1, 2, 8 MiB in flight, by chunks and by stream"),
    ("push", "push 1 KiB, connection open"),
    ("wake", "wake-ups/s with no host attached"),
    (
        "flood",
        "agent peak RSS while a host floods requests and reads nothing",
    ),
    (
        "bigmsg",
        "write with max_message_size_kb 1024 (restarts the agent)",
    ),
    (
        "copyread",
        "read with zero_copy_reads false (restarts the agent)",
    ),
    ("fanout", "host fan-out to 1,024 agents"),
    ("size", "agent binary size"),
];

/// Which figures to measure: all, or the `--only` list.
#[derive(Debug, Clone, PartialEq)]
struct Only(Option<Vec<&'static str>>);

impl Only {
    /// Parses `--only`'s comma-separated list of [`SECTIONS`] names.
    fn parse(list: &str) -> Result<Only> {
        let mut picked = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match SECTIONS.iter().find(|(n, _)| *n == name) {
                Some((n, _)) => picked.push(*n),
                None => bail!(
                    "unknown bench figure {name:?}; known: {}",
                    SECTIONS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
        }
        if picked.is_empty() {
            bail!("--only needs at least one figure name");
        }
        Ok(Only(Some(picked)))
    }

    /// True if `name` is to be measured.
    fn has(&self, name: &str) -> bool {
        match &self.0 {
            None => true,
            Some(v) => v.contains(&name),
        }
    }

    /// True if any of `names` is to be measured.
    fn any(&self, names: &[&str]) -> bool {
        names.iter().any(|n| self.has(n))
    }
}

/// Usage of `cargo xtask bench`'s options, for `help` and errors.
const USAGE: &str = "cargo xtask bench [--only NAME,NAME...]";

/// Parses `cargo xtask bench`'s arguments and runs it.
pub(crate) fn main(args: &[String]) -> Result<()> {
    match args {
        [] => bench(Only(None), args),
        // Internal: the fan-out client process.
        [flag, dir] if flag == "--fanout-client" => fanout::fanout_client_main(Path::new(dir)),
        [flag, list] if flag == "--only" => bench(Only::parse(list)?, args),
        _ => {
            let names: Vec<String> = SECTIONS
                .iter()
                .map(|(n, what)| format!("  {n:<8} {what}"))
                .collect();
            bail!("usage: {USAGE}\nfigures:\n{}", names.join("\n"))
        }
    }
}

/// `cargo xtask bench`: `args` are forwarded to the release rebuild.
fn bench(only: Only, args: &[String]) -> Result<()> {
    if cfg!(debug_assertions) {
        // Host-side timings (base64, JSON) must not come from a debug build.
        heading("bench: rebuilding xtask in release");
        return run(cargo()
            .args(["run", "--quiet", "--release", "-p", "xtask", "--", "bench"])
            .args(args));
    }
    heading("bench: build");
    let image = guest::build(guest::GuestOptions { with_qemu_ga: true })?;
    // The write floor needs the raw port's figures (`raw`).
    let push_floor = if only.has("write") && only.has("raw") {
        Some(transfer::build_push_floor()?)
    } else {
        None
    };
    if only.has("fanout") {
        // The host agents of the fan-out figure.
        run(cargo().args([
            "build",
            "--release",
            "-p",
            "agent-linux",
            "-p",
            "host-client",
        ]))?;
    }
    let out_dir = target_dir().join("bench");
    fs::create_dir_all(&out_dir)?;

    let mut figures = Vec::new();
    let in_guest: Vec<&str> = SECTIONS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !matches!(*n, "fanout" | "size"))
        .collect();
    if only.any(&in_guest) {
        heading("bench: boot");
        let vm = Vm::boot(&image)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let res = rt.block_on(measure(&vm, &out_dir, &only, push_floor, &mut figures));
        drop(vm);
        if let Err(e) = res {
            print_table(&figures);
            return Err(e);
        }
    }

    if only.has("fanout") {
        heading("bench: host fan-out");
        figures.extend(fanout::fanout()?);
    }
    if only.has("size") {
        figures.push(resources::binary_size()?);
    }

    print_table(&figures);
    let machine = machine();
    let doc = json!({
        "date": crate::util::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default().trim(),
        "machine": machine,
        "figures": figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
    });
    // A partial run does not overwrite the full table.
    let path = out_dir.join(if only.0.is_some() {
        "bench-only.json"
    } else {
        "bench.json"
    });
    fs::write(
        &path,
        serde_json::to_string_pretty(&doc).map_err(err("json"))?,
    )?;
    eprintln!("bench: wrote {}", path.display());
    println!("machine: {machine}");
    Ok(())
}

/// The machine line of the README table.
fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = crate::util::output(Command::new("uname").arg("-r")).unwrap_or_default();
    let qemu = crate::util::output(Command::new("qemu-system-x86_64").arg("--version"))
        .unwrap_or_default();
    format!(
        "{cores} cores, TCG 1 vCPU 512 MiB, host kernel {}, {}",
        kernel.trim(),
        qemu.lines().next().unwrap_or("").trim()
    )
}

/// The figures measured in the guest, in [`SECTIONS`] order, each if
/// `only` has it; `fanout` and `size` are measured on the host by [`bench()`].
async fn measure(
    vm: &Vm,
    out_dir: &Path,
    only: &Only,
    push_floor: Option<PathBuf>,
    figures: &mut Vec<Figure>,
) -> Result<()> {
    let mut b = Bench::start(vm, out_dir, figures).await?;
    b.push_floor = push_floor;
    for &(name, _) in SECTIONS {
        if name == "read" {
            // From here on, figures run only if one of these is picked: all
            // of them but `push`, `wake` and `flood` use the 32 MiB test
            // file, put in the guest and pulled to the host once (three
            // times, timed, for `read`).
            if !only.any(&[
                "read", "write", "load", "streams", "rss", "window", "push", "wake", "flood",
                "bigmsg", "copyread",
            ]) {
                b.finish();
                return Ok(());
            }
            // The transfers' peak RSS is their own, not the qemu-ga
            // dialect's 4 MiB base64 replies before them.
            b.reset_peak_rss().await?;
            let pulls = if only.has("read") { 3 } else { 1 };
            b.test_file(pulls, only.any(&["read", "window"])).await?;
        }
        if !only.has(name) {
            continue;
        }
        match name {
            "ping" => b.ping().await?,
            "exec" => b.exec().await?,
            "metrics" => b.metrics().await?,
            "qga" => b.qga_dialect().await?,
            "raw" => b.raw().await?,
            "read" => b.read().await?,
            "write" => b.write().await?,
            "load" => b.load().await?,
            "streams" => b.streams().await?,
            "rss" => b.rss().await?,
            "window" => b.window().await?,
            "push" => b.push().await?,
            "wake" => b.wake().await?,
            "flood" => b.flood().await?,
            "bigmsg" => b.bigmsg().await?,
            "copyread" => b.copyread().await?,
            // On the host, by `bench` once the guest is gone.
            "fanout" | "size" => {}
            _ => bail!("bench figure {name:?} has no function in `measure`"),
        }
    }
    b.finish();
    Ok(())
}

fn print_table(figures: &[Figure]) {
    println!();
    println!("{}", stats::table(figures));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_picks_known_figures() {
        let all = Only(None);
        assert!(all.has("exec") && all.has("fanout"));
        let only = Only::parse("exec, ping").unwrap();
        assert_eq!(only, Only(Some(vec!["exec", "ping"])));
        for (name, want) in [
            ("exec", true),
            ("ping", true),
            ("read", false),
            ("size", false),
        ] {
            assert_eq!(only.has(name), want, "{name}");
        }
        assert!(only.any(&["read", "ping"]) && !only.any(&["read", "wake"]));
        for bad in ["", ",", "exec,nope", "EXEC"] {
            assert!(Only::parse(bad).is_err(), "{bad:?}");
        }
        let e = main(&["--only".to_owned()]).unwrap_err().to_string();
        assert!(e.contains("bigmsg") && e.contains("usage"), "{e}");
    }
}
