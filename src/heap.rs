//! The bytes the process has allocated and not freed, counted by the `drover` binary's global
//! allocator ([`CountingAlloc`]: mimalloc with a counter), for `/metrics`
//! (`drover_heap_allocated_bytes`).
//!
//! Beside the resident set size it tells real growth from the allocator keeping freed pages:
//! after a load passes, a heap that returns to where it was while RSS stays up is the
//! allocator holding on to memory it will reuse, not a leak.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};

/// Live bytes, counted per thread: every allocation passes here, and one counter shared by all
/// threads would bounce its cache line between the cores on every `malloc` and `free`. A
/// thread adds to its own slot (past [`SLOTS`] threads, slots are shared, still atomically); a block
/// freed on another thread than the one that allocated it makes one slot go down and another
/// up, and the sum is right.
const SLOTS: usize = 64;

#[repr(align(128))]
struct Slot(AtomicIsize);

static ALLOCATED: [Slot; SLOTS] = [const { Slot(AtomicIsize::new(0)) }; SLOTS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Whether allocations are counted: only when asked (`HEAP_METRICS=1`). Counting costs an
/// atomic add per `malloc` and `free`, which a profile of QoS 1 ingestion put at about 5% of
/// the server's CPU; off, it costs one relaxed load.
static COUNTING: AtomicBool = AtomicBool::new(false);

thread_local! {
    static MY_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn add(bytes: isize) {
    if !COUNTING.load(Ordering::Relaxed) {
        return;
    }
    let slot = MY_SLOT
        .try_with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS);
            }
            s.get()
        })
        // A thread being torn down counts in the first slot.
        .unwrap_or(0);
    ALLOCATED[slot].0.fetch_add(bytes, Ordering::Relaxed);
}

fn total() -> usize {
    ALLOCATED
        .iter()
        .map(|s| s.0.load(Ordering::Relaxed))
        .sum::<isize>()
        .max(0) as usize
}

/// An allocator, counting live bytes.
pub struct CountingAlloc<A>(pub A);

// SAFETY: every call is forwarded unchanged to the inner allocator; the counter only observes
// sizes.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAlloc<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on to the inner allocator.
        let ptr = unsafe { self.0.alloc(layout) };
        if !ptr.is_null() {
            add(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let ptr = unsafe { self.0.alloc_zeroed(layout) };
        if !ptr.is_null() {
            add(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let new = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            if new_size >= layout.size() {
                add((new_size - layout.size()) as isize);
            } else {
                add(-((layout.size() - new_size) as isize));
            }
        }
        new
    }
}

/// Marks the counting allocator as the process's and starts counting (the binary calls this
/// at start when `HEAP_METRICS=1`). Blocks allocated before are not counted; their frees may
/// take the figure below what is live by as much, which is small and bounded.
pub fn install() {
    COUNTING.store(true, Ordering::Relaxed);
    INSTALLED.store(true, Ordering::Relaxed);
}

/// Live heap bytes, when the counting allocator is the process's global allocator.
pub fn allocated_bytes() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_bytes_follow_allocations_reallocations_and_frees() {
        // Only this test uses the counting allocator in the library's tests.
        let counting = CountingAlloc(std::alloc::System);
        let before = total();
        // Not asked for: nothing is counted.
        // SAFETY: a non-zero layout, freed with the same layout.
        unsafe {
            let layout = Layout::from_size_align(4096, 8).unwrap();
            let block = counting.alloc(layout);
            assert!(!block.is_null());
            assert_eq!(total(), before);
            counting.dealloc(block, layout);
        }
        assert_eq!(total(), before);
        COUNTING.store(true, Ordering::Relaxed);
        let layout = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: a non-zero layout; the block is freed below with the layout it has then.
        unsafe {
            let block = counting.alloc(layout);
            assert!(!block.is_null());
            assert_eq!(total(), before + 1000);
            let grown = counting.realloc(block, layout, 3000);
            assert!(!grown.is_null());
            assert_eq!(total(), before + 3000);
            let grown_layout = Layout::from_size_align(3000, 8).unwrap();
            let shrunk = counting.realloc(grown, grown_layout, 500);
            assert_eq!(total(), before + 500);
            counting.dealloc(shrunk, Layout::from_size_align(500, 8).unwrap());
            let zeroed = counting.alloc_zeroed(layout);
            assert_eq!(*zeroed, 0);
            assert_eq!(total(), before + 1000);
            counting.dealloc(zeroed, layout);
        }
        assert_eq!(total(), before);
        // Not installed in the library's tests: no figure to report.
        assert_eq!(allocated_bytes(), None);
    }
}
