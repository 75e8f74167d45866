//! `cargo xtask`: everything beyond `cargo build`/`cargo test`.
//!
//! Run `cargo xtask help` for the tasks. Each task installs what it needs
//! (Debian packages as root, Rust targets, cargo tools) or, when it cannot,
//! prints the exact command to run and fails.

mod bench;
mod debian;
mod debian_suite;
mod demo;
mod deps;
mod dist;
mod fleet_checks;
mod fuzz;
mod guest;
mod ops_checks;
mod pipeline;
mod probe;
mod qga_checks;
mod qmp;
mod soak;
mod stream_checks;
mod suite;
mod util;
mod vm;

use std::process::ExitCode;

use util::{bail, Result};

/// One option of a task.
struct Flag {
    /// As typed, e.g. `--seconds`.
    name: &'static str,
    /// The value it takes, e.g. `N`; `None` for a switch.
    value: Option<&'static str>,
    /// What it does, one or more lines.
    about: &'static str,
}

/// The tasks, as dispatched by [`run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskId {
    Deps,
    GuestImage,
    Boot,
    DebianImage,
    VmTest,
    Dist,
    Demo,
    Test,
    Bench,
    Fuzz,
    Soak,
    Help,
}

/// One task: its name, what it does and its options. `cargo xtask help` and
/// `cargo xtask TASK --help` are both rendered from [`TASKS`], and the
/// options a task accepts are the ones listed here.
struct Task {
    id: TaskId,
    name: &'static str,
    about: &'static str,
    flags: &'static [Flag],
}

const fn switch(name: &'static str, about: &'static str) -> Flag {
    Flag {
        name,
        value: None,
        about,
    }
}

const TASKS: &[Task] = &[
    Task {
        id: TaskId::Deps,
        name: "deps",
        about: "install everything the tasks below need (apt packages as\n\
                root, never removing one; rustup targets, cargo-deb,\n\
                cargo-generate-rpm, cargo-fuzz)",
        flags: &[],
    },
    Task {
        id: TaskId::GuestImage,
        name: "guest-image",
        about: "build the test guest under target/guest/ (Debian cloud\n\
                kernel, busybox, the static agent, /init)",
        flags: &[switch(
            "--with-qemu-ga",
            "also include Debian's qemu-ga (for benchmarks)",
        )],
    },
    Task {
        id: TaskId::Boot,
        name: "boot",
        about: "boot the guest under QEMU, ping the agent through the raw\n\
                port, and leave it running (prints socket, pid)",
        flags: &[switch(
            "--with-qemu-ga",
            "also run Debian's qemu-ga on org.qemu.guest_agent.0",
        )],
    },
    Task {
        id: TaskId::DebianImage,
        name: "debian-image",
        about: "build (or find in its cache outside the clone) the\n\
                Debian 12 guest: debootstrap of bookworm with systemd,\n\
                udev and the cloud kernel; ext4 root and data disks;\n\
                no agent",
        flags: &[],
    },
    Task {
        id: TaskId::VmTest,
        name: "vm-test",
        about: "boot the guests and run the integration suite through\n\
                kvmmanager-ctl, under QEMU then libvirt: the initramfs\n\
                guest, then the Debian 12 guest with the .deb\n\
                installed by apt and started by systemd",
        flags: &[
            switch("--qemu-only", "only under QEMU"),
            switch("--libvirt-only", "only under libvirt"),
            switch("--initramfs-only", "only the initramfs guest"),
            switch("--debian-only", "only the Debian 12 guest"),
        ],
    },
    Task {
        id: TaskId::Dist,
        name: "dist",
        about: "release build (static musl) and .deb/.rpm in target/dist/",
        flags: &[switch(
            "--check",
            "also inspect both packages (contents, owners, scripts)\n\
             and install each into a scratch root (dpkg --root,\n\
             rpm --root), run it, remove it",
        )],
    },
    Task {
        id: TaskId::Demo,
        name: "demo",
        about: "boot the demo guest and tour kvmmanager-ctl against it",
        flags: &[
            Flag {
                name: "--distro",
                value: Some("NAME"),
                about: "initramfs (default: the small fast guest) or debian\n\
                        (Debian 12, the .deb installed by apt; its serial\n\
                        console is served for a person to log in)",
            },
            switch("--keep", "leave the VM running and print how to reach it"),
        ],
    },
    Task {
        id: TaskId::Test,
        name: "test",
        about: "everything CI runs: fmt, clippy, unit tests, fuzz,\n\
                Windows check, packages, real-VM tests (QEMU and\n\
                libvirt); each stage prints a one-line summary, then a\n\
                table of all",
        flags: &[],
    },
    Task {
        id: TaskId::Bench,
        name: "bench",
        about: "boot one guest with our agent and Debian's qemu-ga and\n\
                measure both side by side (table and\n\
                target/bench/bench.json)",
        flags: &[Flag {
            name: "--only",
            value: Some("LIST"),
            about: "only these figures, e.g. exec,ping (a bad name lists all;\n\
                    the table goes to target/bench/bench-only.json)",
        }],
    },
    Task {
        id: TaskId::Fuzz,
        name: "fuzz",
        about: "run every cargo-fuzz target in fuzz/ (nightly);\n\
                libFuzzer's output goes to target/fuzz-logs/TARGET.log,\n\
                one summary line per target (its tail on failure)",
        flags: &[Flag {
            name: "--seconds",
            value: Some("N"),
            about: "per target (default 300; the test command uses 30)",
        }],
    },
    Task {
        id: TaskId::Soak,
        name: "soak",
        about: "leak soak at full size: 1,000,000 pings, 10,000 each of\n\
                write/read/exec, 1,000 connections, 50 floods; RSS,\n\
                peak against the memory bound, and fds checked",
        flags: &[],
    },
    Task {
        id: TaskId::Help,
        name: "help",
        about: "this text; `cargo xtask help TASK` or `cargo xtask TASK\n\
                --help` for one task",
        flags: &[],
    },
];

