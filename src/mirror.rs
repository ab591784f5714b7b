//! The mirroring engine: runs each operation on both sides concurrently,
//! settles mixed outcomes in one place (`resolve`), and applies what that
//! decides to the sides' health.
//!
//! Owns: the worker pool that carries the mirror's half of each change, and
//! the read failover. Knows nothing of fuser: it speaks `io::Result` with raw
//! errnos and relative paths.
//!
//! Concurrency: a change runs on the primary in the calling (FUSE) thread
//! while a pool thread runs it on the mirror; the call returns once both have
//! answered, or the mirror has exceeded `side_timeout`. Ordering between two
//! changes to the same object is the kernel's: it serialises writes to an
//! inode and namespace changes in a directory before they reach us.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::health::{Health, errno_name, is_side_failure};
use crate::spec::Side;
use crate::volume::Volume;

/// What one side did with an operation, as `resolve` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideResult {
    Ok,
    Err(i32),
    /// The side was down and was not asked.
    Skipped,
}

impl SideResult {
    pub fn of<T>(r: &Option<io::Result<T>>) -> SideResult {
        match r {
            None => SideResult::Skipped,
            Some(Ok(_)) => SideResult::Ok,
            Some(Err(e)) => SideResult::Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
}

/// What the caller is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The value this side returned.
    From(Side),
    /// This errno.
    Errno(i32),
}

/// The outcome of `resolve`: the answer and its side effects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub answer: Answer,
    /// A side whose failure takes it out of service.
    pub mark_down: Option<Side>,
    /// The sides gave different ordinary answers: the path is out of sync.
    pub diverged: bool,
}

const fn decide(answer: Answer, mark_down: Option<Side>, diverged: bool) -> Decision {
    Decision {
        answer,
        mark_down,
        diverged,
    }
}

/// Decides what the caller sees from the two sides' results. "Failure" is a
/// side failure (`health::is_side_failure`), "ordinary" any other errno.
///
/// | primary        | mirror         | answer          | effect               |
/// |----------------|----------------|-----------------|----------------------|
/// | ok             | ok             | primary's value |                      |
/// | ok             | skipped        | primary's value |                      |
/// | skipped        | ok             | mirror's value  |                      |
/// | skipped        | error e        | e               | (last side)          |
/// | error e        | skipped        | e               | (last side)          |
/// | skipped        | skipped        | EIO             | (no side up)         |
/// | ok             | failure        | primary's value | mirror down          |
/// | failure        | ok             | mirror's value  | primary down         |
/// | ok             | ordinary e     | primary's value | diverged             |
/// | ordinary e     | ok             | e               | diverged             |
/// | error e        | same error e   | e               |                      |
/// | failure a      | ordinary b     | b               | primary down         |
/// | ordinary a     | failure b      | a               | mirror down          |
/// | ordinary a     | ordinary b     | a               | diverged             |
/// | failure a      | failure b      | a               | (both failing: none) |
pub fn resolve(p: SideResult, m: SideResult) -> Decision {
    use Answer::{Errno, From};
    use SideResult::{Err, Ok, Skipped};
    match (p, m) {
        (Ok, Ok) | (Ok, Skipped) => decide(From(Side::Primary), None, false),
        (Skipped, Ok) => decide(From(Side::Mirror), None, false),
        (Skipped, Err(e)) | (Err(e), Skipped) => decide(Errno(e), None, false),
        (Skipped, Skipped) => decide(Errno(libc::EIO), None, false),
        (Ok, Err(e)) if is_side_failure(e) => decide(From(Side::Primary), Some(Side::Mirror), false),
        (Err(e), Ok) if is_side_failure(e) => decide(From(Side::Mirror), Some(Side::Primary), false),
        (Ok, Err(_)) => decide(From(Side::Primary), None, true),
        (Err(e), Ok) => decide(Errno(e), None, true),
        (Err(a), Err(b)) if a == b => decide(Errno(a), None, false),
        (Err(a), Err(b)) => match (is_side_failure(a), is_side_failure(b)) {
            (true, false) => decide(Errno(b), Some(Side::Primary), false),
            (false, true) => decide(Errno(a), Some(Side::Mirror), false),
            (false, false) => decide(Errno(a), None, true),
            (true, true) => decide(Errno(a), None, false),
        },
    }
}

/// Both sides' results of one change.
pub struct Pair<T> {
    pub results: [Option<io::Result<T>>; 2],
}

