//! The signals the server acts on, delivered to the event loop as readiness (no work happens
//! in a signal handler).

use mio::{Interest, Registry, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::io;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT, with its number for the exit status of a hard stop.
    Stop(i32),
    /// SIGHUP: reload the script and the tokens.
    Reload,
}

pub struct SignalSource {
    signals: Signals,
}

impl SignalSource {
    /// Installs the handlers; do this before starting any thread.
    pub fn install() -> io::Result<SignalSource> {
        Ok(SignalSource {
            signals: Signals::new([SIGTERM, SIGINT, SIGHUP])?,
        })
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.signals, token, Interest::READABLE)
    }

    /// Every signal that arrived since the last call (repeats of one signal may coalesce).
    pub fn pending(&mut self) -> Vec<Signal> {
        self.signals
            .pending()
            .map(|number| match number {
                SIGHUP => Signal::Reload,
                other => Signal::Stop(other),
            })
            .collect()
    }
}
