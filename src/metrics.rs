//! Prometheus metrics and the health endpoints (SPEC §10), served on `--metrics-listen` by a
//! thread of their own, in the OpenMetrics text format of the `prometheus-client` library.
//!
//! The metrics are process-wide, like the counters of any Prometheus client: every part of the
//! server records into [`metrics()`] without having a handle passed down to it.

use crate::http::{self, ResponseHead};
use crate::request::Verdict;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
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
    pub auth_failures: Counter,
    /// Connections closed at accept because the client is outside `--allow`.
    pub allow_refusals: Counter,
    script_reloads: Family<Labels, Counter>,
    /// TLS handshakes by result: `ok`, `failed`, `client_cert_rejected`, `abandoned`.
    tls_handshakes: Family<Labels, Counter>,
    /// Seconds until the served TLS certificate expires (negative once expired).
    pub tls_cert_expiry_seconds: Gauge,
    /// `on_change`/`on_tick` calls by trigger and outcome (SPEC §13), skipped ticks included.
    trigger_runs: Family<Labels, Counter>,
    /// Listening with a compiled script: `/readyz` is 200.
    ready: AtomicBool,
    /// Shutdown has begun: `/healthz` is 503.
    stopping: AtomicBool,
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
            auth_failures: Counter::default(),
            allow_refusals: Counter::default(),
            script_reloads: Family::default(),
            tls_handshakes: Family::default(),
            tls_cert_expiry_seconds: Gauge::default(),
            trigger_runs: Family::default(),
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
        for kind in crate::trigger::Kind::ALL {
            for outcome in TRIGGER_OUTCOMES {
                let _ = self
                    .trigger_runs
                    .get_or_create_owned(&trigger_labels(kind, outcome));
            }
        }
        r.register(
            "allow_refusals",
            "Connections closed at accept: client not in --allow",
            self.allow_refusals.clone(),
        );
        self.touch_labelled_series();
        self.requests_by_outcome = Verdict::ALL
            .iter()
            .map(|v| {
                self.requests
                    .get_or_create_owned(&vec![("outcome", v.as_str().to_owned())])
            })
            .collect();
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
    }

    pub fn record_request(&self, verdict: Verdict, duration: Duration) {
        // Indexed, not looked up: a labelled lookup allocates and locks on every request.
        if let Some(counter) = self.requests_by_outcome.get(verdict as usize) {
            counter.inc();
        }
        self.request_seconds.observe(duration.as_secs_f64());
    }

    pub fn record_command(&self, success: bool) {
        self.commands
            .get_or_create(&vec![("success", success.to_string())])
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

    fn render(&self) -> String {
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

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener`, one connection at a time: scrapes
/// and probes are rare and small, and each connection gets a short time limit.
pub fn serve(listener: TcpListener) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => answer(stream),
                    Err(e) => {
                        log::warn!("accepting a metrics connection: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(())
}

const METRICS_REQUEST_LIMIT: usize = 8192;

fn answer(mut stream: TcpStream) {
    let limit = Some(Duration::from_secs(2));
    if stream
        .set_read_timeout(limit)
        .and_then(|_| stream.set_write_timeout(limit))
        .is_err()
    {
        return;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let head = loop {
        match http::parse(&buf, METRICS_REQUEST_LIMIT) {
            http::Parsed::Request { head, .. } => break head,
            http::Parsed::Incomplete { .. } => {}
            _ => return,
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let (status, content_type, body) = route(&head.method, head.path());
    let response = ResponseHead {
        status,
        headers: &[],
        default_content_type: content_type,
        keep_alive: false,
        minor_version: 1,
    };
    let _ = stream.write_all(&response.complete(body.as_bytes(), head.method == "HEAD"));
}

fn route(method: &str, path: &str) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let m = metrics();
    if method != "GET" && method != "HEAD" {
        return (405, TEXT, "GET only\n".into());
    }
    match path {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.render(),
        ),
        "/healthz" if m.stopping.load(Ordering::SeqCst) => (503, TEXT, "shutting down\n".into()),
        "/healthz" => (200, TEXT, "ok\n".into()),
        "/readyz" if m.ready.load(Ordering::SeqCst) && !m.stopping.load(Ordering::SeqCst) => {
            (200, TEXT, "ready\n".into())
        }
        "/readyz" => (503, TEXT, "not ready\n".into()),
        _ => (
            404,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
