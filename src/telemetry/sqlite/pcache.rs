//! SQLite's own page cache, minus one full scan per commit.
//!
//! When a b-tree page split hands out pages in an order that is not ascending, SQLite
//! (`balance_nonroot`) swaps their numbers through a temporary one: the locking page's number,
//! `0x4000_0000 / page_size + 1`, which no database page ever has. The default page cache
//! (`pcache1`) remembers the largest page number it has seen since its last truncation, and
//! every commit truncates the cache to the database's size; as long as the database is under
//! 1 GiB, that largest number is the temporary one, far beyond the end, and the truncation
//! takes its slow path: every hash bucket and every cached page, to drop nothing. With the
//! telemetry writer's 64 MiB cache of 1 KiB pages that is 65,536 buckets and tens of thousands
//! of page headers on every commit that split a page out of order: the writer's largest single
//! cost in a profile of QoS 0 ingestion (18% of its thread).
//!
//! [`install`] wraps the default cache (its methods, taken from SQLite itself) and forwards
//! every call, keeping per cache the largest page number that can be in it apart from the
//! temporary one, and whether a page holds the temporary number right now. A truncation that
//! cannot drop anything is not forwarded. Pages enter a cache only by `xFetch` and leave or
//! move only by `xUnpin`, `xRekey` and `xTruncate`, all of which pass through here, so the
//! bound holds. It must run before SQLite is first used in the process (`sqlite3_config`
//! refuses afterwards); the server calls it first thing, and it changes nothing if it is late.

use std::ffi::{c_int, c_uint, c_void};
use std::mem::MaybeUninit;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::ffi;

/// SQLite's `PENDING_BYTE`: the locking page is the page holding this offset.
const PENDING_BYTE: c_uint = 0x4000_0000;

/// The default cache's methods, as SQLite gave them.
struct Inner(ffi::sqlite3_pcache_methods2);
// SAFETY: a table of function pointers and SQLite's own argument for them, set once before
// SQLite starts and only read afterwards.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

static INNER: OnceLock<Inner> = OnceLock::new();
static INSTALLED: OnceLock<bool> = OnceLock::new();
/// Truncations not forwarded that SQLite's cache would have made a full scan of: the swap
/// number had been used since the cache's last truncation.
static SAVED: AtomicU64 = AtomicU64::new(0);
/// Truncations forwarded.
static FORWARDED: AtomicU64 = AtomicU64::new(0);

/// Wraps SQLite's page cache, once per process. `true` when the wrapper is in place (now or
/// from an earlier call); `false` when SQLite was already in use, and the default cache stays.
pub fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        let mut inner = MaybeUninit::<ffi::sqlite3_pcache_methods2>::zeroed();
        // SAFETY: GETPCACHE2 writes one `sqlite3_pcache_methods2` through the pointer; it and
        // PCACHE2 return SQLITE_MISUSE, touching nothing, once SQLite is initialised.
        unsafe {
            if ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, inner.as_mut_ptr()) != ffi::SQLITE_OK {
                return false;
            }
            let inner = inner.assume_init();
            if inner.xInit.is_none()
                || inner.xCreate.is_none()
                || inner.xFetch.is_none()
                || inner.xUnpin.is_none()
                || inner.xRekey.is_none()
                || inner.xTruncate.is_none()
                || inner.xDestroy.is_none()
            {
                return false;
            }
            if INNER.set(Inner(inner)).is_err() {
                return false;
            }
            let ours = ffi::sqlite3_pcache_methods2 {
                iVersion: 1,
                pArg: std::ptr::null_mut(),
                xInit: Some(x_init),
                xShutdown: Some(x_shutdown),
                xCreate: Some(x_create),
                xCachesize: Some(x_cachesize),
                xPagecount: Some(x_pagecount),
                xFetch: Some(x_fetch),
                xUnpin: Some(x_unpin),
                xRekey: Some(x_rekey),
                xTruncate: Some(x_truncate),
                xDestroy: Some(x_destroy),
                xShrink: Some(x_shrink),
            };
            // SQLite copies the table.
            ffi::sqlite3_config(
                ffi::SQLITE_CONFIG_PCACHE2,
                &ours as *const ffi::sqlite3_pcache_methods2,
            ) == ffi::SQLITE_OK
        }
    })
}

/// Truncations since the process started: full scans saved (not forwarded, nothing to drop,
/// and SQLite's cache would have scanned everything), and truncations forwarded to it.
pub fn truncations() -> (u64, u64) {
    (SAVED.load(Ordering::Relaxed), FORWARDED.load(Ordering::Relaxed))
}

