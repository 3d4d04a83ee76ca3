//! The functions a test file calls besides the handler's own (SPEC §14): `request`, `mock`,
//! `mock_env`, `commands`, `assert`, `assert_eq`, `assert_match` and `advance`. Each validates its
//! arguments and throws a clear error; a failed assertion throws its message, which the
//! harness reports with the line of the call.

use crate::clock::VirtualClock;
use crate::commands::{Outcome, Program};
use crate::framing::Framing;
use crate::http::HttpHead;
use crate::request::{Endpoints, Request};
use crate::runner::{Pattern, Recorded, Recorder};
use crate::runtime::Runtime;
use crate::script::{bytes_of, request_map, script_error};
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type ScriptResult<T> = Result<T, Box<EvalAltResult>>;

/// What one test owns: its recorder (commands and mocks), its clock and its request ids.
/// Built fresh for every test, so nothing leaks from one test into the next.
pub struct TestState {
    pub recorder: Arc<Recorder>,
    pub clock: Arc<VirtualClock>,
    /// The id the next `request()` gets, from 1 like the server's.
    next_request: AtomicU64,
    /// `--command-timeout`: a command's `timeout` shows in `commands()` only when it differs.
    pub default_timeout: Duration,
    /// The environment `env()` sees in a test: only what `mock_env` set, so a test gives the
    /// same answer on every machine.
    env: Mutex<HashMap<String, String>>,
}

impl TestState {
    pub fn new(default_timeout: Duration) -> Arc<TestState> {
        Arc::new(TestState {
            recorder: Arc::new(Recorder::default()),
            clock: Arc::new(VirtualClock::new()),
            next_request: AtomicU64::new(1),
            default_timeout,
            env: Mutex::default(),
        })
    }
}

/// The addresses `request()` uses unless told otherwise; the same as `call`'s.
const PEER: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

pub fn register(engine: &mut Engine, state: &Arc<TestState>, runtime: &Arc<Runtime>) {
    let s = state.clone();
    engine.register_fn("request", move |payload: &str| {
        request(&s, RequestFields::payload(payload))
    });
    let s = state.clone();
    engine.register_fn("request", move |fields: Map| {
        request(&s, RequestFields::parse(fields)?)
    });
    let s = state.clone();
    engine.register_fn(
        "mock",
        move |pattern: Dynamic, result: Map| -> ScriptResult<()> {
            s.recorder.mock(pattern_of(pattern)?, outcome_of(result)?);
            Ok(())
        },
    );
    let s = state.clone();
    engine.register_fn("commands", move || -> Array {
        let timeout = s.default_timeout;
        let seen = s.recorder.seen();
        seen.iter()
            .map(|r| Dynamic::from_map(command_map(r, timeout)))
            .collect()
    });
    // Registered after the server's `env`, so it replaces it in tests.
    let s = state.clone();
    engine.register_fn("env", move |name: &str| {
        let env = s.env.lock().unwrap_or_else(|p| p.into_inner());
        env.get(name).cloned().map_or(Dynamic::UNIT, Dynamic::from)
    });
    let s = state.clone();
    engine.register_fn("mock_env", move |name: &str, value: &str| {
        let mut env = s.env.lock().unwrap_or_else(|p| p.into_inner());
        env.insert(name.into(), value.into());
    });
    // Moves the clock that time-based features read (`runtime.clock`), then starts the jobs
    // that became due (debounce ends, retries): a test has no timer thread to do it.
    let s = state.clone();
    let r = runtime.clone();
    engine.register_fn("advance", move |by: Dynamic| -> ScriptResult<()> {
        s.clock.advance(duration_of(by)?);
        r.run_due_jobs();
        Ok(())
    });
    register_assertions(engine);
}

fn register_assertions(engine: &mut Engine) {
    engine.register_fn("assert", |cond: bool| {
        check(cond, || "assertion failed".into())
    });
    engine.register_fn("assert", |cond: bool, message: Dynamic| {
        check(cond, || message.to_string())
    });
    engine.register_fn("assert_eq", |left: Dynamic, right: Dynamic| {
        check(same(&left, &right), || {
            format!("assert_eq failed: left: {left:?}, right: {right:?}")
        })
    });
    engine.register_fn("assert_match", |text: &str, pattern: &str| {
        let regex = regex_lite::Regex::new(pattern)
            .map_err(|e| script_error(format!("assert_match: bad regex /{pattern}/: {e}")))?;
        check(regex.is_match(text), || {
            format!("assert_match failed: {text:?} does not match /{pattern}/")
        })
    });
}

