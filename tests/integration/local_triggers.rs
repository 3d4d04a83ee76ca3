//! Local triggers (issue 14, SPEC §13): `--watch` runs `on_change`, `--every`/`--cron` run
//! `on_tick`; and HTTP trailers after streamed output.
//!
//! "Exactly one event" is shown without sleeping: after the action under test, a second
//! watched file (the sentinel) is changed, and its event, which the one watch thread can only
//! report after every earlier one, marks the point where the events are counted.

use crate::util::*;
use std::os::unix::fs::symlink;
use std::path::Path;

const WATCHER: &str = r#"
fn handle(req) { "ok" }
fn on_change(event) { log_info(`EVENT ${event.kind} ${event.path} paths=${event.paths.len()}`); }
"#;

/// A watching server over `paths`, with a short debounce so tests are quick. One worker, so
/// calls run (and log) in the order the watcher found the changes.
fn watch(scratch_paths: &[&Path], debounce: &str) -> Server {
    let mut args = vec!["--watch-debounce", debounce, "--workers", "1"];
    let paths: Vec<String> = scratch_paths
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    for path in &paths {
        args.extend(["--watch", path]);
    }
    let server = Server::start(WATCHER, &args);
    server.log.wait_for("listening on");
    server
}

/// Changes the sentinel and waits for its event; returns the `EVENT` lines seen before it.
#[track_caller]
fn events_before_sentinel(server: &Server, sentinel: &Path) -> Vec<String> {
    std::fs::write(sentinel, "changed").expect("writing the sentinel");
    let marker = format!("EVENT modified {}", sentinel.display());
    server.log.wait_for(&marker);
    server
        .log
        .text()
        .lines()
        .take_while(|l| !l.contains(&marker))
        .filter(|l| l.contains("EVENT "))
        .map(str::to_owned)
        .collect()
}

/// The scratch directory of a server that is not started yet, for files that must exist first.
fn files() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

#[test]
fn a_file_change_runs_on_change_and_nothing_runs_at_start() {
    let dir = files();
    let (file, sentinel) = (dir.path().join("app.conf"), dir.path().join("sentinel"));
    std::fs::write(&file, "a=1").unwrap();
    std::fs::write(&sentinel, "start").unwrap();
    let server = watch(&[&file, &sentinel], "100ms");
    std::fs::write(&file, "a=2").unwrap();
    let line = server.log.wait_for("EVENT ");
    assert!(
        line.contains(&format!("watch 1: EVENT modified {}", file.display())),
        "{line}"
    );
    // The one log line per call, with its trigger.
    server.log.wait_for("watch 1 path=");
    assert_eq!(events_before_sentinel(&server, &sentinel).len(), 1);
}

