//! HTTP/1.0 and 1.1 requests (SPEC §10): parsed by `httparse`, bodies by `Content-Length` or
//! chunked. Pure functions over bytes, like [`framing`](super::framing); responses are
//! written by [`http_response`](super::http_response), re-exported here.

pub use super::http_response::{
    ResponseHead, chunk, is_trailer_name, last_chunk, last_chunk_with_trailers,
};

use httparse::{EMPTY_HEADER, Status};
use std::borrow::Cow;

const MAX_HEADERS: usize = 64;

/// The parts of a request line and headers that the server and the script use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpHead {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Lower-case names, in the order sent.
    pub headers: Vec<(String, String)>,
}

impl HttpHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the connection stays open after the response, as HTTP says.
    pub fn keep_alive(&self) -> bool {
        match self.minor_version {
            0 => self.header_has_token("connection", "keep-alive"),
            _ => !self.header_has_token("connection", "close"),
        }
    }

    /// The token from `Authorization: Bearer` or `X-Token` (never from the query).
    pub fn token(&self) -> Option<&str> {
        let bearer = self.header("authorization").and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        bearer.or_else(|| self.header("x-token").map(str::trim))
    }

    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(&self.target, |(path, _)| path)
    }

    pub fn query(&self) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
        let query = self.target.split_once('?').map_or("", |(_, q)| q);
        form_urlencoded::parse(query.as_bytes())
    }

    /// The non-empty, URL-decoded path segments: `req.args`.
    pub fn segments(&self) -> Vec<String> {
        self.path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// Headers as the script sees them: repeats joined with `, `.
    pub fn joined_headers(&self) -> Vec<(String, String)> {
        let mut joined: Vec<(String, String)> = Vec::new();
        for (name, value) in &self.headers {
            match joined.iter_mut().find(|(n, _)| n == name) {
                Some((_, existing)) => {
                    existing.push_str(", ");
                    existing.push_str(value);
                }
                None => joined.push((name.clone(), value.clone())),
            }
        }
        joined
    }

    fn expects_continue(&self) -> bool {
        self.minor_version == 1
            && self
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }
}

/// What the bytes buffered so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Request {
        head: HttpHead,
        body: Vec<u8>,
        consumed: usize,
    },
    /// More bytes are needed; `continue_wanted` when the client waits for `100 Continue`.
    Incomplete {
        continue_wanted: bool,
    },
    /// The body would take the request past the limit: 413.
    TooLarge,
    /// The request line and headers alone are past the limit, or too many: 431.
    HeadTooLarge,
    Malformed(&'static str),
}

/// Parses a request out of `buf`. `max_bytes` bounds the whole request, head included.
pub fn parse(buf: &[u8], max_bytes: usize) -> Parsed {
    let mut headers = [EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(Status::Complete(len)) if len > max_bytes => return Parsed::HeadTooLarge,
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) if buf.len() > max_bytes => return Parsed::HeadTooLarge,
        Ok(Status::Partial) => {
            return Parsed::Incomplete {
                continue_wanted: false,
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Parsed::HeadTooLarge,
        Err(_) => return Parsed::Malformed("malformed request head"),
    };
    let head = head_of(&request);
    let room = max_bytes.saturating_sub(head_len);
    let body = match body_framing(&head) {
        Ok(BodyFraming::Chunked) => decode_chunked(&buf[head_len..], room),
        Ok(BodyFraming::Length(len)) if len > room => BodyParse::TooLarge,
        Ok(BodyFraming::Length(len)) if buf.len() - head_len < len => BodyParse::Incomplete,
        Ok(BodyFraming::Length(len)) => {
            BodyParse::Done(buf[head_len..head_len + len].to_vec(), len)
        }
        Err(reason) => return Parsed::Malformed(reason),
    };
    match body {
        BodyParse::Done(body, len) => Parsed::Request {
            head,
            body,
            consumed: head_len + len,
        },
        BodyParse::Incomplete => Parsed::Incomplete {
            continue_wanted: head.expects_continue(),
        },
        BodyParse::TooLarge => Parsed::TooLarge,
        BodyParse::Malformed(reason) => Parsed::Malformed(reason),
    }
}

/// The head of the request in `buf`, if it is complete (the body may not be).
pub fn parse_head(buf: &[u8]) -> Option<HttpHead> {
    let mut headers = [EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(Status::Complete(_)) => Some(head_of(&request)),
        _ => None,
    }
}

fn head_of(request: &httparse::Request) -> HttpHead {
    HttpHead {
        method: request.method.unwrap_or_default().to_owned(),
        target: request.path.unwrap_or_default().to_owned(),
        minor_version: request.version.unwrap_or(1),
        headers: request
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
    }
}

enum BodyFraming {
    Chunked,
    Length(usize),
}

/// How the body is delimited (RFC 9112 §6.3), strictly: anything two parsers could read
/// differently (a request smuggling vector) is refused with 400.
fn body_framing(head: &HttpHead) -> Result<BodyFraming, &'static str> {
    if head.header("transfer-encoding").is_some() {
        // One field, however it is split across headers: `chunked` then `identity` in two
        // headers is the list `chunked, identity`, and means the same.
        let codings: Vec<&str> = head
            .headers
            .iter()
            .filter(|(n, _)| n == "transfer-encoding")
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .collect();
        return match codings.as_slice() {
            [coding] if coding.eq_ignore_ascii_case("chunked") => {
                match head.header("content-length") {
                    None => Ok(BodyFraming::Chunked),
                    Some(_) => Err("both Content-Length and Transfer-Encoding"),
                }
            }
            _ => Err("unsupported Transfer-Encoding"),
        };
    }
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.trim())
        .collect();
    match lengths.as_slice() {
        [] => Ok(BodyFraming::Length(0)),
        // Digits only (RFC 9110 §8.6): `+5`, which `usize::parse` takes, is refused.
        [len] if !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()) => len
            .parse()
            .map(BodyFraming::Length)
            .map_err(|_| "invalid Content-Length"),
        [_] => Err("invalid Content-Length"),
        _ => Err("repeated Content-Length"),
    }
}

