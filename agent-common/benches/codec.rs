//! Micro-benchmarks of the wire path, so regressions show without a VM.
//!
//! `cargo bench -p agent-common --bench codec` (add `-- --quick` for a fast
//! run). Throughput is reported in bytes of wire data.

use agent_common::codec::{encode_line, Frame, JsonLinesCodec};
use agent_common::encoding::Encoding;
use agent_common::jsonrpc::{parse_message, Id, Incoming, Response};
use agent_common::methods::{FileReadParams, FileReadResult};
use agent_common::{MAX_READ_CHUNK, MAX_RESPONSE_SIZE};
use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio_util::codec::Decoder;

const READ_SIZE: usize = 64 * 1024;

/// Deterministic pseudo-random bytes (xorshift), so runs are comparable.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Feeds `input` to a fresh codec in `READ_SIZE` pieces, as a port read loop
/// would, and returns the number of frames.
fn decode_in_reads(input: &[u8], max: usize) -> usize {
    let mut codec = JsonLinesCodec::new(max);
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut frames = 0;
    for piece in input.chunks(READ_SIZE) {
        buf.extend_from_slice(piece);
        while let Some(frame) = codec.decode(&mut buf).expect("decoding never fails") {
            if let Frame::Line(line) = frame {
                black_box(&line);
            }
            frames += 1;
        }
    }
    frames
}

fn file_read_response() -> Response {
    let raw = noise(MAX_READ_CHUNK as usize);
    let result = FileReadResult {
        content: Encoding::Base64.encode_lossy(&raw),
        encoding: Encoding::Base64,
        offset: 0,
        bytes_read: raw.len() as u64,
        eof: false,
        size: 32 << 20,
    };
    Response::ok(Id::number(42), &result)
}

fn codec_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");

    // Many small request lines, as a host pinging quickly sends them.
    let ping = br#"{"jsonrpc":"2.0","method":"ping","id":123456}"#;
    let mut small = Vec::new();
    while small.len() < 1 << 20 {
        small.extend_from_slice(ping);
        small.push(b'\n');
    }
    let lines = small.len() / (ping.len() + 1);
    group.throughput(Throughput::Bytes(small.len() as u64));
    group.bench_function("small_lines_1MiB", |b| {
        b.iter(|| assert_eq!(decode_in_reads(&small, 64 * 1024), lines));
    });

    // One 1.4 MB line: a 1 MiB file_read reply arriving at the host.
    let mut big = BytesMut::new();
    encode_line(&file_read_response(), &mut big).expect("encodes");
    group.throughput(Throughput::Bytes(big.len() as u64));
    group.bench_function("one_1.4MB_line", |b| {
        b.iter(|| assert_eq!(decode_in_reads(&big, MAX_RESPONSE_SIZE), 1));
    });
    group.finish();

    let mut group = c.benchmark_group("encode");
    let response = file_read_response();
    group.throughput(Throughput::Bytes(big.len() as u64));
    group.bench_function("file_read_reply_1MiB_base64", |b| {
        b.iter_batched_ref(
            || BytesMut::with_capacity(big.len()),
            |dst| encode_line(black_box(&response), dst).expect("encodes"),
            BatchSize::SmallInput,
        );
    });
    group.finish();

    let mut group = c.benchmark_group("base64");
    let raw = noise(1 << 20);
    let text = Encoding::Base64.encode_lossy(&raw);
    group.throughput(Throughput::Bytes(raw.len() as u64));
    group.bench_function("encode_1MiB", |b| {
        b.iter(|| Encoding::Base64.encode(black_box(&raw)));
    });
    group.bench_function("decode_1MiB", |b| {
        b.iter(|| {
            Encoding::Base64
                .decode(black_box(&text))
                .expect("valid base64")
        });
    });
    group.finish();

    let mut group = c.benchmark_group("jsonrpc");
    let request = br#"{"jsonrpc":"2.0","method":"file_read","params":{"path":"/var/log/syslog","offset":1048576,"length":1048576,"encoding":"base64"},"id":17}"#;
    group.throughput(Throughput::Bytes(request.len() as u64));
    group.bench_function("parse_message_file_read", |b| {
        b.iter(|| {
            let Incoming::Single(Ok(req)) = parse_message(black_box(request)) else {
                panic!("a valid request")
            };
            req.params::<FileReadParams>().expect("valid params")
        });
    });
    group.finish();
}

criterion_group!(benches, codec_benches);
criterion_main!(benches);
