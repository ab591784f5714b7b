//! The mirroring engine: runs each operation on both sides, settles mixed
//! outcomes in one place (`resolve`), and applies what that decides to the
//! sides' health and the event log.
//!
//! Owns: one lane of worker threads per side, the deadline that turns a
//! hung side into a failed one, read failover, and the record of diverged
//! paths. Knows nothing of fuser: it speaks `io::Result` with raw errnos and
//! relative paths.
//!
//! Concurrency: a side call runs in the FUSE thread itself when the
//! inline budget allows (the primary's half, then the mirror's, or the
//! mirror's on its lane at the same time for calls that wait for a disk:
//! `Pace`), otherwise on that side's lane while the FUSE thread waits. A
//! side hung on a lane is timed out by the waiting thread; one hung in the
//! FUSE thread, by the watchdog (`inline`), which has the request answered
//! from what the other side did. Either way, once `side_timeout` has passed
//! with the other side up, the hung side is marked down and the caller is
//! answered from the survivor. The last side up has no deadline: its
//! slowness is the caller's, as with any single disk. Ordering between two
//! changes to the same object is the kernel's: it serialises writes to an
//! inode and namespace changes in a directory before they reach us.
//!
//! Lock order: `transition` is taken before `Health`'s own lock, and never
//! while waiting for a side.

pub mod bufpool;
pub mod follow;
pub mod gate;
pub mod handoff;
pub mod inline;
pub mod resolve;
pub mod shipper;
pub mod sideio;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::events::{Event, Events, Kind};
use crate::health::{Health, OP_FAIL, SideState, errno_label, errno_name, is_side_failure};
use crate::journal::{Intent, PathLog};
use crate::spec::Side;
use crate::volume::Volume;
use gate::{Exclusive, Gate, Pass};
use handoff::RecvTimeoutError;
pub use resolve::{Answer, Decision, Policy, SideResult, resolve};
use sideio::{Job, Lane};

/// How the mirror's half of an operation runs while the primary's half
/// runs inline in the FUSE thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// After the primary's, in the same thread: no thread hop, for calls
    /// that return without waiting for a disk (a buffered write, a create,
    /// a rename, a setattr): the hop there and back would cost more than
    /// the call.
    Sequential,
    /// At the same time, on the mirror's lane: for calls that wait for the
    /// disk (fsync), whose two latencies would otherwise add up.
    Concurrent,
}

/// Whether an operation run on both sides changes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    Changes,
    /// Opens a file on each side without changing it (a read-only open).
    Opens,
}

/// The operation named when writing the write-intent record fails.
const OP_INTENT: &str = "intent";
/// The operations named for a change, or an open, whose half hung in the
/// FUSE thread (the watchdog knows no more of it).
const OP_CHANGE: &str = "change";
const OP_OPEN: &str = "open";

/// The errno of a call on a side through an open handle that has no fd
/// there (the side was out of service when the file was opened, and the
/// file has not been re-attached yet): the side missed the change.
pub const NOT_ATTACHED: i32 = libc::EBADFD;

/// Both sides' results of one change. While it lives, the change holds the
/// gate open: no resync step runs between its reaching the sides and its
/// being settled.
pub struct Pair<T> {
    pub results: [Option<io::Result<T>>; 2],
    /// Refused before any side was asked (fail-stop with a side down).
    refused: bool,
    effect: Effect,
    pass: Option<Pass>,
}

impl<T> Pair<T> {
    /// Refused before any side was asked.
    fn refused(effect: Effect) -> Pair<T> {
        Pair {
            results: [None, None],
            refused: true,
            effect,
            pass: None,
        }
    }

    /// Keeps changes from being interleaved with a resync step until the
    /// caller has finished with the result (e.g. registered a handle).
    pub fn take_pass(&mut self) -> Option<Pass> {
        self.pass.take()
    }

    /// Takes the value `side` returned, if it succeeded.
    pub fn take_ok(&mut self, side: Side) -> Option<T> {
        match self.results[side.index()].take() {
            Some(Ok(v)) => Some(v),
            _ => None,
        }
    }
}

/// What an operation is about, for events: a path, or an open file's inode
/// (resolved to a path only when an event needs it).
#[derive(Clone, Copy, Debug)]
pub enum Subject<'a> {
    Path(&'a Path),
    /// A directory entry made or removed at this path (create, mkdir,
    /// mknod, symlink, link, unlink, rmdir).
    Entry(&'a Path),
    Inode(u64),
    /// Two paths: a rename's source and destination, a link's old and new name.
    Two(&'a Path, &'a Path),
    /// A rename's source and destination, where the destination did not
    /// exist: only the two directories' sets of entries change.
    Moved(&'a Path, &'a Path),
    /// A change of timestamps alone, to this subject: it needs no
    /// write-intent record (sides may differ in the times the kernel sets,
    /// and `verify` does not compare them).
    Times(&'a Subject<'a>),
    /// The whole mount (`mirrorfs fail`).
    Mount,
}

/// What a change in flight parks for a rescuer (see `inline`).
enum Half<T> {
    /// The mirror's half runs on its lane (if it was asked): its result
    /// comes here.
    OnLane(handoff::Receiver<(Side, Option<io::Result<T>>)>, bool),
    /// The primary's half is done, with this result (None: it went down
    /// first), and the mirror's runs inline in the FUSE thread.
    PrimaryDone(Option<io::Result<T>>),
}

/// A read, run on whichever side answers.
type ReadFn<T> = Arc<dyn Fn(Side, &Volume) -> io::Result<T> + Send + Sync>;
type Results<T> = handoff::Sender<(Side, Option<io::Result<T>>)>;

/// Called once when a side is taken out of service, before the operation
/// that failed on it is answered.
pub type OnDown = Box<dyn Fn(Side, &str, Option<i32>) + Send + Sync>;
/// Finds the path of an inode, for events about open files.
pub type Resolver = Box<dyn Fn(u64) -> Option<PathBuf> + Send + Sync>;

/// Engine settings from the mount options.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub side_timeout: Duration,
    pub policy: Policy,
    /// Worker threads per side.
    pub threads: usize,
    /// FUSE threads that may run the primary's half inline, and how many
    /// of them may be inside such a call at once (`inline`).
    pub inline_threads: usize,
    pub inline_budget: usize,
}

/// The engine. One per mount.
pub struct Engine {
    vols: [RwLock<Option<Arc<Volume>>>; 2],
    pub health: Arc<Health>,
    pub events: Arc<Events>,
    lanes: [Lane; 2],
    watch: Arc<inline::Watch>,
    config: EngineConfig,
    on_down: Option<OnDown>,
    /// Held while a side goes down and its absence is recorded; an operation
    /// that skipped a down side takes it before answering, so nothing is
    /// acknowledged on one side before that record is durable.
    transition: Mutex<()>,
    resolver: OnceLock<Resolver>,
    /// Each side's missed-change journal: the paths that side changed and
    /// its peer lacks (None on a read-only mount, or a side never served).
    journals: [OnceLock<PathLog>; 2],
    /// The write-intent record, on the primary.
    intent: OnceLock<Intent>,
    gate: Gate,
    /// Wakes the resyncer: a side should be caught up.
    wanted: (Sender<()>, Receiver<()>),
    divergences: AtomicU64,
    /// Both sides took changes the other lacks: nothing is served until
    /// the operator names the winner.
    split: std::sync::atomic::AtomicBool,
    retired: Sender<Box<dyn Send>>,
    /// Async mode (`follow`), once started.
    follow: OnceLock<Arc<follow::Follow>>,
    /// Async mode: the primary failed with this many changes not yet on
    /// the mirror, which holds the primary's state as of `mirror_as_of`
    /// (ns since the epoch). Nothing is served from then on: serving the
    /// mirror would roll files back under a running database.
    lost_ops: AtomicU64,
    mirror_as_of: AtomicU64,
}

