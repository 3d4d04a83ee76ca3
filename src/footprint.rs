//! Keeps the resident memory of an idle sidecar small.
//!
//! Building the script engine at start runs code from all over the binary (every built-in
//! function registers itself), and the kernel maps code in clusters around each fault, so after
//! start most of the binary is resident although little of it runs again. Once listening, we
//! hand our clean code pages back to the kernel (`MADV_PAGEOUT`); what the request path needs
//! faults back in on first use.

use rustix::mm::{Advice, madvise};
use std::ffi::c_void;

/// Pages out the read-only mappings of our executable. Best effort: a kernel without
/// `MADV_PAGEOUT` (before 5.4) only keeps more memory resident.
pub fn release_startup_code() {
    let (Ok(exe), Ok(maps)) = (
        std::fs::read_link("/proc/self/exe"),
        std::fs::read_to_string("/proc/self/maps"),
    ) else {
        return;
    };
    let exe = exe.to_string_lossy();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut fields = line.split_whitespace();
        let (range, perms) = (
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default(),
        );
        if fields.nth(3) != Some(exe.as_ref()) || perms.contains('w') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // SAFETY: a read-only, file-backed mapping of our own binary: paging it out drops only
        // clean pages, which the kernel reads back unchanged on the next access.
        let _ = unsafe {
            madvise(
                start as *mut c_void,
                end.saturating_sub(start),
                Advice::LinuxPageOut,
            )
        };
    }
}
