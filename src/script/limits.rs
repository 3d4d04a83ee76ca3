//! How big and how deep a script's values may grow, and the built-ins that would multiply their
//! input, re-registered so that they check the size of their result before they build it.
//!
//! Rhai checks its size limits after a function has made its whole result (`split` of 2 MB of
//! newlines makes 2 million strings, 130 MB, before the check fails) and has no limit on how
//! deep values nest, though cloning, dropping, sizing and printing a value all recurse once per
//! level. Here: every variable read checks the depth of the value it reads (see
//! [`check_value`]), and the multiplying built-ins count first.

use super::script_error;
use crate::config::Limits;
use rhai::{Array, Blob, Dynamic, Engine, EvalAltResult, FnPtr, ImmutableString, Map};

type ScriptResult<T> = Result<T, Box<EvalAltResult>>;

/// Items in one array (or entries in one map) that a script builds; also what one `split`,
/// `to_chars`, `to_array` or `parse_json` may make.
pub const MAX_COLLECTION_ITEMS: usize = 100_000;
/// How many arrays, maps and curried function pointers a value a variable holds may nest.
/// Matches `serde_json`'s own parsing limit, so any JSON `parse_json` accepts can be held.
pub const MAX_NESTING: usize = 128;
/// Values curried into function pointers: Rhai counts none of them against its size limits,
/// so this bounds them (across one value) instead.
const MAX_CURRIED_ITEMS: usize = 1_000;
/// The smallest string limit, so that small `--max-*-bytes` settings still leave room to work.
const MIN_STRING_BYTES: usize = 4 << 20;

/// Rhai's size limits for one server, derived from what the server accepts and captures.
#[derive(Clone, Copy, Debug)]
pub struct SizeLimits {
    /// Bytes of strings in one value. A payload of N bytes is at most 3N as a string (each
    /// invalid byte becomes U+FFFD, three bytes), and `req.args` repeats it; a command result
    /// holds stdout and stderr, each up to 3x `--max-output-bytes` the same way.
    pub string_bytes: usize,
    /// Rhai counts array items and blob bytes against one limit: the script's own arrays plus a
    /// whole body (and `req.args`) of `--max-request-bytes`.
    pub array_items: usize,
}

impl SizeLimits {
    pub fn of(limits: &Limits) -> SizeLimits {
        let request = limits.max_request_bytes;
        let output = limits.max_output_bytes;
        SizeLimits {
            string_bytes: MIN_STRING_BYTES
                .max(request.saturating_mul(6))
                .max(output.saturating_mul(6))
                .saturating_add(64 << 10),
            array_items: MAX_COLLECTION_ITEMS.saturating_add(request.saturating_mul(2)),
        }
    }
}

/// Checks the depth of what a variable holds each time it is read. Every value that grows
/// deeper is read from a variable on each step (with `this` disabled and no closures), so this
/// bounds the depth of every value.
pub fn register_depth_check(engine: &mut Engine) {
    // `on_var` is marked volatile, not deprecated: its signature may change in a later Rhai.
    #[allow(deprecated)]
    engine.on_var(
        |name, _index, context| match context.scope().get(name).map(check_value) {
            Some(Err(e)) => Err(script_error(format!("variable '{name}': {e}"))),
            _ => Ok(None),
        },
    );
}

/// Fails when `value` nests deeper than [`MAX_NESTING`] or curries too much. Cost: one look at
/// every item of the collections inside `value`; scalars cost nothing.
pub fn check_value(value: &Dynamic) -> Result<(), String> {
    if !(value.is_array() || value.is_map() || value.is_fnptr()) {
        return Ok(());
    }
    let mut curried = 0;
    match too_deep(value, MAX_NESTING, &mut curried) {
        false => Ok(()),
        true if curried > MAX_CURRIED_ITEMS => Err(format!(
            "value curries more than {MAX_CURRIED_ITEMS} values into function pointers"
        )),
        true => Err(format!(
            "value is nested more than {MAX_NESTING} levels deep (arrays, maps, curried functions)"
        )),
    }
}

