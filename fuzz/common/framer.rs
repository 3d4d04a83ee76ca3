//! What the fuzz targets that feed the framer share (`framing`, `tls`): the framer called as
//! the event loop calls it, with the invariants every call must keep, and a plain model of
//! SPEC §3 to check the requests it gave for the whole input. Not a target itself: it lives
//! outside `fuzz_targets/`, which `.ci/hardening` runs file by file.

use command_trigger::framing::{Frame, Framing, next_frame};

/// What the framer gave for one connection.
#[derive(Debug, Default)]
pub struct Seen {
    pub requests: Vec<(Vec<u8>, Vec<u8>)>,
    pub too_large: bool,
}

/// One connection's framer: after each read, take requests until it needs more; at the end,
/// once more with `eof`. A refusal (too large, malformed) ends the connection, as in the loop.
pub struct Framer {
    framing: Framing,
    max: usize,
    buf: Vec<u8>,
    seen: Seen,
    stopped: bool,
}

impl Framer {
    pub fn new(framing: Framing, max: usize) -> Framer {
        Framer {
            framing,
            max,
            buf: Vec::new(),
            seen: Seen::default(),
            stopped: false,
        }
    }

    /// The bytes of one read.
    pub fn read(&mut self, bytes: &[u8]) {
        if !self.stopped {
            self.buf.extend_from_slice(bytes);
            self.take(false);
        }
    }

    /// The client closed: nothing more will come.
    pub fn eof(mut self) -> Seen {
        if !self.stopped {
            self.take(true);
        }
        self.seen
    }

    fn take(&mut self, eof: bool) {
        let (framing, max) = (self.framing, self.max);
        loop {
            let before = self.buf.len();
            match next_frame(framing, &mut self.buf, eof, max) {
                Frame::Request(raw) => {
                    assert!(self.buf.len() < before, "a request that consumed nothing");
                    if framing == Framing::Line {
                        assert!(raw.line.len() <= max && !raw.line.contains(&b'\n'));
                    }
                    self.seen.requests.push((raw.line, raw.body));
                }
                Frame::TooLarge | Frame::HeadTooLarge => {
                    self.seen.too_large = true;
                    self.stopped = true;
                    return;
                }
                Frame::Malformed(_) => {
                    self.stopped = true;
                    return;
                }
                // May consume empty lines (line framing), which is fine. Waiting with more
                // than the limit buffered would make the loop read nothing and spin.
                Frame::Incomplete | Frame::WantsContinue => {
                    assert!(framing == Framing::Http || self.buf.len() <= max + 1);
                    return;
                }
            }
        }
    }
}

/// Checks what the framer gave for `whole`, the connection's bytes, against the model (line
/// and stream framing; HTTP has no model here, only the invariants above).
pub fn check(framing: Framing, whole: &[u8], max: usize, seen: &Seen) {
    match framing {
        Framing::Line => check_lines(whole, max, seen),
        Framing::Stream => check_stream(whole, max, seen),
        Framing::Http => {}
    }
}

fn strip(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Line framing: the non-empty lines, `\r` stripped, up to the first line past the limit.
fn check_lines(whole: &[u8], max: usize, seen: &Seen) {
    let mut raw_lines: Vec<&[u8]> = whole.split(|&b| b == b'\n').collect();
    if whole.ends_with(b"\n") || whole.is_empty() {
        raw_lines.pop(); // nothing after the last newline
    }
    let mut got = seen.requests.iter();
    for raw in raw_lines {
        let line = strip(raw);
        if line.len() > max {
            assert!(seen.too_large, "a line past the limit was not refused");
            assert!(got.next().is_none(), "requests after a too-large line");
            return;
        }
        if line.is_empty() {
            continue;
        }
        let (next, body) = got.next().expect("a line was lost");
        assert_eq!((next.as_slice(), body.as_slice()), (line, &b""[..]));
    }
    assert!(got.next().is_none(), "a request from nowhere");
    assert!(!seen.too_large, "TooLarge without a line past the limit");
}

/// Stream framing: one request, the first line and the rest, unless it is past the limit.
fn check_stream(whole: &[u8], max: usize, seen: &Seen) {
    if whole.len() > max {
        assert!(seen.too_large && seen.requests.is_empty());
        return;
    }
    assert!(!seen.too_large, "TooLarge within the limit");
    let (line, body) = match whole.iter().position(|&b| b == b'\n') {
        Some(newline) => (&whole[..newline], &whole[newline + 1..]),
        None => (whole, &b""[..]),
    };
    let line = strip(line);
    if line.is_empty() && body.is_empty() {
        assert!(seen.requests.is_empty());
        return;
    }
    assert_eq!(seen.requests.len(), 1, "{seen:?}");
    assert_eq!(seen.requests[0], (line.to_vec(), body.to_vec()));
}
