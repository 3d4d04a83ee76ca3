//! The command line of the load generator, parsed by hand so the bench needs no crate but mio.

use std::net::SocketAddr;
use std::time::Duration;

pub const USAGE: &str = "\
usage: ct-bench --addr IP:PORT --send TEXT [options]
       ct-bench startup RUNS CMD [ARGS...]       time from exec to the first stdout line
       ct-bench spawn THREADS DURATION PROGRAM [--pin]
                                                 posix_spawn + waitpid PROGRAM from THREADS
                                                 threads: the spawn ceiling, in spawns/s;
                                                 --pin: thread i bound to the i-th allowed CPU
       ct-bench spawn-server THREADS PORT PROGRAM
                                                 serve 127.0.0.1:PORT from THREADS threads:
                                                 per connection read a line, posix_spawn +
                                                 waitpid PROGRAM, answer ok; the spawn
                                                 ceiling behind TCP

  --addr IP:PORT        server to drive
  --mode MODE           close: one connection per request (connect, send, half-close, read to
                        EOF); keep-alive: send, read one reply line, repeat on one connection;
                        hold: open -c idle connections and keep them for --duration
                        [default: close]
  -c N                  concurrent clients [default: 1]
  --threads N           event loops the clients are spread over [default: 1]
  --duration DUR        how long to drive, e.g. 5s, 500ms [default: 5s]
  --requests N          stop after N finished requests (whichever of N and DUR comes first)
  --send TEXT           request bytes; \\n, \\r, \\t and \\\\ are unescaped
  --expect TEXT         the exact reply (close), reply line (keep-alive) or HTTP body (--http)
  --http                the reply is HTTP: status 200 and body == --expect; no half-close
  --no-half-close       close mode: do not shut down the sending side after the request
  --timeout DUR         a request not answered within DUR is an error [default: 5s]
  --error-pause DUR     a client that failed waits DUR before its next attempt [default: 10ms]
  --tls CAFILE          speak TLS (rustls), trusting the CA in CAFILE, on the same event loop
                        (close, keep-alive and --http modes); no session resumption
  --servername NAME     the name checked in the server's certificate and sent as SNI
                        [default: localhost]
  --sources N           to a 127.0.0.0/8 server, connect from 127.0.0.2 .. 127.0.0.(N+1) in
                        turn, so TIME_WAIT sockets do not exhaust one address's ephemeral ports;
                        0 connects from 127.0.0.1 [default: 64]
";

/// How a client uses its connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Close,
    KeepAlive,
    Hold,
}

/// The validated command line.
#[derive(Clone, Debug)]
pub struct Args {
    pub addr: SocketAddr,
    pub mode: Mode,
    pub clients: usize,
    pub threads: usize,
    pub duration: Duration,
    pub requests: Option<u64>,
    pub send: Vec<u8>,
    pub expect: Vec<u8>,
    pub http: bool,
    /// Close mode: shut down the sending side after the request, as `nc -N` does. Off for
    /// peers that drop the reply on a half-close (ncat --sh-exec) and for HTTP.
    pub half_close: bool,
    pub timeout: Duration,
    /// Without a pause, a client refused by a restarting server (the netcat loop) would retry
    /// in a tight loop and take the CPU that the server needs to come back.
    pub error_pause: Duration,
    /// One source address has ~28k ephemeral ports; at 10k+ connections/s they are all in
    /// TIME_WAIT within seconds and `connect` spends its time searching for a free one (89% of
    /// the generator's CPU in a profile), so the generator, not the server, would be measured.
    pub sources: u8,
    /// TLS: the CA file the server's certificate must chain to.
    pub tls: Option<std::path::PathBuf>,
    pub servername: String,
}

pub fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut addr = None;
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        mode: Mode::Close,
        clients: 1,
        threads: 1,
        duration: Duration::from_secs(5),
        requests: None,
        send: Vec::new(),
        expect: Vec::new(),
        http: false,
        half_close: true,
        timeout: Duration::from_secs(5),
        error_pause: Duration::from_millis(10),
        sources: 64,
        tls: None,
        servername: "localhost".into(),
    };
    while let Some(flag) = argv.next() {
        if flag == "--http" || flag == "--no-half-close" {
            args.http |= flag == "--http";
            args.half_close = false;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => addr = Some(value.parse().map_err(|e| format!("--addr {value}: {e}"))?),
            "--mode" => args.mode = parse_mode(&value)?,
            "-c" => args.clients = parse_count(&flag, &value)?,
            "--threads" => args.threads = parse_count(&flag, &value)?,
            "--duration" => args.duration = parse_duration(&value)?,
            "--requests" => args.requests = Some(parse_count(&flag, &value)? as u64),
            "--send" => args.send = unescape(&value),
            "--expect" => args.expect = unescape(&value),
            "--timeout" => args.timeout = parse_duration(&value)?,
            "--error-pause" => args.error_pause = parse_duration(&value)?,
            "--tls" => args.tls = Some(value.into()),
            "--servername" => args.servername = value,
            "--sources" => {
                args.sources = value.parse().map_err(|_| format!("--sources {value}"))?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    args.addr = addr.ok_or("--addr is required")?;
    validate(args)
}

fn validate(mut args: Args) -> Result<Args, String> {
    if args.send.is_empty() && args.mode != Mode::Hold {
        return Err("--send is required".into());
    }
    if args.mode == Mode::KeepAlive && (args.http || !args.expect.ends_with(b"\n")) {
        return Err("keep-alive needs a line protocol: --expect ending in \\n, no --http".into());
    }
    args.threads = args.threads.min(args.clients);
    Ok(args)
}

fn parse_mode(value: &str) -> Result<Mode, String> {
    match value {
        "close" => Ok(Mode::Close),
        "keep-alive" => Ok(Mode::KeepAlive),
        "hold" => Ok(Mode::Hold),
        _ => Err(format!(
            "--mode {value}: expected close, keep-alive or hold"
        )),
    }
}

fn parse_count(flag: &str, value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{flag} {value}: expected a positive integer")),
    }
}

/// `5s`, `500ms` or a bare number of seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let bad = || format!("{value}: expected a duration such as 5s or 500ms");
    let (number, scale) = if let Some(ms) = value.strip_suffix("ms") {
        (ms, 1e-3)
    } else {
        (value.strip_suffix('s').unwrap_or(value), 1.0)
    };
    let seconds: f64 = number.parse().map_err(|_| bad())?;
    Duration::try_from_secs_f64(seconds * scale).map_err(|_| bad())
}

fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        let c = match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('n') => '\n',
                Some('r') => '\r',
                Some('t') => '\t',
                Some(other) => other,
                None => '\\',
            },
            (c, false) => c,
        };
        let mut utf8 = [0; 4];
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    }
    out
}
