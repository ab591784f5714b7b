//! The resyncer: decides when a side is caught up, and drives the copier
//! (`resync`) against the live mount.
//!
//! Owns: the resync thread, its progress for status, and the steps that
//! bring a side from DOWN (or OFF, or split) back to UP:
//!
//! 1. open the side afresh and check that it belongs to this pair (a side
//!    without an identity is a new disk: everything is copied);
//! 2. under the gate, mark it RESYNCING and drop the open files' old fds on
//!    it: from then on every change goes to it too;
//! 3. for each path in the source's journal: forget it, then reconcile it
//!    step by step, each step (one entry, one chunk) under the gate, so no
//!    write through the mount falls between reading the source and writing
//!    the target; a regular file is re-attached to its open handles as soon
//!    as it exists on the target;
//! 4. under the gate, once the journal is empty: re-attach every open file,
//!    mark the side UP, and clear the journals and the stale records.
//!
//! A failure of the target takes it down again; the journal still holds
//! everything it lacks. Knows nothing of FUSE beyond the open files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::events::{Event, Kind, utc};
use crate::health::{OP_FAIL, SideState};
use crate::journal::PathLog;
use crate::meta;
use crate::nodes::OpenFiles;
use crate::recovery::resync::{Access, Copier, Depth, Stats, measure};
use crate::spec::{MountSpec, Side};
use crate::volume::Volume;

/// How often progress is reported as an event.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// A resync in progress, as status shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub side: Side,
    pub started: String,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_copied: u64,
    /// Bytes per second, of `bytes_done`.
    pub rate: u64,
    pub eta_seconds: Option<u64>,
}

/// The last resync that ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResyncResult {
    pub side: Side,
    pub finished: String,
    pub ok: bool,
    pub seconds: f64,
    pub files: u64,
    pub files_changed: u64,
    pub bytes_compared: u64,
    pub bytes_copied: u64,
    #[serde(default)]
    pub error: Option<String>,
}

struct Running {
    side: Side,
    started: SystemTime,
    clock: Instant,
    files_total: u64,
    bytes_total: u64,
    stats: Arc<Stats>,
}

/// What status reads of the resyncer.
#[derive(Default)]
pub struct Progress {
    running: Mutex<Option<Running>>,
    last: Mutex<Option<ResyncResult>>,
    /// Bytes copied by the resyncs that have ended.
    copied: AtomicU64,
}

impl Progress {
    pub fn current(&self) -> Option<ResyncStatus> {
        let r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let r = r.as_ref()?;
        let secs = r.clock.elapsed().as_secs_f64().max(0.001);
        let done = r.stats.bytes_compared.load(Ordering::Relaxed);
        let rate = (done as f64 / secs) as u64;
        Some(ResyncStatus {
            side: r.side,
            started: utc(r.started),
            files_done: r.stats.entries.load(Ordering::Relaxed),
            files_total: r.files_total,
            bytes_done: done,
            bytes_total: r.bytes_total,
            bytes_copied: r.stats.bytes_copied.load(Ordering::Relaxed),
            rate,
            eta_seconds: (rate > 0).then(|| r.bytes_total.saturating_sub(done) / rate),
        })
    }

    /// Bytes copied by every resync since the mount, the running one too.
    pub fn bytes_copied(&self) -> u64 {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let now = running
            .as_ref()
            .map_or(0, |r| r.stats.bytes_copied.load(Ordering::Relaxed));
        self.copied.load(Ordering::Relaxed) + now
    }

    pub fn last(&self) -> Option<ResyncResult> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `mirrorfs resync` as the daemon receives it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manual {
    /// Compare the whole tree, not only the journal.
    pub full: bool,
    /// The winner of a split.
    pub from: Option<Side>,
    /// Paths to catch up from the primary (verify --repair).
    #[serde(default)]
    pub paths: Vec<PathBuf>,
}

type Done = Sender<Result<String, String>>;

/// The first and longest wait before an automatic resync that failed is
/// tried again (doubling in between).
const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// When automatic resyncs may be tried.
#[derive(Default)]
struct Retry {
    /// The first look (at mount) has happened.
    started: bool,
    /// Per side: when the last automatic attempt failed, and the back-off.
    failed: [Option<(SystemTime, Duration)>; 2],
}
type Requests = (Sender<(Manual, Done)>, Receiver<(Manual, Done)>);

/// The resyncer of one mount.
pub struct Catchup {
    engine: Arc<Engine>,
    files: OpenFiles,
    spec: MountSpec,
    auto: bool,
    pub progress: Arc<Progress>,
    manual: Requests,
}

/// Online access for the copier: steps under the gate, the target on its
/// lane with `side_timeout`.
struct Online<'a> {
    engine: &'a Engine,
    files: &'a OpenFiles,
    src: Arc<Volume>,
    target: Side,
}

