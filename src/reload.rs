//! Hot reload of the script, the token files and the TLS certificate, key and client CA, on
//! SIGHUP and when a file changes on disk.
//!
//! Runs on its own thread, so reading and compiling never happen on the event loop. Files are
//! looked at through their symlinks (`stat`, not `lstat`), which catches an in-place write, a
//! rename over the file, and the `..data` symlink swap of Kubernetes ConfigMap/Secret volumes.

use crate::auth::{TokenOrigin, TokenSource, Tokens};
use crate::footprint::IdleRelease;
use crate::script::ScriptHost;
use crate::tls::TlsServer;
use crate::workers::{Outbound, Outbox};
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// How often the files are looked at.
const WATCH_INTERVAL: Timespec = Timespec {
    tv_sec: 1,
    tv_nsec: 0,
};
/// How often a certificate close to expiry is warned about again.
const EXPIRY_WARNING_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// What identifies a version of a file: a swap or rewrite changes at least one of these.
type Fingerprint = Option<(u64, u64, u64, SystemTime)>;

fn fingerprint(path: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino(), meta.len(), meta.modified().ok()?))
}

/// Asks the reload thread to reload now, by ringing the eventfd it sleeps on. Not a channel:
/// after a quiet second the thread unmaps the binary's code (`footprint::IdleRelease`) and goes
/// to sleep, and each function it runs in between maps a cluster of that code back; a `poll`
/// made in place (rustix) is the least code there is.
#[derive(Clone)]
pub struct ReloadTrigger(Arc<OwnedFd>);

impl ReloadTrigger {
    pub fn reload_now(&self) {
        let _ = rustix::io::write(&*self.0, &1u64.to_ne_bytes());
    }
}

enum Wake {
    Rung,
    Tick,
    /// Every `ReloadTrigger` is gone: the server has ended.
    Orphaned,
}

/// Sleeps until the doorbell rings or the watch interval passes (or a signal interrupts).
fn sleep(doorbell: &Arc<OwnedFd>) -> Wake {
    let mut fds = [PollFd::new(&**doorbell, PollFlags::IN)];
    let rung = matches!(poll(&mut fds, Some(&WATCH_INTERVAL)), Ok(n) if n > 0);
    if Arc::strong_count(doorbell) == 1 {
        Wake::Orphaned
    } else if rung {
        let _ = rustix::io::read(&**doorbell, &mut [0; 8]);
        Wake::Rung
    } else {
        Wake::Tick
    }
}

/// Starts the reload thread. `tokens` are the ones the server starts with: a reload keeps
/// those of a source it cannot read.
pub fn spawn(
    host: Arc<ScriptHost>,
    token_sources: Vec<TokenSource>,
    tokens: Arc<Tokens>,
    tls: Option<Arc<TlsServer>>,
    outbox: Outbox,
) -> std::io::Result<ReloadTrigger> {
    let doorbell = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
    let trigger = ReloadTrigger(doorbell.clone());
    let mut watcher = Watcher::new(host, token_sources, outbox);
    watcher.tls = tls.map(TlsWatch::new);
    watcher.tokens = tokens;
    thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            let mut idle = IdleRelease::from_now();
            loop {
                match sleep(&doorbell) {
                    Wake::Rung => watcher.reload_all("SIGHUP"),
                    Wake::Tick => {
                        watcher.reload_changed();
                        // Here, as this thread is the one that wakes each second anyway.
                        idle.tick();
                    }
                    Wake::Orphaned => return,
                }
            }
        })?;
    Ok(trigger)
}

struct Watcher {
    host: Arc<ScriptHost>,
    token_sources: Vec<TokenSource>,
    outbox: Outbox,
    /// The tokens last sent to the loop.
    tokens: Arc<Tokens>,
    script_seen: Fingerprint,
    token_files: Vec<(PathBuf, Fingerprint)>,
    tls: Option<TlsWatch>,
}