#[test]
fn a_burst_of_writes_is_one_event() {
    let dir = files();
    let (file, sentinel) = (dir.path().join("app.conf"), dir.path().join("sentinel"));
    std::fs::write(&file, "").unwrap();
    std::fs::write(&sentinel, "start").unwrap();
    let server = watch(&[&file, &sentinel], "400ms");
    // An editor or `git pull`: ten writes, 30 ms apart, well inside the debounce.
    for i in 0..10 {
        std::fs::write(&file, format!("version {i}")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    server
        .log
        .wait_for(&format!("EVENT modified {}", file.display()));
    let events = events_before_sentinel(&server, &sentinel);
    assert_eq!(events.len(), 1, "{events:#?}");
}

/// A ConfigMap volume as the kubelet lays it out: keys are symlinks through `..data`, which
/// points at a timestamped directory and is swapped atomically for a new one.
fn configmap(dir: &Path, version: &str, app: &str) {
    let data = dir.join(version);
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("app.conf"), app).unwrap();
    std::fs::write(data.join("other.conf"), "unchanged").unwrap();
    let tmp = dir.join("..data_tmp");
    symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[test]
fn a_kubernetes_data_swap_is_one_event_naming_the_changed_key() {
    let root = files();
    let volume = root.path().join("config");
    std::fs::create_dir(&volume).unwrap();
    configmap(&volume, "..2026_12_05_10_00_00.1", "a=1");
    for key in ["app.conf", "other.conf"] {
        symlink(format!("..data/{key}"), volume.join(key)).unwrap();
    }
    let sentinel = root.path().join("sentinel");
    std::fs::write(&sentinel, "start").unwrap();
    let key = volume.join("app.conf");
    // The directory and one key through its symlink, as scripts do either.
    let server = watch(&[&volume, &key, &sentinel], "200ms");

    configmap(&volume, "..2026_12_05_10_05_00.2", "a=2");
    std::fs::remove_dir_all(volume.join("..2026_12_05_10_00_00.1")).unwrap();

    let events = events_before_sentinel(&server, &sentinel);
    // One for the directory watch, one for the key's: each names the key, the only content
    // that changed, and neither reports Kubernetes' own `..` entries.
    let expected = format!("EVENT modified {} paths=1", key.display());
    assert_eq!(events.len(), 2, "{events:#?}");
    assert!(events.iter().all(|e| e.contains(&expected)), "{events:#?}");
}

#[test]
fn a_missing_path_is_watched_once_it_appears() {
    let dir = files();
    let file = dir.path().join("later/deeper/app.conf");
    let sentinel = dir.path().join("sentinel");
    std::fs::write(&sentinel, "start").unwrap();
    let server = watch(&[&file, &sentinel], "100ms");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "a=1").unwrap();
    server
        .log
        .wait_for(&format!("EVENT created {}", file.display()));
    std::fs::remove_file(&file).unwrap();
    server
        .log
        .wait_for(&format!("EVENT removed {}", file.display()));
}

#[test]
fn a_directory_watch_reports_what_changed_inside() {
    let dir = files();
    let watched = dir.path().join("drop-in");
    std::fs::create_dir(&watched).unwrap();
    let server = watch(&[&watched], "100ms");
    std::fs::write(watched.join("new.conf"), "x").unwrap();
    server.log.wait_for(&format!(
        "EVENT created {} paths=1",
        watched.join("new.conf").display()
    ));
}

const TICKER: &str = r#"
fn handle(req) { "ok" }
fn on_tick(tick) {
    log_info(`TICK ${tick.n} at ${tick.at}`);
    run("echo start >> " + shell_quote(env("LEDGER")) + "; sleep 0.5; echo end >> " + shell_quote(env("LEDGER")));
}
"#;

#[test]
fn ticks_never_overlap_and_a_skip_is_logged() {
    let scratch = Scratch::new();
    let ledger = scratch.path("ledger");
    let script = scratch.write("ticker.rhai", TICKER);
    let mut command = command();
    command
        .env("LEDGER", &ledger)
        .arg("serve")
        .arg("--script")
        .arg(script)
        .args(["--token-env", "TOKEN", "--every", "200ms"]);
    let metrics_listen = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];
    let server = Server::spawn(command, scratch, &metrics_listen, &[]);
    // Each tick runs 500 ms: the ticks due meanwhile find it running.
    let skipped = server.log.wait_for("skip");
    assert!(skipped.contains("still running"), "{skipped}");
    server.log.wait_for("tick 3 n=");
    let ledger = std::fs::read_to_string(&ledger).unwrap();
    let lines: Vec<&str> = ledger.lines().collect();
    for pair in lines.chunks(2) {
        assert!(
            pair == ["start", "end"] || pair == ["start"],
            "ticks overlapped:\n{ledger}"
        );
    }
    let metrics = shell(&format!("curl -s http://{}/metrics", server.addrs[1]));
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("command_trigger_trigger_runs_total{trigger=\"tick\",outcome=\"ok\"}")
            && !metrics.contains("trigger=\"tick\",outcome=\"skipped\"} 0"),
        "{metrics}"
    );
}

