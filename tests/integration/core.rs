//! The core sidecar (issue 2): framing, auth, replies, limits, lifecycle.

use crate::util::*;

const ECHO: &str = r#"fn handle(req) { "payload=" + req.payload + "\n" }"#;

#[test]
fn answers_a_line_and_closes() {
    let server = Server::start(ECHO, &[]);
    assert_eq!(server.ask("hello  world "), "payload=hello  world \n");
}

#[test]
fn wrong_token_never_reaches_the_script() {
    let server = Server::start(ECHO, &[]);
    assert_eq!(server.exchange(b"nope hello\n"), b"ERR unauthorized\n");
    let line = server.log.wait_for("outcome=unauthorized");
    assert!(!line.contains(TOKEN));
}
