//! Tokens: where they come from, and the constant-time check of a presented token.
//!
//! Only SHA-256 digests of the tokens are kept and compared, so the comparison costs the same
//! whatever the content or the length of the presented and configured tokens.

use sha2::{Digest, Sha256};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// Below this many bytes a token is guessable enough to warn about.
const SHORT_TOKEN_BYTES: usize = 16;

/// Where one named token comes from, as given by `--token-file` or `--token-env`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSource {
    /// The name the script sees as `req.token_name`.
    pub name: Arc<str>,
    pub origin: TokenOrigin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenOrigin {
    File(PathBuf),
    Env(String),
}

impl TokenSource {
    /// Parses `[NAME=]VALUE`; the name defaults to `default`.
    pub fn parse(spec: &str, origin: fn(&str) -> TokenOrigin) -> Result<Self, String> {
        let (name, value) = match spec.split_once('=') {
            Some((name, value)) => (name, value),
            None => ("default", spec),
        };
        if name.is_empty() || value.is_empty() {
            return Err(format!("'{spec}' is not [NAME=]VALUE"));
        }
        Ok(TokenSource {
            name: name.into(),
            origin: origin(value),
        })
    }
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            TokenOrigin::File(path) => write!(f, "token file {}", path.display()),
            TokenOrigin::Env(var) => write!(f, "token variable {var}"),
        }
    }
}

type TokenDigest = [u8; 32];

fn digest(token: &[u8]) -> TokenDigest {
    Sha256::digest(token).into()
}

/// The valid tokens at one moment; replaced whole when a token file changes.
#[derive(Default)]
pub struct Tokens {
    /// Digests with the name of the source they came from and its index in the configured
    /// sources (a reload replaces the tokens of one source at a time).
    entries: Vec<(usize, Arc<str>, TokenDigest)>,
}

/// Something a reload has to say, at its level (never a token value).
pub type Note = (log::Level, String);

impl Tokens {
    /// Reads every source at start, where an unreadable or empty source is an error. Returns
    /// the tokens and warnings to log (never the token values).
    pub fn load(sources: &[TokenSource]) -> Result<(Tokens, Vec<String>), TokenError> {
        let mut tokens = Tokens::default();
        let mut warnings = Vec::new();
        for (index, source) in sources.iter().enumerate() {
            let values = read_source(source)?;
            tokens.add(index, source, &values, &mut warnings);
        }
        Ok((tokens, warnings))
    }

    /// Re-reads the token files after a change. Fails closed: a file that reads as empty gives
    /// no valid token any more (emptying the file is how an operator revokes), with a warning.
    /// A file that cannot be read at all (a Secret volume mid-swap) keeps its previous tokens,
    /// with an error. `--token-env` tokens keep theirs: the variables were read once, at start,
    /// and then removed from the environment.
    pub fn reload(sources: &[TokenSource], previous: &Tokens) -> (Tokens, Vec<Note>) {
        let mut tokens = Tokens::default();
        let mut notes = Vec::new();
        let mut warnings = Vec::new();
        for (index, source) in sources.iter().enumerate() {
            let read = match source.origin {
                TokenOrigin::Env(_) => Err(TokenError::Kept),
                TokenOrigin::File(_) => read_source(source),
            };
            match read {
                Ok(values) => tokens.add(index, source, &values, &mut warnings),
                Err(TokenError::Empty(why)) => notes.push((
                    log::Level::Warn,
                    format!("{why}: no token from it is valid any more"),
                )),
                Err(error) => {
                    if let TokenError::Unreadable(why) = error {
                        notes.push((
                            log::Level::Error,
                            format!("{why}; keeping its previous tokens"),
                        ));
                    }
                    let kept = previous.entries.iter().filter(|(i, ..)| *i == index);
                    tokens.entries.extend(kept.cloned());
                }
            }
        }
        notes.extend(warnings.into_iter().map(|w| (log::Level::Warn, w)));
        (tokens, notes)
    }

