//! Events: typed, numbered and timestamped, appended to
//! `.mirrorfs/events.log` on every side that is up, kept in memory for
//! status, streamed to `mirrorfs events --follow`, and handed to the hook.
//!
//! Owns: the event log format (one JSON object per line), the writer thread
//! of each side, the follower streams and the hook runner.
//!
//! Emitting never blocks and never touches a side in the caller's thread:
//! each sink has a bounded queue, and an event that finds a queue full is
//! dropped and counted (status shows the count). A hung side stalls only its
//! own writer thread; a slow hook delays only later hook runs.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};

use crate::health::{Health, errno_name};
use crate::spec::Side;

pub const LOG: &str = "events.log";
/// How many recent events status shows.
pub const RECENT: usize = 20;
const QUEUE: usize = 4096;
const HOOK_QUEUE: usize = 256;
/// A hook that has not finished after this long is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// The event names of SPEC section 6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Mounted,
    Unmounted,
    MirrorSkip,
    SideDown,
    SideUp,
    Diverged,
    ResyncStarted,
    ResyncProgress,
    ResyncDone,
    VerifyMismatch,
    SplitBrain,
    CrashRecovery,
    LagExceeded,
    LagRecovered,
}

/// One event, as logged and as `--json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// UTC, RFC 3339 with milliseconds.
    pub time: String,
    pub event: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    /// An event not yet numbered; `Events::emit` sets `seq` and `time`.
    pub fn new(kind: Kind) -> Event {
        Event {
            seq: 0,
            time: String::new(),
            event: kind,
            side: None,
            op: None,
            path: None,
            errno: None,
            detail: None,
        }
    }

    pub fn side(mut self, side: Side) -> Event {
        self.side = Some(side.name().to_string());
        self
    }

    pub fn op(mut self, op: &str) -> Event {
        self.op = Some(op.to_string());
        self
    }

    /// A path inside the mount; shown with a leading '/'.
    pub fn path(mut self, rel: &Path) -> Event {
        self.path = Some(format!("/{}", rel.display()));
        self
    }

    pub fn errno(mut self, errno: Option<i32>) -> Event {
        self.errno = errno.map(errno_name);
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Event {
        self.detail = Some(detail.into());
        self
    }

    /// The one-line text form: `SEQ TIME EVENT key=value...`.
    pub fn to_text(&self) -> String {
        let name = serde_json::to_value(self.event)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut s = format!("{:>6} {} {name}", self.seq, self.time);
        for (k, v) in [
            ("side", &self.side),
            ("op", &self.op),
            ("path", &self.path),
            ("errno", &self.errno),
        ] {
            if let Some(v) = v {
                s.push_str(&format!(" {k}={v}"));
            }
        }
        if let Some(d) = &self.detail {
            s.push_str(&format!(" -- {d}"));
        }
        s
    }
}

/// A time as UTC RFC 3339 with milliseconds, e.g. `2026-11-20T10:00:00.123Z`.
pub fn utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The events of a side's log, oldest first. Lines that do not parse (a
/// torn last line after a crash) are skipped.
pub fn read_log(side_root: &Path) -> io::Result<Vec<Event>> {
    let f = match File::open(log_path(side_root)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect())
}

fn log_path(side_root: &Path) -> PathBuf {
    crate::meta::meta_dir(side_root).join(LOG)
}

