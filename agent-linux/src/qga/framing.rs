//! qemu-ga's framing: a stream of JSON objects, not lines.
//!
//! qemu-ga feeds its input to a JSON streamer and runs each complete
//! top-level value; whitespace (newlines included) between values means
//! nothing. A `0xFF` byte (never part of UTF-8 text) resets the parser, so a
//! host that lost track of the stream sends `0xFF`, then
//! `guest-sync-delimited`, and reads up to the `0xFF` that precedes its
//! reply. [`Splitter`] finds the objects' boundaries by counting braces
//! outside strings; `serde_json` then parses each object whole.

/// The byte that resets the parser (and precedes a `guest-sync-delimited`
/// reply).
pub(crate) const RESET: u8 = 0xFF;

/// What the splitter found in the input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// One complete top-level JSON object, braces included.
    Object(Vec<u8>),
    /// A top-level object longer than the limit, discarded whole.
    Oversized,
    /// Input that cannot start an object (qemu-ga answers such input with
    /// a parse error); the run of it up to the next whitespace, `{` or
    /// `0xFF`.
    Junk(Vec<u8>),
    /// A `0xFF`: what came before it in an unfinished object was dropped.
    /// qemu-ga answers each with a parse error naming the token it cut
    /// (the string being read, if any, here), and so does this agent.
    Reset(Vec<u8>),
}

/// Splits a byte stream into top-level JSON objects.
#[derive(Debug)]
pub(crate) struct Splitter {
    max: usize,
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The current object passed `max`: its bytes are counted, not kept.
    oversized: bool,
    /// Inside a run of junk at the top level.
    junk: bool,
    /// Where the string being read starts in `buf`.
    string_start: usize,
}

impl Splitter {
    /// A splitter for objects of at most `max` bytes.
    pub(crate) fn new(max: usize) -> Splitter {
        Splitter {
            max,
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            oversized: false,
            junk: false,
            string_start: 0,
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.oversized = false;
        self.junk = false;
    }

    fn end_junk(&mut self, out: &mut Vec<Piece>) {
        if self.junk {
            self.junk = false;
            out.push(Piece::Junk(std::mem::take(&mut self.buf)));
        }
    }

    /// Feeds `input`; appends what it completes to `out`.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<Piece>) {
        for &b in input {
            if b == RESET {
                // Junk before the reset was junk all the same; a partial
                // object is dropped, as qemu-ga's parser does.
                self.end_junk(out);
                let token = if self.in_string && !self.oversized {
                    self.buf
                        .get(self.string_start..)
                        .unwrap_or_default()
                        .to_vec()
                } else {
                    Vec::new()
                };
                self.reset();
                out.push(Piece::Reset(token));
                continue;
            }
            if self.depth == 0 {
                match b {
                    b'{' => {
                        self.end_junk(out);
                        self.depth = 1;
                        self.buf.push(b);
                    }
                    b' ' | b'\t' | b'\r' | b'\n' => self.end_junk(out),
                    _ => {
                        self.junk = true;
                        if self.buf.len() < 64 {
                            self.buf.push(b);
                        }
                    }
                }
                continue;
            }
            if !self.oversized {
                if self.buf.len() >= self.max {
                    self.oversized = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.push(b);
                }
            }
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    self.string_start = self.buf.len().saturating_sub(1);
                }
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let piece = if self.oversized {
                            Piece::Oversized
                        } else {
                            Piece::Object(std::mem::take(&mut self.buf))
                        };
                        self.reset();
                        out.push(piece);
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, input: &[u8]) -> Vec<Piece> {
        let mut s = Splitter::new(max);
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    #[test]
    fn objects_are_found_whatever_the_whitespace_and_strings() {
        let input = br#" {"execute":"a"}{"execute":"b","arguments":{"s":"}{\"x"}}
{"x":[{"y":"]"}]}  "#;
        assert_eq!(
            split(1024, input),
            vec![
                Piece::Object(br#"{"execute":"a"}"#.to_vec()),
                Piece::Object(br#"{"execute":"b","arguments":{"s":"}{\"x"}}"#.to_vec()),
                Piece::Object(br#"{"x":[{"y":"]"}]}"#.to_vec()),
            ]
        );
    }

    #[test]
    fn any_split_of_the_input_gives_the_same_pieces() {
        let input = b"junk {\"execute\":\"guest-ping\"}\xff{\"half\":\"\xff{\"a\":\"\\\\\"}\n[1]";
        // The trailing junk ends only with the next separator.
        let whole = split(1024, &[&input[..], b" "].concat());
        assert_eq!(
            whole,
            vec![
                Piece::Junk(b"junk".to_vec()),
                Piece::Object(b"{\"execute\":\"guest-ping\"}".to_vec()),
                Piece::Reset(Vec::new()),
                Piece::Reset(b"\"".to_vec()),
                Piece::Object(b"{\"a\":\"\\\\\"}".to_vec()),
                Piece::Junk(b"[1]".to_vec()),
            ]
        );
        for at in 0..=input.len() {
            let mut s = Splitter::new(1024);
            let mut out = Vec::new();
            s.feed(&input[..at], &mut out);
            s.feed(&input[at..], &mut out);
            s.feed(b" ", &mut out);
            assert_eq!(out, whole, "split at {at}");
        }
    }

    #[test]
    fn an_oversized_object_is_dropped_whole_and_the_next_one_read() {
        let big = format!("{{\"a\":\"{}\"}}{{\"b\":1}}", "x".repeat(100));
        assert_eq!(
            split(32, big.as_bytes()),
            vec![Piece::Oversized, Piece::Object(b"{\"b\":1}".to_vec())]
        );
        // A reset ends an oversized object too.
        let cut = [b"{\"a\":\"".as_slice(), &[b'x'; 100], b"\xff{\"b\":1}"].concat();
        assert_eq!(
            split(32, &cut),
            vec![
                Piece::Reset(Vec::new()),
                Piece::Object(b"{\"b\":1}".to_vec())
            ]
        );
    }

    #[test]
    fn junk_is_bounded_and_reset_drops_a_partial_object() {
        let junk = vec![b'x'; 10_000];
        let out = split(1024, &[&junk[..], b"\n"].concat());
        assert_eq!(out, vec![Piece::Junk(vec![b'x'; 64])]);
        assert_eq!(
            split(1024, b"{\"a\":[1,\xff{}"),
            vec![Piece::Reset(Vec::new()), Piece::Object(b"{}".to_vec())]
        );
        assert_eq!(
            split(1024, b"{\"execute\":\"guest-ping\",\"argu\xff"),
            vec![Piece::Reset(b"\"argu".to_vec())]
        );
    }
}
