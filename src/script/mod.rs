//! The user's Rhai script: compiling it, keeping the current version for hot reload, and
//! calling `handle(req)` for one request under the handler's deadline.
//!
//! One `Engine` is built and frozen at start and shared by every worker; each call gets a fresh
//! `Scope`. What a call needs to know about its request (id, deadline, the client to `write`
//! to) lives in a thread-local [`context`], set for the length of the call.

pub(crate) mod api;
pub mod budget;
mod compile;
pub mod context;
pub(crate) mod diagnose;
mod jobs_api;
pub mod limits;
mod req_use;
mod state_api;
mod values;
mod webhook;

use crate::request::{Reply, Request};
pub use crate::runtime::Runtime;
pub use compile::ScriptError;
pub(crate) use compile::{check_calls, compile, compile_source, read_source};
use context::{ClientSink, HandlerContext};
use req_use::{ReqUse, req_use};
use rhai::packages::{Package, StandardPackage};
use rhai::{AST, CallFnOptions, Dynamic, Engine, EvalAltResult, Map, Position, Scope};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;
pub use values::bytes_of;
use values::reply_from;
pub(crate) use values::{request_fields, request_map};

/// How one `handle(req)` call ended.
pub enum HandlerResult {
    Replied(Reply),
    /// The script threw or hit a runtime error; the message names file, line and column.
    Failed(String),
    /// `--handler-timeout` passed (or a hard stop).
    TimedOut,
}

/// One version of the script, and which fields of `req` its `handle` reads.
struct Compiled {
    ast: AST,
    req_use: ReqUse,
}

impl Compiled {
    fn new(ast: AST) -> Arc<Compiled> {
        let req_use = req_use(&ast);
        Arc::new(Compiled { ast, req_use })
    }
}

/// The compiled script and the engine that runs it.
pub struct ScriptHost {
    engine: Engine,
    path: PathBuf,
    /// Replaced whole on reload; a running call keeps the `Arc` it started with.
    script: RwLock<Arc<Compiled>>,
    pub runtime: Arc<Runtime>,
    /// Functions besides `handle` that the flags need (`on_change`, `on_tick`): a script, or a
    /// reload, without them is refused.
    required: Vec<&'static str>,
    /// Bytes one handler may add once its `req` is built (see [`budget::handler_budget`]).
    memory_budget: usize,
}

impl ScriptHost {
    /// Compiles the script at `path`; the error names file, line and column.
    pub fn load(path: &Path, runtime: Arc<Runtime>) -> Result<ScriptHost, ScriptError> {
        ScriptHost::load_requiring(path, runtime, Vec::new())
    }

