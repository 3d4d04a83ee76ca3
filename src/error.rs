//! How a run ends: an [`Outcome`] when the subcommand ran to its end, a [`Fatal`] error when
//! it could not. `main` alone turns either into the exit status SPEC §2 gives it, and prints
//! fatal errors itself, whatever the log level.

use std::fmt;
use std::path::PathBuf;

/// How a subcommand that ran to its end went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// What was asked happened (a reply, a clean stop, all tests passed): exit 0.
    Success,
    /// It ran, and what it ran failed: an `ERR` or no reply, a failed handler, a failed test,
    /// a script that does not compile under `check`: exit 1.
    Failure,
    /// A second stop signal ended the server at once: exit 128 + the signal's number.
    Signalled(i32),
}

impl Outcome {
    /// `Failure` when `failed`, else `Success`.
    pub fn failed_if(failed: bool) -> Outcome {
        if failed {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }

    /// The process exit status (SPEC §2).
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::Failure => 1,
            Outcome::Signalled(number) => u8::try_from(128 + number).unwrap_or(255),
        }
    }
}

/// The errors that end the program.
#[derive(Debug)]
pub enum Fatal {
    /// A flag or setting is wrong: exit 2.
    Config(ConfigError),
    /// The user's files are wrong (a script that does not compile, an unreadable token file):
    /// exit 2.
    Usage(String),
    /// A token source gave no token at start: exit 2.
    Tokens(crate::auth::TokenError),
    /// The script cannot be used (unreadable, does not compile): exit 2.
    Script(crate::script::ScriptError),
    /// `--state-file` cannot be used: exit 2.
    State(crate::state::StateError),
    /// The machine said no while doing something (binding, starting a thread): exit 1.
    Io {
        /// What was being done, as a phrase: `binding 0.0.0.0:9000`.
        doing: String,
        error: std::io::Error,
    },
    /// Any other failure that is not the user's: exit 1.
    Runtime(String),
}

impl Fatal {
    pub fn exit_code(&self) -> u8 {
        match self {
            Fatal::Config(_)
            | Fatal::Usage(_)
            | Fatal::Tokens(_)
            | Fatal::State(_)
            | Fatal::Script(_) => 2,
            Fatal::Io { .. } | Fatal::Runtime(_) => 1,
        }
    }

    /// An I/O error while doing `doing`.
    pub fn io(doing: impl Into<String>, error: std::io::Error) -> Fatal {
        Fatal::Io {
            doing: doing.into(),
            error,
        }
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fatal::Config(error) => error.fmt(f),
            Fatal::Tokens(error) => error.fmt(f),
            Fatal::State(error) => error.fmt(f),
            Fatal::Script(error) => error.fmt(f),
            Fatal::Usage(message) | Fatal::Runtime(message) => f.write_str(message),
            Fatal::Io { doing, error } => write!(f, "{doing}: {error}"),
        }
    }
}

impl std::error::Error for Fatal {}

impl From<ConfigError> for Fatal {
    fn from(error: ConfigError) -> Fatal {
        Fatal::Config(error)
    }
}

/// A flag (or its `CT_*` variable) that cannot be used as given. Each message names the flag.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// A duration or count that must be positive is 0.
    Zero { flag: &'static str },
    /// A value past what the server can honour; `value` and `max` as the user writes them.
    TooLarge {
        flag: &'static str,
        value: String,
        max: String,
    },
    /// A value of the wrong shape: `expected` says what would do.
    Malformed {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    /// `--token-file` or `--token-env` with a bad `[NAME=]VALUE`.
    TokenSpec { flag: &'static str, message: String },
    /// `serve` with no token source, no `--insecure-no-token`, and a listener that does not
    /// authenticate its clients itself.
    NoTokenSource,
    /// Flags that only make sense together (or not at all together); the message says which.
    Together(&'static str),
    /// `send` with no token to send.
    NoClientToken,
    /// `send` to an address it cannot read.
    Address(String),
    /// A `--watch` path that cannot be made absolute.
    WatchPath { path: PathBuf, error: String },
    /// A `--cron` expression that does not parse, or (`fires: false`) never fires.
    Cron {
        expr: String,
        reason: String,
        fires: bool,
    },
    /// `check` with no file named.
    NoScript,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Zero { flag } => write!(f, "{flag} must be more than 0"),
            ConfigError::TooLarge { flag, value, max } => {
                write!(f, "{flag} {value} is too large (at most {max})")
            }
            ConfigError::Malformed {
                flag,
                value,
                expected,
            } => write!(f, "{flag} '{value}': expected {expected}"),
            ConfigError::TokenSpec { flag, message } => write!(f, "{flag} {message}"),
            ConfigError::NoTokenSource => f.write_str(
                "no token source: give --token-file or --token-env (or --insecure-no-token to accept anyone; \
                 no token is needed when every listener authenticates its clients: tls:// with --tls-client-ca, or unix:)",
            ),
            ConfigError::Together(message) => f.write_str(message),
            ConfigError::NoClientToken => {
                f.write_str("no token source: give --token-file PATH or --token-env VAR")
            }
            ConfigError::Address(addr) => write!(f, "{addr}: expected tls://HOST:PORT"),
            ConfigError::WatchPath { path, error } => {
                write!(f, "--watch {}: {error}", path.display())
            }
            ConfigError::Cron {
                expr,
                reason,
                fires: true,
            } => write!(f, "--cron '{expr}': {reason}"),
            ConfigError::Cron { expr, reason, .. } => {
                write!(f, "--cron '{expr}' never fires: {reason}")
            }
            ConfigError::NoScript => f.write_str(
                "check: no script to compile: give its path (command-trigger check FILE) or set CT_SCRIPT",
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_spec() {
        assert_eq!(Outcome::Success.exit_code(), 0);
        assert_eq!(Outcome::Failure.exit_code(), 1);
        assert_eq!(Outcome::Signalled(15).exit_code(), 143);
        assert_eq!(Fatal::from(ConfigError::NoTokenSource).exit_code(), 2);
        assert_eq!(Fatal::Usage("x".into()).exit_code(), 2);
        let io = Fatal::io("binding 1.2.3.4:5", std::io::ErrorKind::AddrInUse.into());
        assert_eq!(io.exit_code(), 1);
        assert!(io.to_string().starts_with("binding 1.2.3.4:5: "));
    }

    #[test]
    fn messages_name_the_flag() {
        let error = ConfigError::TooLarge {
            flag: "--read-timeout",
            value: "2years".into(),
            max: "1year".into(),
        };
        assert_eq!(
            error.to_string(),
            "--read-timeout 2years is too large (at most 1year)"
        );
        assert_eq!(
            ConfigError::Zero { flag: "--workers" }.to_string(),
            "--workers must be more than 0"
        );
    }
}
