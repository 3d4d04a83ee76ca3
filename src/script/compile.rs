//! Compiling a script file: reading it, the syntax, the functions the server calls, and calls
//! to functions nobody defines. Every failure is a [`ScriptError`] that names the file.

use super::{describe, diagnose, located};
use rhai::{AST, Engine, EvalAltResult};
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a script cannot be used. Each message names the file (and the line, where there is one).
#[derive(Debug)]
pub enum ScriptError {
    /// The file could not be read.
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// It does not compile; the message shows where, with the line.
    Syntax(String),
    /// A function the server calls is not defined with one parameter.
    Missing {
        path: PathBuf,
        function: &'static str,
        /// The flag that makes the server call it (`None`: `handle`, always called).
        called_by: Option<&'static str>,
    },
    /// Calls to functions neither the script nor the engine define, one per line.
    UnknownCalls(String),
}

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScriptError::Read { path, error } => {
                write!(f, "{}: reading the script: {error}", path.display())
            }
            ScriptError::Syntax(report) | ScriptError::UnknownCalls(report) => f.write_str(report),
            ScriptError::Missing {
                path,
                function,
                called_by: None,
            } => write!(
                f,
                "{}: no function {function}(req) with one parameter",
                path.display()
            ),
            ScriptError::Missing {
                path,
                function,
                called_by: Some(flag),
            } => write!(
                f,
                "{}: no function {function}(..) with one parameter, which {flag} calls",
                path.display()
            ),
        }
    }
}

impl std::error::Error for ScriptError {}

/// Compiles the handler at `path`: syntax, `handle(req)`, the functions the trigger flags
/// need (`required`), and calls to unknown functions.
pub(crate) fn compile(
    engine: &Engine,
    path: &Path,
    required: &[&'static str],
) -> Result<AST, ScriptError> {
    let source = read_source(path)?;
    let ast = compile_source(engine, path, &source)?;
    let has = |name: &str| {
        ast.iter_functions()
            .any(|f| f.name == name && f.params.len() == 1)
    };
    if !has("handle") {
        return Err(ScriptError::Missing {
            path: path.to_owned(),
            function: "handle",
            called_by: None,
        });
    }
    if let Some(&missing) = required.iter().find(|name| !has(name)) {
        let flag = if missing == "on_tick" {
            "--every/--cron"
        } else {
            "--watch"
        };
        return Err(ScriptError::Missing {
            path: path.to_owned(),
            function: missing,
            called_by: Some(flag),
        });
    }
    check_calls(engine, path, &source, &ast, None)?;
    Ok(ast)
}

/// The text of a script file; a `#!` first line is blanked (not removed, so lines keep their
/// numbers), as Rhai does for files.
pub(crate) fn read_source(path: &Path) -> Result<String, ScriptError> {
    let mut source = std::fs::read_to_string(path).map_err(|error| ScriptError::Read {
        path: path.to_owned(),
        error,
    })?;
    if source.starts_with("#!") {
        let end = source.find('\n').unwrap_or(source.len());
        source.replace_range(..end, "");
    }
    Ok(source)
}

/// Compiles `source`; a syntax error names `path`, line and column, and shows the line.
pub(crate) fn compile_source(
    engine: &Engine,
    path: &Path,
    source: &str,
) -> Result<AST, ScriptError> {
    engine.compile(source).map_err(|e| {
        let error = EvalAltResult::from(e);
        ScriptError::Syntax(diagnose::with_excerpt(
            describe(path, &error),
            source,
            error.position(),
        ))
    })
}

/// Fails on calls in `ast` to functions that neither it, `also` (the handler a test file is
/// compiled with) nor the engine define, each shown with its line.
pub(crate) fn check_calls(
    engine: &Engine,
    path: &Path,
    source: &str,
    ast: &AST,
    also: Option<&AST>,
) -> Result<(), ScriptError> {
    let unknown = diagnose::unknown_calls(engine, ast, also);
    if unknown.is_empty() {
        return Ok(());
    }
    let reports: Vec<String> = unknown
        .iter()
        .map(|call| {
            let message = located(path, call.position, &call.message());
            diagnose::with_excerpt(message, source, call.position)
        })
        .collect();
    Err(ScriptError::UnknownCalls(reports.join("\n")))
}