/// Whether `value` holds more than `levels` levels of containers. Recursion is bounded by
/// `levels`, so this never goes deeper than [`MAX_NESTING`] frames itself.
fn too_deep(value: &Dynamic, levels: usize, curried: &mut usize) -> bool {
    let deeper = |items: &mut dyn Iterator<Item = &Dynamic>, curried: &mut usize| {
        if levels == 0 {
            return true;
        }
        for item in items {
            if too_deep(item, levels - 1, curried) {
                return true;
            }
        }
        false
    };
    if value.is_array() {
        let Some(array) = value.read_lock::<Array>() else {
            return false;
        };
        return !array.is_empty() && deeper(&mut array.iter(), curried);
    }
    if value.is_map() {
        let Some(map) = value.read_lock::<Map>() else {
            return false;
        };
        return !map.is_empty() && deeper(&mut map.values(), curried);
    }
    if let Some(f) = value.read_lock::<FnPtr>() {
        *curried += f.curry().len();
        return *curried > MAX_CURRIED_ITEMS
            || (!f.curry().is_empty() && deeper(&mut f.curry().iter(), curried));
    }
    false
}

/// Fails unless a built-in's result of `items` items fits [`MAX_COLLECTION_ITEMS`].
fn check_items(function: &str, items: usize) -> ScriptResult<()> {
    if items > MAX_COLLECTION_ITEMS {
        return Err(script_error(format!(
            "{function} would make {items} items, more than the {MAX_COLLECTION_ITEMS} an array may hold"
        )));
    }
    Ok(())
}

/// Counts, then builds: the array only exists once its size is known to fit.
fn counted<'a, I>(function: &str, pieces: impl Fn() -> I) -> ScriptResult<Array>
where
    I: Iterator<Item = &'a str>,
{
    check_items(function, pieces().count())?;
    Ok(pieces().map(Into::into).collect())
}

/// Rhai's `split`, `split_rev`, `to_chars`, `replace` and blob `to_array`, with the same
/// results, but checked before they allocate. Registered on the engine, they take precedence
/// over the standard package's versions of the same signatures. `max_string` is the engine's
/// string limit.
pub fn register_checked_builtins(engine: &mut Engine, max_string: usize) {
    register_splits(engine);
    register_limited_splits(engine);
    register_replaces(engine, max_string);
    engine.register_fn("to_chars", |s: &str| -> ScriptResult<Array> {
        check_items("to_chars", s.chars().count())?;
        Ok(s.chars().map(Dynamic::from).collect())
    });
    engine.register_fn("to_array", |blob: &mut Blob| -> ScriptResult<Array> {
        check_items("to_array", blob.len())?;
        Ok(blob.iter().map(|&b| Dynamic::from(b as i64)).collect())
    });
}

/// The unlimited forms. Rhai returns the whole string alone when it is empty or does not hold
/// the delimiter; so do these.
fn register_splits(engine: &mut Engine) {
    engine.register_fn("split", |s: &mut ImmutableString| {
        if s.is_empty() {
            return Ok(vec![s.clone().into()]);
        }
        counted("split", || s.split_whitespace())
    });
    engine.register_fn("split", |s: &mut ImmutableString, d: &str| {
        if s.is_empty() || (!d.is_empty() && !s.contains(d)) {
            return Ok(vec![s.clone().into()]);
        }
        counted("split", || s.split(d))
    });
    engine.register_fn("split", |s: &mut ImmutableString, d: char| {
        if s.is_empty() || !s.contains(d) {
            return Ok(vec![s.clone().into()]);
        }
        counted("split", || s.split(d))
    });
    engine.register_fn("split_rev", |s: &mut ImmutableString, d: &str| {
        if s.is_empty() || (!d.is_empty() && !s.contains(d)) {
            return Ok(vec![s.clone().into()]);
        }
        counted("split_rev", || s.rsplit(d))
    });
    engine.register_fn("split_rev", |s: &mut ImmutableString, d: char| {
        if s.is_empty() || !s.contains(d) {
            return Ok(vec![s.clone().into()]);
        }
        counted("split_rev", || s.rsplit(d))
    });
}

