//! The one seam between scripts and the processes they run. Everything that runs a command
//! (`exec`, `run`, a background job) goes through a [`Runner`] held by the
//! [`Runtime`](crate::runtime::Runtime): [`Processes`] really runs it; [`Recorder`] writes it
//! down and answers from mocks, for `command-trigger test` and `call --dry-run`. Nothing else
//! in the API knows which one it has.

use crate::commands::{CommandSpec, Outcome, OutputSink, Program};
use crate::runtime::Runtime;
use std::sync::{Mutex, MutexGuard};

/// Runs commands and background work for scripts.
pub trait Runner: Send + Sync {
    /// Runs `spec` to its end (or its deadline), first waiting for `lock` if it names one,
    /// and says how it ended.
    fn run(
        &self,
        runtime: &Runtime,
        spec: &CommandSpec,
        lock: Option<&str>,
        sink: OutputSink<'_>,
    ) -> Outcome;

    /// Runs a background job's body. Real processes get a thread each; the recorder runs the
    /// body at once, so a test sees a plain `start` in `commands()` and its end immediately.
    fn spawn_job(&self, name: String, body: Box<dyn FnOnce() + Send>) -> std::io::Result<()>;

    /// Starts the jobs timer (debounce ends, retry backoff, sweeps), which loops until the
    /// runtime is gone. Under a virtual clock no timer runs: time moves only by `advance`,
    /// which starts what became due itself, so a test never races a timer thread.
    fn spawn_timer(&self, name: String, body: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
        spawn_thread(name, body)
    }
}

/// A named thread for `body`, detached: the job or timer ends on its own. Started by a worker
/// that may be bound to one CPU (`--pin-workers`), it takes every CPU back first.
fn spawn_thread(name: String, body: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            crate::placement::free_current_thread();
            body()
        })
        .map(drop)
}

/// Real child processes, each in its own process group (see [`crate::commands::run`]).
pub struct Processes;

impl Runner for Processes {
    fn run(
        &self,
        runtime: &Runtime,
        spec: &CommandSpec,
        lock: Option<&str>,
        sink: OutputSink<'_>,
    ) -> Outcome {
        runtime.run_locked(spec, lock, sink)
    }

    fn spawn_job(&self, name: String, body: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
        spawn_thread(name, body)
    }
}

/// A command as a test (or a dry run) sees it: what would have run, with which options.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub spec: CommandSpec,
    /// `opts.lock`, recorded but never taken: a test runs one command at a time.
    pub lock: Option<String>,
    /// `opts.stream`: the output would have gone to the client as it came.
    pub stream: bool,
}

/// How a mock picks the commands it answers.
#[derive(Clone, Debug)]
pub enum Pattern {
    /// An `exec` (or array `start`) whose argv begins with these words.
    ArgvPrefix(Vec<String>),
    /// A `run` (or string `start`) whose command line contains this text.
    Contains(String),
}

impl Pattern {
    fn matches(&self, program: &Program) -> bool {
        match (self, program) {
            (Pattern::ArgvPrefix(prefix), Program::Argv(argv)) => argv.starts_with(prefix),
            (Pattern::Contains(text), Program::Shell(line)) => line.contains(text.as_str()),
            _ => false,
        }
    }
}

/// How a dry run writes one recorded command (one line, no newline).
type Format = dyn Fn(&Recorded) -> String + Send + Sync;

/// Records every command instead of running it; answers from the latest matching mock, or
/// with code 0 and empty output.
#[derive(Default)]
pub struct Recorder {
    book: Mutex<Book>,
    /// `call --dry-run`: also print each command on stderr as it comes, one line each. A dry
    /// run keeps real time, so its timer runs; a test's recorder (no echo) has none.
    echo: Option<Box<Format>>,
}

#[derive(Default)]
struct Book {
    mocks: Vec<(Pattern, Outcome)>,
    seen: Vec<Recorded>,
}

impl Recorder {
    /// A recorder that also prints each command to stderr, as `format` writes it.
    pub fn echoing(format: impl Fn(&Recorded) -> String + Send + Sync + 'static) -> Recorder {
        Recorder {
            book: Mutex::new(Book::default()),
            echo: Some(Box::new(format)),
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a mock; a later mock wins over an earlier one that matches the same command.
    pub fn mock(&self, pattern: Pattern, outcome: Outcome) {
        self.book().mocks.push((pattern, outcome));
    }

    /// Every command so far, in the order they would have run.
    pub fn seen(&self) -> Vec<Recorded> {
        self.book().seen.clone()
    }
}

impl Runner for Recorder {
    fn run(
        &self,
        _runtime: &Runtime,
        spec: &CommandSpec,
        lock: Option<&str>,
        sink: OutputSink<'_>,
    ) -> Outcome {
        let recorded = Recorded {
            spec: spec.clone(),
            lock: lock.map(str::to_owned),
            stream: matches!(sink, OutputSink::Stream(_)),
        };
        if let Some(format) = &self.echo {
            eprintln!("{}", format(&recorded));
        }
        let outcome = {
            let mut book = self.book();
            book.seen.push(recorded);
            book.mocks
                .iter()
                .rev()
                .find(|(pattern, _)| pattern.matches(&spec.program))
                .map(|(_, outcome)| outcome.clone())
                .unwrap_or_default()
        };
        // A streamed command's output would have gone to the client (or a job's kept output)
        // as it came.
        if let OutputSink::Stream(forward) | OutputSink::Keep(forward) = sink {
            forward(&outcome.stdout);
            forward(&outcome.stderr);
            return Outcome {
                stdout: Vec::new(),
                stderr: Vec::new(),
                ..outcome
            };
        }
        outcome
    }

    fn spawn_job(&self, _name: String, body: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
        body();
        Ok(())
    }

    fn spawn_timer(&self, name: String, body: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
        match self.echo {
            Some(_) => spawn_thread(name, body),
            None => Ok(()),
        }
    }
}