impl<T> Pair<T> {
    /// Takes the value `side` returned, if it succeeded.
    pub fn take_ok(&mut self, side: Side) -> Option<T> {
        match self.results[side.index()].take() {
            Some(Ok(v)) => Some(v),
            _ => None,
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run the mirror's half of each change.
struct Pool {
    tx: Sender<Job>,
}

impl Pool {
    fn new(threads: usize) -> io::Result<Pool> {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = crossbeam_channel::unbounded();
        for i in 0..threads {
            let rx = rx.clone();
            thread::Builder::new().name(format!("mirror-{i}")).spawn(move || {
                for job in rx {
                    job();
                }
            })?;
        }
        Ok(Pool { tx })
    }
}

/// Called once when a side is taken out of service, before the operation
/// that failed on it is answered.
pub type OnDown = Box<dyn Fn(Side, &str, i32) + Send + Sync>;

/// The engine. One per mount.
pub struct Engine {
    on_down: Option<OnDown>,
    vols: [Option<Arc<Volume>>; 2],
    pub health: Health,
    pool: Pool,
    side_timeout: Duration,
    divergences: AtomicU64,
}

impl Engine {
    /// A missing side (`None`, allowed for read-only mounts) starts down.
    pub fn new(
        primary: Option<Volume>,
        mirror: Option<Volume>,
        side_timeout: Duration,
        threads: usize,
    ) -> io::Result<Engine> {
        let health = Health::default();
        for (side, v) in [(Side::Primary, &primary), (Side::Mirror, &mirror)] {
            if v.is_none() {
                health.mark_down(side, "mount", libc::ENOENT);
            }
        }
        Ok(Engine {
            on_down: None,
            vols: [primary.map(Arc::new), mirror.map(Arc::new)],
            health,
            pool: Pool::new(threads)?,
            side_timeout,
            divergences: AtomicU64::new(0),
        })
    }

    /// Sets what is done when a side goes down (the daemon records it durably).
    pub fn set_on_down(&mut self, f: OnDown) {
        self.on_down = Some(f);
    }

    fn side_failed(&self, side: Side, op: &str, errno: i32, path: &Path) {
        if self.health.mark_down(side, op, errno) {
            log::warn!(
                "side={side} op={op} path={} errno={} carrying on with the other side",
                path.display(),
                errno_name(errno)
            );
            if let Some(f) = &self.on_down {
                f(side, op, errno);
            }
        }
    }

    pub fn volume(&self, side: Side) -> io::Result<&Volume> {
        self.vols[side.index()]
            .as_deref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))
    }

    pub fn divergences(&self) -> u64 {
        self.divergences.load(Ordering::Relaxed)
    }

    /// The side that answers reads: the primary while it is up.
    pub fn reader(&self) -> Side {
        if self.health.is_up(Side::Primary) {
            Side::Primary
        } else {
            Side::Mirror
        }
    }

    /// Runs a read on the reading side. A side failure on the primary is
    /// retried on the mirror and takes the primary down; the caller sees no
    /// error.
    pub fn read<T>(&self, op: &str, path: &Path, mut f: impl FnMut(Side, &Volume) -> io::Result<T>) -> io::Result<T> {
        let side = self.reader();
        let r = f(side, self.volume(side)?);
        match &r {
            Err(e) if side == Side::Primary && is_side_failure(e.raw_os_error().unwrap_or(0)) => {
                self.side_failed(Side::Primary, op, e.raw_os_error().unwrap_or(libc::EIO), path);
                if self.health.is_up(Side::Mirror) && !self.health.is_up(Side::Primary) {
                    return f(Side::Mirror, self.volume(Side::Mirror)?);
                }
                r
            }
            _ => r,
        }
    }

    /// Runs a change on every side that is up, concurrently: `pf` on the
    /// primary in this thread, `mf` on the mirror in a pool thread.
    pub fn change2<T: Send + 'static>(
        &self,
        pf: impl FnOnce(&Volume) -> io::Result<T>,
        mf: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
    ) -> Pair<T> {
        let pvol = self.vols[0].as_deref().filter(|_| self.health.is_up(Side::Primary));
        let mvol = self.vols[1].clone().filter(|_| self.health.is_up(Side::Mirror));
        let Some(mvol) = mvol else {
            return Pair {
                results: [pvol.map(pf), None],
            };
        };
        let Some(pvol) = pvol else {
            return Pair {
                results: [None, Some(mf(&mvol))],
            };
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(mf(&mvol));
        });
        let sent = self.pool.tx.send(job).is_ok();
        let p = pf(pvol);
        let m = if !sent {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            match rx.recv_timeout(self.side_timeout) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
                Err(RecvTimeoutError::Disconnected) => Err(io::Error::from_raw_os_error(libc::EIO)),
            }
        };
        Pair {
            results: [Some(p), Some(m)],
        }
    }

    /// `change2` with one closure for both sides; it is told which side it runs on.
    pub fn change<T: Send + 'static>(
        &self,
        f: impl Fn(Side, &Volume) -> io::Result<T> + Send + Sync + 'static,
    ) -> Pair<T> {
        let f = Arc::new(f);
        let g = f.clone();
        self.change2(move |v| f(Side::Primary, v), move |v| g(Side::Mirror, v))
    }

    /// Settles a pair of results: applies the decision to health, logs, and
    /// returns the answering side (whose value is in `pair`) or the errno.
    pub fn settle<T>(&self, op: &str, path: &Path, pair: &Pair<T>) -> io::Result<Side> {
        let p = SideResult::of(&pair.results[0]);
        let m = SideResult::of(&pair.results[1]);
        let d = resolve(p, m);
        if let Some(side) = d.mark_down {
            let errno = match if side == Side::Primary { p } else { m } {
                SideResult::Err(e) => e,
                _ => libc::EIO,
            };
            self.side_failed(side, op, errno, path);
        }
        if d.diverged {
            self.divergences.fetch_add(1, Ordering::Relaxed);
            log::warn!("op={op} path={} diverged primary={p:?} mirror={m:?}", path.display());
        }
        match d.answer {
            Answer::From(side) => Ok(side),
            Answer::Errno(e) => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// `change` then `settle`, returning the answering side's value.
    pub fn apply<T: Send + 'static>(
        &self,
        op: &str,
        path: &Path,
        f: impl Fn(Side, &Volume) -> io::Result<T> + Send + Sync + 'static,
    ) -> io::Result<T> {
        let mut pair = self.change(f);
        let side = self.settle(op, path, &pair)?;
        pair.take_ok(side)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))
    }
}

