//! Starting a command: `clone(CLONE_VM | CLONE_PIDFD)` on a stack kept per thread, and in the
//! child only what this command needs before `execve`.
//!
//! This is what glibc's `posix_spawn` (under `std::process::Command`) does, minus what a
//! general library cannot avoid and W2 paid for with ~9% of its throughput (BENCHMARKS.md):
//! a fresh child stack mapped and unmapped per spawn (the unmap shoots down TLB entries on
//! every core running a worker), a child that asks the kernel about all 64 signals because it
//! cannot know which ones have handlers, two `getrlimit` per redirection, and one more system
//! call for the pidfd. Here the handled signals are learned once, the stack is reused, and the
//! pidfd comes with the clone.
//!
//! Nor does this thread wait for the child to exec (`CLONE_VFORK`, kept only under valgrind,
//! which runs no other clone): it goes on to close the child's ends of the pipes and wait for
//! output while the child execs, which saves a sleep and a wake-up per command (BENCHMARKS.md,
//! sixth session). The child shares our memory until `execve` while this thread runs on, so:
//! - everything it reads is prepared before the clone and kept, with its stack, in a `Launch`
//!   that lives until the child is reaped;
//! - it makes its system calls itself (`syscalls`), never through the C library, whose
//!   failures would write `errno`, and that is this thread's `errno`, in use by this thread;
//! - it must not allocate, lock or unwind, and reports a failure through one atomic the parent
//!   reads once it has reaped the child.

use super::{CommandSpec, DEFAULT_PATH, Program};
use rustix::pipe::{PipeFlags, pipe_with};
use rustix::process::Pid;
use std::cell::Cell;
use std::ffi::{CString, OsString, c_char, c_int, c_void};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};
use syscalls::{Sysno, syscall};

/// The child's stack. It makes a handful of system calls before `execve`; glibc's `posix_spawn`
/// gives the same work 32 KiB plus the size of argv, which this child never copies.
const CHILD_STACK: usize = 64 * 1024;

/// A command ready to start: every string already NUL-terminated, the program's places to be
/// tried in order (execvp's search, done by the child, so a relative `PATH` entry is taken
/// from the command's own `cwd`).
pub(super) struct Plan {
    candidates: Vec<CString>,
    argv: Vec<CString>,
    /// `None`: the server's own environment, passed as it is.
    env: Option<Vec<CString>>,
    cwd: Option<CString>,
    pipe_stdin: bool,
}

/// A started command and our ends of its pipes.
pub(super) struct Spawned {
    pub pid: Pid,
    /// `None` only on kernels before 5.2; the supervisor then polls for the exit.
    pub pidfd: Option<OwnedFd>,
    pub stdin: Option<File>,
    pub stdout: File,
    pub stderr: File,
    /// Given back with `Launch::reaped` once the child is reaped.
    pub launch: Launch,
}

/// What a started child may still be reading: until it is reaped, nothing in here is freed.
pub(super) struct Launch {
    /// `None` once `reaped` has freed it.
    memory: Option<LaunchMemory>,
}

struct LaunchMemory {
    /// Boxed: the child holds its address, so it must not move with `Spawned`.
    child_plan: Box<ChildPlan>,
    _pointers: [Vec<*const c_char>; 3],
    _strings: Plan,
    stack: ChildStack,
}

impl Launch {
    /// Frees what the child read, gives its stack back to the thread, and says why the child
    /// did not exec, when it did not. Only once the child is reaped: dead, it reads nothing
    /// more, and its store of the error came before its exit.
    pub(super) fn reaped(mut self) -> Option<io::Error> {
        let memory = self.memory.take()?;
        let errno = memory.child_plan.error.load(Ordering::Acquire);
        STACK.set(Some(memory.stack));
        (errno != 0).then(|| io::Error::from_raw_os_error(errno))
    }
}

impl Drop for Launch {
    /// Dropped without `reaped` (a panic while supervising, say): leaked, never freed under a
    /// child that may not have exec'd yet.
    fn drop(&mut self) {
        std::mem::forget(self.memory.take());
    }
}

