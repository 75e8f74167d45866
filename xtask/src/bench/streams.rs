//! Stream figures (issue 15): the first output byte of a streamed exec,
//! forward throughput (and its share of the raw port ceiling), and ping
//! p99 while a forward runs flat out.

use std::time::{Duration, Instant};

use host_client::{Client, ExecRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::err;
use super::harness::{mibs, ms, Bench};
use super::stats::{Figure, Spread};
use super::{FILE_SIZE, GUEST_FILE};
use crate::util::{bail, heading, Result};

/// busybox httpd's port in the guest, serving the test file's directory.
const PORT: u16 = 8081;

/// Fetches the test file through a forward to busybox httpd; MiB/s.
async fn fetch(c: &Client) -> Result<f64> {
    let name = GUEST_FILE.rsplit('/').next().unwrap_or("bench32");
    let t = Instant::now();
    let mut f = c
        .forward_open("127.0.0.1", PORT)
        .await
        .map_err(err("forward_open"))?;
    f.writer
        .write_all(format!("GET /{name} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    // Headers besides the body.
    if got < FILE_SIZE {
        bail!("the forward gave {got} bytes, less than the {FILE_SIZE} of the file");
    }
    Ok(mibs(FILE_SIZE, t))
}

impl Bench<'_> {
    /// `streams`: needs the test file in the guest (`read`).
    pub(crate) async fn streams(&mut self) -> Result<()> {
        heading("bench: streamed exec, first output byte x30");
        let mut first = Vec::new();
        for _ in 0..30 {
            let t = Instant::now();
            let mut run = self
                .c
                .exec_start(ExecRequest::new("/bin/echo", ["x"]))
                .await
                .map_err(err("exec_start"))?;
            let chunk = run.stdout.read_chunk().await?;
            first.push(ms(t));
            if chunk.is_none() {
                bail!("the streamed echo printed nothing");
            }
            run.control.wait().await.map_err(err("exec wait"))?;
        }
        self.figures.push(Figure::new(
            "streamed exec: first output byte (ms)",
            Spread::of(&first),
            None,
            "(new)",
            |_| true,
        ));

        heading("bench: forward 32 MiB from busybox httpd");
        let dir = GUEST_FILE.rsplit_once('/').map_or("/tmp", |(d, _)| d);
        let httpd = self
            .c
            .exec_start(ExecRequest::new(
                "httpd",
                ["-f", "-p", &format!("127.0.0.1:{PORT}"), "-h", dir],
            ))
            .await
            .map_err(err("start httpd"))?;
        // Until it listens.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.c.forward_open("127.0.0.1", PORT).await.is_err() {
            if Instant::now() >= deadline {
                bail!("busybox httpd did not listen within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut rates = Vec::new();
        for _ in 0..3 {
            rates.push(fetch(&self.c).await?);
        }
        let rate = Spread::of(&rates);
        self.figures.push(Figure::new(
            "forward 32 MiB from guest httpd (MiB/s)",
            rate,
            None,
            "(new)",
            |_| true,
        ));
        if let Some(raw) = self.raw {
            self.figures.push(Figure::new(
                "forward: share of raw port ceiling (%)",
                rate.scale(100.0 / raw.median),
                None,
                "(new)",
                |_| true,
            ));
        }

        heading("bench: ping during a forward flat out");
        let mut p99s = Vec::new();
        for _ in 0..3 {
            let c2 = self.c.clone();
            let fetching = tokio::spawn(async move { fetch(&c2).await });
            let mut lat = Vec::new();
            while !fetching.is_finished() {
                let t = Instant::now();
                self.c.ping().await.map_err(err("ping"))?;
                lat.push(ms(t));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            fetching.await.map_err(err("join"))??;
            p99s.push(Spread::of(&lat).p99);
        }
        let p99 = Spread::of(&p99s);
        self.figures.push(Figure::new(
            "ping p99 during a forward (ms)",
            p99,
            None,
            "<= 20 ms",
            move |_| p99.median <= 20.0,
        ));
        httpd
            .control
            .signal("KILL")
            .await
            .map_err(err("stop httpd"))?;
        Ok(())
    }
}
