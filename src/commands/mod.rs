//! Running one command for a script: its own process group, stdin from the script, output
//! captured up to a cap (or streamed), a deadline enforced with SIGTERM then SIGKILL to the
//! whole group, and the child always reaped.
//!
//! One thread waits on the child's pipes and its pidfd with `poll`, so a command that prints
//! gigabytes, never reads stdin, or ignores SIGTERM cannot stall or outlive its deadline.

mod spawn;
mod supervise;
use spawn::Plan;
use supervise::supervise;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// After SIGTERM, how long a command gets before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// After the command exits, how long its pipes may stay open (held by something it left in the
/// background) before we stop reading them.
const PIPE_GRACE: Duration = Duration::from_millis(100);
/// A pipe write of at most this many bytes never blocks once `poll` says writable.
const PIPE_BUF: usize = 4096;

/// What to run, as the script described it.
#[derive(Clone, Debug, Default)]
pub struct CommandSpec {
    pub program: Program,
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    pub cwd: Option<String>,
    pub stdin: Vec<u8>,
    pub timeout: Duration,
    /// Set by someone else to stop the command now, as at its timeout (SIGTERM, then SIGKILL
    /// after the grace): `cancel()` and `if_running: "replace"` of background jobs.
    pub stop: Option<Arc<AtomicBool>>,
}

impl CommandSpec {
    fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }
}

#[derive(Clone, Debug)]
pub enum Program {
    /// Executed directly: no shell ever sees the words.
    Argv(Vec<String>),
    /// Given to `/bin/sh -c`.
    Shell(String),
}

impl Default for Program {
    fn default() -> Self {
        Program::Argv(Vec::new())
    }
}

/// How a command ended.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Exit code; 128+N when killed by signal N; 126/127 when it could not be started.
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
    pub timed_out: bool,
    pub duration: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.code == 0 && !self.timed_out
    }

    /// The command never ran: its lock stayed taken past its timeout.
    pub fn lock_timed_out(lock: &str, waited: Duration) -> Outcome {
        Outcome {
            code: 124,
            stderr: format!("timed out waiting for lock '{lock}'").into_bytes(),
            timed_out: true,
            duration: waited,
            ..Outcome::default()
        }
    }

    fn not_started(program: &str, error: &io::Error, started: Instant) -> Outcome {
        let code = match error.kind() {
            io::ErrorKind::NotFound => 127,
            _ => 126,
        };
        Outcome {
            code,
            stderr: format!("{program}: {error}").into_bytes(),
            duration: started.elapsed(),
            ..Outcome::default()
        }
    }
}

/// The process groups of every running command, so shutdown can kill what is left.
#[derive(Default)]
pub struct ProcessGroups {
    running: Mutex<HashSet<i32>>,
}

impl ProcessGroups {
    fn insert(&self, pgid: i32) {
        self.lock().insert(pgid);
    }

