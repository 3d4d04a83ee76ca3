//! Seeing one running command through: its pipes pumped with `poll` (stdin written, output
//! captured or streamed), its deadline enforced with SIGTERM then SIGKILL to the group, and
//! its exit status read once it has ended.

use super::spawn::Spawned;
use super::*;
use rustix::process::{WaitOptions, WaitStatus, waitpid};

/// The pipes of a running child and what has come out of them.
pub(super) struct Pipes {
    stdin: Option<File>,
    stdin_written: usize,
    stdout: Option<File>,
    stderr: Option<File>,
    /// One read buffer per thread (`take_chunk`), not one zeroed 16 KiB array per read.
    chunk: Vec<u8>,
}

/// Where a command stands on the way to its deadline.
#[derive(Clone, Copy)]
pub(super) enum Phase {
    Running,
    Terminating { kill_at: Instant },
    Killed,
}

/// Sends SIGTERM at the deadline and SIGKILL after the grace, each once.
pub(super) fn advance(
    phase: Phase,
    pgid: i32,
    term_at: Instant,
    now: Instant,
    outcome: &mut Outcome,
) -> Phase {
    match phase {
        Phase::Running if now >= term_at => {
            signal_group(pgid, Signal::TERM);
            outcome.timed_out = true;
            Phase::Terminating {
                kill_at: now + KILL_GRACE,
            }
        }
        Phase::Terminating { kill_at } if now >= kill_at => {
            signal_group(pgid, Signal::KILL);
            Phase::Killed
        }
        phase => phase,
    }
}

/// Sees the child through to its exit and reaps it. The second value is why it did not exec,
/// when it did not: known only now, as the child reports it from its side of the clone.
pub(super) fn supervise(
    child: Spawned,
    spec: &CommandSpec,
    mut sink: OutputSink<'_>,
    started: Instant,
) -> (Outcome, Option<io::Error>) {
    let Spawned {
        pid,
        pidfd,
        stdin,
        stdout,
        stderr,
        launch,
    } = child;
    let pgid = pid.as_raw_nonzero().get();
    let mut pipes = Pipes {
        stdin,
        stdin_written: 0,
        stdout: Some(stdout),
        stderr: Some(stderr),
        chunk: take_chunk(),
    };
    let mut outcome = Outcome::default();
    let mut term_at = started + spec.timeout;
    let mut phase = Phase::Running;
    let mut exited_at = None;
    let mut status = None;
    // With a pidfd, `wait4` is asked only once the pidfd says the command has exited: one
    // system call less per wake-up of this loop (a few per command).
    let mut may_have_exited = pidfd.is_none();
    loop {
        let now = Instant::now();
        if spec.stop_requested() {
            term_at = term_at.min(now);
        }
        if exited_at.is_none() {
            phase = advance(phase, pgid, term_at, now, &mut outcome);
            if may_have_exited {
                status = try_reap(pid);
                exited_at = status.map(|_| now);
            }
        }
        let wake_at = match (exited_at, phase) {
            (Some(exited), _) if pipes.stdout.is_none() && pipes.stderr.is_none() => exited,
            (Some(exited), _) => exited + PIPE_GRACE,
            (None, Phase::Running) => term_at,
            (None, Phase::Terminating { kill_at }) => kill_at,
            (None, Phase::Killed) => now + KILL_GRACE,
        };
        if exited_at.is_some() && now >= wake_at {
            break;
        }
        let live_pidfd = pidfd.as_ref().filter(|_| exited_at.is_none());
        let pidfd_ready = pump(
            &mut pipes,
            live_pidfd,
            spec,
            &mut sink,
            &mut outcome,
            wake_at.saturating_duration_since(now),
        );
        may_have_exited = pidfd_ready || pidfd.is_none();
    }
    outcome.code = exit_code(status.or_else(|| reap(pid)));
    let not_started = launch.reaped();
    CHUNK.set(pipes.chunk);
    if outcome.timed_out {
        kill_stragglers(pgid, phase);
    }
    (outcome, not_started)
}

