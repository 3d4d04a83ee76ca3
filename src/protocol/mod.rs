//! Everything that depends on how a connection is framed, in one place: requests cut out of
//! the bytes ([`decode`]), and replies, live output and the end of a streamed reply put back
//! on the wire, with whether the connection closes after them decided once
//! ([`Protocol::closes_after`]). The loop and the workers hold a [`Protocol`] and never look
//! inside it; each framing's details live in its own module.
//!
//! - [`framing`]: line and stream framing, and the [`Frame`] every framing decodes to.
//! - [`http`]: HTTP/1.x request heads and bodies; [`http_response`]: responses and chunks.

pub mod framing;
pub mod http;
pub mod http_response;

pub use framing::{Frame, Framing, RawRequest};
pub use http_response::HttpExchange;

use crate::request::{Reply, Request, ServerError};
use http::HttpHead;

/// Cuts the next request out of `buf` (see [`framing::next_frame`]).
pub fn decode(framing: Framing, buf: &mut Vec<u8>, eof: bool, max_bytes: usize) -> Frame {
    framing::next_frame(framing, buf, eof, max_bytes)
}

/// HTTP: the request whose client waits for `100 Continue`, as far as it has come (its head,
/// no body yet), for the gate to judge before the body is asked for.
pub fn waiting_request(buf: &[u8]) -> RawRequest {
    RawRequest {
        http: http::parse_head(buf),
        ..RawRequest::default()
    }
}

/// How the reply to one request goes on the wire: the framing, and what of the request
/// decides the reply's shape (HTTP: its version, `Connection` and method).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// One request per line; `keep_alive` is `--keep-alive`, the default after a reply.
    Line {
        keep_alive: bool,
    },
    /// One request per connection: the client's half-close ended it.
    Stream,
    Http(HttpExchange),
}

/// A reply as bytes for the socket, and whether the connection closes once they are out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub close: bool,
}

impl Protocol {
    /// The protocol of a request read with `framing`; `keep_alive` is `--keep-alive`.
    pub fn new(framing: Framing, keep_alive: bool, head: Option<&HttpHead>) -> Protocol {
        match (framing, head) {
            (Framing::Line, _) => Protocol::Line { keep_alive },
            (Framing::Stream, _) => Protocol::Stream,
            (Framing::Http, Some(head)) => Protocol::Http(HttpExchange {
                minor_version: head.minor_version,
                keep_alive: head.keep_alive(),
                head_only: head.method == "HEAD",
            }),
            // Input that never became a request (too large, not HTTP) is answered as
            // HTTP/1.1, the version every client reads.
            (Framing::Http, None) => Protocol::Http(HttpExchange {
                minor_version: 1,
                keep_alive: true,
                head_only: false,
            }),
        }
    }

    /// The protocol of a request the server has taken.
    pub fn of(request: &Request) -> Protocol {
        Protocol::new(request.framing, request.keep_alive, request.http.as_ref())
    }

    /// Whether the connection closes after a reply. `close` is the script's choice (or the
    /// server's own, always `Some(true)` for its errors); `streamed`: live output went first.
    /// The one place this is decided.
    pub fn closes_after(self, close: Option<bool>, streamed: bool) -> bool {
        match self {
            Protocol::Line { keep_alive } => close.unwrap_or(!keep_alive),
            // The client half-closed to end its request: nothing more can come.
            Protocol::Stream => close.unwrap_or(true),
            // HTTP/1.0 has no chunks: the close is what ends a streamed body.
            Protocol::Http(http) if streamed && http.minor_version == 0 => true,
            Protocol::Http(http) => close.unwrap_or(!http.keep_alive),
        }
    }

    /// Whether the connection may stay open after this request's reply, before the reply is
    /// known: line framing with `--keep-alive`, HTTP when the request asked for it (a reply can
    /// still close it, see [`Self::closes_after`]); never stream framing.
    pub fn may_stay_open(self) -> bool {
        match self {
            Protocol::Line { keep_alive } => keep_alive,
            Protocol::Stream => false,
            Protocol::Http(http) => http.keep_alive,
        }
    }

    /// A whole reply, when no live output went before it.
    pub fn encode_reply(self, reply: Reply) -> Encoded {
        let close = self.closes_after(reply.close, false);
        let bytes = match self {
            Protocol::Http(http) => http.response(reply, close),
            _ => reply.bytes,
        };
        Encoded { bytes, close }
    }

    /// A piece of live output (`write()`). `first`: nothing has gone out for this request
    /// yet (HTTP then starts the response, announcing `trailer_names`).
    pub fn encode_live(self, bytes: &[u8], first: bool, trailer_names: &[String]) -> Vec<u8> {
        match self {
            Protocol::Http(http) => http.live(bytes, first, trailer_names),
            _ => bytes.to_vec(),
        }
    }

    /// The last of a reply whose live output went first (HTTP: with the last chunk and the
    /// trailers).
    pub fn encode_end(self, reply: Reply) -> Encoded {
        let close = self.closes_after(reply.close, true);
        let bytes = match self {
            Protocol::Http(http) => http.end(reply),
            _ => reply.bytes,
        };
        Encoded { bytes, close }
    }

