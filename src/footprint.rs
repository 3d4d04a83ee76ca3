//! Keeps the resident memory of an idle sidecar small.
//!
//! Building the script engine at start runs code from all over the binary (every built-in
//! function registers itself) and from the C libraries, and the kernel maps code in clusters
//! around each fault, so after start most of that code is mapped although little of it runs
//! again. Once the server is built, right before its loop first sleeps, we drop those pages from
//! our page tables (`MADV_DONTNEED` on mappings that are read-only and hold only file pages):
//! they stay in the page cache, shared with every other process, and what the request path
//! needs is mapped back on first use (a minor fault, no disk read while the page cache keeps
//! them). Each fault maps back a whole cluster (64 KiB, or a page-cache folio of up to 128 KiB
//! here), so every function that runs between this and the first sleep costs one (done before
//! the server was built, it left more resident: BENCHMARKS.md, eighth session).
//!
//! An idle server still wakes: the reload thread looks at its files every second, and what it
//! runs, and what the last requests ran, maps back more clusters than an idle sidecar needs. So
//! each second in which no request was answered, the binary's code is unmapped again.

use rustix::mm::{Advice, madvise};
use std::ffi::c_void;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

/// The executable's clean mappings, for [`IdleRelease`]. Only the executable's: they last as
/// long as the process, so the ranges can never come to hold anything else, where a library or
/// a mapped file could be unmapped and its range reused for private memory.
static EXECUTABLE_CODE: OnceLock<ExecutableCode> = OnceLock::new();

struct ExecutableCode {
    /// (start, length) of each mapping.
    ranges: Vec<(usize, usize)>,
    /// `/proc/self/pagemap`, opened at start: it tells whether a range gained a private page.
    pagemap: File,
}

/// Unmaps the clean, read-only file pages of the executable and its libraries, and keeps the
/// executable's ranges for [`IdleRelease`]. Best effort: without `/proc` nothing is released
/// and only more memory stays resident.
pub fn release_startup_code() {
    // Read in small pieces: the whole file (some 64 KiB) would stay in the heap's free space,
    // resident, after it is freed.
    let Ok(smaps) = File::open("/proc/self/smaps") else {
        return;
    };
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    let mut executable_code = Vec::new();
    for mapping in clean_file_mappings(BufReader::new(smaps), &exe) {
        // Our own binary is paged out: the page cache lets go of it too, so the kernel's
        // fault-around cannot map it back in clusters around the few pages the idle loop
        // touches (unmapped but cached, it came back as 500-800 KiB within a second). The
        // libraries are only unmapped: evicting them would make every process that starts
        // next (the next server, a command) read them from disk again.
        let advice = match mapping.of_executable {
            true => Advice::LinuxPageOut,
            false => Advice::LinuxDontNeed,
        };
        let (start, len) = (mapping.start, mapping.end.saturating_sub(mapping.start));
        // SAFETY: a read-only mapping of a file that holds no private (anonymous) page, so
        // every page of it is the file's own content: dropping it loses nothing, and the next
        // access maps the same bytes again. No thread can write to it (it is not writable), so
        // no private page can appear between the check and this call.
        let _ = unsafe { madvise(start as *mut c_void, len, advice) };
        if mapping.of_executable {
            executable_code.push((start, len));
        }
    }
    if let Ok(pagemap) = File::open("/proc/self/pagemap") {
        let _ = EXECUTABLE_CODE.set(ExecutableCode {
            ranges: executable_code,
            pagemap,
        });
    }
}

/// Unmaps the executable's code again after each quiet second. The pages stay in the page
/// cache, so a request that follows a quiet second pays a few minor faults (no disk read).
pub struct IdleRelease {
    answered: u64,
}

impl IdleRelease {
    pub fn from_now() -> IdleRelease {
        IdleRelease {
            answered: crate::metrics::metrics().requests_answered(),
        }
    }

