//! Values across the script boundary: the request as the map `req`, and the value `handle`
//! returns as a [`Reply`] (a string, a blob, `()` or a reply map).

use super::req_use::ReqUse;
use crate::http::HttpHead;
use crate::request::{Content, Endpoints, Reply, Request};
use crate::tls::TlsInfo;
use rhai::{Dynamic, Map};

/// `req` as the script sees it (SPEC §5, §10).
pub(crate) fn request_map(request: &Request) -> Map {
    request_fields(request, &ReqUse::All)
}

/// The fields of `req` that `wanted` names (see [`ReqUse`]), built in one go in key order:
/// `collect` then sorts nothing and searches nothing, where eleven `insert`s cost ~570
/// instructions each (a third of a keep-alive request in callgrind).
pub(crate) fn request_fields(request: &Request, wanted: &ReqUse) -> Map {
    type Field = (&'static str, fn(&Request) -> Dynamic);
    const FIELDS: [Field; 11] = [
        ("args", args),
        ("body", |r| Dynamic::from_blob(r.body.clone())),
        ("framing", |r| r.framing.name().into()),
        ("id", |r| Dynamic::from(r.id as i64)),
        ("listener", |r| r.endpoints.listener.name().into()),
        ("local", |r| r.endpoints.local_text().into()),
        ("payload", |r| Dynamic::from(payload_text(r).into_owned())),
        ("peer", |r| r.endpoints.peer_text().into()),
        ("peer_cred", |r| peer_cred(&r.endpoints)),
        ("tls", |r| {
            r.endpoints
                .tls
                .as_deref()
                .map_or(Dynamic::UNIT, |tls| tls_map(tls).into())
        }),
        ("token_name", |r| {
            r.token_name
                .as_ref()
                .map_or(Dynamic::UNIT, |name| Dynamic::from(name.to_string()))
        }),
    ];
    let mut map: Map = FIELDS
        .iter()
        .filter(|(name, _)| wanted.wants(name))
        .map(|(name, make)| ((*name).into(), make(request)))
        .collect();
    if let Some(head) = &request.http {
        insert_http_fields(&mut map, head, wanted);
    }
    map
}

/// HTTP carries its payload in the body; the other framings on the first line.
fn payload_text(request: &Request) -> std::borrow::Cow<'_, str> {
    let bytes = if request.http.is_some() {
        &request.body
    } else {
        &request.payload
    };
    String::from_utf8_lossy(bytes)
}

fn args(request: &Request) -> Dynamic {
    let args: rhai::Array = match &request.http {
        Some(head) => head.segments().into_iter().map(Dynamic::from).collect(),
        None => payload_text(request)
            .split_whitespace()
            .map(|word| Dynamic::from(word.to_owned()))
            .collect(),
    };
    Dynamic::from_array(args)
}

/// `req.peer_cred` (SPEC §11): the Unix client's credentials, `()` over TCP.
fn peer_cred(endpoints: &Endpoints) -> Dynamic {
    endpoints.peer_cred.map_or(Dynamic::UNIT, |cred| {
        let mut m = Map::new();
        m.insert("pid".into(), Dynamic::from(i64::from(cred.pid)));
        m.insert("uid".into(), Dynamic::from(i64::from(cred.uid)));
        m.insert("gid".into(), Dynamic::from(i64::from(cred.gid)));
        Dynamic::from_map(m)
    })
}

fn tls_map(tls: &TlsInfo) -> Map {
    let text = |s: &Option<String>| s.clone().map_or(Dynamic::UNIT, Dynamic::from);
    let mut m = Map::new();
    m.insert("version".into(), Dynamic::from(tls.version.clone()));
    m.insert("cipher".into(), Dynamic::from(tls.cipher.clone()));
    m.insert("sni".into(), text(&tls.sni));
    let client = tls.client.as_ref().map_or(Dynamic::UNIT, |c| {
        let mut cm = Map::new();
        cm.insert("subject".into(), Dynamic::from(c.subject.clone()));
        cm.insert("cn".into(), text(&c.cn));
        let sans = c.sans.iter().cloned().map(Dynamic::from).collect();
        cm.insert("sans".into(), Dynamic::from_array(sans));
        cm.insert("serial".into(), Dynamic::from(c.serial.clone()));
        cm.insert(
            "fingerprint_sha256".into(),
            Dynamic::from(c.fingerprint_sha256.clone()),
        );
        cm.insert("not_after".into(), Dynamic::from(c.not_after));
        Dynamic::from_map(cm)
    });
    m.insert("client".into(), client);
    m
}

fn insert_http_fields(map: &mut Map, head: &HttpHead, wanted: &ReqUse) {
    let strings = |pairs: Vec<(String, String)>| -> Map {
        pairs
            .into_iter()
            .map(|(k, v)| (k.into(), Dynamic::from(v)))
            .collect()
    };
    if wanted.wants("method") {
        map.insert("method".into(), Dynamic::from(head.method.clone()));
    }
    if wanted.wants("path") {
        map.insert("path".into(), Dynamic::from(head.path().to_owned()));
    }
    if wanted.wants("query") {
        let query = head
            .query()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        map.insert("query".into(), Dynamic::from_map(strings(query)));
    }
    if wanted.wants("headers") {
        let headers = strings(head.joined_headers());
        map.insert("headers".into(), Dynamic::from_map(headers));
    }
}

/// Turns `handle`'s return value into a reply (SPEC §5 and §10 "The return value").
pub(super) fn reply_from(value: Dynamic) -> Result<Reply, String> {
    if !value.is_map() {
        return Ok(Reply {
            content: content_of(&value),
            bytes: bytes_of(value),
            ..Reply::default()
        });
    }
    let mut map = value.cast::<Map>();
    let close = match map.remove("close") {
        Some(close) => Some(
            close
                .as_bool()
                .map_err(|t| format!("reply 'close' must be a bool, not {t}"))?,
        ),
        None => None,
    };
    let status = match map.remove("status") {
        Some(status) => match status.as_int() {
            Ok(code @ 100..=599) => Some(code as u16),
            _ => {
                return Err(format!(
                    "reply 'status' must be a number from 100 to 599, not {status}"
                ));
            }
        },
        None => None,
    };
    let headers = string_pairs(map.remove("headers"), "headers")?;
    let trailers = string_pairs(map.remove("trailers"), "trailers")?;
    let body = map.remove("body").unwrap_or(Dynamic::UNIT);
    Ok(Reply {
        close,
        status,
        headers,
        trailers,
        content: content_of(&body),
        bytes: bytes_of(body),
    })
}

/// A reply map's `headers` or `trailers`: a map, each value in its string form.
fn string_pairs(value: Option<Dynamic>, field: &str) -> Result<Vec<(String, String)>, String> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let map = value
        .try_cast::<Map>()
        .ok_or_else(|| format!("reply '{field}' must be a map"))?;
    Ok(map
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn content_of(value: &Dynamic) -> Content {
    if value.is_unit() {
        Content::Nothing
    } else if value.is_blob() {
        Content::Binary
    } else {
        Content::Text
    }
}

/// Strings and blobs as they are, `()` as nothing, anything else as its string form.
pub fn bytes_of(value: Dynamic) -> Vec<u8> {
    if value.is_unit() {
        return Vec::new();
    }
    if value.is_blob() {
        return value.into_blob().unwrap_or_default();
    }
    if value.is_string() {
        return value
            .into_immutable_string()
            .map(|s| s.as_bytes().to_vec())
            .unwrap_or_default();
    }
    value.to_string().into_bytes()
}
