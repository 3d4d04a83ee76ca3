//! The state every request shares (SPEC §12): `state_get/set/delete/incr/keys` and `once`, with
//! TTLs and a cap on the number of keys. In memory, or with `--state-file` in a redb database,
//! where a call that changed something returns only once the change is on disk.
//!
//! Every call takes the one mutex, so each is atomic across workers: `state_incr` never loses
//! an update and exactly one of many concurrent `once` calls wins. The time is passed in
//! (`now`, since the Unix epoch) so the store itself never reads a clock.

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Longest key, in bytes: keys are names, not data.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value, as JSON: with `--state-max-keys` this bounds the store's size.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Key to (expiry in ms since the epoch, 0 for none; then the value as JSON).
const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

/// Why a state call failed; the script sees the message.
#[derive(Debug)]
pub enum StateError {
    /// `--state-max-keys` keys exist and the call would add one.
    Full(usize),
    /// A key or value over its size limit.
    TooLarge(&'static str, usize),
    /// `state_incr` on a value that is not an integer, or past the integer range.
    NotAnInteger(String),
    /// The database said no (disk full, I/O error).
    Storage(String),
    /// `--state-file` could not be opened at start.
    Open { path: PathBuf, reason: String },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Full(max) => write!(f, "state is full: {max} keys (--state-max-keys)"),
            StateError::TooLarge(what, max) => write!(f, "state {what} is over {max} bytes"),
            StateError::NotAnInteger(key) => write!(f, "state '{key}' does not hold an integer"),
            StateError::Storage(e) => write!(f, "state file: {e}"),
            StateError::Open { path, reason } => {
                write!(f, "opening --state-file {}: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for StateError {}

fn storage(error: impl fmt::Display) -> StateError {
    StateError::Storage(error.to_string())
}

type StateResult<T> = Result<T, StateError>;

/// One stored value.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    /// Milliseconds since the epoch when the key stops existing; 0 for never.
    expires_ms: u64,
    /// The value as JSON text.
    json: String,
}

impl Entry {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_ms == 0 || self.expires_ms > now_ms
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = self.expires_ms.to_le_bytes().to_vec();
        bytes.extend_from_slice(self.json.as_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Entry> {
        let (expiry, json) = bytes.split_first_chunk::<8>()?;
        Some(Entry {
            expires_ms: u64::from_le_bytes(*expiry),
            json: String::from_utf8(json.to_vec()).ok()?,
        })
    }
}

/// What an update does to its key.
enum Change {
    Keep,
    Put(Entry),
    Remove,
}

enum Store {
    Memory(HashMap<String, Entry>),
    /// Every change is its own transaction, committed with `Durability::Immediate` (fsync).
    File(Database),
}

pub struct State {
    store: Mutex<Store>,
    max_keys: usize,
}

impl State {
    pub fn in_memory(max_keys: usize) -> State {
        State {
            store: Mutex::new(Store::Memory(HashMap::new())),
            max_keys,
        }
    }

    /// Opens (or creates) the database at `path`. A file that is not an intact redb database
    /// is an error that names it; it is never rewritten, so nothing in it is lost.
    pub fn open(path: &Path, max_keys: usize) -> Result<State, StateError> {
        let fail = |e: &dyn fmt::Display| StateError::Open {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        // A plain open trusts the file and may panic on altered pages; the check refuses them.
        // The panic guard is for what the check itself might miss.
        let opened = std::panic::catch_unwind(|| {
            let mut builder = Database::builder();
            builder.set_check_integrity_on_open(true);
            builder.create(path)
        });
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(fail(&e)),
            Err(_) => return Err(fail(&"the file is corrupt")),
        };
        let txn = db.begin_write().map_err(|e| fail(&e))?;
        txn.open_table(TABLE).map_err(|e| fail(&e))?;
        txn.commit().map_err(|e| fail(&e))?;
        Ok(State {
            store: Mutex::new(Store::File(db)),
            max_keys,
        })
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of `key` as JSON, if it exists and has not expired.
    pub fn get(&self, key: &str, now: Duration) -> StateResult<Option<String>> {
        let now_ms = millis(now);
        let entry = match &*self.store() {
            Store::Memory(map) => map.get(key).cloned(),
            Store::File(db) => read_entry(db, key)?,
        };
        Ok(entry.filter(|e| e.live(now_ms)).map(|e| e.json))
    }

    /// Sets `key` to `json`, expiring after `ttl` if given (no TTL clears an old one).
    pub fn set(
        &self,
        key: &str,
        json: String,
        ttl: Option<Duration>,
        now: Duration,
    ) -> StateResult<()> {
        check_sizes(key, &json)?;
        let entry = Entry {
            expires_ms: expiry(ttl, now),
            json,
        };
        self.update(key, now, |_| Ok((Change::Put(entry), ())))
    }

    /// Removes `key`; whether it existed.
    pub fn delete(&self, key: &str, now: Duration) -> StateResult<bool> {
        self.update(key, now, |current| match current {
            Some(_) => Ok((Change::Remove, true)),
            None => Ok((Change::Keep, false)),
        })
    }

    /// Adds `by` to the integer at `key` (0 if absent) and returns the new value. A `ttl`
    /// applies when the key is created: a counter for a fixed window from its first increment.
    pub fn incr(
        &self,
        key: &str,
        by: i64,
        ttl: Option<Duration>,
        now: Duration,
    ) -> StateResult<i64> {
        check_sizes(key, "")?;
        self.update(key, now, |current| {
            let (old, expires_ms) = match current {
                None => (0, expiry(ttl, now)),
                Some(entry) => (parse_int(key, &entry.json)?, entry.expires_ms),
            };
            let new = old
                .checked_add(by)
                .ok_or_else(|| StateError::NotAnInteger(key.to_owned()))?;
            let entry = Entry {
                expires_ms,
                json: new.to_string(),
            };
            Ok((Change::Put(entry), new))
        })
    }

    /// True, and marks `key` for `ttl`, if `key` is not marked: an atomic check-and-set.
    pub fn once(&self, key: &str, ttl: Duration, now: Duration) -> StateResult<bool> {
        check_sizes(key, "")?;
        let entry = Entry {
            expires_ms: expiry(Some(ttl), now),
            json: "true".into(),
        };
        self.update(key, now, |current| match current {
            Some(_) => Ok((Change::Keep, false)),
            None => Ok((Change::Put(entry), true)),
        })
    }

    /// The live keys that start with `prefix`, sorted.
    pub fn keys(&self, prefix: &str, now: Duration) -> StateResult<Vec<String>> {
        let now_ms = millis(now);
        let mut keys = match &*self.store() {
            Store::Memory(map) => map
                .iter()
                .filter(|(k, e)| k.starts_with(prefix) && e.live(now_ms))
                .map(|(k, _)| k.clone())
                .collect(),
            Store::File(db) => file_keys(db, prefix, now_ms)?,
        };
        keys.sort();
        Ok(keys)
    }

    /// Removes every expired key; how many.
    pub fn sweep(&self, now: Duration) -> StateResult<usize> {
        sweep_store(&mut self.store(), millis(now))
    }

    /// Reads the live entry of `key`, lets `decide` choose the change, applies it (durably, with
    /// a file) and returns `decide`'s answer. Adding a key at the limit first sweeps expired keys.
    fn update<T>(
        &self,
        key: &str,
        now: Duration,
        decide: impl FnOnce(Option<Entry>) -> StateResult<(Change, T)>,
    ) -> StateResult<T> {
        let now_ms = millis(now);
        let mut store = self.store();
        match &mut *store {
            Store::Memory(map) => {
                let current = map.get(key).filter(|e| e.live(now_ms)).cloned();
                let (change, answer) = decide(current.clone())?;
                let adds = current.is_none() && matches!(change, Change::Put(_));
                if adds && !map.contains_key(key) && map.len() >= self.max_keys {
                    map.retain(|_, e| e.live(now_ms));
                    if map.len() >= self.max_keys {
                        return Err(StateError::Full(self.max_keys));
                    }
                }
                match change {
                    Change::Keep => {}
                    Change::Put(entry) => {
                        map.insert(key.to_owned(), entry);
                    }
                    Change::Remove => {
                        map.remove(key);
                    }
                }
                Ok(answer)
            }
            Store::File(db) => update_file(db, key, now_ms, self.max_keys, decide),
        }
    }
}

fn update_file<T>(
    db: &Database,
    key: &str,
    now_ms: u64,
    max_keys: usize,
    decide: impl FnOnce(Option<Entry>) -> StateResult<(Change, T)>,
) -> StateResult<T> {
    let txn = db.begin_write().map_err(storage)?;
    let answer = {
        let mut table = txn.open_table(TABLE).map_err(storage)?;
        let stored = match table.get(key).map_err(storage)? {
            Some(bytes) => Entry::decode(bytes.value()),
            None => None,
        };
        let current = stored.clone().filter(|e| e.live(now_ms));
        let (change, answer) = decide(current)?;
        match change {
            Change::Keep => return Ok(answer), // dropping the transaction aborts it
            Change::Put(entry) => {
                if stored.is_none() && table.len().map_err(storage)? >= max_keys as u64 {
                    table
                        .retain(|_, v| Entry::decode(v).is_some_and(|e| e.live(now_ms)))
                        .map_err(storage)?;
                    if table.len().map_err(storage)? >= max_keys as u64 {
                        return Err(StateError::Full(max_keys));
                    }
                }
                table
                    .insert(key, entry.encode().as_slice())
                    .map_err(storage)?;
            }
            Change::Remove => {
                table.remove(key).map_err(storage)?;
            }
        }
        answer
    };
    txn.commit().map_err(storage)?;
    Ok(answer)
}

fn read_entry(db: &Database, key: &str) -> StateResult<Option<Entry>> {
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(TABLE).map_err(storage)?;
    let entry = table.get(key).map_err(storage)?;
    Ok(entry.and_then(|bytes| Entry::decode(bytes.value())))
}

fn file_keys(db: &Database, prefix: &str, now_ms: u64) -> StateResult<Vec<String>> {
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(TABLE).map_err(storage)?;
    let mut keys = Vec::new();
    for item in table.range(prefix..).map_err(storage)? {
        let (key, value) = item.map_err(storage)?;
        if !key.value().starts_with(prefix) {
            break; // sorted: past the prefix
        }
        if Entry::decode(value.value()).is_some_and(|e| e.live(now_ms)) {
            keys.push(key.value().to_owned());
        }
    }
    Ok(keys)
}

fn sweep_store(store: &mut Store, now_ms: u64) -> StateResult<usize> {
    match store {
        Store::Memory(map) => {
            let before = map.len();
            map.retain(|_, e| e.live(now_ms));
            Ok(before - map.len())
        }
        Store::File(db) => {
            let expired = {
                let txn = db.begin_read().map_err(storage)?;
                let table = txn.open_table(TABLE).map_err(storage)?;
                let mut count = 0;
                for item in table.iter().map_err(storage)? {
                    let (_, value) = item.map_err(storage)?;
                    count +=
                        usize::from(!Entry::decode(value.value()).is_some_and(|e| e.live(now_ms)));
                }
                count
            };
            if expired > 0 {
                let txn = db.begin_write().map_err(storage)?;
                txn.open_table(TABLE)
                    .map_err(storage)?
                    .retain(|_, v| Entry::decode(v).is_some_and(|e| e.live(now_ms)))
                    .map_err(storage)?;
                txn.commit().map_err(storage)?;
            }
            Ok(expired)
        }
    }
}

fn check_sizes(key: &str, json: &str) -> StateResult<()> {
    if key.len() > MAX_KEY_BYTES {
        return Err(StateError::TooLarge("key", MAX_KEY_BYTES));
    }
    if json.len() > MAX_VALUE_BYTES {
        return Err(StateError::TooLarge("value", MAX_VALUE_BYTES));
    }
    Ok(())
}

fn parse_int(key: &str, json: &str) -> StateResult<i64> {
    json.trim()
        .parse()
        .map_err(|_| StateError::NotAnInteger(key.to_owned()))
}

fn millis(time: Duration) -> u64 {
    u64::try_from(time.as_millis()).unwrap_or(u64::MAX)
}

fn expiry(ttl: Option<Duration>, now: Duration) -> u64 {
    match ttl {
        Some(ttl) => millis(now.saturating_add(ttl)).max(1),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(1_000_000);

    fn both() -> (State, State, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let file = State::open(&dir.path().join("s.redb"), 3).unwrap();
        (State::in_memory(3), file, dir)
    }

    #[test]
    fn set_get_incr_once_and_ttl_behave_alike_in_memory_and_on_file() {
        let (memory, file, _dir) = both();
        for state in [memory, file] {
            state.set("a", "\"x\"".into(), None, T0).unwrap();
            assert_eq!(state.get("a", T0).unwrap().as_deref(), Some("\"x\""));
            assert_eq!(
                state
                    .incr("n", 2, Some(Duration::from_secs(5)), T0)
                    .unwrap(),
                2
            );
            assert_eq!(state.incr("n", 3, None, T0).unwrap(), 5);
            assert!(state.incr("a", 1, None, T0).is_err());
            let later = T0 + Duration::from_secs(6);
            assert_eq!(state.get("n", later).unwrap(), None);
            assert!(state.once("d", Duration::from_secs(1), T0).unwrap());
            assert!(!state.once("d", Duration::from_secs(1), T0).unwrap());
            assert!(state.once("d", Duration::from_secs(1), later).unwrap());
            assert_eq!(state.keys("", T0).unwrap(), ["a", "d", "n"]);
            assert!(state.delete("a", T0).unwrap());
            assert!(!state.delete("a", T0).unwrap());
        }
    }

    #[test]
    fn the_key_limit_counts_keys_and_sweeps_expired_ones_first() {
        let (memory, file, _dir) = both();
        for state in [memory, file] {
            for key in ["a", "b"] {
                state.set(key, "1".into(), None, T0).unwrap();
            }
            state
                .set("c", "1".into(), Some(Duration::from_secs(1)), T0)
                .unwrap();
            assert!(matches!(
                state.set("d", "1".into(), None, T0),
                Err(StateError::Full(3))
            ));
            state.set("a", "2".into(), None, T0).unwrap(); // updating at the limit is fine
            let later = T0 + Duration::from_secs(2);
            state.set("d", "1".into(), None, later).unwrap(); // "c" expired and was swept
            assert_eq!(state.keys("", later).unwrap(), ["a", "b", "d"]);
        }
    }

    #[test]
    fn a_file_keeps_values_across_reopen_and_a_corrupt_file_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        State::open(&path, 10)
            .unwrap()
            .set("k", "7".into(), None, T0)
            .unwrap();
        let state = State::open(&path, 10).unwrap();
        assert_eq!(state.get("k", T0).unwrap().as_deref(), Some("7"));
        drop(state);
        let garbage = b"this is not a database, but someone's notes\n".repeat(100);
        std::fs::write(&path, &garbage).unwrap();
        let error = State::open(&path, 10).err().unwrap();
        assert!(error.to_string().contains("s.redb"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), garbage);
    }
}

#[cfg(test)]
mod corruption {
    use super::*;

    /// A valid file with bytes altered inside: refused with the file untouched, or opened.
    #[test]
    fn altered_pages_are_refused_without_touching_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let state = State::open(&path, 1000).unwrap();
        for i in 0..200 {
            let key = format!("key-{i}");
            state
                .set(&key, format!("\"value {i}\""), None, Duration::ZERO)
                .unwrap();
        }
        drop(state);
        let good = std::fs::read(&path).unwrap();
        let mut refused = 0;
        for at in (0..good.len()).step_by(good.len() / 37) {
            let mut bad = good.clone();
            bad[at] ^= 0x5a;
            std::fs::write(&path, &bad).unwrap();
            if State::open(&path, 1000).is_err() {
                refused += 1;
                assert_eq!(std::fs::read(&path).unwrap(), bad, "altered at {at}");
            }
        }
        assert!(refused > 0, "no alteration was noticed");
    }
}