enum BodyParse {
    /// The body and how many bytes after the head it took.
    Done(Vec<u8>, usize),
    Incomplete,
    TooLarge,
    Malformed(&'static str),
}

fn decode_chunked(data: &[u8], max_bytes: usize) -> BodyParse {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let (size_len, size) = match httparse::parse_chunk_size(&data[pos..]) {
            Ok(Status::Complete(found)) => found,
            Ok(Status::Partial) => return BodyParse::Incomplete,
            Err(_) => return BodyParse::Malformed("invalid chunk size"),
        };
        pos += size_len;
        if size == 0 {
            return finish_chunked(data, pos, body);
        }
        let size = match usize::try_from(size) {
            Ok(size) if size <= max_bytes.saturating_sub(body.len()) => size,
            _ => return BodyParse::TooLarge,
        };
        if data.len() < pos + size + 2 {
            return BodyParse::Incomplete;
        }
        if &data[pos + size..pos + size + 2] != b"\r\n" {
            return BodyParse::Malformed("chunk not followed by CRLF");
        }
        body.extend_from_slice(&data[pos..pos + size]);
        pos += size + 2;
    }
}

/// After the last chunk: optional trailer fields, then an empty line.
fn finish_chunked(data: &[u8], pos: usize, body: Vec<u8>) -> BodyParse {
    let mut trailers = [EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(&data[pos..], &mut trailers) {
        Ok(Status::Complete((len, _))) => BodyParse::Done(body, pos + len),
        Ok(Status::Partial) => BodyParse::Incomplete,
        Err(_) => BodyParse::Malformed("invalid chunked trailer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &[u8]) -> (HttpHead, Vec<u8>, usize) {
        match parse(raw, 1024) {
            Parsed::Request {
                head,
                body,
                consumed,
            } => (head, body, consumed),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn content_length_body_and_pipelined_rest() {
        let raw = b"POST /hooks/deploy%20now?x=1&y=a+b HTTP/1.1\r\nX-Token: t\r\nContent-Length: 3\r\n\r\nabcGET";
        let (head, body, consumed) = request(raw);
        assert_eq!((body.as_slice(), consumed), (&b"abc"[..], raw.len() - 3));
        assert_eq!(head.segments(), ["hooks", "deploy now"]);
        assert_eq!(
            head.query().collect::<Vec<_>>(),
            [("x".into(), "1".into()), ("y".into(), "a b".into())]
        );
        assert_eq!(head.token(), Some("t"));
        assert!(head.keep_alive());
    }

    #[test]
    fn chunked_body_with_trailer() {
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-T: 1\r\n\r\n";
        let (_, body, consumed) = request(raw);
        assert_eq!((body.as_slice(), consumed), (&b"abcde"[..], raw.len()));
        assert_eq!(
            parse(&raw[..raw.len() - 2], 1024),
            Parsed::Incomplete {
                continue_wanted: false
            }
        );
    }

    #[test]
    fn limits_and_errors() {
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n", 1024),
            Parsed::TooLarge
        );
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 1024),
            Parsed::Malformed(_)
        ));
        assert!(matches!(
            parse(b"\x00\x01 nonsense\r\n\r\n", 1024),
            Parsed::Malformed(_)
        ));
        let waiting = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(
            parse(waiting, 1024),
            Parsed::Incomplete {
                continue_wanted: true
            }
        );
    }

    #[test]
    fn strict_framing_headers() {
        let bad = |raw: &[u8]| matches!(parse(raw, 1024), Parsed::Malformed(_));
        assert!(bad(b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nabcde"));
        assert!(bad(b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n"));
        assert!(bad(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"
        ));
        assert!(bad(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
        ));
        assert!(!bad(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n"
        ));
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(parse(big.as_bytes(), 1024), Parsed::HeadTooLarge);
        assert_eq!(parse(&big.as_bytes()[..1500], 1024), Parsed::HeadTooLarge);
    }

    #[test]
    fn bearer_and_http10_keep_alive() {
        let (head, ..) = request(
            b"GET / HTTP/1.0\r\nAuthorization: Bearer  abc \r\nConnection: Keep-Alive\r\n\r\n",
        );
        assert_eq!((head.token(), head.keep_alive()), (Some("abc"), true));
        let (head, ..) = request(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!head.keep_alive());
    }
}
