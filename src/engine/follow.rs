//! Asynchronous mode (`-o async`): the mirror follows the primary from the
//! change log instead of taking each change with it.
//!
//! Owns: the log and the shipper of a mount in async mode, the lock that
//! keeps the log's order the primary's where names are concerned, and the
//! lag bound (backpressure and its events). Knows nothing of FUSE: the
//! serving layer says what each change was (`changelog::Change`).
//!
//! Order. The kernel sends a change that conflicts with another only once
//! that one is answered, and a change is appended before it is answered, so
//! the log has conflicting changes in the primary's order. Two things the
//! kernel does not serialise are a name's change (rename, unlink, ...) and a
//! write through an open file whose path the record must name: `names`
//! makes them exclusive. A change of names holds it exclusively from its
//! call on the primary to its append; a write holds it shared while its
//! path is read from the primary's fd and its record appended.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::changelog::{Lag, Log};

use super::shipper::{Forecast, Shipper};

/// How long a writer held by the lag bound sleeps between looks.
const THROTTLE_STEP: Duration = Duration::from_millis(5);

/// A reader-writer lock whose waits end at a deadline (a change whose call
/// on the primary hangs holds it; the others give up at `side_timeout`).
#[derive(Default)]
pub struct NameLock {
    state: Mutex<Holders>,
    freed: Condvar,
}

/// Who holds a `NameLock`, and how many wait for it (a release wakes
/// them only if there are some: a wake is a syscall even with no one to
/// wake).
#[derive(Default)]
struct Holders {
    shared: usize,
    exclusive: bool,
    waiting: usize,
}

/// Held while it lives.
pub struct NameGuard<'a> {
    lock: &'a NameLock,
    exclusive: bool,
}

impl NameLock {
    fn lock_state(&self) -> MutexGuard<'_, Holders> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shared (`exclusive` false) or exclusive; None past `deadline`.
    pub fn acquire(&self, exclusive: bool, deadline: Instant) -> Option<NameGuard<'_>> {
        let mut s = self.lock_state();
        loop {
            let free = if exclusive {
                s.shared == 0 && !s.exclusive
            } else {
                !s.exclusive
            };
            if free {
                if exclusive {
                    s.exclusive = true;
                } else {
                    s.shared += 1;
                }
                return Some(NameGuard { lock: self, exclusive });
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            s.waiting += 1;
            s = self
                .freed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            s.waiting -= 1;
        }
    }
}

impl Drop for NameGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.lock.lock_state();
        if self.exclusive {
            s.exclusive = false;
        } else {
            s.shared -= 1;
        }
        let waiting = s.waiting > 0;
        drop(s);
        if waiting {
            self.lock.freed.notify_all();
        }
    }
}

/// A mount's async mode.
pub struct Follow {
    pub log: Arc<Log>,
    pub names: NameLock,
    pub shipper: Mutex<Option<Shipper>>,
    pub max_lag: Duration,
    pub max_log: u64,
    /// The lag is over `max_lag` (`lag_exceeded` raised, not yet recovered).
    pub exceeded: AtomicBool,
    /// The log passed `max_log` while the mirror was down: dropped, and the
    /// mount runs as in sync mode.
    pub overflowed: AtomicBool,
    /// The shipper's costs (`Shipper::pace`).
    pace: Arc<Forecast>,
    /// Counts the changes that may move names (each takes `names`
    /// exclusively): an open file's path read in one generation holds
    /// for as long as it lasts.
    generation: AtomicU64,
}

impl Follow {
    pub fn new(log: Arc<Log>, shipper: Shipper, max_lag: Duration, max_log: u64) -> Follow {
        Follow {
            log,
            names: NameLock::default(),
            pace: shipper.pace(),
            shipper: Mutex::new(Some(shipper)),
            max_lag,
            max_log,
            exceeded: AtomicBool::new(false),
            overflowed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        }
    }

