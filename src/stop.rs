//! What tells a running server to reload or stop: the [`Stop`] the loop polls. In the binary
//! that is the process's signals ([`SignalSource`]); a test or an embedder that runs the
//! server in-process uses a [`Switch`] instead.

use crate::signals::{Signal, SignalSource};
use mio::{Interest, Registry, Token};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

/// A source of reload and stop orders, polled by the event loop like any other source.
pub trait Stop {
    /// Registers with the loop's `Poll`: readiness under `token` means orders are waiting.
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()>;
    /// Every order since the last call, in order; repeats may coalesce.
    fn pending(&mut self) -> Vec<Signal>;
}

impl Stop for SignalSource {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        SignalSource::register(self, registry, token)
    }

    fn pending(&mut self) -> Vec<Signal> {
        SignalSource::pending(self)
    }
}

/// The loop's end of an in-process stop: a socket pair whose readable end wakes the loop
/// (a second `mio::Waker` on one `Poll` is not allowed; the workers own the one there is).
pub struct SwitchStop {
    wake: mio::net::UnixStream,
    orders: Arc<Mutex<Vec<Signal>>>,
}

/// The other end: gives orders from any thread.
#[derive(Clone)]
pub struct Switch {
    wake: Arc<std::os::unix::net::UnixStream>,
    orders: Arc<Mutex<Vec<Signal>>>,
}

/// A connected [`Switch`] and [`SwitchStop`].
pub fn switch() -> io::Result<(Switch, SwitchStop)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    theirs.set_nonblocking(true)?;
    ours.set_nonblocking(true)?;
    let orders = Arc::new(Mutex::new(Vec::new()));
    let switch = Switch {
        wake: Arc::new(ours),
        orders: orders.clone(),
    };
    let stop = SwitchStop {
        wake: mio::net::UnixStream::from_std(theirs),
        orders,
    };
    Ok((switch, stop))
}

impl Switch {
    /// Orders `signal` as if the process had received it.
    pub fn send(&self, signal: Signal) {
        self.orders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(signal);
        // A full socket buffer already holds a wake-up: nothing is lost by a failed write.
        let _ = (&*self.wake).write(&[1]);
    }
}

impl Stop for SwitchStop {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.wake, token, Interest::READABLE)
    }

    fn pending(&mut self) -> Vec<Signal> {
        // Drain the wake-ups first, so an order given after this point wakes the loop again.
        let mut bytes = [0u8; 64];
        while matches!(self.wake.read(&mut bytes), Ok(n) if n > 0) {}
        std::mem::take(&mut *self.orders.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::time::Duration;

    #[test]
    fn a_switch_wakes_the_poll_and_hands_over_its_orders() -> io::Result<()> {
        let mut poll = Poll::new()?;
        let (switch, mut stop) = switch()?;
        stop.register(poll.registry(), Token(7))?;
        let mut events = Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::ZERO))?;
        assert!(events.is_empty());
        let from_thread = switch.clone();
        std::thread::spawn(move || {
            from_thread.send(Signal::Reload);
            from_thread.send(Signal::Stop(15));
        })
        .join()
        .map_err(|_| io::Error::other("the sending thread panicked"))?;
        poll.poll(&mut events, Some(Duration::from_secs(5)))?;
        assert_eq!(
            events.iter().map(|e| e.token()).collect::<Vec<_>>(),
            [Token(7)]
        );
        assert_eq!(stop.pending(), [Signal::Reload, Signal::Stop(15)]);
        assert!(stop.pending().is_empty());
        Ok(())
    }
}
