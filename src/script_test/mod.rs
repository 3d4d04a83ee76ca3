//! `command-trigger test` (SPEC §14): unit tests for a handler, written in Rhai, run with none
//! of its commands run. Each test file is compiled together with the handler; every
//! `fn test_*()` runs in file order with a fresh runtime whose [`Recorder`] answers commands
//! from mocks and whose clock is virtual. Also the recorder behind `call --dry-run`.

mod helpers;

pub use helpers::{TestState, command_json, command_map};

use crate::config::Limits;
use crate::error::{Fatal, Outcome};
use crate::runner::Recorder;
use crate::runtime::Runtime;
use crate::script::context::{self, ClientSink, HandlerContext};
use crate::script::{self, ScriptError, build_engine};
use crate::state::State;
use rhai::{AST, CallFnOptions, Dynamic, Engine, EvalAltResult, Scope};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What `command-trigger test` was asked to do.
pub struct TestPlan {
    pub handler: PathBuf,
    pub files: Vec<PathBuf>,
    /// Only tests whose (shown) names contain this run.
    pub filter: Option<String>,
    pub limits: Limits,
}

/// A test file compiled with its handler, and the tests it holds in file order.
struct Suite {
    path: PathBuf,
    /// Handler and test file in one AST; the test file's functions win on a clash.
    ast: AST,
    /// Names of the functions the test file defines, to tell which file an error is in.
    own_functions: HashSet<String>,
    tests: Vec<String>,
}

