//! What a watched path looks like at one moment ([`Snapshot`]), and the `on_change` event
//! that comparing two of them gives. Pure apart from reading the file system.

use super::HASHED_BYTES;
use rhai::{Array, Dynamic, Map};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What a path looked like, through symlinks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Snapshot {
    Missing,
    File(Fingerprint),
    /// Entries by name; Kubernetes' own `..data`, `..2024_...` entries left out, since the
    /// names that point through them are what change for a reader.
    Dir(BTreeMap<OsString, Fingerprint>),
}

/// A version of a file. Small files are known by their content, so a ConfigMap swap that
/// gives every key a new inode reports only the keys whose content changed; anything else by
/// metadata, which a swap, a rename over it or a rewrite changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Fingerprint {
    Content {
        len: u64,
        hash: u64,
    },
    Metadata {
        dev: u64,
        ino: u64,
        len: u64,
        modified: Option<SystemTime>,
    },
}

impl Fingerprint {
    pub(super) fn of(path: &Path) -> Option<Fingerprint> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        if meta.is_file()
            && meta.len() <= HASHED_BYTES
            && let Some((len, hash)) = content_hash(path)
        {
            return Some(Fingerprint::Content { len, hash });
        }
        Some(Fingerprint::Metadata {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// Length and hash of what the file holds now (read in full, up to one more than the cap).
pub(super) fn content_hash(path: &Path) -> Option<(u64, u64)> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(HASHED_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some((bytes.len() as u64, hasher.finish()))
}

impl Snapshot {
    pub(super) fn take(path: &Path) -> Snapshot {
        let Ok(meta) = std::fs::metadata(path) else {
            return Snapshot::Missing;
        };
        if !meta.is_dir() {
            return Fingerprint::of(path).map_or(Snapshot::Missing, Snapshot::File);
        }
        let Ok(entries) = std::fs::read_dir(path) else {
            return Snapshot::Dir(BTreeMap::new());
        };
        let entries = entries
            .filter_map(Result::ok)
            .map(|entry| entry.file_name())
            .filter(|name| !name.as_encoded_bytes().starts_with(b".."))
            .filter_map(|name| Some((name.clone(), Fingerprint::of(&path.join(&name))?)))
            .collect();
        Snapshot::Dir(entries)
    }

    /// The `event` map for going from `self` to `now`, or `None` if nothing changed.
    pub(super) fn change_to(&self, now: &Snapshot, path: &Path) -> Option<Map> {
        match (self, now) {
            (Snapshot::Missing, Snapshot::Missing) => None,
            (Snapshot::Missing, _) => Some(event(path, "created", path, &[])),
            (_, Snapshot::Missing) => Some(event(path, "removed", path, &[])),
            (Snapshot::Dir(before), Snapshot::Dir(after)) => dir_change(path, before, after),
            (before, after) if before == after => None,
            _ => Some(event(path, "modified", path, &[])),
        }
    }
}

/// One event for a directory: the entry that changed, or the directory itself (`modified`,
/// with every changed entry in `paths`) when several did at once, as in a ConfigMap swap.
pub(super) fn dir_change(
    dir: &Path,
    before: &BTreeMap<OsString, Fingerprint>,
    after: &BTreeMap<OsString, Fingerprint>,
) -> Option<Map> {
    let names: BTreeSet<&OsString> = before.keys().chain(after.keys()).collect();
    let changed: Vec<(PathBuf, &str)> = names
        .into_iter()
        .filter_map(|name| {
            let kind = match (before.get(name), after.get(name)) {
                (None, Some(_)) => "created",
                (Some(_), None) => "removed",
                (Some(a), Some(b)) if a != b => "modified",
                _ => return None,
            };
            Some((dir.join(name), kind))
        })
        .collect();
    match changed.as_slice() {
        [] => None,
        [(path, kind)] => Some(event(dir, kind, path, &[])),
        several => {
            let paths: Vec<PathBuf> = several.iter().map(|(p, _)| p.clone()).collect();
            Some(event(dir, "modified", dir, &paths))
        }
    }
}

/// `#{ path, kind, watch, paths }`: `paths` lists every changed path (just `path` usually).
pub(super) fn event(watch: &Path, kind: &str, path: &Path, several: &[PathBuf]) -> Map {
    let text = |p: &Path| Dynamic::from(p.to_string_lossy().into_owned());
    let paths: Array = if several.is_empty() {
        vec![text(path)]
    } else {
        several.iter().map(|p| text(p)).collect()
    };
    let mut map = Map::new();
    map.insert("path".into(), text(path));
    map.insert("kind".into(), kind.into());
    map.insert("watch".into(), text(watch));
    map.insert("paths".into(), Dynamic::from_array(paths));
    map
}