/// One cache: SQLite's, and what this wrapper knows of its page numbers.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// The number SQLite swaps pages through: never a real page's.
    spare: c_uint,
    /// No page in the cache has a number above this, apart from `spare`.
    max_key: c_uint,
    /// A page holds `spare` right now (between the swaps of one split).
    spare_held: bool,
    /// `spare` was used since the last truncation.
    spare_used: bool,
}

fn inner() -> &'static ffi::sqlite3_pcache_methods2 {
    // Only reachable through the table `install` set after filling INNER.
    &INNER
        .get()
        .expect("page cache wrapper installed without SQLite's methods")
        .0
}

/// # Safety
/// `p` is a pointer `x_create` returned and `x_destroy` has not freed.
unsafe fn cache<'a>(p: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    // SAFETY: per the contract above; SQLite calls one cache's methods under its connection's
    // mutex, never two at once.
    unsafe { &mut *(p as *mut Cache) }
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    let inner = inner();
    // SAFETY: SQLite's own method with SQLite's own argument.
    unsafe { inner.xInit.map_or(ffi::SQLITE_OK, |f| f(inner.pArg)) }
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {
    let inner = inner();
    if let Some(f) = inner.xShutdown {
        // SAFETY: as x_init.
        unsafe { f(inner.pArg) }
    }
}

unsafe extern "C" fn x_create(sz_page: c_int, sz_extra: c_int, purgeable: c_int) -> *mut ffi::sqlite3_pcache {
    let Some(create) = inner().xCreate else {
        return std::ptr::null_mut();
    };
    // SAFETY: forwarded as SQLite made the call.
    let made = unsafe { create(sz_page, sz_extra, purgeable) };
    if made.is_null() {
        return made;
    }
    let spare = match c_uint::try_from(sz_page) {
        Ok(size) if size > 0 => PENDING_BYTE / size + 1,
        _ => 0,
    };
    Box::into_raw(Box::new(Cache {
        inner: made,
        spare,
        max_key: 0,
        spare_held: false,
        spare_used: false,
    })) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn x_cachesize(p: *mut ffi::sqlite3_pcache, n: c_int) {
    // SAFETY: `p` came from x_create (SQLite's contract), forwarded to its own cache.
    unsafe {
        if let Some(f) = inner().xCachesize {
            f(cache(p).inner, n)
        }
    }
}

unsafe extern "C" fn x_pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    // SAFETY: as x_cachesize.
    unsafe { inner().xPagecount.map_or(0, |f| f(cache(p).inner)) }
}

unsafe extern "C" fn x_fetch(
    p: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    // SAFETY: as x_cachesize; xFetch is present (checked by install).
    unsafe {
        let c = cache(p);
        let page = (inner().xFetch.unwrap_unchecked())(c.inner, key, create);
        if !page.is_null() {
            if key == c.spare {
                c.spare_held = true;
                c.spare_used = true;
            } else if key > c.max_key {
                c.max_key = key;
            }
        }
        page
    }
}

unsafe extern "C" fn x_unpin(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    // SAFETY: as x_fetch. A page let go stays counted until a truncation: the bound is an
    // upper one.
    unsafe { (inner().xUnpin.unwrap_unchecked())(cache(p).inner, page, discard) }
}

unsafe extern "C" fn x_rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    // SAFETY: as x_fetch.
    unsafe {
        let c = cache(p);
        (inner().xRekey.unwrap_unchecked())(c.inner, page, old, new);
        if old == c.spare {
            c.spare_held = false;
        }
        if new == c.spare {
            c.spare_held = true;
            c.spare_used = true;
        } else if new > c.max_key {
            c.max_key = new;
        }
    }
}

unsafe extern "C" fn x_truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    // SAFETY: as x_fetch.
    unsafe {
        let c = cache(p);
        // Pages numbered `limit` or more are to go: is there one?
        let above = c.max_key >= limit || (c.spare_held && c.spare >= limit);
        let saved = std::mem::take(&mut c.spare_used);
        if !above {
            if saved {
                SAVED.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        FORWARDED.fetch_add(1, Ordering::Relaxed);
        (inner().xTruncate.unwrap_unchecked())(c.inner, limit);
        c.max_key = c.max_key.min(limit.saturating_sub(1));
        if c.spare >= limit {
            c.spare_held = false;
        }
    }
}

unsafe extern "C" fn x_destroy(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: `p` came from x_create and SQLite never uses it after this call.
    unsafe {
        let c = Box::from_raw(p as *mut Cache);
        (inner().xDestroy.unwrap_unchecked())(c.inner);
    }
}

unsafe extern "C" fn x_shrink(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: as x_cachesize.
    unsafe {
        if let Some(f) = inner().xShrink {
            f(cache(p).inner)
        }
    }
}
