//! Live and background work (issue 3): write(), streamed output, start/job, locks, PID 1.

use crate::util::*;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

/// A shell line that waits (bounded) for `file` to exist.
fn wait_for_file(file: &Path) -> String {
    format!(
        "(for i in $(seq 1500); do [ -e '{}' ] && exit 0; sleep 0.01; done; exit 9)",
        file.display()
    )
}

fn touch(path: &Path) {
    std::fs::write(path, b"").expect("creating a marker file");
}

#[test]
fn write_reaches_the_client_before_the_handler_returns() {
    let scratch = Scratch::new();
    let go = scratch.path("go");
    let script = format!(
        r#"fn handle(req) {{ write("first\n"); let r = run("{}"); "done " + r.code + "\n" }}"#,
        wait_for_file(&go)
    );
    let server = Server::start(&script, &[]);
    let mut stream = open_with(server.addr(), format!("{TOKEN} x\n").as_bytes());
    // The handler is blocked until `go` exists, so this chunk can only come from write().
    assert_eq!(read_exact(&mut stream, 6), b"first\n");
    touch(&go);
    assert_eq!(read_to_close(&mut stream), b"done 0\n");
}

#[test]
fn streamed_output_arrives_while_the_command_runs() {
    let scratch = Scratch::new();
    let go = scratch.path("go");
    let script = format!(
        r#"fn handle(req) {{
            let r = exec(["sh", "-c", "echo one; {}; echo two"], #{{ stream: true }});
            "code=" + r.code + " stdout=" + r.stdout.len + "\n"
        }}"#,
        wait_for_file(&go)
    );
    let server = Server::start(&script, &[]);
    let mut stream = open_with(server.addr(), format!("{TOKEN} x\n").as_bytes());
    assert_eq!(read_exact(&mut stream, 4), b"one\n");
    touch(&go);
    assert_eq!(read_to_close(&mut stream), b"two\ncode=0 stdout=0\n");
}

const JOBS: &str = r#"
fn handle(req) {
    switch req.args[0] {
        "start" => start(req.payload.sub_string(6)).to_string(),
        "job" => {
            let s = job(parse_int(req.args[1]));
            if s == () { "unknown" } else { `${s.running} ${s.code} ${s.success} ${s.timed_out}` }
        }
    }
}
"#;

#[test]
fn start_returns_at_once_and_job_reports_the_end() {
    let server = Server::start(JOBS, &[]);
    let go = server.scratch.path("go");
    let done = server.scratch.path("done");
    let started = Instant::now();
    let id = server.ask(&format!(
        "start {}; touch '{}'; exit 3",
        wait_for_file(&go),
        done.display()
    ));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "start() waited for the job"
    );
    assert_eq!(server.ask(&format!("job {id}")), "true  false false");
    assert!(!done.exists());
    touch(&go);
    assert!(
        file_exists_within(&done, WAIT),
        "the job never ran to its end"
    );
    server
        .log
        .wait_for(&format!("job {id} (request 1) ended: code=3"));
    assert_eq!(server.ask(&format!("job {id}")), "false 3 false false");
    assert_eq!(server.ask("job 999"), "unknown");
}

#[test]
fn max_jobs_refuses_one_more_until_one_ends() {
    let server = Server::start(JOBS, &["--max-jobs", "1"]);
    let go = server.scratch.path("go");
    let id = server.ask(&format!("start {}", wait_for_file(&go)));
    let refused = server.ask("start true");
    assert!(
        refused.starts_with("ERR handler failed (request 2)"),
        "{refused}"
    );
    server.log.wait_for("too many background jobs");
    touch(&go);
    server
        .log
        .wait_for(&format!("job {id} (request 1) ended: code=0"));
    assert_eq!(server.ask("start true"), "2");
}

const LOCKED: &str = r#"
fn handle(req) {
    let name = req.args[0];
    let r = exec(["sh", "-c", req.payload.sub_string(name.len + 1)], #{ lock: name, timeout: 10000 });
    "" + r.code
}
"#;

#[test]
fn same_lock_never_overlaps() {
    let server = Server::start(LOCKED, &["--workers", "4"]);
    let dir = server.scratch.dir.path().display().to_string();
    // A holder that finds another inside the critical section records it.
    let critical = format!(
        "[ -e {dir}/busy ] && echo overlap >> {dir}/trace; touch {dir}/busy; sleep 0.2; rm {dir}/busy; echo ok >> {dir}/trace"
    );
    let addr = server.addr();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let request = format!("{TOKEN} deploy {critical}\n");
            std::thread::spawn(move || exchange(addr, request.as_bytes()))
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), b"0");
    }
    assert_eq!(
        std::fs::read_to_string(format!("{dir}/trace")).unwrap(),
        "ok\nok\nok\n"
    );
}