const ENVIRONMENT: &str = "\
Environment: CI=true makes a missing prerequisite a failure, never a skip;
XTASK_KEEP_LOGS=1 keeps the VM console logs.
";

/// Column where the text of the task table starts.
const TEXT_COLUMN: usize = 23;

impl Flag {
    /// `--seconds N`, `--check`.
    fn usage(&self) -> String {
        match self.value {
            Some(v) => format!("{} {v}", self.name),
            None => self.name.to_owned(),
        }
    }
}

impl Task {
    /// `cargo xtask fuzz [--seconds N]`.
    fn usage(&self) -> String {
        let mut s = format!("cargo xtask {}", self.name);
        let indent = s.len();
        let mut line_start = 0;
        for f in self.flags {
            let opt = format!(" [{}]", f.usage());
            // Options that would pass 80 columns go on a line of their own,
            // under the first one.
            if s.len() - line_start + opt.len() > 80 {
                s.push('\n');
                line_start = s.len();
                s.push_str(&" ".repeat(indent));
            }
            s.push_str(&opt);
        }
        if self.id == TaskId::Help {
            s.push_str(" [TASK]");
        }
        s
    }

    /// This task's help: usage, what it does, its options.
    fn help(&self) -> String {
        let mut s = format!("{}\n\n", self.usage());
        for line in wrap(self.about, 76) {
            s.push_str(&line);
            s.push('\n');
        }
        s.push_str("\nOptions:\n");
        let mut rows: Vec<(String, &str)> =
            self.flags.iter().map(|f| (f.usage(), f.about)).collect();
        rows.push(("-h, --help".to_owned(), "print this help"));
        for (usage, about) in rows {
            push_row(&mut s, 2, &usage, about);
        }
        s.push('\n');
        s.push_str(ENVIRONMENT);
        s
    }
}

/// `text`'s words (its line breaks ignored) in lines of at most `width`
/// characters (a longer word gets a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Appends `left` at `indent`, then `text`'s lines aligned at [`TEXT_COLUMN`].
fn push_row(s: &mut String, indent: usize, left: &str, text: &str) {
    let head = format!("{:indent$}{left}", "");
    let mut lines = text.lines().map(str::trim);
    if head.len() < TEXT_COLUMN {
        s.push_str(&format!(
            "{head:<TEXT_COLUMN$}{}\n",
            lines.next().unwrap_or("")
        ));
    } else {
        s.push_str(&head);
        s.push('\n');
    }
    for line in lines {
        s.push_str(&format!("{:TEXT_COLUMN$}{line}\n", ""));
    }
}