#[test]
fn a_running_tick_finishes_at_shutdown_and_no_new_one_starts() {
    let script = r#"
        fn handle(req) { "ok" }
        fn on_tick(tick) { log_info("BEGIN " + tick.n); run("sleep 1"); log_info("FINISHED " + tick.n); }
    "#;
    // Tick 1 runs from 300 ms to 1300 ms; the stop must come before tick 5 at 1500 ms.
    let mut server = Server::start(script, &["--every", "300ms"]);
    server.log.wait_for("BEGIN 1");
    server.signal(15);
    assert_eq!(server.wait_exit().code(), Some(0));
    let log = server.log.text();
    assert!(log.contains("FINISHED 1"), "{log}");
    assert_eq!(log.matches("BEGIN ").count(), 1, "{log}");
}

#[test]
fn cron_is_accepted_and_a_bad_expression_is_exit_2() {
    let script = "fn handle(req) { \"ok\" }\nfn on_tick(tick) { }";
    let server = Server::start(script, &["--cron", "*/5 * * * *"]);
    server.log.wait_for("schedule: on_tick cron */5 * * * *");
    assert_eq!(server.ask("x"), "ok");

    for bad in [
        "61 * * * *",
        "* * * * * *",
        "* * * *",
        "0 0 31 2 *",
        "often",
    ] {
        let output = refused(script, &["--cron", bad]);
        assert!(output.contains("--cron"), "{bad}: {output}");
    }
}

/// Runs `serve` expecting exit 2 at start; returns its stderr.
#[track_caller]
fn refused(script: &str, args: &[&str]) -> String {
    let scratch = Scratch::new();
    let path = scratch.write("handler.rhai", script);
    let line = format!(
        "TOKEN=x{} {} serve --script {} --token-env TOKEN --listen 127.0.0.1:0 {}",
        "y".repeat(20),
        binary().display(),
        path.display(),
        args.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let output = shell(&line);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    stderr
}

#[test]
fn a_script_without_the_function_a_flag_needs_is_exit_2() {
    let plain = "fn handle(req) { \"ok\" }";
    assert!(refused(plain, &["--watch", "/tmp"]).contains("on_change"));
    assert!(refused(plain, &["--every", "1s"]).contains("on_tick"));
    assert!(refused(plain, &["--cron", "0 * * * *"]).contains("on_tick"));
    let with_tick = "fn handle(req) { \"ok\" }\nfn on_tick(t) { }";
    assert!(refused(with_tick, &["--every", "0s"]).contains("--every"));
}

const TRAILERS: &str = r#"
fn handle(req) {
    announce_trailers(["x-exit-code"]);
    let r = run("echo hello; exit 3", #{ stream: true });
    #{ trailers: #{ "x-exit-code": `${r.code}` } }
}
"#;

/// The bytes of a response with its `date` header taken out, which changes every second.
fn without_date(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split_inclusive("\r\n")
        .filter(|l| !l.starts_with("date: "))
        .collect()
}

#[test]
fn trailers_follow_streamed_output_on_the_wire() {
    let server = Server::start(TRAILERS, &["--framing", "http"]);
    let request = format!(
        "GET /run HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let reply = without_date(&server.exchange(request.as_bytes()));
    assert_eq!(
        reply,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n\
         trailer: x-exit-code\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n\
         6\r\nhello\n\r\n0\r\nx-exit-code: 3\r\n\r\n"
    );
}

#[test]
fn curl_reads_the_trailers() {
    if !require("curl", "apt-get install curl") {
        return;
    }
    let server = Server::start(TRAILERS, &["--framing", "http"]);
    let output = shell(&format!(
        "curl -sS -D - -H 'Authorization: Bearer {TOKEN}' http://{}/run",
        server.addr()
    ));
    let text = String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n");
    // curl prints the head, the body, then the trailer fields it read after the last chunk.
    assert!(text.contains("trailer: x-exit-code\n"), "{text}");
    assert!(
        text.ends_with("hello\nx-exit-code: 3\n\n") || text.ends_with("hello\nx-exit-code: 3\n"),
        "{text}"
    );
}

#[test]
fn without_streaming_trailers_travel_as_headers() {
    let script = r#"fn handle(req) { #{ body: "done\n", trailers: #{ "x-exit-code": "0" } } }"#;
    let server = Server::start(script, &["--framing", "http"]);
    let request =
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Token: {TOKEN}\r\nConnection: close\r\n\r\n");
    let reply = without_date(&server.exchange(request.as_bytes()));
    assert!(reply.contains("\r\nx-exit-code: 0\r\n"), "{reply}");
    assert!(reply.ends_with("\r\n\r\ndone\n"), "{reply}");
}

/// An "application" that writes its config's content to `seen` on every SIGHUP, as a reload.
/// Stopped when dropped, so a failing test does not leave its loop running.
struct Application(std::process::Child);

impl Application {
    #[track_caller]
    fn start(dir: &Path) -> Application {
        let line = format!(
            "trap 'cat {dir}/conf/app.conf > {dir}/seen' HUP; echo $$ > {dir}/pid; while :; do sleep 0.05; done",
            dir = dir.display()
        );
        let mut command = std::process::Command::new("sh");
        let child = with_default_reload_signals(command.arg("-c").arg(line))
            .spawn()
            .unwrap();
        let app = Application(child);
        assert!(
            file_exists_within(&dir.join("pid"), WAIT),
            "the application did not start"
        );
        app
    }
}

impl Drop for Application {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn config_reload_script_validates_signals_and_confirms() {
    let dir = files();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(conf.join("app.conf"), "valid 1").unwrap();
    let _app = Application::start(dir.path());
    let d = dir.path().display().to_string();
    let mut command = command();
    command
        .arg("serve")
        .args([
            "--script",
            "scripts/config-reload.rhai",
            "--token-env",
            "TOKEN",
        ])
        .args(["--watch", &format!("{d}/conf"), "--watch-debounce", "100ms"])
        .env("CONFIG_VALIDATE", "grep -q '^valid' \"$CHANGED_PATH\"")
        .env("RELOAD_PIDFILE", format!("{d}/pid"))
        .env(
            "CONFIRM_COMMAND",
            format!("cmp -s {d}/seen \"$CHANGED_PATH\""),
        )
        .env("CONFIRM_ATTEMPTS", "5");
    let server = Server::spawn(command, Scratch::new(), &["--listen", "127.0.0.1:0"], &[]);

    std::fs::write(conf.join("app.conf"), "valid 2").unwrap();
    server.log.wait_for("reloaded: sent HUP");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("seen")).unwrap(),
        "valid 2"
    );

    // A config that fails validation is never signalled: the application keeps the old one.
    std::fs::write(conf.join("app.conf"), "broken").unwrap();
    let failed = server.log.wait_for("config rejected");
    assert!(failed.contains("watch 2 failed"), "{failed}");
    server.log.wait_for("watch 2 path=");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("seen")).unwrap(),
        "valid 2"
    );
}