    /// The names generation (see `generation`).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Takes `names` for a change (`exclusive`: one that may move names,
    /// which starts a new generation); None past `deadline`.
    pub fn names_for_change(&self, exclusive: bool, deadline: Instant) -> Option<NameGuard<'_>> {
        let guard = self.names.acquire(exclusive, deadline)?;
        if exclusive {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        Some(guard)
    }

    /// Waits while the mirror is over the bound and `mirror_up` says it is
    /// there to catch up (a mirror that is down does not hold writers):
    /// while the oldest change it lacks is older than `max_lag`, or while
    /// the backlog, at the shipper's measured pace, would take longer than
    /// `max_lag` to ship (so that a change let in now reaches the mirror
    /// within the bound, and a burst on a fast primary cannot queue up
    /// minutes of work for a slow mirror before the oldest change has
    /// aged). `on_change(true)` once when the bound is passed,
    /// `on_change(false)` once when the mirror is back under half of it.
    pub fn throttle(&self, mirror_up: impl Fn() -> bool, on_change: impl Fn(bool, Lag)) {
        let bound = self.max_lag.as_secs_f64();
        loop {
            let lag = self.log.lag();
            let ahead = self.pace.backlog_secs(lag.ops, lag.trips);
            let over = lag.seconds > bound || ahead > bound;
            if over && mirror_up() {
                if !self.exceeded.swap(true, Ordering::AcqRel) {
                    on_change(true, lag);
                }
                std::thread::sleep(THROTTLE_STEP);
                continue;
            }
            // Recovered once well under the bound, so that a mirror that
            // keeps writers at the bound raises one event, not one per wait.
            let under = lag.seconds <= bound / 2.0 && ahead <= bound / 2.0;
            if under && self.exceeded.swap(false, Ordering::AcqRel) {
                on_change(false, lag);
            }
            return;
        }
    }

    /// The primary's path of the file open as `fd` (relative to `root`),
    /// None if it has no name any more.
    pub fn path_of_fd(fd: std::os::fd::RawFd, root: &Path) -> Option<std::path::PathBuf> {
        // Unlinked: no name (the link's " (deleted)" suffix could also be
        // a real name's end, so the link count decides).
        // SAFETY: fd is open for the caller's whole call.
        let st = crate::volume::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }).ok()?;
        if st.st_nlink == 0 {
            return None;
        }
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
        Some(link.strip_prefix(root).ok()?.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn the_name_lock_is_shared_or_exclusive_and_gives_up_at_its_deadline() {
        let l = Arc::new(NameLock::default());
        let soon = || Instant::now() + Duration::from_millis(50);
        let a = l.acquire(false, soon()).unwrap();
        let b = l.acquire(false, soon()).unwrap();
        assert!(l.acquire(true, soon()).is_none(), "exclusive while shared");
        drop((a, b));
        let x = l.acquire(true, soon()).unwrap();
        assert!(l.acquire(false, soon()).is_none(), "shared while exclusive");
        let l2 = l.clone();
        let t = thread::spawn(move || l2.acquire(true, Instant::now() + Duration::from_secs(5)).is_some());
        thread::sleep(Duration::from_millis(20));
        drop(x);
        assert!(t.join().unwrap(), "a waiter gets it once it is freed");
    }

    #[test]
    fn an_fd_is_named_by_its_path_beneath_the_root_until_it_is_unlinked() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        let f = std::fs::File::create(t.path().join("d/f")).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let root = t.path().canonicalize().unwrap();
        assert_eq!(Follow::path_of_fd(fd, &root), Some("d/f".into()));
        std::fs::rename(t.path().join("d/f"), t.path().join("d/g")).unwrap();
        assert_eq!(Follow::path_of_fd(fd, &root), Some("d/g".into()));
        std::fs::rename(t.path().join("d/g"), t.path().join("d/g (deleted)")).unwrap();
        assert_eq!(Follow::path_of_fd(fd, &root), Some("d/g (deleted)".into()));
        std::fs::remove_file(t.path().join("d/g (deleted)")).unwrap();
        assert_eq!(Follow::path_of_fd(fd, &root), None);
    }
}
