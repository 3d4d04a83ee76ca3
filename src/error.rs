//! The errors that end the program, each with the exit status SPEC §2 gives it.

use std::fmt;

#[derive(Debug)]
pub enum Fatal {
    /// The user's words or files are wrong: exit 2.
    Usage(String),
    /// The machine said no (an address that cannot be bound, ...): exit 1.
    Runtime(String),
}

impl Fatal {
    pub fn exit_code(&self) -> u8 {
        match self {
            Fatal::Usage(_) => 2,
            Fatal::Runtime(_) => 1,
        }
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fatal::Usage(message) | Fatal::Runtime(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Fatal {}
