//! HTTP framing, webhook helpers, metrics and health (issue 7), driven by real `curl`.

use crate::util::*;
use std::process::Output;

const SCRIPT: &str = r#"
fn handle(req) {
    switch req.args.len {
        0 => `${req.method} ${req.path} ${req.query} ${req.token_name} ${req.payload.len}`,
        _ => switch req.args[0] {
            "echo" => req.payload,
            "args" => `${req.args}`,
            "header" => req.headers["x-thing"],
            "blob" => blob(3, 65),
            "none" => (),
            "teapot" => #{ status: 418, headers: #{ "x-kind": "tea" }, body: "short and stout" },
            "live" => { write("one "); write("two "); "three" },
            "fail" => throw "no",
            "slow" => { exec(["sleep", "5"]); "late" },
        }
    }
}
"#;

fn start(args: &[&str]) -> Server {
    let mut all = vec!["--framing", "http"];
    all.extend_from_slice(args);
    Server::start(SCRIPT, &all)
}

/// Runs curl with a bounded time; `-sS` plus the given arguments.
fn curl(args: &str) -> Output {
    assert!(
        have("curl"),
        "curl is missing: apt-get install curl (.ci/run does)"
    );
    shell(&format!("curl -sS --max-time 10 {args}"))
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn url(server: &Server, path: &str) -> String {
    format!("'http://{}{path}'", server.addr())
}

#[test]
fn get_with_bearer_or_x_token_and_the_request_fields() {
    let server = start(&[]);
    let out = curl(&format!(
        "-H 'Authorization: Bearer {TOKEN}' {}",
        url(&server, "/?a=1&b=x+y")
    ));
    assert_eq!(text(&out), r#"GET / #{"a": "1", "b": "x y"} default 0"#);
    let out = curl(&format!(
        "-H 'X-Token: {TOKEN}' -H 'X-Thing: 1' -H 'X-Thing: 2' {}",
        url(&server, "/header")
    ));
    assert_eq!(text(&out), "1, 2");
    let out = curl(&format!(
        "-H 'X-Token: {TOKEN}' {}",
        url(&server, "/args/a%20b//c/")
    ));
    assert_eq!(text(&out), r#"["args", "a b", "c"]"#);
}

#[test]
fn missing_token_is_401_with_www_authenticate_and_never_a_query_token() {
    let server = start(&[]);
    let out = curl(&format!("-i {}", url(&server, &format!("/?token={TOKEN}"))));
    let reply = text(&out);
    assert!(
        reply.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
        "{reply}"
    );
    assert!(
        reply.contains("www-authenticate: Bearer\r\n") && reply.ends_with("ERR unauthorized\n"),
        "{reply}"
    );
}

#[test]
fn post_bodies_by_length_file_and_chunked_upload() {
    let server = start(&[]);
    let auth = format!("-H 'X-Token: {TOKEN}'");
    let out = curl(&format!(
        "{auth} --data-binary 'hello body' {}",
        url(&server, "/echo")
    ));
    assert_eq!(text(&out), "hello body");
    let file = server.scratch.write("upload.txt", &"line\n".repeat(5000));
    let out = curl(&format!(
        "{auth} --data-binary @{} {}",
        file.display(),
        url(&server, "/echo")
    ));
    assert_eq!(out.stdout.len(), 25_000);
    // -T - streams stdin with Transfer-Encoding: chunked (and Expect: 100-continue).
    let out = shell(&format!(
        "head -c 50000 /dev/zero | tr '\\0' x | curl -sS --max-time 10 {auth} -T - {}",
        url(&server, "/echo")
    ));
    assert_eq!(out.stdout, vec![b'x'; 50_000]);
}

#[test]
fn keep_alive_reuses_the_connection_and_http10_closes() {
    let server = start(&[]);
    let auth = format!("-H 'X-Token: {TOKEN}'");
    let out = curl(&format!(
        "-v {auth} {} {}",
        url(&server, "/args/1"),
        url(&server, "/args/2")
    ));
    assert_eq!(text(&out), r#"["args", "1"]["args", "2"]"#);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Re-using existing connection"),
        "no reuse"
    );
    let out = curl(&format!("-0 -i {auth} {}", url(&server, "/echo")));
    assert!(
        text(&out).starts_with("HTTP/1.0 200 OK\r\n")
            && text(&out).contains("connection: close\r\n")
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = start(&[]);
    let one = format!("GET /args/1 HTTP/1.1\r\nHost: x\r\nX-Token: {TOKEN}\r\n\r\n");
    let two = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nX-Token: {TOKEN}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    );
    let reply = String::from_utf8(server.exchange(format!("{one}{two}").as_bytes())).unwrap();
    let first = reply.find("[\"args\", \"1\"]").expect("first reply");
    let second = reply.rfind("abc").expect("second reply");
    assert!(
        first < second && reply.matches("HTTP/1.1 200 OK").count() == 2,
        "{reply}"
    );
}

#[test]
fn reply_forms_map_to_statuses_and_types() {
    let server = start(&[]);
    let auth = format!("-H 'X-Token: {TOKEN}'");
    let head = |path: &str| text(&curl(&format!("-i {auth} {}", url(&server, path))));
    let blob = head("/blob");
    assert!(
        blob.contains("content-type: application/octet-stream\r\n")
            && blob.ends_with("\r\n\r\nAAA"),
        "{blob}"
    );
    assert!(head("/none").starts_with("HTTP/1.1 204 No Content\r\n"));
    let teapot = head("/teapot");
    assert!(
        teapot.starts_with("HTTP/1.1 418 ") && teapot.contains("x-kind: tea\r\n"),
        "{teapot}"
    );
    let fail = head("/fail");
    assert!(
        fail.starts_with("HTTP/1.1 500 ") && fail.ends_with("ERR handler failed (request 4)\n"),
        "{fail}"
    );
    let live = head("/live");
    assert!(
        live.contains("transfer-encoding: chunked\r\n") && live.ends_with("one two three"),
        "{live}"
    );
}

#[test]
fn server_errors_map_to_413_400_504_503_and_429() {
    let server = start(&[
        "--max-request-bytes",
        "1000",
        "--handler-timeout",
        "300ms",
        "--auth-failures",
        "3",
    ]);
    let auth = format!("-H 'X-Token: {TOKEN}'");
    let status = |args: String| text(&curl(&format!("-o /dev/null -w '%{{http_code}}' {args}")));
    assert_eq!(
        status(format!(
            "{auth} --data-binary @/etc/services {}",
            url(&server, "/echo")
        )),
        "413"
    );
    assert_eq!(status(format!("{auth} {}", url(&server, "/slow"))), "504");
    assert!(
        server
            .exchange(b"NOT HTTP AT ALL\r\n\r\n")
            .starts_with(b"HTTP/1.1 400 Bad Request\r\n")
    );
    for _ in 0..3 {
        assert_eq!(
            status(format!("-H 'X-Token: wrong' {}", url(&server, "/"))),
            "401"
        );
    }
    assert_eq!(status(format!("{auth} {}", url(&server, "/"))), "429");
    let busy = start(&["--workers", "1", "--queue", "0", "--handler-timeout", "1s"]);
    let slow = shell(&format!(
        "curl -sS -o /dev/null --max-time 10 {auth} {} & sleep 0.5; curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}' {auth} {}; wait",
        url(&busy, "/slow"),
        url(&busy, "/")
    ));
    assert_eq!(text(&slow), "503");
}

/// HMAC-SHA256 of `body` as GitHub puts it in `X-Hub-Signature-256`.
fn github_signature(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[test]
fn github_webhook_pulls_only_for_signed_pushes_to_the_branch() {
    let scratch = Scratch::new();
    let (origin, clone) = (scratch.path("origin"), scratch.path("clone"));
    let git = |args: &str| {
        let out = shell(&format!(
            "git -c user.name=t -c user.email=t@t -c init.defaultBranch=main {args}"
        ));
        assert!(
            out.status.success(),
            "git {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&format!("init -q {}", origin.display()));
    git(&format!(
        "-C {} commit -q --allow-empty -m one",
        origin.display()
    ));
    git(&format!(
        "clone -q {} {}",
        origin.display(),
        clone.display()
    ));
    git(&format!(
        "-C {} commit -q --allow-empty -m two",
        origin.display()
    ));
    let new_head = git(&format!("-C {} rev-parse HEAD", origin.display()));

    let secret = "webhook-secret";
    let mut command = command();
    command.arg("serve").args([
        "--script",
        "scripts/github-webhook.rhai",
        "--token-env",
        "TOKEN",
    ]);
    command.args(["--framing", "http", "--auth", "script"]);
    command
        .env("GITHUB_WEBHOOK_SECRET", secret)
        .env("REPO_DIR", &clone)
        .env("BRANCH", "main");
    let server = Server::spawn(command, scratch, &["--listen", "127.0.0.1:0"], &[]);

    let post = |event: &str, body: &str, signature: &str| {
        let file = server.scratch.write("payload.json", body);
        let args = format!(
            "-H 'X-GitHub-Event: {event}' -H 'X-Hub-Signature-256: {signature}' -H 'Content-Type: application/json' --data-binary @{} -w ' %{{http_code}}' {}",
            file.display(),
            url(&server, "/")
        );
        text(&curl(&args))
    };
    let push_other = r#"{"ref":"refs/heads/dev"}"#;
    let push_main = r#"{"ref":"refs/heads/main","after":"x"}"#;
    assert_eq!(
        post("push", push_main, "sha256=0000"),
        "bad signature\n 401"
    );
    assert_eq!(
        post(
            "push",
            push_main,
            &github_signature("other", push_main.as_bytes())
        ),
        "bad signature\n 401"
    );
    assert_eq!(
        post(
            "push",
            push_other,
            &github_signature(secret, push_other.as_bytes())
        ),
        "ignored push to refs/heads/dev\n 202"
    );
    assert_ne!(
        git(&format!(
            "-C {} rev-parse HEAD",
            server.scratch.path("clone").display()
        )),
        new_head
    );
    let reply = post(
        "push",
        push_main,
        &github_signature(secret, push_main.as_bytes()),
    );
    // The pull runs as a background job keyed "deploy" (issue 13); the reply names it at once.
    assert!(
        reply.ends_with(" 202") && reply.contains(r#""job":"#),
        "{reply}"
    );
    let deadline = std::time::Instant::now() + WAIT;
    let clone = server.scratch.path("clone");
    while git(&format!("-C {} rev-parse HEAD", clone.display())) != new_head {
        assert!(
            std::time::Instant::now() < deadline,
            "the pull job did not update the clone"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn script_helpers_hash_sign_compare_and_convert_json() {
    let script = r#"fn handle(req) {
        let data = parse_json(req.payload);
        [sha256("abc"), hmac_sha256("key", "msg"), secure_eq("a", "a"), secure_eq("a", "ab"),
         to_json(data), data.list[1]].reduce(|acc, v| acc + v + "\n", "")
    }"#;
    let server = Server::start(script, &[]);
    let reply = server.ask(r#"{"list":[1,"two",{"x":null}]}"#);
    let expected = [
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "2d93cbc1be167bcb1637a4a23cbff01a7878f0c50ee833954ea5221bb1b8c628",
        "true",
        "false",
        r#"{"list":[1,"two",{"x":null}]}"#,
        "two",
    ];
    assert_eq!(reply, expected.map(|l| format!("{l}\n")).concat());
    assert!(server.ask("{not json").starts_with("ERR handler failed"));
    server.log.wait_for("parse_json");
}

/// Server with `--metrics-listen`; its metrics address is the last `--print-addr` line.
fn start_with_metrics(framing: &str) -> (Server, String) {
    let mut command = command();
    let scratch = Scratch::new();
    let script = scratch.write(
        "handler.rhai",
        r#"fn handle(req) { exec(["true"]); exec(["false"]); "ok" }"#,
    );
    command.arg("serve").arg("--script").arg(script).args([
        "--token-env",
        "TOKEN",
        "--framing",
        framing,
    ]);
    let listen = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];
    let server = Server::spawn(command, scratch, &listen, &[]);
    let metrics = server.addrs[1].to_string();
    (server, metrics)
}

#[test]
fn metrics_count_known_traffic_and_parse_as_openmetrics() {
    let (server, metrics) = start_with_metrics("line");
    for _ in 0..3 {
        assert_eq!(server.ask("x"), "ok");
    }
    assert_eq!(server.exchange(b"wrong x\n"), b"ERR unauthorized\n");
    let body = text(&curl(&format!("http://{metrics}/metrics")));
    for expected in [
        "command_trigger_requests_total{outcome=\"ok\"} 3",
        "command_trigger_requests_total{outcome=\"unauthorized\"} 1",
        "command_trigger_request_duration_seconds_count 4",
        "command_trigger_commands_total{success=\"true\"} 3",
        "command_trigger_commands_total{success=\"false\"} 3",
        "command_trigger_auth_failures_total 1",
        "command_trigger_busy_workers 0",
        "command_trigger_queue_depth 0",
    ] {
        assert!(body.contains(expected), "missing {expected} in:\n{body}");
    }
    // Validated by the reference parser of the Prometheus Python client.
    let parser = shell("python3 -c 'import prometheus_client'");
    if !parser.status.success()
        && !require(
            "prometheus-client-for-python3",
            "pip install prometheus-client",
        )
    {
        return;
    }
    let file = server.scratch.write("metrics.txt", &body);
    let check = shell(&format!(
        "python3 -c 'import sys; from prometheus_client.openmetrics.parser import text_string_to_metric_families as p; print(len(list(p(open(sys.argv[1]).read()))))' {}",
        file.display()
    ));
    assert!(
        check.status.success(),
        "not valid OpenMetrics: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn health_and_readiness_follow_the_lifecycle_in_every_framing() {
    for framing in ["line", "stream", "http"] {
        let (mut server, metrics) = start_with_metrics(framing);
        let code = |path: &str| {
            text(&curl(&format!(
                "-o /dev/null -w '%{{http_code}}' http://{metrics}{path}"
            )))
        };
        assert_eq!(
            (code("/healthz"), code("/readyz"), code("/nope")),
            ("200".into(), "200".into(), "404".into())
        );
        // A long request keeps the server in its shutdown drain while we look.
        let (started, go) = (server.scratch.path("started"), server.scratch.path("go"));
        let wait = format!(
            "touch '{}'; while [ ! -e '{}' ]; do sleep 0.01; done",
            started.display(),
            go.display()
        );
        let script = format!(r#"fn handle(req) {{ exec(["sh", "-c", "{wait}"]); "done" }}"#);
        std::fs::write(server.scratch.path("handler.rhai"), script).unwrap();
        server.signal(1);
        server.log.wait_for("script reloaded (SIGHUP)");
        let request = match framing {
            "http" => format!("GET / HTTP/1.1\r\nX-Token: {TOKEN}\r\n\r\n"),
            _ => format!("{TOKEN} x\n"),
        };
        let mut pending = open_with(server.addr(), request.as_bytes());
        if framing == "stream" {
            pending.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert!(
            file_exists_within(&started, WAIT),
            "{framing}: the request never started"
        );
        server.signal(15);
        server.log.wait_for("shutting down");
        assert_eq!(
            (code("/healthz"), code("/readyz")),
            ("503".into(), "503".into()),
            "{framing}"
        );
        std::fs::write(&go, "").unwrap();
        let reply = String::from_utf8_lossy(&read_to_close(&mut pending)).into_owned();
        assert!(reply.ends_with("done"), "{framing}: {reply}");
        assert!(server.wait_exit().success());
    }
}
