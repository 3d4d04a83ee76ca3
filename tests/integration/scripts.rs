//! The ready handlers in `scripts/`, run as users run them: the files themselves, through
//! `command-trigger call` or a real server, against real programs (git, curl, kill, pgrep) and
//! a real HTTP endpoint on 127.0.0.1.

use crate::util::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// `command-trigger call --script scripts/NAME -- PAYLOAD...` with `env` added; fails the test
/// if it runs longer than `WAIT`.
#[track_caller]
fn call(name: &str, payload: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = command();
    command
        .arg("call")
        .arg("--script")
        .arg(script(name))
        .arg("--")
        .args(payload)
        .envs(env.iter().copied());
    finish(command)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn every_script_compiles_with_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("listing scripts/")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".rhai"))
        .collect();
    names.sort();
    for expected in [
        "demo.rhai",
        "reload-signal.rhai",
        "git-pull.rhai",
        "cache-flush.rhai",
        "debug.rhai",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "scripts/{expected} is missing"
        );
    }
    for name in &names {
        let mut command = command();
        command.arg("check").arg(script(name));
        let out = finish(command);
        assert!(
            out.status.success() && stdout(&out) == "ok\n",
            "check scripts/{name}: {:?} {}{}",
            out.status,
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn demo_answers_hello_over_the_wire() {
    let text = std::fs::read_to_string(script("demo.rhai")).unwrap();
    let server = Server::start(&text, &[]);
    assert_eq!(
        server.ask("hello"),
        "hello from command-trigger, request 1\n"
    );
    assert_eq!(server.ask("echo a  b"), "a  b\n");
}

#[test]
fn debug_answers_host_facts_as_text_and_json() {
    let out = call("debug.rhai", &["debug"], &[]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let fact = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("no {key} in {text:?}"))
            .to_string()
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(fact("hostname"), hostname.trim());
    assert!(fact("uptime_s").parse::<u64>().unwrap() > 0);
    assert_eq!(fact("load").split(' ').count(), 3);
    assert_eq!(fact("mem_total_kb"), meminfo("MemTotal").to_string());
    // Available memory moves while the test runs; 10% either way still tells it from MemFree.
    let available: u64 = fact("mem_available_kb").parse().unwrap();
    let expected = meminfo("MemAvailable");
    assert!(
        available * 10 > expected * 9 && available * 10 < expected * 11,
        "mem_available_kb {available}, /proc/meminfo says {expected}"
    );
    assert!(fact("disk").starts_with("/ "), "{text}");
    assert!(fact("pids").parse::<u64>().unwrap() > 1, "{text}");
    assert_eq!(fact("user"), current_uid());

    let out = call("debug.rhai", &["debug", "json"], &[]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("debug json");
    for key in [
        "hostname",
        "kernel",
        "uptime_s",
        "load",
        "mem_total_kb",
        "mem_available_kb",
        "disk",
        "pids",
        "user",
    ] {
        assert!(json.get(key).is_some(), "no {key} in {json}");
    }
    assert_eq!(
        stdout(&call("debug.rhai", &["status"], &[])),
        "ERR usage: debug [text|json]\n"
    );
}

fn meminfo(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/meminfo"))
}

fn current_uid() -> String {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A shell under a name of its own (so pgrep finds only it) that writes `got-SIGNAL` files
/// when it receives SIGHUP or SIGUSR1, with a younger child of the same name (like the workers
/// of a master/worker daemon) that writes `child-got-HUP` and ends when its parent does.
struct Target {
    child: Child,
    name: String,
    dir: Scratch,
}

impl Target {
    #[track_caller]
    fn start() -> Target {
        let dir = Scratch::new();
        // Unique per test process and at most 15 bytes, the length the kernel keeps.
        let name = format!("ctsig{}", std::process::id());
        let shell = dir.path(&name);
        std::os::unix::fs::symlink("/bin/sh", &shell).unwrap();
        // Escaped, so that the child's shell expands these, not its parent's.
        let child = "trap 'echo hup > child-got-HUP' HUP; echo \\$$ > child-pid; \
                     while kill -0 \\$PPID; do sleep 0.2 & wait \\$!; done";
        let body = format!(
            "trap 'echo hup > got-HUP' HUP; trap 'echo usr1 > got-USR1' USR1; \
             \"$0\" -c \"{child}\" & echo $$ > pid; \
             while [ ! -s child-pid ]; do sleep 0.01; done; touch ready; \
             while :; do sleep 1 & wait $!; done"
        );
        let child = with_default_reload_signals(Command::new(&shell).arg("-c").arg(body))
            .current_dir(dir.dir.path())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            file_exists_within(&dir.path("ready"), WAIT),
            "the target shells did not start"
        );
        Target { child, name, dir }
    }

    fn child_pid(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path("child-pid")).unwrap();
        text.trim().to_string()
    }

    #[track_caller]
    fn wait_for(&self, signal: &str) {
        let file = match signal.strip_prefix("child-") {
            Some(_) => self.dir.path(signal),
            None => self.dir.path(&format!("got-{signal}")),
        };
        assert!(
            file_exists_within(&file, WAIT),
            "the target did not get SIG{signal}"
        );
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child_pid()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn reload_signal_finds_the_process_by_name_or_pidfile() {
    let target = Target::start();
    let pid = target.child.id().to_string();
    let out = call(
        "reload-signal.rhai",
        &["reload"],
        &[("RELOAD_PROCESS", &target.name)],
    );
    // Only the oldest process with that name: the master, not its worker.
    assert_eq!(stdout(&out), format!("sent HUP to {pid}\n"));
    target.wait_for("HUP");
    assert!(!target.dir.path("got-USR1").exists());
    std::fs::remove_file(target.dir.path("got-HUP")).unwrap();
    let out = call(
        "reload-signal.rhai",
        &["reload"],
        &[("RELOAD_PROCESS", &target.name), ("RELOAD_ALL", "1")],
    );
    let child = target.child_pid();
    assert_eq!(stdout(&out), format!("sent HUP to {pid} {child}\n"));
    target.wait_for("HUP");
    target.wait_for("child-got-HUP");

    let pidfile = target.dir.path("pid");
    let out = call(
        "reload-signal.rhai",
        &["reload"],
        &[
            ("RELOAD_PIDFILE", pidfile.to_str().unwrap()),
            ("RELOAD_SIGNAL", "USR1"),
        ],
    );
    assert_eq!(stdout(&out), format!("sent USR1 to {pid}\n"));
    target.wait_for("USR1");

    let missing = call(
        "reload-signal.rhai",
        &["reload"],
        &[("RELOAD_PROCESS", "ct-no-such-process")],
    );
    assert_eq!(stdout(&missing), "ERR no process to signal\n");
    let usage = call("reload-signal.rhai", &["reload", "now"], &[]);
    assert_eq!(stdout(&usage), "ERR usage: reload\n");
}

#[test]
fn reload_signal_refuses_what_is_not_a_process_id() {
    let scratch = Scratch::new();
    // "0" would signal kill's own process group; "-1" every process: neither reaches kill.
    for content in ["0\n", "12abc\n", "--help\n"] {
        let pidfile = scratch.write("pid", content);
        let out = call(
            "reload-signal.rhai",
            &["reload"],
            &[("RELOAD_PIDFILE", pidfile.to_str().unwrap())],
        );
        assert_eq!(out.status.code(), Some(1), "{content:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not a process id"),
            "{content:?}: {out:?}"
        );
    }
    let out = call(
        "reload-signal.rhai",
        &["reload"],
        &[("RELOAD_PROCESS", "x"), ("RELOAD_SIGNAL", "KILL")],
    );
    assert_eq!(out.status.code(), Some(1), "KILL is not a reload signal");
}

/// Runs git with a fixed identity; fails the test if git fails.
#[track_caller]
fn git(dir: &Path, args: &[&str]) -> String {
    let mut command = Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args);
    let out = finish(command);
    assert!(out.status.success(), "git {args:?}: {out:?}");
    stdout(&out).trim().to_string()
}

#[track_caller]
fn commit_and_push(seed: &Path, file: &str) -> String {
    std::fs::write(seed.join(file), file).unwrap();
    git(seed, &["add", file]);
    git(seed, &["commit", "-q", "-m", file]);
    git(seed, &["push", "-q", "origin", "HEAD:main"]);
    git(seed, &["rev-parse", "HEAD"])
}

#[test]
fn git_pull_fast_forwards_a_checkout_and_answers_the_new_head() {
    assert!(have("git"), "git is missing: install it (CI installs it)");
    let scratch = Scratch::new();
    let root = scratch.dir.path();
    git(root, &["init", "-q", "--bare", "-b", "main", "origin.git"]);
    git(root, &["clone", "-q", "origin.git", "seed"]);
    let seed = root.join("seed");
    let first = commit_and_push(&seed, "one");
    git(root, &["clone", "-q", "origin.git", "checkout"]);
    let checkout = root.join("checkout");
    let repo = [("REPO", checkout.to_str().unwrap())];

    let out = call("git-pull.rhai", &["pull"], &repo);
    assert_eq!(stdout(&out), format!("already at {}\n", &first[..7]));
    let second = commit_and_push(&seed, "two");
    let out = call("git-pull.rhai", &["pull"], &repo);
    assert_eq!(
        stdout(&out),
        format!("updated {}..{}\n", &first[..7], &second[..7])
    );
    assert!(
        checkout.join("two").exists(),
        "the pull did not update the files"
    );
    let out = call("git-pull.rhai", &["head"], &repo);
    assert_eq!(stdout(&out), format!("{second}\n"));

    // A local commit and a new upstream one: no fast-forward, so nothing changes.
    std::fs::write(checkout.join("local"), "x").unwrap();
    git(&checkout, &["add", "local"]);
    git(&checkout, &["commit", "-q", "-m", "local"]);
    let local = git(&checkout, &["rev-parse", "HEAD"]);
    commit_and_push(&seed, "three");
    let out = call("git-pull.rhai", &["pull"], &repo);
    assert!(
        stdout(&out).starts_with("ERR pull failed (code "),
        "{out:?}"
    );
    assert_eq!(stdout(&out).lines().count(), 1, "{out:?}");
    assert_eq!(git(&checkout, &["rev-parse", "HEAD"]), local);
}

/// One HTTP request as the responder saw it: the head lines and the body.
struct Seen {
    head: Vec<String>,
    body: String,
}

/// An HTTP endpoint on 127.0.0.1 that answers one request with `status` and reports it.
fn responder(status: &str) -> (String, mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/admin/cache/flush",
        listener.local_addr().unwrap()
    );
    let status = status.to_string();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end().to_string();
            if line.is_empty() {
                break;
            }
            head.push(line);
        }
        let length = head
            .iter()
            .find_map(|h| {
                h.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(String::from)
            })
            .map_or(0, |n| n.parse().unwrap());
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let _ = sender.send(Seen {
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    });
    (url, receiver)
}

