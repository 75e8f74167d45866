//! Small helpers shared by every task: errors, paths, running commands.

use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// What went wrong in a task, as a message for the user.
#[derive(Debug)]
pub(crate) struct XtaskError(String);

impl fmt::Display for XtaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for XtaskError {}

impl From<String> for XtaskError {
    fn from(s: String) -> Self {
        XtaskError(s)
    }
}

impl From<&str> for XtaskError {
    fn from(s: &str) -> Self {
        XtaskError(s.to_owned())
    }
}

impl From<std::io::Error> for XtaskError {
    fn from(e: std::io::Error) -> Self {
        XtaskError(format!("I/O error: {e}"))
    }
}

impl From<serde_json::Error> for XtaskError {
    fn from(e: serde_json::Error) -> Self {
        XtaskError(format!("JSON error: {e}"))
    }
}

/// Result of every task.
pub(crate) type Result<T, E = XtaskError> = std::result::Result<T, E>;

/// Returns early with a formatted [`XtaskError`].
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::util::XtaskError::from(format!($($arg)*)))
    };
}
pub(crate) use bail;

/// The workspace root (the parent of `xtask/`).
pub(crate) fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The workspace's target directory, where users find what xtask builds.
///
/// Always `<root>/target`, whatever `CARGO_TARGET_DIR` the caller has set:
/// the guest image, packages and the binaries the tests run live there.
pub(crate) fn target_dir() -> PathBuf {
    root().join("target")
}

/// True when running as root (uid 0).
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// True under CI (`CI=true`): a missing prerequisite is then a failure.
pub(crate) fn is_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// A `cargo` command run in the workspace root with the workspace target dir.
pub(crate) fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root())
        .env("CARGO_TARGET_DIR", target_dir());
    cmd
}

/// Shell-like rendering of a command, for logs.
pub(crate) fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(a));
    }
    s
}

/// Quotes one argument for display when it needs it.
pub(crate) fn quote(a: &OsStr) -> String {
    let a = a.to_string_lossy();
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// Runs a command, echoing it; fails on a non-zero exit.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", render(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run `{}`: {e}", render(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", render(cmd));
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout; fails on a non-zero exit.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", render(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}\n{}",
            render(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command quietly; true if it ran and exited 0.
pub(crate) fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// True if `name` is an executable on `PATH`.
pub(crate) fn have_command(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// Runs a command with captured output, killing it (by pid) after `timeout`.
pub(crate) fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", render(cmd)))?;
    wait_output(child, timeout).map_err(|e| format!("`{}`: {e}", render(cmd)).into())
}

/// Runs a command with `input` on its standard input and captured output,
/// killing it (by pid) after `timeout`.
pub(crate) fn output_with_stdin(
    cmd: &mut Command,
    input: &[u8],
    timeout: Duration,
) -> Result<Output> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", render(cmd)))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input)?;
    }
    wait_output(child, timeout).map_err(|e| format!("`{}`: {e}", render(cmd)).into())
}

/// Collects a spawned child's piped output, killing it (by pid) after
/// `timeout`.
pub(crate) fn wait_output(mut child: std::process::Child, timeout: Duration) -> Result<Output> {
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let status = wait_timeout(&mut child, timeout)?;
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {timeout:?}");
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Waits for a child up to `timeout`; `None` if it is still running.
pub(crate) fn wait_timeout(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `signal` (e.g. "TERM") to one process, by pid.
pub(crate) fn kill_pid(pid: u32, signal: &str) -> bool {
    succeeds(
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string()),
    )
}

/// True if a process with this pid exists (and is not a zombie).
pub(crate) fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Prints a task heading.
pub(crate) fn heading(s: &str) {
    eprintln!("\n==> {s}");
}

/// Last `n` lines of a text file, for error reports.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_leaves_plain_words_and_quotes_the_rest() {
        let cases = [
            ("ping", "ping"),
            ("/tmp/a.sock", "/tmp/a.sock"),
            ("", "''"),
            ("a b", "'a b'"),
            ("it's", r"'it'\''s'"),
        ];
        for (input, want) in cases {
            assert_eq!(quote(OsStr::new(input)), want, "input {input:?}");
        }
    }

    #[test]
    fn pid_alive_sees_this_process_and_not_a_free_pid() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }

    #[test]
    fn tail_returns_last_lines() {
        let dir = std::env::temp_dir().join(format!("xtask-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("log");
        std::fs::write(&f, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&f, 2), "b\nc");
        assert_eq!(tail(&f, 10), "a\nb\nc");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
