//! `command-trigger send`: a client for scripts and CronJobs, with the exit statuses a shell
//! can test (0 reply, 1 `ERR` reply or failure, 2 usage).

use crate::auth::{TokenOrigin, TokenSource};
use crate::cli::SendArgs;
use crate::error::Fatal;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub fn send(args: SendArgs) -> Result<u8, Fatal> {
    crate::config::check_duration(args.timeout, "--timeout", false)?;
    let token = read_token(&args)?;
    let request = build_request(&token, &args)?;
    let addrs: Vec<SocketAddr> = match args.addr.to_socket_addrs() {
        Ok(addrs) => addrs.collect(),
        Err(e) => {
            eprintln!("resolving {}: {e}", args.addr);
            return Ok(1);
        }
    };
    let deadline = Instant::now() + args.timeout;
    if args.all {
        return Ok(send_to_all(&addrs, &request, deadline));
    }
    let mut last_error = format!("{}: no address", args.addr);
    for addr in &addrs {
        match exchange(*addr, &request, deadline) {
            Ok(reply) => {
                print_bytes(&reply);
                return Ok(u8::from(is_failure(&reply)));
            }
            Err(e) => last_error = e,
        }
    }
    eprintln!("{last_error}");
    Ok(1)
}

/// The token to send: from the first `--token-file`, else the first `--token-env`. Both take
/// `serve`'s `[NAME=]VALUE` syntax; the name only matters to a server.
fn read_token(args: &SendArgs) -> Result<String, Fatal> {
    let first = |specs: &[String], flag: &str, origin: fn(&str) -> TokenOrigin| {
        specs
            .first()
            .map(|spec| TokenSource::parse(spec, origin))
            .transpose()
            .map_err(|e| Fatal::Usage(format!("{flag} {e}")))
    };
    let file = first(&args.token_file, "--token-file", |v| {
        TokenOrigin::File(v.into())
    })?;
    let var = first(&args.token_env, "--token-env", |v| {
        TokenOrigin::Env(v.into())
    })?;
    match file.or(var).map(|source| source.origin) {
        Some(TokenOrigin::File(path)) => token_from_file(&path),
        Some(TokenOrigin::Env(var)) => token_from_env(&var),
        None => Err(Fatal::Usage(
            "no token source: give --token-file PATH or --token-env VAR".into(),
        )),
    }
}

fn token_from_file(path: &std::path::Path) -> Result<String, Fatal> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Fatal::Usage(format!("reading token file {}: {e}", path.display())))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(String::from)
        .ok_or_else(|| Fatal::Usage(format!("token file {}: no token in it", path.display())))
}

fn token_from_env(var: &str) -> Result<String, Fatal> {
    let value =
        std::env::var(var).map_err(|_| Fatal::Usage(format!("token variable {var}: not set")))?;
    let value = value.trim();
    if value.is_empty() {
        return Err(Fatal::Usage(format!("token variable {var}: empty")));
    }
    Ok(value.to_owned())
}

fn build_request(token: &str, args: &SendArgs) -> Result<Vec<u8>, Fatal> {
    let mut request = token.as_bytes().to_vec();
    if !args.payload.is_empty() {
        request.push(b' ');
        request.extend_from_slice(args.payload.join(" ").as_bytes());
    }
    request.push(b'\n');
    if args.body {
        std::io::stdin()
            .read_to_end(&mut request)
            .map_err(|e| Fatal::Runtime(format!("reading the body from stdin: {e}")))?;
    }
    Ok(request)
}

/// Sends to every address at once; prints each reply line prefixed by its address.
fn send_to_all(addrs: &[SocketAddr], request: &[u8], deadline: Instant) -> u8 {
    let results: Vec<(SocketAddr, Result<Vec<u8>, String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = addrs
            .iter()
            .map(|addr| {
                (
                    *addr,
                    scope.spawn(move || exchange(*addr, request, deadline)),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(addr, h)| {
                (
                    addr,
                    h.join()
                        .unwrap_or_else(|_| Err("client thread panicked".into())),
                )
            })
            .collect()
    });
    let mut failed = addrs.is_empty();
    for (addr, result) in results {
        match result {
            Ok(reply) => {
                failed |= is_failure(&reply);
                for line in String::from_utf8_lossy(&reply).lines() {
                    println!("{addr} {line}");
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("{addr} {e}");
            }
        }
    }
    u8::from(failed)
}

fn exchange(addr: SocketAddr, request: &[u8], deadline: Instant) -> Result<Vec<u8>, String> {
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(format!("{addr}: timed out"))
        } else {
            Ok(left)
        }
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request)
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        stream
            .set_read_timeout(Some(left()?.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(reply),
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A refusal (`ERR busy` at accept) is followed by a reset when our request arrives
            // after the server closed: the server's answer is whole, show it.
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionReset
                    && reply.starts_with(b"ERR ")
                    && reply.ends_with(b"\n") =>
            {
                return Ok(reply);
            }
            Err(e) => return Err(format!("reading from {addr}: {e}")),
        }
    }
}

/// An `ERR` reply is a failure, and so is an empty one: a server that closes without a word
/// cannot be told from one that refused the connection, and `send --all` must not count a
/// refused pod as a success. A handler that means success says so in its reply.
fn is_failure(reply: &[u8]) -> bool {
    reply.is_empty() || reply.starts_with(b"ERR ")
}

fn print_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes).and_then(|_| out.flush());
}