#[test]
fn cache_flush_calls_the_local_endpoint_with_curl() {
    assert!(have("curl"), "curl is missing: install it (CI installs it)");
    let (url, seen) = responder("204 No Content");
    let out = call("cache-flush.rhai", &["flush"], &[("FLUSH_URL", &url)]);
    assert_eq!(stdout(&out), "flushed (HTTP 204)\n");
    let request = seen
        .recv_timeout(WAIT)
        .expect("no request reached the endpoint");
    assert_eq!(request.head[0], "POST /admin/cache/flush HTTP/1.1");
    assert_eq!(request.body, "");

    // The rest of the payload is the body, passed on curl's stdin, quotes and all.
    let (url, seen) = responder("200 OK");
    let env = [("FLUSH_URL", url.as_str()), ("FLUSH_METHOD", "PURGE")];
    let out = call("cache-flush.rhai", &["flush", "users/42 'x' $(id)"], &env);
    assert_eq!(stdout(&out), "flushed (HTTP 200)\n");
    let request = seen
        .recv_timeout(WAIT)
        .expect("no request reached the endpoint");
    assert_eq!(request.head[0], "PURGE /admin/cache/flush HTTP/1.1");
    assert_eq!(request.body, "users/42 'x' $(id)");

    let (url, _seen) = responder("500 Internal Server Error");
    let out = call("cache-flush.rhai", &["flush"], &[("FLUSH_URL", &url)]);
    assert_eq!(stdout(&out), "ERR flush failed: HTTP 500\n");
}

