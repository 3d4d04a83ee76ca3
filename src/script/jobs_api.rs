//! The job functions of a script (SPEC §5, §12): `start` with its keyed-job options, `job`,
//! `jobs`, `job_output`, `attach` and `cancel`.

use super::api::{ScriptResult, argv_program, duration_arg, parse_options};
use super::{context, script_error};
use crate::commands::Program;
use crate::jobs::{IfRunning, JobRequest, JobView, Phase};
use crate::runtime::Runtime;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Most runs `retry.attempts` may ask for.
const MAX_ATTEMPTS: i64 = 100;
/// How often `attach` looks at the deadline while a job is quiet.
const ATTACH_POLL: Duration = Duration::from_millis(200);

pub fn register(engine: &mut Engine, runtime: &Arc<Runtime>) {
    let rt = runtime.clone();
    engine.register_fn("start", move |what: Dynamic| start(&rt, what, Map::new()));
    let rt = runtime.clone();
    engine.register_fn("start", move |what: Dynamic, opts: Map| {
        start(&rt, what, opts)
    });
    let rt = runtime.clone();
    engine.register_fn("job", move |id: i64| job_map(rt.job(id)));
    let rt = runtime.clone();
    engine.register_fn("jobs", move || -> Array {
        rt.job_list()
            .into_iter()
            .map(|view| job_map(Some(view)))
            .collect()
    });
    let rt = runtime.clone();
    engine.register_fn("job_output", move |id: i64| {
        match rt.jobs.table().output(id) {
            Some(bytes) => Dynamic::from(String::from_utf8_lossy(&bytes).into_owned()),
            None => Dynamic::UNIT,
        }
    });
    let rt = runtime.clone();
    engine.register_fn("attach", move |id: i64| attach(&rt, id));
    let rt = runtime.clone();
    engine.register_fn("cancel", move |id: i64| rt.cancel_job(id));
}

/// `start(argv_or_cmd, opts)`: an array runs directly, a string through `/bin/sh -c`.
fn start(runtime: &Arc<Runtime>, what: Dynamic, mut opts: Map) -> ScriptResult<i64> {
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
    let key = match opts.remove("key") {
        Some(key) if !key.is_unit() => Some(key.to_string()),
        _ => None,
    };
    let if_running = match opts.remove("if_running") {
        Some(mode) => parse_mode(&mode.to_string())?,
        None => IfRunning::Queue,
    };
    let debounce = match opts.remove("debounce") {
        Some(value) => Some(duration_arg(&value, "option 'debounce'")?),
        None => None,
    };
    let (attempts, backoff) = match opts.remove("retry") {
        Some(retry) => parse_retry(retry)?,
        None => (1, Duration::ZERO),
    };
    let options = parse_options(program, opts, runtime.limits.command_timeout)?;
    if options.stream {
        return Err(script_error(
            "a background job has no client to stream to: remove 'stream' (see attach())",
        ));
    }
    let request = JobRequest {
        spec: options.spec,
        lock: options.lock,
        key,
        if_running,
        debounce,
        attempts,
        backoff,
        request_id: context::request_id(),
    };
    runtime.start_job(request).map_err(script_error)
}

fn parse_mode(mode: &str) -> ScriptResult<IfRunning> {
    match mode {
        "queue" => Ok(IfRunning::Queue),
        "skip" => Ok(IfRunning::Skip),
        "replace" => Ok(IfRunning::Replace),
        other => Err(script_error(format!(
            "option 'if_running' must be \"queue\", \"skip\" or \"replace\", not '{other}'"
        ))),
    }
}

/// `retry: #{ attempts, backoff }`: runs in all, and the first wait (doubled after each run).
fn parse_retry(retry: Dynamic) -> ScriptResult<(u32, Duration)> {
    let mut retry = retry
        .try_cast::<Map>()
        .ok_or_else(|| script_error("option 'retry' must be a map #{ attempts, backoff }"))?;
    let attempts = match retry.remove("attempts").map(|a| a.as_int()) {
        Some(Ok(n @ 1..=MAX_ATTEMPTS)) => n as u32,
        None => 3,
        Some(_) => {
            return Err(script_error(format!(
                "retry 'attempts' must be a number from 1 to {MAX_ATTEMPTS}"
            )));
        }
    };
    let backoff = match retry.remove("backoff") {
        Some(value) => duration_arg(&value, "retry 'backoff'")?,
        None => Duration::from_secs(1),
    };
    if let Some(other) = retry.keys().next() {
        return Err(script_error(format!("unknown retry option '{other}'")));
    }
    Ok((attempts, backoff))
}

/// `attach(id)`: sends the job's kept output, then its output as it comes, until it ends;
/// returns its final `job(id)` map (`()` for an unknown job). Bounded by the handler deadline.
fn attach(runtime: &Runtime, id: i64) -> ScriptResult<Dynamic> {
    let mut position = 0;
    loop {
        if context::deadline_passed() || runtime.abort.load(Ordering::Relaxed) {
            return Err(EvalAltResult::ErrorTerminated(
                "handler timed out".into(),
                rhai::Position::NONE,
            )
            .into());
        }
        let wait = context::time_left().min(ATTACH_POLL);
        let Some(follow) = runtime.jobs.follow(id, position, wait) else {
            return Ok(Dynamic::UNIT);
        };
        if !follow.bytes.is_empty() {
            context::send_to_client(follow.bytes);
        }
        position = follow.position;
        if follow.ended {
            return Ok(job_map(runtime.job(id)));
        }
    }
}

/// What `job(id)` returns: `#{ id, key, state, running, code, success, timed_out,
/// duration_ms, attempt }`, or `()` for a job that is unknown or no longer kept.
fn job_map(view: Option<JobView>) -> Dynamic {
    let Some(view) = view else {
        return Dynamic::UNIT;
    };
    let optional = |v: Option<Dynamic>| v.unwrap_or(Dynamic::UNIT);
    let success = view.phase == Phase::Done && view.code == Some(0) && !view.timed_out;
    let mut map = Map::new();
    map.insert("id".into(), Dynamic::from(view.id));
    map.insert("key".into(), optional(view.key.map(Dynamic::from)));
    map.insert("state".into(), Dynamic::from(view.phase.name()));
    map.insert(
        "running".into(),
        Dynamic::from(view.phase == Phase::Running),
    );
    map.insert(
        "code".into(),
        optional(view.code.map(|c| Dynamic::from(c as i64))),
    );
    map.insert("success".into(), Dynamic::from(success));
    map.insert("timed_out".into(), Dynamic::from(view.timed_out));
    map.insert(
        "duration_ms".into(),
        Dynamic::from(view.duration.as_millis() as i64),
    );
    map.insert("attempt".into(), Dynamic::from(view.attempt as i64));
    Dynamic::from_map(map)
}