/// Whether `side` is asked to do an operation with `effect`: a change also
/// goes to a side being resynced; anything else does not.
fn serves(health: &Health, side: Side, effect: Effect) -> bool {
    match effect {
        Effect::Changes => health.takes_changes(side),
        Effect::Opens => health.is_up(side),
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn raw(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Engine {
    /// A missing side (`None`) that `health` still has up starts down.
    pub fn new(
        primary: Option<Volume>,
        mirror: Option<Volume>,
        health: Arc<Health>,
        events: Arc<Events>,
        config: EngineConfig,
    ) -> io::Result<Engine> {
        for (side, v) in [(Side::Primary, &primary), (Side::Mirror, &mirror)] {
            if v.is_none() && health.is_up(side) {
                health.start_out_of_service(side, SideState::Down, Some(libc::ENOENT));
            }
        }
        let (retired, graveyard) = crossbeam_channel::unbounded::<Box<dyn Send>>();
        thread::Builder::new().name("closer".into()).spawn(move || {
            for thing in graveyard {
                drop(thing);
            }
        })?;
        Ok(Engine {
            retired,
            vols: [RwLock::new(primary.map(Arc::new)), RwLock::new(mirror.map(Arc::new))],
            health,
            events,
            lanes: [
                Lane::start("primary", config.threads)?,
                Lane::start("mirror", config.threads)?,
            ],
            watch: Arc::new(inline::Watch::new(
                config.inline_threads,
                config.inline_budget,
                config.side_timeout,
            )),
            config,
            on_down: None,
            transition: Mutex::new(()),
            resolver: OnceLock::new(),
            journals: [OnceLock::new(), OnceLock::new()],
            intent: OnceLock::new(),
            gate: Gate::default(),
            wanted: crossbeam_channel::unbounded(),
            divergences: AtomicU64::new(0),
            split: std::sync::atomic::AtomicBool::new(false),
            follow: OnceLock::new(),
            lost_ops: AtomicU64::new(0),
            mirror_as_of: AtomicU64::new(0),
        })
    }

    /// Async mode, while it is in force: the mirror follows from the log
    /// rather than taking each change (the primary serves).
    pub fn following(&self) -> Option<&Arc<follow::Follow>> {
        self.follow
            .get()
            .filter(|f| self.health.is_up(Side::Primary) && !f.overflowed.load(Ordering::Acquire))
    }

    /// Nothing is served: split brain, or (async mode) the primary failed
    /// with changes the mirror lacks.
    pub fn stopped(&self) -> bool {
        self.split() || self.lost_ops.load(Ordering::Acquire) > 0
    }

    /// Async mode, after the primary failed with changes the mirror
    /// lacks: how many, and since when (ns since the epoch) the mirror's
    /// state dates.
    pub fn lost(&self) -> Option<(u64, u64)> {
        match self.lost_ops.load(Ordering::Acquire) {
            0 => None,
            n => Some((n, self.mirror_as_of.load(Ordering::Acquire))),
        }
    }

    /// Async mode was started for this mount.
    pub fn asynchronous(&self) -> bool {
        self.follow.get().is_some()
    }

    /// How far the mirror is behind in async mode (zero otherwise).
    pub fn lag(&self) -> crate::changelog::Lag {
        self.follow.get().map(|f| f.log.lag()).unwrap_or_default()
    }

    /// Async mode: the records the shipper applied to the mirror since the
    /// mount, re-sent ones included (zero otherwise).
    pub fn shipped(&self) -> u64 {
        self.follow
            .get()
            .and_then(|f| {
                f.shipper
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|s| s.shipped())
            })
            .unwrap_or(0)
    }

    /// Async mode: true while the mirror can take what the shipper brings.
    /// A shipper stuck in one call on the mirror for `side_timeout` takes
    /// the mirror down (ETIMEDOUT), so that writers held by the lag bound
    /// go on.
    pub fn mirror_following(&self) -> bool {
        if let Some(f) = self.follow.get()
            && let Some(s) = f.shipper.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
            && s.busy_for().is_some_and(|b| b >= self.config.side_timeout)
            && self.health.is_up(Side::Mirror)
        {
            self.health.count_error(Side::Mirror, "ship");
            self.side_failed(Side::Mirror, "ship", Some(libc::ETIMEDOUT), Subject::Mount);
        }
        // A writer held by the bound goes on once nothing will ship any
        // more: the primary failed (the shipper is stopped) or the log
        // was dropped.
        self.health.is_up(Side::Mirror) && self.following().is_some()
    }

    /// Reports the lag passing `max_lag` (`over`) or coming back under it.
    pub fn lag_event(&self, over: bool, lag: crate::changelog::Lag) {
        let kind = if over { Kind::LagExceeded } else { Kind::LagRecovered };
        let detail = format!("lag={:.3}s ops={} bytes={}", lag.seconds, lag.ops, lag.bytes);
        if over {
            log::warn!("side=mirror {detail}: writers wait for the mirror");
        } else {
            log::info!("side=mirror {detail}: back under the bound");
        }
        self.events.emit(Event::new(kind).side(Side::Mirror).detail(detail));
    }

    /// At a mount in sync mode: a change log left by an async mount is
    /// applied to the mirror first (it lacks what the log holds past its
    /// position), then removed. If that cannot be done (no mirror, a
    /// position from another log, a failure), the mirror's whole tree is
    /// recorded as missed instead, for a resync from the primary.
    pub fn drain_log(&self) -> io::Result<()> {
        let Ok(primary) = self.volume(Side::Primary) else {
            // Not here: its log, if any, is seen when it is.
            return Ok(());
        };
        let dir = primary.path.join(crate::volume::META_DIR).join(crate::changelog::DIR);
        if !dir.is_dir() {
            return Ok(());
        }
        if !self.health.is_up(Side::Primary) {
            // Stale: the mirror took changes without it, and it will be
            // resynced from the mirror. Its log is history.
            log::warn!("side=primary is stale: the change log it holds from an async mount is dropped");
            return std::fs::remove_dir_all(&dir);
        }
        let drained = (|| -> io::Result<u64> {
            let mirror = self.volume(Side::Mirror)?;
            if !self.health.is_up(Side::Mirror) {
                return Err(io::Error::other("the mirror is not in service"));
            }
            let log = crate::changelog::Log::open(&dir, 0)?;
            let from = match shipper::read_position(&mirror)? {
                Some(p) if p.log_id == log.id() => p.seq,
                _ => return Err(io::Error::other("the mirror's position is not in this log")),
            };
            let mut reader = log.reader(from);
            let mut files = crate::changelog::KeptFiles::default();
            let mut n = 0;
            let mut again = true;
            while let Some(r) = reader.read_next()? {
                r.change.apply_with(&mirror, again, &mut files)?;
                again = false;
                n += 1;
            }
            files.sync_owed()?;
            mirror.syncfs()?;
            Ok(n)
        })();
        match drained {
            Ok(n) => log::info!("side=mirror applied {n} change(s) left in the change log by an async mount"),
            Err(e) => {
                log::warn!(
                    "side=mirror the change log left by an async mount cannot be applied ({e}): the mirror is resynced whole"
                );
                self.journal_missed(Side::Mirror, &[crate::journal::tree(Path::new(""))])?;
            }
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Async mode: past `max_log` with the mirror out of service, the log
    /// is dropped and the mirror's whole tree recorded as missed; the mount
    /// goes on as in sync mode (the mirror is resynced when it is back)
    /// until it is mounted again.
    pub fn check_overflow(&self) {
        let Some(f) = self.follow.get() else {
            return;
        };
        if self.health.is_up(Side::Mirror) || f.overflowed.load(Ordering::Acquire) {
            return;
        }
        // What the mirror lacks is what the log must keep.
        let size = f.log.lag().bytes;
        if size <= f.max_log {
            return;
        }
        if self.drop_log(f).is_ok() {
            log::warn!(
                "side=mirror the change log passed max_log ({size} > {} bytes) while the mirror is out of service: it is dropped, and the mirror will be resynced whole; the mount runs in sync mode until it is mounted again",
                f.max_log
            );
        }
    }

    /// Async mode: a change made on the primary could not be appended to
    /// the log (the primary's disk refused the record). The log no longer
    /// tells the primary's history, so it is dropped as past `max_log`,
    /// and the mirror is taken out of service to be resynced whole when
    /// its probe brings it back. The change itself stands: Ok, unless the
    /// mirror's missed changes cannot be recorded either.
    pub fn abandon_log(&self, e: &io::Error) -> io::Result<()> {
        let Some(f) = self.follow.get() else {
            return Ok(());
        };
        if f.overflowed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        log::error!(
            "side=primary cannot append to the change log ({e}): it is dropped, and the mirror will be resynced whole; the mount runs in sync mode until it is mounted again"
        );
        // The log is useless now: its space goes first (a full disk is the
        // usual cause), then the journal takes over from it.
        Self::remove_log(f);
        self.side_failed(Side::Mirror, "changelog", e.raw_os_error(), Subject::Mount);
        self.journal_missed(Side::Mirror, &[crate::journal::tree(Path::new(""))])
    }

    /// Records the mirror's whole tree as missed, then stops shipping and
    /// removes the log: from here the mount runs as in sync mode.
    fn drop_log(&self, f: &follow::Follow) -> io::Result<()> {
        self.journal_missed(Side::Mirror, &[crate::journal::tree(Path::new(""))])?;
        f.overflowed.store(true, Ordering::Release);
        Self::remove_log(f);
        Ok(())
    }

    fn remove_log(f: &follow::Follow) {
        if let Some(s) = f.shipper.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            s.stop(Duration::ZERO);
        }
        // Emptied first: the log and the shipper keep segments open, and an
        // open file's blocks are not freed by its removal.
        for e in std::fs::read_dir(f.log.dir()).into_iter().flatten().flatten() {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .open(e.path())
                .and_then(|file| file.set_len(0));
        }
        if let Err(e) = std::fs::remove_dir_all(f.log.dir()) {
            log::warn!("cannot remove the change log: {e}");
        }
    }

    /// Starts async mode: opens the change log on the primary and ships it
    /// to the mirror from the mirror's recorded position.
    ///
    /// A primary that is absent or stale at mount does not lead: the mount
    /// runs as in sync mode (a stale primary's log is history, dropped).
    pub fn start_follow(self: &Arc<Engine>, max_lag: Duration, max_log: u64) -> io::Result<()> {
        let Ok(primary) = self.volume(Side::Primary) else {
            log::warn!("side=primary absent: async mode waits for a mount with it");
            return Ok(());
        };
        let dir = primary.path.join(crate::volume::META_DIR).join(crate::changelog::DIR);
        if !self.health.is_up(Side::Primary) {
            log::warn!("side=primary is stale: async mode waits for a mount with it in service");
            if dir.is_dir() {
                std::fs::remove_dir_all(&dir)?;
            }
            return Ok(());
        }
        let mirror = self.volume(Side::Mirror).ok();
        let position = match &mirror {
            Some(v) => shipper::read_position(v)?,
            None => None,
        };
        let probe = crate::changelog::Log::open(&dir, 0)?;
        let from = match position {
            Some(p) if p.log_id == probe.id() && p.seq + 1 >= probe.first_held()? => p.seq,
            Some(p) if p.log_id == probe.id() => {
                // Never so when the log is only dropped behind a durable
                // position; a mirror put back from an older copy may be.
                // It is resynced whole, and this mount runs as in sync mode.
                log::warn!(
                    "side=mirror its position ({}) is behind what the change log still holds: the log is dropped, the mirror will be resynced whole, and the mount runs in sync mode",
                    p.seq
                );
                self.journal_missed(Side::Mirror, &[crate::journal::tree(Path::new(""))])?;
                drop(probe);
                std::fs::remove_dir_all(&dir)?;
                return Ok(());
            }
            // A mirror that never followed this log starts at its end: it
            // was made identical by the sync mount or resync before it.
            _ => probe.last(),
        };
        drop(probe);
        let log = Arc::new(crate::changelog::Log::open(&dir, from)?);
        let started = Instant::now();
        if let Some(v) = &mirror {
            shipper::write_position(
                v,
                shipper::Position {
                    log_id: log.id(),
                    seq: from,
                },
                true,
            )?;
        }
        let s = shipper::Shipper::start(
            log.clone(),
            log.id(),
            from,
            Arc::new(EngineMirror(Arc::downgrade(self))),
        )?;
        // Until records are measured, each is expected to cost what that
        // durable write did (a few round trips to a distant mirror).
        if mirror.is_some() {
            s.expect(started.elapsed());
        }
        let f = Arc::new(follow::Follow::new(log.clone(), s, max_lag, max_log));
        self.follow
            .set(f)
            .map_err(|_| io::Error::new(io::ErrorKind::AlreadyExists, "async mode started twice"))
    }

    /// Sets what is done when a side goes down (the daemon records it durably).
    pub fn set_on_down(&mut self, f: OnDown) {
        self.on_down = Some(f);
    }

    /// Sets how open files' inodes are named in events.
    pub fn set_resolver(&self, f: Resolver) {
        let _ = self.resolver.set(f);
    }

    fn path_of(&self, subject: Subject) -> Option<PathBuf> {
        match subject {
            Subject::Path(p) | Subject::Entry(p) | Subject::Two(p, _) | Subject::Moved(p, _) => Some(p.to_path_buf()),
            Subject::Inode(ino) => self.resolver.get().and_then(|r| r(ino)),
            Subject::Times(s) => self.path_of(*s),
            Subject::Mount => None,
        }
    }

    /// Every path an operation changes.
    fn paths_of(&self, subject: Subject) -> Vec<PathBuf> {
        match subject {
            Subject::Two(a, b) | Subject::Moved(a, b) => vec![a.to_path_buf(), b.to_path_buf()],
            Subject::Times(s) => self.paths_of(*s),
            s => self.path_of(s).into_iter().collect(),
        }
    }

    /// What the write-intent record names for a change. An entry made or
    /// removed is named by its directory, whose set of entries a crash
    /// recovery compares (Depth::Entry: a missing entry is copied whole, an
    /// extra one removed), so a run of creates or unlinks in one directory
    /// costs one record (and one fdatasync) per epoch, not one each. So
    /// is a rename onto a new name (`Moved`): both directories. A rename
    /// that replaces (or, with RENAME_EXCHANGE, swaps with) an entry names
    /// both paths themselves: the sides may hold the same names with
    /// different contents there, which a comparison of names would miss.
    fn intent_paths(&self, subject: Subject) -> Vec<PathBuf> {
        let dir = |p: &Path| p.parent().unwrap_or(Path::new("")).to_path_buf();
        match subject {
            Subject::Entry(p) => vec![dir(p)],
            Subject::Moved(a, b) => vec![dir(a), dir(b)],
            Subject::Times(_) => Vec::new(),
            s => self.paths_of(s),
        }
    }

    /// Sets `side`'s missed-change journal (once, before serving).
    pub fn set_journal(&self, side: Side, log: PathLog) {
        let _ = self.journals[side.index()].set(log);
    }

    pub fn journal(&self, side: Side) -> Option<&PathLog> {
        self.journals[side.index()].get()
    }

    /// Sets the write-intent record (once, before serving).
    pub fn set_intent(&self, intent: Intent) {
        let _ = self.intent.set(intent);
    }

    pub fn intent(&self) -> Option<&Intent> {
        self.intent.get()
    }

    /// Holds every change off while the result lives (a resync step, an
    /// intent epoch switch).
    pub fn exclusive(&self) -> Exclusive {
        self.gate.exclusive()
    }

    pub fn split(&self) -> bool {
        self.split.load(Ordering::Acquire)
    }

    /// Starts the mount split: nothing is served until `resolve_split`.
    pub fn set_split(&self) {
        self.split.store(true, Ordering::Release);
    }

    /// The operator named `winner`: it serves, its peer is caught up from it.
    pub fn resolve_split(&self, winner: Side) {
        let _t = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        self.health.make_winner(winner);
        self.split.store(false, Ordering::Release);
        log::warn!(
            "split resolved: the {winner} wins, the {} is caught up from it",
            winner.other()
        );
    }

    pub fn side_timeout(&self) -> Duration {
        self.config.side_timeout
    }

    /// Asks the resyncer to look for work.
    pub fn want_resync(&self) {
        let _ = self.wanted.0.send(());
    }

    /// Where the resyncer waits for work.
    pub fn resync_wanted(&self) -> Receiver<()> {
        self.wanted.1.clone()
    }

    /// Records durably, in the journal of the side that is not `missed`,
    /// that `missed` lacks the change to `paths`.
    fn journal_missed(&self, missed: Side, paths: &[PathBuf]) -> io::Result<()> {
        let Some(log) = self.journal(missed.other()) else {
            return Ok(());
        };
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        log.record(&refs).inspect_err(|e| {
            log::error!(
                "side={} cannot journal a change the {missed} missed: {e}",
                missed.other()
            )
        })
    }

    fn event(&self, kind: Kind, subject: Subject) -> Event {
        let ev = Event::new(kind);
        match self.path_of(subject) {
            Some(p) => ev.path(&p),
            None => ev,
        }
    }

    /// Takes `side` out of service after `op` failed; records it (on_down)
    /// and reports it once.
    fn side_failed(&self, side: Side, op: &str, errno: Option<i32>, subject: Subject) -> bool {
        let _t = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        if !self.health.mark_down(side, op, errno) {
            return false;
        }
        log::warn!(
            "side={side} op={op} errno={} carrying on with the {}",
            errno_label(errno),
            side.other()
        );
        if side == Side::Primary
            && let Some(f) = self.follow.get()
        {
            // With changes the mirror lacks, nothing more is read from the
            // failed primary's log: what the mirror lacks now is what is
            // lost, counted before anything else can wait (on a hung
            // mirror, for instance). The call in progress, if any, is not
            // counted as shipped. With none, the shipper ends its group.
            let mut lag = f.log.lag();
            if lag.ops > 0 {
                if let Some(s) = f.shipper.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    s.stop(Duration::ZERO);
                }
                lag = f.log.lag();
            }
            if lag.ops > 0 {
                let as_of = crate::changelog::now_ns().saturating_sub((lag.seconds * 1e9) as u64);
                self.mirror_as_of.store(as_of, Ordering::Release);
                self.lost_ops.store(lag.ops, Ordering::Release);
                log::error!(
                    "side=primary failed with {} change(s) not yet on the mirror: nothing is served; the mirror holds the state of {:.3} s ago",
                    lag.ops,
                    lag.seconds
                );
            }
        }
        if let Some(f) = &self.on_down {
            f(side, op, errno);
        }
        self.events
            .emit(self.event(Kind::SideDown, subject).side(side).op(op).errno(errno));
        true
    }

    /// Waits until any side transition in progress has been recorded.
    fn transitions_recorded(&self) {
        drop(self.transition.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// `mirrorfs fail`: takes `side` out of service by hand.
    pub fn fail(&self, side: Side) -> Result<(), String> {
        if !self.health.is_up(side) {
            return Err(format!("the {side} is already out of service"));
        }
        if !self.health.is_up(side.other()) {
            return Err(format!(
                "the {side} is the last side up: refusing to take it out of service"
            ));
        }
        if self.side_failed(side, OP_FAIL, None, Subject::Mount) {
            Ok(())
        } else {
            Err(format!(
                "the {side} could not be taken out of service: the {} is not up",
                side.other()
            ))
        }
    }

    /// Drops `thing` (open files) on the closer thread, off the request
    /// path: closing a file on a hung FUSE or network side waits for it (the
    /// kernel's FLUSH cannot be interrupted).
    pub fn retire<T: Send + 'static>(&self, thing: T) {
        if let Err(e) = self.retired.send(Box::new(thing)) {
            // The closer is gone only at exit; leak rather than block.
            std::mem::forget(e.into_inner());
        }
    }

    /// Swaps in a freshly opened root for a side that is out of service (a
    /// returning network or removable volume is a new mount).
    pub fn replace_volume(&self, side: Side, v: Volume) {
        *self.vols[side.index()].write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(v));
    }

    /// Closes a side's file on that side's lane, never in the caller's
    /// thread: a close is a call on the side like any other, and on a hung
    /// FUSE or network side it blocks (the kernel's FLUSH cannot be
    /// interrupted). A side that is down gets it on the closer thread.
    pub fn close_on<F: Send + 'static>(&self, side: Side, fd: F) {
        if !self.health.takes_changes(side) {
            return self.retire(fd);
        }
        self.queue(side, Box::new(move || drop(fd)));
    }

    /// Puts `job` on `side`'s lane.
    fn queue(&self, side: Side, job: Job) {
        self.lanes[side.index()].send(job);
    }

    pub fn volume(&self, side: Side) -> io::Result<Arc<Volume>> {
        self.vols[side.index()]
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(eio)
    }

    pub fn divergences(&self) -> u64 {
        self.divergences.load(Ordering::Relaxed)
    }

    /// Paths recorded as out of sync between the sides.
    pub fn pending_paths(&self) -> usize {
        Side::BOTH
            .iter()
            .filter_map(|s| self.journal(*s))
            .map(PathLog::len)
            .sum()
    }

    /// The side that answers reads: the primary while it is up.
    pub fn reader(&self) -> Side {
        if self.health.is_up(Side::Primary) {
            Side::Primary
        } else {
            Side::Mirror
        }
    }

    fn serves(&self, side: Side, effect: Effect) -> bool {
        if side == Side::Mirror && self.following().is_some() {
            // The shipper brings the mirror every change, in order.
            return false;
        }
        serves(&self.health, side, effect)
    }

    /// Serves one request in this thread (a FUSE thread): the primary's
    /// half of its operations may run inline, and if one hangs past
    /// `side_timeout`, `flight`'s rescue job answers it from the mirror.
    pub fn serve<R>(&self, flight: Arc<inline::Flight>, f: impl FnOnce() -> R) -> R {
        self.watch.serve(flight, f)
    }

    /// Starts the watchdog of inline calls; until then every side call
    /// goes to a lane. A side whose inline call hangs while the other side
    /// is up is taken down (ETIMEDOUT), and the request is answered again:
    /// - a hung primary: from the mirror (`noswitch`: EIO);
    /// - a hung mirror: with the primary's result, which was parked before
    ///   the mirror's half started, settled as the mirror's timeout (so
    ///   `noswitch` answers EIO there).
    pub fn start_watchdog(self: &Arc<Engine>) -> io::Result<()> {
        self.watch
            .clone()
            .run(Arc::downgrade(self), |engine: &Engine, op, side| {
                if !engine.health.is_up(side.other()) {
                    return None; // the last side up has no deadline
                }
                engine.health.count_error(side, op);
                engine.side_failed(side, op, Some(libc::ETIMEDOUT), Subject::Mount);
                if engine.health.is_up(side) {
                    return None;
                }
                Some(match (side, engine.config.policy) {
                    (Side::Primary, Policy::NoSwitch) => inline::Rescue::Fail(libc::EIO),
                    _ => inline::Rescue::Rerun,
                })
            })
    }

    /// Queues `f` on `side`'s lane; false if the side is out of service.
    /// A change also goes to a side being resynced; anything else does not.
    fn dispatch<T: Send + 'static>(
        &self,
        side: Side,
        effect: Effect,
        f: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
        tx: Results<T>,
    ) -> bool {
        let Ok(vol) = self.volume(side) else {
            return false;
        };
        if !self.serves(side, effect) {
            return false;
        }
        let health = self.health.clone();
        let job: Job = Box::new(move || {
            // Checked again here: the side may have gone down while queued.
            let r = serves(&health, side, effect).then(|| f(&vol));
            tx.send((side, r));
        });
        self.queue(side, job);
        true
    }

    /// Runs `f` on `side`'s lane and waits for it at most `side_timeout`; a
    /// side that does not answer in time is taken out of service. For the
    /// resyncer, which must never hang on the side it is catching up.
    pub fn on_side<T: Send + 'static>(
        &self,
        side: Side,
        op: &str,
        f: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = handoff::channel();
        if !self.dispatch(side, Effect::Changes, f, tx) {
            return Err(eio());
        }
        let r = match rx.recv_deadline(Instant::now() + self.config.side_timeout) {
            Ok((_, Some(r))) => r,
            Ok((_, None)) => Err(eio()),
            Err(RecvTimeoutError::Timeout) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(eio()),
        };
        if let Err(e) = &r
            && is_side_failure(raw(e))
        {
            self.health.count_error(side, op);
            self.side_failed(side, op, Some(raw(e)), Subject::Mount);
        }
        r
    }

    /// Collects the results of the sides in `waiting` into `out` (which
    /// may already hold a side's result). While both sides are in play, the
    /// first to answer gives the other `side_timeout` from `start`; one that
    /// has not answered by then gets ETIMEDOUT. A side asked alone (the
    /// other is down) has no deadline: the last side's slowness is the
    /// caller's.
    fn gather<T>(
        &self,
        rx: handoff::Receiver<(Side, Option<io::Result<T>>)>,
        mut out: [Option<io::Result<T>>; 2],
        mut waiting: [bool; 2],
        start: Instant,
    ) -> [Option<io::Result<T>>; 2] {
        let both = [0, 1].map(|i| waiting[i] || out[i].is_some());
        let deadline = start + self.config.side_timeout;
        while waiting.iter().any(|w| *w) {
            let got = if both[0] && both[1] {
                match rx.recv_deadline(deadline) {
                    Err(RecvTimeoutError::Timeout) if waiting[0] && waiting[1] => {
                        // Neither answered in time: the first to answer
                        // stays, the other is the one that hung.
                        rx.recv()
                    }
                    r => r,
                }
            } else {
                rx.recv()
            };
            match got {
                Ok((side, r)) => {
                    out[side.index()] = r;
                    waiting[side.index()] = false;
                }
                Err(e) => {
                    let errno = match e {
                        RecvTimeoutError::Timeout => libc::ETIMEDOUT,
                        RecvTimeoutError::Disconnected => libc::EIO,
                    };
                    for s in Side::BOTH {
                        if waiting[s.index()] {
                            out[s.index()] = Some(Err(io::Error::from_raw_os_error(errno)));
                            waiting[s.index()] = false;
                        }
                    }
                }
            }
        }
        out
    }

    /// Runs a read on one side; a side that went down meanwhile is `None`.
    fn read_on<T: Send + 'static>(&self, op: &'static str, side: Side, f: &ReadFn<T>) -> Option<io::Result<T>> {
        if side == Side::Primary
            && let Some(inside) = self.watch.enter(op, side)
        {
            let r = match self.volume(side) {
                Ok(v) if self.health.is_up(side) => Some(f(side, &v)),
                _ => None,
            };
            // Rescued meanwhile: the rescuer answers (`read` checks).
            inside.finish();
            return r;
        }
        let (tx, rx) = handoff::channel();
        let g = f.clone();
        let asked = self.dispatch(side, Effect::Opens, move |v| g(side, v), tx);
        // A deadline only while the other side could answer instead.
        if asked && self.health.is_up(side.other()) {
            return match rx.recv_deadline(Instant::now() + self.config.side_timeout) {
                Ok((_, r)) => r,
                Err(RecvTimeoutError::Timeout) => Some(Err(io::Error::from_raw_os_error(libc::ETIMEDOUT))),
                Err(RecvTimeoutError::Disconnected) => Some(Err(eio())),
            };
        }
        if !asked {
            return None;
        }
        rx.recv().map(|(_, r)| r).unwrap_or_else(|_| Some(Err(eio())))
    }

    /// Runs a read on the reading side. A side failure or timeout on the
    /// primary takes it down and the read is retried on the mirror; the
    /// caller sees no error (unless `noswitch`).
    pub fn read<T: Send + 'static>(
        &self,
        op: &'static str,
        subject: Subject,
        f: impl Fn(Side, &Volume) -> io::Result<T> + Send + Sync + 'static,
    ) -> io::Result<T> {
        if self.stopped() || inline::abandoned() {
            return Err(eio());
        }
        let f: ReadFn<T> = Arc::new(f);
        let side = self.reader();
        let first = self.read_on(op, side, &f);
        if inline::abandoned() {
            // The watchdog took this request over; the rescuer answers.
            return Err(eio());
        }
        match first {
            Some(Err(e)) if side == Side::Primary && is_side_failure(raw(&e)) => {
                self.health.count_error(Side::Primary, op);
                self.side_failed(Side::Primary, op, Some(raw(&e)), subject);
                if self.config.policy == Policy::NoSwitch || self.health.is_up(Side::Primary) {
                    return Err(if self.config.policy == Policy::NoSwitch {
                        eio()
                    } else {
                        e
                    });
                }
                self.read_on(op, Side::Mirror, &f).unwrap_or_else(|| Err(eio()))
            }
            Some(Err(e)) => {
                if is_side_failure(raw(&e)) {
                    self.health.count_error(side, op);
                }
                Err(e)
            }
            Some(r) => r,
            // The primary went down while the read was queued.
            None if side == Side::Primary => {
                self.transitions_recorded();
                self.read_on(op, Side::Mirror, &f).unwrap_or_else(|| Err(eio()))
            }
            None => Err(eio()),
        }
    }

    /// Runs an advisory read on `side` if it is up and answers within
    /// `limit`; nothing is decided from its outcome.
    pub fn peek<T: Send + 'static>(
        &self,
        side: Side,
        limit: Duration,
        f: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = handoff::channel();
        if !self.dispatch(side, Effect::Opens, f, tx) {
            return None;
        }
        match rx.recv_deadline(Instant::now() + limit) {
            Ok((_, Some(Ok(v)))) => Some(v),
            _ => None,
        }
    }

    /// True when changes are refused: fail-stop (`noswitch`) with a side
    /// out of service.
    pub fn changes_refused(&self) -> bool {
        self.config.policy == Policy::NoSwitch && Side::BOTH.iter().any(|s| !self.health.takes_changes(*s))
    }

    /// Runs a change on every side that is up: `pf` on the primary, `mf`
    /// on the mirror (see `on_both`).
    pub fn change2<T: Send + 'static>(
        &self,
        pace: Pace,
        subject: Subject,
        pf: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
        mf: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
    ) -> Pair<T> {
        self.on_both(Effect::Changes, pace, subject, pf, mf)
    }

    /// Runs `pf` and `mf` on the sides that are up. For `Effect::Changes`,
    /// fail-stop refuses before touching anything, so that no change lands
    /// on one side only; opening a file for reading is not refused.
    ///
    /// A change is first put in the write-intent record while both sides
    /// take changes, so that a crash before both have it is repaired at the
    /// next mount.
    ///
    /// Where the halves run: the primary's in this thread when it may (see
    /// `inline`), from the write-intent record to its result, under the
    /// watchdog; then the mirror's, in this thread too and under the same
    /// deadline (`Pace::Sequential`), or on its lane, started before the
    /// primary's (`Pace::Concurrent`). Where no inline call is allowed
    /// (past the budget, the primary out of service, in a rescuer), both
    /// go to their lanes.
    pub fn on_both<T: Send + 'static>(
        &self,
        effect: Effect,
        pace: Pace,
        subject: Subject,
        pf: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
        mf: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
    ) -> Pair<T> {
        if effect == Effect::Changes && self.changes_refused() || inline::abandoned() {
            // (Abandoned: this thread's request was taken over by a
            // rescuer; nothing more of it may reach a side.)
            return Pair::refused(effect);
        }
        if inline::rescuing()
            && let Some(f) = inline::current()
        {
            return self.take_over(&f, effect, subject, pf, mf);
        }
        let pass = self.gate.pass();
        let op = if effect == Effect::Changes { OP_CHANGE } else { OP_OPEN };
        let inside = if self.serves(Side::Primary, effect) {
            self.watch.enter(op, Side::Primary)
        } else {
            None
        };
        let Some(inside) = inside else {
            if !self.record_intent(effect, subject) {
                return Pair::refused(effect);
            }
            return self.on_lanes(effect, pass, pf, mf);
        };
        // Parked, so that a rescuer can take it over from a hung thread.
        let flight = inside.flight.clone();
        flight.park_pass(pass);
        if !self.record_intent(effect, subject) {
            if inside.finish() {
                drop(flight.take_pass());
            }
            return Pair::refused(effect);
        }
        let start = Instant::now();
        let mf = match pace {
            Pace::Sequential => Some(mf),
            Pace::Concurrent => {
                let started = flight.start_mirror(|| {
                    let (tx, rx) = handoff::channel();
                    let asked = self.dispatch(Side::Mirror, effect, mf, tx);
                    Half::OnLane(rx, asked)
                });
                if !started {
                    // A rescuer took the change over while the record was written.
                    inside.finish();
                    return Pair::refused(effect);
                }
                None
            }
        };
        // Checked again: the primary may have gone down meanwhile.
        let p = match self.volume(Side::Primary) {
            Ok(v) if self.serves(Side::Primary, effect) => Some(pf(&v)),
            _ => None,
        };
        let since = inside.since();
        if !inside.finish() {
            // Rescued: the rescuer answers; this result is dropped.
            return Pair::refused(effect);
        }
        let results = match mf {
            Some(mf) => self.mirror_after(&flight, op, since, start, effect, p, mf),
            None => match flight.take_mirror::<Half<T>>() {
                Some(Half::OnLane(rx, asked)) => Some(self.gather(rx, [p, None], [false, asked], start)),
                _ => None,
            },
        };
        match (results, flight.take_pass()) {
            (Some(results), Some(pass)) => Pair {
                results,
                refused: false,
                effect,
                pass: Some(pass),
            },
            _ => Pair::refused(effect),
        }
    }

    /// A rescuer serving a request again takes over what the hung thread
    /// holds: the pass, and the change's halves as far as they went (none
    /// is run twice). A hung primary's change is answered by the mirror's
    /// half under way on its lane, or run on the mirror now; a hung
    /// mirror's, by the primary's result, with the mirror timed out.
    fn take_over<T: Send + 'static>(
        &self,
        flight: &inline::Flight,
        effect: Effect,
        subject: Subject,
        pf: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
        mf: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
    ) -> Pair<T> {
        let pass = flight.take_pass().unwrap_or_else(|| self.gate.pass());
        let results = match flight.claim_mirror::<Half<T>>() {
            Some(Half::OnLane(rx, asked)) => self.gather(rx, [None, None], [false, asked], Instant::now()),
            Some(Half::PrimaryDone(p)) => [p, Some(Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)))],
            None => {
                if !self.record_intent(effect, subject) {
                    return Pair::refused(effect);
                }
                return self.on_lanes(effect, pass, pf, mf);
            }
        };
        Pair {
            results,
            refused: false,
            effect,
            pass: Some(pass),
        }
    }

    /// The mirror's half of a change whose primary half ran inline, run in
    /// this thread under the request's deadline (`since`). The primary's
    /// result `p` is parked first, so that if the mirror hangs, a rescuer
    /// answers with it. Past the inline budget the half goes to the lane.
    /// None: a rescuer took the request over.
    #[allow(clippy::too_many_arguments)]
    fn mirror_after<T: Send + 'static>(
        &self,
        flight: &inline::Flight,
        op: &'static str,
        since: u64,
        start: Instant,
        effect: Effect,
        p: Option<io::Result<T>>,
        mf: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
    ) -> Option<[Option<io::Result<T>>; 2]> {
        let v = match self.volume(Side::Mirror) {
            Ok(v) if self.serves(Side::Mirror, effect) => v,
            _ => return Some([p, None]),
        };
        if !flight.start_mirror(|| Half::PrimaryDone(p)) {
            return None;
        }
        // Past the budget, the half is handed back for the lane.
        let m = match self.watch.resume(op, Side::Mirror, since) {
            Some(inside) => {
                let m = mf(&v);
                if !inside.finish() {
                    return None; // rescued while the mirror hung
                }
                Ok(m)
            }
            None => Err(mf),
        };
        let Some(Half::PrimaryDone(p)) = flight.take_mirror::<Half<T>>() else {
            return None;
        };
        match m {
            Ok(m) => Some([p, Some(m)]),
            Err(mf) => {
                let (tx, rx) = handoff::channel();
                let asked = self.dispatch(Side::Mirror, effect, mf, tx);
                Some(self.gather(rx, [p, None], [false, asked], start))
            }
        }
    }

    /// Both halves on their lanes, concurrently.
    fn on_lanes<T: Send + 'static>(
        &self,
        effect: Effect,
        pass: Pass,
        pf: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
        mf: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static,
    ) -> Pair<T> {
        let start = Instant::now();
        let (tx, rx) = handoff::channel();
        let mirror = self.dispatch(Side::Mirror, effect, mf, tx.clone());
        let primary = self.dispatch(Side::Primary, effect, pf, tx);
        Pair {
            results: self.gather(rx, [None, None], [primary, mirror], start),
            refused: false,
            effect,
            pass: Some(pass),
        }
    }

    /// Puts a change in the write-intent record while both sides take
    /// changes; false if that fails and the change must be refused.
    fn record_intent(&self, effect: Effect, subject: Subject) -> bool {
        if effect != Effect::Changes || !Side::BOTH.iter().all(|s| self.health.takes_changes(*s)) {
            return true;
        }
        if self.following().is_some() {
            // The change log is the record of what the mirror lacks.
            return true;
        }
        let Some(intent) = self.intent() else {
            return true;
        };
        let r = match subject {
            // A file created in this epoch: by its directory (see
            // `Intent::record_new_file`).
            Subject::Inode(ino) if intent.is_new(ino) => match self.path_of(subject) {
                Some(p) => intent.record_new_file(&p),
                None => Ok(()),
            },
            _ => {
                let paths = self.intent_paths(subject);
                let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
                intent.record(&refs)
            }
        };
        // The record is on the primary: failing to write it is the
        // primary failing, under the same rules as any operation on it
        // (the last side up is never taken down: its error is the caller's).
        let Err(e) = r else {
            return true;
        };
        let errno = raw(&e);
        log::error!("side=primary cannot write the write-intent record: {e}");
        self.health.count_error(Side::Primary, OP_INTENT);
        is_side_failure(errno) && self.side_failed(Side::Primary, OP_INTENT, Some(errno), subject)
    }

    /// `change2` with one closure for both sides; it is told which side it runs on.
    pub fn change<T: Send + 'static>(
        &self,
        pace: Pace,
        subject: Subject,
        f: impl Fn(Side, &Volume) -> io::Result<T> + Send + Sync + 'static,
    ) -> Pair<T> {
        self.each(Effect::Changes, pace, subject, f)
    }

    /// `on_both` with one closure for both sides.
    pub fn each<T: Send + 'static>(
        &self,
        effect: Effect,
        pace: Pace,
        subject: Subject,
        f: impl Fn(Side, &Volume) -> io::Result<T> + Send + Sync + 'static,
    ) -> Pair<T> {
        let f = Arc::new(f);
        let g = f.clone();
        self.on_both(
            effect,
            pace,
            subject,
            move |v| f(Side::Primary, v),
            move |v| g(Side::Mirror, v),
        )
    }

    /// Settles a pair of results: applies the decision to health, records
    /// what a side missed and reports divergence, and returns the answering
    /// side (whose value is in `pair`) or the errno.
    ///
    /// A side being resynced never decides the answer: whatever it did not
    /// do, it missed, and its failure takes it down again. A side that
    /// missed a change has it journaled, durably, before the caller is
    /// answered.
    pub fn settle<T>(&self, op: &str, subject: Subject, pair: &Pair<T>) -> io::Result<Side> {
        if pair.refused {
            return Err(eio());
        }
        let mut r = [SideResult::of(&pair.results[0]), SideResult::of(&pair.results[1])];
        let mut missed = [false, false];
        let changes = pair.effect == Effect::Changes;
        for side in Side::BOTH {
            let i = side.index();
            if let SideResult::Err(e) = r[i]
                && is_side_failure(e)
            {
                self.health.count_error(side, op);
            }
            let other_ok = r[side.other().index()] == SideResult::Ok;
            if self.health.state(side) == SideState::Resyncing {
                if let SideResult::Err(e) = r[i]
                    && is_side_failure(e)
                {
                    self.side_failed(side, op, Some(e), subject);
                }
                missed[i] = changes && (r[i] != SideResult::Ok || !other_ok);
                r[i] = SideResult::Skipped;
            } else if r[i] == SideResult::Err(NOT_ATTACHED) {
                missed[i] = changes;
                r[i] = SideResult::Skipped;
            } else if r[i] == SideResult::Skipped {
                // In async mode the log, not the journal, holds what the
                // mirror lacks.
                missed[i] = changes && !(side == Side::Mirror && self.following().is_some());
            }
        }
        let d = resolve(r[0], r[1], self.config.policy);
        if let Some(side) = d.mark_down {
            let errno = match r[side.index()] {
                SideResult::Err(e) => e,
                _ => libc::EIO,
            };
            self.side_failed(side, op, Some(errno), subject);
            missed[side.index()] = changes;
        }
        if let Subject::Two(from, to) | Subject::Moved(from, to) = subject
            && let Some(target) = Side::BOTH
                .into_iter()
                .find(|s| self.health.state(*s) == SideState::Resyncing)
        {
            // A rename carries the target's copy along, whatever it held:
            // the whole destination tree is caught up again.
            self.journal_missed(target, &[from.to_path_buf(), crate::journal::tree(to)])?;
        }
        if missed.iter().any(|m| *m) {
            self.transitions_recorded();
            let paths = self.paths_of(subject);
            for side in Side::BOTH {
                if missed[side.index()] && !missed[side.other().index()] {
                    self.journal_missed(side, &paths)?;
                }
            }
            if Side::BOTH.iter().all(|s| self.health.is_up(*s)) {
                // Both are up, yet one missed this: catch it up now.
                self.want_resync();
            }
        }
        if d.diverged {
            self.diverged(op, subject, r[0], r[1]);
        }
        match d.answer {
            Answer::From(side) => Ok(side),
            Answer::Errno(e) => Err(io::Error::from_raw_os_error(e)),
        }
    }

    fn diverged(&self, op: &str, subject: Subject, p: SideResult, m: SideResult) {
        self.divergences.fetch_add(1, Ordering::Relaxed);
        let show = |r: SideResult| match r {
            SideResult::Ok => "ok".to_string(),
            SideResult::Err(e) => errno_name(e),
            SideResult::Skipped => "skipped".to_string(),
        };
        let detail = format!("primary={} mirror={}", show(p), show(m));
        log::warn!("op={op} diverged {detail}");
        // Resynced from the primary, which answered.
        let paths = self.paths_of(subject);
        if self.journal_missed(Side::Mirror, &paths).is_ok() {
            self.want_resync();
        }
        self.events
            .emit(self.event(Kind::Diverged, subject).op(op).detail(detail));
    }

    /// `change` then `settle`, returning the answering side's value.
    pub fn apply<T: Send + 'static>(
        &self,
        op: &str,
        pace: Pace,
        subject: Subject,
        f: impl Fn(Side, &Volume) -> io::Result<T> + Send + Sync + 'static,
    ) -> io::Result<T> {
        let mut pair = self.change(pace, subject, f);
        let side = self.settle(op, subject, &pair)?;
        pair.take_ok(side).ok_or_else(eio)
    }
}

