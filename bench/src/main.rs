//! `ct-bench`: the load generator behind BENCHMARKS.md. It drives any line-oriented TCP server
//! (command-trigger, the netcat loop, socat, ncat, tcpserver, redis PING) or an HTTP/1.0 one
//! (webhook) and prints one `key=value` line: requests/s, errors by kind, p50/p99 latency.
//!
//! # Layout
//! - [`args`]: the command line; [`load`]: one mio event loop driving its share of the clients;
//!   [`stats`]: counters, latencies and the report line; [`hold`]: idle connections for RSS;
//!   [`startup`]: time from exec to listening; [`spawn`]: the spawn ceiling W2 is held to;
//!   [`spawn_server`]: the same spawns behind TCP, nothing else; [`tls`]: the client side of
//!   TLS for the event loops.

mod args;
mod hold;
mod load;
mod spawn;
mod spawn_server;
mod startup;
mod stats;
mod tls;

use std::process::ExitCode;
use std::thread;
use std::time::Instant;

use args::{Args, Mode};
use stats::{Report, Stats};

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().is_some_and(|a| a == "startup") {
        return startup_main(&argv[1..]);
    }
    if argv.first().is_some_and(|a| a == "spawn") {
        return spawn_main(&argv[1..]);
    }
    if argv.first().is_some_and(|a| a == "spawn-server") {
        return spawn_server_main(&argv[1..]);
    }
    let args = match args::parse(argv.into_iter()) {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("ct-bench: {message}");
            }
            eprint!("{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    let outcome = match args.mode {
        Mode::Hold => hold::run(&args),
        _ => drive(&args).map(|stats| println!("{} cpu_s={:.2}", Report(stats), own_cpu_seconds())),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ct-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Splits the clients over `--threads` event loops that share one start and one deadline.
fn drive(args: &Args) -> std::io::Result<Stats> {
    let start = Instant::now();
    let deadline = start + args.duration;
    thread::scope(|scope| {
        let loops: Vec<_> = (0..args.threads)
            .map(|i| {
                let clients = share(args.clients, args.threads, i);
                let quota = args
                    .requests
                    .map(|n| share(n as usize, args.threads, i) as u64);
                scope.spawn(move || load::Driver::new(args, clients, start)?.run(deadline, quota))
            })
            .collect();
        let mut total = Stats::default();
        for handle in loops {
            let stats = handle
                .join()
                .map_err(|_| std::io::Error::other("a loop panicked"))??;
            total = total.merge(stats);
        }
        Ok(total)
    })
}

/// The part of `total` that loop `i` of `parts` takes (the first ones take the remainder).
fn share(total: usize, parts: usize, i: usize) -> usize {
    total / parts + usize::from(i < total % parts)
}

fn startup_main(argv: &[String]) -> ExitCode {
    let runs = argv
        .first()
        .and_then(|r| r.parse::<usize>().ok())
        .filter(|&r| r > 0);
    let (Some(runs), Some(command)) = (runs, argv.get(1..).filter(|c| !c.is_empty())) else {
        eprintln!("usage: ct-bench startup RUNS CMD [ARGS...]");
        return ExitCode::from(2);
    };
    match startup::run(runs, command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ct-bench: startup: {e}");
            ExitCode::FAILURE
        }
    }
}

fn spawn_main(argv: &[String]) -> ExitCode {
    let threads = argv.first().and_then(|t| t.parse::<usize>().ok());
    let seconds = argv.get(1).and_then(|d| match d.strip_suffix("ms") {
        Some(ms) => ms.parse::<f64>().ok().map(|ms| ms / 1000.0),
        None => d.trim_end_matches('s').parse::<f64>().ok(),
    });
    let pin = match argv.get(3).map(String::as_str) {
        None => Some(false),
        Some("--pin") => Some(true),
        Some(_) => None,
    };
    let (Some(threads @ 1..), Some(seconds), Some(program), Some(pin)) =
        (threads, seconds, argv.get(2), pin)
    else {
        eprintln!("usage: ct-bench spawn THREADS DURATION PROGRAM [--pin] (DURATION: 5s, 500ms)");
        return ExitCode::from(2);
    };
    match spawn::run(
        threads,
        std::time::Duration::from_secs_f64(seconds),
        program,
        pin,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ct-bench: spawn: {e}");
            ExitCode::FAILURE
        }
    }
}

fn spawn_server_main(argv: &[String]) -> ExitCode {
    let threads = argv.first().and_then(|t| t.parse::<usize>().ok());
    let port = argv.get(1).and_then(|p| p.parse::<u16>().ok());
    let (Some(threads @ 1..), Some(port), Some(program), None) =
        (threads, port, argv.get(2), argv.get(3))
    else {
        eprintln!("usage: ct-bench spawn-server THREADS PORT PROGRAM");
        return ExitCode::from(2);
    };
    match spawn_server::run(threads, port, program) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ct-bench: spawn-server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// User plus system CPU time of this process, from /proc/self/stat (Linux's USER_HZ is 100):
/// it shows whether the generator had CPU to spare, i.e. was not the bottleneck.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)` one: state is field 3, utime 14 and stime 15.
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}