/// Runs the plan, printing one line per test and the summary: a failure when any test
/// failed, a usage error (exit 2) when a script does not compile.
pub fn run(plan: &TestPlan) -> Result<Outcome, Fatal> {
    let suites = load(plan).map_err(Fatal::Script)?;
    let prefix = suites.len() > 1;
    let (mut passed, mut failed) = (0, 0);
    for suite in &suites {
        for test in &suite.tests {
            let name = match prefix {
                true => format!("{}::{test}", file_name(&suite.path)),
                false => test.clone(),
            };
            if plan.filter.as_ref().is_some_and(|f| !name.contains(f)) {
                continue;
            }
            match run_one(plan, suite, test) {
                Ok(()) => {
                    passed += 1;
                    println!("test {name} ... ok");
                }
                Err(failure) => {
                    failed += 1;
                    println!("test {name} ... FAILED: {failure}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(Outcome::failed_if(failed > 0))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Compiles the handler (as `check` would) and each test file with it.
fn load(plan: &TestPlan) -> Result<Vec<Suite>, ScriptError> {
    let server_engine = build_engine(&Runtime::new(plan.limits));
    let handler = script::compile(&server_engine, &plan.handler, &[])?;
    let state = TestState::new(plan.limits.command_timeout);
    let (engine, _runtime) = test_engine(plan.limits, &state);
    plan.files
        .iter()
        .map(|path| load_suite(&engine, &handler, path))
        .collect()
}

fn load_suite(engine: &Engine, handler: &AST, path: &Path) -> Result<Suite, ScriptError> {
    let source = script::read_source(path)?;
    let tests_ast = script::compile_source(engine, path, &source)?;
    script::check_calls(engine, path, &source, &tests_ast, Some(handler))?;
    let own_functions: HashSet<String> = tests_ast
        .iter_functions()
        .map(|f| f.name.to_owned())
        .collect();
    let runnable: HashSet<String> = tests_ast
        .iter_functions()
        .filter(|f| f.name.starts_with("test_") && f.params.is_empty())
        .map(|f| f.name.to_owned())
        .collect();
    let tests = in_file_order(&source, &runnable);
    Ok(Suite {
        path: path.to_owned(),
        ast: handler.merge(&tests_ast),
        own_functions,
        tests,
    })
}

/// The AST keeps functions in no particular order; the source says which came first.
fn in_file_order(source: &str, runnable: &HashSet<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for line in source.lines() {
        let Some(rest) = line.trim_start().strip_prefix("fn ") else {
            continue;
        };
        let name: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if runnable.contains(&name) && seen.insert(name.clone()) {
            order.push(name);
        }
    }
    // A definition the line scan missed (two on one line) still runs, last.
    let mut rest: Vec<String> = runnable.difference(&seen).cloned().collect();
    rest.sort();
    order.extend(rest);
    order
}

/// The server's engine bound to a recording runtime, plus the test helpers.
fn test_engine(limits: Limits, state: &Arc<TestState>) -> (Engine, Arc<Runtime>) {
    let runtime = Runtime::with_seams(
        limits,
        State::in_memory(limits.state_max_keys),
        state.recorder.clone(),
        state.clock.clone(),
    );
    let mut engine = build_engine(&runtime);
    helpers::register(&mut engine, state, &runtime);
    (engine, runtime)
}

/// `write()` output of a test goes nowhere: tests look at what `handle` returns.
struct Discard;

impl ClientSink for Discard {
    fn send(&mut self, _bytes: Vec<u8>) {}
}

/// Runs one test with fresh state, jobs, mocks and clock; the failure says what and where.
fn run_one(plan: &TestPlan, suite: &Suite, test: &str) -> Result<(), String> {
    let state = TestState::new(plan.limits.command_timeout);
    let (engine, _runtime) = test_engine(plan.limits, &state);
    let deadline = Instant::now() + plan.limits.handler_timeout;
    let _guard = context::enter(HandlerContext::new(1, deadline, Box::new(Discard)));
    let options = CallFnOptions::new().eval_ast(false).rewind_scope(false);
    engine
        .call_fn_with_options::<Dynamic>(options, &mut Scope::new(), &suite.ast, test, ())
        .map(drop)
        .map_err(|error| failure(plan, suite, test, &error))
}

/// `MESSAGE at FILE:LINE`, pointing at the innermost place that has a line: the failed
/// `assert` in the test, or the line of the handler that threw.
fn failure(plan: &TestPlan, suite: &Suite, test: &str, error: &EvalAltResult) -> String {
    let mut function = test;
    let mut position = error.position();
    let mut current = error;
    while let EvalAltResult::ErrorInFunctionCall(name, _, inner, _) = current {
        if !inner.position().is_none() {
            function = name;
            position = inner.position();
        }
        current = inner;
    }
    let file = match suite.own_functions.contains(function) {
        true => &suite.path,
        false => &plan.handler,
    };
    let message = match current {
        EvalAltResult::ErrorRuntime(value, _) => value.to_string(),
        EvalAltResult::ErrorTerminated(..) => "timed out (--handler-timeout)".into(),
        other => other
            .to_string()
            .replace(&format!(" ({})", other.position()), ""),
    };
    let message = message.replace('\n', "; ");
    match position.line() {
        Some(line) => format!("{message} at {}:{line}", file.display()),
        None => format!("{message} at {}", file.display()),
    }
}

/// A recorder for `call --dry-run`: commands are written down and answered with code 0 and no
/// output; each goes to stderr as one JSON line as it comes.
pub fn dry_run_recorder(limits: Limits) -> Arc<Recorder> {
    let timeout = limits.command_timeout;
    Arc::new(Recorder::echoing(move |recorded| {
        command_json(recorded, timeout)
    }))
}

/// The names of the functions command-trigger registers (not Rhai's standard library):
/// the server's, and with `testing` also the test helpers.
pub fn registered_names(testing: bool) -> Vec<String> {
    let limits = Limits::default();
    let engine = match testing {
        true => test_engine(limits, &TestState::new(limits.command_timeout)).0,
        false => build_engine(&Runtime::new(limits)),
    };
    let mut names: Vec<String> =
        engine.collect_fn_metadata(None, |info| Some(info.metadata.name.to_string()), false);
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const REFERENCE: &str = include_str!("../../docs/script-api.md");

    /// The `### \`name\`` entries of one `## ` section of the reference.
    fn documented(section: &str) -> BTreeSet<String> {
        let start = REFERENCE
            .find(&format!("\n## {section}\n"))
            .unwrap_or_else(|| panic!("docs/script-api.md has no section '{section}'"));
        let body = &REFERENCE[start + 1..];
        let body = body[3..].find("\n## ").map_or(body, |end| &body[..end + 3]);
        body.lines()
            .filter_map(|l| l.strip_prefix("### `"))
            .filter_map(|l| l.strip_suffix('`'))
            .map(str::to_owned)
            .collect()
    }

    #[track_caller]
    fn compare(section: &str, registered: BTreeSet<String>) {
        let documented = documented(section);
        let missing: Vec<_> = registered.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&registered).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "docs/script-api.md, section '{section}': missing {missing:?}, stale {stale:?}"
        );
    }

    #[test]
    fn the_reference_documents_every_registered_function_and_no_other() {
        let server: BTreeSet<String> = registered_names(false).into_iter().collect();
        let testing: BTreeSet<String> = registered_names(true).into_iter().collect();
        let helpers = testing.difference(&server).cloned().collect();
        compare("Functions a handler can call", server);
        compare("Test helpers", helpers);
    }

    #[test]
    fn tests_are_found_in_file_order() {
        let source = "fn test_b() {}\nfn helper() {}\n  fn test_a() {}\nfn test_c(x) {}\n";
        let runnable = ["test_a", "test_b"].map(String::from).into_iter().collect();
        assert_eq!(in_file_order(source, &runnable), ["test_b", "test_a"]);
    }
}
