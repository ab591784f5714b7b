//! The shipper of asynchronous mode: applies the change log to the mirror,
//! in order, and records on the mirror how far it has gone.
//!
//! Owns: the shipping thread, the mirror's position record
//! (`.mirrorfs/shipped`) and the choice of when to write it. Knows nothing
//! of FUSE; what the mirror is, whether it is in service, and what a failure
//! or a divergence does are the engine's (`Mirror`).
//!
//! Groups: records are applied one call at a time, in order, so the
//! mirror's tree passes through the primary's states (a run of records on
//! one file is one call: `Run`); nothing is synced
//! inside a group (a barrier, like a data record, leaves its file owing a
//! sync: `KeptFiles`). A group ends after `BATCH` calls, right after a
//! `Rename` or `Link`, after `CHECKPOINT`, or when the log is drained; its
//! end makes the owed syncs together (on a network mirror about one round
//! trip for all of them), syncs the mirror's filesystem, then writes the
//! position (the last record, with the identity of the log it counts in)
//! in place and syncs it, and removes the log's segments before it. The
//! position moves only there: after the daemon is killed, or the mirror
//! failed, shipping resumes at most a group back, and never replays a move
//! twice (see `changelog`). What a power loss of the mirror's machine can
//! leave on its disk is part of one group, re-sent from the position.
//!
//! A failure of the mirror (a side-failure errno) stops shipping at the
//! record that failed: the engine takes the mirror down, and shipping
//! starts again from the position when it is back. A call that hangs holds
//! only this thread: `busy_for` tells the engine's watchdog how long.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use crate::changelog::{Change, KeptFiles, Log, Reader, Record};
use crate::health::is_side_failure;
use crate::volume::{self, META_DIR, Owner, SetTime, Volume};

/// The position record, in the mirror's metadata directory.
pub const POSITION: &str = "shipped";

/// The most calls in a group (a run of records is one call). Counted in
/// calls, not records: a group's end costs the same few round trips
/// however many records it closes, and with runs of about 20 records
/// (PostgreSQL's WAL) 256 records made the shipper spend most of its time
/// ending groups.
const BATCH: u64 = 256;

/// The longest a group stays open.
const CHECKPOINT: Duration = Duration::from_secs(1);

/// How long a drained shipper sleeps before it looks for more records
/// for the group it has open (and ends it if there are none): it takes
/// what came meanwhile in one read and one wake, instead of a wake per
/// record, and in fewer, longer runs. (Under pgbench over the 10 ms link,
/// 30 ms rather than 10 cut the shipper's writes from 140 to 109 a
/// second, and the runs cut short by the log's end from about 110 to 35.)
const LINGER: Duration = Duration::from_millis(30);

/// How long the idle shipper sleeps before looking at the mirror again
/// (records appended wake it at once).
const IDLE: Duration = Duration::from_millis(200);

const MAGIC: &[u8; 8] = b"mfsship1";

/// Where the mirror stands in a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub log_id: u64,
    pub seq: u64,
}

impl Position {
    fn encode(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.log_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        let sum = xxh3_64(&b[..24]);
        b[24..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Position> {
        if b.len() != 32 || &b[..8] != MAGIC || xxh3_64(&b[..24]).to_le_bytes() != b[24..32] {
            return None;
        }
        Some(Position {
            log_id: u64::from_le_bytes(b[8..16].try_into().ok()?),
            seq: u64::from_le_bytes(b[16..24].try_into().ok()?),
        })
    }
}

fn position_path() -> PathBuf {
    Path::new(META_DIR).join(POSITION)
}

/// The mirror's position, if it has one that is whole.
pub fn read_position(v: &Volume) -> io::Result<Option<Position>> {
    let fd = match v.open_file(&position_path(), libc::O_RDONLY) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut b = [0u8; 32];
    let n = volume::pread(fd.as_fd(), &mut b, 0)?;
    Ok(Position::decode(&b[..n]))
}

/// Writes the mirror's position in place (32 bytes at offset 0, never torn
/// across a page), and makes it durable if asked.
pub fn write_position(v: &Volume, pos: Position, durable: bool) -> io::Result<()> {
    put_position(open_position(v)?.as_fd(), pos, durable)
}

/// Writes `pos` through `fd`, the position record open for writing.
fn put_position(fd: std::os::fd::BorrowedFd<'_>, pos: Position, durable: bool) -> io::Result<()> {
    volume::pwrite_all(fd, &pos.encode(), 0)?;
    if durable {
        volume::fsync(fd, true)?;
    }
    Ok(())
}

/// The position record, opened for writing (made if it is not there).
fn open_position(v: &Volume) -> io::Result<OwnedFd> {
    let path = position_path();
    match v.open_file(&path, libc::O_WRONLY) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            Ok(v.create(&path, libc::O_WRONLY, 0o600, Owner { uid: 0, gid: 0 })?.0)
        }
        r => r,
    }
}