impl Access for Online<'_> {
    fn src(&self) -> &Volume {
        &self.src
    }

    fn step<T>(&self, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        let _x = self.engine.exclusive();
        if !self.engine.health.takes_changes(self.target) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        f()
    }

    fn dst<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Volume) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        self.engine.on_side(self.target, "resync", f)
    }

    fn attach(&self, rel: &Path) -> std::io::Result<()> {
        self.files.reattach_path(self.target, self.engine, rel)
    }
}

fn fail(msg: String) -> Result<String, String> {
    log::warn!("resync: {msg}");
    Err(msg)
}

impl Catchup {
    pub fn new(engine: Arc<Engine>, files: OpenFiles, spec: MountSpec, auto: bool) -> Catchup {
        Catchup {
            engine,
            files,
            spec,
            auto,
            progress: Arc::new(Progress::default()),
            manual: crossbeam_channel::unbounded(),
        }
    }

    /// Queues a manual resync; the receiver gets its outcome.
    pub fn request(&self, m: Manual) -> Receiver<Result<String, String>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.manual.0.send((m, tx));
        rx
    }

    /// The resync thread: waits for work (a side that answers its probe, a
    /// divergence, a manual request) and does it, one resync at a time.
    pub fn run(self: Arc<Self>) {
        let wanted = self.engine.resync_wanted();
        let mut retry = Retry::default();
        loop {
            crossbeam_channel::select! {
                recv(self.manual.1) -> m => {
                    let Ok((m, done)) = m else { return };
                    let r = self.manual(&m);
                    let _ = done.send(r);
                }
                recv(wanted) -> w => {
                    if w.is_err() {
                        return;
                    }
                    while wanted.try_recv().is_ok() {}
                    self.automatic(&mut retry);
                }
            }
        }
    }

    fn automatic(&self, retry: &mut Retry) {
        let startup = !std::mem::replace(&mut retry.started, true);
        if self.engine.split() {
            return;
        }
        let h = &self.engine.health;
        for side in Side::BOTH {
            if h.state(side) != SideState::Down || !h.is_up(side.other()) {
                continue;
            }
            // A side taken out by hand (`mirrorfs fail`) stays out until
            // `mirrorfs resync`, as with mdadm --fail and --re-add.
            if h.down_info(side).is_some_and(|d| d.op == OP_FAIL) {
                return;
            }
            // A side left out at mount is tried at once; otherwise only once
            // it answers a probe made after the last failed attempt, and
            // not before the back-off has passed.
            let i = side.index();
            let answered = h
                .probe(side)
                .is_some_and(|p| p.errno.is_none() && retry.failed[i].is_none_or(|(at, _)| p.at > at));
            let waited = retry.failed[i].is_none_or(|(at, backoff)| at.elapsed().unwrap_or_default() >= backoff);
            if self.auto && (startup || (answered && waited)) {
                match self.resync(side, false) {
                    Ok(_) => retry.failed[i] = None,
                    Err(_) => {
                        let backoff = retry.failed[i].map_or(RETRY_MIN, |(_, b)| (b * 2).min(RETRY_MAX));
                        retry.failed[i] = Some((SystemTime::now(), backoff));
                    }
                }
            }
            return;
        }
        // Both up: paths that diverged are caught up from the primary.
        if Side::BOTH.iter().all(|s| h.is_up(*s)) && self.engine.journal(Side::Primary).is_some_and(|j| !j.is_empty()) {
            let _ = self.resync(Side::Mirror, false);
        }
    }

    fn manual(&self, m: &Manual) -> Result<String, String> {
        let h = &self.engine.health;
        if self.engine.split() {
            let Some(winner) = m.from else {
                return Err("the sides are split (both took changes the other lacks): \
                            name the winner with --from primary|mirror"
                    .into());
            };
            self.engine.resolve_split(winner);
            return self.resync(winner.other(), m.full);
        }
        if let Some(from) = m.from
            && !h.is_up(from)
        {
            return Err(format!("the {from} is not up: it cannot be the source"));
        }
        if !m.paths.is_empty() {
            if !Side::BOTH.iter().all(|s| h.is_up(*s)) {
                return Err("both sides must be up to repair paths".into());
            }
            let j = self.engine.journal(Side::Primary).ok_or("no journal on the primary")?;
            let refs: Vec<&Path> = m.paths.iter().map(PathBuf::as_path).collect();
            j.record(&refs)
                .map_err(|e| format!("journaling the paths to repair: {e}"))?;
            return self.resync(Side::Mirror, false);
        }
        let target = Side::BOTH
            .into_iter()
            .find(|s| matches!(h.state(*s), SideState::Down | SideState::Off));
        match target {
            Some(t) if m.from.is_some_and(|f| f == t) => {
                Err(format!("the {t} is out of service: it cannot be the source"))
            }
            Some(t) => self.resync(t, m.full),
            None if m.full => self.resync(m.from.map_or(Side::Mirror, Side::other), true),
            None if self.engine.pending_paths() > 0 => self.resync(Side::Mirror, false),
            None => Ok("both sides are up and nothing is pending: nothing to resync".into()),
        }
    }

    /// Opens the target afresh within `side_timeout`, and checks it belongs
    /// to this pair. Returns the volume and whether everything must be
    /// copied (a new side).
    fn open_target(&self, target: Side) -> Result<(Volume, bool), String> {
        let path = self.spec.side(target).to_path_buf();
        let peer = self.spec.side(target.other()).to_path_buf();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let p = path.clone();
        std::thread::Builder::new()
            .name(format!("open-{target}"))
            .spawn(move || {
                let r = (|| -> Result<(Volume, bool), String> {
                    let v = Volume::open(target, &p).map_err(|e| format!("{}: {e}", p.display()))?;
                    v.probe().map_err(|e| format!("{}: {e}", p.display()))?;
                    let had = meta::read_identity(&p).map_err(|e| e.to_string())?.is_some();
                    let roots = match target {
                        Side::Primary => [Some(p.as_path()), Some(peer.as_path())],
                        Side::Mirror => [Some(peer.as_path()), Some(p.as_path())],
                    };
                    meta::ensure_identities(roots)?;
                    Ok((v, !had))
                })();
                let _ = tx.send(r);
            })
            .map_err(|e| e.to_string())?;
        rx.recv_timeout(self.engine.side_timeout())
            .unwrap_or_else(|_| Err(format!("{} did not answer within side_timeout", path.display())))
    }

    /// Catches `target` up from the other side.
    fn resync(&self, target: Side, full: bool) -> Result<String, String> {
        let source = target.other();
        let h = &self.engine.health;
        if !h.is_up(source) {
            return fail(format!("the {source} is not up: nothing to resync the {target} from"));
        }
        let was_up = h.is_up(target);
        let mut full = full;
        if !was_up {
            let (vol, new) = match self.open_target(target) {
                Ok(v) => v,
                Err(e) => return fail(format!("the {target} cannot be resynced yet: {e}")),
            };
            full |= new;
            self.engine.replace_volume(target, vol);
        }
        let Some(src_journal) = self.engine.journal(source) else {
            return fail(format!("the {source} keeps no journal (read-only mount)"));
        };
        if self.engine.journal(target).is_none()
            && let Ok(j) = PathLog::open(meta::journal_path(self.spec.side(target)))
        {
            self.engine.set_journal(target, j);
        }
        // Everything either side lacks goes into the source's journal, so a
        // crash in the middle repeats it.
        let mut extra: Vec<PathBuf> = self
            .engine
            .journal(target)
            .map(|j| j.paths().into_iter().collect())
            .unwrap_or_default();
        if full {
            extra.push(crate::journal::tree(Path::new("")));
        }
        let refs: Vec<&Path> = extra.iter().map(PathBuf::as_path).collect();
        if let Err(e) = src_journal.record(&refs) {
            return fail(format!("journaling on the {source}: {e}"));
        }
        let src = match self.engine.volume(source) {
            Ok(v) => v,
            Err(e) => return fail(format!("the {source}: {e}")),
        };
        {
            let _x = self.engine.exclusive();
            if !was_up {
                if !h.begin_resync(target) {
                    return fail(format!(
                        "the {target} cannot be resynced now ({})",
                        h.state(target).name()
                    ));
                }
                self.files.detach(target, &self.engine);
            }
        }
        let (files_total, bytes_total) = src_journal.paths().iter().fold((0, 0), |(f, b), p| {
            let (rel, depth) = depth_of(p);
            let (nf, nb) = measure(&src, rel, depth);
            (f + nf, b + nb)
        });
        let stats = Arc::new(Stats::default());
        let clock = Instant::now();
        *self.progress.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running {
            side: target,
            started: SystemTime::now(),
            clock,
            files_total,
            bytes_total,
            stats: stats.clone(),
        });
        self.engine
            .events
            .emit(Event::new(Kind::ResyncStarted).side(target).detail(format!(
                "from the {source}: {files_total} files, {bytes_total} bytes{}",
                if full { " (full)" } else { "" }
            )));
        let r = self.copy(target, &src, src_journal, &stats, clock);
        let secs = clock.elapsed().as_secs_f64();
        {
            // Under the same lock as the running resync, so the total never dips.
            let mut running = self.progress.running.lock().unwrap_or_else(|e| e.into_inner());
            *running = None;
            self.progress
                .copied
                .fetch_add(stats.bytes_copied.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let result = ResyncResult {
            side: target,
            finished: utc(SystemTime::now()),
            ok: r.is_ok(),
            seconds: secs,
            files: stats.entries.load(Ordering::Relaxed),
            files_changed: stats.entries_changed.load(Ordering::Relaxed),
            bytes_compared: stats.bytes_compared.load(Ordering::Relaxed),
            bytes_copied: stats.bytes_copied.load(Ordering::Relaxed),
            error: r.as_ref().err().cloned(),
        };
        *self.progress.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(result.clone());
        let summary = format!(
            "{} files examined, {} changed, {} bytes compared, {} bytes copied in {:.1} s",
            result.files, result.files_changed, result.bytes_compared, result.bytes_copied, secs
        );
        match r {
            Ok(()) => {
                log::info!("side={target} resync done: {summary}");
                self.engine
                    .events
                    .emit(Event::new(Kind::ResyncDone).side(target).detail(summary.clone()));
                if !was_up {
                    self.engine
                        .events
                        .emit(Event::new(Kind::SideUp).side(target).detail("caught up by resync"));
                }
                Ok(summary)
            }
            Err(e) => {
                if h.state(target) == SideState::Resyncing {
                    h.mark_down(target, "resync", Some(libc::EIO));
                }
                self.engine.events.emit(
                    Event::new(Kind::ResyncDone)
                        .side(target)
                        .detail(format!("failed: {e} (after {summary})")),
                );
                fail(e)
            }
        }
    }

    fn copy(
        &self,
        target: Side,
        src: &Arc<Volume>,
        journal: &PathLog,
        stats: &Stats,
        clock: Instant,
    ) -> Result<(), String> {
        let access = Online {
            engine: &self.engine,
            files: &self.files,
            src: src.clone(),
            target,
        };
        let mut copier = Copier::new(&access, stats);
        let mut reported = clock;
        loop {
            while let Some(p) = journal.first() {
                journal.forget(&p);
                let (rel, depth) = depth_of(&p);
                if let Err(e) = copier.reconcile(rel, depth) {
                    // Still missing: kept for the next resync.
                    let _ = journal.record(&[&p]);
                    return Err(if self.engine.health.takes_changes(target) {
                        format!("/{}: {e}", p.display())
                    } else {
                        format!("the {target} failed during resync at /{}: {e}", p.display())
                    });
                }
                if reported.elapsed() >= PROGRESS_EVERY {
                    reported = Instant::now();
                    if let Some(s) = self.progress.current() {
                        self.engine
                            .events
                            .emit(Event::new(Kind::ResyncProgress).side(target).detail(format!(
                                "{}/{} files, {}/{} bytes, {} copied, {} B/s",
                                s.files_done, s.files_total, s.bytes_done, s.bytes_total, s.bytes_copied, s.rate
                            )));
                    }
                }
            }
            let _x = self.engine.exclusive();
            if !journal.is_empty() {
                continue;
            }
            match self.files.reattach(target, &self.engine) {
                Err(e) => return Err(format!("re-attaching open files: {e}")),
                Ok(missing) if !missing.is_empty() => {
                    let refs: Vec<&Path> = missing.iter().map(PathBuf::as_path).collect();
                    journal.record(&refs).map_err(|e| format!("journal: {e}"))?;
                    continue;
                }
                Ok(_) => {}
            }
            let h = &self.engine.health;
            if h.state(target) == SideState::Resyncing && !h.resync_done(target) {
                return Err(format!("the {target} left RESYNCING"));
            }
            if !h.is_up(target) {
                return Err(format!("the {target} went down during resync"));
            }
            for side in Side::BOTH {
                if let Some(j) = self.engine.journal(side) {
                    j.clear().map_err(|e| format!("clearing the {side}'s journal: {e}"))?;
                }
                meta::clear_stale(self.spec.side(side)).map_err(|e| format!("clearing the {side}'s state: {e}"))?;
            }
            return Ok(());
        }
    }
}

/// The path to reconcile and how deep, from a journal entry.
fn depth_of(p: &Path) -> (&Path, Depth) {
    use crate::journal::Mark;
    match crate::journal::unmark(p) {
        (rel, Mark::Tree) => (rel, Depth::Tree),
        (rel, Mark::Writes) => (rel, Depth::Writes),
        (rel, Mark::Entry) => (rel, Depth::Entry),
    }
}