/// The engine as the shipper sees it.
struct EngineMirror(std::sync::Weak<Engine>);

impl shipper::Mirror for EngineMirror {
    fn volume(&self) -> Option<Arc<Volume>> {
        let e = self.0.upgrade()?;
        if !e.health.is_up(Side::Mirror) {
            return None;
        }
        e.volume(Side::Mirror).ok()
    }

    fn failed(&self, op: &'static str, errno: i32, path: &Path) {
        if let Some(e) = self.0.upgrade() {
            e.health.count_error(Side::Mirror, op);
            e.side_failed(Side::Mirror, op, Some(errno), Subject::Path(path));
        }
    }

    fn caught_up(&self) {
        // Writers are no longer held: the bound is met, whoever comes next.
        if let Some(e) = self.0.upgrade()
            && let Some(f) = e.follow.get()
            && f.exceeded.swap(false, Ordering::AcqRel)
        {
            e.lag_event(false, f.log.lag());
        }
    }

    fn diverged(&self, op: &'static str, errno: i32, path: &Path) {
        let Some(e) = self.0.upgrade() else {
            return;
        };
        e.divergences.fetch_add(1, Ordering::Relaxed);
        let detail = format!("primary=ok mirror={}", errno_name(errno));
        log::warn!("op={op} path={} diverged {detail} (shipping)", path.display());
        // Caught up from the primary at the next resync.
        let _ = e.journal_missed(Side::Mirror, &[path.to_path_buf()]);
        e.events
            .emit(e.event(Kind::Diverged, Subject::Path(path)).op(op).detail(detail));
    }
}

