//! How a command is started (issue 16): the server clones the child itself, sharing its memory
//! until `execve`. The child must reach `execve` with nothing of the server's left in it (no
//! blocked or ignored signal, no handler of ours run on its stack) whatever the server is going
//! through at that moment.

use crate::util::*;
use rustix::process::{Pid, Signal, kill_process};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The bit of signal N in the masks of /proc/PID/status.
fn bit(signal: u32) -> u64 {
    1 << (signal - 1)
}

fn mask(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(line[field.len()..].trim(), 16).unwrap()
}

#[test]
fn a_command_starts_with_no_signal_blocked_and_sigpipe_at_its_default() {
    let server = Server::start(
        r#"fn handle(req) { exec(["/bin/cat", "/proc/self/status"]).stdout }"#,
        &[],
    );
    let status = server.ask("x");
    assert_eq!(mask(&status, "SigBlk:"), 0, "{status}");
    assert_eq!(
        mask(&status, "SigIgn:") & bit(13),
        0,
        "SIGPIPE ignored: {status}"
    );
    assert_eq!(mask(&status, "SigCgt:"), 0, "{status}");
}

#[test]
fn commands_started_during_a_storm_of_reloads_all_run_and_the_server_stays() {
    let server = Server::start(
        r#"fn handle(req) { exec(["/bin/true"]).code + "\n" }"#,
        &["--workers", "4"],
    );
    let pid = Pid::from_raw(server.child.id() as i32).unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let _ = kill_process(pid, Signal::HUP);
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        let clients: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    (0..40)
                        .map(|_| server.ask("x"))
                        .filter(|reply| reply != "0\n")
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let wrong: Vec<String> = clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        done.store(true, Ordering::Relaxed);
        assert!(wrong.is_empty(), "replies other than 0: {wrong:?}");
    });
    server.log.wait_for("script reloaded (SIGHUP)");
    assert_eq!(server.ask("x"), "0\n");
}

/// A child that cannot exec reports why only once it is reaped (the worker does not wait for
/// the exec): 127 or 126 with the reason, and the worker's next command, on the same child
/// stack, runs as usual. `PATH` places without the program are passed over, as by `execvp`.
#[test]
fn commands_that_cannot_start_say_why_and_the_next_ones_run() {
    let server = Server::start(
        r#"fn handle(req) {
            let argv = if req.payload == "dir" { ["/tmp"] } else { [req.payload] };
            let r = exec(argv, #{ env: #{ PATH: "/nonexistent:/:/bin" } });
            `${r.code} ${r.stderr}|${r.stdout}`
        }"#,
        &["--workers", "1"],
    );
    for _ in 0..3 {
        assert_eq!(
            server.ask("no-such-program"),
            "127 no-such-program: No such file or directory (os error 2)|"
        );
        assert_eq!(
            server.ask("dir"),
            "126 /tmp: Permission denied (os error 13)|"
        );
        assert_eq!(server.ask("true"), "0 |");
        assert_eq!(server.ask("echo"), "0 |\n");
    }
}

/// The CPUs of a `Cpus_allowed_list:` line in /proc/PID/status ("0-3,6" is 0, 1, 2, 3, 6).
fn allowed_cpus(status: &str) -> Vec<usize> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_else(|| panic!("no Cpus_allowed_list in {status}"));
    let mut cpus = Vec::new();
    for range in line.trim().split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        cpus.extend(first.parse::<usize>().unwrap()..=last.parse::<usize>().unwrap());
    }
    cpus
}

/// `--pin-workers` (issue 16, tenth session): a worker's commands run on its CPU only, the
/// first allowed one for the only worker; a background job's thread gets every CPU back, and
/// so does its command. Without the flag a command may run on every CPU the server may.
#[test]
fn pinned_workers_bind_their_commands_to_one_cpu_but_not_background_jobs() {
    let ours = allowed_cpus(&std::fs::read_to_string("/proc/self/status").unwrap());
    let script = r#"
        fn handle(req) {
            start(["sh", "-c", "cat /proc/self/status > " + shell_quote(req.args[0])]);
            exec(["/bin/cat", "/proc/self/status"]).stdout
        }"#;
    let pinned = Server::start(script, &["--pin-workers", "--workers", "1"]);
    pinned.log.wait_for(match ours.len() {
        1 => "one CPU allowed, nothing to bind",
        _ => "workers bound to CPUs",
    });
    let job_out = pinned.scratch.path("job-status");
    let command = allowed_cpus(&pinned.ask(&job_out.display().to_string()));
    match ours.len() {
        1 => assert_eq!(command, ours, "one CPU: nothing to bind"),
        _ => assert_eq!(command, [ours[0]], "allowed to the server: {ours:?}"),
    }
    let job = file_text_within(&job_out, "Cpus_allowed_list", WAIT);
    assert_eq!(allowed_cpus(&job), ours, "the job's command");

    let free = Server::start(script, &["--workers", "1"]);
    let elsewhere = free.scratch.path("job-status");
    assert_eq!(
        allowed_cpus(&free.ask(&elsewhere.display().to_string())),
        ours
    );
}
