//! Cutting the bytes a client sends into requests, without any I/O, so the rules of SPEC §3
//! can be tested (and fuzzed) apart from sockets.

use crate::http;
use crate::http::HttpHead;

/// How a connection's bytes become requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// One request per line.
    Line,
    /// A first line, then everything up to the client's half-close as the body.
    Stream,
    /// HTTP/1.0 and 1.1 (see [`crate::http`]).
    Http,
}

impl Framing {
    pub fn name(self) -> &'static str {
        match self {
            Framing::Line => "line",
            Framing::Stream => "stream",
            Framing::Http => "http",
        }
    }
}

/// A complete request as it came off the wire, before authentication.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RawRequest {
    /// The whole first line, without `\n` and the trailing `\r`.
    pub line: Vec<u8>,
    /// Stream framing: everything after the first line; HTTP: the decoded body.
    pub body: Vec<u8>,
    /// HTTP framing: the request line and headers (then `line` is empty).
    pub http: Option<HttpHead>,
}

/// What the framer found in the buffered bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Request(RawRequest),
    /// More bytes are needed; not an error.
    Incomplete,
    /// The request grew past the limit: answer `ERR request too large`.
    TooLarge,
    /// HTTP: the request head alone is past the limit (431).
    HeadTooLarge,
    /// HTTP: not a request we can parse; answer 400 and close.
    Malformed(&'static str),
    /// HTTP: incomplete, and the client waits for `100 Continue` before sending its body.
    WantsContinue,
}

/// Takes the next request out of `buf`, consuming its bytes. `eof` says the client has closed
/// its sending side, which completes a last line without `\n` (and a stream body).
pub fn next_frame(framing: Framing, buf: &mut Vec<u8>, eof: bool, max_bytes: usize) -> Frame {
    match framing {
        Framing::Line => next_line_request(buf, eof, max_bytes),
        Framing::Stream => next_stream_request(buf, eof, max_bytes),
        Framing::Http => next_http_request(buf, max_bytes),
    }
}

fn next_http_request(buf: &mut Vec<u8>, max_bytes: usize) -> Frame {
    match http::parse(buf, max_bytes) {
        http::Parsed::Request {
            head,
            body,
            consumed,
        } => {
            buf.drain(..consumed);
            Frame::Request(RawRequest {
                line: Vec::new(),
                body,
                http: Some(head),
            })
        }
        http::Parsed::Incomplete {
            continue_wanted: true,
        } => Frame::WantsContinue,
        http::Parsed::Incomplete {
            continue_wanted: false,
        } => Frame::Incomplete,
        http::Parsed::TooLarge => Frame::TooLarge,
        http::Parsed::HeadTooLarge => Frame::HeadTooLarge,
        http::Parsed::Malformed(reason) => Frame::Malformed(reason),
    }
}

fn next_line_request(buf: &mut Vec<u8>, eof: bool, max_bytes: usize) -> Frame {
    loop {
        let Some(line) = take_line(buf, eof, max_bytes) else {
            return Frame::Incomplete;
        };
        match line {
            Err(TooLarge) => return Frame::TooLarge,
            // Empty lines are ignored, like a shell ignores them.
            Ok(line) if line.is_empty() => continue,
            Ok(line) => {
                return Frame::Request(RawRequest {
                    line,
                    body: Vec::new(),
                    http: None,
                });
            }
        }
    }
}

fn next_stream_request(buf: &mut Vec<u8>, eof: bool, max_bytes: usize) -> Frame {
    if buf.len() > max_bytes {
        return Frame::TooLarge;
    }
    if !eof {
        return Frame::Incomplete;
    }
    let body_start = match buf.iter().position(|&b| b == b'\n') {
        Some(newline) => newline + 1,
        None => buf.len(),
    };
    let body = buf.split_off(body_start);
    let mut line = std::mem::take(buf);
    strip_line_end(&mut line);
    if line.is_empty() && body.is_empty() {
        return Frame::Incomplete;
    }
    Frame::Request(RawRequest {
        line,
        body,
        http: None,
    })
}

