//! `command-trigger`: trigger commands in a pod over TCP, decided by a Rhai script.
//!
//! # A request, from accept to reply
//!
//! 1. [`server`] polls; a ready [`transport::Listener`] (TCP, TLS, Unix) is accepted from.
//! 2. [`gate::Gate::admit`] (`Knock::Connection`): allow-lists, then connection caps; a refused
//!    connection is answered `ERR busy` (or nothing) and never enters the slab.
//! 3. [`connection::Connection::advance`] reads through its [`transport::Stream`];
//!    [`protocol::decode`] cuts a request out (input that never will be one is refused there).
//! 4. HTTP `Expect: 100-continue`: the gate judges the head's token before the body is sent.
//! 5. [`gate::Gate::identify`] checks the token; `admit` (`Knock::Request`) decides stop,
//!    backoff, token and busy; a refusal is encoded by [`protocol`] and logged by the loop.
//! 6. The [`request::Request`] goes to the [`workers`]; a worker runs `handle(req)` ([`script`]);
//!    `write()` output goes out framed by [`protocol::Protocol::encode_live`].
//! 7. `encode_reply` (or `encode_end` after live output) frames the reply and decides once
//!    whether the connection closes; [`request::log_request`] writes the request's log line.
//! 8. Back on the loop, [`connection::Connection::answer`] queues it and `advance` writes it
//!    (WRITABLE asked for only while bytes are pending); then the next request, or the close.
//!
//! # Layout
//!
//! - [`cli`]: the command line as typed (clap); [`config`]: the validated settings of `serve`,
//!   `call` and `send`; [`error`]: how a run ends ([`error::Outcome`], [`error::Fatal`]).
//! - [`app`]: what each subcommand does, start to finish; `main` alone picks exit statuses.
//! - [`server`]: the mio event loop: accept, drive connections, dispatch, timers, stop.
//! - [`gate`]: admission, one function over the request and the connection's facts.
//! - [`connection`]: one client connection's buffers and phases, advanced in one loop.
//! - [`protocol`]: framings: [`framing`] (line, stream), [`http`] requests, responses;
//!   every reply, live output and close decision is encoded there.
//! - [`transport`]: plain TCP, TLS and Unix streams and listeners behind one type; [`tls`]:
//!   certificates, their rotation, and the identity a handshake proves.
//! - [`auth`]: token sources and the constant-time check; [`backoff`]: `--auth-failures`.
//! - [`workers`]: the threads that run handlers, and the outbox back to the loop.
//! - [`script`]: the Rhai engine, `handle(req)`, and the functions scripts call.
//! - [`commands`]: running one command with its process group, deadline and output cap.
//! - [`runtime`]: what handlers and jobs share; [`jobs`]: the job table (keys, debounce, retry,
//!   kept output); [`job_runner`]: its threads and timer; [`locks`]: `opts.lock`.
//! - [`state`]: `state_*` and `once`, in memory or in a redb file; [`ratelimit`]: `rate_limit`;
//! - [`runner`]: the seam where commands run (processes, or a recorder with mocks);
//!   [`clock`]: the seam where time is read (real, or virtual in tests).
//! - [`script_test`]: `command-trigger test`, the helpers test scripts call, `call --dry-run`.
//! - [`stop`]: what stops the loop ([`signals`] in the binary, a [`stop::Switch`] in-process);
//!   [`reload`]: hot reload of files.
//! - [`client`]: the `send` subcommand; [`init`]: the built-in init when running as PID 1.
//! - [`request`]: the request, the reply and the request log line.
//! - Local triggers: [`watch`] (`--watch`, `on_change`) and [`schedule`] (`--every`, `--cron`,
//!   `on_tick`) queue calls on the worker pool through [`trigger`].
//! - [`footprint`]: keeping idle memory small; [`logging`]: text or JSON log lines on stderr;
//!   [`metrics`]: Prometheus and health state; [`metrics_server`]: the `--metrics-listen` port.

pub mod app;
pub mod auth;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod clock;
pub mod commands;
pub mod config;
pub mod connection;
pub mod error;
pub mod footprint;
pub mod gate;
pub mod init;
pub mod job_runner;
pub mod jobs;
pub mod locks;
pub mod logging;
pub mod metrics;
pub mod metrics_server;
pub mod placement;
pub mod protocol;
pub mod ratelimit;
pub mod reload;
pub mod request;
pub mod runner;
pub mod runtime;
pub mod schedule;
pub mod script;
pub mod script_test;
pub mod server;
pub mod signals;
pub mod state;
pub mod stop;
pub mod tls;
pub mod transport;
pub mod trigger;
pub mod watch;
pub mod workers;

/// Kept at the crate root, where tests, fuzz targets and older code name them.
pub use protocol::{framing, http};
