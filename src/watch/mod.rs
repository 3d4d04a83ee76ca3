//! `--watch PATH`: one thread that notices changes to files and directories and hands
//! `on_change(event)` calls to the worker pool (SPEC §13).
//!
//! inotify (through `notify`) only says *that* something may have changed; what changed is
//! decided by comparing a snapshot of each watched path with the one taken before. That one
//! rule gives every property the contract asks for: no event for what exists at start (the
//! first snapshot is the baseline), a Kubernetes `..data` symlink swap or an editor's burst of
//! writes is one event (events only restart the `--watch-debounce` wait; one comparison
//! follows), a path that does not exist yet is reported when it appears (its nearest existing
//! ancestor is watched), and a volume that sends no inotify events at all is still caught by
//! the same comparison run every `--watch-poll`.
//!
//! inotify is armed on directories, never on the watched file itself: the parent sees a file
//! being created, removed, renamed over or swapped by symlink, all of which a watch on the
//! file's own inode would miss or lose.

mod snapshot;

use crate::trigger::{Kind, Triggers};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use rhai::Map;
use snapshot::Snapshot;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

/// Files up to this size are compared by content, not by metadata: some volumes rewrite a file
/// in place with the same size and a coarse or unchanged mtime.
const HASHED_BYTES: u64 = 1 << 20;
/// A path that never goes quiet still gets an event after this many debounce periods.
const MAX_WAIT_PERIODS: u32 = 10;

/// What `--watch` was given.
#[derive(Clone, Debug)]
pub struct WatchSettings {
    pub paths: Vec<PathBuf>,
    pub debounce: Duration,
    pub poll: Duration,
}

/// What the watch thread is told.
enum Message {
    /// inotify saw something (or failed).
    Fs(notify::Result<notify::Event>),
    /// An `on_change` call ended: held-back events may go now.
    Done,
}

/// Starts the watch thread. inotify that cannot be set up (no support, too many watches) is
/// logged, and the periodic comparison carries on alone.
pub fn spawn(settings: WatchSettings, triggers: Triggers) -> std::io::Result<()> {
    let (sender, receiver) = mpsc::channel();
    let events = sender.clone();
    let inotify = notify::recommended_watcher(move |event| {
        let _ = events.send(Message::Fs(event));
    })
    .map_err(|e| {
        log::warn!("--watch: inotify unavailable ({e}); comparing every --watch-poll only")
    })
    .ok();
    let watches = settings
        .paths
        .iter()
        .map(|p| Watch::new(p.clone()))
        .collect();
    let mut state = WatchThread {
        settings,
        triggers,
        inotify,
        armed: BTreeMap::new(),
        watches,
        done: sender,
    };
    // inotify first, then the baseline: a change in between is then either in the baseline
    // or reported, never lost.
    state.rearm();
    for watch in &mut state.watches {
        watch.seen = Snapshot::take(&watch.path);
        log::info!("watching {} for on_change", watch.path.display());
    }
    thread::Builder::new()
        .name("watch".into())
        .spawn(move || state.run(&receiver))?;
    Ok(())
}

/// One `--watch PATH`.
struct Watch {
    path: PathBuf,
    /// The last snapshot: changes are what differs from it.
    seen: Snapshot,
    /// Directories whose inotify events concern this path.
    dirs: Vec<PathBuf>,
    /// When the first and the last inotify event of the current burst came.
    burst: Option<(Instant, Instant)>,
    /// An event found while the previous `on_change` still runs: the latest one waits.
    pending: Option<Map>,
    running: Arc<AtomicBool>,
}

impl Watch {
    fn new(path: PathBuf) -> Watch {
        Watch {
            seen: Snapshot::Missing,
            dirs: Vec::new(),
            burst: None,
            pending: None,
            running: Arc::new(AtomicBool::new(false)),
            path,
        }
    }

    /// Whether an inotify event on `changed` may concern this path.
    fn concerns(&self, changed: &Path) -> bool {
        self.dirs
            .iter()
            .any(|dir| changed == dir || changed.parent() == Some(dir))
    }