    /// Called once a second; releases when no request was answered since the last call.
    pub fn tick(&mut self) {
        if self.quiet_since_last_tick(crate::metrics::metrics().requests_answered()) {
            release_executable_code();
        }
    }

    fn quiet_since_last_tick(&mut self, answered: u64) -> bool {
        std::mem::replace(&mut self.answered, answered) == answered
    }
}

fn release_executable_code() {
    let Some(code) = EXECUTABLE_CODE.get() else {
        return;
    };
    // All checked before any is released: the check runs code that a release before it would
    // have to map back.
    let private = |&(start, len): &(usize, usize)| holds_private_page(&code.pagemap, start, len);
    if code.ranges.iter().any(private) {
        return;
    }
    for &(start, len) in &code.ranges {
        // SAFETY: as in `release_startup_code`, checked again just now (a mapping that is not
        // writable gains no private page between the check and this call but by a debugger);
        // the range is still that mapping, as the executable's mappings are never unmapped.
        let _ = unsafe { madvise(start as *mut c_void, len, Advice::LinuxDontNeed) };
    }
}

/// Whether a page of the range is private, as a debugger's breakpoint or a uprobe makes one (a
/// copy written over the code): unmapping it would silently drop that breakpoint. `true` when
/// `pagemap` cannot tell.
fn holds_private_page(pagemap: &File, start: usize, len: usize) -> bool {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    let page = rustix::param::page_size();
    let (first, pages) = (start / page, len / page);
    // On the stack, in pieces: the reload thread calls this every idle second, and a heap
    // buffer would leave its size resident in the heap's free space.
    let mut entries = [0u8; 4096];
    let mut done = 0;
    while done < pages {
        let count = (pages - done).min(entries.len() / 8);
        let buffer = &mut entries[..count * 8];
        let offset = ((first + done) * 8) as u64;
        if pagemap.read_exact_at(buffer, offset).is_err() {
            return true;
        }
        let private = buffer.chunks_exact(8).any(|entry| {
            let entry = u64::from_ne_bytes(entry.try_into().unwrap_or_default());
            entry & SWAPPED != 0 || (entry & PRESENT != 0 && entry & FILE_OR_SHARED == 0)
        });
        if private {
            return true;
        }
        done += count;
    }
    false
}

#[derive(Debug, PartialEq)]
struct CleanMapping {
    start: usize,
    end: usize,
    /// Of the file `exe` (our own binary), rather than of a library.
    of_executable: bool,
}

/// The read-only, file-backed mappings without anonymous pages. A mapping with anonymous pages
/// (RELRO: relocated, then made read-only; or code patched by text relocations) is left alone:
/// dropping its pages would undo the relocations.
fn clean_file_mappings(mut smaps: impl BufRead, exe: &Path) -> Vec<CleanMapping> {
    let mut clean = Vec::new();
    let mut current = None;
    let mut bytes = Vec::new();
    // Bytes, not `read_line`: a path that is not UTF-8 would end the reading there.
    while matches!(smaps.read_until(b'\n', &mut bytes), Ok(n) if n > 0) {
        let line = String::from_utf8_lossy(&bytes);
        if let Some(anon) = line.strip_prefix("Anonymous:") {
            let no_anon = anon.trim().strip_suffix("kB").map(str::trim) == Some("0");
            if let Some(mapping) = current.take().filter(|_| no_anon) {
                clean.push(mapping);
            }
        } else if let Some(mapping) = mapping_header(&line, exe) {
            current = mapping;
        }
        bytes.clear();
    }
    clean
}

