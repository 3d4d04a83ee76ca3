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
//! the server was built, it left 15% more resident: BENCHMARKS.md, eighth session).

use rustix::mm::{Advice, madvise};
use std::ffi::c_void;

/// Unmaps the clean, read-only file pages of the executable and its libraries. Best effort:
/// without `/proc` nothing is released and only more memory stays resident.
pub fn release_startup_code() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    for (start, end, path) in clean_file_mappings(&smaps) {
        // Our own binary is paged out: the page cache lets go of it too, so the kernel's
        // fault-around cannot map it back in clusters around the few pages the idle loop
        // touches (unmapped but cached, it came back as 500-800 KiB within a second). The
        // libraries are only unmapped: evicting them would make every process that starts
        // next (the next server, a command) read them from disk again.
        let advice = match std::path::Path::new(path) == exe {
            true => Advice::LinuxPageOut,
            false => Advice::LinuxDontNeed,
        };
        // SAFETY: a read-only mapping of a file that holds no private (anonymous) page, so
        // every page of it is the file's own content: dropping it loses nothing, and the next
        // access maps the same bytes again. No thread can write to it (it is not writable), so
        // no private page can appear between the check and this call.
        let _ = unsafe { madvise(start as *mut c_void, end.saturating_sub(start), advice) };
    }
}

/// The address ranges of read-only, file-backed mappings without anonymous pages. A mapping
/// with anonymous pages (RELRO: relocated, then made read-only; or code patched by text
/// relocations) is left alone: dropping its pages would undo the relocations.
fn clean_file_mappings(smaps: &str) -> Vec<(usize, usize, &str)> {
    let mut clean = Vec::new();
    let mut current: Option<(usize, usize, &str)> = None;
    for line in smaps.lines() {
        if let Some(anon) = line.strip_prefix("Anonymous:") {
            let no_anon = anon.trim().strip_suffix("kB").map(str::trim) == Some("0");
            if let Some(range) = current.take().filter(|_| no_anon) {
                clean.push(range);
            }
            continue;
        }
        // A mapping's header: start-end perms offset dev inode path
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue; // a field line such as "Rss:"
        };
        let path = fields.nth(3).unwrap_or_default();
        let read_only = perms.starts_with('r') && !perms.contains('w');
        current = (read_only && path.starts_with('/')).then_some((start, end, path));
    }
    clean
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
";
        assert_eq!(
            clean_file_mappings(smaps),
            vec![
                (0x1000, 0x2000, "/usr/bin/x"),
                (0x2000, 0x3000, "/usr/bin/x")
            ]
        );
    }

    #[test]
    fn releasing_leaves_the_process_working() {
        release_startup_code();
        // Code, constants and relocated data are all still there.
        let text = format!("{:?}", std::hint::black_box(vec![1.5f64.powi(3)]));
        assert_eq!(text, "[3.375]");
    }
}
