//! Helpers for verifying webhooks in a script (SPEC §10): digests, HMAC signatures, a
//! constant-time comparison, and JSON both ways.

use super::limits::{self, CappedWriter, MAX_COLLECTION_ITEMS, MAX_NESTING};
use super::script_error;
use hmac::{KeyInit, Mac};
use rhai::{Dynamic, Engine, EvalAltResult};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type Hmac256 = hmac::Hmac<Sha256>;

/// `max_string` is the engine's string limit: `to_json` stops writing there.
pub fn register(engine: &mut Engine, max_string: usize) {
    engine.register_fn("sha256", |data: Dynamic| {
        hex::encode(Sha256::digest(bytes(&data)))
    });
    engine.register_fn("hmac_sha256", |key: Dynamic, data: Dynamic| {
        hmac_hex(&bytes(&key), &bytes(&data))
    });
    engine.register_fn("secure_eq", |a: Dynamic, b: Dynamic| {
        secure_eq(&bytes(&a), &bytes(&b))
    });
    engine.register_fn("parse_json", parse_json);
    engine.register_fn("to_json", move |value: Dynamic| to_json(&value, max_string));
}

/// Strings as their UTF-8 bytes, blobs as they are, anything else as its string form.
fn bytes(value: &Dynamic) -> Vec<u8> {
    super::bytes_of(value.clone())
}

fn hmac_hex(key: &[u8], data: &[u8]) -> Result<String, Box<EvalAltResult>> {
    let mut mac =
        Hmac256::new_from_slice(key).map_err(|e| script_error(format!("hmac_sha256: {e}")))?;
    mac.update(data);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

/// Compares digests of both sides, so neither content nor length leaks through timing.
fn secure_eq(a: &[u8], b: &[u8]) -> bool {
    let (a, b): ([u8; 32], [u8; 32]) = (Sha256::digest(a).into(), Sha256::digest(b).into());
    a.ct_eq(&b).into()
}

/// Counts values and nesting before parsing: a JSON value in memory is many times the size of
/// its text (`[0,0,...]` is 2 bytes an item as text, about 100 as a parsed, converted item).
fn parse_json(text: &str) -> Result<Dynamic, Box<EvalAltResult>> {
    let (items, depth) = limits::json_shape(text);
    if depth > MAX_NESTING {
        return Err(script_error(format!(
            "parse_json: nested {depth} levels deep, more than {MAX_NESTING}"
        )));
    }
    if items > MAX_COLLECTION_ITEMS {
        return Err(script_error(format!(
            "parse_json: about {items} values, more than {MAX_COLLECTION_ITEMS}"
        )));
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| script_error(format!("parse_json: {e}")))?;
    rhai::serde::to_dynamic(value)
}

/// Writes into a buffer capped at the string limit, so an oversized result fails before it is
/// allocated. Serializing recurses once per level: no value is deeper than the variable check
/// of [`limits`] allows plus what one expression adds, which the script stack is sized for.
fn to_json(value: &Dynamic, max_string: usize) -> Result<String, Box<EvalAltResult>> {
    let mut out = CappedWriter::new(max_string);
    serde_json::to_writer(&mut out, value).map_err(|e| script_error(format!("to_json: {e}")))?;
    String::from_utf8(out.bytes).map_err(|e| script_error(format!("to_json: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_the_rfc_4231_vector() {
        let key = [0x0b; 20];
        let expected = "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7";
        assert_eq!(hmac_hex(&key, b"Hi There").unwrap(), expected);
    }

    #[test]
    fn secure_eq_compares_content_and_length() {
        assert!(secure_eq(b"abc", b"abc"));
        assert!(!secure_eq(b"abc", b"abd"));
        assert!(!secure_eq(b"abc", b"abcd"));
    }
}
