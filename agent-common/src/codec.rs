//! The one line codec: one JSON text per `\n`-terminated line.
//!
//! Both peers frame messages with [`JsonLinesCodec`]. Decoding yields
//! [`Frame`]s; it never fails on content, so that a bad line costs only that
//! line:
//! - a line longer than the maximum yields [`Frame::Oversized`] once and is
//!   discarded up to its newline, so the stream goes on with the next line;
//! - a [`RESYNC_BYTE`] (0xFF) discards everything buffered before it;
//! - empty lines and a trailing `\r` are ignored, so `socat` and `nc` work;
//! - a partial line left at end of stream is dropped.
//!
//! A line may announce an attachment: raw bytes that follow its newline (see
//! "Attachments" in PROTOCOL.md). The codec does not read JSON, so the reader
//! that parsed the line tells it: after [`JsonLinesCodec::expect_attachment`]
//! the next frame is [`Frame::Attachment`] with exactly that many bytes, and
//! after [`JsonLinesCodec::skip_attachment`] that many bytes are discarded
//! unseen. Inside an attachment every byte is data, the resync byte too.
//!
//! Encoding writes compact JSON (which never contains a raw newline) and `\n`.

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder};

use crate::RESYNC_BYTE;

/// A decoded unit of input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One complete line, without its line ending.
    Line(BytesMut),
    /// A line exceeded the maximum length; it is being discarded.
    Oversized,
    /// The raw bytes announced by [`JsonLinesCodec::expect_attachment`].
    Attachment(BytesMut),
}

/// What the codec does with the bytes after the last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// They are lines.
    No,
    /// The next this many bytes are an attachment, returned whole.
    Take(usize),
    /// The next this many bytes are an attachment nobody wants: dropped.
    Skip(u64),
    /// An attachment was abandoned: where its bytes end is unknown, so
    /// everything is dropped up to and including the next resync byte.
    UntilResync,
}