impl Plan {
    /// Fails (as the spawn would) on a NUL byte in an argument, the `cwd` or the program.
    pub(super) fn new(spec: &CommandSpec) -> io::Result<Plan> {
        let (program, argv): (&str, Vec<&str>) = match &spec.program {
            Program::Argv(argv) => match argv.first() {
                Some(program) if !program.is_empty() => {
                    (program, argv.iter().map(String::as_str).collect())
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "empty program name",
                    ));
                }
            },
            Program::Shell(line) => ("/bin/sh", vec!["/bin/sh", "-c", line]),
        };
        Ok(Plan {
            candidates: search(program, spec)
                .into_iter()
                .map(c_string)
                .collect::<io::Result<_>>()?,
            argv: argv.into_iter().map(c_string).collect::<io::Result<_>>()?,
            env: environment(spec)?,
            cwd: spec.cwd.as_deref().map(c_string).transpose()?,
            pipe_stdin: !spec.stdin.is_empty(),
        })
    }

    /// Starts the command; the plan goes with it, as the child reads its strings.
    pub(super) fn spawn(self) -> io::Result<Spawned> {
        let (stdout, stdout_child) = cloexec_pipe()?;
        let (stderr, stderr_child) = cloexec_pipe()?;
        let (stdin, stdin_child) = match self.pipe_stdin {
            true => {
                cloexec_pipe().map(|(read_end, write_end)| (Some(write_end), Some(read_end)))?
            }
            false => (None, None),
        };
        let stdin_from = match &stdin_child {
            Some(read_end) => Some(read_end.as_raw_fd()),
            None => super::dev_null_fd(),
        };
        let candidates = pointers(&self.candidates);
        let argv = pointers(&self.argv);
        let env = self.env.as_deref().map(pointers);
        let child_plan = Box::new(ChildPlan {
            candidates: candidates.as_ptr(),
            argv: argv.as_ptr(),
            envp: env.as_ref().map_or_else(environ, |env| env.as_ptr()),
            cwd: self
                .cwd
                .as_ref()
                .map_or(std::ptr::null(), |cwd| cwd.as_ptr()),
            redirects: [
                (stdin_from.unwrap_or(0), 0),
                (stdout_child.as_raw_fd(), 1),
                (stderr_child.as_raw_fd(), 2),
            ],
            reset_signals: handled_signals(),
            error: AtomicI32::new(0),
        });
        let mut stack = match STACK.take() {
            Some(stack) => stack,
            None => ChildStack::map()?,
        };
        // No child, nothing reads them: dropped on failure.
        let (pid, pidfd) = clone_child(&child_plan, &mut stack)?;
        let launch = Launch {
            memory: Some(LaunchMemory {
                child_plan,
                _pointers: [candidates, argv, env.unwrap_or_default()],
                _strings: self,
                stack,
            }),
        };
        drop((stdout_child, stderr_child, stdin_child));
        let Some(pid) = Pid::from_raw(pid) else {
            return Err(io::Error::other("clone returned no child"));
        };
        // The child does the same first thing: whichever of us comes first, its group exists
        // from here on, for a timeout or a shutdown to signal. Fails once the child has exec'd.
        let _ = rustix::process::setpgid(Some(pid), Some(pid));
        Ok(Spawned {
            pid,
            pidfd,
            stdin: stdin.map(File::from),
            stdout: File::from(stdout),
            stderr: File::from(stderr),
            launch,
        })
    }
}

fn c_string(s: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "nul byte found in provided data",
        )
    })
}

/// A NULL-terminated array of pointers into `strings`, which must outlive it.
fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    let mut pointers: Vec<_> = strings.iter().map(|s| s.as_ptr()).collect();
    pointers.push(std::ptr::null());
    pointers
}

/// Where `execvp` would look for `program`: itself when it holds a `/`, else each entry of the
/// command's `PATH` (an empty entry is the current directory). The command's `PATH` is the one
/// in `env`, else ours, else the C library's default.
fn search(program: &str, spec: &CommandSpec) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_string()];
    }
    let path = match spec.env.iter().rev().find(|(name, _)| name == "PATH") {
        Some((_, path)) => path.clone(),
        None if spec.clear_env => DEFAULT_PATH.to_string(),
        None => our_path().to_string(),
    };
    path.split(':')
        .map(|dir| match dir {
            "" => program.to_string(),
            dir => format!("{}/{program}", dir.trim_end_matches('/')),
        })
        .collect()
}

