//! The reply path of issue 16: on a connection that stays open, the worker writes the reply
//! to the socket itself and the loop learns of it without a wake. These check what that must
//! never change: order, completeness, the idle timeout, and Unix sockets alike. A reply that
//! closes the connection carries its end (the FIN) on its last segment.

use crate::util::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const ECHO_LINE: &str = r#"fn handle(req) { req.payload + "\n" }"#;

#[test]
fn keep_alive_over_a_unix_socket_answers_in_order_then_closes_when_idle() {
    let scratch = Scratch::new();
    let sock = scratch.path("ct.sock");
    let listen = format!("unix:{}", sock.display());
    let script = scratch.write("handler.rhai", ECHO_LINE);
    let command = serve_command(&script);
    let args = ["--keep-alive", "--read-timeout", "300ms"];
    let _server = Server::spawn(command, scratch, &["--listen", &listen], &args);
    let mut stream = UnixStream::connect(&sock).expect("connecting to the Unix socket");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    for i in 0..200 {
        stream
            .write_all(format!("{TOKEN} n{i}\n").as_bytes())
            .unwrap();
        let want = format!("n{i}\n");
        let mut got = vec![0; want.len()];
        stream.read_exact(&mut got).expect("reading a reply");
        assert_eq!(String::from_utf8_lossy(&got), want);
    }
    // The last reply went out quietly: the loop must still settle it and time the idle
    // connection out.
    let started = Instant::now();
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("waiting for the close");
    let idle = started.elapsed();
    assert_eq!(rest, b"");
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_secs(5),
        "{idle:?}"
    );
}

#[test]
fn a_reply_after_streamed_output_follows_it_on_a_kept_connection() {
    // The live output goes through the loop; the reply must not overtake it.
    let script =
        r#"fn handle(req) { write("a-" + req.payload + "\n"); "b-" + req.payload + "\n" }"#;
    let server = Server::start(script, &["--keep-alive"]);
    let mut stream = connect(server.addr());
    for i in 0..100 {
        stream
            .write_all(format!("{TOKEN} {i}\n").as_bytes())
            .unwrap();
        let want = format!("a-{i}\nb-{i}\n");
        assert_eq!(text(&read_exact(&mut stream, want.len())), want);
    }
}

#[test]
fn a_reply_larger_than_the_socket_takes_arrives_whole_then_the_next_one() {
    // The worker writes what the socket takes; the loop sends the rest as the client reads.
    let script = r#"
fn handle(req) {
    if req.payload != "big" { return "small\n"; }
    let s = "0123456789abcdef";
    while s.len() < 4194304 { s += s; }
    s + "\n"
}"#;
    let server = Server::start(script, &["--keep-alive"]);
    let mut stream = connect(server.addr());
    stream
        .write_all(format!("{TOKEN} big\n").as_bytes())
        .unwrap();
    // Not reading yet: the socket fills up while the reply is being written.
    std::thread::sleep(Duration::from_millis(300));
    let big = read_exact(&mut stream, 4_194_305);
    assert!(big.ends_with(b"cdef\n"), "{:?}", &big[big.len() - 8..]);
    assert!(
        big.chunks(16)
            .take(262_144)
            .all(|c| c == b"0123456789abcdef")
    );
    stream.write_all(format!("{TOKEN} x\n").as_bytes()).unwrap();
    assert_eq!(text(&read_exact(&mut stream, 6)), "small\n");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_burst_of_slow_requests_wakes_every_worker() {
    // Workers are woken one at a time, each waking the next when it finds more waiting: a
    // burst must still end with all of them running at once, not queued behind the first.
    let scratch = Scratch::new();
    let go = scratch.path("go");
    let script = format!(
        r#"fn handle(req) {{
            exec(["sh", "-c", "touch \"$0\"; i=0; while [ ! -e '{}' ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done", "{}/started-" + req.payload]);
            req.payload + "\n"
        }}"#,
        go.display(),
        scratch.path("").display()
    );
    let server = Server::start(&script, &["--workers", "8"]);
    let mut streams: Vec<_> = (0..8)
        .map(|i| open_with(server.addr(), format!("{TOKEN} {i}\n").as_bytes()))
        .collect();
    // One bound for all eight: run one after another, each would take its whole 30 s loop.
    let deadline = Instant::now() + WAIT;
    for i in 0..8 {
        let started = scratch.path(&format!("started-{i}"));
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            file_exists_within(&started, left),
            "request {i} never started: not every worker was woken"
        );
    }
    std::fs::write(&go, "").unwrap();
    for (i, stream) in streams.iter_mut().enumerate() {
        assert_eq!(read_to_close(stream), format!("{i}\n").into_bytes());
    }
}

#[test]
fn the_end_of_a_closing_reply_comes_with_its_last_bytes() {
    // The FIN rides on the reply's last segment (MSG_MORE before the shutdown): a client that
    // reads the reply the moment it arrives finds the end already there. Sent apart, a client
    // spinning on its socket reads the reply while the FIN is still on its way.
    let server = Server::start(ECHO_LINE, &[]);
    for i in 0..200 {
        let mut stream = open_with(server.addr(), format!("{TOKEN} r{i}\n").as_bytes());
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        stream.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + WAIT;
        let mut reply = first_bytes_spinning(&mut stream, deadline);
        let mut chunk = [0u8; 64];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    panic!("request {i}: {:?} came without the end", text(&reply))
                }
                Err(e) => panic!("request {i}: reading: {e}"),
            }
        }
        assert_eq!(text(&reply), format!("r{i}\n"));
    }
}

/// Reads without sleeping until bytes arrive (or fails the test at `deadline`).
fn first_bytes_spinning(stream: &mut std::net::TcpStream, deadline: Instant) -> Vec<u8> {
    let mut chunk = [0u8; 64];
    loop {
        match stream.read(&mut chunk) {
            Ok(n) => return chunk[..n].to_vec(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no reply within {WAIT:?}");
                std::hint::spin_loop();
            }
            Err(e) => panic!("reading: {e}"),
        }
    }
}

/// Resident KiB of the server binary's code: the `Rss` of its executable mappings.
fn code_resident_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    // smaps names the file by its real path.
    let binary = binary().canonicalize().unwrap_or_else(|_| binary());
    let mut in_code = false;
    let mut total = 0;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            if in_code {
                total += kib
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        } else if line.contains('-') && !line.starts_with(char::is_uppercase) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            in_code = fields.get(1).is_some_and(|p| p.contains('x'))
                && fields.get(5).is_some_and(|p| Path::new(p) == binary);
        }
    }
    total
}

#[test]
fn a_quiet_second_unmaps_the_code_and_the_next_request_maps_it_back() {
    let server = Server::start(ECHO_LINE, &[]);
    let pid = server.child.id();
    assert_eq!(server.ask("first"), "first\n");
    let after_request = code_resident_kib(pid);
    assert!(
        after_request > 0,
        "the binary's code mapping was not found in smaps"
    );
    let deadline = Instant::now() + WAIT;
    let mut now = after_request;
    while now >= after_request && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = code_resident_kib(pid);
    }
    assert!(
        now < after_request,
        "code resident after a request: {after_request} KiB, still {now} KiB after {WAIT:?} idle"
    );
    assert_eq!(server.ask("second"), "second\n");
}
