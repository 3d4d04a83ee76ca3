//! The state functions of a script (SPEC §12): `state_get/set/delete/incr/keys`, `once` and
//! `rate_limit`. Values go in and out as JSON, so they are what `to_json` accepts.

use super::api::{ScriptResult, duration_arg};
use super::script_error;
use crate::runtime::Runtime;
use rhai::{Array, Dynamic, Engine, Map};
use std::sync::Arc;
use std::time::Duration;

pub fn register(engine: &mut Engine, runtime: &Arc<Runtime>) {
    let rt = runtime.clone();
    engine.register_fn("state_get", move |key: &str| get(&rt, key));
    let rt = runtime.clone();
    engine.register_fn("state_set", move |key: &str, value: Dynamic| {
        set(&rt, key, value, Map::new())
    });
    let rt = runtime.clone();
    engine.register_fn("state_set", move |key: &str, value: Dynamic, opts: Map| {
        set(&rt, key, value, opts)
    });
    let rt = runtime.clone();
    engine.register_fn("state_delete", move |key: &str| {
        rt.state.delete(key, rt.now()).map_err(fail)
    });
    let rt = runtime.clone();
    engine.register_fn("state_incr", move |key: &str| incr(&rt, key, 1, Map::new()));
    let rt = runtime.clone();
    engine.register_fn("state_incr", move |key: &str, by: i64| {
        incr(&rt, key, by, Map::new())
    });
    let rt = runtime.clone();
    engine.register_fn("state_incr", move |key: &str, by: i64, opts: Map| {
        incr(&rt, key, by, opts)
    });
    let rt = runtime.clone();
    engine.register_fn("state_keys", move || keys(&rt, ""));
    let rt = runtime.clone();
    engine.register_fn("state_keys", move |prefix: &str| keys(&rt, prefix));
    let rt = runtime.clone();
    engine.register_fn("once", move |key: &str, ttl: Dynamic| {
        let ttl = duration_arg(&ttl, "once() ttl")?;
        rt.ensure_timer();
        rt.state.once(key, ttl, rt.now()).map_err(fail)
    });
    let rt = runtime.clone();
    engine.register_fn("rate_limit", move |key: &str, n: i64, per: Dynamic| {
        rate_limit(&rt, key, n, &per)
    });
}

fn fail(error: crate::state::StateError) -> Box<rhai::EvalAltResult> {
    script_error(error.to_string())
}

fn get(runtime: &Runtime, key: &str) -> ScriptResult<Dynamic> {
    match runtime.state.get(key, runtime.now()).map_err(fail)? {
        Some(json) => {
            let value: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| script_error(format!("state '{key}' holds bad JSON: {e}")))?;
            rhai::serde::to_dynamic(value)
        }
        None => Ok(Dynamic::UNIT),
    }
}

fn set(runtime: &Arc<Runtime>, key: &str, value: Dynamic, opts: Map) -> ScriptResult<()> {
    let ttl = ttl_option(opts)?;
    let json = serde_json::to_string(&value)
        .map_err(|e| script_error(format!("state_set: the value is not JSON: {e}")))?;
    if ttl.is_some() {
        runtime.ensure_timer();
    }
    runtime
        .state
        .set(key, json, ttl, runtime.now())
        .map_err(fail)
}

fn incr(runtime: &Arc<Runtime>, key: &str, by: i64, opts: Map) -> ScriptResult<i64> {
    let ttl = ttl_option(opts)?;
    if ttl.is_some() {
        runtime.ensure_timer();
    }
    runtime
        .state
        .incr(key, by, ttl, runtime.now())
        .map_err(fail)
}

fn keys(runtime: &Runtime, prefix: &str) -> ScriptResult<Array> {
    let keys = runtime.state.keys(prefix, runtime.now()).map_err(fail)?;
    Ok(keys.into_iter().map(Dynamic::from).collect())
}

/// `#{ ttl: "24h" }`, the only state option.
fn ttl_option(mut opts: Map) -> ScriptResult<Option<Duration>> {
    let ttl = match opts.remove("ttl") {
        Some(value) if !value.is_unit() => Some(duration_arg(&value, "option 'ttl'")?),
        _ => None,
    };
    match opts.keys().next() {
        Some(other) => Err(script_error(format!("unknown state option '{other}'"))),
        None => Ok(ttl),
    }
}

fn rate_limit(runtime: &Arc<Runtime>, key: &str, n: i64, per: &Dynamic) -> ScriptResult<bool> {
    let per = duration_arg(per, "rate_limit() per")?;
    let n = u32::try_from(n).map_err(|_| script_error("rate_limit() n must be 0 or more"))?;
    if per.is_zero() {
        return Err(script_error("rate_limit() per must be longer than 0"));
    }
    runtime.ensure_timer();
    Ok(runtime.limiter.check(key, n, per, runtime.now()))
}