/// Our own `PATH`, read once: nothing changes the server's environment after start-up.
fn our_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string()))
}

/// The command's environment when it differs from ours: ours (unless cleared) with the
/// script's variables set over it, in order.
fn environment(spec: &CommandSpec) -> io::Result<Option<Vec<CString>>> {
    if spec.env.is_empty() && !spec.clear_env {
        return Ok(None);
    }
    let mut vars: Vec<(OsString, OsString)> = match spec.clear_env {
        true => Vec::new(),
        false => std::env::vars_os().collect(),
    };
    for (name, value) in &spec.env {
        vars.retain(|(existing, _)| existing.as_encoded_bytes() != name.as_bytes());
        vars.push((name.into(), value.into()));
    }
    vars.into_iter()
        .map(|(name, value)| {
            let mut entry = name.into_vec();
            entry.push(b'=');
            entry.extend(value.into_vec());
            c_string(entry)
        })
        .collect::<io::Result<_>>()
        .map(Some)
}

/// A pipe whose both ends close on `execve`, neither of them on descriptors 0–2 (a server
/// started with those closed would otherwise hand the child a pipe end as its own stdout,
/// which the `dup2`s would then close under it).
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read_end, write_end) = pipe_with(PipeFlags::CLOEXEC)?;
    Ok((above_stdio(read_end)?, above_stdio(write_end)?))
}

pub(super) fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    match fd.as_raw_fd() {
        0..=2 => Ok(rustix::io::fcntl_dupfd_cloexec(&fd, 3)?),
        _ => Ok(fd),
    }
}

/// The signals with a handler in this process, plus SIGPIPE (which Rust's runtime ignores and
/// a command must get back at its default, as `std` does). Learned once, at the first spawn:
/// every handler is installed at start-up, before any command runs.
fn handled_signals() -> &'static [c_int] {
    static HANDLED: OnceLock<Vec<c_int>> = OnceLock::new();
    HANDLED.get_or_init(|| {
        let mut handled = vec![libc::SIGPIPE];
        for signal in 1..=libc::SIGRTMAX() {
            // SAFETY: a query only (no new action); `current` is a valid out pointer.
            let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
            let queried = unsafe { libc::sigaction(signal, std::ptr::null(), &mut current) };
            let has_handler =
                current.sa_sigaction != libc::SIG_DFL && current.sa_sigaction != libc::SIG_IGN;
            if queried == 0 && has_handler && signal != libc::SIGPIPE {
                handled.push(signal);
            }
        }
        handled
    })
}

/// What the child reads between the clone and `execve`: plain pointers into strings the
/// `Launch` keeps alive until the child is reaped.
struct ChildPlan {
    /// NULL-terminated, as `argv`.
    candidates: *const *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: *const c_char,
    /// `(from, to)`, left alone when `from == to` (stdin inherited).
    redirects: [(RawFd, RawFd); 3],
    reset_signals: &'static [c_int],
    /// The errno that stopped the child, 0 while none did.
    error: AtomicI32,
}

fn environ() -> *const *const c_char {
    unsafe extern "C" {
        static environ: *const *const c_char;
    }
    // SAFETY: nothing in the server changes the environment once threads run (app.rs removes
    // the token variables before the first one starts).
    unsafe { environ }
}

/// The stack the child runs on until `execve`, mapped once per thread. Its pages become
/// resident only as the child touches them (a few KiB; a zeroed buffer would have made all of
/// it resident in every worker that ever ran a command), and a guard page below it turns an
/// overflow into a fault instead of a write over our memory.
struct ChildStack {
    base: *mut c_void,
    guard: usize,
}