/// The highest sequence number in the last part of a side's log.
fn last_seq(side_root: &Path) -> u64 {
    let Ok(mut f) = File::open(log_path(side_root)) else {
        return 0;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut tail = String::new();
    let _ = f.read_to_string(&mut tail);
    tail.lines()
        .filter_map(|l| serde_json::from_str::<Event>(l).ok())
        .map(|e| e.seq)
        .max()
        .unwrap_or(0)
}

/// The event machinery of one mount.
pub struct Events {
    health: Arc<Health>,
    seq: Mutex<u64>,
    recent: Mutex<VecDeque<Event>>,
    dropped: AtomicU64,
    writers: [Option<Sender<Event>>; 2],
    hook: Option<Sender<Event>>,
    followers: Mutex<Vec<Sender<Event>>>,
}

impl Events {
    /// Starts a writer thread for each side root given, and the hook runner.
    /// Numbering continues from the highest sequence number in the logs.
    pub fn start(roots: [Option<PathBuf>; 2], health: Arc<Health>, hook: Option<PathBuf>) -> io::Result<Events> {
        let seq = roots.iter().flatten().map(|r| last_seq(r)).max().unwrap_or(0);
        let mut writers = [None, None];
        for side in Side::BOTH {
            if let Some(root) = roots[side.index()].clone() {
                let (tx, rx) = crossbeam_channel::bounded(QUEUE);
                thread::Builder::new()
                    .name(format!("events-{side}"))
                    .spawn(move || write_log(side, &root, rx))?;
                writers[side.index()] = Some(tx);
            }
        }
        let hook = match hook {
            Some(prog) => {
                let (tx, rx) = crossbeam_channel::bounded(HOOK_QUEUE);
                thread::Builder::new()
                    .name("events-hook".into())
                    .spawn(move || run_hook(&prog, rx))?;
                Some(tx)
            }
            None => None,
        };
        Ok(Events {
            health,
            seq: Mutex::new(seq),
            recent: Mutex::new(VecDeque::new()),
            dropped: AtomicU64::new(0),
            writers,
            hook,
            followers: Mutex::new(Vec::new()),
        })
    }

    /// Numbers, timestamps and sends an event to every sink. Never blocks
    /// on I/O.
    pub fn emit(&self, mut ev: Event) {
        {
            // Numbering and queueing under one lock keep each log in order.
            let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
            *seq += 1;
            ev.seq = *seq;
            ev.time = utc(SystemTime::now());
            for side in Side::BOTH {
                if let Some(tx) = &self.writers[side.index()]
                    && self.health.is_up(side)
                    && tx.try_send(ev.clone()).is_err()
                {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(tx) = &self.hook
                && tx.try_send(ev.clone()).is_err()
            {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(ev.clone());
        }
        log::info!("event {}", ev.to_text().trim_start());
        // A follower that cannot keep up is cut off; its client sees the
        // stream end rather than a silent gap.
        self.followers.lock().unwrap_or_else(|e| e.into_inner()).retain(|tx| {
            !matches!(
                tx.try_send(ev.clone()),
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
            )
        });
    }

    pub fn recent(&self) -> Vec<Event> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Events dropped because a queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A stream of the events emitted from now on.
    pub fn follow(&self) -> Receiver<Event> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        self.followers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    /// Waits up to `limit` for the writers to drain their queues (at unmount).
    pub fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.writers.iter().flatten().any(|tx| !tx.is_empty()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

fn write_log(side: Side, root: &Path, rx: Receiver<Event>) {
    let mut file: Option<File> = None;
    let mut failing = false;
    for ev in rx {
        let mut line = match serde_json::to_vec(&ev) {
            Ok(l) => l,
            Err(_) => continue,
        };
        line.push(b'\n');
        if file.is_none() {
            file = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(log_path(root))
                .ok();
        }
        // One write(2) per line keeps lines whole in an O_APPEND file.
        let r = match file.as_mut() {
            Some(f) => f.write_all(&line),
            None => Err(io::Error::from_raw_os_error(libc::EIO)),
        };
        match r {
            Ok(()) if failing => {
                failing = false;
                log::info!("side={side} event log writable again");
            }
            Ok(()) => {}
            // Closing may block on a hung side; this thread is that side's own.
            Err(e) if !failing => {
                failing = true;
                file = None;
                log::warn!("side={side} cannot append to the event log: {e}");
            }
            Err(_) => file = None,
        }
    }
}

fn run_hook(prog: &Path, rx: Receiver<Event>) {
    for ev in rx {
        let Ok(json) = serde_json::to_vec(&ev) else { continue };
        let mut cmd = Command::new(prog);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec. The
        // daemon blocks its signals; the hook must get the default mask.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("hook={} cannot start: {e}", prog.display());
                continue;
            }
        };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&json);
            let _ = stdin.write_all(b"\n");
        }
        let deadline = Instant::now() + HOOK_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        log::warn!("hook={} seq={} exited with {status}", prog.display(), ev.seq);
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    log::warn!(
                        "hook={} seq={} still running after {HOOK_TIMEOUT:?}: killed",
                        prog.display(),
                        ev.seq
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_176_000_123);
        assert_eq!(utc(t), "2026-11-20T12:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn logs_numbered_events_on_sides_that_are_up() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for d in &dirs {
            std::fs::create_dir(d.path().join(crate::volume::META_DIR)).unwrap();
        }
        let roots = [Some(dirs[0].path().to_path_buf()), Some(dirs[1].path().to_path_buf())];
        let health = Arc::new(Health::default());
        let ev = Events::start(roots.clone(), health.clone(), None).unwrap();
        ev.emit(Event::new(Kind::Mounted));
        health.mark_down(Side::Mirror, "write", Some(libc::EIO));
        ev.emit(
            Event::new(Kind::SideDown)
                .side(Side::Mirror)
                .op("write")
                .path(Path::new("a/b"))
                .errno(Some(libc::EIO)),
        );
        ev.flush(Duration::from_secs(5));
        thread::sleep(Duration::from_millis(50));
        let p = read_log(dirs[0].path()).unwrap();
        let m = read_log(dirs[1].path()).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(m.len(), 1, "the down side's log is not written");
        assert_eq!((p[0].seq, p[1].seq), (1, 2));
        assert_eq!(p[1].errno.as_deref(), Some("EIO"));
        assert_eq!(p[1].path.as_deref(), Some("/a/b"));
        assert_eq!(ev.recent().len(), 2);
        assert_eq!(ev.dropped(), 0);
        // A new mount continues the numbering.
        let again = Events::start(roots, Arc::new(Health::default()), None).unwrap();
        again.emit(Event::new(Kind::Mounted));
        assert_eq!(again.recent()[0].seq, 3);
    }

    #[test]
    fn json_leaves_out_fields_that_do_not_apply() {
        let mut e = Event::new(Kind::MirrorSkip).side(Side::Mirror);
        e.seq = 7;
        e.time = "t".into();
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"seq":7,"time":"t","event":"mirror_skip","side":"mirror"}"#);
        assert!(e.to_text().contains("mirror_skip side=mirror"));
    }
}