    fn quiet_since(&self, now: Instant, debounce: Duration) -> bool {
        self.burst.is_some_and(|(first, last)| {
            now >= last + debounce || now >= first + debounce * MAX_WAIT_PERIODS
        })
    }

    /// Compares with the last snapshot; a difference becomes the pending event.
    fn compare(&mut self) {
        self.burst = None;
        let now = Snapshot::take(&self.path);
        if let Some(event) = self.seen.change_to(&now, &self.path) {
            log::debug!("{}: {:?}", self.path.display(), event);
            self.pending = Some(event);
        }
        self.seen = now;
    }

    /// Directories to watch: the nearest existing ancestor (the parent, once it exists), the
    /// directory of the file a symlink leads to (an in-place write there), and the path itself
    /// when it is a directory.
    fn wanted_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Ok(real) = std::fs::canonicalize(&self.path)
            && real != self.path
            && let Some(parent) = real.parent()
            && !real.is_dir()
        {
            dirs.push(parent.to_owned());
        }
        let mut ancestor = self.path.parent();
        while let Some(dir) = ancestor {
            if dir.is_dir() {
                dirs.push(dir.to_owned());
                break;
            }
            ancestor = dir.parent();
        }
        if self.path.is_dir() {
            dirs.push(self.path.clone());
        }
        dirs
    }
}

struct WatchThread {
    settings: WatchSettings,
    triggers: Triggers,
    inotify: Option<RecommendedWatcher>,
    /// Directories inotify watches, with the inode they had: a directory replaced under the
    /// same name (a `..data` symlink now pointing elsewhere) is watched again.
    armed: BTreeMap<PathBuf, Option<(u64, u64)>>,
    watches: Vec<Watch>,
    /// A sender for `on_change` calls to say they ended.
    done: Sender<Message>,
}

impl WatchThread {
    fn run(mut self, receiver: &Receiver<Message>) {
        let mut next_poll = Instant::now() + self.settings.poll;
        loop {
            let wake = self.next_wake(next_poll);
            match receiver.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(message) => self.on_message(message),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Everything already queued, so a comparison never runs ahead of an event that
            // would have put its path in a burst.
            while let Ok(message) = receiver.try_recv() {
                self.on_message(message);
            }
            if self.triggers.stopping() {
                return;
            }
            let now = Instant::now();
            let poll_due = now >= next_poll;
            if poll_due {
                next_poll = now + self.settings.poll;
            }
            self.compare_due(now, poll_due);
            self.submit_pending();
        }
    }

    fn on_message(&mut self, message: Message) {
        match message {
            Message::Fs(Ok(event)) => self.on_event(&event),
            Message::Fs(Err(error)) => self.on_error(&error),
            Message::Done => {}
        }
    }

    fn next_wake(&self, next_poll: Instant) -> Instant {
        let debounce = self.settings.debounce;
        self.watches
            .iter()
            .filter_map(|w| w.burst)
            .map(|(first, last)| (last + debounce).min(first + debounce * MAX_WAIT_PERIODS))
            .fold(next_poll, Instant::min)
    }

    fn on_event(&mut self, event: &notify::Event) {
        if event.kind.is_access() {
            return; // reads (ours included) change nothing
        }
        let now = Instant::now();
        for watch in &mut self.watches {
            if event.paths.iter().any(|p| watch.concerns(p)) {
                let first = watch.burst.map_or(now, |(first, _)| first);
                watch.burst = Some((first, now));
            }
        }
    }

    /// An inotify error (such as a lost queue): compare everything after the debounce.
    fn on_error(&mut self, error: &notify::Error) {
        log::warn!("--watch: {error}; comparing every watched path");
        let now = Instant::now();
        for watch in &mut self.watches {
            watch.burst = Some((now, now));
        }
    }

    fn compare_due(&mut self, now: Instant, poll_due: bool) {
        let debounce = self.settings.debounce;
        let mut compared = false;
        for watch in &mut self.watches {
            // A poll leaves a path in a burst alone: the burst's own comparison follows.
            if watch.quiet_since(now, debounce) || (poll_due && watch.burst.is_none()) {
                watch.compare();
                compared = true;
            }
        }
        if compared {
            self.rearm();
        }
    }

