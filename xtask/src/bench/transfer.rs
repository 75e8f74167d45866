//! Transfer figures: the raw port ceiling (`raw`), the test file's
//! `read` and `write`, the chunk `window`, a tiny `push`, and the write with
//! larger request lines (`bigmsg`).

use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host_client::{Client, ClientOptions, PushOptions};

use super::harness::{client_options, mibs, ms, proc_status, sh, status_kb, Bench};
use super::latency::pull_with_pings;
use super::stats::{Figure, Spread};
use super::vm::RAW_PORT;
use super::{err, FILE_SIZE, GUEST_FILE};
use crate::deps::{self, MUSL_TARGET};
use crate::util::{bail, cargo, heading, run, target_dir, Result};

impl Bench<'_> {
    /// `raw`: three guest `dd`s into the raw port and three out of it, the
    /// ceilings of both directions. Their rows come last
    /// ([`Bench::finish`]); `read` and `write` report their shares of them.
    pub(crate) async fn raw(&mut self) -> Result<()> {
        heading("bench: raw port ceilings");
        let (mut out, mut into) = (Vec::new(), Vec::new());
        // What a command costs besides its work, taken off the host-to-guest
        // timing below (the median of a few `true`s).
        let mut idle = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            sh(&self.c, "true").await?;
            idle.push(t.elapsed().as_secs_f64());
        }
        let idle = Spread::of(&idle).median;
        self.raw_idle = Some(idle);
        for _ in 0..3 {
            out.push(raw_ceiling(&self.c, &self.vm.raw).await?);
            into.push(raw_ceiling_in(&self.c, &self.vm.raw, idle).await?);
        }
        self.raw = Some(Spread::of(&out));
        self.raw_in = Some(Spread::of(&into));
        Ok(())
    }

    /// Writes the 32 MiB test file in the guest and pulls it to the host,
    /// `pulls` times (the pulls are `read`'s figure); with `theirs`, also
    /// reads it through qemu-ga for the read figures' reference.
    pub(crate) async fn test_file(&mut self, pulls: usize, theirs: bool) -> Result<()> {
        heading("bench: read 32 MiB");
        sh(
            &self.c,
            &format!("head -c {FILE_SIZE} /dev/urandom > {GUEST_FILE}"),
        )
        .await?;
        for _ in 0..pulls {
            let t = Instant::now();
            self.c
                .pull(GUEST_FILE, &self.local, |_| {})
                .await
                .map_err(err("pull"))?;
            self.read_rates.push(mibs(FILE_SIZE, t));
        }
        self.reference = fs::read(&self.local)?;
        if self.reference.len() as u64 != FILE_SIZE {
            bail!("pull gave {} bytes", self.reference.len());
        }
        // qemu-ga's best read rate, the reference of the read figures.
        if theirs {
            let mut theirs_4k = Vec::new();
            let data = self.q.read_file(GUEST_FILE, 4096, &mut theirs_4k)?;
            if data != self.reference {
                bail!("qemu-ga read gave other bytes than our pull");
            }
            let mut theirs_4m = Vec::new();
            for _ in 0..3 {
                self.q.read_file(GUEST_FILE, 4 << 20, &mut theirs_4m)?;
            }
            let theirs_4k = Spread::of(&theirs_4k);
            let theirs_4m = Spread::of(&theirs_4m);
            eprintln!(
                "bench: qemu-ga read at 4 KiB: {:.2} MiB/s, at 4 MiB: {:.2} MiB/s",
                theirs_4k.median, theirs_4m.median
            );
            self.best = Some(if theirs_4m.median >= theirs_4k.median {
                theirs_4m
            } else {
                theirs_4k
            });
        }
        Ok(())
    }

    /// `read`: the rows of the pulls [`Bench::test_file`] timed, and the
    /// test file sent into the raw port with no agent in the way: by the
    /// guest kernel alone (`sendfile`), the most a splice of its pages into
    /// the port gives, and by a copying `dd` as the ceiling's is.
    pub(crate) async fn read(&mut self) -> Result<()> {
        let ours_read = Spread::of(&self.read_rates);
        self.figures.push(Figure::new(
            "read 32 MiB to host (MiB/s)",
            ours_read,
            self.best,
            ">= 20x",
            |r| r >= 20.0,
        ));
        if let Some(raw_spread) = self.raw {
            self.figures.push(Figure::new(
                "read: share of guest-to-host ceiling (%)",
                ours_read.scale(100.0 / raw_spread.median),
                None,
                ">= 60%",
                |_| ours_read.median * 100.0 / raw_spread.median >= 60.0,
            ));
            let mut spliced = Vec::new();
            for _ in 0..3 {
                spliced.push(raw_sendfile(&self.c, &self.vm.raw).await?);
            }
            let spliced = Spread::of(&spliced);
            self.figures.push(Figure::new(
                "  the test file into the raw port by sendfile (MiB/s)",
                spliced,
                None,
                "(reference)",
                |_| true,
            ));
            self.figures.push(Figure::new(
                "  sendfile's share of guest-to-host ceiling (%)",
                spliced.scale(100.0 / raw_spread.median),
                None,
                "(reference)",
                |_| true,
            ));
            let mut copied = Vec::new();
            for _ in 0..3 {
                copied.push(raw_file_dd(&self.c, &self.vm.raw).await?);
            }
            self.figures.push(Figure::new(
                "  the test file into the raw port by dd, 64 KiB copies (MiB/s)",
                Spread::of(&copied),
                None,
                "(reference)",
                |_| true,
            ));
        }
        Ok(())
    }

    /// Pushes the test file into the guest through our agent once and
    /// removes it again; the rate in MiB/s.
    async fn push_test_file(&mut self) -> Result<f64> {
        let t = Instant::now();
        self.c
            .push(
                &self.local,
                "/tmp/kvmmanager/bench-w",
                PushOptions::default(),
                |_| {},
            )
            .await
            .map_err(err("push"))?;
        let rate = mibs(FILE_SIZE, t);
        sh(&self.c, "rm -f /tmp/kvmmanager/bench-w").await?;
        Ok(rate)
    }

    /// `write`: the test file pushed into the guest by both agents.
    pub(crate) async fn write(&mut self) -> Result<()> {
        heading("bench: write 32 MiB");
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            ours.push(self.push_test_file().await?);
            let t = Instant::now();
            self.q
                .write_file("/tmp/bench-w", &self.reference, 1 << 20)?;
            theirs.push(mibs(FILE_SIZE, t));
            sh(&self.c, "rm -f /tmp/bench-w").await?;
        }
        self.theirs_write = Some(Spread::of(&theirs));
        let ours = Spread::of(&ours);
        self.figures.push(Figure::new(
            "write 32 MiB into guest (MiB/s)",
            ours,
            self.theirs_write,
            ">= 40x",
            |r| r >= 40.0,
        ));
        if let Some(raw_spread) = self.raw_in {
            self.figures.push(Figure::new(
                "write: share of host-to-guest ceiling (%)",
                ours.scale(100.0 / raw_spread.median),
                None,
                ">= 40%",
                |_| ours.median * 100.0 / raw_spread.median >= 40.0,
            ));
        }
        self.write_floor(ours).await
    }

    /// The write's floor, with `raw`: the host writes into the raw port
    /// and a guest program does with the bytes only what a push requires of
    /// every byte (its port reads, the CRC-32 check, the page-cache write),
    /// with no agent in the way; and, beside it, a `dd` doing the same
    /// without the check. `ours` is the write row, set against the floor.
    async fn write_floor(&mut self, ours: Spread) -> Result<()> {
        let (Some(idle), Some(program)) = (self.raw_idle, self.push_floor.clone()) else {
            return Ok(());
        };
        let floor_bin = "/tmp/kvmmanager/bench-push-floor";
        let options = PushOptions {
            permissions: Some(0o755),
            ..PushOptions::default()
        };
        self.c
            .push(&program, floor_bin, options, |_| {})
            .await
            .map_err(err("push push_floor"))?;
        let port = format!("/dev/virtio-ports/{RAW_PORT}");
        let out = "/tmp/bench-floor";
        let dd = format!(
            "dd if={port} of={out} bs=1M count={} iflag=fullblock 2>&1",
            FILE_SIZE >> 20
        );
        let floor = format!("{floor_bin} {port} {out} {FILE_SIZE}");
        let (dd_read, floor_read) = (
            format!("{}+0 records in", FILE_SIZE >> 20),
            format!("{FILE_SIZE} bytes"),
        );
        let remove_out = format!("rm -f {out}");
        let (mut copied, mut checked) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            copied.push(raw_in(&self.c, &self.vm.raw, idle, &dd, &dd_read).await?);
            sh(&self.c, &remove_out).await?;
            checked.push(raw_in(&self.c, &self.vm.raw, idle, &floor, &floor_read).await?);
            sh(&self.c, &remove_out).await?;
        }
        sh(&self.c, &format!("rm -f {floor_bin}")).await?;
        let checked = Spread::of(&checked);
        self.figures.push(Figure::new(
            "  the raw port into a tmpfs file by dd, 1 MiB blocks (MiB/s)",
            Spread::of(&copied),
            None,
            "(reference)",
            |_| true,
        ));
        self.figures.push(Figure::new(
            "  the same, each 1 MiB checked by the agent's CRC-32: write floor (MiB/s)",
            checked,
            None,
            "(reference)",
            |_| true,
        ));
        self.figures.push(Figure::new(
            "  write: share of the write floor (%)",
            ours.scale(100.0 / checked.median),
            None,
            "(reference)",
            |_| true,
        ));
        Ok(())
    }

    /// `window`: the same pull with 1, 2 and 8 MiB in flight
    /// (`ClientOptions::max_in_flight_chunks`), by `file_read` chunks and
    /// by one `file_read_stream`.
    pub(crate) async fn window(&mut self) -> Result<()> {
        for window in [1usize, 2, 8] {
            // Chunk requests against one stream, side by side at each window.
            for streamed in [false, true] {
                let how = if streamed {
                    "one file_read_stream"
                } else {
                    "file_read chunks"
                };
                heading(&format!(
                    "bench: read 32 MiB, {how}, {window} MiB in flight"
                ));
                // One host connection per port at a time: replace the client.
                self.c = Client::lazy(
                    &self.vm.ours,
                    ClientOptions {
                        max_in_flight_chunks: window,
                        stream_reads: streamed,
                        ..client_options()
                    },
                );
                let (mut rates, mut p99s) = (Vec::new(), Vec::new());
                for _ in 0..3 {
                    let t = Instant::now();
                    let p99 = pull_with_pings(&self.c, &self.local).await?;
                    rates.push(mibs(FILE_SIZE, t));
                    p99s.push(p99);
                }
                let p99 = Spread::of(&p99s);
                self.figures.push(
                    Figure::new(
                        &format!("  read, {how}, {window} MiB in flight (MiB/s)"),
                        Spread::of(&rates),
                        self.best,
                        "(experiment)",
                        |_| true,
                    )
                    .with_note(format!("ping p99 {:.0} ms", p99.median)),
                );
            }
        }
        self.disconnect();
        Ok(())
    }

    /// `push`: fixed cost of a tiny push (connection already open).
    pub(crate) async fn push(&mut self) -> Result<()> {
        let tiny = self.out_dir.join("tiny.bin");
        fs::write(&tiny, [7u8; 1024])?;
        let mut ours = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            self.c
                .push(
                    &tiny,
                    "/tmp/kvmmanager/tiny",
                    PushOptions::default(),
                    |_| {},
                )
                .await
                .map_err(err("push"))?;
            ours.push(ms(t));
        }
        let _ = fs::remove_file(&tiny);
        self.figures.push(Figure::new(
            "push 1 KiB, connection open (ms)",
            Spread::of(&ours),
            None,
            "(report)",
            |_| true,
        ));
        Ok(())
    }

    /// `bigmsg`: the write again with larger request lines (the agent
    /// restarted with max_message_size_kb raised).
    pub(crate) async fn bigmsg(&mut self) -> Result<()> {
        heading("bench: write 32 MiB with max_message_size_kb = 1024");
        self.restart_agent(r#"s/"max_message_size_kb": 64/"max_message_size_kb": 1024/"#)
            .await?;
        let limits = self.c.limits().await.map_err(err("limits"))?;
        if limits.max_message_size < 1024 * 1024 {
            bail!("agent restarted without the larger max_message_size: {limits:?}");
        }
        let mut ours = Vec::new();
        for _ in 0..3 {
            ours.push(self.push_test_file().await?);
        }
        let st = proc_status(&self.c, self.our_pid).await?;
        let hwm = status_kb(&st, "VmHWM").unwrap_or(0.0) / 1024.0;
        self.figures.push(
            Figure::new(
                "  write, max_message_size_kb 1024 (MiB/s)",
                Spread::of(&ours),
                self.theirs_write,
                "(experiment)",
                |_| true,
            )
            .with_note(format!("agent peak RSS {hwm:.1} MB")),
        );
        Ok(())
    }

    /// `copyread`: the read with `zero_copy_reads` off (each chunk read
    /// into a buffer and written, as before splicing), the comparison of
    /// the read row in the same run. Restarts the agent twice.
    pub(crate) async fn copyread(&mut self) -> Result<()> {
        heading("bench: read 32 MiB with zero_copy_reads false");
        self.restart_agent(r#"s/"log_level"/"zero_copy_reads": false, "log_level"/"#)
            .await?;
        let (mut rates, mut p99s) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let t = Instant::now();
            p99s.push(pull_with_pings(&self.c, &self.local).await?);
            rates.push(mibs(FILE_SIZE, t));
        }
        if fs::read(&self.local)? != self.reference {
            bail!("the pull with zero_copy_reads false gave other bytes");
        }
        self.figures.push(
            Figure::new(
                "  read, zero_copy_reads false (MiB/s)",
                Spread::of(&rates),
                self.best,
                "(experiment)",
                |_| true,
            )
            .with_note(format!("ping p99 {:.0} ms", Spread::of(&p99s).median)),
        );
        self.restart_agent(r#"s/"zero_copy_reads": false, //"#)
            .await
    }
}

/// 32 MiB from the host through the raw port into a guest `dd` (MiB/s):
/// the host-to-guest ceiling.
async fn raw_ceiling_in(c: &Client, raw: &Path, idle: f64) -> Result<f64> {
    let blocks = FILE_SIZE / 4096;
    let dd = format!(
        "dd if=/dev/virtio-ports/{RAW_PORT} of=/dev/null bs=4k count={blocks} iflag=fullblock 2>&1"
    );
    raw_in(c, raw, idle, &dd, &format!("{blocks}+0 records in")).await
}

/// 32 MiB from the host through the raw port into `command` in the guest,
/// which reads all of it and prints `expect` (MiB/s).
///
/// The host writes from a thread of its own before the command starts, so
/// the data waits in the socket and the command reads flat out from its
/// first read; the time is the command's, from request to reply, less
/// `idle` (a command's cost besides its work).
async fn raw_in(c: &Client, raw: &Path, idle: f64, command: &str, expect: &str) -> Result<f64> {
    use std::io::Write;
    let mut s = UnixStream::connect(raw)?;
    s.set_write_timeout(Some(Duration::from_secs(120)))?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let block = vec![0x5au8; 1 << 20];
        for _ in 0..FILE_SIZE >> 20 {
            s.write_all(&block)?;
        }
        // Held open until the guest has read everything: closing the host
        // end makes the port discard what it has not delivered.
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    });
    let t = Instant::now();
    let out = sh(c, command).await?;
    let took = (t.elapsed().as_secs_f64() - idle).max(1e-9);
    writer
        .join()
        .map_err(|_| "raw writer panicked")?
        .map_err(err("raw write"))?;
    if !out.contains(expect) {
        bail!("the guest's {command:?} did not read the raw port through: {out}");
    }
    Ok(FILE_SIZE as f64 / 1048576.0 / took)
}