/// The forms with a number of segments.
fn register_limited_splits(engine: &mut Engine) {
    let whole = |s: &ImmutableString, n: i64, found: bool| n <= 1 || s.is_empty() || !found;
    engine.register_fn("split", move |s: &mut ImmutableString, d: &str, n: i64| {
        if whole(s, n, d.is_empty() || s.contains(d)) {
            return Ok(vec![s.clone().into()]);
        }
        counted("split", || {
            s.splitn(usize::try_from(n).unwrap_or(usize::MAX), d)
        })
    });
    engine.register_fn("split", move |s: &mut ImmutableString, d: char, n: i64| {
        if whole(s, n, s.contains(d)) {
            return Ok(vec![s.clone().into()]);
        }
        counted("split", || {
            s.splitn(usize::try_from(n).unwrap_or(usize::MAX), d)
        })
    });
    engine.register_fn(
        "split_rev",
        move |s: &mut ImmutableString, d: &str, n: i64| {
            if whole(s, n, d.is_empty() || s.contains(d)) {
                return Ok(vec![s.clone().into()]);
            }
            counted("split_rev", || {
                s.rsplitn(usize::try_from(n).unwrap_or(usize::MAX), d)
            })
        },
    );
    engine.register_fn(
        "split_rev",
        move |s: &mut ImmutableString, d: char, n: i64| {
            if whole(s, n, s.contains(d)) {
                return Ok(vec![s.clone().into()]);
            }
            counted("split_rev", || {
                s.rsplitn(usize::try_from(n).unwrap_or(usize::MAX), d)
            })
        },
    );
}

/// `replace` in place, as Rhai's: the result's length is computed from the number of matches
/// first, since one call can multiply its input (`s.replace("a", four_megabytes)` on 100,000
/// `a`s would ask for 400 GB).
fn replace(s: &mut ImmutableString, find: &str, with: &str, max: usize) -> ScriptResult<()> {
    if s.is_empty() {
        return Ok(());
    }
    let matches = s.matches(find).count();
    let length =
        (s.len() - matches * find.len()).saturating_add(matches.saturating_mul(with.len()));
    if length > max {
        return Err(script_error(format!(
            "replace would make a string of {length} bytes, more than the {max} a string may hold"
        )));
    }
    *s = s.replace(find, with).into();
    Ok(())
}

fn register_replaces(engine: &mut Engine, max: usize) {
    engine.register_fn(
        "replace",
        move |s: &mut ImmutableString, f: &str, w: &str| replace(s, f, w, max),
    );
    engine.register_fn(
        "replace",
        move |s: &mut ImmutableString, f: &str, w: char| {
            replace(s, f, w.encode_utf8(&mut [0; 4]), max)
        },
    );
    engine.register_fn(
        "replace",
        move |s: &mut ImmutableString, f: char, w: &str| {
            replace(s, f.encode_utf8(&mut [0; 4]), w, max)
        },
    );
    engine.register_fn(
        "replace",
        move |s: &mut ImmutableString, f: char, w: char| {
            replace(
                s,
                f.encode_utf8(&mut [0; 4]),
                w.encode_utf8(&mut [0; 4]),
                max,
            )
        },
    );
}

/// An `io::Write` that refuses to grow past `max` bytes, so `to_json` stops before it
/// allocates more than the string limit instead of after.
pub struct CappedWriter {
    pub bytes: Vec<u8>,
    max: usize,
}

impl CappedWriter {
    pub fn new(max: usize) -> CappedWriter {
        CappedWriter {
            bytes: Vec::new(),
            max,
        }
    }
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.max {
            return Err(std::io::Error::other(format!(
                "longer than the {} bytes a string may hold",
                self.max
            )));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An upper bound on the values (array items, map entries) that `text` parses to, and its
/// deepest nesting, read without allocating: every item but the first in a container follows a
/// comma, and every container opens with a bracket.
pub fn json_shape(text: &str) -> (usize, usize) {
    let (mut items, mut depth, mut deepest) = (0usize, 0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in text.bytes() {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                items += 1;
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' => items += 1,
            _ => {}
        }
    }
    (items, deepest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> Dynamic {
        let mut value = Dynamic::from(1_i64);
        for _ in 0..levels {
            value = Dynamic::from_array(vec![value]);
        }
        value
    }

    #[test]
    fn depth_is_checked_at_the_limit() {
        assert!(check_value(&nested(MAX_NESTING)).is_ok());
        assert!(check_value(&nested(MAX_NESTING + 1)).is_err());
    }

    #[test]
    fn json_shape_skips_strings() {
        assert_eq!(json_shape(r#"[1, "[,]", {"a": [2]}]"#), (5, 3));
        assert_eq!(json_shape(r#""\"[""#), (0, 0));
    }

    #[test]
    fn capped_writer_refuses_past_its_limit() {
        use std::io::Write;
        let mut w = CappedWriter::new(4);
        assert!(w.write_all(b"abcd").is_ok());
        assert!(w.write_all(b"e").is_err());
    }
}