    fn submit_pending(&mut self) {
        for watch in &mut self.watches {
            if watch.running.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            let Some(event) = watch.pending.take() else {
                continue;
            };
            let what = format!(
                "path={} kind={}",
                event.get("path").map(|p| p.to_string()).unwrap_or_default(),
                event.get("kind").map(|k| k.to_string()).unwrap_or_default()
            );
            let done = self.done.clone();
            let on_done = Box::new(move || {
                let _ = done.send(Message::Done);
            });
            self.triggers.submit(
                Kind::Watch,
                event,
                what,
                watch.running.clone(),
                Some(on_done),
            );
        }
    }

    /// Points inotify at the directories the watches want now: a parent that appeared, a
    /// watched directory that was created or replaced.
    fn rearm(&mut self) {
        let mut wanted: BTreeSet<PathBuf> = BTreeSet::new();
        for watch in &mut self.watches {
            watch.dirs = watch.wanted_dirs();
            wanted.extend(watch.dirs.iter().cloned());
        }
        let Some(inotify) = self.inotify.as_mut() else {
            return;
        };
        let gone: Vec<PathBuf> = self
            .armed
            .keys()
            .filter(|dir| !wanted.contains(*dir))
            .cloned()
            .collect();
        for dir in gone {
            self.armed.remove(&dir);
            if dir.exists() {
                let _ = inotify.unwatch(&dir); // a removed directory took its watch with it
            }
        }
        for dir in wanted {
            let identity = dir_identity(&dir);
            if self.armed.get(&dir) == Some(&identity) {
                continue;
            }
            if self.armed.contains_key(&dir) {
                let _ = inotify.unwatch(&dir);
            }
            match inotify.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.armed.insert(dir, identity);
                }
                Err(e) => log::warn!(
                    "--watch: inotify on {}: {e}; comparing every --watch-poll",
                    dir.display()
                ),
            }
        }
    }
}

fn dir_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_and_path(event: Option<Map>) -> Option<(String, String)> {
        let event = event?;
        Some((event["kind"].to_string(), event["path"].to_string()))
    }

    #[test]
    fn a_file_is_created_modified_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("app.conf");
        let missing = Snapshot::take(&file);
        std::fs::write(&file, "a").expect("write");
        let first = Snapshot::take(&file);
        let path = file.display().to_string();
        assert_eq!(
            kind_and_path(missing.change_to(&first, &file)),
            Some(("created".into(), path.clone()))
        );
        assert!(first.change_to(&Snapshot::take(&file), &file).is_none());
        std::fs::write(&file, "b").expect("write");
        let second = Snapshot::take(&file);
        assert_eq!(
            kind_and_path(first.change_to(&second, &file)),
            Some(("modified".into(), path.clone()))
        );
        std::fs::remove_file(&file).expect("remove");
        assert_eq!(
            kind_and_path(second.change_to(&Snapshot::take(&file), &file)),
            Some(("removed".into(), path))
        );
    }

    #[test]
    fn a_directory_reports_the_entry_or_itself_for_several() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a"), "1").expect("write");
        let before = Snapshot::take(dir.path());
        std::fs::write(dir.path().join("b"), "2").expect("write");
        let one = Snapshot::take(dir.path());
        let b = dir.path().join("b").display().to_string();
        assert_eq!(
            kind_and_path(before.change_to(&one, dir.path())),
            Some(("created".into(), b))
        );
        std::fs::write(dir.path().join("a"), "3").expect("write");
        std::fs::remove_file(dir.path().join("b")).expect("remove");
        let event = one.change_to(&Snapshot::take(dir.path()), dir.path());
        let event = event.expect("an event");
        assert_eq!(event["path"].to_string(), dir.path().display().to_string());
        assert_eq!(event["paths"].clone().into_array().map(|a| a.len()), Ok(2));
    }

    #[test]
    fn kubernetes_internal_entries_are_not_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let before = Snapshot::take(dir.path());
        std::fs::create_dir(dir.path().join("..2026_12_05")).expect("mkdir");
        assert!(
            before
                .change_to(&Snapshot::take(dir.path()), dir.path())
                .is_none()
        );
    }
}
