//! What one event loop measured, and the merged report the bench script parses.

use std::fmt;
use std::time::Duration;

/// Why a request did not count as answered.
#[derive(Clone, Copy)]
pub enum Failure {
    /// The connection could not be opened (refused, reset during the handshake).
    Connect,
    /// The server closed or reset the connection before a complete reply.
    Short,
    /// A complete reply that is not the expected one.
    Wrong,
    /// No complete reply within `--timeout`.
    Timeout,
}

/// Counters and latencies of one event loop; merged at the end.
#[derive(Default)]
pub struct Stats {
    /// Latency of every answered request, in nanoseconds; sorted once, at the end.
    pub latencies: Vec<u64>,
    pub connect: u64,
    pub short: u64,
    pub wrong: u64,
    pub timeout: u64,
    /// Time from the common start to this loop's end.
    pub elapsed: Duration,
}

impl Stats {
    pub fn ok(&mut self, latency: Duration) {
        self.latencies.push(latency.as_nanos() as u64);
    }

    pub fn fail(&mut self, failure: Failure) {
        match failure {
            Failure::Connect => self.connect += 1,
            Failure::Short => self.short += 1,
            Failure::Wrong => self.wrong += 1,
            Failure::Timeout => self.timeout += 1,
        }
    }

    pub fn finished(&self) -> u64 {
        self.latencies.len() as u64 + self.errors()
    }

    pub fn errors(&self) -> u64 {
        self.connect + self.short + self.wrong + self.timeout
    }

    pub fn merge(mut self, other: Stats) -> Stats {
        self.latencies.extend(other.latencies);
        self.connect += other.connect;
        self.short += other.short;
        self.wrong += other.wrong;
        self.timeout += other.timeout;
        self.elapsed = self.elapsed.max(other.elapsed);
        self
    }
}

/// One line of `key=value` pairs: easy to read, and to parse from a shell script.
pub struct Report(pub Stats);

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut stats = Stats {
            latencies: Vec::new(),
            ..self.0
        };
        let mut latencies = self.0.latencies.clone();
        latencies.sort_unstable();
        stats.latencies = latencies;
        let ok = stats.latencies.len();
        let seconds = stats.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "rps={:.0} ok={ok} errors={}",
            ok as f64 / seconds,
            stats.errors()
        )?;
        write!(f, " connect={} short={}", stats.connect, stats.short)?;
        write!(f, " wrong={} timeout={}", stats.wrong, stats.timeout)?;
        let pct = |p: f64| percentile(&stats.latencies, p);
        write!(f, " p50_us={:.1} p99_us={:.1}", pct(0.50), pct(0.99))?;
        write!(f, " max_us={:.1} elapsed_s={seconds:.3}", pct(1.0))
    }
}

/// Nearest-rank percentile in microseconds; 0 when nothing was answered.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}