/// `Some` for a mapping's header line ("start-end perms offset dev inode path"), holding the
/// mapping if it is a candidate; `None` for a field line such as "Rss:".
fn mapping_header(line: &str, exe: &Path) -> Option<Option<CleanMapping>> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let (start, end) = (
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    );
    let perms = fields.next()?;
    let path = fields.nth(3).unwrap_or_default();
    let read_only = perms.starts_with('r') && !perms.contains('w');
    Some((read_only && path.starts_with('/')).then(|| CleanMapping {
        start,
        end,
        of_executable: Path::new(path) == exe,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_file_mappings_without_anonymous_pages_are_released() {
        let smaps = "\
1000-2000 r--p 00000000 08:01 12 /usr/bin/x
Rss:                   4 kB
Anonymous:             0 kB
2000-3000 r-xp 00001000 08:01 12 /usr/bin/x
Anonymous:             0 kB
3000-4000 r--p 00002000 08:01 12 /usr/bin/x
Anonymous:             4 kB
4000-5000 rw-p 00003000 08:01 12 /usr/bin/x
Anonymous:             0 kB
5000-6000 r--p 00000000 00:00 0 [vvar]
Anonymous:             0 kB
6000-7000 rw-p 00000000 00:00 0
Anonymous:             4 kB
7000-8000 r-xp 00001000 08:01 13 /usr/lib/libc.so
Anonymous:             0 kB
";
        let mapping = |start, end, of_executable| CleanMapping {
            start,
            end,
            of_executable,
        };
        assert_eq!(
            clean_file_mappings(smaps.as_bytes(), Path::new("/usr/bin/x")),
            vec![
                mapping(0x1000, 0x2000, true),
                mapping(0x2000, 0x3000, true),
                mapping(0x7000, 0x8000, false),
            ]
        );
    }

    #[test]
    fn a_path_that_is_not_utf8_does_not_end_the_reading() {
        let smaps: &[u8] = b"\
1000-2000 r-xp 00000000 08:01 14 /opt/\xff.so
Anonymous:             0 kB
2000-3000 r-xp 00000000 08:01 15 /usr/lib/libm.so
Anonymous:             0 kB
";
        let found = clean_file_mappings(smaps, Path::new("/usr/bin/x"));
        let ranges: Vec<_> = found.iter().map(|m| (m.start, m.end)).collect();
        assert_eq!(ranges, [(0x1000, 0x2000), (0x2000, 0x3000)]);
    }

    #[test]
    fn only_a_second_without_answers_is_quiet() {
        let mut idle = IdleRelease { answered: 5 };
        assert!(idle.quiet_since_last_tick(5));
        assert!(!idle.quiet_since_last_tick(6));
        assert!(idle.quiet_since_last_tick(6));
        assert!(!idle.quiet_since_last_tick(9));
    }

    #[test]
    fn a_private_copy_of_a_page_in_a_file_mapping_is_seen() {
        use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};
        let path = std::env::temp_dir().join(format!("footprint-{}", std::process::id()));
        let len = 4 * rustix::param::page_size();
        std::fs::write(&path, vec![7u8; len]).unwrap();
        let file = File::open(&path).unwrap();
        let protection = ProtFlags::READ | ProtFlags::WRITE;
        // SAFETY: a fresh private mapping of a file of `len` bytes, unmapped below.
        let base = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                protection,
                MapFlags::PRIVATE,
                &file,
                0,
            )
        }
        .unwrap()
        .cast::<u8>();
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let start = base as usize;
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { base.add(len - 1).read_volatile() }, 7);
        assert!(!holds_private_page(&pagemap, start, len), "file pages only");
        // SAFETY: inside the mapping, which is writable.
        unsafe { base.add(len / 2).write_volatile(9) };
        assert!(
            holds_private_page(&pagemap, start, len),
            "one page copied on write"
        );
        // SAFETY: the mapping made above, no longer used.
        unsafe { munmap(base.cast(), len) }.unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn releasing_leaves_the_process_working() {
        release_startup_code();
        release_executable_code();
        // Code, constants and relocated data are all still there.
        let text = format!("{:?}", std::hint::black_box(vec![1.5f64.powi(3)]));
        assert_eq!(text, "[3.375]");
    }
}
