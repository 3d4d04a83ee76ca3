//! Taking connections off the listeners: capped per turn, paused after an accept error
//! such as EMFILE, each one asked of the gate before it enters the slab.

use super::*;

impl Server {
    pub(super) fn accept(&mut self, index: usize) {
        if self.accept_paused_until.is_some() || self.stopping.is_some() {
            return;
        }
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            match listener.accept() {
                Ok(accepted) => {
                    if std::mem::take(&mut self.accept_failing) {
                        log::info!("accepting connections again");
                    }
                    self.admit(accepted)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_per_connection_error(&e) => continue,
                Err(e) => {
                    // EMFILE and friends: pause instead of spinning on a ready listener, and
                    // warn once per episode rather than ten times a second.
                    if std::mem::replace(&mut self.accept_failing, true) {
                        log::debug!("accepting a connection: {e}; still pausing");
                    } else {
                        log::warn!(
                            "accepting a connection: {e}; pausing accepts for {ACCEPT_PAUSE:?} at a time"
                        );
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            }
        }
        // More may be queued, and with edge triggers no new event will say so: take them next
        // turn, after the replies and reads this turn's events brought.
        if !self.accept_more.contains(&index) {
            self.accept_more.push(index);
        }
    }

    pub(super) fn resume_accepting(&mut self) {
        self.accept_paused_until = None;
        for index in 0..self.listeners.len() {
            self.accept(index);
        }
    }

    pub(super) fn admit(&mut self, accepted: Accepted) {
        let Accepted { stream, endpoints } = accepted;
        let facts = self.facts(&endpoints, Instant::now());
        if let Err(refusal) = self.gate.admit(Knock::Connection, &facts) {
            return self.refuse_connection(stream, &endpoints, refusal);
        }
        self.gate.opened(facts.peer);
        self.next_serial += 1;
        let phase = Phase::Reading {
            deadline: Instant::now() + self.config.read_timeout,
        };
        let connection = Connection::new(stream, endpoints.clone(), self.next_serial, phase);
        let key = self.connections.insert(connection);
        metrics().open_connections.inc();
        if let Err(e) = self.connections[key].register(self.parts.poll.registry(), Token(key)) {
            log::warn!("registering connection from {}: {e}", endpoints.peer_text());
            self.connections.remove(key);
            metrics().open_connections.dec();
            self.gate.closed(facts.peer);
            return;
        }
        log::debug!("connection from {}", endpoints.peer_text());
        // Data may already be there; with edge triggers we will not hear of it again.
        self.drive(key);
    }

    /// What the gate weighs besides the request itself.
    pub(super) fn facts(&self, endpoints: &Endpoints, now: Instant) -> Facts {
        Facts {
            peer: endpoints.ip(),
            uid: endpoints.peer_cred.map(|cred| cred.uid),
            listener: endpoints.listener,
            now,
            open_connections: self.connections.len(),
            in_flight: self.in_flight,
            stopping: self.stopping.is_some(),
        }
    }

    /// Answers a connection there is no room for with `ERR busy` (HTTP: 503), then closes it.
    /// A silent close would read as a handler that replied nothing, and `send --all` would count
    /// a full server as a success. The connection never enters the slab, so a flood of them
    /// costs no memory: what the client sent already is read and dropped (unread input would
    /// turn the close into a reset); input arriving later does get a reset, after the reply.
    /// A TLS client is closed without the reply: saying it would take a handshake, the very
    /// cost a connection cap is there to avoid. Clients the allow-lists refuse get no word.
    pub(super) fn refuse_connection(
        &mut self,
        mut stream: Stream,
        endpoints: &Endpoints,
        refusal: gate::Refusal,
    ) {
        if let Some(counted) = refusal.counted {
            metrics().record_refusal(counted);
        }
        log::debug!("refusing {}: {}", endpoints.peer_text(), refusal.reason);
        let Some(answer) = refusal.answer else {
            return; // dropping the stream closes it, without a reply
        };
        if stream.needs_handshake() {
            return;
        }
        let reply = self.protocol().encode_error(answer);
        // A fresh socket's send buffer takes these few bytes whole.
        let _ = stream.write(&reply.bytes);
        let _ = stream.shutdown_output();
        for _ in 0..4 {
            match stream.read(&mut self.scratch) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
}
