//! The functions a script can call (SPEC §5): commands, environment, quoting, logging and
//! writing to the client. Each validates its arguments and throws a clear error; none panics.

use super::{bytes_of, context, script_error};
use crate::commands::{self, CommandSpec, Outcome, OutputSink, Program};
use crate::runtime::Runtime;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map};
use std::sync::Arc;
use std::time::Duration;

pub(super) type ScriptResult<T> = Result<T, Box<EvalAltResult>>;

pub fn register(engine: &mut Engine, runtime: Arc<Runtime>) {
    register_commands(engine, &runtime);
    super::jobs_api::register(engine, &runtime);
    super::state_api::register(engine, &runtime);
    engine.register_fn("env", |name: &str| {
        std::env::var(name)
            .map(Dynamic::from)
            .unwrap_or(Dynamic::UNIT)
    });
    engine.register_fn("shell_quote", |text: &str| commands::shell_quote(text));
    engine.register_fn("write", |data: Dynamic| {
        context::send_to_client(bytes_of(data))
    });
    engine.register_fn("announce_trailers", announce_trailers);
    for (name, level) in [
        ("log_error", log::Level::Error),
        ("log_warn", log::Level::Warn),
        ("log_info", log::Level::Info),
        ("log_debug", log::Level::Debug),
    ] {
        engine.register_fn(name, move |message: Dynamic| {
            context::log(level, &message.to_string())
        });
    }
}

/// `announce_trailers(["x-exit-code"])`: names the HTTP trailers the reply map's `trailers` will
/// carry, so a streamed response can announce them in its head (`Trailer:`), which goes out
/// with the first `write` before the reply is known.
fn announce_trailers(names: Array) -> ScriptResult<()> {
    let names = names
        .into_iter()
        .map(|name| {
            let name = name.into_string().map_err(|t| {
                script_error(format!("trailer names must be strings, not {t}"))
            })?;
            if !crate::http::is_trailer_name(&name) {
                return Err(script_error(format!(
                    "'{name}' cannot be a trailer: not a header name, or one that frames, routes or authenticates the message"
                )));
            }
            Ok(name.to_ascii_lowercase())
        })
        .collect::<ScriptResult<Vec<String>>>()?;
    context::announce_trailers(names);
    Ok(())
}

fn register_commands(engine: &mut Engine, runtime: &Arc<Runtime>) {
    let rt = runtime.clone();
    engine.register_fn("exec", move |argv: Array| {
        run_command(&rt, argv_program(argv)?, Map::new())
    });
    let rt = runtime.clone();
    engine.register_fn("exec", move |argv: Array, opts: Map| {
        run_command(&rt, argv_program(argv)?, opts)
    });
    let rt = runtime.clone();
    engine.register_fn("run", move |line: &str| {
        run_command(&rt, Program::Shell(line.into()), Map::new())
    });
    let rt = runtime.clone();
    engine.register_fn("run", move |line: &str, opts: Map| {
        run_command(&rt, Program::Shell(line.into()), opts)
    });
}

pub(super) fn argv_program(argv: Array) -> ScriptResult<Program> {
    let words = argv
        .into_iter()
        .map(|word| {
            word.into_string()
                .map_err(|t| script_error(format!("argv items must be strings, not {t}")))
        })
        .collect::<ScriptResult<Vec<String>>>()?;
    if words.is_empty() {
        return Err(script_error("argv is empty"));
    }
    Ok(Program::Argv(words))
}

/// The `opts` map of `exec`/`run`, checked.
pub(super) struct CommandOptions {
    pub spec: CommandSpec,
    pub stream: bool,
    pub lock: Option<String>,
}

pub(super) fn parse_options(
    program: Program,
    opts: Map,
    default_timeout: Duration,
) -> ScriptResult<CommandOptions> {
    let mut spec = CommandSpec {
        program,
        timeout: default_timeout,
        ..CommandSpec::default()
    };
    let mut stream = false;
    let mut lock = None;
    for (key, value) in opts {
        match key.as_str() {
            "env" => spec.env = env_pairs(value)?,
            "clear_env" => spec.clear_env = typed(&key, value.as_bool())?,
            "cwd" => spec.cwd = Some(typed(&key, value.into_string())?),
            "stdin" => spec.stdin = stdin_bytes(value)?,
            "timeout" => spec.timeout = timeout_ms(value)?,
            "stream" => stream = typed(&key, value.as_bool())?,
            "lock" => lock = Some(typed(&key, value.into_string())?),
            other => return Err(script_error(format!("unknown command option '{other}'"))),
        }
    }
    Ok(CommandOptions { spec, stream, lock })
}

