//! Puts a reply on the wire in the connection's framing: as it is for line and stream framing,
//! as an HTTP response for HTTP framing. The one place that knows both.

use crate::http::{self, HttpHead, ResponseHead};
use crate::request::{Content, Reply};

/// Encodes `reply` for the wire and settles whether the connection closes after it.
/// `streamed`: an HTTP response head already went out with live output (`write()`).
pub fn finish(reply: Reply, head: Option<&HttpHead>, streamed: bool) -> Reply {
    let Some(head) = head else { return reply };
    let version = head.minor_version;
    if streamed {
        let mut bytes = http::chunk(&reply.bytes, version);
        bytes.extend_from_slice(&http::last_chunk_with_trailers(version, &reply.trailers));
        // HTTP/1.0 has no chunks: the close ends the body.
        let close = version == 0 || reply.close.unwrap_or(!head.keep_alive());
        return Reply {
            bytes,
            close: Some(close),
            ..Reply::default()
        };
    }
    let keep_alive = reply.close.map_or(head.keep_alive(), |close| !close);
    // Not streamed: the result is known before the head goes out, so trailers travel in it.
    let mut headers = reply.headers;
    headers.extend(reply.trailers);
    let status = reply
        .status
        .unwrap_or(if reply.content == Content::Nothing {
            204
        } else {
            200
        });
    let response = ResponseHead {
        status,
        headers: &headers,
        default_content_type: match reply.content {
            Content::Binary => "application/octet-stream",
            _ => "text/plain; charset=utf-8",
        },
        keep_alive,
        minor_version: version,
    };
    let bytes = response.complete(&reply.bytes, head.method == "HEAD");
    Reply {
        bytes,
        close: Some(!keep_alive),
        ..Reply::default()
    }
}

/// The response head that live output starts with: `200`, chunked (or until close on 1.0),
/// announcing the trailers the script named with `announce_trailers`.
pub fn stream_start(stream: LiveStream, trailer_names: &[String]) -> Vec<u8> {
    let announce = match trailer_names {
        [] => Vec::new(),
        names => vec![("trailer".to_owned(), names.join(", "))],
    };
    let response = ResponseHead {
        status: 200,
        headers: &announce,
        default_content_type: "text/plain; charset=utf-8",
        keep_alive: stream.minor_version == 1 && stream.keep_alive,
        minor_version: stream.minor_version,
    };
    response.streaming()
}

/// What live output needs to know of an HTTP request, copied out of its head.
#[derive(Clone, Copy, Debug)]
pub struct LiveStream {
    pub minor_version: u8,
    pub keep_alive: bool,
}

impl LiveStream {
    pub fn of(head: &HttpHead) -> LiveStream {
        LiveStream {
            minor_version: head.minor_version,
            keep_alive: head.keep_alive(),
        }
    }
}