struct TooLarge;

/// The next line of `buf`, or `None` when it is not complete yet.
fn take_line(buf: &mut Vec<u8>, eof: bool, max_bytes: usize) -> Option<Result<Vec<u8>, TooLarge>> {
    // A `\r` that may end the line is not counted yet, so a line of exactly `max_bytes` is
    // accepted whether its `\r\n` arrives in one read or two.
    let pending_cr = usize::from(buf.last() == Some(&b'\r'));
    let end = match buf.iter().position(|&b| b == b'\n') {
        Some(newline) => newline + 1,
        None if buf.len() > max_bytes + pending_cr => return Some(Err(TooLarge)),
        None if eof && !buf.is_empty() => buf.len(),
        None => return None,
    };
    let rest = buf.split_off(end);
    let mut line = std::mem::replace(buf, rest);
    strip_line_end(&mut line);
    if line.len() > max_bytes {
        return Some(Err(TooLarge));
    }
    Some(Ok(line))
}

fn strip_line_end(line: &mut Vec<u8>) {
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
}

/// Splits a request line at its first run of spaces or tabs into token and payload.
/// A line with no blank is all token, with an empty payload.
pub fn split_token(line: &[u8]) -> (&[u8], &[u8]) {
    let is_blank = |b: &u8| *b == b' ' || *b == b'\t';
    match line.iter().position(is_blank) {
        None => (line, &[]),
        Some(start) => {
            let run = line[start..].iter().take_while(|b| is_blank(b)).count();
            (&line[..start], &line[start + run..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], eof: bool) -> Vec<Frame> {
        let mut buf = input.to_vec();
        let mut out = Vec::new();
        loop {
            match next_frame(Framing::Line, &mut buf, eof, 16) {
                Frame::Incomplete => return out,
                frame @ Frame::TooLarge => {
                    out.push(frame);
                    return out;
                }
                frame => out.push(frame),
            }
        }
    }

    fn request(line: &[u8]) -> Frame {
        Frame::Request(RawRequest {
            line: line.to_vec(),
            ..RawRequest::default()
        })
    }

    #[test]
    fn lines_drop_crlf_and_skip_empty_lines() {
        assert_eq!(
            lines(b"a b\r\n\r\n\nc\n", false),
            vec![request(b"a b"), request(b"c")]
        );
    }

    #[test]
    fn last_line_without_newline_needs_eof() {
        assert_eq!(lines(b"tok cmd", false), vec![]);
        assert_eq!(lines(b"tok cmd", true), vec![request(b"tok cmd")]);
    }

    #[test]
    fn too_large_as_soon_as_limit_is_crossed() {
        assert_eq!(lines(&[b'x'; 17], false), vec![Frame::TooLarge]);
        assert_eq!(lines(&[b'x'; 16], false), vec![]);
        let mut exact = vec![b'x'; 16];
        exact.push(b'\n');
        assert_eq!(lines(&exact, false), vec![request(&[b'x'; 16])]);
    }

    #[test]
    fn split_at_first_blank_run_keeps_other_whitespace() {
        assert_eq!(split_token(b"tok \t a  b "), (&b"tok"[..], &b"a  b "[..]));
        assert_eq!(split_token(b"tok"), (&b"tok"[..], &b""[..]));
        assert_eq!(split_token(b" x"), (&b""[..], &b"x"[..]));
    }

    #[test]
    fn stream_takes_body_after_first_line_at_eof() {
        let mut buf = b"tok upload\r\nbody\nmore".to_vec();
        assert_eq!(
            next_frame(Framing::Stream, &mut buf, false, 64),
            Frame::Incomplete
        );
        let expected = RawRequest {
            line: b"tok upload".to_vec(),
            body: b"body\nmore".to_vec(),
            http: None,
        };
        assert_eq!(
            next_frame(Framing::Stream, &mut buf, true, 64),
            Frame::Request(expected)
        );
        assert!(buf.is_empty());
    }
}