    fn remove(&self, pgid: i32) {
        self.lock().remove(&pgid);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends `signal` to every running command's group.
    pub fn signal_all(&self, signal: Signal) {
        for &pgid in self.lock().iter() {
            signal_group(pgid, signal);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        // A panic elsewhere must not stop shutdown from killing commands.
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn signal_group(pgid: i32, signal: Signal) {
    if let Some(pid) = Pid::from_raw(pgid) {
        // ESRCH: the group is already gone, which is what we wanted.
        let _ = kill_process_group(pid, signal);
    }
}

/// Where a command's output goes.
pub enum OutputSink<'a> {
    /// Kept in the outcome, each stream capped at this many bytes.
    Capture(usize),
    /// Handed over as it arrives (stdout and stderr interleaved), not kept: `opts.stream`.
    Stream(&'a mut dyn FnMut(&[u8])),
    /// Handed over as it arrives, like `Stream`, to a background job's kept output: the
    /// script did not ask for streaming, and a dry run or a test says so.
    Keep(&'a mut dyn FnMut(&[u8])),
}

/// Runs `spec` to completion. Never fails: a command that cannot start is an outcome too.
pub fn run(spec: &CommandSpec, sink: OutputSink<'_>, groups: &ProcessGroups) -> Outcome {
    let started = Instant::now();
    let plan = match build(spec) {
        Ok(plan) => plan,
        Err(reason) => return Outcome::not_started("command", &reason, started),
    };
    let child = match plan.spawn() {
        Ok(child) => child,
        Err(error) => return Outcome::not_started(&display_name(&spec.program), &error, started),
    };
    let pgid = child.pid.as_raw_nonzero().get();
    groups.insert(pgid);
    let (mut outcome, not_started) = supervise(child, spec, sink, started);
    groups.remove(pgid);
    if let Some(error) = not_started {
        return Outcome::not_started(&display_name(&spec.program), &error, started);
    }
    outcome.duration = started.elapsed();
    outcome
}

fn display_name(program: &Program) -> String {
    match program {
        Program::Argv(argv) => argv.first().cloned().unwrap_or_default(),
        Program::Shell(_) => "/bin/sh".into(),
    }
}

/// Checks one extra environment variable. A name that is empty or holds `=` or NUL cannot be
/// passed as itself (the child would see a different variable, or none); a value with NUL
/// cannot be passed at all.
pub fn check_env(name: &str, value: &str) -> Result<(), String> {
    let shown = name.escape_debug();
    if name.is_empty() {
        return Err("env: a variable name is empty".into());
    }
    if name.contains('=') {
        return Err(format!("env: variable name \"{shown}\" holds '='"));
    }
    if name.contains('\0') {
        return Err(format!("env: variable name \"{shown}\" holds a NUL byte"));
    }
    if value.contains('\0') {
        return Err(format!("env: the value of {shown} holds a NUL byte"));
    }
    Ok(())
}

fn build(spec: &CommandSpec) -> io::Result<Plan> {
    if let Some(reason) = spec.env.iter().find_map(|(k, v)| check_env(k, v).err()) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, reason));
    }
    Plan::new(spec)
}

/// The search path `execvp` uses when the environment has no `PATH`.
#[cfg(target_env = "musl")]
const DEFAULT_PATH: &str = "/usr/local/bin:/bin:/usr/bin";
#[cfg(not(target_env = "musl"))]
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// The descriptor a command's stdin is duplicated from when the script gives it no input:
/// `None` when the server's own stdin is `/dev/null` already (a container, a service, the
/// bench), so the child simply inherits it; else `/dev/null`, opened once. `None` too when
/// that open failed: the child then keeps the server's stdin.
fn dev_null_fd() -> Option<RawFd> {
    static DEV_NULL: OnceLock<Option<OwnedFd>> = OnceLock::new();
    static STDIN_IS_DEV_NULL: OnceLock<bool> = OnceLock::new();
    if *STDIN_IS_DEV_NULL.get_or_init(stdin_is_dev_null) {
        return None;
    }
    DEV_NULL
        .get_or_init(|| {
            let file = File::open("/dev/null").ok()?;
            spawn::above_stdio(file.into()).ok()
        })
        .as_ref()
        .map(|fd| fd.as_raw_fd())
}

/// Whether descriptor 0 is open on the `/dev/null` device (checked once: nothing in the server
/// changes its stdin).
fn stdin_is_dev_null() -> bool {
    use rustix::fs::{FileType, fstat, stat};
    let (Ok(ours), Ok(null)) = (fstat(std::io::stdin()), stat("/dev/null")) else {
        return false;
    };
    let is_char =
        |st: &rustix::fs::Stat| FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice;
    is_char(&ours) && is_char(&null) && ours.st_rdev == null.st_rdev
}

/// Quotes `s` for `/bin/sh`: single quotes, with each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    let mut quoted = String::with_capacity(s.len() + 2);
    quoted.push('\'');
    for c in s.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_shell(line: &str, timeout_ms: u64) -> Outcome {
        let spec = CommandSpec {
            program: Program::Shell(line.into()),
            timeout: Duration::from_millis(timeout_ms),
            ..CommandSpec::default()
        };
        run(&spec, OutputSink::Capture(8), &ProcessGroups::default())
    }

    #[test]
    fn captures_output_and_exit_code_with_a_cap() {
        let outcome = run_shell("printf 0123456789; echo err >&2; exit 3", 5000);
        assert_eq!((outcome.code, outcome.truncated), (3, true));
        assert_eq!(outcome.stdout, b"01234567");
        assert_eq!(outcome.stderr, b"err\n");
    }

    #[test]
    fn timeout_kills_the_group_even_when_term_is_ignored() {
        let outcome = run_shell("trap '' TERM; sleep 30 & wait", 100);
        assert!(outcome.timed_out);
        assert_eq!(outcome.code, 128 + 9);
        assert!(outcome.duration < Duration::from_secs(5));
    }

    #[test]
    fn a_command_reads_end_of_file_on_stdin_by_default() {
        let outcome = run_shell("cat; echo done", 5000);
        assert_eq!(
            (outcome.code, outcome.stdout.as_slice()),
            (0, &b"done\n"[..])
        );
        assert!(!outcome.timed_out);
    }

    #[test]
    fn missing_program_is_127() {
        let spec = argv_spec(&["/nonexistent/x"], &[], false);
        let outcome = run(&spec, OutputSink::Capture(64), &ProcessGroups::default());
        assert_eq!(
            (
                outcome.code,
                String::from_utf8_lossy(&outcome.stderr).as_ref()
            ),
            (
                127,
                "/nonexistent/x: No such file or directory (os error 2)"
            )
        );
    }

    fn argv_spec(argv: &[&str], env: &[(&str, &str)], clear_env: bool) -> CommandSpec {
        CommandSpec {
            program: Program::Argv(argv.iter().map(|w| w.to_string()).collect()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            clear_env,
            timeout: Duration::from_secs(5),
            ..CommandSpec::default()
        }
    }

    #[test]
    fn a_relative_path_entry_is_searched_from_the_commands_cwd() {
        let dir = std::env::temp_dir().join(format!("ct-path-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        // A link, not a written script: a sibling test's child could still hold a script's
        // write descriptor when this one runs it, which the kernel refuses (ETXTBSY).
        let _ = std::fs::remove_file(dir.join("bin/hello"));
        std::os::unix::fs::symlink("/bin/echo", dir.join("bin/hello")).unwrap();
        let mut spec = argv_spec(
            &["hello", "hi from bin/hello"],
            &[("PATH", "/nonexistent:bin")],
            false,
        );
        spec.cwd = Some(dir.to_string_lossy().into_owned());
        let outcome = run(&spec, OutputSink::Capture(64), &ProcessGroups::default());
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            (outcome.code, outcome.stdout.as_slice()),
            (0, &b"hi from bin/hello\n"[..])
        );
    }

    /// The spawning thread goes on while the child searches `PATH` (no vfork wait): what the
    /// child reads (its plan, the candidates, its stack) must outlive it (freed at the clone,
    /// 196-199 of these 200 failed), and its failed `execve`s must not go through the C
    /// library's `errno`, which is that thread's. Eight threads, twenty missing places first.
    #[test]
    fn concurrent_path_searches_each_find_their_program() {
        let missing = (0..20).map(|i| format!("/nonexistent/{i}"));
        let path = missing.chain(["/bin".into()]).collect::<Vec<_>>().join(":");
        let searches: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let spec = argv_spec(&["echo", "found"], &[("PATH", &path)], false);
                    (0..25)
                        .map(|_| run(&spec, OutputSink::Capture(64), &ProcessGroups::default()))
                        .filter(|outcome| (outcome.code, &outcome.stdout[..]) != (0, b"found\n"))
                        .count()
                })
            })
            .collect();
        let failed: usize = searches.into_iter().map(|s| s.join().unwrap()).sum();
        assert_eq!(failed, 0);
    }

    #[test]
    fn a_nul_byte_or_a_missing_cwd_fails_to_start() {
        let spec = argv_spec(&["/bin/echo", "a\0b"], &[], false);
        let outcome = run(&spec, OutputSink::Capture(64), &ProcessGroups::default());
        assert_eq!(
            outcome.code,
            126,
            "{:?}",
            String::from_utf8_lossy(&outcome.stderr)
        );
        let mut spec = argv_spec(&["/bin/true"], &[], false);
        spec.cwd = Some("/nonexistent/dir".into());
        let outcome = run(&spec, OutputSink::Capture(64), &ProcessGroups::default());
        assert_eq!(outcome.code, 127);
        assert!(String::from_utf8_lossy(&outcome.stderr).contains("No such file"));
    }

    #[test]
    fn the_environment_is_ours_with_the_scripts_variables_over_it() {
        let spec = argv_spec(
            &["/bin/sh", "-c", "echo $HOME:$CT_X"],
            &[("CT_X", "1")],
            false,
        );
        let outcome = run(&spec, OutputSink::Capture(256), &ProcessGroups::default());
        let home = std::env::var("HOME").unwrap_or_default();
        assert_eq!(outcome.stdout, format!("{home}:1\n").into_bytes());
        let spec = argv_spec(&["/usr/bin/env"], &[("CT_X", "1"), ("CT_X", "2")], true);
        let outcome = run(&spec, OutputSink::Capture(256), &ProcessGroups::default());
        assert_eq!(outcome.stdout, b"CT_X=2\n");
    }

    #[test]
    fn a_program_found_on_the_childs_path_keeps_its_bare_argv0() {
        let spec = argv_spec(
            &["sh", "-c", "echo $0"],
            &[("PATH", "/nonexistent:/bin")],
            false,
        );
        let outcome = run(&spec, OutputSink::Capture(64), &ProcessGroups::default());
        assert_eq!((outcome.code, outcome.stdout.as_slice()), (0, &b"sh\n"[..]));
        let spec = argv_spec(&["no-such-program-here"], &[("PATH", "/bin")], false);
        let outcome = run(&spec, OutputSink::Capture(64), &ProcessGroups::default());
        assert_eq!(outcome.code, 127);
    }

    #[test]
    fn quoting_survives_the_shell() {
        let nasty = "a'b; echo $HOME `id` \"q\"";
        let outcome = run_shell(&format!("printf %s {}", shell_quote(nasty)), 5000);
        let spec_out = String::from_utf8_lossy(&outcome.stdout).into_owned();
        assert!(nasty.starts_with(&spec_out), "{spec_out}");
    }
}