#[cfg(test)]
mod tests {
    use super::Answer::{Errno, From};
    use super::SideResult::{Err, Ok, Skipped};
    use super::*;

    const EIO: i32 = libc::EIO;
    const ENOSPC: i32 = libc::ENOSPC;
    const ENOENT: i32 = libc::ENOENT;
    const EEXIST: i32 = libc::EEXIST;

    #[test]
    fn both_ok_answers_primary() {
        assert_eq!(resolve(Ok, Ok), decide(From(Side::Primary), None, false));
    }
    #[test]
    fn mirror_skipped_answers_primary() {
        assert_eq!(resolve(Ok, Skipped), decide(From(Side::Primary), None, false));
    }
    #[test]
    fn primary_skipped_answers_mirror() {
        assert_eq!(resolve(Skipped, Ok), decide(From(Side::Mirror), None, false));
    }
    #[test]
    fn last_side_errors_go_to_caller() {
        assert_eq!(resolve(Skipped, Err(EIO)), decide(Errno(EIO), None, false));
        assert_eq!(resolve(Err(ENOSPC), Skipped), decide(Errno(ENOSPC), None, false));
    }
    #[test]
    fn no_side_up_is_eio() {
        assert_eq!(resolve(Skipped, Skipped), decide(Errno(EIO), None, false));
    }
    #[test]
    fn mirror_failure_takes_mirror_down() {
        assert_eq!(
            resolve(Ok, Err(EIO)),
            decide(From(Side::Primary), Some(Side::Mirror), false)
        );
    }
    #[test]
    fn primary_failure_takes_primary_down() {
        assert_eq!(
            resolve(Err(ENOSPC), Ok),
            decide(From(Side::Mirror), Some(Side::Primary), false)
        );
    }
    #[test]
    fn mirror_ordinary_error_diverges() {
        assert_eq!(resolve(Ok, Err(ENOENT)), decide(From(Side::Primary), None, true));
    }
    #[test]
    fn primary_ordinary_error_is_answered_and_diverges() {
        assert_eq!(resolve(Err(EEXIST), Ok), decide(Errno(EEXIST), None, true));
    }
    #[test]
    fn same_error_on_both_is_answered() {
        assert_eq!(resolve(Err(ENOENT), Err(ENOENT)), decide(Errno(ENOENT), None, false));
    }
    #[test]
    fn primary_failure_mirror_ordinary_answers_mirror() {
        assert_eq!(
            resolve(Err(EIO), Err(ENOENT)),
            decide(Errno(ENOENT), Some(Side::Primary), false)
        );
    }
    #[test]
    fn primary_ordinary_mirror_failure_answers_primary() {
        assert_eq!(
            resolve(Err(ENOENT), Err(EIO)),
            decide(Errno(ENOENT), Some(Side::Mirror), false)
        );
    }
    #[test]
    fn different_ordinary_errors_diverge() {
        assert_eq!(resolve(Err(ENOENT), Err(EEXIST)), decide(Errno(ENOENT), None, true));
    }
    #[test]
    fn both_failing_marks_neither() {
        assert_eq!(resolve(Err(EIO), Err(ENOSPC)), decide(Errno(EIO), None, false));
    }
}
