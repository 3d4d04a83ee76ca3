//! HTTP/1.x responses: the head for a reply a script returned, a streamed body in chunks, and
//! trailers. Only headers that cannot split or re-frame the response are ever written.

use crate::request::{Content, Reply};

/// What an HTTP reply needs to know of its request, copied out of the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpExchange {
    /// 0 for HTTP/1.0 (no chunks: a streamed body ends with the close), 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Whether the request asked for the connection to stay open, as HTTP reads it.
    pub keep_alive: bool,
    /// `HEAD`: the response carries no body.
    pub head_only: bool,
}

impl HttpExchange {
    /// A complete response for `reply`; `close` is what [`super::Protocol::closes_after`]
    /// decided, and the head says so.
    pub fn response(self, reply: Reply, close: bool) -> Vec<u8> {
        // The result is known before the head goes out, so trailers travel in it.
        let mut headers = reply.headers;
        headers.extend(reply.trailers);
        let status = reply.status.unwrap_or(match reply.content {
            Content::Nothing => 204,
            _ => 200,
        });
        let response = ResponseHead {
            status,
            headers: &headers,
            default_content_type: match reply.content {
                Content::Binary => "application/octet-stream",
                _ => "text/plain; charset=utf-8",
            },
            keep_alive: !close,
            minor_version: self.minor_version,
        };
        response.complete(&reply.bytes, self.head_only)
    }

    /// A piece of a streamed body; the first starts a `200` response, chunked (until the close
    /// on HTTP/1.0), that announces `trailer_names`.
    pub fn live(self, bytes: &[u8], first: bool, trailer_names: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        if first {
            let announce = match trailer_names {
                [] => Vec::new(),
                names => vec![("trailer".to_owned(), names.join(", "))],
            };
            let response = ResponseHead {
                status: 200,
                headers: &announce,
                default_content_type: "text/plain; charset=utf-8",
                keep_alive: self.minor_version == 1 && self.keep_alive,
                minor_version: self.minor_version,
            };
            out = response.streaming();
        }
        out.extend_from_slice(&chunk(bytes, self.minor_version));
        out
    }

    /// The end of a streamed body: the reply's last bytes, then the last chunk with trailers.
    pub fn end(self, reply: Reply) -> Vec<u8> {
        let mut bytes = chunk(&reply.bytes, self.minor_version);
        bytes.extend_from_slice(&last_chunk_with_trailers(
            self.minor_version,
            &reply.trailers,
        ));
        bytes
    }
}

/// How a response is shaped on the wire.
pub struct ResponseHead<'a> {
    pub status: u16,
    pub headers: &'a [(String, String)],
    /// Used when the script set no `content-type`.
    pub default_content_type: &'a str,
    pub keep_alive: bool,
    pub minor_version: u8,
}