#[cfg(test)]
mod engine_tests {
    use super::*;

    fn engine(dirs: &[tempfile::TempDir; 2], timeout: Duration) -> Engine {
        let health = Arc::new(Health::default());
        let events = Arc::new(Events::start([None, None], health.clone(), None).unwrap());
        let v = |i: usize, side| Some(Volume::open(side, dirs[i].path()).unwrap());
        Engine::new(
            v(0, Side::Primary),
            v(1, Side::Mirror),
            health,
            events,
            EngineConfig {
                side_timeout: timeout,
                policy: Policy::Switch,
                threads: 2,
                inline_threads: 2,
                inline_budget: 1,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_hung_side_is_timed_out_and_the_other_answers() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let e = engine(&dirs, Duration::from_millis(200));
        let start = Instant::now();
        let r = e.apply("write", Pace::Concurrent, Subject::Path(Path::new("f")), |side, _| {
            if side == Side::Mirror {
                thread::sleep(Duration::from_secs(3));
            }
            Ok(side)
        });
        assert_eq!(r.unwrap(), Side::Primary);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        assert_eq!(e.health.state(Side::Mirror), SideState::Down);
        assert_eq!(e.health.down_info(Side::Mirror).unwrap().errno, Some(libc::ETIMEDOUT));
        assert_eq!(e.health.counters(Side::Mirror).write, 1);
        // The last side has no deadline: a slow primary is waited for.
        let r = e.apply("write", Pace::Concurrent, Subject::Path(Path::new("f")), |side, _| {
            thread::sleep(Duration::from_millis(400));
            Ok(side)
        });
        assert_eq!(r.unwrap(), Side::Primary);
    }

    /// What `serve_hung_change` saw.
    struct HungRun {
        engine: Arc<Engine>,
        /// Who answered first, and with which side's value, how long after
        /// the start.
        who: &'static str,
        answer: io::Result<Side>,
        took: Duration,
        /// How many times each side ran the change.
        runs: [u64; 2],
        /// The hung thread's own late result.
        late: io::Result<Side>,
    }

    /// Serves one change through the watchdog's rescue machinery, as a
    /// FUSE thread does, with `hung` sleeping 1.5 s in its half (timeout
    /// 200 ms).
    fn serve_hung_change(pace: Pace, hung: Side) -> HungRun {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let e = Arc::new(engine(&dirs, Duration::from_millis(200)));
        e.start_watchdog().unwrap();
        let runs = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let handler = {
            let (e, runs) = (e.clone(), runs.clone());
            Arc::new(move || {
                let runs = runs.clone();
                e.apply("write", pace, Subject::Path(Path::new("f")), move |side, _| {
                    runs[side.index()].fetch_add(1, Ordering::SeqCst);
                    if side == hung {
                        // Only the hung thread ever gets here.
                        thread::sleep(Duration::from_millis(1500));
                    }
                    Ok(side)
                })
            })
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (h, rescued) = (handler.clone(), tx.clone());
        let flight = inline::Flight::new(Box::new(move |how| {
            assert!(matches!(how, inline::Rescue::Rerun));
            rescued.send(("rescuer", h())).unwrap();
        }));
        let start = Instant::now();
        let (e2, late) = (e.clone(), tx);
        let t = thread::spawn(move || {
            let r = e2.serve(flight, || handler());
            late.send(("hung thread", r)).unwrap();
        });
        let (who, answer) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let took = start.elapsed();
        let (last, late) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(last, "hung thread");
        t.join().unwrap();
        HungRun {
            engine: e,
            who,
            answer,
            took,
            runs: [0, 1].map(|i| runs[i].load(Ordering::SeqCst)),
            late,
        }
    }

    /// Serves a change with `hung` hanging (`serve_hung_change`) and checks
    /// that a rescuer answered it from the other side within the deadline,
    /// that `hung` is down with ETIMEDOUT, that the hung thread's own late
    /// answer was dropped, and that each side ran the change once.
    fn assert_answered_by_the_other_side(pace: Pace, hung: Side) -> Arc<Engine> {
        let run = serve_hung_change(pace, hung);
        let what = format!("{hung} hung, {pace:?}");
        assert_eq!(run.who, "rescuer", "{what}");
        assert_eq!(run.answer.unwrap(), hung.other(), "{what}");
        assert!(run.took < Duration::from_millis(1200), "{what}: {:?}", run.took);
        assert_eq!(run.engine.health.state(hung), SideState::Down, "{what}");
        assert_eq!(
            run.engine.health.down_info(hung).unwrap().errno,
            Some(libc::ETIMEDOUT),
            "{what}"
        );
        // The hung thread's own answer is dropped: it only says it was abandoned.
        assert!(run.late.is_err(), "{what}");
        assert_eq!(run.runs, [1, 1], "{what}: each side ran the change once");
        run.engine
    }

    #[test]
    fn a_change_hung_in_the_primary_is_answered_from_the_mirror_which_runs_it_once() {
        for pace in [Pace::Sequential, Pace::Concurrent] {
            assert_answered_by_the_other_side(pace, Side::Primary);
        }
    }

    #[test]
    fn a_change_hung_in_the_mirror_is_answered_with_the_primarys_result_run_once() {
        let e = assert_answered_by_the_other_side(Pace::Sequential, Side::Mirror);
        assert!(e.health.is_up(Side::Primary));
    }

    #[test]
    fn a_failing_primary_read_is_answered_by_the_mirror() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let e = engine(&dirs, Duration::from_secs(5));
        let r = e.read("read", Subject::Inode(5), |side, _| {
            if side == Side::Primary {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(side)
            }
        });
        assert_eq!(r.unwrap(), Side::Mirror);
        assert_eq!(e.health.state(Side::Primary), SideState::Down);
        assert_eq!(e.health.counters(Side::Primary).read, 1);
        assert_eq!(e.reader(), Side::Mirror);
        assert!(e.fail(Side::Mirror).is_err(), "the last side cannot be failed");
    }

    #[test]
    fn divergence_is_recorded_with_its_path() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let e = engine(&dirs, Duration::from_secs(5));
        let j = tempfile::tempdir().unwrap();
        e.set_journal(Side::Primary, PathLog::open(j.path().join("journal")).unwrap());
        let r = e.apply(
            "unlink",
            Pace::Sequential,
            Subject::Path(Path::new("d/x")),
            |side, _| match side {
                Side::Primary => Ok(()),
                Side::Mirror => Err(io::Error::from_raw_os_error(libc::ENOENT)),
            },
        );
        assert!(r.is_ok());
        assert_eq!(e.divergences(), 1);
        assert_eq!(e.pending_paths(), 1);
        assert!(e.health.is_up(Side::Mirror));
        let ev = e.events.recent();
        assert_eq!(ev.last().unwrap().event, Kind::Diverged);
        assert_eq!(ev.last().unwrap().path.as_deref(), Some("/d/x"));
    }
}
