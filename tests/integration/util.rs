//! Helpers that run the real binary. Every wait has a deadline and fails the test with what
//! was seen so far.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The token every test server accepts (from the variable `TOKEN`).
pub const TOKEN: &str = "test-token-0123456789abcdef";
/// The longest any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_command-trigger"))
}

/// A command for the binary with `TOKEN` set and logging at debug.
/// `command-trigger serve --script SCRIPT --token-env TOKEN`, the test token's variable set:
/// what most tests start, before their own flags.
pub fn serve_command(script: &Path) -> Command {
    let mut command = command();
    command
        .arg("serve")
        .arg("--script")
        .arg(script)
        .args(["--token-env", "TOKEN"]);
    command
}

pub fn command() -> Command {
    let mut command = Command::new(binary());
    command
        .env("TOKEN", TOKEN)
        .env("RUST_LOG", "debug")
        .env_remove("CT_TOKEN_FILE");
    command
}

/// A temporary directory holding a script (and whatever else a test writes).
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("creating a temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("writing a test file");
        path
    }

    /// Writes an executable from a child shell: had this process held the write descriptor,
    /// a sibling test forking a server at that moment would carry it until its exec, and the
    /// kernel refuses to run a file open for writing (ETXTBSY, exit 126).
    pub fn write_executable(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        let mut writer = Command::new("sh")
            .args(["-c", "cat > \"$0\" && chmod 755 \"$0\""])
            .arg(&path)
            .stdin(Stdio::piped())
            .spawn()
            .expect("starting sh");
        let mut stdin = writer.stdin.take().expect("sh's stdin");
        stdin.write_all(text.as_bytes()).expect("writing to sh");
        drop(stdin);
        assert!(writer.wait().expect("waiting for sh").success());
        path
    }
}

/// The server's stderr, collected line by line by a thread, so tests can wait for a line.
#[derive(Clone, Default)]
pub struct Log {
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Log {
    fn collect(self, stderr: impl Read + Send + 'static) {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let (lines, changed) = &*self.lines;
                lines.lock().unwrap().push(line);
                changed.notify_all();
            }
        });
    }

    pub fn text(&self) -> String {
        self.lines.0.lock().unwrap().join("\n")
    }

    /// Waits until a line contains `needle`; returns that line.
    #[track_caller]
    pub fn wait_for(&self, needle: &str) -> String {
        let (lines, changed) = &*self.lines;
        let deadline = Instant::now() + WAIT;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(line) = guard.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {needle:?} within {WAIT:?}; log:\n{}",
                guard.join("\n")
            );
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }
}

/// A running server, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addrs: Vec<SocketAddr>,
    pub log: Log,
    pub scratch: Scratch,
}

impl Server {
    /// Serves `script` with the test token and `--listen 127.0.0.1:0 --print-addr`, plus `args`.
    #[track_caller]
    pub fn start(script: &str, args: &[&str]) -> Server {
        let scratch = Scratch::new();
        let path = scratch.write("handler.rhai", script);
        let command = serve_command(&path);
        Server::spawn(command, scratch, &["--listen", "127.0.0.1:0"], args)
    }

    /// Starts `command` (already holding `serve` and its script) with `listen` and `args`.
    #[track_caller]
    pub fn spawn(mut command: Command, scratch: Scratch, listen: &[&str], args: &[&str]) -> Server {
        command.args(listen).arg("--print-addr").args(args);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("starting command-trigger");
        let log = Log::default();
        log.clone().collect(child.stderr.take().expect("stderr"));
        let listeners = listen
            .iter()
            .filter(|a| matches!(**a, "--listen" | "--metrics-listen"))
            .count()
            .max(1);
        let addrs = read_addrs(&mut child, listeners, &log);
        Server {
            child,
            addrs,
            log,
            scratch,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// Sends `bytes`, half-closes, and returns everything the server sent until it closed.
    #[track_caller]
    pub fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        exchange(self.addr(), bytes)
    }

    /// `TOKEN payload\n`, and the reply as text.
    #[track_caller]
    pub fn ask(&self, payload: &str) -> String {
        String::from_utf8_lossy(&self.exchange(format!("{TOKEN} {payload}\n").as_bytes()))
            .into_owned()
    }

    pub fn signal(&self, signal: i32) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} failed");
    }

    /// Waits for the server to exit and returns its status.
    #[track_caller]
    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_child(&mut self.child, WAIT)
            .unwrap_or_else(|| panic!("server did not exit; log:\n{}", self.log.text()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[track_caller]
fn read_addrs(child: &mut Child, count: usize, log: &Log) -> Vec<SocketAddr> {
    let stdout = child.stdout.take().expect("stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take(count)
        {
            let _ = sender.send(line);
        }
    });
    (0..count)
        .map(|_| {
            let line = receiver
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("server printed no address; log:\n{}", log.text()));
            // `tls://IP:PORT` is an address too; a `unix:/PATH` listener has none (its test
            // knows the path) and stands as 0.0.0.0:0.
            if line.starts_with("unix:") {
                return SocketAddr::from(([0, 0, 0, 0], 0));
            }
            let text = line.strip_prefix("tls://").unwrap_or(&line);
            text.parse()
                .unwrap_or_else(|_| panic!("not an address: {line:?}"))
        })
        .collect()
}