/// A timed-out group can outlive its leader: the shell dies of SIGTERM while what it started
/// ignores it. Those get the rest of the grace, then SIGKILL, as the leader would have.
/// Called after the leader is reaped, so "the group exists" means stragglers are left.
pub(super) fn kill_stragglers(pgid: i32, phase: Phase) {
    let Some(pid) = Pid::from_raw(pgid) else {
        return;
    };
    if let Phase::Terminating { kill_at } = phase {
        while test_kill_process_group(pid).is_ok() && Instant::now() < kill_at {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    signal_group(pgid, Signal::KILL);
}

thread_local! {
    /// The read buffer of the command this thread supervises, kept between commands.
    static CHUNK: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The thread's read buffer: 16 KiB, allocated and zeroed once per thread, not per command.
fn take_chunk() -> Vec<u8> {
    let mut chunk = CHUNK.take();
    chunk.resize(16 * 1024, 0);
    chunk
}

/// The command's status if it has exited (and is reaped now), else `None`.
fn try_reap(pid: Pid) -> Option<WaitStatus> {
    match waitpid(Some(pid), WaitOptions::NOHANG) {
        Ok(Some((_, status))) => Some(status),
        _ => None,
    }
}

/// Waits for the command to exit. `None`: it cannot be waited for (already reaped elsewhere).
fn reap(pid: Pid) -> Option<WaitStatus> {
    loop {
        match waitpid(Some(pid), WaitOptions::empty()) {
            Err(rustix::io::Errno::INTR) => continue,
            Ok(Some((_, status))) => return Some(status),
            _ => return None,
        }
    }
}

/// The exit code, 128+N for a death by signal N, 128 when unknown.
pub(super) fn exit_code(status: Option<WaitStatus>) -> i32 {
    status
        .and_then(|status| {
            status
                .exit_status()
                .or_else(|| status.terminating_signal().map(|s| 128 + s))
        })
        .unwrap_or(128)
}

/// Waits up to `wait` for any pipe or the pidfd, then moves what is ready. True when the
/// pidfd is readable: the command has exited.
pub(super) fn pump(
    pipes: &mut Pipes,
    pidfd: Option<&OwnedFd>,
    spec: &CommandSpec,
    sink: &mut OutputSink<'_>,
    outcome: &mut Outcome,
    wait: Duration,
) -> bool {
    let in_flags = PollFlags::IN | PollFlags::HUP | PollFlags::ERR;
    let mut fds = Vec::with_capacity(4);
    if let Some(stdout) = &pipes.stdout {
        fds.push(PollFd::new(stdout, in_flags));
    }
    if let Some(stderr) = &pipes.stderr {
        fds.push(PollFd::new(stderr, in_flags));
    }
    if let Some(stdin) = &pipes.stdin {
        fds.push(PollFd::new(stdin, PollFlags::OUT));
    }
    if let Some(pidfd) = pidfd {
        fds.push(PollFd::new(pidfd, PollFlags::IN));
    }
    // Poll wakes at least every 50ms so a missing pidfd, or a stop request, only costs latency.
    let wait = if pidfd.is_some() && spec.stop.is_none() {
        wait
    } else {
        wait.min(Duration::from_millis(50))
    };
    let timeout = Timespec::try_from(wait).ok();
    if poll(&mut fds, timeout.as_ref()).is_err() {
        return false; // EINTR: the caller loops
    }
    let ready: Vec<bool> = fds.iter().map(|fd| !fd.revents().is_empty()).collect();
    drop(fds);
    let exited = pidfd.is_some() && ready.last() == Some(&true);
    let mut ready = ready.into_iter();
    if pipes.stdout.is_some() && ready.next() == Some(true) {
        read_pipe(
            &mut pipes.stdout,
            &mut pipes.chunk,
            sink,
            &mut outcome.stdout,
            &mut outcome.truncated,
        );
    }
    if pipes.stderr.is_some() && ready.next() == Some(true) {
        read_pipe(
            &mut pipes.stderr,
            &mut pipes.chunk,
            sink,
            &mut outcome.stderr,
            &mut outcome.truncated,
        );
    }
    if pipes.stdin.is_some() && ready.next() == Some(true) {
        write_stdin(pipes, &spec.stdin);
    }
    exited
}

pub(super) fn read_pipe<R: Read>(
    pipe: &mut Option<R>,
    chunk: &mut [u8],
    sink: &mut OutputSink<'_>,
    kept: &mut Vec<u8>,
    truncated: &mut bool,
) {
    let Some(reader) = pipe else { return };
    match reader.read(chunk) {
        Ok(0) | Err(_) => *pipe = None,
        Ok(n) => match sink {
            OutputSink::Stream(forward) | OutputSink::Keep(forward) => forward(&chunk[..n]),
            OutputSink::Capture(cap) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
                *truncated |= n > room;
            }
        },
    }
}

pub(super) fn write_stdin(pipes: &mut Pipes, data: &[u8]) {
    let Some(stdin) = &mut pipes.stdin else {
        return;
    };
    let end = data.len().min(pipes.stdin_written + PIPE_BUF);
    match stdin.write(&data[pipes.stdin_written..end]) {
        Ok(n) => pipes.stdin_written += n,
        // EPIPE: the command does not want the rest of its input.
        Err(_) => pipes.stdin_written = data.len(),
    }
    if pipes.stdin_written >= data.len() {
        pipes.stdin = None; // closing it gives the command EOF
    }
}
