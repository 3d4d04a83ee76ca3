//! `ct-bench startup RUNS CMD ARGS...`: time from spawning a server to the first line on its
//! stdout (command-trigger's `--print-addr` prints the bound address once it listens).

use std::io::{self, BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn run(runs: usize, command: &[String]) -> io::Result<()> {
    let (program, rest) = command
        .split_first()
        .ok_or_else(|| io::Error::other("no command"))?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        times.push(once(program, rest)?);
    }
    times.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "startup_ms_median={:.2} min={:.2} max={:.2} runs={runs}",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1])
    );
    Ok(())
}

fn once(program: &str, args: &[String]) -> io::Result<Duration> {
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no stdout"))?;
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    let elapsed = started.elapsed();
    // Killed at once: only the time to listening is measured, not the shutdown.
    child.kill()?;
    child.wait()?;
    match read? {
        0 => Err(io::Error::other(format!(
            "{program} exited without printing an address"
        ))),
        _ => Ok(elapsed),
    }
}