/// What the shipper needs of the engine.
pub trait Mirror: Send + Sync + 'static {
    /// The mirror, while it is in service.
    fn volume(&self) -> Option<Arc<Volume>>;
    /// Applying `op` failed with a side failure: take the mirror down.
    fn failed(&self, op: &'static str, errno: i32, path: &Path);
    /// Applying `op` failed with an ordinary error: the mirror's tree is not
    /// what the primary's was; `path` must be resynced.
    fn diverged(&self, op: &'static str, errno: i32, path: &Path);
    /// The mirror has every record and it is durable there.
    fn caught_up(&self) {}
}

/// The state shared between the shipping thread and the engine.
struct Shared {
    log: Arc<Log>,
    log_id: u64,
    stop: AtomicBool,
    /// When the call in progress on the mirror started (ns on `epoch`,
    /// plus one), or 0.
    busy_since: AtomicU64,
    epoch: Instant,
    /// The last record applied, and the last one durable on the mirror.
    applied: AtomicU64,
    durable: AtomicU64,
    /// Records applied since the shipper started (for tests and status).
    shipped: AtomicU64,
    /// Of those, the times not sent because a later record set them again.
    skipped: AtomicU64,
    /// What shipping costs (`Pace`): read by the lag bound to foresee how
    /// long the backlog will take.
    pace: Arc<Forecast>,
}

/// The shipper's measured costs, for the lag bound: applying one record
/// streamed through a file kept open, one that makes a call by path (a
/// trip: the log's `KeptModel` counts them in the backlog), and ending
/// one group, in ns (0 until measured or expected). The two kinds of
/// records are apart because on a network mirror their costs are far
/// apart (a call by path is a round trip or more; streamed data goes many
/// records to a call), and a backlog can be mostly one kind: a database's
/// start makes names and opens files, its load writes its log.
#[derive(Default)]
pub struct Forecast {
    per_streamed: AtomicU64,
    per_trip: AtomicU64,
    per_group: AtomicU64,
    /// Records per call (runs), in thousandths (0: one).
    per_call_milli: AtomicU64,
}

impl Forecast {
    /// How long the shipper would take to ship a backlog of `ops` records,
    /// `trips` of them calls by path, in seconds: each applied, in groups
    /// as a backlog is shipped (full ones of `BATCH` calls, of as many
    /// records each as calls have had lately, or of `CHECKPOINT`'s time if
    /// applying that many takes longer), each group ended once.
    pub fn backlog_secs(&self, ops: u64, trips: u64) -> f64 {
        let secs = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e9;
        let group = secs(&self.per_group);
        let trips = trips.min(ops);
        let applying = (ops - trips) as f64 * secs(&self.per_streamed) + trips as f64 * secs(&self.per_trip);
        let per_call = (self.per_call_milli.load(Ordering::Relaxed) as f64 / 1e3).max(1.0);
        let groups = (ops as f64 / (BATCH as f64 * per_call))
            .ceil()
            .max(applying / CHECKPOINT.as_secs_f64());
        applying + groups * group
    }
}

/// The shipping thread.
pub struct Shipper {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Shipper {
    /// Starts shipping `log` (identified by `log_id`) to the mirror from
    /// `from` (the mirror's position, or 0).
    pub fn start(log: Arc<Log>, log_id: u64, from: u64, mirror: Arc<dyn Mirror>) -> io::Result<Shipper> {
        let shared = Arc::new(Shared {
            log,
            log_id,
            stop: AtomicBool::new(false),
            busy_since: AtomicU64::new(0),
            epoch: Instant::now(),
            applied: AtomicU64::new(from),
            durable: AtomicU64::new(from),
            shipped: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            pace: Arc::new(Forecast::default()),
        });
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name("shipper".into())
            .spawn(move || ship(&s, &*mirror))?;
        Ok(Shipper {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The last record applied to the mirror.
    pub fn applied(&self) -> u64 {
        self.shared.applied.load(Ordering::Acquire)
    }

    /// Records applied since the shipper started.
    pub fn shipped(&self) -> u64 {
        self.shared.shipped.load(Ordering::Relaxed)
    }

    /// Times records not sent because a later one set them again.
    pub fn skipped(&self) -> u64 {
        self.shared.skipped.load(Ordering::Relaxed)
    }

    /// The cost of shipping, as it is measured (nothing until a first
    /// record or `expect` gives it).
    pub fn pace(&self) -> Arc<Forecast> {
        self.shared.pace.clone()
    }

    /// Sets the expected cost of a trip (a call by path) before one is
    /// measured (the time of a small durable write on the mirror: a few
    /// round trips to a distant one). Streamed data is not expected to
    /// cost anything until it is measured, which its first record is: a
    /// durable write is no measure of a write streamed to a file kept open,
    /// and the age of the oldest change bounds the lag meanwhile.
    pub fn expect(&self, per_trip: Duration) {
        let _ = self.shared.pace.per_trip.compare_exchange(
            0,
            per_trip.as_nanos() as u64,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// How long the call in progress on the mirror has run, if one is.
    pub fn busy_for(&self) -> Option<Duration> {
        match self.shared.busy_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(
                self.shared
                    .epoch
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(since - 1)),
            ),
        }
    }

    /// Stops the thread once its call in progress returns, and waits for
    /// it at most `wait`; true if it has ended.
    pub fn stop(&self, wait: Duration) -> bool {
        self.shared.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + wait;
        let mut slot = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(t) = slot.as_ref() {
            if t.is_finished() {
                if let Some(t) = slot.take() {
                    let _ = t.join();
                }
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// The path a failure of `c` is reported against.
fn subject(c: &Change) -> &Path {
    match c {
        Change::Write { path, .. }
        | Change::Truncate { path, .. }
        | Change::Create { path, .. }
        | Change::Mkdir { path, .. }
        | Change::Mknod { path, .. }
        | Change::Symlink { path, .. }
        | Change::Unlink { path }
        | Change::Rmdir { path }
        | Change::Chmod { path, .. }
        | Change::Chown { path, .. }
        | Change::Times { path, .. }
        | Change::SetXattr { path, .. }
        | Change::RemoveXattr { path, .. }
        | Change::Fallocate { path, .. }
        | Change::Fsync { path, .. } => path,
        Change::Link { new, .. } => new,
        Change::Rename { old, .. } => old,
    }
}

fn op_name(c: &Change) -> &'static str {
    match c {
        Change::Write { .. } => "write",
        Change::Truncate { .. } => "truncate",
        Change::Create { .. } => "create",
        Change::Mkdir { .. } => "mkdir",
        Change::Mknod { .. } => "mknod",
        Change::Symlink { .. } => "symlink",
        Change::Link { .. } => "link",
        Change::Unlink { .. } => "unlink",
        Change::Rmdir { .. } => "rmdir",
        Change::Rename { .. } => "rename",
        Change::Chmod { .. } => "chmod",
        Change::Chown { .. } => "chown",
        Change::Times { .. } => "utimens",
        Change::SetXattr { .. } => "setxattr",
        Change::RemoveXattr { .. } => "removexattr",
        Change::Fallocate { .. } => "fallocate",
        Change::Fsync { .. } => "fsync",
    }
}

/// The shipping loop.
fn ship(s: &Shared, mirror: &dyn Mirror) {
    // The first record after the position may be on the mirror already.
    let mut again = true;
    let mut reader = Ahead::new(s.log.reader(s.durable.load(Ordering::Acquire)));
    let mut files = KeptFiles::default();
    let mut position: Option<OwnedFd> = None;
    let mut current: Option<Arc<Volume>> = None;
    // The group being applied: when it took its first record, and the
    // calls made in it.
    let mut group: Option<(Instant, u64)> = None;
    // The drained shipper has waited `LINGER` once for the open group.
    let mut lingered = false;
    let mut pace = Pace::default();
    while !s.stop.load(Ordering::Acquire) {
        let Some(v) = mirror.volume() else {
            // Out of service: start again from what is durable there when
            // it is back (the records applied since may not have stayed).
            files.forget();
            position = None;
            group = None;
            s.log.wait_after(u64::MAX - 1, IDLE);
            reader = Ahead::new(s.log.reader(s.durable.load(Ordering::Acquire)));
            again = true;
            continue;
        };
        if !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &v)) {
            // A new root (a returning side is a new mount): files kept
            // open are on the old one.
            files.forget();
            position = None;
            current = Some(v.clone());
        }
        let record = match reader.read_next() {
            Ok(Some(r)) => r,
            Ok(None) => {
                let at = reader.position();
                if let Some((started, _)) = group
                    && !lingered
                    && started.elapsed() < CHECKPOINT
                {
                    // Drained with a group open: more may follow at once
                    // (a write's record is followed by its fsync's), and
                    // each group's end costs syncs on the mirror.
                    lingered = true;
                    thread::sleep(LINGER);
                    continue;
                }
                // Drained: make it all durable, then sleep until more comes.
                group = None;
                if s.durable.load(Ordering::Acquire) < at
                    && !close_group(s, mirror, &v, &mut files, &mut position, at, &mut pace)
                {
                    continue;
                }
                mirror.caught_up();
                s.log.wait_after(at, IDLE);
                continue;
            }
            Err(e) => {
                log::error!("the change log cannot be read: {e}");
                s.log.wait_after(u64::MAX - 1, IDLE);
                reader = Ahead::new(s.log.reader(s.applied.load(Ordering::Acquire)));
                continue;
            }
        };
        lingered = false;
        let (opened, calls) = group.get_or_insert_with(|| (Instant::now(), 0));
        *calls += 1;
        let (opened, calls) = (*opened, *calls);
        let started = Instant::now();
        // Times a later record sets again are not sent: on a network
        // mirror a utimensat costs two round trips, and the writeback
        // cache sends one before each fsync of a written file.
        let skip = reader.superseded(&record.change);
        let mut record = record;
        let run = reader.take_run(&mut record);
        let by_path = files.trips();
        let applied = apply(s, mirror, &v, &record, again, &mut files, skip, &run);
        let trip = !record.change.is_data() || files.trips() != by_path;
        pace.applied(started.elapsed(), 1 + run.folded, trip, &s.pace);
        if !applied {
            // The mirror failed: shipping resumes from what is durable.
            files.forget();
            position = None;
            group = None;
            reader = Ahead::new(s.log.reader(s.durable.load(Ordering::Acquire)));
            again = true;
            continue;
        }
        // Until the first rename or link after the position is re-applied,
        // it may have been applied before: a group ends right after each
        // of them, so that a group replays safely whole.
        again = again && record.change.replays_safely();
        let seq = record.seq;
        let due = !record.change.replays_safely() || calls >= BATCH || opened.elapsed() >= CHECKPOINT;
        if due {
            group = None;
            close_group(s, mirror, &v, &mut files, &mut position, seq, &mut pace);
        }
    }
}

/// The shipper's costs, measured apart (`Forecast`): applying a record
/// streamed through a kept file, and a trip (a call by path), each a
/// moving average over its kind's records (weight 1/8, so that a run of
/// large records, a new WAL segment's, is forgotten a few records later),
/// and ending a group, a moving average over groups. (A group's end used
/// to be counted as a share of each of its records: a drained shipper
/// ends small groups, and their shares foresaw a backlog, which is
/// shipped in full groups, as several times slower than it is.)
#[derive(Default)]
struct Pace {
    streamed_ns: Option<f64>,
    trip_ns: Option<f64>,
    close_ns: Option<f64>,
    /// Records per call, over calls.
    per_call: Option<f64>,
}

impl Pace {
    fn fold(avg: f64, sample: f64) -> f64 {
        avg + (sample - avg) / 8.0
    }

    /// `records` applied in `took` (a run is one call for several), in a
    /// call that made a `trip` by path or not. A run whose first record
    /// opened its file is one trip (the log counts its other records as
    /// streamed; their share is small beside the open's).
    fn applied(&mut self, took: Duration, records: u64, trip: bool, out: &Forecast) {
        let (avg, per, samples) = match trip {
            true => (&mut self.trip_ns, &out.per_trip, 1),
            false => (&mut self.streamed_ns, &out.per_streamed, records.max(1)),
        };
        // `samples` samples of `took / samples` each, folded at once.
        let took = took.as_nanos() as f64 / samples as f64;
        let kept = (7.0f64 / 8.0).powi(samples.clamp(1, 1000) as i32);
        let apply = avg.map_or(took, |a| took + (a - took) * kept);
        *avg = Some(apply);
        // `expect`'s guess stands until a record of its kind is applied.
        per.store((apply as u64).max(1), Ordering::Relaxed);
        let n = records.max(1) as f64;
        let per_call = self.per_call.map_or(n, |c| Self::fold(c, n));
        self.per_call = Some(per_call);
        out.per_call_milli.store((per_call * 1e3) as u64, Ordering::Relaxed);
    }

    fn closed(&mut self, took: Duration, out: &Forecast) {
        let took = took.as_nanos() as f64;
        let close = self.close_ns.map_or(took, |c| Self::fold(c, took));
        self.close_ns = Some(close);
        out.per_group.store(close as u64, Ordering::Relaxed);
    }
}

/// Applies one record, and the run folded into it, under the watchdog's
/// eye; false if the mirror failed. `skip`: counted as applied without a
/// call (superseded).
#[allow(clippy::too_many_arguments)]
fn apply(
    s: &Shared,
    mirror: &dyn Mirror,
    v: &Volume,
    r: &Record,
    again: bool,
    files: &mut KeptFiles,
    skip: bool,
    run: &Run,
) -> bool {
    let res = if skip {
        s.skipped.fetch_add(1, Ordering::Relaxed);
        Ok(())
    } else {
        busy(s, || {
            r.change.apply_with(v, again, files)?;
            if let Some((atime, mtime)) = run.times {
                Change::Times {
                    path: subject(&r.change).to_path_buf(),
                    atime,
                    mtime,
                }
                .apply_with(v, again, files)?;
            }
            // The run's barriers are owed like any barrier, together.
            if let Some(datasync) = run.barrier {
                Change::Fsync {
                    path: subject(&r.change).to_path_buf(),
                    datasync,
                }
                .apply_with(v, again, files)?;
            }
            // Times of a file let go for this record's.
            times_failed(mirror, files)
        })
    };
    if s.stop.load(Ordering::Acquire) {
        // Replaced while this call hung: what it did is the new shipper's
        // to redo; nothing more is recorded here.
        return false;
    }
    match res {
        Ok(()) => {}
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            if is_side_failure(errno) {
                files.forget();
                mirror.failed(op_name(&r.change), errno, subject(&r.change));
                return false;
            }
            // The mirror's tree is not the primary's at this point: the
            // path is resynced, and shipping goes on.
            mirror.diverged(op_name(&r.change), errno, subject(&r.change));
        }
    }
    s.applied.store(r.seq, Ordering::Release);
    s.shipped.fetch_add(1 + run.folded, Ordering::Relaxed);
    s.skipped.fetch_add(run.skipped, Ordering::Relaxed);
    s.log.applied(r.seq);
    true
}

/// How many records the shipper reads ahead of the one it applies.
const LOOKAHEAD: usize = 64;

/// The largest write a run makes of its records (the size of one FUSE
/// write by default, so that a run on a FUSE mirror is one request).
const RUN_MAX: u64 = 128 << 10;

/// The records after a write that are folded into it and applied with it
/// in one call (`Ahead::take_run`): they touch the same file, and nothing
/// else lies between them. On a network mirror each call is a round trip
/// and a share of the link's CPU, and a database's log is written as a
/// run of such records (a write of the log's last pages, the times the
/// writeback cache sets, the flush; again for the next commit, over the
/// same pages).
///
/// The run is applied as the write of one extent (the records' writes,
/// each over the ones before it), then one barrier, the strongest of
/// theirs (barriers are owed until the group's end anyway). The mirror
/// goes from the state before the run to the state after it, both the
/// primary's; no other file's state is seen out of order, since nothing
/// of another file lies between.
#[derive(Default)]
struct Run {
    /// Records folded into the first.
    folded: u64,
    /// The strongest barrier among them (`Some(true)`: fdatasync).
    barrier: Option<bool>,
    /// Times among them that a later record sets again (not sent).
    skipped: u64,
    /// The times the others among them set, together (the later ones'
    /// over the earlier ones'), made after the write: like any times set
    /// on a kept file, at the group's end (`KeptFiles`).
    times: Option<(SetTime, SetTime)>,
}

/// True if a write of `len` bytes at `at` touches or overlaps the extent
/// `offset`..+`data`, and the two together fit in `RUN_MAX`.
fn joins(offset: u64, data: &[u8], at: u64, len: usize) -> bool {
    let end = offset + data.len() as u64;
    let (lo, hi) = (offset.min(at), end.max(at + len as u64));
    at <= end && at + len as u64 >= offset && hi - lo <= RUN_MAX
}

/// Writes `d` at `at` over the extent `offset`..+`data`, which it joins
/// (`joins`): the extent grows to cover both, with no gap.
fn overlay(offset: &mut u64, data: &mut Vec<u8>, at: u64, d: &[u8]) {
    if at < *offset {
        let mut grown = vec![0; (*offset - at) as usize];
        grown.extend_from_slice(data);
        *data = grown;
        *offset = at;
    }
    let from = (at - *offset) as usize;
    if data.len() < from + d.len() {
        data.resize(from + d.len(), 0);
    }
    data[from..from + d.len()].copy_from_slice(d);
}

/// The log's reader with records read ahead, to see what a later record
/// makes of an earlier one.
struct Ahead {
    reader: Reader,
    buf: std::collections::VecDeque<Record>,
    /// Reading ahead found the log's end since the last record was taken:
    /// it is not looked for again until the next (at the end of the
    /// preallocated segment each look is a read of a chunk of zeros, and a
    /// run looked once per record it folded).
    ended: bool,
}

impl Ahead {
    fn new(reader: Reader) -> Ahead {
        Ahead {
            reader,
            buf: std::collections::VecDeque::new(),
            ended: false,
        }
    }

    fn read_next(&mut self) -> io::Result<Option<Record>> {
        self.ended = false;
        match self.buf.pop_front() {
            Some(r) => Ok(Some(r)),
            None => self.reader.read_next(),
        }
    }

    /// Reads ahead up to `LOOKAHEAD` records, of those already in the log.
    fn fill(&mut self) {
        while !self.ended && self.buf.len() < LOOKAHEAD {
            match self.reader.read_next() {
                Ok(Some(r)) => self.buf.push_back(r),
                _ => self.ended = true,
            }
        }
    }

    /// Folds into `first`, a write, the records read ahead that make a
    /// run with it (`Run`): `first` becomes the run's one write, with the
    /// last record's sequence number. Records not yet in the log are not
    /// waited for.
    fn take_run(&mut self, first: &mut Record) -> Run {
        let mut run = Run::default();
        let Change::Write { path, offset, data } = &mut first.change else {
            return run;
        };
        loop {
            if self.buf.len() < LOOKAHEAD / 2 {
                self.fill();
            }
            let Some(next) = self.buf.front() else { break };
            match &next.change {
                Change::Write {
                    path: p,
                    offset: at,
                    data: d,
                } if p == path && joins(*offset, data, *at, d.len()) => overlay(offset, data, *at, d),
                Change::Fsync { path: p, datasync } if p == path => {
                    run.barrier = Some(run.barrier.unwrap_or(true) && *datasync);
                }
                c @ Change::Times { path: p, .. } if p == path && set_again(c, self.buf.iter().skip(1)) => {
                    run.skipped += 1;
                }
                Change::Times { path: p, atime, mtime } if p == path => {
                    run.times = Some(SetTime::over(run.times, *atime, *mtime));
                }
                _ => break,
            }
            if let Some(next) = self.buf.pop_front() {
                first.seq = next.seq;
                first.time_ns = next.time_ns;
                run.folded += 1;
            }
        }
        run
    }

    /// The last record returned.
    fn position(&self) -> u64 {
        self.buf.front().map_or_else(|| self.reader.position(), |r| r.seq - 1)
    }

    /// True for a `Times` whose every time a later record, already in the
    /// log, sets again before any record that could move its name: what
    /// it sets is replaced before it matters. (Only times; the mirror
    /// passes through the primary's states in everything else.)
    fn superseded(&mut self, c: &Change) -> bool {
        if !matches!(c, Change::Times { .. }) {
            return false;
        }
        self.fill();
        set_again(c, self.buf.iter())
    }
}

/// True if `c` is a `Times` whose every time one of the `later` records
/// sets again before any record that could move its name.
fn set_again<'a>(c: &Change, later: impl Iterator<Item = &'a Record>) -> bool {
    let Change::Times { path, atime, mtime } = c else {
        return false;
    };
    let sets = |t: &volume::SetTime| !matches!(t, volume::SetTime::Omit);
    for r in later {
        match &r.change {
            Change::Times {
                path: p,
                atime: a,
                mtime: m,
            } if p == path && (sets(a) || !sets(atime)) && (sets(m) || !sets(mtime)) => return true,
            c if c.moves_names() || !c.replays_safely() => return false,
            _ => {}
        }
    }
    false
}

/// Runs `f`, a call on the mirror, timed for `Shipper::busy_for` (a call
/// that hangs is seen by the engine, which takes the mirror down).
fn busy<T>(s: &Shared, f: impl FnOnce() -> T) -> T {
    s.busy_since
        .store(s.epoch.elapsed().as_nanos() as u64 + 1, Ordering::Release);
    let r = f();
    s.busy_since.store(0, Ordering::Release);
    r
}

/// Ends a group: makes everything applied up to `seq` durable on the
/// mirror (the syncs the group's records owe, several at once, then the
/// filesystem), then the position, in place through `position` (opened
/// once), and drops the log's segments before it.
fn close_group(
    s: &Shared,
    mirror: &dyn Mirror,
    v: &Volume,
    files: &mut KeptFiles,
    position: &mut Option<OwnedFd>,
    seq: u64,
    pace: &mut Pace,
) -> bool {
    let started = Instant::now();
    let r = busy(s, || {
        files.sync_owed()?;
        times_failed(mirror, files)?;
        v.syncfs()?;
        let fd = match position.take() {
            Some(fd) => fd,
            None => open_position(v)?,
        };
        put_position(fd.as_fd(), Position { log_id: s.log_id, seq }, true)?;
        *position = Some(fd);
        Ok::<(), io::Error>(())
    });
    if let Err(e) = r {
        report(mirror, "checkpoint", &e, &position_path());
        return false;
    }
    s.durable.store(seq, Ordering::Release);
    pace.closed(started.elapsed(), &s.pace);
    if let Err(e) = s.log.drop_through(seq) {
        log::warn!("cannot remove the change log's applied segments: {e}");
    }
    true
}

/// Reports the times of kept files that could not be set (made after
/// their records, at a group's end or as a file is let go): each a
/// divergence of its path, which is resynced; an error that is the
/// mirror's failure is returned, for the caller to fail on.
fn times_failed(mirror: &dyn Mirror, files: &mut KeptFiles) -> io::Result<()> {
    for (path, e) in files.failed_times() {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        if is_side_failure(errno) {
            return Err(e);
        }
        mirror.diverged("utimens", errno, &path);
    }
    Ok(())
}

fn report(mirror: &dyn Mirror, op: &'static str, e: &io::Error, path: &Path) {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    if is_side_failure(errno) {
        mirror.failed(op, errno, path);
    } else {
        log::warn!("side=mirror op={op} cannot record the shipping position: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::DIR;
    use crate::spec::Side;
    use std::fs;
    use std::sync::RwLock;

    struct TestMirror {
        vol: RwLock<Option<Arc<Volume>>>,
        failures: Mutex<Vec<(String, i32)>>,
        divergences: Mutex<Vec<String>>,
    }

    impl Mirror for TestMirror {
        fn volume(&self) -> Option<Arc<Volume>> {
            self.vol.read().unwrap().clone()
        }
        fn failed(&self, op: &'static str, errno: i32, _path: &Path) {
            self.failures.lock().unwrap().push((op.to_string(), errno));
            *self.vol.write().unwrap() = None;
        }
        fn diverged(&self, op: &'static str, _errno: i32, path: &Path) {
            self.divergences
                .lock()
                .unwrap()
                .push(format!("{op} {}", path.display()));
        }
    }

    struct Pair {
        _dirs: [tempfile::TempDir; 2],
        primary: PathBuf,
        mirror: PathBuf,
    }

    fn pair() -> Pair {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for d in &dirs {
            fs::create_dir(d.path().join(META_DIR)).unwrap();
        }
        Pair {
            primary: dirs[0].path().to_path_buf(),
            mirror: dirs[1].path().to_path_buf(),
            _dirs: dirs,
        }
    }

    fn test_mirror(root: &Path) -> Arc<TestMirror> {
        Arc::new(TestMirror {
            vol: RwLock::new(Some(Arc::new(Volume::open(Side::Mirror, root).unwrap()))),
            failures: Mutex::new(Vec::new()),
            divergences: Mutex::new(Vec::new()),
        })
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn owner() -> Owner {
        // SAFETY: geteuid and getegid have no failure mode.
        Owner {
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
        }
    }

    const TRIP: bool = true;
    const STREAMED: bool = false;

    #[test]
    fn the_backlog_is_foreseen_in_full_groups_each_ended_once() {
        let f = Forecast::default();
        assert_eq!(f.backlog_secs(1000, 10), 0.0, "nothing measured, nothing foreseen");
        let mut pace = Pace::default();
        pace.applied(Duration::from_micros(500), 1, STREAMED, &f);
        // A drained shipper's group: 2 records, ended in 40 ms.
        pace.closed(Duration::from_millis(40), &f);
        // 512 records: two full groups, not 256 groups of two.
        let secs = f.backlog_secs(512, 0);
        assert!((secs - (512.0 * 0.0005 + 2.0 * 0.040)).abs() < 1e-9, "{secs}");
        // Slow records: a group ends at CHECKPOINT (1 s), before it is full.
        pace.applied(Duration::from_millis(200), 1, STREAMED, &f);
        let record = f.per_streamed.load(Ordering::Relaxed) as f64 / 1e9;
        let secs = f.backlog_secs(256, 0);
        let applying = 256.0 * record;
        assert!((secs - (applying + applying * 0.040)).abs() < 1e-6, "{secs}");
        // A run: 4 records in one call of 2 ms cost 0.5 ms each, and the
        // slow record is forgotten as four records are.
        let before = f.per_streamed.load(Ordering::Relaxed) as f64;
        pace.applied(Duration::from_millis(2), 4, STREAMED, &f);
        let after = f.per_streamed.load(Ordering::Relaxed) as f64;
        let expected = 500_000.0 + (before - 500_000.0) * (7.0f64 / 8.0).powi(4);
        assert!((after - expected).abs() < 2.0, "{after} {expected}");
    }

    #[test]
    fn a_group_is_batch_calls_and_runs_make_it_more_records() {
        let f = Forecast::default();
        let mut pace = Pace::default();
        // Runs of 20 records, 2 ms a call; a group's end 40 ms.
        pace.applied(Duration::from_millis(2), 20, STREAMED, &f);
        pace.closed(Duration::from_millis(40), &f);
        // 5,120 records are 256 calls: one group, not twenty.
        let secs = f.backlog_secs(5120, 0);
        assert!((secs - (256.0 * 0.002 + 0.040)).abs() < 1e-9, "{secs}");
    }

    #[test]
    fn trips_are_foreseen_apart_from_streamed_records() {
        let f = Forecast::default();
        let mut pace = Pace::default();
        // Over a network: a call by path takes two round trips, a write
        // to a file kept open a share of one.
        pace.applied(Duration::from_millis(40), 1, TRIP, &f);
        pace.applied(Duration::from_micros(200), 1, STREAMED, &f);
        // A database's start: 100 records, 20 of them trips, about 0.8 s.
        // (One cost for all records foresaw 100 slow ones.)
        let secs = f.backlog_secs(100, 20);
        assert!((secs - (20.0 * 0.040 + 80.0 * 0.0002)).abs() < 1e-9, "{secs}");
        assert_eq!(f.backlog_secs(10, 50), 10.0 * 0.040, "trips are some of the records");
        // A run that opened its file is one trip, however long.
        pace.applied(Duration::from_millis(40), 20, TRIP, &f);
        assert_eq!(f.per_trip.load(Ordering::Relaxed), 40_000_000);
        // `expect` guesses a trip's cost only, and only until measured.
        let g = Forecast::default();
        g.per_trip.store(60_000_000, Ordering::Relaxed);
        assert_eq!(g.backlog_secs(100, 0), 0.0, "streamed records are not guessed");
        assert!((g.backlog_secs(100, 1) - 0.060).abs() < 1e-9);
    }

    #[test]
    fn ships_in_order_records_its_position_and_drains_to_a_durable_checkpoint() {
        let p = pair();
        let log = Arc::new(Log::open(&p.primary.join(META_DIR).join(DIR), 0).unwrap());
        let m = test_mirror(&p.mirror);
        let shipper = Shipper::start(log.clone(), 7, 0, m.clone()).unwrap();
        log.append(Change::Create {
            path: "f".into(),
            mode: 0o644,
            owner: owner(),
        })
        .unwrap();
        for i in 0..1000u64 {
            log.append(Change::Write {
                path: "f".into(),
                offset: i * 4,
                data: (i as u32).to_le_bytes().to_vec(),
            })
            .unwrap();
        }
        let last = log
            .append(Change::Rename {
                old: "f".into(),
                new: "g".into(),
                flags: 0,
            })
            .unwrap();
        wait_for("the log to drain", || shipper.applied() == last && log.lag().ops == 0);
        let data = fs::read(p.mirror.join("g")).unwrap();
        assert_eq!(data.len(), 4000);
        for i in 0..1000u32 {
            assert_eq!(data[i as usize * 4..][..4], i.to_le_bytes());
        }
        let v = Volume::open(Side::Mirror, &p.mirror).unwrap();
        wait_for("the checkpoint", || {
            read_position(&v).unwrap() == Some(Position { log_id: 7, seq: last })
        });
        assert!(m.failures.lock().unwrap().is_empty());
        assert!(m.divergences.lock().unwrap().is_empty());
        assert!(shipper.stop(Duration::from_secs(5)));
    }

    #[test]
    fn times_set_again_later_are_not_sent_and_the_last_ones_stand() {
        use crate::volume::SetTime;
        let p = pair();
        let log = Arc::new(Log::open(&p.primary.join(META_DIR).join(DIR), 0).unwrap());
        let at = |secs| SetTime::At { secs, nanos: 0 };
        for name in ["f", "g"] {
            log.append(Change::Create {
                path: name.into(),
                mode: 0o644,
                owner: owner(),
            })
            .unwrap();
        }
        for (i, t) in [1000, 2000, 3000].into_iter().enumerate() {
            log.append(Change::Write {
                path: "f".into(),
                offset: i as u64,
                data: vec![b'x'],
            })
            .unwrap();
            log.append(Change::Times {
                path: "f".into(),
                atime: SetTime::Omit,
                mtime: at(t),
            })
            .unwrap();
            log.append(Change::Fsync {
                path: "f".into(),
                datasync: true,
            })
            .unwrap();
        }
        // An atime a later record leaves alone is sent.
        log.append(Change::Times {
            path: "g".into(),
            atime: at(500),
            mtime: SetTime::Omit,
        })
        .unwrap();
        let last = log
            .append(Change::Times {
                path: "g".into(),
                atime: SetTime::Omit,
                mtime: at(600),
            })
            .unwrap();
        let m = test_mirror(&p.mirror);
        let shipper = Shipper::start(log.clone(), 1, 0, m.clone()).unwrap();
        wait_for("the log to drain", || shipper.applied() == last && log.lag().ops == 0);
        // Times set on a kept file are made at the group's end.
        let v = Volume::open(Side::Mirror, &p.mirror).unwrap();
        wait_for("the checkpoint", || {
            read_position(&v).unwrap() == Some(Position { log_id: 1, seq: last })
        });
        assert_eq!(shipper.skipped(), 2, "the first two times of f");
        assert_eq!(shipper.shipped(), last);
        let f = fs::metadata(p.mirror.join("f")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::mtime(&f), 3000);
        let g = fs::metadata(p.mirror.join("g")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::atime(&g), 500);
        assert_eq!(std::os::unix::fs::MetadataExt::mtime(&g), 600);
        assert!(m.divergences.lock().unwrap().is_empty());
        assert!(shipper.stop(Duration::from_secs(5)));
    }

    #[test]
    fn a_run_of_records_on_one_file_is_one_write_then_its_strongest_barrier() {
        use crate::volume::SetTime;
        let p = pair();
        let log = Arc::new(Log::open(&p.primary.join(META_DIR).join(DIR), 0).unwrap());
        let append = |c| log.append(c).unwrap();
        let write = |path: &str, offset, data: &[u8]| Change::Write {
            path: path.into(),
            offset,
            data: data.to_vec(),
        };
        let times = |path: &str, secs| Change::Times {
            path: path.into(),
            atime: SetTime::Omit,
            mtime: SetTime::At { secs, nanos: 0 },
        };
        let fsync = |datasync| Change::Fsync {
            path: "f".into(),
            datasync,
        };
        for name in ["f", "g"] {
            append(Change::Create {
                path: name.into(),
                mode: 0o644,
                owner: owner(),
            });
        }
        let first = append(write("f", 4, b"bbbb"));
        append(times("f", 1));
        append(fsync(true));
        // Over the start of the extent and before it.
        append(write("f", 0, b"aaaaaa"));
        append(times("f", 2));
        let end = append(fsync(false));
        // Apart from the extent: a run of its own.
        let apart = append(write("f", 100, b"c"));
        append(times("f", 3));
        // Another file between ends a run.
        append(write("f", 101, b"d"));
        append(write("g", 0, b"e"));
        append(write("f", 102, b"f"));

        let mut ahead = Ahead::new(log.reader(first - 1));
        let mut r = ahead.read_next().unwrap().unwrap();
        let run = ahead.take_run(&mut r);
        assert_eq!(r.seq, end, "the run ends at the write apart from it");
        assert_eq!((run.folded, run.barrier, run.skipped), (5, Some(false), 2));
        let Change::Write { offset, data, .. } = &r.change else {
            panic!("a run is a write: {:?}", r.change)
        };
        assert_eq!((*offset, data.as_slice()), (0, &b"aaaaaabb"[..]));

        // The last times are made with the run, and a write that touches
        // its extent joins it after them.
        let mut r = ahead.read_next().unwrap().unwrap();
        assert_eq!(r.seq, apart);
        let run = ahead.take_run(&mut r);
        assert_eq!((run.folded, run.barrier, run.skipped), (2, None, 0));
        assert_eq!(run.times, Some((SetTime::Omit, SetTime::At { secs: 3, nanos: 0 })));
        let Change::Write { offset, data, .. } = &r.change else {
            panic!("a run is a write: {:?}", r.change)
        };
        assert_eq!((*offset, data.as_slice()), (100, &b"cd"[..]));
        let mut r = ahead.read_next().unwrap().unwrap();
        assert_eq!(ahead.take_run(&mut r).folded, 0, "g's write is between");
        let mut r = ahead.read_next().unwrap().unwrap();
        append(times("f", 4));
        append(times("g", 5));
        assert_eq!(ahead.take_run(&mut r).folded, 1, "times that come later join");
        let mut r = ahead.read_next().unwrap().unwrap();
        assert!(matches!(r.change, Change::Times { .. }));
        assert_eq!(ahead.take_run(&mut r).folded, 0, "only a write starts a run");

        // Shipped, the mirror has what the primary has.
        let m = test_mirror(&p.mirror);
        let shipper = Shipper::start(log.clone(), 1, 0, m.clone()).unwrap();
        let last = log.lag().ops + shipper.applied();
        wait_for("the log to drain", || shipper.applied() == last && log.lag().ops == 0);
        assert_eq!(shipper.shipped(), last, "every record counts as shipped");
        let f = fs::read(p.mirror.join("f")).unwrap();
        assert_eq!(&f[..8], b"aaaaaabb");
        assert_eq!(&f[100..], b"cdf");
        assert_eq!(fs::read(p.mirror.join("g")).unwrap(), b"e");
        // The times of the kept file are made at the group's end.
        let v = Volume::open(Side::Mirror, &p.mirror).unwrap();
        wait_for("the checkpoint", || {
            read_position(&v).unwrap() == Some(Position { log_id: 1, seq: last })
        });
        let mtime = |name| std::os::unix::fs::MetadataExt::mtime(&fs::metadata(p.mirror.join(name)).unwrap());
        assert_eq!((mtime("f"), mtime("g")), (4, 5));
        assert!(
            m.divergences.lock().unwrap().is_empty(),
            "{:?}",
            m.divergences.lock().unwrap()
        );
        assert!(shipper.stop(Duration::from_secs(5)));
    }

    #[test]
    fn a_run_joins_writes_that_touch_its_extent_up_to_its_largest_size() {
        let mut offset = 10;
        let mut data = b"xyz".to_vec();
        assert!(joins(offset, &data, 13, 2), "adjacent after");
        assert!(joins(offset, &data, 8, 2), "adjacent before");
        assert!(!joins(offset, &data, 14, 1), "a gap after");
        assert!(!joins(offset, &data, 7, 2), "a gap before");
        assert!(joins(offset, &data, 13, RUN_MAX as usize - 3), "as large as a run is");
        assert!(!joins(offset, &data, 13, RUN_MAX as usize - 2), "too large together");
        overlay(&mut offset, &mut data, 8, b"ab");
        assert_eq!((offset, data.as_slice()), (8, &b"abxyz"[..]));
        overlay(&mut offset, &mut data, 11, b"QRST");
        assert_eq!((offset, data.as_slice()), (8, &b"abxQRST"[..]));
        overlay(&mut offset, &mut data, 7, b"0123456789");
        assert_eq!((offset, data.as_slice()), (7, &b"0123456789"[..]));
    }

    #[test]
    fn restarted_from_its_position_it_resends_at_most_a_batch() {
        let p = pair();
        let log = Arc::new(Log::open(&p.primary.join(META_DIR).join(DIR), 0).unwrap());
        log.append(Change::Create {
            path: "f".into(),
            mode: 0o644,
            owner: owner(),
        })
        .unwrap();
        // A byte apart: no two writes make a run, each is a call.
        for i in 0..2000u64 {
            log.append(Change::Write {
                path: "f".into(),
                offset: 2 * i,
                data: vec![1],
            })
            .unwrap();
        }
        let m = test_mirror(&p.mirror);
        let v = Volume::open(Side::Mirror, &p.mirror).unwrap();
        let shipper = Shipper::start(log.clone(), 1, 0, m.clone()).unwrap();
        wait_for("the first run", || shipper.applied() == 2001);
        // Stopped as if killed: the position on the mirror is what counts.
        assert!(shipper.stop(Duration::from_secs(5)));
        let pos = read_position(&v).unwrap().expect("a position");
        assert!(
            2001 - pos.seq <= BATCH,
            "position {} is more than a batch back",
            pos.seq
        );
        for i in 2000..2100u64 {
            log.append(Change::Write {
                path: "f".into(),
                offset: 2 * i,
                data: vec![2],
            })
            .unwrap();
        }
        let again = Shipper::start(log.clone(), 1, pos.seq, m.clone()).unwrap();
        wait_for("the second run", || again.applied() == 2101);
        assert!(again.shipped() <= BATCH + 100, "re-sent {} records", again.shipped());
        let data = fs::read(p.mirror.join("f")).unwrap();
        assert_eq!(data.len(), 2 * 2099 + 1);
        let written: Vec<u8> = data.iter().step_by(2).copied().collect();
        assert!(written[..2000].iter().all(|b| *b == 1) && written[2000..].iter().all(|b| *b == 2));
        assert!(again.stop(Duration::from_secs(5)));
    }

    #[test]
    fn a_side_failure_stops_at_the_record_and_shipping_resumes_when_the_mirror_is_back() {
        let p = pair();
        let log = Arc::new(Log::open(&p.primary.join(META_DIR).join(DIR), 0).unwrap());
        let m = test_mirror(&p.mirror);
        let shipper = Shipper::start(log.clone(), 1, 0, m.clone()).unwrap();
        log.append(Change::Mkdir {
            path: "d".into(),
            mode: 0o755,
            owner: owner(),
        })
        .unwrap();
        wait_for("the mkdir", || shipper.applied() == 1);
        // The mirror goes out of service (as the engine takes it down on a
        // side failure; real failures are the integration tests' part).
        *m.vol.write().unwrap() = None;
        log.append(Change::Create {
            path: "d/f".into(),
            mode: 0o644,
            owner: owner(),
        })
        .unwrap();
        log.append(Change::Write {
            path: "d/f".into(),
            offset: 0,
            data: b"late".to_vec(),
        })
        .unwrap();
        thread::sleep(Duration::from_millis(100));
        assert_eq!(shipper.applied(), 1);
        assert_eq!(log.lag().ops, 2);
        *m.vol.write().unwrap() = Some(Arc::new(Volume::open(Side::Mirror, &p.mirror).unwrap()));
        wait_for("the catch-up", || shipper.applied() == 3);
        assert_eq!(fs::read(p.mirror.join("d/f")).unwrap(), b"late");
        assert!(shipper.stop(Duration::from_secs(5)));
    }

    #[test]
    fn an_ordinary_error_is_a_divergence_and_shipping_goes_on() {
        let p = pair();
        let log = Arc::new(Log::open(&p.primary.join(META_DIR).join(DIR), 0).unwrap());
        let m = test_mirror(&p.mirror);
        let shipper = Shipper::start(log.clone(), 1, 0, m.clone()).unwrap();
        // The mirror lacks the file the write is for.
        log.append(Change::Write {
            path: "missing".into(),
            offset: 0,
            data: b"x".to_vec(),
        })
        .unwrap();
        log.append(Change::Mkdir {
            path: "after".into(),
            mode: 0o755,
            owner: owner(),
        })
        .unwrap();
        wait_for("both records", || shipper.applied() == 2);
        assert!(p.mirror.join("after").is_dir());
        assert_eq!(*m.divergences.lock().unwrap(), ["write missing"]);
        assert!(shipper.stop(Duration::from_secs(5)));
    }

    #[test]
    fn times_a_kept_file_cannot_take_are_a_divergence_and_the_group_still_ends() {
        let p = pair();
        let log = Arc::new(Log::open(&p.primary.join(META_DIR).join(DIR), 0).unwrap());
        let m = test_mirror(&p.mirror);
        for c in [
            Change::Create {
                path: "f".into(),
                mode: 0o644,
                owner: owner(),
            },
            Change::Write {
                path: "f".into(),
                offset: 0,
                data: b"x".to_vec(),
            },
            // Out of range: futimens refuses it (EINVAL), at the group's end.
            Change::Times {
                path: "f".into(),
                atime: SetTime::Omit,
                mtime: SetTime::At {
                    secs: 1,
                    nanos: 2_000_000_000,
                },
            },
        ] {
            log.append(c).unwrap();
        }
        let last = log.last();
        let shipper = Shipper::start(log.clone(), 1, 0, m.clone()).unwrap();
        let v = Volume::open(Side::Mirror, &p.mirror).unwrap();
        wait_for("the checkpoint", || {
            read_position(&v).unwrap() == Some(Position { log_id: 1, seq: last })
        });
        assert_eq!(*m.divergences.lock().unwrap(), ["utimens f"]);
        assert!(m.failures.lock().unwrap().is_empty());
        assert_eq!(fs::read(p.mirror.join("f")).unwrap(), b"x");
        assert!(shipper.stop(Duration::from_secs(5)));
    }

    #[test]
    fn the_position_record_refuses_a_torn_or_foreign_file() {
        let pos = Position { log_id: 3, seq: 99 };
        assert_eq!(Position::decode(&pos.encode()), Some(pos));
        let mut bad = pos.encode();
        bad[20] ^= 1;
        assert_eq!(Position::decode(&bad), None);
        assert_eq!(Position::decode(&pos.encode()[..31]), None);
    }
}
