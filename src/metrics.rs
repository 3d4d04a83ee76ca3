//! Prometheus metrics and the health state (SPEC §10), in the OpenMetrics text format of the
//! `prometheus-client` library; [`metrics_server`](crate::metrics_server) serves them.
//!
//! The metrics are process-wide, like the counters of any Prometheus client: every part of the
//! server records into [`metrics()`] without having a handle passed down to it.

use crate::request::Verdict;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

/// Every result of a TLS handshake, present in `/metrics` from the start.
const TLS_RESULTS: [&str; 4] = ["ok", "failed", "client_cert_rejected", "abandoned"];

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    /// The `requests` series of each outcome, in `Verdict` order, made once at start.
    requests_by_outcome: Vec<Counter>,
    request_seconds: Histogram,
    commands: Family<Labels, Counter>,
    pub open_connections: Gauge,
    pub queue_depth: Gauge,
    pub busy_workers: Gauge,
    pub running_jobs: Gauge,
    /// Background jobs that ended, by result: `success`, `failure` or `cancelled`.
    job_ends: Family<Labels, Counter>,
    pub auth_failures: Counter,
    script_reloads: Family<Labels, Counter>,
    /// TLS handshakes by result: `ok`, `failed`, `client_cert_rejected`, `abandoned`.
    tls_handshakes: Family<Labels, Counter>,
    /// Seconds until the served TLS certificate expires (negative once expired).
    pub tls_cert_expiry_seconds: Gauge,
    /// `on_change`/`on_tick` calls by trigger and outcome (SPEC §13), skipped ticks included.
    trigger_runs: Family<Labels, Counter>,
    /// Connections and requests the server turned away itself, by [`Refusal`], made at start.
    refusals: Vec<Counter>,
    /// Listening with a compiled script: `/readyz` is 200.
    ready: AtomicBool,
    /// Shutdown has begun: `/healthz` is 503.
    stopping: AtomicBool,
}