#[test]
fn different_locks_run_in_parallel() {
    let server = Server::start(LOCKED, &["--workers", "4"]);
    let (a, b) = (server.scratch.path("a"), server.scratch.path("b"));
    // Each waits for the other to have started: only parallel holders both finish with 0.
    let first = format!(
        "{TOKEN} lock-a touch '{}'; {}\n",
        a.display(),
        wait_for_file(&b)
    );
    let second = format!(
        "{TOKEN} lock-b touch '{}'; {}\n",
        b.display(),
        wait_for_file(&a)
    );
    let addr = server.addr();
    let one = std::thread::spawn(move || exchange(addr, first.as_bytes()));
    assert_eq!(exchange(addr, second.as_bytes()), b"0");
    assert_eq!(one.join().unwrap(), b"0");
}

#[test]
fn shutdown_waits_for_a_job_then_kills_one_that_outlives_the_timeout() {
    let mut server = Server::start(JOBS, &["--shutdown-timeout", "1s"]);
    let done = server.scratch.path("done");
    server.ask(&format!("start sleep 0.3; touch '{}'", done.display()));
    server.ask("start sleep 30");
    let stopped = Instant::now();
    server.signal(15);
    assert!(server.wait_exit().success());
    assert!(done.exists(), "shutdown did not wait for the short job");
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "the long job was not killed"
    );
    server.log.wait_for("job 2 (request 2) ended: code=137");
}

#[test]
fn a_slow_reader_of_streamed_output_is_dropped_not_the_command() {
    let script = r#"
        fn handle(req) {
            if req.payload == "ping" { return "pong"; }
            let r = exec(["sh", "-c", "head -c 50000000 /dev/zero"], #{ stream: true });
            "code=" + r.code
        }"#;
    let server = Server::start(script, &[]);
    let mut stream = open_with(server.addr(), format!("{TOKEN} x\n").as_bytes());
    // Never read: the server must cap what it queues for us and let us go.
    server.log.wait_for("client reads too slowly");
    // The command still runs to its end and is logged as a success.
    let line = server.log.wait_for("request 1 peer=");
    assert!(
        line.contains("outcome=ok") && line.contains("commands=[0]"),
        "{line}"
    );
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(
        rest.len() < 50_000_000,
        "all {} bytes were queued for a client that never read",
        rest.len()
    );
    assert_eq!(server.ask("ping"), "pong");
}

/// `(pid, comm, state)` of every process whose parent is `parent`.
fn children_of(parent: u32) -> Vec<(u32, String, char)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces, so split at the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let (pid, comm) = head.split_once(" (").unwrap_or((head, ""));
        let mut fields = tail.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if fields.next().and_then(|p| p.parse().ok()) == Some(parent) {
            found.push((pid.parse().unwrap_or(0), comm.to_owned(), state));
        }
    }
    found
}

/// Serves as PID 1 of a new PID namespace; `None` (with the reason printed) where not allowed.
fn start_as_pid1(script: &str, init: bool) -> Option<Server> {
    let probe = shell("unshare --fork --pid --mount-proc true");
    if !probe.status.success() {
        eprintln!(
            "skipping: cannot create a PID namespace: {}",
            String::from_utf8_lossy(&probe.stderr)
        );
        return None;
    }
    let scratch = Scratch::new();
    let path = scratch.write("handler.rhai", script);
    let mut command = std::process::Command::new("unshare");
    command
        .args(["--fork", "--kill-child", "--pid", "--mount-proc"])
        .arg(binary());
    command
        .env("TOKEN", TOKEN)
        .env("RUST_LOG", "debug")
        .env("CT_INIT", if init { "1" } else { "0" });
    command
        .arg("serve")
        .arg("--script")
        .arg(&path)
        .args(["--token-env", "TOKEN"]);
    Some(Server::spawn(
        command,
        scratch,
        &["--listen", "127.0.0.1:0"],
        &[],
    ))
}

const ORPHANS: &str = r#"
fn handle(req) {
    // The shell exits at once; its `sleep` child is orphaned to PID 1 and ends soon after.
    let orphaning = run("sleep 0.05 & exit 7");
    let direct = exec(["sh", "-c", "exit 3"]);
    "" + orphaning.code + " " + direct.code
}
"#;

