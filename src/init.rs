//! Running as PID 1 (a container without an init): a tiny built-in init, in the manner of tini.
//!
//! Orphaned grandchildren are re-parented to PID 1, which must reap them or they stay zombies.
//! A `waitpid(-1)` in the server itself would steal the exit statuses that workers wait for, so
//! PID 1 does not serve: it starts the server again as its only child, forwards signals to it,
//! reaps everything, and exits with the server's status. The server's own commands remain the
//! server's children and are reaped by it alone.

use rustix::process::{Pid, Signal, WaitOptions, kill_process, wait};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;
use std::io;
use std::process::Command;

/// Set in the server started by the init, so it does not become an init in turn.
const CHILD_MARK: &str = "COMMAND_TRIGGER_INIT_CHILD";
/// `CT_INIT=0` (or `false`, `no`, `off`) turns the init off (for tests, and for images that
/// bring their own); it reads booleans like every other `CT_*` variable.
const SWITCH: &str = "CT_INIT";

/// When this process is PID 1, runs the init and returns the exit status to end with.
/// A `CT_INIT` that is not a boolean ends the program with status 2, as a bad flag would.
pub fn run_if_pid1() -> Option<u8> {
    let wanted = match wanted() {
        Ok(wanted) => wanted,
        Err(message) => {
            eprintln!("command-trigger: {message}");
            return Some(2);
        }
    };
    if std::process::id() != 1 || std::env::var_os(CHILD_MARK).is_some() || !wanted {
        return None;
    }
    Some(match supervise() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("command-trigger init: {e}");
            1
        }
    })
}

/// Whether `CT_INIT` asks for the init: unset or empty means yes, as clap treats an empty
/// variable as absent.
fn wanted() -> Result<bool, String> {
    match std::env::var(SWITCH) {
        Err(_) => Ok(true),
        Ok(text) if text.is_empty() => Ok(true),
        Ok(text) => crate::cli::boolish(&text).ok_or_else(|| {
            format!("{SWITCH}='{text}': expected 1/0, true/false, yes/no or on/off")
        }),
    }
}

fn supervise() -> io::Result<u8> {
    // Installed before the child exists, so no signal slips through unforwarded.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2])?;
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(CHILD_MARK, "1")
        .spawn()?;
    let server = Pid::from_child(&child);
    std::thread::Builder::new()
        .name("forward-signals".into())
        .spawn(move || {
            for number in signals.forever() {
                if let Some(signal) = Signal::from_named_raw(number) {
                    // ESRCH: the server is already gone; its exit ends us too.
                    let _ = kill_process(server, signal);
                }
            }
        })?;
    loop {
        match wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) if pid == server => {
                let code = status
                    .exit_status()
                    .or_else(|| status.terminating_signal().map(|s| 128 + s));
                return Ok(code.unwrap_or(1) as u8);
            }
            Ok(_) => {} // an orphan, reaped
            Err(e) if e == rustix::io::Errno::INTR => {}
            Err(e) => return Err(io::Error::other(format!("waiting for children: {e}"))),
        }
    }
}
