//! Integration tests: every test starts the real `command-trigger` binary and talks to it over
//! TCP (or runs its client subcommands), asserting on bytes, exit codes, logs and files.
//!
//! Every wait is bounded (see `util`); a hung server fails a test instead of hanging CI.

mod util;

mod clients;
mod core;
mod defects_script;
mod defects_server;
mod hardening;
mod http;
mod jobs_state;
mod live;
mod local_triggers;
mod ops;
mod reply_path;
mod rough_edges;
mod script_tests;
mod scripts;
mod spawning;
mod structure;
mod transport;
