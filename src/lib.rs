//! `command-trigger`: trigger commands in a pod over TCP, decided by a Rhai script.
//!
//! # Layout
//!
//! - [`cli`]: the command line as typed (clap); [`config`]: the validated settings of `serve`.
//! - [`app`]: what each subcommand does, start to finish; `main` only maps errors to exit codes.
//! - [`server`]: the mio event loop: accept, read, frame, authenticate, dispatch, write, time out.
//! - [`connection`]: one client connection's buffers and phase; [`framing`]: bytes to requests;
//!   [`http`]: HTTP/1.x requests and responses; [`wire`]: a reply encoded for its framing.
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
//! - [`signals`]: SIGTERM/SIGINT/SIGHUP as loop events; [`reload`]: hot reload of files.
//! - [`client`]: the `send` subcommand; [`init`]: the built-in init when running as PID 1.
//! - [`request`]: the request, the reply and the request log line; [`error`]: exit statuses.
//! - Local triggers: [`watch`] (`--watch`, `on_change`) and [`schedule`] (`--every`, `--cron`,
//!   `on_tick`) queue calls on the worker pool through [`trigger`].
//! - [`footprint`]: keeping idle memory small; [`logging`]: text or JSON log lines on stderr; [`metrics`]: Prometheus and health state;
//!   [`metrics_server`]: the `--metrics-listen` port.

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
pub mod trigger;
pub mod watch;
pub mod workers;

/// Kept at the crate root, where tests, fuzz targets and older code name them.
pub use protocol::{framing, http};