    /// As [`load`](Self::load), and the script must also define each of `required` with one
    /// parameter, now and after every reload.
    pub fn load_requiring(
        path: &Path,
        runtime: Arc<Runtime>,
        required: Vec<&'static str>,
    ) -> Result<ScriptHost, ScriptError> {
        let engine = build_engine(&runtime);
        let ast = compile(&engine, path, &required)?;
        let limits = &runtime.limits;
        let memory_budget =
            budget::handler_budget(limits.max_request_bytes, limits.max_output_bytes);
        Ok(ScriptHost {
            engine,
            path: path.to_owned(),
            script: RwLock::new(Compiled::new(ast)),
            runtime,
            required,
            memory_budget,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Compiles the file again; on success new requests use it, on failure nothing changes.
    pub fn reload(&self) -> Result<(), ScriptError> {
        let ast = compile(&self.engine, &self.path, &self.required)?;
        *self.script.write().unwrap_or_else(|p| p.into_inner()) = Compiled::new(ast);
        Ok(())
    }

    fn current(&self) -> Arc<Compiled> {
        self.script
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `handle(req)` on this thread. Returns the result and the exit codes of the
    /// commands it ran.
    pub fn handle(
        &self,
        request: &Request,
        client: Box<dyn ClientSink>,
    ) -> (HandlerResult, Vec<i32>) {
        let deadline = Instant::now() + self.runtime.limits.handler_timeout;
        let context = HandlerContext::new(request.id, deadline, client);
        // `req` is built for the version that runs it (with the fields it reads), before the
        // budget starts counting: the budget is for what the script makes.
        let script = self.current();
        let req = Dynamic::from_map(request_fields(request, &script.req_use));
        self.call(&script, "handle", req, context)
    }

    /// Runs `function(argument)` for a local trigger (`on_change`, `on_tick`) under the same
    /// deadline and API as `handle`; `label` and `id` tag its log lines.
    pub fn call_trigger(
        &self,
        function: &str,
        argument: Map,
        label: &'static str,
        id: u64,
        client: Box<dyn ClientSink>,
    ) -> (HandlerResult, Vec<i32>) {
        let deadline = Instant::now() + self.runtime.limits.handler_timeout;
        let context = HandlerContext::new(id, deadline, client).labelled(label);
        self.call(
            &self.current(),
            function,
            Dynamic::from_map(argument),
            context,
        )
    }

    fn call(
        &self,
        script: &Compiled,
        function: &str,
        argument: Dynamic,
        context: HandlerContext,
    ) -> (HandlerResult, Vec<i32>) {
        let _guard = context::enter(context.with_memory_budget(self.memory_budget));
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(false);
        let result = self.engine.call_fn_with_options::<Dynamic>(
            options,
            &mut Scope::new(),
            &script.ast,
            function,
            (argument,),
        );
        let exit_codes = context::take_exit_codes();
        let result = match result {
            Ok(value) => match reply_from(value) {
                Ok(reply) => HandlerResult::Replied(reply),
                Err(message) => {
                    HandlerResult::Failed(format!("{}: {message}", self.path.display()))
                }
            },
            Err(error) if stopped_for_memory(&error) => HandlerResult::Failed(format!(
                "{}: {OVER_BUDGET} ({} MiB)",
                self.path.display(),
                self.memory_budget >> 20
            )),
            Err(error) if matches!(*error, EvalAltResult::ErrorTerminated(..)) => {
                HandlerResult::TimedOut
            }
            Err(error) => HandlerResult::Failed(describe(&self.path, &error)),
        };
        (result, exit_codes)
    }
}

/// Script limits. Memory is bounded by sizes (see [`limits`]); time by the handler deadline
/// (checked in `on_progress`), with the operation count as a backstop for a huge
/// `--handler-timeout`.
const MAX_OPERATIONS: u64 = 2_000_000_000;
const MAX_CALL_LEVELS: usize = 64;
const MAX_EXPR_DEPTH: usize = 64;
/// How many operations pass between two looks at the clock.
const DEADLINE_CHECK_EVERY: u64 = 256;
/// How many operations pass between two looks at the memory count (a thread-local read).
const MEMORY_CHECK_EVERY: u64 = 16;
const OVER_BUDGET: &str = "handler went over its memory budget";

/// The stack of every thread that runs a script (workers, `call`).
///
/// What recurses, and how deep it can go: script function calls (at most [`MAX_CALL_LEVELS`]),
/// expressions (at most [`MAX_EXPR_DEPTH`] per function), and walks over one value (clone,
/// drop, size checks, printing, comparing, JSON), at most [`limits::MAX_NESTING`] plus the
/// levels one expression can add after its variables were read (about 20 under
/// [`MAX_EXPR_DEPTH`]). The test `defects_script::deepest_value_at_deepest_call_fits` runs all
/// three at their limits at once; in a debug build (frames several times larger than release
/// ones) it needs more than 2 MiB and fits in 4 MiB. 32 MiB leaves 8x room for paths it does
/// not take; only the pages a script touches become resident.
pub const SCRIPT_STACK_BYTES: usize = 32 << 20;

/// Runs `f` on a thread with [`SCRIPT_STACK_BYTES`] of stack, for callers (`call`) whose own
/// thread's stack is whatever `ulimit -s` says.
pub fn on_script_stack<T: Send>(f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("script".into())
            .stack_size(SCRIPT_STACK_BYTES)
            .spawn_scoped(scope, f)?;
        thread
            .join()
            .map_err(|_| std::io::Error::other("the script thread panicked"))
    })
}

/// The engine every script runs in: the standard library, the limits, and the functions of
/// SPEC §5 and §10 bound to `runtime`. Frozen by the caller once built.
pub(crate) fn build_engine(runtime: &Arc<Runtime>) -> Engine {
    // `new_raw`: no module resolver, so `import` cannot read files from disk.
    let mut engine = Engine::new_raw();
    engine.register_global_module(StandardPackage::new().as_shared_module());
    engine.disable_symbol("eval");
    // `this` is the one way to reach a value again and again without reading a variable, so
    // without it every value that grows passes through the depth check in `on_var`.
    engine.disable_symbol("this");
    let sizes = limits::SizeLimits::of(&runtime.limits);
    engine
        .set_max_operations(MAX_OPERATIONS)
        .set_max_call_levels(MAX_CALL_LEVELS)
        .set_max_expr_depths(MAX_EXPR_DEPTH, MAX_EXPR_DEPTH)
        .set_max_string_size(sizes.string_bytes)
        .set_max_array_size(sizes.array_items)
        .set_max_map_size(limits::MAX_COLLECTION_ITEMS);
    limits::register_depth_check(&mut engine);
    limits::register_checked_builtins(&mut engine, sizes.string_bytes);
    let progress_runtime = runtime.clone();
    engine.on_progress(move |operations| {
        if operations % MEMORY_CHECK_EVERY == 0 && context::over_budget() {
            return Some(OVER_BUDGET.into());
        }
        if operations % DEADLINE_CHECK_EVERY != 0 {
            return None;
        }
        let stop = progress_runtime.abort.load(Ordering::Relaxed) || context::deadline_passed();
        stop.then(|| "handler timed out".into())
    });
    engine.on_print(|text| context::log(log::Level::Info, text));
    engine.on_debug(|text, _source, position| {
        context::log(log::Level::Debug, &format!("{position:?}: {text}"))
    });
    api::register(&mut engine, runtime.clone());
    webhook::register(&mut engine, sizes.string_bytes);
    engine
}

/// Whether `on_progress` stopped the handler for its memory budget (not its deadline).
fn stopped_for_memory(error: &EvalAltResult) -> bool {
    match error {
        EvalAltResult::ErrorTerminated(token, _) => token
            .read_lock::<rhai::ImmutableString>()
            .is_some_and(|t| t.as_str() == OVER_BUDGET),
        _ => false,
    }
}

/// `FILE:LINE:COL: message`, from the innermost error that has a position.
pub fn describe(path: &Path, error: &EvalAltResult) -> String {
    let position = innermost_position(error);
    let mut message = error.to_string().replace('\n', "; ");
    for pos in [error.position(), position] {
        message = message.replace(&format!(" ({pos})"), "");
    }
    located(path, position, &message)
}

/// `FILE:LINE:COL: message`, with as much of the position as is known.
pub(crate) fn located(path: &Path, position: Position, message: &str) -> String {
    match (position.line(), position.position()) {
        (Some(line), Some(col)) => format!("{}:{line}:{col}: {message}", path.display()),
        (Some(line), None) => format!("{}:{line}: {message}", path.display()),
        _ => format!("{}: {message}", path.display()),
    }
}

/// Limit errors (stack overflow, sizes) carry no position themselves; the function calls
/// around them do, and the innermost of those is the closest place to point at.
fn innermost_position(error: &EvalAltResult) -> Position {
    let mut best = error.position();
    let mut current = error;
    while let EvalAltResult::ErrorInFunctionCall(.., inner, _) = current {
        if !inner.position().is_none() {
            best = inner.position();
        }
        current = inner;
    }
    best
}

/// The start of a script-raised position-free error, for the registered functions.
pub(crate) fn script_error(message: impl Into<String>) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(message.into()),
        Position::NONE,
    ))
}