/// Why the server turned a connection or a request away without running the script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-connections` reached: answered `ERR busy` (HTTP: 503) at accept.
    MaxConnections,
    /// `--max-connections-per-ip` reached for the client's IP: the same answer.
    MaxConnectionsPerIp,
    /// Not in `--allow`: closed at accept without a reply.
    NotAllowed,
    /// `--workers` + `--queue` full: the request is answered `ERR busy`.
    QueueFull,
    /// `--auth-failures` tripped: the request is answered without checking its token.
    AuthBackoff,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::MaxConnections,
        Refusal::MaxConnectionsPerIp,
        Refusal::NotAllowed,
        Refusal::QueueFull,
        Refusal::AuthBackoff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max-connections",
            Refusal::MaxConnectionsPerIp => "max-connections-per-ip",
            Refusal::NotAllowed => "allow",
            Refusal::QueueFull => "queue-full",
            Refusal::AuthBackoff => "auth-backoff",
        }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let buckets = [
            0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0,
        ];
        let metrics = Metrics {
            registry: Registry::with_prefix("command_trigger"),
            requests: Family::default(),
            requests_by_outcome: Vec::new(),
            request_seconds: Histogram::new(buckets),
            commands: Family::default(),
            open_connections: Gauge::default(),
            queue_depth: Gauge::default(),
            busy_workers: Gauge::default(),
            running_jobs: Gauge::default(),
            job_ends: Family::default(),
            auth_failures: Counter::default(),
            script_reloads: Family::default(),
            tls_handshakes: Family::default(),
            tls_cert_expiry_seconds: Gauge::default(),
            trigger_runs: Family::default(),
            refusals: Vec::new(),
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        };
        metrics.registered()
    }

    fn registered(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register("requests", "Requests by outcome", self.requests.clone());
        r.register(
            "request_duration_seconds",
            "Time from a complete request to its reply",
            self.request_seconds.clone(),
        );
        r.register(
            "commands",
            "Commands run by scripts, by success",
            self.commands.clone(),
        );
        r.register(
            "open_connections",
            "Open client connections",
            self.open_connections.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for a worker",
            self.queue_depth.clone(),
        );
        r.register(
            "busy_workers",
            "Workers running a handler",
            self.busy_workers.clone(),
        );
        r.register(
            "running_jobs",
            "Background jobs running",
            self.running_jobs.clone(),
        );
        r.register(
            "jobs_ended",
            "Background jobs that ended, by result (success, failure, cancelled)",
            self.job_ends.clone(),
        );
        for result in ["success", "failure", "cancelled"] {
            // Created now so every series is present (at 0) from the start.
            drop(
                self.job_ends
                    .get_or_create(&vec![("result", result.to_owned())]),
            );
        }
        r.register(
            "auth_failures",
            "Requests with a wrong or missing token",
            self.auth_failures.clone(),
        );
        r.register(
            "script_reloads",
            "Script reloads by result",
            self.script_reloads.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes by result",
            self.tls_handshakes.clone(),
        );
        r.register(
            "tls_cert_expiry_seconds",
            "Seconds until the served TLS certificate expires",
            self.tls_cert_expiry_seconds.clone(),
        );
        r.register(
            "trigger_runs",
            "Calls of on_change (trigger=watch) and on_tick (trigger=tick) by outcome",
            self.trigger_runs.clone(),
        );
        let refusals = Family::<Labels, Counter>::default();
        r.register(
            "refusals",
            "Connections and requests refused by the server itself, by reason",
            refusals.clone(),
        );
        self.refusals = Refusal::ALL
            .iter()
            .map(|why| refusals.get_or_create_owned(&vec![("reason", why.as_str().to_owned())]))
            .collect();
        self.requests_by_outcome = Verdict::ALL
            .iter()
            .map(|v| {
                self.requests
                    .get_or_create_owned(&vec![("outcome", v.as_str().to_owned())])
            })
            .collect();
        self.touch_labelled_series();
        self
    }

    /// Creates every documented labelled series at 0, so a dashboard or an alert on
    /// `commands_total{success="false"}` sees a series before the first failure.
    fn touch_labelled_series(&self) {
        for success in ["true", "false"] {
            let _ = self
                .commands
                .get_or_create_owned(&vec![("success", success.to_owned())]);
        }
        for result in ["success", "failure"] {
            let _ = self
                .script_reloads
                .get_or_create_owned(&vec![("result", result.to_owned())]);
        }
        for result in TLS_RESULTS {
            let _ = self
                .tls_handshakes
                .get_or_create_owned(&vec![("result", result.to_owned())]);
        }
        for kind in crate::trigger::Kind::ALL {
            for outcome in TRIGGER_OUTCOMES {
                let _ = self
                    .trigger_runs
                    .get_or_create_owned(&trigger_labels(kind, outcome));
            }
        }
    }

    pub fn record_request(&self, verdict: Verdict, duration: Duration) {
        // Indexed, not looked up: a labelled lookup allocates and locks on every request.
        if let Some(counter) = self.requests_by_outcome.get(verdict as usize) {
            counter.inc();
        }
        self.request_seconds.observe(duration.as_secs_f64());
    }

    /// Requests answered since start, whatever their outcome: tells a quiet second from a busy one.
    pub fn requests_answered(&self) -> u64 {
        self.requests_by_outcome.iter().map(Counter::get).sum()
    }

    pub fn record_refusal(&self, why: Refusal) {
        if let Some(counter) = self.refusals.get(why as usize) {
            counter.inc();
        }
    }

    pub fn record_command(&self, success: bool) {
        self.commands
            .get_or_create(&vec![("success", success.to_string())])
            .inc();
    }

    pub fn record_job_end(&self, result: &str) {
        self.job_ends
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    pub fn record_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.script_reloads
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    pub fn record_tls_handshake(&self, result: &'static str) {
        self.tls_handshakes
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    /// One `on_change`/`on_tick` call ended with `outcome` (one of [`TRIGGER_OUTCOMES`]).
    pub fn record_trigger(&self, kind: crate::trigger::Kind, outcome: &'static str) {
        self.trigger_runs
            .get_or_create(&trigger_labels(kind, outcome))
            .inc();
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Listening with a compiled script.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The registry in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// How a trigger call can end; every pair with a trigger kind is a series from the start.
pub const TRIGGER_OUTCOMES: [&str; 4] = ["ok", "failed", "timed-out", "skipped"];

fn trigger_labels(kind: crate::trigger::Kind, outcome: &'static str) -> Labels {
    vec![
        ("trigger", kind.as_str().to_owned()),
        ("outcome", outcome.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_index_their_own_place() {
        // `record_refusal` indexes the counters made at start by `why as usize`.
        for (index, why) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*why as usize, index);
        }
    }
}
