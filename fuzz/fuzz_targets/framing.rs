//! The framer over arbitrary bytes cut into arbitrary reads, as the event loop calls it: after
//! each read, take requests until it needs more; at the end, once more with `eof`.
//!
//! Checked besides "never panics": every request consumes bytes (else the loop would dispatch
//! forever); line and stream requests are exactly what a plain model of SPEC §3 gives for the
//! whole input; `TooLarge` exactly when a line (or the stream request) is past the limit, however
//! the reads are cut; never waiting for more with more than the limit (+1 for a `\r`) buffered.

#![no_main]

use command_trigger::framing::{Frame, Framing, next_frame};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    framing: u8,
    max: u8,
    reads: Vec<Vec<u8>>,
}

/// What the framer gave for one connection.
#[derive(Debug, Default)]
struct Seen {
    requests: Vec<(Vec<u8>, Vec<u8>)>,
    too_large: bool,
}

fuzz_target!(|input: Input| {
    let framing = match input.framing % 3 {
        0 => Framing::Line,
        1 => Framing::Stream,
        _ => Framing::Http,
    };
    let max = 1 + usize::from(input.max);
    let seen = feed(framing, &input.reads, max);
    let whole: Vec<u8> = input.reads.concat();
    match framing {
        Framing::Line => check_lines(&whole, max, &seen),
        Framing::Stream => check_stream(&whole, max, &seen),
        Framing::Http => {}
    }
});

fn feed(framing: Framing, reads: &[Vec<u8>], max: usize) -> Seen {
    let mut buf = Vec::new();
    let mut seen = Seen::default();
    let last = reads.len();
    for index in 0..=last {
        let eof = index == last;
        if let Some(read) = reads.get(index) {
            buf.extend_from_slice(read);
        }
        loop {
            let before = buf.len();
            match next_frame(framing, &mut buf, eof, max) {
                Frame::Request(raw) => {
                    assert!(buf.len() < before, "a request that consumed nothing");
                    if framing == Framing::Line {
                        assert!(raw.line.len() <= max && !raw.line.contains(&b'\n'));
                    }
                    seen.requests.push((raw.line, raw.body));
                }
                Frame::TooLarge | Frame::HeadTooLarge => {
                    seen.too_large = true;
                    return seen;
                }
                Frame::Malformed(_) => return seen,
                // May consume empty lines (line framing), which is fine. Waiting with more
                // than the limit buffered would make the loop read nothing and spin.
                Frame::Incomplete | Frame::WantsContinue => {
                    assert!(framing == Framing::Http || buf.len() <= max + 1);
                    break;
                }
            }
        }
    }
    seen
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