/// The TLS files as last seen, and when their expiry was last warned about.
struct TlsWatch {
    server: Arc<TlsServer>,
    seen: Vec<(PathBuf, Fingerprint)>,
    warned: Instant,
}

impl TlsWatch {
    fn new(server: Arc<TlsServer>) -> TlsWatch {
        let seen = server
            .files()
            .paths()
            .into_iter()
            .map(|p| (p.to_owned(), fingerprint(p)))
            .collect();
        TlsWatch {
            server,
            seen,
            warned: Instant::now(), // loading warned already
        }
    }

    /// Whether any file changed since last seen (a file that vanished is not a change: a
    /// symlink swap passes through that state, and the old files keep serving meanwhile).
    fn changed(&mut self) -> bool {
        let mut changed = false;
        for (path, seen) in &mut self.seen {
            let now = fingerprint(path);
            if now.is_some() && now != *seen {
                *seen = now;
                changed = true;
            }
        }
        changed
    }

    fn reload(&mut self, why: &str) {
        match self.server.reload() {
            Ok(()) => {
                self.warned = Instant::now();
                log::info!(
                    "TLS certificate reloaded ({why}): {}",
                    self.server.files().cert.display()
                )
            }
            Err(error) => {
                log::error!("TLS reload failed ({why}), keeping the old certificate: {error}")
            }
        }
    }

    /// Keeps the expiry gauge current, and warns again daily when it is close.
    fn tick(&mut self) {
        let daily = self.warned.elapsed() >= EXPIRY_WARNING_INTERVAL;
        if daily {
            self.warned = Instant::now();
        }
        self.server.report_expiry(daily);
    }
}

impl Watcher {
    fn new(host: Arc<ScriptHost>, token_sources: Vec<TokenSource>, outbox: Outbox) -> Watcher {
        let token_files = token_sources
            .iter()
            .filter_map(|s| match &s.origin {
                TokenOrigin::File(path) => Some((path.clone(), fingerprint(path))),
                TokenOrigin::Env(_) => None,
            })
            .collect();
        let script_seen = fingerprint(host.path());
        Watcher {
            host,
            token_sources,
            outbox,
            tokens: Arc::default(),
            script_seen,
            token_files,
            tls: None,
        }
    }

    fn reload_all(&mut self, why: &str) {
        self.script_seen = fingerprint(self.host.path());
        self.reload_script(why);
        for (path, seen) in &mut self.token_files {
            *seen = fingerprint(path);
        }
        self.reload_tokens(why);
        if let Some(tls) = &mut self.tls {
            tls.changed();
            tls.reload(why);
        }
    }

    fn reload_changed(&mut self) {
        let now = fingerprint(self.host.path());
        if now.is_some() && now != self.script_seen {
            self.script_seen = now;
            self.reload_script("file changed");
        }
        let mut tokens_changed = false;
        for (path, seen) in &mut self.token_files {
            let now = fingerprint(path);
            if now.is_some() && now != *seen {
                *seen = now;
                tokens_changed = true;
            }
        }
        if tokens_changed {
            self.reload_tokens("file changed");
        }
        if let Some(tls) = &mut self.tls {
            if tls.changed() {
                tls.reload("file changed");
            }
            tls.tick();
        }
    }

    fn reload_script(&self, why: &str) {
        let result = self.host.reload();
        crate::metrics::metrics().record_reload(result.is_ok());
        match result {
            Ok(()) => log::info!("script reloaded ({why}): {}", self.host.path().display()),
            Err(error) => {
                log::error!("script reload failed ({why}), keeping the old script: {error}")
            }
        }
    }

    fn reload_tokens(&mut self, why: &str) {
        if self.token_sources.is_empty() {
            return;
        }
        let (tokens, notes) = Tokens::reload(&self.token_sources, &self.tokens);
        for (level, note) in notes {
            log::log!(level, "token reload ({why}): {note}");
        }
        log::info!("tokens reloaded ({why})");
        self.tokens = Arc::new(tokens);
        self.outbox.send(Outbound::Tokens(self.tokens.clone()));
    }
}