/// `cargo xtask help`: every task and its options.
fn help() -> String {
    let mut s = String::from("cargo xtask <task> [options]\n\nTasks:\n");
    for t in TASKS {
        push_row(&mut s, 2, t.name, t.about);
        for f in t.flags {
            push_row(&mut s, 6, &f.usage(), f.about);
        }
    }
    s.push('\n');
    s.push_str(ENVIRONMENT);
    s
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The options given to a task, checked against its [`Task::flags`].
#[derive(Debug, Default)]
struct Options<'a> {
    given: Vec<(&'static str, Option<&'a str>)>,
}

impl Options<'_> {
    fn has(&self, name: &str) -> bool {
        self.given.iter().any(|(n, _)| *n == name)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.given
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| *v)
    }
}

/// What the command line asks for.
#[derive(Debug)]
enum Action<'a> {
    /// Print this text.
    Help(String),
    /// Run a task with these options (`rest` are its raw arguments).
    Run {
        task: &'static Task,
        options: Options<'a>,
        rest: &'a [String],
    },
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

fn is_help_flag(a: &str) -> bool {
    a == "-h" || a == "--help"
}

fn find_task(name: &str) -> Result<&'static Task> {
    match TASKS.iter().find(|t| t.name == name) {
        Some(t) => Ok(t),
        None => bail!("unknown task {name:?}; see `cargo xtask help`"),
    }
}

/// Parses the command line: a task and its options, or a request for help.
fn parse(args: &[String]) -> Result<Action<'_>> {
    let Some((name, rest)) = args.split_first() else {
        return Ok(Action::Help(help()));
    };
    if is_help_flag(name) {
        return Ok(Action::Help(help()));
    }
    let task = find_task(name)?;
    if rest.iter().any(|a| is_help_flag(a)) {
        return Ok(Action::Help(task.help()));
    }
    if task.id == TaskId::Help {
        return match rest {
            [] => Ok(Action::Help(help())),
            [one] => Ok(Action::Help(find_task(one)?.help())),
            _ => bail!("usage: {}", task.usage()),
        };
    }
    let mut options = Options::default();
    // bench parses its own arguments (it also has an internal mode).
    if task.id != TaskId::Bench {
        let mut it = rest.iter();
        while let Some(a) = it.next() {
            let Some(flag) = task.flags.iter().find(|f| f.name == a.as_str()) else {
                bail!(
                    "unknown option {a:?} for {}; usage: {} (see `cargo xtask {} --help`)",
                    task.name,
                    task.usage(),
                    task.name
                );
            };
            let value = match flag.value {
                None => None,
                Some(v) => match it.next() {
                    Some(value) => Some(value.as_str()),
                    None => bail!("{} takes a value ({v}); usage: {}", flag.name, task.usage()),
                },
            };
            options.given.push((flag.name, value));
        }
    }
    Ok(Action::Run {
        task,
        options,
        rest,
    })
}

