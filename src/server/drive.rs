//! One connection at a time: advancing it, answering `100 Continue`, handing its requests
//! to the workers (or refusing them), taking their replies back, and closing it.

use super::*;

impl Server {
    /// The socket of connection `key` has news; `closing`: the client closed its side, or
    /// the socket failed.
    pub(super) fn on_socket_event(&mut self, key: usize, closing: bool) {
        if closing && let Some(connection) = self.connections.get_mut(key) {
            connection.peer_closing = true;
        }
        if let Some(connection) = self.connections.get(key)
            && connection.phase == Phase::Handling
            && connection.reply_went_quietly()
        {
            // Settling the reply (`on_reply`) drives the connection on.
            return self.take_worker_messages(false);
        }
        self.drive(key);
    }

    /// Moves a connection as far as it can go without blocking, then closes it if it is done.
    pub(super) fn drive(&mut self, key: usize) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        let result = connection.advance(&self.rules, &mut self.scratch);
        match result {
            Ok(Step::Wait) => self.after_step(key),
            Ok(Step::Dispatch(raw)) => {
                self.dispatch(key, raw);
                self.drive(key);
            }
            Ok(Step::WantsContinue(waiting)) => self.on_expect_continue(key, waiting),
            Ok(Step::Close(why)) => self.close(key, why),
            Err(e) => {
                self.count_rejected_certificate(key);
                self.close(key, &format!("I/O error: {e}"))
            }
        }
    }

    /// An mTLS handshake refused for the client's certificate counts for `--auth-failures`.
    fn count_rejected_certificate(&mut self, key: usize) {
        let connection = &self.connections[key];
        if !connection.stream.client_cert_rejected() {
            return;
        }
        metrics().auth_failures.inc();
        let peer = connection.endpoints.ip();
        self.gate.failed_authentication(peer, Instant::now());
    }

    /// The client waits for `100 Continue` before sending its body. It is said only once the
    /// token passed (SPEC §10): a wrong token is answered 401 (429 when backed off) at once,
    /// from the head alone, and the body is never asked for.
    pub(super) fn on_expect_continue(&mut self, key: usize, waiting: RawRequest) {
        let facts = self.facts(&self.connections[key].endpoints, Instant::now());
        let knock = Knock::Continue(waiting.http.as_ref());
        if self.gate.admit(knock, &facts).is_err() {
            self.connections[key].input.clear();
            // Answered as a request, refused, and closed: the unsent body is drained, never
            // read as another request.
            self.dispatch(key, waiting);
        } else {
            let protocol = self.protocol();
            let connection = &mut self.connections[key];
            connection.continue_sent = true;
            connection.push_output(protocol.continue_bytes());
        }
        self.drive(key);
    }

    pub(super) fn after_step(&mut self, key: usize) {
        let registry = self.parts.poll.registry();
        let connection = &mut self.connections[key];
        if let Err(e) = connection.update_interest(registry, Token(key)) {
            return self.close(key, &format!("re-registering: {e}"));
        }
        connection.shrink_buffers();
        if let Some(deadline) = connection.deadline()
            && connection.timer.is_none_or(|armed| deadline < armed)
        {
            connection.timer = Some(deadline);
            self.timers
                .push(Reverse((deadline, key, connection.serial)));
        }
    }

    pub(super) fn close(&mut self, key: usize, why: &str) {
        let mut connection = self.connections.remove(key);
        if connection.stream.handshake_abandoned() {
            metrics().record_tls_handshake("abandoned");
        }
        if connection.pending_output() > 0 || connection.stream.wants_write() {
            connection.reset_on_drop(); // a timed-out or too slow reader gets no partial reply
        }
        metrics().open_connections.dec();
        self.gate.closed(connection.endpoints.ip());
        connection.deregister(self.parts.poll.registry());
        log::debug!(
            "closed connection from {}: {why}",
            connection.endpoints.peer_text()
        );
    }

    pub(super) fn dispatch(&mut self, key: usize, raw: RawRequest) {
        self.next_request_id += 1;
        self.connections[key].continue_sent = false;
        let facts = self.facts(&self.connections[key].endpoints, Instant::now());
        let who = self.gate.identify(&raw, facts.peer, facts.now);
        let request = Request {
            id: self.next_request_id,
            token_name: who.token_name,
            payload: who.payload,
            body: raw.body,
            endpoints: self.connections[key].endpoints.clone(),
            framing: self.config.framing,
            keep_alive: self.config.keep_alive,
            http: raw.http,
        };
        let knock = Knock::Request {
            token_name: request.token_name.as_deref(),
        };
        if let Err(refusal) = self.gate.admit(knock, &facts) {
            return self.refuse_request(key, &request, refusal, facts.now);
        }
        let connection = &mut self.connections[key];
        connection.phase = Phase::Handling;
        self.in_flight += 1;
        let conn = ConnRef {
            key,
            serial: connection.serial,
        };
        // Only where a connection may stay open: a reply that closes goes through the loop.
        let writer = Protocol::of(&request)
            .may_stay_open()
            .then(|| connection.reply_writer())
            .flatten();
        self.parts.pool.submit(Job {
            request,
            conn,
            writer,
        });
    }

    /// Answers a request the gate turned away, logs it, and closes after the answer.
    pub(super) fn refuse_request(
        &mut self,
        key: usize,
        request: &Request,
        refusal: gate::Refusal,
        now: Instant,
    ) {
        if let Some(counted) = refusal.counted {
            metrics().record_refusal(counted);
        }
        let error = refusal.answer.unwrap_or(ServerError::Unauthorized);
        let reply = Protocol::of(request).encode_error(error);
        log_request(request, refusal.verdict, now, reply.bytes.len(), &[]);
        let read_timeout = self.config.read_timeout;
        self.connections[key].answer(reply, true, read_timeout);
    }

    /// `woken`: called for the waker's event, which this consumes.
    pub(super) fn take_worker_messages(&mut self, woken: bool) {
        let messages: Vec<Outbound> = match woken {
            true => self.parts.inbox.drain().collect(),
            false => self.parts.inbox.take().collect(),
        };
        for message in messages {
            match message {
                Outbound::Data { conn, bytes } => self.on_live_output(conn, &bytes),
                Outbound::Done { conn, reply } => {
                    self.in_flight -= 1;
                    self.on_reply(conn, reply);
                }
                Outbound::Tokens(tokens) => self.gate.set_tokens(tokens),
            }
        }
    }

    pub(super) fn on_live_output(&mut self, conn: ConnRef, bytes: &[u8]) {
        let Some(connection) = find(&mut self.connections, conn) else {
            return;
        };
        connection.push_output(bytes);
        if connection.pending_output() > MAX_PENDING_OUTPUT {
            // The handler keeps running; only this slow reader is let go.
            return self.close(conn.key, "client reads too slowly for streamed output");
        }
        self.drive(conn.key);
    }

    pub(super) fn on_reply(&mut self, conn: ConnRef, reply: Encoded) {
        let stopping = self.stopping.is_some();
        let Some(connection) = find(&mut self.connections, conn) else {
            return;
        };
        connection.answer(reply, stopping, self.config.read_timeout);
        self.drive(conn.key);
    }
}