/// Polls `child` until it exits or `limit` passes.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, WAIT).expect("connecting to the server");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream
}

/// Reads until the server closes (or fails the test after `WAIT`).
#[track_caller]
pub fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => reply,
        Err(e) => panic!(
            "reading the reply: {e}; got so far: {:?}",
            String::from_utf8_lossy(&reply)
        ),
    }
}

#[track_caller]
pub fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = connect(addr);
    stream.write_all(bytes).expect("sending the request");
    stream.shutdown(Shutdown::Write).expect("half-closing");
    read_to_close(&mut stream)
}

/// Reads exactly `len` bytes (fails the test after `WAIT`).
#[track_caller]
pub fn read_exact(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    stream
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {len} bytes: {e}"));
    buf
}

/// Runs a shell pipeline with a deadline; returns its output.
#[track_caller]
pub fn shell(line: &str) -> Output {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting /bin/sh");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let status = wait_child(&mut child, WAIT).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("`{line}` did not finish within {WAIT:?}")
    });
    let mut stderr = Vec::new();
    let _ = child.stderr.take().unwrap().read_to_end(&mut stderr);
    Output {
        status,
        stdout: reader.join().unwrap(),
        stderr,
    }
}

/// Has `command` start with SIGHUP and SIGUSR1 at their defaults, for a shell that traps them. A
/// test run under `nohup` (or any parent that ignores SIGHUP) hands the ignore down, and a
/// non-interactive shell may not trap a signal that was ignored when it started: the signal the
/// test sends would never reach the trap.
pub fn with_default_reload_signals(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: only `signal`, which is async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            libc::signal(libc::SIGUSR1, libc::SIG_DFL);
            Ok(())
        })
    }
}

/// Whether a program is on PATH (client tests need the real netcats).
pub fn have(program: &str) -> bool {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn file_exists_within(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The text of the file at `path` once it holds `needle` (a job's output written after the
/// reply), or what it holds when `limit` passes.
pub fn file_text_within(path: &Path, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes `bytes` on a fresh connection without closing; for tests that keep talking.
pub fn open_with(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = connect(addr);
    stream.write_all(bytes).expect("sending");
    stream
}

/// Whether a test may use `program`. In CI (`CI` set) a missing program fails the test, since
/// CI installs every one; on a developer's machine the test is skipped with the reason printed,
/// so a plain `cargo test` works on a fresh machine.
#[track_caller]
pub fn require(program: &str, install: &str) -> bool {
    if have(program) {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{program} is missing in CI: {install}"
    );
    eprintln!("skipping: {program} is not installed ({install}; .ci/run does it)");
    false
}

/// utime + stime of `pid`, in clock ticks: how tests see that a server does not spin.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name, field 3 (state) is index 0: utime is field 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// `exchange` from another loopback address (std cannot bind before connecting).
pub fn exchange_from(ip: &str, to: SocketAddr, request: &str) -> Vec<u8> {
    let program = "import socket, sys\n\
        s = socket.socket()\n\
        s.settimeout(15)\n\
        s.bind((sys.argv[1], 0))\n\
        s.connect((sys.argv[2], int(sys.argv[3])))\n\
        s.sendall(sys.argv[4].encode())\n\
        s.shutdown(socket.SHUT_WR)\n\
        while (b := s.recv(65536)):\n    sys.stdout.buffer.write(b)\n";
    let out = Command::new("python3")
        .args([
            "-c",
            program,
            ip,
            &to.ip().to_string(),
            &to.port().to_string(),
            request,
        ])
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A field of `/proc/PID/status` in kB (`VmHWM` is the peak RSS).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs `command` to its end with its output captured; killed, and the test failed, if it has
/// not finished within `limit`.
#[track_caller]
pub fn output_within(mut command: Command, limit: Duration) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting a command");
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || sender.send(child.wait_with_output()));
    match receiver.recv_timeout(limit) {
        Ok(output) => output.expect("waiting for a command"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{command:?} did not finish within {limit:?}")
        }
    }
}