fn run(args: &[String]) -> Result<()> {
    let (task, o, rest) = match parse(args)? {
        Action::Help(text) => {
            print!("{text}");
            return Ok(());
        }
        Action::Run {
            task,
            options,
            rest,
        } => (task, options, rest),
    };
    match task.id {
        TaskId::Deps => deps::deps(),
        TaskId::GuestImage => guest::build(guest::GuestOptions {
            with_qemu_ga: o.has("--with-qemu-ga"),
        })
        .map(|_| ()),
        TaskId::Boot => demo::boot_only(o.has("--with-qemu-ga")),
        TaskId::DebianImage => debian::build().map(|_| ()),
        TaskId::VmTest => {
            let (qemu_only, libvirt_only) = (o.has("--qemu-only"), o.has("--libvirt-only"));
            if qemu_only && libvirt_only {
                bail!("--qemu-only and --libvirt-only exclude each other");
            }
            let (initramfs_only, debian_only) = (o.has("--initramfs-only"), o.has("--debian-only"));
            if initramfs_only && debian_only {
                bail!("--initramfs-only and --debian-only exclude each other");
            }
            suite::vm_test(suite::VmTestOptions {
                qemu: !libvirt_only,
                libvirt: !qemu_only,
                initramfs: !debian_only,
                debian: !initramfs_only,
            })
            .map(|passed| eprintln!("vm-test: {passed} checks passed"))
        }
        TaskId::Dist => dist::dist(o.has("--check")),
        TaskId::Demo => {
            let distro = match o.value("--distro") {
                None | Some("initramfs") => demo::Distro::Initramfs,
                Some("debian") => demo::Distro::Debian,
                Some(other) => bail!("--distro takes initramfs or debian, not {other:?}"),
            };
            demo::demo(distro, o.has("--keep"))
        }
        TaskId::Test => pipeline::test(),
        TaskId::Fuzz => {
            let seconds = match o.value("--seconds") {
                None => 300,
                Some(n) => n
                    .parse()
                    .map_err(|_| format!("--seconds takes a number, not {n:?}"))?,
            };
            let summary = fuzz::run(seconds)?;
            eprintln!("fuzz: {summary}");
            Ok(())
        }
        TaskId::Soak => soak::soak(),
        TaskId::Bench => bench::main(rest),
        // parse() answers `help` itself.
        TaskId::Help => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn help_text(a: &[&str]) -> String {
        match parse(&args(a)) {
            Ok(Action::Help(text)) => text,
            other => panic!("{a:?}: expected help, got {other:?}"),
        }
    }

    #[test]
    fn every_task_answers_help() {
        for t in TASKS {
            for flag in ["--help", "-h"] {
                let text = help_text(&[t.name, flag]);
                assert!(
                    text.starts_with(&format!("cargo xtask {}", t.name)),
                    "{}: {text}",
                    t.name
                );
                for f in t.flags {
                    assert!(text.contains(f.name), "{} {flag} lacks {}", t.name, f.name);
                }
            }
            // `--help` after another option too, and `help TASK`.
            if let Some(f) = t.flags.first() {
                assert_eq!(help_text(&[t.name, f.name, "--help"]), t.help());
            }
            assert_eq!(help_text(&["help", t.name]), t.help());
        }
    }

    #[test]
    fn general_help_lists_every_task_and_option() {
        for a in [&[][..], &["help"], &["--help"], &["-h"]] {
            let text = help_text(a);
            for t in TASKS {
                assert!(text.contains(&format!("\n  {} ", t.name)), "{}", t.name);
                for f in t.flags {
                    assert!(text.contains(&format!("      {}", f.usage())), "{}", f.name);
                }
            }
        }
    }

    #[test]
    fn task_names_are_unique_and_every_line_fits() {
        for (i, t) in TASKS.iter().enumerate() {
            assert!(
                TASKS[i + 1..]
                    .iter()
                    .all(|u| u.name != t.name && u.id != t.id),
                "{}",
                t.name
            );
        }
        let mut texts = vec![help()];
        texts.extend(TASKS.iter().map(Task::help));
        for line in texts.iter().flat_map(|t| t.lines()) {
            assert!(line.len() <= 80, "too long: {line:?}");
        }
    }

    #[test]
    fn wrap_fills_lines_up_to_the_width() {
        let cases: &[(&str, usize, &[&str])] = &[
            ("", 10, &[]),
            ("a b\nc", 10, &["a b c"]),
            ("aaa bbb ccc", 7, &["aaa bbb", "ccc"]),
            ("longerthanwidth x", 5, &["longerthanwidth", "x"]),
        ];
        for (text, width, want) in cases {
            assert_eq!(wrap(text, *width), *want, "{text:?}");
        }
    }

    #[test]
    fn options_are_checked_against_the_table() {
        let cases: &[(&[&str], bool)] = &[
            (&["dist", "--check"], true),
            (&["dist", "--keep"], false),
            (&["demo", "--keep"], true),
            (&["fuzz", "--seconds", "5"], true),
            (&["fuzz", "--seconds"], false),
            (&["fuzz", "5"], false),
            (&["vm-test", "--qemu-only"], true),
            (&["no-such-task"], false),
            (&["help", "no-such-task"], false),
            (&["help", "fuzz", "dist"], false),
            // bench checks its own arguments.
            (&["bench", "--only", "ping"], true),
        ];
        for (a, ok) in cases {
            assert_eq!(parse(&args(a)).is_ok(), *ok, "{a:?}");
        }
        let a = args(&["fuzz", "--seconds", "5"]);
        match parse(&a).unwrap() {
            Action::Run { task, options, .. } => {
                assert_eq!(task.id, TaskId::Fuzz);
                assert_eq!(options.value("--seconds"), Some("5"));
            }
            other => panic!("{other:?}"),
        }
        assert!(run(&args(&["vm-test", "--qemu-only", "--libvirt-only"])).is_err());
    }
}
