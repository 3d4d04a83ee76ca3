//! The functions a script can call (SPEC §5): commands, environment, quoting, logging and
//! writing to the client. Each validates its arguments and throws a clear error; none panics.

use super::{bytes_of, context, script_error};
use crate::commands::{self, CommandSpec, Outcome, OutputSink, Program};
use crate::jobs::Jobs;
use crate::runtime::Runtime;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map};
use std::sync::Arc;
use std::time::Duration;

type ScriptResult<T> = Result<T, Box<EvalAltResult>>;

pub fn register(engine: &mut Engine, runtime: Arc<Runtime>) {
    register_commands(engine, &runtime);
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
    let rt = runtime.clone();
    engine.register_fn("start", move |what: Dynamic| {
        start_job(&rt, what, Map::new())
    });
    let rt = runtime.clone();
    engine.register_fn("start", move |what: Dynamic, opts: Map| {
        start_job(&rt, what, opts)
    });
    let rt = runtime.clone();
    engine.register_fn("job", move |id: i64| job_state(&rt, id));
}

fn argv_program(argv: Array) -> ScriptResult<Program> {
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
struct CommandOptions {
    spec: CommandSpec,
    stream: bool,
    lock: Option<String>,
}

fn parse_options(
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

fn env_pairs(value: Dynamic) -> ScriptResult<Vec<(String, String)>> {
    let map = value
        .try_cast::<Map>()
        .ok_or_else(|| script_error("option 'env' must be a map"))?;
    Ok(map
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
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

/// `start(argv_or_cmd, opts)`: an array runs directly, a string through `/bin/sh -c`.
fn start_job(runtime: &Arc<Runtime>, what: Dynamic, opts: Map) -> ScriptResult<i64> {
    let program = if what.is_array() {
        argv_program(what.cast::<Array>())?
    } else if what.is_string() {
        Program::Shell(what.to_string())
    } else {
        return Err(script_error(format!(
            "start() takes an array of strings or a string, not {}",
            what.type_name()
        )));
    };
    let options = parse_options(program, opts, runtime.limits.command_timeout)?;
    if options.stream {
        return Err(script_error(
            "a background job has no client to stream to: remove 'stream'",
        ));
    }
    Jobs::start(runtime, options.spec, options.lock, context::request_id()).map_err(script_error)
}

fn job_state(runtime: &Runtime, id: i64) -> Dynamic {
    let Some(state) = runtime.jobs.state(id) else {
        return Dynamic::UNIT;
    };
    let mut map = Map::new();
    let code = state
        .code
        .map(|c| Dynamic::from(c as i64))
        .unwrap_or(Dynamic::UNIT);
    let success = state.code == Some(0) && !state.timed_out;
    map.insert("running".into(), Dynamic::from(state.running));
    map.insert("code".into(), code);
    map.insert("success".into(), Dynamic::from(success));
    map.insert("timed_out".into(), Dynamic::from(state.timed_out));
    map.insert(
        "duration_ms".into(),
        Dynamic::from(state.duration.as_millis() as i64),
    );
    Dynamic::from_map(map)
}

fn result_map(outcome: &Outcome) -> Map {
    let text = |bytes: &[u8]| Dynamic::from(String::from_utf8_lossy(bytes).into_owned());
    let mut map = Map::new();
    map.insert("code".into(), Dynamic::from(outcome.code as i64));
    map.insert("success".into(), Dynamic::from(outcome.success()));
    map.insert("stdout".into(), text(&outcome.stdout));
    map.insert("stderr".into(), text(&outcome.stderr));
    map.insert("truncated".into(), Dynamic::from(outcome.truncated));
    map.insert("timed_out".into(), Dynamic::from(outcome.timed_out));
    map.insert(
        "duration_ms".into(),
        Dynamic::from(outcome.duration.as_millis() as i64),
    );
    map
}