/// Errors from reading or writing a stream of lines.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The underlying stream failed.
    #[error("I/O error on the channel")]
    Io(#[from] std::io::Error),
    /// A message could not be serialised.
    #[error("could not serialise a message")]
    Serialize(#[source] serde_json::Error),
}

/// Newline-delimited JSON with a maximum line length and 0xFF resync.
#[derive(Debug, Clone)]
pub struct JsonLinesCodec {
    max_len: usize,
    /// Bytes of the buffer already scanned for a delimiter.
    scanned: usize,
    /// True while dropping the rest of an oversized line.
    discarding: bool,
    /// An attachment being received or skipped.
    raw: Raw,
}

impl JsonLinesCodec {
    /// A codec that accepts lines of at most `max_len` bytes (newline excluded).
    pub fn new(max_len: usize) -> JsonLinesCodec {
        JsonLinesCodec {
            max_len,
            scanned: 0,
            discarding: false,
            raw: Raw::No,
        }
    }

    /// The maximum line length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets any partial input state (for a new connection on the same port).
    pub fn reset(&mut self) {
        self.scanned = 0;
        self.discarding = false;
        self.raw = Raw::No;
    }

    /// The next `len` bytes are an attachment: the next frame is
    /// [`Frame::Attachment`] holding exactly them. Call it right after the
    /// [`Frame::Line`] that announced them; the caller bounds `len`.
    pub fn expect_attachment(&mut self, len: usize) {
        self.raw = Raw::Take(len);
    }

    /// The next `len` bytes are an attachment to drop (one that exceeds a
    /// limit, or that belongs to a line that could not be used). They are
    /// discarded as they arrive and never buffered.
    pub fn skip_attachment(&mut self, len: u64) {
        if len > 0 {
            self.raw = Raw::Skip(len);
        }
    }

    /// Drops the input up to and including the next resync byte, which a
    /// host sends before it syncs again. For when where the next line
    /// starts is unknown: an attachment was given up half-way (what follows
    /// cannot be told apart from its data), or a line that may have
    /// announced one could not be read. After a given-up attachment the
    /// caller also clears its read buffer: the bytes buffered are that
    /// attachment's data, in which a resync byte is data.
    pub fn discard_until_resync(&mut self) {
        self.scanned = 0;
        self.discarding = false;
        self.raw = Raw::UntilResync;
    }

    /// True while an attachment is being received or skipped (or input is
    /// being dropped after an abandoned one).
    pub fn in_attachment(&self) -> bool {
        self.raw != Raw::No
    }
}

impl Decoder for JsonLinesCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.raw {
            Raw::No => {}
            Raw::Take(len) if buf.len() >= len => {
                self.raw = Raw::No;
                return Ok(Some(Frame::Attachment(buf.split_to(len))));
            }
            Raw::Take(len) => {
                // Room for the whole attachment, so it is read in one buffer.
                buf.reserve(len - buf.len());
                return Ok(None);
            }
            Raw::Skip(left) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                buf.advance(n);
                let left = left - n as u64;
                if left > 0 {
                    self.raw = Raw::Skip(left);
                    return Ok(None);
                }
                self.raw = Raw::No;
            }
            Raw::UntilResync => match memchr::memchr(RESYNC_BYTE, buf) {
                Some(i) => {
                    buf.advance(i + 1);
                    self.raw = Raw::No;
                }
                None => {
                    buf.clear();
                    return Ok(None);
                }
            },
        }
        loop {
            let pos =
                memchr::memchr2(b'\n', RESYNC_BYTE, &buf[self.scanned..]).map(|p| p + self.scanned);
            match pos {
                Some(i) if buf[i] == RESYNC_BYTE => {
                    let _ = buf.split_to(i + 1);
                    self.reset();
                }
                Some(i) => {
                    let mut line = buf.split_to(i + 1);
                    self.scanned = 0;
                    if self.discarding {
                        self.discarding = false;
                        continue;
                    }
                    line.truncate(i);
                    if line.last() == Some(&b'\r') {
                        line.truncate(i - 1);
                    }
                    if line.len() > self.max_len {
                        return Ok(Some(Frame::Oversized));
                    }
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Ok(Some(Frame::Line(line)));
                }
                None if self.discarding => {
                    buf.clear();
                    self.scanned = 0;
                    return Ok(None);
                }
                // One byte of slack for a '\r' before the newline.
                None if buf.len() > self.max_len + 1 => {
                    buf.clear();
                    self.scanned = 0;
                    self.discarding = true;
                    return Ok(Some(Frame::Oversized));
                }
                None => {
                    self.scanned = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None => {
                // A partial line at end of stream is not a message.
                buf.clear();
                self.reset();
                Ok(None)
            }
        }
    }
}

impl<T: Serialize> Encoder<&T> for JsonLinesCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_line(item, dst)
    }
}