/// One guest `dd` of 32 MiB into the raw port, timed on the host (MiB/s).
async fn raw_ceiling(c: &Client, raw: &Path) -> Result<f64> {
    let dd = format!(
        "dd if=/dev/zero of=/dev/virtio-ports/{RAW_PORT} bs=64k count={} 2>/dev/null",
        FILE_SIZE / 65536
    );
    raw_out(c, raw, &dd).await
}

/// One guest `cat` of the 32 MiB test file into the raw port (MiB/s): the
/// kernel moves the file's pages to the port by `sendfile(2)`, the same
/// splice path as a `file_read` chunk, with no agent in the way.
async fn raw_sendfile(c: &Client, raw: &Path) -> Result<f64> {
    raw_out(
        c,
        raw,
        &format!("cat {GUEST_FILE} > /dev/virtio-ports/{RAW_PORT}"),
    )
    .await
}

/// One guest `dd` of the 32 MiB test file into the raw port in 64 KiB
/// blocks (MiB/s): the ceiling's copying writes, from the file instead of
/// `/dev/zero`, to set beside the `sendfile` row.
async fn raw_file_dd(c: &Client, raw: &Path) -> Result<f64> {
    raw_out(
        c,
        raw,
        &format!("dd if={GUEST_FILE} of=/dev/virtio-ports/{RAW_PORT} bs=64k 2>/dev/null"),
    )
    .await
}