#[test]
fn the_example_configmap_holds_reload_signal_verbatim() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join("examples/kubernetes/configmap.yaml")).unwrap();
    let (_, block) = yaml
        .split_once("  handler.rhai: |\n")
        .expect("no handler.rhai block in configmap.yaml");
    let embedded: String = block
        .lines()
        .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
        .collect();
    let script = std::fs::read_to_string(script("reload-signal.rhai")).unwrap();
    assert!(
        embedded == script,
        "examples/kubernetes/configmap.yaml differs from scripts/reload-signal.rhai; \
         regenerate it (see the comment at its top)"
    );
}

/// The `ENV` variables and the `ENTRYPOINT` words of the Dockerfile's final stage.
fn dockerfile_entrypoint() -> (Vec<(String, String)>, Vec<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let text = text.replace("\\\n", " ");
    let env_line = text
        .lines()
        .rfind(|l| l.starts_with("ENV "))
        .expect("no ENV in the Dockerfile");
    let env = env_line[4..]
        .split_whitespace()
        .map(|pair| {
            let (name, value) = pair.split_once('=').expect("ENV NAME=VALUE");
            (name.to_string(), value.to_string())
        })
        .collect();
    let entrypoint = text
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("no ENTRYPOINT in the Dockerfile");
    (
        env,
        serde_json::from_str(entrypoint).expect("ENTRYPOINT in exec form"),
    )
}

#[test]
fn the_image_entrypoint_serves_the_default_script_with_only_a_token_file() {
    let (env, entrypoint) = dockerfile_entrypoint();
    assert_eq!(entrypoint, ["command-trigger", "serve"]);
    let script_path = "/etc/command-trigger/handler.rhai";
    assert!(
        env.contains(&("CT_SCRIPT".into(), script_path.into())),
        "{env:?}"
    );
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(&format!("COPY scripts/demo.rhai {script_path}\n")));

    // The image's environment, with the paths of this checkout and a loopback port.
    let scratch = Scratch::new();
    let token = scratch.write("token", &format!("{TOKEN}\n"));
    let mut command = command();
    command.args(&entrypoint[1..]);
    for (name, value) in &env {
        let value = match name.as_str() {
            "CT_SCRIPT" => script("demo.rhai").to_string_lossy().into_owned(),
            "CT_LISTEN" => "127.0.0.1:0".to_string(),
            _ => value.clone(),
        };
        command.env(name, value);
    }
    command.env("CT_TOKEN_FILE", &token);
    let server = Server::spawn(command, scratch, &[], &[]);
    assert_eq!(
        server.ask("hello"),
        "hello from command-trigger, request 1\n"
    );
}

/// Runs `command` to its end with its output captured, within `WAIT`.
#[track_caller]
fn finish(command: Command) -> Output {
    output_within(command, WAIT)
}