/// Appends `item` as one compact JSON line to `dst`.
pub fn encode_line<T: Serialize + ?Sized>(item: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
    serde_json::to_writer(dst.writer(), item).map_err(CodecError::Serialize)?;
    dst.put_u8(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(codec: &mut JsonLinesCodec, input: &[&[u8]]) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in input {
            buf.extend_from_slice(chunk);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        while let Some(f) = codec.decode_eof(&mut buf).unwrap() {
            out.push(f);
        }
        out
    }

    fn line(s: &str) -> Frame {
        Frame::Line(BytesMut::from(s.as_bytes()))
    }

    #[test]
    fn splits_lines_and_skips_blank_ones_and_cr() {
        let mut c = JsonLinesCodec::new(100);
        let frames = decode_all(&mut c, &[b"{\"a\":1}\n\n  \r\n{\"b\":2}\r\n"]);
        assert_eq!(frames, vec![line("{\"a\":1}"), line("{\"b\":2}")]);
    }

    #[test]
    fn every_split_point_gives_the_same_frames() {
        let input: &[u8] =
            b"{\"x\":1}\n\xff{\"partial\n{\"y\":\"\xc3\xa9\"}\r\n\xffgarbage\xff{\"z\":3}\n";
        let expected = vec![
            line("{\"x\":1}"),
            line("{\"y\":\"\u{e9}\"}"),
            line("{\"z\":3}"),
        ];
        // Note "{\"partial\n" is not dropped by 0xFF (it comes after it): it is
        // a complete (if invalid) line. Check that separately.
        let mut full = decode_all(&mut JsonLinesCodec::new(64), &[input]);
        assert_eq!(full.remove(1), line("{\"partial"));
        assert_eq!(full, expected);
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let mut c = JsonLinesCodec::new(64);
                let mut got = decode_all(&mut c, &[&input[..i], &input[i..j], &input[j..]]);
                got.remove(1);
                assert_eq!(got, expected, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn resync_byte_discards_the_partial_line_before_it() {
        let mut c = JsonLinesCodec::new(100);
        let frames = decode_all(&mut c, &[b"{\"stale\":", b"\xff", b"{\"fresh\":1}\n"]);
        assert_eq!(frames, vec![line("{\"fresh\":1}")]);
    }

    #[test]
    fn oversized_line_is_reported_once_and_the_stream_goes_on() {
        let mut c = JsonLinesCodec::new(8);
        let big = [b'x'; 50];
        // Arriving in pieces: reported as soon as it is too long.
        let frames = decode_all(&mut c, &[&big[..20], &big[20..], b"\n{\"ok\":1}\n"]);
        assert_eq!(frames, vec![Frame::Oversized, line("{\"ok\":1}")]);
        // Arriving whole with its newline.
        let mut c = JsonLinesCodec::new(8);
        let mut input = big.to_vec();
        input.extend_from_slice(b"\n[1]\n");
        assert_eq!(
            decode_all(&mut c, &[&input]),
            vec![Frame::Oversized, line("[1]")]
        );
        // Exactly at the limit is fine, with or without \r.
        let mut c = JsonLinesCodec::new(8);
        assert_eq!(
            decode_all(&mut c, &[b"12345678\r\n12345678\n"]),
            vec![line("12345678"), line("12345678")]
        );
    }

    #[test]
    fn resync_ends_discarding_an_oversized_line() {
        let mut c = JsonLinesCodec::new(4);
        let frames = decode_all(&mut c, &[b"aaaaaaaaaa", b"\xff[1]\n"]);
        assert_eq!(frames, vec![Frame::Oversized, line("[1]")]);
    }

    /// Decodes `input` split at `cuts`, announcing an attachment of `len`
    /// (taken or skipped) after the first line.
    fn decode_with_attachment(input: &[u8], cuts: &[usize], len: usize, take: bool) -> Vec<Frame> {
        let mut c = JsonLinesCodec::new(64);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pieces = Vec::new();
        let mut at = 0;
        for &cut in cuts {
            pieces.push(&input[at..cut]);
            at = cut;
        }
        pieces.push(&input[at..]);
        for piece in pieces {
            buf.extend_from_slice(piece);
            while let Some(f) = c.decode(&mut buf).unwrap() {
                if out.is_empty() {
                    if take {
                        c.expect_attachment(len);
                    } else {
                        c.skip_attachment(len as u64);
                    }
                }
                out.push(f);
            }
        }
        out
    }

    #[test]
    fn attachments_are_raw_bytes_at_every_split_point() {
        // The attachment holds newlines, resync bytes and half a line.
        let data: &[u8] = b"\xff\n{\"x\":\n\xff\xfe\r\n";
        let mut input = b"{\"h\":1}\n".to_vec();
        input.extend_from_slice(data);
        input.extend_from_slice(b"{\"next\":2}\n");
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let got = decode_with_attachment(&input, &[i, j], data.len(), true);
                assert_eq!(
                    got,
                    vec![
                        line("{\"h\":1}"),
                        Frame::Attachment(BytesMut::from(data)),
                        line("{\"next\":2}"),
                    ],
                    "split at {i},{j}"
                );
                let got = decode_with_attachment(&input, &[i, j], data.len(), false);
                assert_eq!(
                    got,
                    vec![line("{\"h\":1}"), line("{\"next\":2}")],
                    "skip, split at {i},{j}"
                );
            }
        }
    }

    #[test]
    fn empty_and_truncated_attachments() {
        let got = decode_with_attachment(b"[1]\n[2]\n", &[], 0, true);
        assert_eq!(
            got,
            vec![line("[1]"), Frame::Attachment(BytesMut::new()), line("[2]")]
        );
        // Cut short by the end of the stream: dropped, and the codec is
        // back to lines for the next connection.
        let mut c = JsonLinesCodec::new(64);
        let mut buf = BytesMut::from(&b"abc"[..]);
        c.expect_attachment(10);
        assert_eq!(c.decode_eof(&mut buf).unwrap(), None);
        assert!(!c.in_attachment());
        buf.extend_from_slice(b"[3]\n");
        assert_eq!(c.decode(&mut buf).unwrap(), Some(line("[3]")));
    }

    #[test]
    fn an_abandoned_attachment_drops_input_up_to_the_resync_byte() {
        let mut c = JsonLinesCodec::new(64);
        let mut buf = BytesMut::from(&b"half of the dat"[..]);
        c.expect_attachment(100);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        buf.clear();
        c.discard_until_resync();
        buf.extend_from_slice(b"a\n[\"looks like a line\"]\n");
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
        buf.extend_from_slice(b"more\xff[1]\n");
        assert_eq!(c.decode(&mut buf).unwrap(), Some(line("[1]")));
        assert!(!c.in_attachment());
    }

    #[test]
    fn a_skipped_attachment_is_never_buffered() {
        let mut c = JsonLinesCodec::new(8);
        c.skip_attachment(1 << 40);
        let mut buf = BytesMut::from(&[7u8; 4096][..]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
        assert!(c.in_attachment());
    }

    #[test]
    fn partial_line_at_eof_is_dropped() {
        let mut c = JsonLinesCodec::new(100);
        assert_eq!(
            decode_all(&mut c, &[b"{\"a\":1}\n{\"b\""]),
            vec![line("{\"a\":1}")]
        );
    }

    #[test]
    fn encoding_is_one_line() {
        let mut dst = BytesMut::new();
        let v = serde_json::json!({"s": "a\nb\u{0}", "n": 1});
        JsonLinesCodec::new(10).encode(&v, &mut dst).unwrap();
        assert_eq!(dst.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(dst.last(), Some(&b'\n'));
        let back: serde_json::Value = serde_json::from_slice(&dst[..dst.len() - 1]).unwrap();
        assert_eq!(back, v);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_frames_are_bounded(
            data in proptest::collection::vec(any::<u8>(), 0..2048),
            max in 1usize..64,
            cut in 0usize..2048,
        ) {
            let cut = cut.min(data.len());
            let mut c = JsonLinesCodec::new(max);
            for f in decode_all(&mut c, &[&data[..cut], &data[cut..]]) {
                if let Frame::Line(l) = f {
                    prop_assert!(l.len() <= max);
                    prop_assert!(!l.contains(&b'\n'));
                    prop_assert!(!l.contains(&RESYNC_BYTE));
                }
            }
        }

        #[test]
        fn encode_decode_round_trips(
            values in proptest::collection::vec(any::<(String, i64, Vec<u8>)>(), 0..16),
            cut in 0usize..4096,
        ) {
            let mut buf = BytesMut::new();
            for v in &values {
                encode_line(v, &mut buf).unwrap();
            }
            let bytes = buf.to_vec();
            let cut = cut.min(bytes.len());
            let mut c = JsonLinesCodec::new(1 << 20);
            let frames = decode_all(&mut c, &[&bytes[..cut], &bytes[cut..]]);
            prop_assert_eq!(frames.len(), values.len());
            for (f, v) in frames.iter().zip(&values) {
                let Frame::Line(l) = f else { panic!("oversized") };
                let back: (String, i64, Vec<u8>) = serde_json::from_slice(l).unwrap();
                prop_assert_eq!(&back, v);
            }
        }
    }
}