fn check(cond: bool, message: impl FnOnce() -> String) -> ScriptResult<()> {
    if cond {
        Ok(())
    } else {
        Err(script_error(message()))
    }
}

/// Equal types and equal values; maps and arrays compared item by item (through JSON, which
/// keeps ints and floats apart), anything JSON cannot hold by its printed form.
fn same(left: &Dynamic, right: &Dynamic) -> bool {
    if left.type_name() != right.type_name() {
        return false;
    }
    match (serde_json::to_value(left), serde_json::to_value(right)) {
        (Ok(l), Ok(r)) => l == r,
        _ => format!("{left:?}") == format!("{right:?}"),
    }
}

/// `advance("5s")` or `advance(5000)` (milliseconds).
fn duration_of(by: Dynamic) -> ScriptResult<Duration> {
    if let Ok(ms) = by.as_int() {
        return u64::try_from(ms)
            .map(Duration::from_millis)
            .map_err(|_| script_error("advance: a duration cannot be negative"));
    }
    let text = by.to_string();
    humantime::parse_duration(&text).map_err(|e| {
        script_error(format!(
            "advance: '{text}' is not a duration like 500ms, 5s or 24h: {e}"
        ))
    })
}

/// What `request(#{ ... })` may set; everything else is as the server would make it.
#[derive(Default)]
struct RequestFields {
    payload: String,
    token_name: Option<Dynamic>,
    peer: Option<Dynamic>,
    body: Option<Vec<u8>>,
    method: Option<String>,
    path: Option<String>,
    headers: Vec<(String, String)>,
    query: Vec<(String, String)>,
    tls: Option<Dynamic>,
    peer_cred: Option<Dynamic>,
    listener: Option<Dynamic>,
}

impl RequestFields {
    fn payload(payload: &str) -> RequestFields {
        RequestFields {
            payload: payload.into(),
            ..RequestFields::default()
        }
    }

    fn parse(map: Map) -> ScriptResult<RequestFields> {
        let mut fields = RequestFields::default();
        for (key, value) in map {
            match key.as_str() {
                "payload" => fields.payload = value.to_string(),
                "token_name" => fields.token_name = Some(value),
                "peer" => fields.peer = Some(value),
                "body" => fields.body = Some(bytes_of(value)),
                "method" => fields.method = Some(value.to_string()),
                "path" => fields.path = Some(value.to_string()),
                "headers" => fields.headers = pairs("headers", value)?,
                "query" => fields.query = pairs("query", value)?,
                "tls" => fields.tls = Some(value),
                "peer_cred" => fields.peer_cred = Some(value),
                "listener" => fields.listener = Some(value),
                other => {
                    return Err(script_error(format!(
                        "request: unknown field '{other}' (payload, token_name, peer, body, method, path, headers, query, tls, peer_cred, listener)"
                    )));
                }
            }
        }
        Ok(fields)
    }

    /// HTTP when any HTTP part is given, as the server would have parsed it.
    fn http_head(&self) -> Option<HttpHead> {
        let is_http = self.method.is_some()
            || self.path.is_some()
            || !self.headers.is_empty()
            || !self.query.is_empty();
        if !is_http {
            return None;
        }
        let path = self.path.clone().unwrap_or_else(|| "/".into());
        let mut target = if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        };
        if !self.query.is_empty() {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.extend_pairs(&self.query);
            target = format!("{target}?{}", query.finish());
        }
        Some(HttpHead {
            method: self.method.clone().unwrap_or_else(|| "GET".into()),
            target,
            minor_version: 1,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
        })
    }
}

