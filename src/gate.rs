//! Admission: whether a new connection, a complete request, or an HTTP head waiting for
//! `100 Continue` is let in, and if not, what the client is told. One function,
//! [`Gate::admit`], holds every rule and their order (allow-lists, connection caps, stop,
//! backoff, token, busy); the loop only gathers the [`Facts`] and acts on the answer. No
//! sockets here, so the rules are unit-tested as they are. Unix clients have no IP: the IP
//! rules (`--allow`, per-IP caps, backoff) pass them by, `--allow-uid` is theirs.

use crate::auth::Tokens;
use crate::backoff::AuthBackoff;
use crate::cli::AuthMode;
use crate::config::Config;
use crate::framing::{self, RawRequest};
use crate::http::HttpHead;
use crate::metrics::Refusal as Counted;
use crate::request::{ServerError, Verdict};
use crate::transport::ListenerKind;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// The admission rules of `serve`, taken from its [`Config`].
#[derive(Clone, Debug)]
pub struct Policy {
    /// `--allow`: networks whose clients are served; empty means any.
    pub allow: Vec<ipnet::IpNet>,
    /// `--allow-uid`: user ids served on Unix sockets; empty means any.
    pub allow_uid: Vec<u32>,
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--max-connections-per-ip`; 0 means no limit.
    pub max_connections_per_ip: usize,
    /// `--workers` + `--queue`: requests queued or running before `ERR busy`.
    pub capacity: usize,
    /// The server itself turns away a wrong token (`--auth required` with a token source).
    /// Decided by the configuration, never by how many tokens are valid now: an emptied token
    /// file must lock everyone out, not in.
    pub token_required: bool,
    /// `--insecure-no-token`: no token source, so the whole first line is the payload.
    pub insecure: bool,
    /// `--auth-failures`, for the warning that names it.
    pub auth_failures: u32,
}

impl Policy {
    pub fn of(config: &Config) -> Policy {
        Policy {
            allow: config.allow.clone(),
            allow_uid: config.allow_uid.clone(),
            max_connections: config.max_connections,
            max_connections_per_ip: config.max_connections_per_ip,
            capacity: config.workers + config.queue,
            token_required: config.auth == AuthMode::Required && !config.token_sources.is_empty(),
            insecure: config.token_sources.is_empty(),
            auth_failures: config.auth_failures,
        }
    }

    /// Whether `--allow` admits a client from `ip` (IPv4-mapped IPv6 counts as IPv4).
    fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }
}

/// What the loop knows when something asks to be let in.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    /// The client's IP; `None` on a Unix socket.
    pub peer: Option<IpAddr>,
    /// The Unix client's user id, from its credentials.
    pub uid: Option<u32>,
    /// The kind of listener the connection came through.
    pub listener: ListenerKind,
    pub now: Instant,
    /// Client connections open now (not counting the one asking).
    pub open_connections: usize,
    /// Requests queued or running now.
    pub in_flight: usize,
    /// A stop has begun: no new request starts.
    pub stopping: bool,
}

/// What asks to be let in.
#[derive(Clone, Copy, Debug)]
pub enum Knock<'a> {
    /// A connection just accepted, before anything is read from it.
    Connection,
    /// A complete request; `token_name` is what [`Gate::identify`] found.
    Request { token_name: Option<&'a str> },
    /// HTTP: a complete head whose client waits for `100 Continue` before sending its body
    /// (`None`: the head did not parse, so it carries no token). Only who is asking is judged
    /// now (token, backoff); busy and stopping are judged when the body is there, since either
    /// may change meanwhile.
    Continue(Option<&'a HttpHead>),
}

/// Let in.
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted;

/// Not let in, and what follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The server's own reply, then a close; `None`: closed without a word (`--allow`).
    pub answer: Option<ServerError>,
    /// The outcome word of the request's log line.
    pub verdict: Verdict,
    /// The `refusals_total` reason it counts as, if any.
    pub counted: Option<Counted>,
    /// Why, for the debug log of a refused connection.
    pub reason: &'static str,
}

/// A request's identity: the name of the token that matched, and the payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    /// `None` when no token matched (or none is configured, or the client is backed off).
    pub token_name: Option<Arc<str>>,
    /// Line and stream framing: the first line after the token; HTTP: empty (the payload is
    /// the body).
    pub payload: Vec<u8>,
}

/// The admission state of one server: the rules, the valid tokens, the backoff, and the open
/// connections per client IP. Lives on the event loop, so it needs no lock.
pub struct Gate {
    policy: Policy,
    tokens: Arc<Tokens>,
    backoff: AuthBackoff,
    per_ip: PerIp,
}

impl Gate {
    pub fn new(policy: Policy, tokens: Arc<Tokens>) -> Gate {
        Gate {
            backoff: AuthBackoff::new(policy.auth_failures),
            per_ip: PerIp::new(policy.max_connections_per_ip > 0),
            policy,
            tokens,
        }
    }

    /// The tokens after a reload.
    pub fn set_tokens(&mut self, tokens: Arc<Tokens>) {
        self.tokens = tokens;
    }

    /// Who sent `raw` (SPEC §3, §10). A backed-off client's token is not even checked.
    pub fn identify(&self, raw: &RawRequest, peer: Option<IpAddr>, now: Instant) -> Identity {
        let check = !self.blocked(peer, now);
        let matched = |token: &[u8]| check.then(|| self.tokens.check(token)).flatten();
        if let Some(head) = &raw.http {
            let token_name = head.token().and_then(|t| matched(t.as_bytes()));
            return Identity {
                token_name,
                payload: Vec::new(),
            };
        }
        if self.policy.insecure {
            return Identity {
                token_name: None,
                payload: raw.line.clone(),
            };
        }
        let (token, payload) = framing::split_token(&raw.line);
        Identity {
            token_name: matched(token),
            payload: payload.to_vec(),
        }
    }

    /// Whether `knock` is let in. The one place the rules and their order are written.
    pub fn admit(&mut self, knock: Knock<'_>, facts: &Facts) -> Result<Admitted, Refusal> {
        match knock {
            Knock::Connection => self.admit_connection(facts),
            Knock::Request { token_name } => {
                if facts.stopping {
                    return Err(refusal(ServerError::ShuttingDown, Verdict::ShuttingDown));
                }
                self.check_token(token_name.is_some(), facts, true)?;
                if facts.in_flight >= self.policy.capacity {
                    return Err(Refusal {
                        counted: Some(Counted::QueueFull),
                        ..refusal(ServerError::Busy, Verdict::Busy)
                    });
                }
                Ok(Admitted)
            }
            Knock::Continue(head) => {
                let valid = head
                    .and_then(HttpHead::token)
                    .is_some_and(|t| self.tokens.check(t.as_bytes()).is_some());
                self.check_token(valid, facts, false).map(|_| Admitted)
            }
        }
    }

    fn admit_connection(&self, facts: &Facts) -> Result<Admitted, Refusal> {
        let silently = |counted, reason| Refusal {
            answer: None,
            verdict: Verdict::Unauthorized,
            counted,
            reason,
        };
        if let Some(uid) = facts.uid
            && !self.policy.allow_uid.is_empty()
            && !self.policy.allow_uid.contains(&uid)
        {
            return Err(silently(None, "uid not in --allow-uid"));
        }
        if facts.peer.is_some_and(|ip| !self.policy.allows(ip)) {
            return Err(silently(Some(Counted::NotAllowed), "not in --allow"));
        }
        // A backed-off client does not even get a handshake: that is the expensive part.
        if facts.listener == ListenerKind::Tls && self.blocked(facts.peer, facts.now) {
            return Err(silently(None, "backed off after failed authentications"));
        }
        let busy = |counted, reason| Refusal {
            counted: Some(counted),
            reason,
            ..refusal(ServerError::Busy, Verdict::Busy)
        };
        if facts.open_connections >= self.policy.max_connections {
            return Err(busy(Counted::MaxConnections, "--max-connections reached"));
        }
        let per_ip = self.policy.max_connections_per_ip;
        let open_from_peer = facts.peer.map_or(0, |ip| self.per_ip.count(ip));
        if per_ip > 0 && open_from_peer >= per_ip {
            return Err(busy(
                Counted::MaxConnectionsPerIp,
                "--max-connections-per-ip reached",
            ));
        }
        Ok(Admitted)
    }

    fn blocked(&self, peer: Option<IpAddr>, now: Instant) -> bool {
        peer.is_some_and(|ip| self.backoff.is_blocked(ip, now))
    }

    /// A failed authentication that is not a wrong token (a TLS client certificate the
    /// handshake refused) counts toward `--auth-failures` too.
    pub fn failed_authentication(&mut self, peer: Option<IpAddr>, now: Instant) {
        self.count_failure(peer, now, "failed authentications");
    }

    fn count_failure(&mut self, peer: Option<IpAddr>, now: Instant, what: &str) {
        if let Some(ip) = peer
            && self.backoff.record_failure(ip, now)
        {
            log::warn!(
                "{ip}: {} {what} within 60 s; refusing this IP for 60 s",
                self.policy.auth_failures
            );
        }
    }

    /// The token rules. `count`: a wrong token counts toward `--auth-failures` (not for a
    /// `100 Continue` check, whose refusal is then answered as the request it is).
    fn check_token(&mut self, valid: bool, facts: &Facts, count: bool) -> Result<(), Refusal> {
        if !self.policy.token_required {
            return Ok(());
        }
        if self.blocked(facts.peer, facts.now) {
            return Err(Refusal {
                counted: Some(Counted::AuthBackoff),
                ..refusal(ServerError::BackedOff, Verdict::Unauthorized)
            });
        }
        if valid {
            return Ok(());
        }
        if count {
            self.count_failure(facts.peer, facts.now, "wrong tokens");
        }
        Err(refusal(ServerError::Unauthorized, Verdict::Unauthorized))
    }

    /// A connection from `peer` was let in and is open now.
    pub fn opened(&mut self, peer: Option<IpAddr>) {
        if let Some(ip) = peer {
            self.per_ip.opened(ip);
        }
    }

    /// A connection from `peer` that was let in has closed.
    pub fn closed(&mut self, peer: Option<IpAddr>) {
        if let Some(ip) = peer {
            self.per_ip.closed(ip);
        }
    }
}

fn refusal(answer: ServerError, verdict: Verdict) -> Refusal {
    Refusal {
        answer: Some(answer),
        verdict,
        counted: None,
        reason: "refused",
    }
}

/// Open connections per client IP (IPv4-mapped IPv6 counted as IPv4). Tracked only while
/// `--max-connections-per-ip` is on; an IP leaves the map with its last connection.
struct PerIp {
    enabled: bool,
    open: HashMap<IpAddr, usize>,
}

impl PerIp {
    fn new(enabled: bool) -> PerIp {
        PerIp {
            enabled,
            open: HashMap::new(),
        }
    }

    fn count(&self, ip: IpAddr) -> usize {
        self.open.get(&ip.to_canonical()).copied().unwrap_or(0)
    }

    fn opened(&mut self, ip: IpAddr) {
        if self.enabled {
            *self.open.entry(ip.to_canonical()).or_default() += 1;
        }
    }

    fn closed(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        if let Some(count) = self.open.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                self.open.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{TokenOrigin, TokenSource};

    const TOKEN: &str = "a-long-enough-token-for-the-gate-tests";

    fn policy() -> Policy {
        Policy {
            allow: Vec::new(),
            allow_uid: Vec::new(),
            max_connections: 2,
            max_connections_per_ip: 0,
            capacity: 1,
            token_required: true,
            insecure: false,
            auth_failures: 2,
        }
    }

    fn gate(policy: Policy) -> Gate {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{TOKEN}\n")).expect("writing the token");
        let spec = format!("ops={}", path.display());
        let source = TokenSource::parse(&spec, |v| TokenOrigin::File(v.into())).expect("spec");
        let (tokens, _) = Tokens::load(&[source]).expect("loading the token");
        Gate::new(policy, Arc::new(tokens))
    }

    fn facts(peer: &str) -> Facts {
        Facts {
            peer: Some(peer.parse().expect("an IP")),
            uid: None,
            listener: ListenerKind::Tcp,
            now: Instant::now(),
            open_connections: 0,
            in_flight: 0,
            stopping: false,
        }
    }

    fn line(text: &str) -> RawRequest {
        RawRequest {
            line: text.as_bytes().to_vec(),
            ..RawRequest::default()
        }
    }

    fn answer(result: Result<Admitted, Refusal>) -> Option<ServerError> {
        result.err().and_then(|r| r.answer)
    }

    #[test]
    fn connections_meet_the_allow_list_then_the_caps() {
        let mut gate = gate(Policy {
            allow: vec!["10.0.0.0/8".parse().expect("a network")],
            max_connections_per_ip: 1,
            ..policy()
        });
        let outside = gate.admit(Knock::Connection, &facts("192.168.1.1"));
        assert_eq!(
            outside.err().map(|r| (r.answer, r.counted)),
            Some((None, Some(Counted::NotAllowed)))
        );
        // IPv4-mapped IPv6 is the same client.
        assert_eq!(
            gate.admit(Knock::Connection, &facts("::ffff:10.1.2.3")),
            Ok(Admitted)
        );
        gate.opened(Some("10.1.2.3".parse().expect("an IP")));
        let again = gate.admit(Knock::Connection, &facts("::ffff:10.1.2.3"));
        assert_eq!(
            again.err().and_then(|r| r.counted),
            Some(Counted::MaxConnectionsPerIp)
        );
        gate.closed(Some("::ffff:10.1.2.3".parse().expect("an IP")));
        assert_eq!(
            gate.admit(Knock::Connection, &facts("10.1.2.3")),
            Ok(Admitted)
        );
        let full = Facts {
            open_connections: 2,
            ..facts("10.9.9.9")
        };
        assert_eq!(
            answer(gate.admit(Knock::Connection, &full)),
            Some(ServerError::Busy)
        );
    }

    #[test]
    fn identify_splits_the_token_and_names_it() {
        let gate = gate(policy());
        let peer = Some("127.0.0.1".parse().expect("an IP"));
        let who = gate.identify(&line(&format!("{TOKEN} deploy web")), peer, Instant::now());
        assert_eq!(who.token_name.as_deref(), Some("ops"));
        assert_eq!(who.payload, b"deploy web");
        let wrong = gate.identify(&line("nope deploy"), peer, Instant::now());
        assert_eq!(
            (wrong.token_name, wrong.payload),
            (None, b"deploy".to_vec())
        );
        let insecure = Gate::new(
            Policy {
                insecure: true,
                token_required: false,
                ..policy()
            },
            Arc::new(Tokens::default()),
        );
        let whole = insecure.identify(&line("deploy web"), peer, Instant::now());
        assert_eq!(whole.payload, b"deploy web");
    }

    #[test]
    fn requests_stopping_then_token_then_busy() {
        let mut gate = gate(policy());
        let ok = Knock::Request {
            token_name: Some("ops"),
        };
        let bad = Knock::Request { token_name: None };
        assert_eq!(gate.admit(ok, &facts("127.0.0.1")), Ok(Admitted));
        let stopping = Facts {
            stopping: true,
            ..facts("127.0.0.1")
        };
        assert_eq!(
            answer(gate.admit(bad, &stopping)),
            Some(ServerError::ShuttingDown)
        );
        let busy = Facts {
            in_flight: 1,
            ..facts("127.0.0.1")
        };
        // A wrong token is told so even when the server is busy: busy would invite a retry.
        assert_eq!(
            answer(gate.admit(bad, &busy)),
            Some(ServerError::Unauthorized)
        );
        let refused = gate.admit(ok, &busy).err();
        assert_eq!(
            refused.map(|r| (r.answer, r.verdict)),
            Some((Some(ServerError::Busy), Verdict::Busy))
        );
    }

    #[test]
    fn wrong_tokens_back_off_and_then_even_a_good_one_is_refused() {
        let mut gate = gate(policy());
        let peer = facts("127.0.0.2");
        let bad = Knock::Request { token_name: None };
        assert_eq!(
            answer(gate.admit(bad, &peer)),
            Some(ServerError::Unauthorized)
        );
        assert_eq!(
            answer(gate.admit(bad, &peer)),
            Some(ServerError::Unauthorized)
        );
        let good = Knock::Request {
            token_name: Some("ops"),
        };
        let refused = gate.admit(good, &peer).err();
        assert_eq!(
            refused.map(|r| (r.answer, r.counted)),
            Some((Some(ServerError::BackedOff), Some(Counted::AuthBackoff)))
        );
        // Backed off: the token is not even looked at.
        let who = gate.identify(&line(&format!("{TOKEN} x")), peer.peer, peer.now);
        assert_eq!(who.token_name, None);
        // Another client is not affected.
        assert_eq!(gate.admit(good, &facts("127.0.0.3")), Ok(Admitted));
    }

    #[test]
    fn continue_is_judged_on_the_token_alone_and_counts_no_failure() {
        let mut gate = gate(policy());
        let head = |token: &str| HttpHead {
            method: "POST".into(),
            minor_version: 1,
            headers: vec![("x-token".into(), token.into())],
            ..HttpHead::default()
        };
        let busy_stopping = Facts {
            in_flight: 5,
            stopping: true,
            ..facts("127.0.0.4")
        };
        assert_eq!(
            gate.admit(Knock::Continue(Some(&head(TOKEN))), &busy_stopping),
            Ok(Admitted)
        );
        for _ in 0..5 {
            let refused = gate.admit(Knock::Continue(Some(&head("nope"))), &busy_stopping);
            assert_eq!(answer(refused), Some(ServerError::Unauthorized));
        }
        // Five refusals, no backoff: the request they are answered as is what counts.
        assert_eq!(
            gate.admit(Knock::Continue(Some(&head(TOKEN))), &busy_stopping),
            Ok(Admitted)
        );
    }

    #[test]
    fn script_auth_lets_every_token_through() {
        let mut gate = gate(Policy {
            token_required: false,
            ..policy()
        });
        let bad = Knock::Request { token_name: None };
        assert_eq!(gate.admit(bad, &facts("127.0.0.1")), Ok(Admitted));
    }

    #[test]
    fn unix_clients_meet_allow_uid_and_no_ip_rule() {
        let mut gate = gate(Policy {
            allow: vec!["10.0.0.0/8".parse().expect("a network")],
            allow_uid: vec![1000],
            max_connections_per_ip: 1,
            ..policy()
        });
        let unix = |uid| Facts {
            peer: None,
            uid: Some(uid),
            listener: ListenerKind::Unix,
            ..facts("127.0.0.1")
        };
        let stranger = gate.admit(Knock::Connection, &unix(0)).err();
        assert_eq!(
            stranger.map(|r| (r.answer, r.reason)),
            Some((None, "uid not in --allow-uid"))
        );
        // No IP: `--allow` and the per-IP cap do not apply, however many are open.
        gate.opened(None);
        gate.opened(None);
        assert_eq!(gate.admit(Knock::Connection, &unix(1000)), Ok(Admitted));
        // Nor does backoff: there is no address to block.
        let bad = Knock::Request { token_name: None };
        for _ in 0..3 {
            assert_eq!(
                answer(gate.admit(bad, &unix(1000))),
                Some(ServerError::Unauthorized)
            );
        }
    }

    #[test]
    fn a_backed_off_tls_client_gets_no_handshake() {
        let mut gate = gate(policy());
        let tls = Facts {
            listener: ListenerKind::Tls,
            ..facts("127.0.0.5")
        };
        assert_eq!(gate.admit(Knock::Connection, &tls), Ok(Admitted));
        gate.failed_authentication(tls.peer, tls.now);
        gate.failed_authentication(tls.peer, tls.now);
        let refused = gate.admit(Knock::Connection, &tls).err();
        assert_eq!(refused.map(|r| r.answer), Some(None));
        // Plain TCP from the same IP still connects, and is told at its request.
        let tcp = facts("127.0.0.5");
        assert_eq!(gate.admit(Knock::Connection, &tcp), Ok(Admitted));
        let good = Knock::Request {
            token_name: Some("ops"),
        };
        assert_eq!(answer(gate.admit(good, &tcp)), Some(ServerError::BackedOff));
    }
}
