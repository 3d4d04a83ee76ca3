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
