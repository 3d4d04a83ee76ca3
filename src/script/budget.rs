//! The per-handler memory budget: the global allocator counts, per thread, the bytes allocated
//! and not yet freed, and a running handler is stopped between two operations once what it
//! has added since it started passes its budget.
//!
//! Rhai's size limits bound each value, not how many a script keeps; this bounds the sum.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting per thread. Installed by the binary (`main.rs`); without it
/// every count reads 0 and no budget is ever exceeded.
pub struct CountingAllocator;

thread_local! {
    /// Bytes this thread allocated minus bytes it freed (a value freed on another thread stays
    /// counted here, which is why [`handed_off`] exists).
    static NET: Cell<isize> = const { Cell::new(0) };
}

fn add(delta: isize) {
    // `try_with`: during thread teardown the slot may be gone; a lost count is harmless then.
    let _ = NET.try_with(|net| net.set(net.get().wrapping_add(delta)));
}

// SAFETY: every call forwards to `System` unchanged; the counting touches only a
// thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            add(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            add(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is checked by the caller.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        new
    }
}

/// What this thread holds now, by the count above.
pub fn net() -> isize {
    NET.try_with(Cell::get).unwrap_or(0)
}

/// `bytes` moved to another thread (output sent to the event loop), to be freed there: no
/// longer the handler's.
pub fn handed_off(bytes: isize) {
    add(-bytes);
}

/// The budget of one handler, counted from after `req` is built: a fixed 32 MiB for the values
/// the script makes, room for a copy of the payload as text (up to 3x its bytes) and of the body,
/// and for the output of its commands (stdout and stderr captured, then as text, 4x each).
pub fn handler_budget(max_request_bytes: usize, max_output_bytes: usize) -> usize {
    (32usize << 20)
        .saturating_add(max_request_bytes.saturating_mul(4))
        .saturating_add(max_output_bytes.saturating_mul(8))
}