impl ChildStack {
    fn map() -> io::Result<ChildStack> {
        use rustix::mm::{MapFlags, MprotectFlags, ProtFlags, mmap_anonymous, mprotect};
        // SAFETY: sysconf has no preconditions.
        let guard = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let read_write = ProtFlags::READ | ProtFlags::WRITE;
        // SAFETY: a new private anonymous mapping, placed by the kernel: it aliases nothing.
        let base = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                guard + CHILD_STACK,
                read_write,
                MapFlags::PRIVATE,
            )
        }?;
        let stack = ChildStack { base, guard };
        // SAFETY: the first page of the mapping just made, which nothing uses.
        unsafe { mprotect(base, guard, MprotectFlags::empty()) }?;
        Ok(stack)
    }

    /// Where the child's stack starts: it grows down from the end, page-aligned (so 16-byte
    /// aligned, as the ABI wants).
    fn top(&self) -> *mut c_void {
        self.base.wrapping_byte_add(self.guard + CHILD_STACK)
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the whole mapping made by `map`, unused once its thread ends.
        let _ = unsafe { rustix::mm::munmap(self.base, self.guard + CHILD_STACK) };
    }
}

thread_local! {
    /// The thread's child stack while no child runs on it (a `Launch` holds it meanwhile).
    static STACK: Cell<Option<ChildStack>> = const { Cell::new(None) };
}

/// Clones the child on `stack` and returns its pid and (kernel ≥ 5.2) its pidfd, without
/// waiting for it to exec. All signals stay blocked around the clone, so none runs a handler
/// of ours on the child's stack before it has reset them.
fn clone_child(plan: &ChildPlan, stack: &mut ChildStack) -> io::Result<(i32, Option<OwnedFd>)> {
    let arg = plan as *const ChildPlan as *mut c_void;
    let _blocked = SignalsBlocked::new(plan.reset_signals);
    let wait_for_exec = if under_valgrind() {
        libc::CLONE_VFORK
    } else {
        0
    };
    let flags = libc::CLONE_VM | wait_for_exec | libc::SIGCHLD;
    let mut pidfd: c_int = -1;
    // SAFETY: `stack` is borrowed mutably here and then held by the `Launch` until the child
    // is reaped, so nothing else runs on it; so is `plan`. The three trailing arguments are
    // parent_tid (where CLONE_PIDFD puts the pidfd), tls, child_tid.
    let clone = |flags: c_int, pidfd: *mut c_int| unsafe {
        libc::clone(
            child_main,
            stack.top(),
            flags,
            arg,
            pidfd,
            std::ptr::null_mut::<c_void>(),
            std::ptr::null_mut::<c_int>(),
        )
    };
    let mut pid = clone(flags | libc::CLONE_PIDFD, &mut pidfd);
    if pid < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        pidfd = -1;
        pid = clone(flags, std::ptr::null_mut());
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel gave us this descriptor and nothing else owns it.
    let pidfd =
        (pidfd >= 0).then(|| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd) });
    Ok((pid, pidfd))
}

/// Valgrind runs only the clones it knows (fork-, vfork- and thread-like) and ends the whole
/// process at any other, so under it (`bench/profile.sh ... callgrind`) the worker waits for
/// the exec, as `posix_spawn` does. It names itself in the `LD_PRELOAD` it gives us.
fn under_valgrind() -> bool {
    static UNDER_VALGRIND: OnceLock<bool> = OnceLock::new();
    *UNDER_VALGRIND.get_or_init(|| {
        std::env::var_os("LD_PRELOAD").is_some_and(|preload| {
            preload
                .as_encoded_bytes()
                .windows(9)
                .any(|w| w == b"vgpreload")
        })
    })
}

/// Every signal with a handler blocked on this thread until dropped.
struct SignalsBlocked {
    previous: libc::sigset_t,
}