fn typed<T, E: std::fmt::Display>(key: &str, value: Result<T, E>) -> ScriptResult<T> {
    value.map_err(|found| script_error(format!("option '{key}' has the wrong type ({found})")))
}

/// The `env` option, each name and value checked: the OS would silently split `A=B` at the
/// first `=` (a name `PATH=/x:` sets `PATH`), and cannot carry a NUL.
fn env_pairs(value: Dynamic) -> ScriptResult<Vec<(String, String)>> {
    let map = value
        .try_cast::<Map>()
        .ok_or_else(|| script_error("option 'env' must be a map"))?;
    map.into_iter()
        .map(|(k, v)| {
            let (name, value) = (k.to_string(), v.to_string());
            commands::check_env(&name, &value).map_err(script_error)?;
            Ok((name, value))
        })
        .collect()
}

fn stdin_bytes(value: Dynamic) -> ScriptResult<Vec<u8>> {
    if value.is_string() || value.is_blob() {
        return Ok(bytes_of(value));
    }
    Err(script_error("option 'stdin' must be a string or a blob"))
}

fn timeout_ms(value: Dynamic) -> ScriptResult<Duration> {
    match value.as_int() {
        Ok(ms) if ms >= 0 => Ok(Duration::from_millis(ms as u64)),
        _ => Err(script_error(
            "option 'timeout' must be a whole number of milliseconds, 0 or more",
        )),
    }
}

fn run_command(runtime: &Runtime, program: Program, opts: Map) -> ScriptResult<Map> {
    let mut options = parse_options(program, opts, runtime.limits.command_timeout)?;
    // A command never outlives the handler that waits for it.
    options.spec.timeout = options.spec.timeout.min(context::time_left());
    let mut forward = |chunk: &[u8]| context::send_to_client(chunk.to_vec());
    let sink = match options.stream {
        true => OutputSink::Stream(&mut forward),
        false => OutputSink::Capture(runtime.limits.max_output_bytes),
    };
    let outcome = runtime.run_command(&options.spec, options.lock.as_deref(), sink);
    context::record_exit_code(outcome.code);
    // A command cut short by the handler deadline ends the handler too, at once.
    if context::deadline_passed() {
        return Err(EvalAltResult::ErrorTerminated(
            "handler timed out".into(),
            rhai::Position::NONE,
        )
        .into());
    }
    Ok(result_map(&outcome))
}

/// Collected from its fields in key order, as `req` is (values.rs): no key is searched for.
fn result_map(outcome: &Outcome) -> Map {
    let text = |bytes: &[u8]| Dynamic::from(String::from_utf8_lossy(bytes).into_owned());
    let fields = [
        ("code", Dynamic::from(outcome.code as i64)),
        (
            "duration_ms",
            Dynamic::from(outcome.duration.as_millis() as i64),
        ),
        ("stderr", text(&outcome.stderr)),
        ("stdout", text(&outcome.stdout)),
        ("success", Dynamic::from(outcome.success())),
        ("timed_out", Dynamic::from(outcome.timed_out)),
        ("truncated", Dynamic::from(outcome.truncated)),
    ];
    fields.into_iter().map(|(k, v)| (k.into(), v)).collect()
}

/// A duration argument: a string like `"500ms"`, `"5s"`, `"24h"`, or whole milliseconds.
pub(super) fn duration_arg(value: &Dynamic, what: &str) -> ScriptResult<Duration> {
    if let Ok(ms) = value.as_int() {
        return u64::try_from(ms)
            .map(Duration::from_millis)
            .map_err(|_| script_error(format!("{what} must not be negative")));
    }
    let text = value
        .clone()
        .into_string()
        .map_err(|t| script_error(format!("{what} must be a duration like \"5s\", not {t}")))?;
    humantime::parse_duration(&text).map_err(|e| {
        script_error(format!(
            "{what} '{text}' is not a duration like 500ms, 5s or 24h: {e}"
        ))
    })
}