    /// One of the server's own replies (always followed by a close).
    pub fn encode_error(self, error: ServerError) -> Encoded {
        self.encode_reply(Reply::error(error))
    }

    /// HTTP: what tells a client waiting on `Expect: 100-continue` to send its body.
    pub fn continue_bytes(self) -> &'static [u8] {
        match self {
            Protocol::Http(_) => b"HTTP/1.1 100 Continue\r\n\r\n",
            _ => b"",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTTP11: Protocol = Protocol::Http(HttpExchange {
        minor_version: 1,
        keep_alive: true,
        head_only: false,
    });
    const HTTP10: Protocol = Protocol::Http(HttpExchange {
        minor_version: 0,
        keep_alive: false,
        head_only: false,
    });

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn reply(bytes: &str, close: Option<bool>) -> Reply {
        Reply {
            bytes: bytes.as_bytes().to_vec(),
            close,
            ..Reply::default()
        }
    }

    #[test]
    fn line_and_stream_replies_go_out_as_they_are() {
        let line = Protocol::Line { keep_alive: true };
        assert_eq!(
            line.encode_reply(reply("ok\n", None)),
            Encoded {
                bytes: b"ok\n".to_vec(),
                close: false
            }
        );
        assert!(Protocol::Line { keep_alive: false }.closes_after(None, false));
        assert!(!Protocol::Line { keep_alive: false }.closes_after(Some(false), false));
        assert!(Protocol::Stream.encode_reply(reply("ok\n", None)).close);
        assert_eq!(line.encode_live(b"part", true, &[]), b"part".to_vec());
        assert_eq!(line.continue_bytes(), b"");
    }

    #[test]
    fn server_errors_always_close() {
        for protocol in [
            Protocol::Line { keep_alive: true },
            Protocol::Stream,
            HTTP11,
        ] {
            let encoded = protocol.encode_error(ServerError::Busy);
            assert!(encoded.close, "{protocol:?}");
            assert!(text(&encoded.bytes).contains("ERR busy\n"));
        }
        let http = text(&HTTP11.encode_error(ServerError::Unauthorized).bytes);
        assert!(http.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{http}");
        assert!(http.contains("connection: close\r\n"), "{http}");
        assert!(http.contains("www-authenticate: Bearer\r\n"), "{http}");
    }

    #[test]
    fn http_reply_head_matches_the_close_decision() {
        use crate::request::Content;
        let kept = text(&HTTP11.encode_reply(reply("hi", None)).bytes);
        assert!(kept.starts_with("HTTP/1.1 200 OK\r\n"), "{kept}");
        assert!(!kept.contains("connection: close") && kept.ends_with("\r\n\r\nhi"));
        let closed = HTTP11.encode_reply(reply("hi", Some(true)));
        assert!(closed.close && text(&closed.bytes).contains("connection: close\r\n"));
        assert!(HTTP10.encode_reply(reply("hi", None)).close);
        let head = Protocol::Http(HttpExchange {
            head_only: true,
            ..HttpExchange {
                minor_version: 1,
                keep_alive: true,
                head_only: false,
            }
        });
        assert!(
            text(&head.encode_reply(reply("hi", None)).bytes)
                .ends_with("content-length: 2\r\n\r\n")
        );
        let nothing = Reply {
            content: Content::Nothing,
            ..Reply::default()
        };
        assert!(text(&HTTP11.encode_reply(nothing).bytes).starts_with("HTTP/1.1 204"));
    }

    #[test]
    fn http_live_output_is_chunked_and_ended_with_trailers() {
        let first = text(&HTTP11.encode_live(b"abc", true, &["x-exit-code".to_owned()]));
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        assert!(first.contains("trailer: x-exit-code\r\n"), "{first}");
        assert!(first.contains("transfer-encoding: chunked\r\n"), "{first}");
        assert!(first.ends_with("\r\n\r\n3\r\nabc\r\n"), "{first}");
        assert_eq!(
            HTTP11.encode_live(b"de", false, &[]),
            b"2\r\nde\r\n".to_vec()
        );
        let end = HTTP11.encode_end(Reply {
            bytes: b"!".to_vec(),
            trailers: vec![("x-exit-code".into(), "0".into())],
            ..Reply::default()
        });
        assert_eq!(text(&end.bytes), "1\r\n!\r\n0\r\nx-exit-code: 0\r\n\r\n");
        assert!(!end.close);
        // HTTP/1.0: no chunks, and the close ends the body whatever the script said.
        assert_eq!(HTTP10.encode_live(b"abc", false, &[]), b"abc".to_vec());
        assert!(HTTP10.encode_end(reply("", Some(false))).close);
    }

    #[test]
    fn input_that_is_no_request_is_answered_as_http_1_1() {
        let protocol = Protocol::new(Framing::Http, false, None);
        let bytes = text(&protocol.encode_error(ServerError::TooLarge).bytes);
        assert!(bytes.starts_with("HTTP/1.1 413 "), "{bytes}");
        assert_eq!(protocol.continue_bytes(), b"HTTP/1.1 100 Continue\r\n\r\n");
    }
}