#[test]
fn a_reload_that_drops_the_needed_function_keeps_the_old_script() {
    let script = "fn handle(req) { \"old\" }\nfn on_tick(tick) { }";
    let server = Server::start(script, &["--every", "1h"]);
    server
        .scratch
        .write("handler.rhai", "fn handle(req) { \"new\" }");
    server.signal(1);
    let line = server.log.wait_for("script reload failed");
    assert!(line.contains("on_tick"), "{line}");
    assert_eq!(server.ask("x"), "old");
}

#[test]
fn a_change_inotify_cannot_see_is_found_by_the_periodic_comparison() {
    // A hard link: a write through `elsewhere/app.conf` is an inotify event of `elsewhere/`
    // only, never of the watched `conf/` directory, as on volumes that send no events at all.
    let dir = files();
    let (conf, elsewhere) = (dir.path().join("conf"), dir.path().join("elsewhere"));
    std::fs::create_dir(&conf).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    let file = conf.join("app.conf");
    std::fs::write(&file, "a=1").unwrap();
    std::fs::hard_link(&file, elsewhere.join("app.conf")).unwrap();
    let path = file.display().to_string();
    let server = Server::start(WATCHER, &["--watch", &path, "--watch-poll", "300ms"]);
    server.log.wait_for("listening on");
    std::fs::write(elsewhere.join("app.conf"), "a=2").unwrap();
    server.log.wait_for(&format!("EVENT modified {path}"));
}