impl ResponseHead<'_> {
    fn write_start(&self, out: &mut Vec<u8>) {
        let reason = http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        out.extend_from_slice(
            format!(
                "HTTP/1.{} {} {}\r\n",
                self.minor_version, self.status, reason
            )
            .as_bytes(),
        );
        out.extend_from_slice(
            format!(
                "date: {}\r\n",
                httpdate::fmt_http_date(std::time::SystemTime::now())
            )
            .as_bytes(),
        );
        // A script's header cannot smuggle a second header or a body in: only these are sent,
        // and only these stand in for a default.
        let kept = self.headers.iter().filter(|(name, value)| {
            is_token(name) && !value.contains(['\r', '\n']) && !is_framing_header(name)
        });
        let has = |name: &str| kept.clone().any(|(n, _)| n.eq_ignore_ascii_case(name));
        if !has("content-type") && self.status != 204 {
            out.extend_from_slice(
                format!("content-type: {}\r\n", self.default_content_type).as_bytes(),
            );
        }
        // A `GET /deploy` answered from a proxy's cache would never reach the pod, so no reply
        // may be stored unless the script says otherwise.
        if !has("cache-control") {
            out.extend_from_slice(b"cache-control: no-store\r\n");
        }
        for (name, value) in kept {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        let connection = match (self.keep_alive, self.minor_version) {
            (true, 0) => "connection: keep-alive\r\n",
            (true, _) => "",
            (false, _) => "connection: close\r\n",
        };
        out.extend_from_slice(connection.as_bytes());
    }

    /// A complete response with a `Content-Length` body.
    pub fn complete(&self, body: &[u8], head_only: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + body.len());
        self.write_start(&mut out);
        if self.status != 204 && self.status != 304 {
            out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(body);
        }
        out
    }

    /// The head of a response whose body follows in pieces: chunked on HTTP/1.1, and until
    /// the close on HTTP/1.0 (which has no chunks).
    pub fn streaming(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        self.write_start(&mut out);
        if self.minor_version == 1 {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// One piece of a streamed body, framed for the protocol version.
pub fn chunk(data: &[u8], minor_version: u8) -> Vec<u8> {
    if minor_version == 0 || data.is_empty() {
        return data.to_vec();
    }
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Ends a streamed body (HTTP/1.0 ends it by closing).
pub fn last_chunk(minor_version: u8) -> &'static [u8] {
    if minor_version == 0 {
        b""
    } else {
        b"0\r\n\r\n"
    }
}

/// Ends a streamed body with trailer fields (RFC 9112 §7.1.2). HTTP/1.0 has no chunks, so no
/// trailers either; fields that are not valid, or may not be trailers, are left out.
pub fn last_chunk_with_trailers(minor_version: u8, trailers: &[(String, String)]) -> Vec<u8> {
    if minor_version == 0 {
        return Vec::new();
    }
    let mut out = b"0\r\n".to_vec();
    for (name, value) in trailers {
        if is_trailer_name(name) && !value.contains(['\r', '\n']) {
            out.extend_from_slice(format!("{}: {value}\r\n", name.to_ascii_lowercase()).as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Whether `name` may be sent as a trailer: a header name that does not frame, route or
/// authenticate the message (RFC 9110 §6.5.1), all of which a recipient needs before the body.
pub fn is_trailer_name(name: &str) -> bool {
    const FORBIDDEN: [&str; 11] = [
        "trailer",
        "te",
        "host",
        "authorization",
        "set-cookie",
        "cookie",
        "content-type",
        "content-encoding",
        "content-range",
        "cache-control",
        "expect",
    ];
    is_token(name)
        && !is_framing_header(name)
        && !FORBIDDEN.iter().any(|h| name.eq_ignore_ascii_case(h))
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Headers the server owns, because they decide where the response ends.
fn is_framing_header(name: &str) -> bool {
    ["content-length", "transfer-encoding", "connection", "date"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_headers_cannot_split_the_response() {
        let headers = vec![
            ("x-a".to_string(), "1\r\nx-evil: 2".to_string()),
            ("content-length".into(), "0".into()),
        ];
        let head = ResponseHead {
            status: 200,
            headers: &headers,
            default_content_type: "text/plain",
            keep_alive: true,
            minor_version: 1,
        };
        let text = String::from_utf8(head.complete(b"hi", false)).unwrap();
        assert!(
            !text.contains("x-evil") && text.ends_with("content-length: 2\r\n\r\nhi"),
            "{text}"
        );
    }

    #[test]
    fn trailers_end_a_chunked_body_and_cannot_smuggle_or_frame() {
        let pair = |n: &str, v: &str| (n.to_owned(), v.to_owned());
        let trailers = [
            pair("X-Exit-Code", "0"),
            pair("content-length", "5"),
            pair("x-evil", "1\r\n\r\nHTTP/1.1 200 OK"),
            pair("bad name", "1"),
            pair("authorization", "Bearer x"),
        ];
        assert_eq!(
            last_chunk_with_trailers(1, &trailers),
            b"0\r\nx-exit-code: 0\r\n\r\n".to_vec()
        );
        assert_eq!(last_chunk_with_trailers(1, &[]), last_chunk(1).to_vec());
        assert!(last_chunk_with_trailers(0, &trailers).is_empty());
    }

    #[test]
    fn no_store_unless_the_script_sends_a_cache_control_of_its_own() {
        let head = |headers: &[(String, String)]| {
            let head = ResponseHead {
                status: 200,
                headers,
                default_content_type: "text/plain",
                keep_alive: false,
                minor_version: 1,
            };
            String::from_utf8(head.complete(b"", false)).unwrap()
        };
        let own = [("Cache-Control".to_string(), "max-age=60".to_string())];
        assert!(head(&own).contains("Cache-Control: max-age=60\r\n"));
        assert!(!head(&own).contains("no-store"));
        // A value the server drops does not count as the script's own.
        let dropped = [("cache-control".to_string(), "public\r\nx: 1".to_string())];
        assert!(head(&dropped).contains("cache-control: no-store\r\n"));
        assert!(head(&[]).contains("cache-control: no-store\r\n"));
    }
}
