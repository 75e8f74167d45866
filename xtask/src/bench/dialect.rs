//! The qemu-ga dialect against qemu-ga (`qga`): the same commands, the
//! same client ([`Qga`]), in the same guest, alternately; ours on its own
//! port (`qemu_ga_channel_name` of the guest config), qemu-ga on
//! `org.qemu.guest_agent.0`.

use std::time::Instant;

use serde_json::json;

use super::harness::{ms, sh, Bench};
use super::qga::Qga;
use super::stats::{Figure, Spread};
use crate::util::{bail, heading, Result};

/// The file both agents read through `guest-file-*`.
const DIALECT_FILE: &str = "/tmp/bench16";
/// Its size: 16 MiB.
const DIALECT_FILE_SIZE: u64 = 16 << 20;
/// Bytes per `guest-file-read`, as Proxmox reads (4 MiB).
const DIALECT_CHUNK: usize = 4 << 20;

impl Bench<'_> {
    /// `qga`: `guest-ping`, `guest-exec` until `exited`, and a 16 MiB read
    /// in 4 MiB `guest-file-read`s, through our dialect and through qemu-ga.
    pub(crate) async fn qga_dialect(&mut self) -> Result<()> {
        let mut ours = Qga::connect(&self.vm.ours_qga)?;
        let info = ours.call("guest-info", json!({}))?;
        if info["version"] != env!("CARGO_PKG_VERSION") {
            bail!("the dialect port is not our agent: guest-info {info}");
        }
        heading("bench: qemu-ga dialect guest-ping x500");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..500 {
            let t = Instant::now();
            ours.call("guest-ping", json!({}))?;
            a.push(ms(t));
            let t = Instant::now();
            self.q.call("guest-ping", json!({}))?;
            b.push(ms(t));
        }
        self.figures.push(Figure::new(
            "qemu-ga dialect: guest-ping (ms)",
            Spread::of(&a),
            Some(Spread::of(&b)),
            "<= 1.0x",
            |r| r <= 1.0,
        ));
        heading("bench: qemu-ga dialect guest-exec until exited x30");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..30 {
            let t = Instant::now();
            ours.exec_true()?;
            a.push(ms(t));
            let t = Instant::now();
            self.q.exec_true()?;
            b.push(ms(t));
        }
        self.figures.push(Figure::new(
            "qemu-ga dialect: guest-exec `true` until exited (ms)",
            Spread::of(&a),
            Some(Spread::of(&b)),
            "<= 1.0x",
            |r| r <= 1.0,
        ));
        heading("bench: qemu-ga dialect 16 MiB read in 4 MiB guest-file-reads x3");
        sh(
            &self.c,
            &format!("head -c {DIALECT_FILE_SIZE} /dev/urandom > {DIALECT_FILE}"),
        )
        .await?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let mine = ours.read_file(DIALECT_FILE, DIALECT_CHUNK, &mut a)?;
            let theirs = self.q.read_file(DIALECT_FILE, DIALECT_CHUNK, &mut b)?;
            if mine.len() as u64 != DIALECT_FILE_SIZE || mine != theirs {
                bail!(
                    "the two agents read other bytes: {} and {} bytes",
                    mine.len(),
                    theirs.len()
                );
            }
        }
        self.figures.push(Figure::new(
            "qemu-ga dialect: 16 MiB read, 4 MiB guest-file-reads (MiB/s)",
            Spread::of(&a),
            Some(Spread::of(&b)),
            ">= 1.0x",
            |r| r >= 1.0,
        ));
        ours.close();
        Ok(())
    }
}