impl SignalsBlocked {
    /// SIGCHLD stays open unless it has a handler (`handled`), as it has none here. A blocked
    /// SIGCHLD is queued instead of discarded, and this block lasts until the worker runs again
    /// after the vfork: on a busy machine a short command has exited by then. Its SIGCHLD was
    /// then delivered to whichever thread did not block it, for nothing: the loop's
    /// `epoll_wait` returned EINTR, the reload thread woke (~1,300 of them a second at W2).
    fn new(handled: &[c_int]) -> SignalsBlocked {
        // SAFETY: both sets are valid for the calls; a failure leaves the mask as it was.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            if !handled.contains(&libc::SIGCHLD) {
                libc::sigdelset(&mut all, libc::SIGCHLD);
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
            SignalsBlocked { previous }
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

/// The child, from the clone to `execve`. Only direct system calls on data the parent
/// prepared; on failure it leaves the errno in the plan and exits 127.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildPlan` a `Launch` keeps alive and unmoved until we are reaped.
    let plan = unsafe { &*(arg as *const ChildPlan) };
    // SAFETY: as above; `exec` only reads the plan and makes system calls.
    let errno = unsafe { exec(plan) };
    plan.error.store(errno, Ordering::Release);
    // SAFETY: ends the child without running anything of the parent's (no atexit, no flush);
    // it cannot fail, so it writes no errno.
    unsafe { libc::_exit(127) }
}

/// Returns only on failure, with the errno to report. Every call is a system call made here
/// (`syscalls`), none through the C library: its failures would write `errno`, which is the
/// parent thread's, in use by it now.
///
/// # Safety
/// Every pointer in `plan` must be valid: NUL-terminated strings, NULL-terminated arrays.
unsafe fn exec(plan: &ChildPlan) -> c_int {
    // SAFETY: as for this function.
    if let Err(errno) = unsafe { set_up(plan) } {
        return errno.into_raw();
    }
    // As execvp: a place that does not exist (or is not a directory) is passed over, one
    // we may not execute is remembered; any other failure (ENOEXEC, E2BIG...) is final.
    let mut failure = libc::ENOENT;
    let mut candidate = plan.candidates;
    // SAFETY: NULL-terminated arrays of NUL-terminated strings, kept alive by the `Launch`.
    unsafe {
        while !(*candidate).is_null() {
            let errno = match syscall!(Sysno::execve, *candidate, plan.argv, plan.envp) {
                Ok(_) => libc::EIO, // execve returns only on failure
                Err(errno) => errno.into_raw(),
            };
            match errno {
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                libc::EACCES => failure = libc::EACCES,
                other => return other,
            }
            candidate = candidate.add(1);
        }
    }
    failure
}

/// The child's own process group, its descriptors, directory and signals, as the command
/// gets them.
///
/// # Safety
/// As `exec`.
unsafe fn set_up(plan: &ChildPlan) -> Result<(), syscalls::Errno> {
    // The kernel's `struct sigaction` with every field zero: SIG_DFL, no flags, no mask.
    let default_action = [0u64; 4];
    let no_signals = 0u64;
    let sigset_size = std::mem::size_of::<u64>();
    // SAFETY: each call's arguments are what the kernel documents: descriptors, the plan's
    // string, and the two buffers above, alive for the calls.
    unsafe {
        syscall!(Sysno::setpgid, 0, 0)?;
        for &(from, to) in &plan.redirects {
            // dup3, as not every architecture has dup2; the same for two different descriptors.
            if from != to {
                syscall!(Sysno::dup3, from, to, 0)?;
            }
        }
        if !plan.cwd.is_null() {
            syscall!(Sysno::chdir, plan.cwd)?;
        }
        for &signal in plan.reset_signals {
            let _ = syscall!(
                Sysno::rt_sigaction,
                signal,
                default_action.as_ptr(),
                0,
                sigset_size
            );
        }
        let _ = syscall!(
            Sysno::rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const no_signals,
            0,
            sigset_size
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked_now(signal: c_int) -> bool {
        // SAFETY: a query of this thread's mask into a valid set.
        unsafe {
            let mut current: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut current);
            libc::sigismember(&current, signal) == 1
        }
    }

    /// A SIGCHLD blocked at a command's exit is queued, then delivered to another thread of the
    /// server for nothing (`SignalsBlocked::new`); blocked only when it has a handler.
    #[test]
    fn sigchld_stays_open_around_the_clone_unless_it_has_a_handler() {
        {
            let _blocked = SignalsBlocked::new(&[libc::SIGTERM]);
            assert!(blocked_now(libc::SIGTERM));
            assert!(!blocked_now(libc::SIGCHLD));
        }
        assert!(!blocked_now(libc::SIGTERM));
        let _blocked = SignalsBlocked::new(&[libc::SIGCHLD]);
        assert!(blocked_now(libc::SIGCHLD));
    }
}