/// Runs `command` in the guest, which writes 32 MiB into the raw port;
/// the time from the first byte the host reads to the last (MiB/s).
async fn raw_out(c: &Client, raw: &Path, command: &str) -> Result<f64> {
    let mut s = UnixStream::connect(raw)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, Duration)> {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let mut first = None;
        while got < FILE_SIZE {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got += n as u64;
        }
        Ok((got, first.map(|f| f.elapsed()).unwrap_or_default()))
    });
    sh(c, command).await?;
    let (got, took) = reader
        .join()
        .map_err(|_| "raw reader panicked")?
        .map_err(err("raw read"))?;
    if got < FILE_SIZE {
        bail!("raw port gave {got} bytes");
    }
    Ok(FILE_SIZE as f64 / 1048576.0 / took.as_secs_f64().max(1e-9))
}

/// Builds `push_floor` (agent-common's example) for the guest, as the
/// agent is built: static musl if that target is installed, else for the
/// host (the guest image then holds the host's libraries).
pub(crate) fn build_push_floor() -> Result<PathBuf> {
    let musl = deps::has_target(MUSL_TARGET);
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "agent-common",
        "--example",
        "push_floor",
    ]);
    if musl {
        cmd.args(["--target", MUSL_TARGET]);
    }
    run(&mut cmd)?;
    let dir = if musl {
        target_dir().join(MUSL_TARGET)
    } else {
        target_dir()
    };
    Ok(dir.join("release/examples/push_floor"))
}