/// Waits until PID 1 of the namespace has no `sleep` child left, zombie or not.
fn orphans_reaped(server: &Server) -> bool {
    let namespace_init = children_of(server.child.id())
        .first()
        .map(|c| c.0)
        .expect("unshare has a child");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !children_of(namespace_init)
            .iter()
            .any(|(_, comm, _)| comm == "sleep")
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn as_pid1_orphans_are_reaped_and_exit_codes_stay_right() {
    let Some(server) = start_as_pid1(ORPHANS, true) else {
        return;
    };
    for _ in 0..3 {
        assert_eq!(server.ask("x"), "7 3");
    }
    assert!(orphans_reaped(&server), "zombies left under PID 1");
}

#[test]
fn without_the_init_orphans_stay_zombies() {
    // The counter-test: proves `orphans_reaped` can see a zombie.
    let Some(server) = start_as_pid1(ORPHANS, false) else {
        return;
    };
    assert_eq!(server.ask("x"), "7 3");
    assert!(
        !orphans_reaped(&server),
        "a zombie was expected with CT_INIT=0"
    );
}

/// Serves a ready script from `scripts/` with extra environment variables.
fn serve_ready_script(name: &str, envs: &[(&str, String)]) -> Server {
    let mut command = command();
    command
        .arg("serve")
        .arg("--script")
        .arg(format!("scripts/{name}"))
        .args(["--token-env", "TOKEN"]);
    command.envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
    Server::spawn(command, Scratch::new(), &["--listen", "127.0.0.1:0"], &[])
}

#[test]
fn deploy_script_starts_a_job_and_reports_its_status() {
    let scratch = Scratch::new();
    let go = scratch.path("go");
    let record = scratch.path("deployed");
    let deployer = scratch.write_executable(
        "deploy.sh",
        &format!(
            "#!/bin/sh\n{}\nprintf '%s' \"$1\" > '{}'\nexit 4\n",
            wait_for_file(&go),
            record.display()
        ),
    );
    let server = serve_ready_script(
        "deploy.rhai",
        &[("DEPLOY_SCRIPT", deployer.display().to_string())],
    );
    // A hostile version string is one argv word: nothing but the deployer sees it.
    assert_eq!(
        server.ask("deploy v1;touch${IFS}/tmp/pwned"),
        "started job 1\n"
    );
    assert!(server.ask("status 1").starts_with("job 1: running"));
    touch(&go);
    server.log.wait_for("job 1 (request 1) ended: code=4");
    assert!(
        server
            .ask("status 1")
            .starts_with("job 1: finished, code 4")
    );
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        "v1;touch${IFS}/tmp/pwned"
    );
    assert!(server.ask("status 77").contains("unknown"));
}

#[test]
fn log_tail_script_streams_new_lines_while_following() {
    let scratch = Scratch::new();
    let log_file = scratch.write("app.log", "one\ntwo\nthree\n");
    let server = serve_ready_script(
        "log-tail.rhai",
        &[("LOG_FILE", log_file.display().to_string())],
    );
    assert_eq!(server.ask("tail 2 0"), "two\nthree\n");
    let mut stream = open_with(server.addr(), format!("{TOKEN} tail 1 5\n").as_bytes());
    assert_eq!(read_exact(&mut stream, 6), b"three\n");
    // Appended after the reply began: only a live stream can deliver it.
    shell(&format!("echo four >> '{}'", log_file.display()));
    assert_eq!(read_exact(&mut stream, 5), b"four\n");
}

#[test]
fn locked_files_script_backs_up_and_rotates() {
    let scratch = Scratch::new();
    let data = scratch.path("data");
    let backups = scratch.path("backups");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&backups).unwrap();
    std::fs::write(data.join("file"), "x").unwrap();
    for old in ["data-20000101-000000.tar.gz", "data-20000102-000000.tar.gz"] {
        std::fs::write(backups.join(old), "").unwrap();
    }
    let envs = [
        ("DATA_DIR", data.display().to_string()),
        ("BACKUP_DIR", backups.display().to_string()),
    ];
    let server = serve_ready_script("locked-files.rhai", &envs);
    let reply = server.ask("backup");
    assert!(
        reply.starts_with("backup: data-") && reply.ends_with(".tar.gz\n"),
        "{reply}"
    );
    assert_eq!(server.ask("rotate 1"), "rotate: kept 1, removed 2\n");
    let left: Vec<_> = std::fs::read_dir(&backups)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1);
    assert_eq!(format!("backup: {}\n", left[0].to_string_lossy()), reply);
}
