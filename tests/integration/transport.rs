//! TLS, client certificates, certificate rotation and Unix sockets (SPEC §11), through the real
//! binary and the clients users have: `openssl s_client`, `curl`, `ncat --ssl`, `socat`,
//! `nc -U`, and our own `send`. Certificates are made per test with the openssl CLI.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Tells the script's view of the transport back to the client.
const ECHO: &str = r#"
fn handle(req) {
    let tls = if req.tls == () { "-" } else { `${req.tls.version} sni=${req.tls.sni}` };
    let client = if req.tls == () || req.tls.client == () { "-" } else {
        let c = req.tls.client;
        `cn=${c.cn} sans=${c.sans} serial=${c.serial} sha256=${c.fingerprint_sha256} not_after=${c.not_after}`
    };
    let cred = if req.peer_cred == () { "-" } else { `uid=${req.peer_cred.uid} gid=${req.peer_cred.gid}` };
    `listener=${req.listener} peer=${req.peer} tls=${tls} client=${client} cred=${cred} payload=${req.payload} body=${req.body.len()}
`
}
"#;

const INSTALL: &str = "apt-get install openssl curl ncat socat netcat-openbsd";

/// Runs openssl with `args` in `dir`; fails the test if it fails.
#[track_caller]
fn openssl(dir: &Path, args: &str) {
    let out = shell(&format!("cd '{}' && openssl {args}", dir.display()));
    assert!(out.status.success(), "openssl {args}: {out:?}");
}

/// A test CA, a server certificate for `localhost`/127.0.0.1, a client certificate, and a
/// second CA with a client certificate of its own (the wrong CA).
struct Certs {
    dir: PathBuf,
}

impl Certs {
    #[track_caller]
    fn make(scratch: &Scratch) -> Certs {
        let dir = scratch.path("pki");
        std::fs::create_dir_all(&dir).unwrap();
        let certs = Certs { dir };
        for ca in ["ca", "wrong-ca"] {
            openssl(
                &certs.dir,
                &format!(
                    "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {ca}.key -out {ca}.crt -days 30 -subj '/CN={ca}'"
                ),
            );
        }
        certs.leaf(
            "server",
            "ca",
            "/CN=localhost",
            "DNS:localhost,IP:127.0.0.1",
            "serverAuth",
        );
        certs.leaf(
            "client",
            "ca",
            "/O=ci/CN=ci-bot",
            "DNS:ci.prod.svc,URI:spiffe://cluster/ns/prod/sa/ci,IP:10.0.0.7",
            "clientAuth",
        );
        certs.leaf(
            "stranger",
            "wrong-ca",
            "/CN=stranger",
            "DNS:stranger",
            "clientAuth",
        );
        certs
    }

    /// `NAME.crt` and `NAME.key` (EC, PKCS#8) signed by `ca`.
    #[track_caller]
    fn leaf(&self, name: &str, ca: &str, subject: &str, san: &str, usage: &str) {
        self.leaf_with_key(
            name,
            ca,
            subject,
            san,
            usage,
            "-newkey ec -pkeyopt ec_paramgen_curve:P-256",
        );
    }