fn pairs(field: &str, value: Dynamic) -> ScriptResult<Vec<(String, String)>> {
    let map = value
        .try_cast::<Map>()
        .ok_or_else(|| script_error(format!("request: '{field}' must be a map")))?;
    Ok(map
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// `req` built by the server's own code from the parts a test gave.
fn request(state: &TestState, fields: RequestFields) -> ScriptResult<Map> {
    let http = fields.http_head();
    let framing = match (&http, &fields.body) {
        (Some(_), _) => Framing::Http,
        (None, Some(_)) => Framing::Stream,
        (None, None) => Framing::Line,
    };
    // HTTP carries the payload in its body; the other framings on the first line.
    let (payload, body) = match (&http, fields.body) {
        (Some(_), Some(body)) => (Vec::new(), body),
        (Some(_), None) => (Vec::new(), fields.payload.into_bytes()),
        (None, body) => (fields.payload.into_bytes(), body.unwrap_or_default()),
    };
    let token_name = match fields.token_name {
        None => Some("default".into()),
        Some(name) if name.is_unit() => None,
        Some(name) => Some(name.to_string().into()),
    };
    let addr = SocketAddr::from(PEER);
    let request = Request {
        id: state.next_request.fetch_add(1, Ordering::Relaxed),
        token_name,
        payload,
        body,
        endpoints: Endpoints::new(addr, addr),
        framing,
        keep_alive: false,
        http,
    };
    let mut map = request_map(&request);
    for (key, value) in [
        ("peer", fields.peer),
        ("tls", fields.tls),
        ("peer_cred", fields.peer_cred),
        ("listener", fields.listener),
    ] {
        if let Some(value) = value {
            map.insert(key.into(), value);
        }
    }
    Ok(map)
}

/// `mock`'s pattern: an array is an argv prefix, a string a piece of a shell command.
fn pattern_of(pattern: Dynamic) -> ScriptResult<Pattern> {
    if pattern.is_string() {
        return Ok(Pattern::Contains(pattern.to_string()));
    }
    let Some(words) = pattern.try_cast::<Array>() else {
        return Err(script_error(
            "mock: the pattern is an array (argv prefix) or a string (part of a run command)",
        ));
    };
    let words = words
        .into_iter()
        .map(|w| {
            w.into_string()
                .map_err(|t| script_error(format!("mock: argv words are strings, not {t}")))
        })
        .collect::<ScriptResult<Vec<String>>>()?;
    Ok(Pattern::ArgvPrefix(words))
}

/// `mock`'s result: a result map whose missing fields are 0, empty or false.
fn outcome_of(result: Map) -> ScriptResult<Outcome> {
    let mut outcome = Outcome::default();
    for (key, value) in result {
        let wrong = |t: &str| script_error(format!("mock: '{key}' has the wrong type ({t})"));
        match key.as_str() {
            "code" => outcome.code = value.as_int().map_err(wrong)? as i32,
            "stdout" => outcome.stdout = bytes_of(value),
            "stderr" => outcome.stderr = bytes_of(value),
            "truncated" => outcome.truncated = value.as_bool().map_err(wrong)?,
            "timed_out" => outcome.timed_out = value.as_bool().map_err(wrong)?,
            "duration_ms" => {
                let ms = value.as_int().map_err(wrong)?;
                outcome.duration = Duration::from_millis(ms.max(0) as u64);
            }
            "success" => return Err(script_error("mock: 'success' follows 'code'; set 'code'")),
            other => {
                return Err(script_error(format!(
                    "mock: unknown result field '{other}'"
                )));
            }
        }
    }
    Ok(outcome)
}

/// A recorded command as `commands()` and `call --dry-run` show it: `argv` (exec, array
/// start) or `cmd` (run, string start), and the options that differ from their defaults.
pub fn command_map(recorded: &Recorded, default_timeout: Duration) -> Map {
    let spec = &recorded.spec;
    let mut map = Map::new();
    match &spec.program {
        Program::Argv(argv) => map.insert(
            "argv".into(),
            Dynamic::from_array(argv.iter().cloned().map(Dynamic::from).collect()),
        ),
        Program::Shell(line) => map.insert("cmd".into(), Dynamic::from(line.clone())),
    };
    let mut opts = Map::new();
    if !spec.env.is_empty() {
        let env = spec
            .env
            .iter()
            .map(|(k, v)| (k.into(), Dynamic::from(v.clone())));
        opts.insert("env".into(), Dynamic::from_map(env.collect()));
    }
    if spec.clear_env {
        opts.insert("clear_env".into(), Dynamic::TRUE);
    }
    if let Some(cwd) = &spec.cwd {
        opts.insert("cwd".into(), Dynamic::from(cwd.clone()));
    }
    if !spec.stdin.is_empty() {
        let stdin = String::from_utf8_lossy(&spec.stdin).into_owned();
        opts.insert("stdin".into(), Dynamic::from(stdin));
    }
    if spec.timeout != default_timeout {
        opts.insert(
            "timeout".into(),
            Dynamic::from(spec.timeout.as_millis() as i64),
        );
    }
    if recorded.stream {
        opts.insert("stream".into(), Dynamic::TRUE);
    }
    if let Some(lock) = &recorded.lock {
        opts.insert("lock".into(), Dynamic::from(lock.clone()));
    }
    map.insert("opts".into(), Dynamic::from_map(opts));
    map
}

/// One JSON line for `call --dry-run`: the same map as `commands()`.
pub fn command_json(recorded: &Recorded, default_timeout: Duration) -> String {
    let map = Dynamic::from_map(command_map(recorded, default_timeout));
    serde_json::to_string(&map).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
