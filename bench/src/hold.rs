//! `--mode hold`: open many idle connections and keep them, to measure the server's memory
//! per connection. Nothing is sent, so the server holds each one until its read timeout.

use std::io::{self, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use crate::args::Args;

/// Connecting back to back outruns a server's accept loop and overflows its listen backlog,
/// and each dropped SYN costs a one-second retransmit; a short pause keeps the queue short.
const PACE: Duration = Duration::from_micros(100);

pub fn run(args: &Args) -> io::Result<()> {
    let mut held = Vec::with_capacity(args.clients);
    let mut failed = 0;
    for _ in 0..args.clients {
        match TcpStream::connect_timeout(&args.addr, args.timeout) {
            Ok(stream) => held.push(stream),
            Err(_) => failed += 1,
        }
        thread::sleep(PACE);
    }
    // The bench script waits for this line, then reads the server's RSS.
    println!("held={} errors={failed}", held.len());
    io::stdout().flush()?;
    thread::sleep(args.duration);
    Ok(())
}
