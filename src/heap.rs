//! The bytes the process has allocated and not freed, counted by the `drover` binary's global
//! allocator ([`CountingAlloc`]: mimalloc with a counter), for `/metrics`
//! (`drover_heap_allocated_bytes`).
//!
//! Beside the resident set size it tells real growth from the allocator keeping freed pages:
//! after a load passes, a heap that returns to where it was while RSS stays up is the
//! allocator holding on to memory it will reuse, not a leak.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// An allocator, counting live bytes.
pub struct CountingAlloc<A>(pub A);

// SAFETY: every call is forwarded unchanged to the inner allocator; the counter only observes
// sizes.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAlloc<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on to the inner allocator.
        let ptr = unsafe { self.0.alloc(layout) };
        if !ptr.is_null() {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let ptr = unsafe { self.0.alloc_zeroed(layout) };
        if !ptr.is_null() {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let new = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            if new_size >= layout.size() {
                ALLOCATED.fetch_add(new_size - layout.size(), Ordering::Relaxed);
            } else {
                ALLOCATED.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        new
    }
}

/// Marks the counting allocator as the process's (the binary calls this at start).
pub fn installed() {
    INSTALLED.store(true, Ordering::Relaxed);
}

/// Live heap bytes, when the counting allocator is the process's global allocator.
pub fn allocated_bytes() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| ALLOCATED.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_bytes_follow_allocations_reallocations_and_frees() {
        // Only this test uses the counting allocator in the library's tests.
        let counting = CountingAlloc(std::alloc::System);
        let before = ALLOCATED.load(Ordering::Relaxed);
        let layout = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: a non-zero layout; the block is freed below with the layout it has then.
        unsafe {
            let block = counting.alloc(layout);
            assert!(!block.is_null());
            assert_eq!(ALLOCATED.load(Ordering::Relaxed), before + 1000);
            let grown = counting.realloc(block, layout, 3000);
            assert!(!grown.is_null());
            assert_eq!(ALLOCATED.load(Ordering::Relaxed), before + 3000);
            let grown_layout = Layout::from_size_align(3000, 8).unwrap();
            let shrunk = counting.realloc(grown, grown_layout, 500);
            assert_eq!(ALLOCATED.load(Ordering::Relaxed), before + 500);
            counting.dealloc(shrunk, Layout::from_size_align(500, 8).unwrap());
            let zeroed = counting.alloc_zeroed(layout);
            assert_eq!(*zeroed, 0);
            assert_eq!(ALLOCATED.load(Ordering::Relaxed), before + 1000);
            counting.dealloc(zeroed, layout);
        }
        assert_eq!(ALLOCATED.load(Ordering::Relaxed), before);
        // Not installed in the library's tests: no figure to report.
        assert_eq!(allocated_bytes(), None);
    }
}
