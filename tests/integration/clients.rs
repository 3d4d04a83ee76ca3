//! The clients users already have: every netcat flavour and socat, driven through `/bin/sh`
//! exactly as a user types them, must get the reply and exit on their own.

use crate::util::*;

const HELLO: &str = r#"fn handle(req) { "hello from the server: " + req.payload + "\n" }"#;

/// Runs `pipeline` (with `$TOKEN` and `$PORT` set) and checks that it printed `want` and exited 0.
#[track_caller]
fn client_gets(client: &str, pipeline: &str, want: &str) {
    if !require(client, "apt-get install netcat-openbsd busybox ncat socat") {
        return;
    }
    let server = Server::start(HELLO, &[]);
    let line = format!("TOKEN='{TOKEN}' PORT={}; {pipeline}", server.port());
    let out = shell(&line);
    assert!(
        out.status.success(),
        "`{pipeline}` failed: {out:?}; log:\n{}",
        server.log.text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), want, "`{pipeline}`");
    server.log.wait_for("request 1 peer");
}

#[test]
fn openbsd_netcat() {
    client_gets(
        "nc",
        r#"echo "$TOKEN hi" | nc 127.0.0.1 $PORT"#,
        "hello from the server: hi\n",
    );
}

#[test]
fn openbsd_netcat_with_half_close_and_no_newline() {
    client_gets(
        "nc",
        r#"printf '%s cmd' "$TOKEN" | nc -N 127.0.0.1 $PORT"#,
        "hello from the server: cmd\n",
    );
}

#[test]
fn busybox_netcat() {
    client_gets(
        "busybox",
        r#"echo "$TOKEN hi" | busybox nc 127.0.0.1 $PORT"#,
        "hello from the server: hi\n",
    );
}

#[test]
fn nmap_ncat() {
    client_gets(
        "ncat",
        r#"echo "$TOKEN hi" | ncat 127.0.0.1 $PORT"#,
        "hello from the server: hi\n",
    );
}

#[test]
fn socat() {
    client_gets(
        "socat",
        r#"echo "$TOKEN hi" | socat - TCP:127.0.0.1:$PORT"#,
        "hello from the server: hi\n",
    );
}
