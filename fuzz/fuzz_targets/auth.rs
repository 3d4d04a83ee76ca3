//! The token side of a request: `[NAME=]VALUE` source specs, splitting the token off a request
//! line, and the check against configured tokens. Checked besides "never panics": the split
//! gives back the line exactly, and the check matches exactly the configured tokens.

#![no_main]

use command_trigger::auth::{TokenOrigin, TokenSource, Tokens};
use command_trigger::framing::split_token;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// Tokens as a token file gives them (each line trimmed).
const CONFIGURED: [&str; 3] = [
    "test-token-0123456789abcdef",
    "second token with spaces",
    "x",
];

fn tokens() -> &'static Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("ct-fuzz-tokens-{}", std::process::id()));
        let text = format!(
            "  {}\n\n{}\t\n{}\n",
            CONFIGURED[0], CONFIGURED[1], CONFIGURED[2]
        );
        std::fs::write(&path, text).expect("writing the token file");
        let source = TokenSource::parse(&format!("ops={}", path.display()), |v| {
            TokenOrigin::File(v.into())
        })
        .expect("a valid spec");
        let (tokens, _) = Tokens::load(&[source]).expect("loading the tokens");
        let _ = std::fs::remove_file(&path);
        tokens
    })
}

fuzz_target!(|data: &[u8]| {
    check_spec(&String::from_utf8_lossy(data));
    check_split(data);
    let expected = CONFIGURED.iter().any(|t| t.as_bytes() == data);
    assert_eq!(tokens().check(data).is_some(), expected);
    let (token, _) = split_token(data);
    let expected = CONFIGURED.iter().any(|t| t.as_bytes() == token);
    assert_eq!(tokens().check(token).as_deref().is_some(), expected);
});

fn check_spec(spec: &str) {
    let valid = match spec.split_once('=') {
        Some((name, value)) => !name.is_empty() && !value.is_empty(),
        None => !spec.is_empty(),
    };
    match TokenSource::parse(spec, |v| TokenOrigin::Env(v.into())) {
        Ok(source) => {
            assert!(valid, "accepted {spec:?}");
            let TokenOrigin::Env(value) = &source.origin else {
                unreachable!()
            };
            assert!(!source.name.contains('='));
            let named = format!("{}={value}", source.name);
            assert!(spec == named || (&*source.name == "default" && spec == value));
        }
        Err(_) => assert!(!valid, "refused {spec:?}"),
    }
}

fn check_split(line: &[u8]) {
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let (token, payload) = split_token(line);
    assert!(!token.iter().any(blank));
    assert!(line.starts_with(token) && line.ends_with(payload));
    let middle = &line[token.len()..line.len() - payload.len()];
    assert!(middle.iter().all(blank));
    assert!(payload.first().is_none_or(|b| !blank(b)));
    assert_eq!(middle.is_empty(), !line.iter().any(blank));
}