    fn add(
        &mut self,
        index: usize,
        source: &TokenSource,
        values: &[String],
        warnings: &mut Vec<String>,
    ) {
        for value in values {
            if value.len() < SHORT_TOKEN_BYTES {
                warnings.push(format!(
                    "a token from {source} is shorter than {SHORT_TOKEN_BYTES} bytes; use a long random token"
                ));
            }
            self.entries
                .push((index, source.name.clone(), digest(value.as_bytes())));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name of the token that matches `presented`, checking every token in constant time.
    pub fn check(&self, presented: &[u8]) -> Option<Arc<str>> {
        let presented = digest(presented);
        let mut matched = 0u32; // index + 1 of the match, 0 for none
        for (index, (_, _, expected)) in self.entries.iter().enumerate() {
            let candidate = index as u32 + 1;
            matched.conditional_assign(&candidate, expected.ct_eq(&presented));
        }
        let index = (matched as usize).checked_sub(1)?;
        self.entries.get(index).map(|(_, name, _)| name.clone())
    }
}

/// Why a source gave no token; the message names the source (never a token value).
#[derive(Debug)]
pub enum TokenError {
    /// The variable is unset or empty, or the file could not be read.
    Unreadable(String),
    /// The file was read and has no non-empty line.
    Empty(String),
    /// Not read again (a `--token-env` variable on reload).
    Kept,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Unreadable(why) | TokenError::Empty(why) => f.write_str(why),
            TokenError::Kept => f.write_str("not read again"),
        }
    }
}

impl std::error::Error for TokenError {}

fn read_source(source: &TokenSource) -> Result<Vec<String>, TokenError> {
    match &source.origin {
        TokenOrigin::Env(var) => {
            let value = std::env::var(var)
                .map_err(|_| TokenError::Unreadable(format!("{source}: not set or not UTF-8")))?;
            let value = value.trim();
            if value.is_empty() {
                return Err(TokenError::Unreadable(format!(
                    "{source}: the token is empty"
                )));
            }
            Ok(vec![value.to_owned()])
        }
        TokenOrigin::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| TokenError::Unreadable(format!("reading {source}: {e}")))?;
            let lines: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if lines.is_empty() {
                return Err(TokenError::Empty(format!(
                    "{source}: no token in the file (every line is empty)"
                )));
            }
            Ok(lines)
        }
    }
}

/// The variables of the `--token-env` sources, to remove from the environment once read.
pub fn token_variables(sources: &[TokenSource]) -> impl Iterator<Item = &str> {
    sources.iter().filter_map(|s| match &s.origin {
        TokenOrigin::Env(var) => Some(var.as_str()),
        TokenOrigin::File(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(values: &[(&str, &str)]) -> Tokens {
        let entries = values
            .iter()
            .map(|(name, v)| (0, Arc::from(*name), digest(v.as_bytes())));
        Tokens {
            entries: entries.collect(),
        }
    }

    #[test]
    fn matches_any_configured_token_by_name() {
        let t = tokens(&[("a", "first-token-value"), ("b", "second-token-value")]);
        assert_eq!(t.check(b"second-token-value").as_deref(), Some("b"));
        assert_eq!(t.check(b"first-token-value").as_deref(), Some("a"));
        assert_eq!(t.check(b"first-token-valu"), None);
        assert_eq!(t.check(b""), None);
    }

    #[test]
    fn a_reload_revokes_an_emptied_file_and_keeps_an_unreadable_one() {
        let dir = std::env::temp_dir().join(format!("ct-auth-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "token-a-0123456789abcdef\n").unwrap();
        std::fs::write(&b, "token-b-0123456789abcdef\n").unwrap();
        let file = |name: &str, path: &std::path::Path| TokenSource {
            name: name.into(),
            origin: TokenOrigin::File(path.into()),
        };
        let sources = [file("a", &a), file("b", &b)];
        let (before, _) = Tokens::load(&sources).unwrap();
        std::fs::write(&a, "\n  \n").unwrap();
        std::fs::remove_file(&b).unwrap();
        let (after, notes) = Tokens::reload(&sources, &before);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(after.check(b"token-a-0123456789abcdef"), None);
        assert_eq!(
            after.check(b"token-b-0123456789abcdef").as_deref(),
            Some("b")
        );
        let levels: Vec<log::Level> = notes.iter().map(|(level, _)| *level).collect();
        assert_eq!(levels, [log::Level::Warn, log::Level::Error]);
        assert!(notes.iter().all(|(_, note)| !note.contains("token-")));
    }

    #[test]
    fn parses_named_and_default_sources() {
        let s = TokenSource::parse("ops=/run/t", |v| TokenOrigin::File(v.into())).unwrap();
        assert_eq!(&*s.name, "ops");
        let s = TokenSource::parse("TOKEN", |v| TokenOrigin::Env(v.into())).unwrap();
        assert_eq!(
            (&*s.name, s.origin),
            ("default", TokenOrigin::Env("TOKEN".into()))
        );
        assert!(TokenSource::parse("=x", |v| TokenOrigin::Env(v.into())).is_err());
    }
}