    #[track_caller]
    fn leaf_with_key(
        &self,
        name: &str,
        ca: &str,
        subject: &str,
        san: &str,
        usage: &str,
        key: &str,
    ) {
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!("subjectAltName={san}\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        openssl(
            &self.dir,
            &format!("req {key} -nodes -keyout {name}.key -out {name}.csr -subj '{subject}'"),
        );
        openssl(
            &self.dir,
            &format!(
                "x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial -out {name}.crt -days 30 -extfile {name}.ext"
            ),
        );
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// `openssl x509` facts of a certificate, e.g. `-serial` or `-fingerprint -sha256`.
    #[track_caller]
    fn x509(&self, file: &str, what: &str) -> String {
        let out = shell(&format!(
            "openssl x509 -noout {what} -in '{}'",
            self.path(file)
        ));
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Starts `serve` with `script`, the test token, `listen` (each `--listen X`) and `args`.
#[track_caller]
fn start_with(scratch: Scratch, script: &str, listen: &[&str], args: &[String]) -> Server {
    let listen: Vec<&str> = listen.iter().flat_map(|l| ["--listen", l]).collect();
    spawn_raw(scratch, script, &listen, args)
}

/// Like `start_with`, with the listener flags as given (`--metrics-listen` among them).
#[track_caller]
fn spawn_raw(scratch: Scratch, script: &str, listen: &[&str], args: &[String]) -> Server {
    let path = scratch.write("handler.rhai", script);
    let command = serve_command(&path);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::spawn(command, scratch, listen, &args)
}

fn tls_args(certs: &Certs) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        certs.path("server.crt"),
        "--tls-key".into(),
        certs.path("server.key"),
    ]
}

/// Test certificates in a new scratch directory, and the TLS flags plus `extra`; none (the
/// test is skipped) without openssl.
fn tls_setup(extra: &[&str]) -> Option<(Scratch, Certs, Vec<String>)> {
    if !require("openssl", INSTALL) {
        return None;
    }
    let scratch = Scratch::new();
    let certs = Certs::make(&scratch);
    let mut args = tls_args(&certs);
    args.extend(extra.iter().map(|a| a.to_string()));
    Some((scratch, certs, args))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `line` with `$TOKEN`, `$PORT` and `$PKI` set.
#[track_caller]
fn run(line: &str, port: u16, certs: &Certs) -> Output {
    shell(&format!(
        "export TOKEN='{TOKEN}' PORT={port} PKI='{}'; {line}",
        certs.dir.display()
    ))
}

#[track_caller]
fn tls_client_gets(client: &str, pipeline: &str, want: &[&str]) {
    if !require(client, INSTALL) {
        return;
    }
    let Some((scratch, certs, args)) = tls_setup(&[]) else {
        return;
    };
    let server = start_with(scratch, ECHO, &["tls://127.0.0.1:0"], &args);
    let out = run(pipeline, server.port(), &certs);
    let text = stdout(&out);
    for needle in want {
        assert!(
            text.contains(needle),
            "`{pipeline}`: want {needle:?} in {out:?}; log:\n{}",
            server.log.text()
        );
    }
}

#[test]
fn openssl_s_client_over_tls_1_3() {
    tls_client_gets(
        "openssl",
        r#"echo "$TOKEN hi" | openssl s_client -quiet -connect 127.0.0.1:$PORT -CAfile $PKI/ca.crt -verify_return_error 2>/dev/null"#,
        &[
            "listener=tls peer=127.0.0.1:",
            "tls=TLSv1.3 sni=",
            "payload=hi",
        ],
    );
}

#[test]
fn tls_1_2_serves_and_1_1_is_refused() {
    tls_client_gets(
        "openssl",
        r#"echo "$TOKEN v12" | openssl s_client -quiet -tls1_2 -connect 127.0.0.1:$PORT -CAfile $PKI/ca.crt 2>/dev/null;
           echo "$TOKEN v11" | openssl s_client -quiet -tls1_1 -cipher DEFAULT@SECLEVEL=0 -connect 127.0.0.1:$PORT 2>/dev/null || echo "1.1 refused""#,
        &["tls=TLSv1.2 sni=", "payload=v12", "1.1 refused"],
    );
}

#[test]
fn socat_openssl_close_notify_is_a_half_close() {
    // socat ends its input with close_notify; the reply must still come.
    tls_client_gets(
        "socat",
        r#"echo "$TOKEN via-socat" | socat - OPENSSL:localhost:$PORT,cafile=$PKI/ca.crt"#,
        &["listener=tls", "sni=localhost", "payload=via-socat"],
    );
}

#[test]
fn ncat_ssl() {
    tls_client_gets(
        "ncat",
        r#"echo "$TOKEN via-ncat" | ncat --ssl --ssl-trustfile $PKI/ca.crt --ssl-verify localhost $PORT"#,
        &["listener=tls", "payload=via-ncat"],
    );
}

#[test]
fn stream_framing_body_over_tls() {
    if !require("socat", INSTALL) {
        return;
    }
    let Some((scratch, certs, args)) = tls_setup(&["--framing", "stream"]) else {
        return;
    };
    let server = start_with(scratch, ECHO, &["tls://127.0.0.1:0"], &args);
    let out = run(
        r#"(echo "$TOKEN upload"; head -c 50000 /dev/zero) | socat - OPENSSL:127.0.0.1:$PORT,cafile=$PKI/ca.crt,verify=0"#,
        server.port(),
        &certs,
    );
    assert!(
        stdout(&out).contains("payload=upload body=50000"),
        "{out:?}"
    );
}

#[test]
fn send_over_tls_checks_the_server_certificate() {
    let Some((scratch, certs, args)) = tls_setup(&[]) else {
        return;
    };
    let server = start_with(scratch, ECHO, &["tls://127.0.0.1:0"], &args);
    let port = server.port();
    let send = |extra: &str| {
        let bin = binary().display().to_string();
        run(
            &format!("{bin} send --token-env TOKEN {extra} hello"),
            port,
            &certs,
        )
    };
    let by_ip = send("--cacert $PKI/ca.crt tls://127.0.0.1:$PORT");
    assert_eq!(by_ip.status.code(), Some(0), "{by_ip:?}");
    assert!(stdout(&by_ip).contains("listener=tls"), "{by_ip:?}");
    assert!(
        stdout(&by_ip).contains("sni= client="),
        "no SNI for an IP: {by_ip:?}"
    );
    let named = send("--cacert $PKI/ca.crt --servername localhost --all tls://127.0.0.1:$PORT");
    assert_eq!(named.status.code(), Some(0), "{named:?}");
    assert!(
        stdout(&named).starts_with(&format!("127.0.0.1:{port} listener=tls")),
        "{named:?}"
    );
    assert!(stdout(&named).contains("sni=localhost"), "{named:?}");
    let wrong_ca = send("--cacert $PKI/wrong-ca.crt tls://127.0.0.1:$PORT");
    assert_eq!(wrong_ca.status.code(), Some(1), "{wrong_ca:?}");
    assert!(
        String::from_utf8_lossy(&wrong_ca.stderr).contains("certificate"),
        "{wrong_ca:?}"
    );
    let wrong_name = send("--cacert $PKI/ca.crt --servername other.example tls://127.0.0.1:$PORT");
    assert_eq!(wrong_name.status.code(), Some(1), "{wrong_name:?}");
}

/// An mTLS server with HTTP framing (curl).
fn mtls_http(extra: &[&str]) -> (Server, Certs) {
    let scratch = Scratch::new();
    let certs = Certs::make(&scratch);
    let mut args = tls_args(&certs);
    args.extend(["--tls-client-ca".into(), certs.path("ca.crt")]);
    args.extend(["--framing".into(), "http".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    // The certificates live as long as the server, which owns `scratch`.
    let server = start_with(scratch, ECHO, &["tls://127.0.0.1:0"], &args);
    (server, certs)
}

#[test]
fn https_with_client_certificate_hands_its_identity_to_the_script() {
    if !require("curl", INSTALL) || !require("openssl", INSTALL) {
        return;
    }
    let (server, certs) = mtls_http(&[]);
    let port = server.port();
    let curl = r#"curl -sS -v --cacert $PKI/ca.crt --cert $PKI/client.crt --key $PKI/client.key \
        --resolve localhost:$PORT:127.0.0.1 -H "Authorization: Bearer $TOKEN" https://localhost:$PORT/x -d body-text 2>&1"#;
    let out = run(curl, port, &certs);
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}; log:\n{}", server.log.text());
    assert!(text.contains("ALPN: server accepted http/1.1"), "{text}");
    assert!(text.contains("cn=ci-bot"), "{text}");
    assert!(
        text.contains(
            r#"sans=["dns:ci.prod.svc", "uri:spiffe://cluster/ns/prod/sa/ci", "ip:10.0.0.7"]"#
        ),
        "{text}"
    );
    let serial = certs.x509("client.crt", "-serial");
    let serial = serial.trim_start_matches("serial=").to_lowercase();
    assert!(
        text.contains(&format!("serial={serial}")),
        "want {serial} in {text}"
    );
    let fingerprint = certs.x509("client.crt", "-fingerprint -sha256");
    let fingerprint = fingerprint
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase();
    assert!(text.contains(&format!("sha256={fingerprint}")), "{text}");
    assert!(text.contains("sni=localhost"), "{text}");
}

#[test]
fn client_certificates_from_no_or_the_wrong_ca_fail_and_count_as_auth_failures() {
    if !require("curl", INSTALL) || !require("openssl", INSTALL) {
        return;
    }
    let (server, certs) = mtls_http(&["--auth-failures", "2"]);
    let port = server.port();
    let base = r#"curl -sS --max-time 5 --cacert $PKI/ca.crt -H "Authorization: Bearer $TOKEN" https://127.0.0.1:$PORT/x"#;
    let none = run(base, port, &certs);
    assert!(
        !none.status.success(),
        "no client certificate was accepted: {none:?}"
    );
    let wrong = run(
        &format!("{base} --cert $PKI/stranger.crt --key $PKI/stranger.key"),
        port,
        &certs,
    );
    assert!(
        !wrong.status.success(),
        "a wrong-CA certificate was accepted: {wrong:?}"
    );
    server.log.wait_for("failed authentications within 60 s");
    // Backed off: even the right certificate gets no handshake for a while.
    let good = run(
        &format!("{base} --cert $PKI/client.crt --key $PKI/client.key"),
        port,
        &certs,
    );
    assert!(
        !good.status.success(),
        "a backed-off IP was served: {good:?}"
    );
}

#[test]
fn tokenless_start_when_every_listener_authenticates() {
    if !require("curl", INSTALL) || !require("openssl", INSTALL) {
        return;
    }
    let scratch = Scratch::new();
    let certs = Certs::make(&scratch);
    let sock = scratch.path("ct.sock");
    let script = scratch.write("handler.rhai", ECHO);
    let serve = || {
        let mut command = command();
        command.arg("serve").arg("--script").arg(&script);
        command
            .args(tls_args(&certs))
            .args(["--tls-client-ca", &certs.path("ca.crt")]);
        command
    };
    let unix = format!("unix:{}", sock.display());
    // With a plain listener too, a token is still required.
    let out = serve()
        .args(["--listen", "127.0.0.1:0", "--listen", "tls://127.0.0.1:0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token source"));
    let listen = ["--listen", "tls://127.0.0.1:0", "--listen", &unix];
    let server = Server::spawn(serve(), Scratch::new(), &listen, &[]);
    let bin = binary().display().to_string();
    let out = run(
        &format!(
            "{bin} send --cacert $PKI/ca.crt --cert $PKI/client.crt --key $PKI/client.key tls://127.0.0.1:$PORT whole line"
        ),
        server.port(),
        &certs,
    );
    assert!(stdout(&out).contains("cn=ci-bot"), "{out:?}");
    assert!(stdout(&out).contains("payload=whole line"), "{out:?}");
    let out = shell(&format!("{bin} send {unix} over unix"));
    assert!(stdout(&out).contains("listener=unix"), "{out:?}");
    assert!(stdout(&out).contains("payload=over unix"), "{out:?}");
}

#[test]
fn mixed_listeners_tell_the_script_which_one() {
    if !require("openssl", INSTALL) || !require("nc", INSTALL) {
        return;
    }
    let scratch = Scratch::new();
    let certs = Certs::make(&scratch);
    let sock = scratch.path("mixed.sock");
    let unix = format!("unix:{}", sock.display());
    let server = start_with(
        scratch,
        ECHO,
        &["127.0.0.1:0", "tls://127.0.0.1:0", &unix],
        &tls_args(&certs),
    );
    assert!(server.ask("plain").contains("listener=tcp"));
    let out = run(
        &format!(
            r#"echo "$TOKEN t" | openssl s_client -quiet -connect {} 2>/dev/null"#,
            server.addrs[1]
        ),
        0,
        &certs,
    );
    assert!(stdout(&out).contains("listener=tls"), "{out:?}");
    let out = shell(&format!(r#"echo "{TOKEN} u" | nc -U {}"#, sock.display()));
    let uid = rustix::process::getuid().as_raw();
    assert!(
        stdout(&out).contains(&format!(
            "listener=unix peer=unix tls=- client=- cred=uid={uid}"
        )),
        "{out:?}"
    );
}

#[test]
fn garbage_to_a_tls_port_is_closed_and_serving_goes_on() {
    use std::io::{Read, Write};
    if !require("openssl", INSTALL) {
        return;
    }
    let scratch = Scratch::new();
    let certs = Certs::make(&scratch);
    let listen = [
        "--listen",
        "tls://127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let server = spawn_raw(scratch, ECHO, &listen, &tls_args(&certs));
    let started = cpu_ticks(server.child.id());
    let mut seed = 0x9e3779b97f4a7c15u64;
    for _ in 0..200 {
        let mut stream = connect(server.addr());
        let garbage: Vec<u8> = (0..512)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = stream.write_all(&garbage);
        let mut sink = Vec::new();
        // Closed (or reset) by the server, well before the test's wait runs out.
        let _ = stream.read_to_end(&mut sink);
        assert!(
            sink.len() < 64,
            "the server answered garbage with {} bytes",
            sink.len()
        );
    }
    // 200 garbage connections cost little: a handshake is never attempted on them.
    let spent = cpu_ticks(server.child.id()) - started;
    println!("200 garbage connections to the TLS port: {spent} ticks of server CPU");
    assert!(
        spent < 100,
        "200 garbage connections took {spent} ticks of CPU"
    );
    let out = run(
        r#"echo "$TOKEN still" | openssl s_client -quiet -connect 127.0.0.1:$PORT 2>/dev/null"#,
        server.port(),
        &certs,
    );
    assert!(stdout(&out).contains("payload=still"), "{out:?}");
    let metrics = shell(&format!("curl -s http://{}/metrics", server.addrs[1]));
    let text = stdout(&metrics);
    let failed = text
        .lines()
        .find(|l| l.starts_with("command_trigger_tls_handshakes_total{result=\"failed\"}"))
        .unwrap_or_else(|| panic!("{text}"));
    let count: u64 = failed.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 200, "{failed}");
    assert!(
        text.contains("command_trigger_tls_cert_expiry_seconds "),
        "{text}"
    );
}

/// Lays out `dir` like a Kubernetes Secret volume: `..data` -> a timestamped directory, and
/// `tls.crt`/`tls.key` -> `..data/...`. Each call swaps `..data` atomically to a new version.
fn secret_volume(dir: &Path, version: &str, cert: &[u8], key: &[u8]) {
    let target = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("tls.crt"), cert).unwrap();
    std::fs::write(target.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

/// The subject of the certificate the server presents now.
#[track_caller]
fn served_subject(port: u16) -> String {
    let out = shell(&format!(
        "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -subject"
    ));
    stdout(&out)
}

#[test]
fn rotation_through_a_data_symlink_swap_and_a_garbage_file_keeps_the_old() {
    if !require("openssl", INSTALL) {
        return;
    }
    let scratch = Scratch::new();
    let certs = Certs::make(&scratch);
    certs.leaf(
        "renewed",
        "ca",
        "/CN=renewed",
        "DNS:localhost",
        "serverAuth",
    );
    let read = |f: &str| std::fs::read(certs.dir.join(f)).unwrap();
    let volume = scratch.path("secret");
    std::fs::create_dir_all(&volume).unwrap();
    secret_volume(&volume, "v1", &read("server.crt"), &read("server.key"));
    let args = vec![
        "--tls-cert".to_string(),
        volume.join("tls.crt").display().to_string(),
        "--tls-key".to_string(),
        volume.join("tls.key").display().to_string(),
        "--keep-alive".to_string(),
    ];
    let server = start_with(scratch, ECHO, &["tls://127.0.0.1:0"], &args);
    let port = server.port();
    assert!(served_subject(port).contains("CN = localhost"));
    // A connection opened before the swap keeps working after it.
    let mut open = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = open.stdin.take().unwrap();
    let output = open.stdout.take().unwrap();
    let (lines, replies) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(output)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let mut ask = |payload: &str| {
        use std::io::Write;
        writeln!(input, "{TOKEN} {payload}").unwrap();
        replies
            .recv_timeout(WAIT)
            .expect("no reply on the open connection")
    };
    assert!(ask("before").contains("payload=before"));

    secret_volume(&volume, "v2", &read("renewed.crt"), &read("renewed.key"));
    server.log.wait_for("TLS certificate reloaded");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !served_subject(port).contains("CN = renewed") {
        assert!(Instant::now() < deadline, "rotation not served within 10 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        ask("after").contains("payload=after"),
        "the open connection broke"
    );

    secret_volume(&volume, "v3", b"garbage", b"more garbage");
    server.log.wait_for("TLS reload failed");
    assert!(
        served_subject(port).contains("CN = renewed"),
        "the old certificate stopped"
    );
    let _ = open.kill();
    let _ = open.wait();
}

#[track_caller]
fn serve_fails(args: &[String], needle: &str) {
    let scratch = Scratch::new();
    let script = scratch.write("handler.rhai", ECHO);
    let mut command = serve_command(&script);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let status = wait_child(&mut child, WAIT).expect("serve did not exit");
    let mut stderr = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: want {needle:?} in {stderr}"
    );
}

#[test]
fn tls_and_unix_configuration_errors_exit_2_naming_the_file() {
    if !require("openssl", INSTALL) {
        return;
    }
    let scratch = Scratch::new();
    let certs = Certs::make(&scratch);
    let garbage = scratch.write("garbage.pem", "not a certificate\n");
    let regular = scratch.write("not-a-socket", "x");
    let s = |v: &str| v.to_string();
    let g = garbage.display().to_string();
    let tls = |cert: &str, key: &str| {
        vec![
            s("--listen"),
            s("tls://127.0.0.1:0"),
            s("--tls-cert"),
            s(cert),
            s("--tls-key"),
            s(key),
        ]
    };
    let (crt, key) = (certs.path("server.crt"), certs.path("server.key"));
    serve_fails(&tls("/nonexistent/tls.crt", &key), "/nonexistent/tls.crt");
    serve_fails(&tls(&g, &key), &g);
    serve_fails(&tls(&crt, &g), &g);
    serve_fails(&tls(&crt, &certs.path("client.key")), "does not go with");
    serve_fails(&[s("--listen"), s("tls://127.0.0.1:0")], "needs --tls-cert");
    serve_fails(
        &[
            s("--listen"),
            s("127.0.0.1:0"),
            s("--tls-cert"),
            crt.clone(),
            s("--tls-key"),
            key.clone(),
        ],
        "no tls:// listener",
    );
    let unix = format!("unix:{}", regular.display());
    serve_fails(&[s("--listen"), unix], &regular.display().to_string());
    serve_fails(
        &[
            s("--listen"),
            s("unix:/tmp/x.sock"),
            s("--unix-mode"),
            s("999"),
        ],
        "octal",
    );
}

#[test]
fn rsa_pkcs1_and_ec_sec1_keys_load() {
    if !require("openssl", INSTALL) {
        return;
    }
    let scratch = Scratch::new();
    let certs = Certs::make(&scratch);
    certs.leaf_with_key(
        "rsa",
        "ca",
        "/CN=localhost",
        "DNS:localhost",
        "serverAuth",
        "-newkey rsa:2048",
    );
    openssl(&certs.dir, "rsa -in rsa.key -traditional -out rsa1.key");
    openssl(&certs.dir, "ec -in server.key -out sec1.key");
    let bin = binary().display().to_string();
    for (cert, key, header) in [
        ("rsa.crt", "rsa1.key", "BEGIN RSA PRIVATE KEY"),
        ("server.crt", "sec1.key", "BEGIN EC PRIVATE KEY"),
        ("server.crt", "server.key", "BEGIN PRIVATE KEY"),
    ] {
        let key_text = std::fs::read_to_string(certs.dir.join(key)).unwrap();
        assert!(key_text.contains(header), "{key} is not {header}");
        let args = vec![
            s_("--tls-cert"),
            certs.path(cert),
            s_("--tls-key"),
            certs.path(key),
        ];
        let server = start_with(Scratch::new(), ECHO, &["tls://127.0.0.1:0"], &args);
        let out = run(
            &format!(
                "{bin} send --token-env TOKEN --cacert $PKI/ca.crt --servername localhost tls://127.0.0.1:$PORT k"
            ),
            server.port(),
            &certs,
        );
        assert!(stdout(&out).contains("payload=k"), "{key}: {out:?}");
    }
}

fn s_(v: &str) -> String {
    v.to_string()
}

#[test]
fn unix_socket_with_nc_socat_and_curl() {
    if !require("nc", INSTALL) || !require("socat", INSTALL) || !require("curl", INSTALL) {
        return;
    }
    let scratch = Scratch::new();
    let sock = scratch.path("ct.sock");
    let unix = format!("unix:{}", sock.display());
    let line_server = start_with(
        scratch,
        ECHO,
        &[&unix],
        &["--unix-mode".into(), "0600".into()],
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let path = sock.display();
    let uid = rustix::process::getuid().as_raw();
    for pipeline in [
        format!(r#"echo "{TOKEN} via-nc" | nc -U {path}"#),
        format!(r#"echo "{TOKEN} via-socat" | socat - UNIX-CONNECT:{path}"#),
    ] {
        let out = shell(&pipeline);
        let text = stdout(&out);
        assert!(
            text.contains("listener=unix peer=unix"),
            "{pipeline}: {out:?}"
        );
        assert!(
            text.contains(&format!("cred=uid={uid}")),
            "{pipeline}: {out:?}"
        );
    }
    let bin = binary().display().to_string();
    let out = shell(&format!(
        "TOKEN={TOKEN} {bin} send --token-env TOKEN {unix} via-send"
    ));
    assert!(stdout(&out).contains("payload=via-send"), "{out:?}");
    drop(line_server);

    let scratch = Scratch::new();
    let sock = scratch.path("http.sock");
    let unix = format!("unix:{}", sock.display());
    let http = start_with(
        scratch,
        ECHO,
        &[&unix],
        &["--framing".into(), "http".into()],
    );
    let out = shell(&format!(
        r#"curl -sS --unix-socket {} -H "X-Token: {TOKEN}" http://localhost/x -d via-curl"#,
        sock.display()
    ));
    assert!(
        stdout(&out).contains("listener=unix"),
        "{out:?}; {}",
        http.log.text()
    );
    assert!(stdout(&out).contains("payload=via-curl"), "{out:?}");
    // The default mode.
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
}

#[test]
fn allow_uid_closes_other_users_without_data() {
    if !require("nc", INSTALL) {
        return;
    }
    let scratch = Scratch::new();
    let sock = scratch.path("ct.sock");
    let unix = format!("unix:{}", sock.display());
    let other = (rustix::process::getuid().as_raw() + 4242).to_string();
    let server = start_with(scratch, ECHO, &[&unix], &["--allow-uid".into(), other]);
    let out = shell(&format!(r#"echo "{TOKEN} hi" | nc -U {}"#, sock.display()));
    assert_eq!(stdout(&out), "", "{out:?}");
    server.log.wait_for("uid not in --allow-uid");
}

#[test]
fn stale_socket_replaced_and_removed_at_clean_exit() {
    if !require("nc", INSTALL) {
        return;
    }
    let scratch = Scratch::new();
    let sock = scratch.path("stale.sock");
    // A socket nobody listens on any more, as a crash leaves it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let unix = format!("unix:{}", sock.display());
    let mut server = start_with(scratch, ECHO, &[&unix], &[]);
    server.log.wait_for("replacing stale socket");
    let out = shell(&format!(r#"echo "{TOKEN} hi" | nc -U {}"#, sock.display()));
    assert!(stdout(&out).contains("listener=unix"), "{out:?}");
    server.signal(15);
    assert_eq!(server.wait_exit().code(), Some(0));
    assert!(!sock.exists(), "the socket outlived a clean exit");
}

#[test]
fn a_garbage_flood_on_the_tls_port_does_not_starve_a_tls_client() {
    let Some((scratch, certs, args)) = tls_setup(&[]) else {
        return;
    };
    let server = start_with(scratch, ECHO, &["tls://127.0.0.1:0"], &args);
    let flood_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hardening/flood.py");
    // hardening/flood.py's garbage mode: 200 clients sending random bytes, reconnecting.
    let mut flood = Command::new("python3")
        .arg(flood_script)
        .args(["garbage", &server.addr().to_string(), "3", "200"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting python3 hardening/flood.py");
    let bin = binary().display().to_string();
    let ask = || {
        run(
            &format!(
                "{bin} send --timeout 10s --token-env TOKEN --cacert $PKI/ca.crt tls://127.0.0.1:$PORT legit"
            ),
            server.port(),
            &certs,
        )
    };
    let (mut served, mut slowest) = (0, Duration::ZERO);
    while matches!(flood.try_wait(), Ok(None)) {
        let started = Instant::now();
        let out = ask();
        assert!(
            stdout(&out).contains("payload=legit"),
            "during the flood: {out:?}"
        );
        served += 1;
        slowest = slowest.max(started.elapsed());
    }
    let status = wait_child(&mut flood, WAIT).expect("flood.py did not end");
    assert!(status.success(), "flood.py failed: {status}");
    println!("TLS garbage flood: {served} legitimate TLS requests served, slowest {slowest:?}");
    assert!(served >= 3, "only {served} TLS requests during a 3 s flood");
    assert!(
        slowest < Duration::from_millis(1500),
        "the slowest took {slowest:?}"
    );
    assert!(stdout(&ask()).contains("payload=legit"), "after the flood");
}

#[test]
fn a_full_unix_listener_answers_err_busy_and_a_full_tls_one_closes() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let Some((scratch, _certs, args)) = tls_setup(&["--max-connections", "1"]) else {
        return;
    };
    let sock = scratch.path("busy.sock");
    let unix = format!("unix:{}", sock.display());
    let server = start_with(scratch, ECHO, &[&unix, "tls://127.0.0.1:0"], &args);
    let held = UnixStream::connect(&sock).unwrap();
    server.log.wait_for("connection from unix");
    let mut second = UnixStream::connect(&sock).unwrap();
    second.set_read_timeout(Some(WAIT)).unwrap();
    let mut reply = String::new();
    let _ = second.read_to_string(&mut reply);
    assert_eq!(reply, "ERR busy\n");
    // TLS: no reply without a handshake, and no handshake for a connection there is no room for.
    let mut tls = connect(server.addrs[1]);
    let mut bytes = Vec::new();
    let _ = tls.read_to_end(&mut bytes);
    assert!(bytes.is_empty(), "{bytes:?}");
    drop(held);
}

/// `big` is 4 MiB, `huge` 32 MiB: more than loopback's socket buffers and a pipe hold.
const BIG_OR_SMALL: &str = r#"
fn handle(req) {
    let size = switch req.payload { "big" => 4194304, "huge" => 33554432, _ => 0 };
    if size == 0 { return req.payload + "\n"; }
    let s = "0123456789abcdef";
    while s.len() < size { s += s; }
    s + "\n"
}"#;

/// `openssl s_client` on a kept TLS connection, its stdin and stdout ours.
fn s_client(port: u16, certs: &Certs) -> std::process::Child {
    Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["-CAfile", &certs.path("ca.crt")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting openssl s_client")
}

/// Reads `len` bytes from a child's stdout, within [`WAIT`] (a reader thread, so a missing
/// reply fails the test instead of hanging it).
fn read_child(out: std::process::ChildStdout, len: usize) -> (std::process::ChildStdout, Vec<u8>) {
    use std::io::Read;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = out;
        let mut got = vec![0; len];
        let result = out.read_exact(&mut got).map(|_| got);
        let _ = tx.send((out, result));
    });
    let (out, result) = rx.recv_timeout(WAIT).expect("no reply within the wait");
    (out, result.expect("reading the reply"))
}

#[test]
fn tls_keep_alive_replies_in_order_and_a_large_one_arrives_whole() {
    // The worker encrypts and writes a kept connection's reply itself; what the socket does
    // not take, the loop sends as the client reads.
    use std::io::Write;
    let Some((scratch, certs, args)) = tls_setup(&["--keep-alive"]) else {
        return;
    };
    let server = start_with(scratch, BIG_OR_SMALL, &["tls://127.0.0.1:0"], &args);
    let mut client = s_client(server.port(), &certs);
    let mut stdin = client.stdin.take().unwrap();
    let mut stdout = client.stdout.take().unwrap();
    for i in 0..50 {
        writeln!(stdin, "{TOKEN} n{i}").unwrap();
        let (out, got) = read_child(stdout, format!("n{i}\n").len());
        stdout = out;
        assert_eq!(String::from_utf8_lossy(&got), format!("n{i}\n"));
    }
    writeln!(stdin, "{TOKEN} big").unwrap();
    // Not reading yet: the socket fills up while the reply is being written.
    std::thread::sleep(Duration::from_millis(300));
    let (out, big) = read_child(stdout, 4_194_305);
    assert!(big.ends_with(b"cdef\n"), "{:?}", &big[big.len() - 8..]);
    assert!(
        big.chunks(16)
            .take(262_144)
            .all(|c| c == b"0123456789abcdef")
    );
    writeln!(stdin, "{TOKEN} after").unwrap();
    assert_eq!(read_child(out, 6).1, b"after\n");
    let _ = client.kill();
    let _ = client.wait();
}

#[test]
fn a_tls_client_that_stops_reading_holds_no_worker() {
    // One worker: if writing the big reply waited for the client, the next client would wait.
    // --max-output-bytes raises the string limit (6·O) above the 32 MiB reply.
    use std::io::Write;
    let extra = [
        "--keep-alive",
        "--workers",
        "1",
        "--max-output-bytes",
        "8388608",
    ];
    let Some((scratch, certs, args)) = tls_setup(&extra) else {
        return;
    };
    let marker = scratch.path("big-started");
    let script = BIG_OR_SMALL.replace(
        "let s =",
        &format!("exec([\"touch\", \"{}\"]); let s =", marker.display()),
    );
    let server = start_with(scratch, &script, &["tls://127.0.0.1:0"], &args);
    let mut stalled = s_client(server.port(), &certs);
    let mut stdin = stalled.stdin.take().unwrap();
    writeln!(stdin, "{TOKEN} huge").unwrap();
    // Its reply is on its way; the client never reads it.
    assert!(
        file_exists_within(&marker, WAIT),
        "the huge request was not handled"
    );
    let mut other = s_client(server.port(), &certs);
    writeln!(other.stdin.as_mut().unwrap(), "{TOKEN} other").unwrap();
    let (_, reply) = read_child(other.stdout.take().unwrap(), 6);
    assert_eq!(reply, b"other\n");
    for mut client in [stalled, other] {
        let _ = client.kill();
        let _ = client.wait();
    }
}
