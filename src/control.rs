//! The daemon's control endpoint and its clients: `status`, `events` and
//! `fail`.
//!
//! Owns: the Unix socket `/run/mirrorfs/<hash>.sock` of each mount, its
//! protocol (one JSON request line, JSON answer lines), the status report
//! and its exit codes, and who may change a mount (root or the user who
//! mounted, checked with SO_PEERCRED).
//!
//! The server answers from memory; it never waits on a side, except that
//! `events` reads the log file of the side that answers reads, in that
//! connection's own thread.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::events::{Event, read_log, utc};
use crate::health::{Counters, SideState, errno_name};
use crate::recovery::catchup::{Catchup, Manual, ResyncResult, ResyncStatus};
use crate::runtime::{Failure, mirrorfs_mounts, runtime_file};
use crate::spec::{MountSpec, Side};

/// How long a client waits for a daemon's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit codes of `mirrorfs status` (the monitoring-plugin convention).
pub const EXIT_HEALTHY: u8 = 0;
pub const EXIT_WARNING: u8 = 1;
pub const EXIT_CRITICAL: u8 = 2;
pub use crate::runtime::EXIT_UNKNOWN;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Events { follow: bool },
    Fail { side: Side },
    Resync { manual: Manual, wait: bool },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub at: String,
    pub answered: bool,
    #[serde(default)]
    pub errno: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideStatus {
    pub side: Side,
    pub path: PathBuf,
    /// UP, DOWN, RESYNCING or OFF.
    pub state: String,
    pub since: Option<String>,
    pub op: Option<String>,
    pub errno: Option<String>,
    pub reason: Option<String>,
    pub errors: Counters,
    /// The latest probe of a side that is out of service.
    #[serde(default)]
    pub probe: Option<ProbeStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub mountpoint: PathBuf,
    /// HEALTHY, RESYNCING, DEGRADED or SPLIT.
    pub state: String,
    pub pid: u32,
    pub options: String,
    pub sides: Vec<SideStatus>,
    /// Paths recorded as out of sync, waiting for resync.
    pub pending_paths: u64,
    pub events_dropped: u64,
    /// Resync progress, while one runs.
    pub resync: Option<ResyncStatus>,
    /// The last resync that ended, if any since the mount.
    #[serde(default)]
    pub last_resync: Option<ResyncResult>,
    pub last_events: Vec<Event>,
    /// Bytes copied by every resync since the mount, the running one too.
    #[serde(default)]
    pub resync_bytes_copied: u64,
    /// Seconds since the daemon started serving.
    #[serde(default)]
    pub uptime_seconds: f64,
    /// How the kernel's requests reach the daemon: "io_uring" or
    /// "/dev/fuse".
    #[serde(default)]
    pub transport: String,
    /// "sync" or "async".
    #[serde(default)]
    pub mode: String,
    /// Async mode: how far the mirror is behind (the oldest change it
    /// lacks, and the bytes and operations it lacks).
    #[serde(default)]
    pub lag_seconds: f64,
    #[serde(default)]
    pub lag_bytes: u64,
    #[serde(default)]
    pub lag_ops: u64,
    /// Async mode: the records applied to the mirror since the mount,
    /// those re-sent after a restart included.
    #[serde(default)]
    pub shipped_ops: u64,
    /// Async mode: the primary failed with this many changes not yet on
    /// the mirror, and nothing is served.
    #[serde(default)]
    pub lost_ops: u64,
    /// Then: the time (UTC) of the primary's state that the mirror holds.
    #[serde(default)]
    pub mirror_as_of: Option<String>,
}

impl Status {
    /// The exit code of `mirrorfs status` for this mount.
    pub fn exit_code(&self) -> u8 {
        match self.state.as_str() {
            "HEALTHY" => EXIT_HEALTHY,
            "RESYNCING" => EXIT_WARNING,
            // Degraded by choice (mirrors=off) is a warning.
            "DEGRADED" if self.sides.iter().all(|s| s.state != "DOWN") => EXIT_WARNING,
            _ => EXIT_CRITICAL,
        }
    }

    /// The report in words, in the manner of `zpool status`.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let line = |w: &mut String, k: &str, v: &str| w.push_str(&format!("{k:>8}: {v}\n"));
        line(w, "mount", &self.mountpoint.display().to_string());
        line(w, "state", &self.state);
        let down: Vec<&SideStatus> = self.sides.iter().filter(|s| s.state != "UP").collect();
        let (status, action) = match down.first() {
            _ if self.lost_ops > 0 => (
                format!(
                    "The primary failed with {} change(s) not yet on the mirror; nothing is served (EIO), because serving the mirror would roll files back under a running database. The mirror holds the primary's state as of {}.",
                    self.lost_ops,
                    self.mirror_as_of.as_deref().unwrap_or("an unknown time")
                ),
                Some(
                    "Bring the primary back and remount, or start the database on the mirror's directory, which recovers as from a crash (see README \"Recovery\")."
                        .to_string(),
                ),
            ),
            _ if self.state == "SPLIT" => (
                "Both sides took changes the other lacks (split brain); nothing is served and nothing is written."
                    .to_string(),
                Some(format!(
                    "Look at both sides, then name the winner: mirrorfs resync --from primary|mirror {}",
                    self.mountpoint.display()
                )),
            ),
            Some(s) if s.state == "RESYNCING" => (
                format!(
                    "The {} is being caught up from the {}; every change goes to both.",
                    s.side,
                    s.side.other()
                ),
                None,
            ),
            None if self.mode == "async" => (
                "Both sides are in service; the mirror follows the primary from the change log (async).".to_string(),
                None,
            ),
            None => (
                "Both sides are in service and every change goes to both.".to_string(),
                None,
            ),
            Some(s) if s.state == "OFF" => (
                format!(
                    "The {} is off (mirrors=off); changes go to the {} alone.",
                    s.side,
                    s.side.other()
                ),
                Some(format!(
                    "Remount without mirrors=off once the {} can be caught up (see README \"Recovery\").",
                    s.side
                )),
            ),
            Some(s) => (
                format!(
                    "The {} is out of service: {}. The mount runs on the {} alone.",
                    s.side,
                    s.reason.as_deref().unwrap_or("unknown reason"),
                    s.side.other()
                ),
                Some(format!(
                    "Repair or replace the {}, then bring it back (see README \"Recovery\").",
                    s.side
                )),
            ),
        };
        line(w, "status", &status);
        if let Some(a) = action {
            line(w, "action", &a);
        }
        line(w, "pid", &self.pid.to_string());
        if !self.transport.is_empty() {
            line(w, "requests", &format!("through {}", self.transport));
        }
        if self.mode == "async" {
            line(w, "mode", "async");
            line(
                w,
                "lag",
                &format!(
                    "{:.3} s, {} bytes, {} operations",
                    self.lag_seconds, self.lag_bytes, self.lag_ops
                ),
            );
        }
        if !self.options.is_empty() {
            line(w, "options", &self.options);
        }
        w.push_str("  config:\n");
        w.push_str(&format!(
            "    {:<8} {:<9} {:>6} {:>6} {:>6}  {}\n",
            "SIDE", "STATE", "READ", "WRITE", "OTHER", "PATH"
        ));
        for s in &self.sides {
            let mut row = format!(
                "    {:<8} {:<9} {:>6} {:>6} {:>6}  {}",
                s.side.name(),
                s.state,
                s.errors.read,
                s.errors.write,
                s.errors.other,
                s.path.display()
            );
            if let Some(since) = &s.since {
                row.push_str(&format!("  since {since}"));
            }
            if let (Some(op), Some(e)) = (&s.op, &s.errno) {
                row.push_str(&format!(": {op} {e}"));
            } else if let Some(op) = &s.op {
                row.push_str(&format!(": {op}"));
            }
            if let Some(p) = &s.probe {
                row.push_str(&match (&p.errno, p.answered) {
                    (_, true) => format!(" (answers probes again, {})", p.at),
                    (Some(e), false) => format!(" (probe {}: {e})", p.at),
                    (None, false) => format!(" (probe {}: no answer)", p.at),
                });
            }
            w.push_str(&row);
            w.push('\n');
        }
        match &self.resync {
            Some(r) => {
                let pct = |a: u64, b: u64| if b == 0 { 100.0 } else { 100.0 * a as f64 / b as f64 };
                line(
                    w,
                    "resync",
                    &format!(
                        "the {} since {}: {}/{} files, {}/{} MiB ({:.1}%), {} MiB copied, {:.1} MiB/s, ETA {}",
                        r.side,
                        r.started,
                        r.files_done,
                        r.files_total,
                        r.bytes_done >> 20,
                        r.bytes_total >> 20,
                        pct(r.bytes_done, r.bytes_total),
                        r.bytes_copied >> 20,
                        r.rate as f64 / f64::from(1 << 20),
                        r.eta_seconds.map_or("unknown".to_string(), |s| format!("{s} s")),
                    ),
                )
            }
            None => line(w, "resync", "none running"),
        }
        if let Some(r) = &self.last_resync {
            line(
                w,
                "last",
                &format!(
                    "resync of the {} {} at {}: {} files ({} changed), {} bytes copied in {:.1} s{}",
                    r.side,
                    if r.ok { "ended" } else { "failed" },
                    r.finished,
                    r.files,
                    r.files_changed,
                    r.bytes_copied,
                    r.seconds,
                    r.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                ),
            );
        }
        line(w, "pending", &format!("{} paths out of sync", self.pending_paths));
        if self.events_dropped > 0 {
            line(
                w,
                "dropped",
                &format!("{} events could not be queued", self.events_dropped),
            );
        }
        w.push_str("  events:\n");
        if self.last_events.is_empty() {
            w.push_str("    (none)\n");
        }
        for e in &self.last_events {
            w.push_str(&format!("    {}\n", e.to_text().trim_start()));
        }
        out
    }
}

/// What the control server needs of the running mount.
pub struct Control {
    pub engine: Arc<Engine>,
    /// The resyncer (none on a read-only mount).
    pub catchup: Option<Arc<Catchup>>,
    pub spec: MountSpec,
    /// Options as given, for status.
    pub options: String,
    /// The user who mounted; with root, the only one who may change the mount.
    pub owner: u32,
    /// When the daemon started serving.
    pub started: std::time::Instant,
    /// "io_uring" or "/dev/fuse".
    pub transport: &'static str,
}

impl Control {
    pub fn status(&self) -> Status {
        let h = &self.engine.health;
        let sides: Vec<SideStatus> = Side::BOTH
            .iter()
            .map(|&side| {
                let state = h.state(side);
                let down = h.down_info(side).filter(|_| state == SideState::Down);
                let probe = h.probe(side).filter(|_| state != SideState::Up);
                SideStatus {
                    side,
                    path: self.spec.side(side).to_path_buf(),
                    state: state.name().to_string(),
                    since: down.as_ref().map(|d| utc(d.since)),
                    op: down.as_ref().map(|d| d.op.clone()),
                    errno: down.as_ref().and_then(|d| d.errno.map(errno_name)),
                    reason: match state {
                        SideState::Off => Some("mirrors=off".to_string()),
                        _ => down.as_ref().map(|d| d.reason()),
                    },
                    errors: h.counters(side),
                    probe: probe.map(|p| ProbeStatus {
                        at: utc(p.at),
                        answered: p.errno.is_none(),
                        errno: p.errno.map(errno_name),
                    }),
                }
            })
            .collect();
        let resync = self.catchup.as_ref().and_then(|c| c.progress.current());
        let lag = self.engine.lag();
        let lost = self.engine.lost();
        let pending = self.engine.pending_paths() as u64;
        let state = if self.engine.split() {
            "SPLIT"
        } else if sides.iter().any(|s| s.state == "DOWN" || s.state == "OFF") {
            "DEGRADED"
        } else if resync.is_some() || pending > 0 || sides.iter().any(|s| s.state == "RESYNCING") {
            "RESYNCING"
        } else {
            "HEALTHY"
        };
        Status {
            mountpoint: self.spec.mountpoint.clone(),
            state: state.to_string(),
            pid: std::process::id(),
            options: self.options.clone(),
            sides,
            pending_paths: pending,
            events_dropped: self.engine.events.dropped(),
            resync,
            last_resync: self.catchup.as_ref().and_then(|c| c.progress.last()),
            last_events: self.engine.events.recent(),
            resync_bytes_copied: self.catchup.as_ref().map_or(0, |c| c.progress.bytes_copied()),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            transport: self.transport.to_string(),
            mode: if self.engine.asynchronous() { "async" } else { "sync" }.to_string(),
            lag_seconds: lag.seconds,
            lag_bytes: lag.bytes,
            lag_ops: lag.ops,
            shipped_ops: self.engine.shipped(),
            lost_ops: lost.map_or(0, |l| l.0),
            mirror_as_of: lost.map(|l| utc(std::time::UNIX_EPOCH + Duration::from_nanos(l.1))),
        }
    }

    /// The event log: the answering side's file, then the events in memory
    /// that its writer has not appended yet (all of them if the file cannot
    /// be read). Without the second part, an event emitted just before a
    /// follower subscribed could be neither in the file nor in its stream.
    fn log(&self) -> Vec<Event> {
        let side = self.engine.reader();
        let mut log = read_log(self.spec.side(side)).unwrap_or_default();
        let last = log.iter().map(|e| e.seq).max().unwrap_or(0);
        log.extend(self.engine.events.recent().into_iter().filter(|e| e.seq > last));
        log
    }
}

/// The socket path of the mount at `mountpoint`.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    runtime_file(mountpoint, "sock")
}

/// Binds the control socket and serves it on a thread of its own.
pub fn start(ctl: Arc<Control>) -> io::Result<PathBuf> {
    let path = socket_path(&ctl.spec.mountpoint);
    let _ = fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // Any user may read status; changes are checked per request.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666))?;
    thread::Builder::new().name("control".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let ctl = ctl.clone();
            let _ = thread::Builder::new().name("control-conn".into()).spawn(move || {
                if let Err(e) = handle(&ctl, conn) {
                    log::debug!("control connection: {e}");
                }
            });
        }
    })?;
    Ok(path)
}

fn send<T: Serialize>(w: &mut impl Write, v: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

fn handle(ctl: &Control, conn: UnixStream) -> io::Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let mut w = io::BufWriter::new(&conn);
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            return send(
                &mut w,
                &Reply {
                    error: Some(format!("bad request: {e}")),
                    ok: false,
                    ..Reply::default()
                },
            );
        }
    };
    match req {
        Request::Status => send(&mut w, &ctl.status())?,
        Request::Events { follow } => {
            // Subscribed before the log is read, so nothing falls between.
            let live = follow.then(|| ctl.engine.events.follow());
            let mut last = 0;
            for e in ctl.log() {
                last = e.seq;
                send(&mut w, &e)?;
            }
            w.flush()?;
            if let Some(rx) = live {
                for e in rx {
                    if e.seq > last {
                        send(&mut w, &e)?;
                        w.flush()?;
                    }
                }
            }
        }
        Request::Fail { side } => {
            let reply = match allowed(ctl, &conn, "take a side out")? {
                Err(e) => e,
                Ok(()) => match ctl.engine.fail(side) {
                    Ok(()) => Reply {
                        ok: true,
                        ..Reply::default()
                    },
                    Err(e) => Reply {
                        error: Some(e),
                        ok: false,
                        ..Reply::default()
                    },
                },
            };
            send(&mut w, &reply)?;
        }
        Request::Resync { manual, wait } => {
            let reply = match (allowed(ctl, &conn, "start a resync")?, &ctl.catchup) {
                (Err(e), _) => e,
                (Ok(()), None) => Reply {
                    error: Some("a read-only mount cannot resync".into()),
                    ok: false,
                    ..Reply::default()
                },
                (Ok(()), Some(c)) => {
                    let done = c.request(manual);
                    if wait {
                        match done.recv() {
                            Ok(Ok(m)) => Reply {
                                ok: true,
                                message: Some(m),
                                ..Reply::default()
                            },
                            Ok(Err(e)) => Reply {
                                error: Some(e),
                                ok: false,
                                ..Reply::default()
                            },
                            Err(_) => Reply {
                                error: Some("the resync thread has gone".into()),
                                ok: false,
                                ..Reply::default()
                            },
                        }
                    } else {
                        Reply {
                            ok: true,
                            ..Reply::default()
                        }
                    }
                }
            };
            send(&mut w, &reply)?;
        }
    }
    w.flush()
}

/// Changes to the mount are for root and the user who mounted.
fn allowed(ctl: &Control, conn: &UnixStream, what: &str) -> io::Result<Result<(), Reply>> {
    let uid = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .map_err(io::Error::from)?;
    if uid == 0 || uid == ctl.owner {
        return Ok(Ok(()));
    }
    Ok(Err(Reply {
        error: Some(format!(
            "permission denied: only root or the user who mounted (uid {}) may {what}",
            ctl.owner
        )),
        ok: false,
        ..Reply::default()
    }))
}

/// The mountpoint as mountinfo spells it, found without touching the mount
/// itself (a non-owner may not stat it, and a hung daemon would hang us).
pub(crate) fn mountpoint_of(arg: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let abs = crate::spec::absolutize(arg, &cwd);
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => fs::canonicalize(parent).map(|p| p.join(name)).unwrap_or(abs),
        _ => abs,
    }
}

/// Connects to the daemon of the mirrorfs mount at `mnt` and sends `req`.
fn connect(mnt: &Path, req: &Request, timeout: Option<Duration>) -> Result<BufReader<UnixStream>, Failure> {
    if !mirrorfs_mounts().iter().any(|m| m.mountpoint == mnt) {
        return Err(Failure::Unknown(format!("{} is not a mirrorfs mount", mnt.display())));
    }
    let no_daemon = |e: io::Error| Failure::Unknown(format!("no mirrorfs daemon answers for {}: {e}", mnt.display()));
    let mut s = UnixStream::connect(socket_path(mnt)).map_err(no_daemon)?;
    s.set_read_timeout(timeout).map_err(no_daemon)?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(no_daemon)?;
    send(&mut s, req).map_err(no_daemon)?;
    Ok(BufReader::new(s))
}

fn read_one<T: for<'de> Deserialize<'de>>(r: &mut BufReader<UnixStream>, mnt: &Path) -> Result<T, Failure> {
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| Failure::Unknown(format!("no answer from the daemon of {}: {e}", mnt.display())))?;
    if let Ok(Reply { error: Some(e), .. }) = serde_json::from_str::<Reply>(&line) {
        return Err(Failure::Runtime(e));
    }
    serde_json::from_str(&line)
        .map_err(|e| Failure::Unknown(format!("bad answer from the daemon of {}: {e}", mnt.display())))
}

/// The status of the mirrorfs mount at `mountpoint`, as its daemon reports it.
pub fn query(mountpoint: &Path) -> Result<Status, Failure> {
    query_status(&mountpoint_of(mountpoint))
}

pub(crate) fn query_status(mnt: &Path) -> Result<Status, Failure> {
    let mut r = connect(mnt, &Request::Status, Some(CLIENT_TIMEOUT))?;
    read_one(&mut r, mnt)
}

/// `mirrorfs status [--json] [MOUNTPOINT]`; returns the exit code.
pub fn status(mountpoint: Option<&Path>, json: bool) -> Result<u8, Failure> {
    if let Some(m) = mountpoint {
        let mnt = mountpoint_of(m);
        let st = query_status(&mnt)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
        } else {
            print!("{}", st.to_text());
        }
        return Ok(st.exit_code());
    }
    let mounts = mirrorfs_mounts();
    if mounts.is_empty() {
        if json {
            println!("[]");
        } else {
            println!("no mirrorfs mounts");
        }
        return Ok(EXIT_UNKNOWN);
    }
    let mut worst = EXIT_HEALTHY;
    let mut all = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        if !json && i > 0 {
            println!();
        }
        match query_status(&m.mountpoint) {
            Ok(st) => {
                worst = worst.max(st.exit_code());
                if !json {
                    print!("{}", st.to_text());
                }
                all.push(serde_json::to_value(&st).unwrap_or_default());
            }
            Err(f) => {
                worst = worst.max(f.exit_code());
                if !json {
                    println!(
                        "{:>8}: {}\n{:>8}: UNKNOWN ({})",
                        "mount",
                        m.mountpoint.display(),
                        "state",
                        f.message()
                    );
                }
                all.push(serde_json::json!({
                    "mountpoint": m.mountpoint,
                    "state": "UNKNOWN",
                    "error": f.message(),
                }));
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
    }
    Ok(worst)
}

/// `mirrorfs events [--json] [--follow] MOUNTPOINT`.
pub fn events(mountpoint: &Path, json: bool, follow: bool) -> Result<u8, Failure> {
    let mnt = mountpoint_of(mountpoint);
    let timeout = if follow { None } else { Some(CLIENT_TIMEOUT) };
    let r = connect(&mnt, &Request::Events { follow }, timeout)?;
    let stdout = io::stdout();
    for line in r.lines() {
        let line = line.map_err(|e| Failure::Runtime(format!("reading events: {e}")))?;
        let Ok(ev) = serde_json::from_str::<Event>(&line) else {
            continue;
        };
        let mut out = stdout.lock();
        let text = if json { line } else { ev.to_text() };
        if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    Ok(0)
}

/// `mirrorfs fail MOUNTPOINT SIDE`.
pub fn fail(mountpoint: &Path, side: Side) -> Result<u8, Failure> {
    let mnt = mountpoint_of(mountpoint);
    ask(&mnt, &Request::Fail { side }, Some(CLIENT_TIMEOUT))?;
    println!("the {side} of {} is now out of service", mnt.display());
    Ok(0)
}

/// Sends a resync request; an error reply is a `Failure`.
pub fn request_resync(mountpoint: &Path, manual: Manual, wait: bool) -> Result<Reply, Failure> {
    let mnt = mountpoint_of(mountpoint);
    ask(
        &mnt,
        &Request::Resync { manual, wait },
        (!wait).then_some(CLIENT_TIMEOUT),
    )
}

/// Sends a request that changes the mount and reads its reply. A missing
/// daemon is a runtime failure here (not "unknown", which is for status),
/// and so is a refusal.
fn ask(mnt: &Path, req: &Request, timeout: Option<Duration>) -> Result<Reply, Failure> {
    let mut r = connect(mnt, req, timeout).map_err(|f| match f {
        Failure::Unknown(m) => Failure::Runtime(m),
        f => f,
    })?;
    let reply: Reply = read_one(&mut r, mnt)?;
    if !reply.ok {
        return Err(Failure::Runtime("the daemon refused".into()));
    }
    Ok(reply)
}

/// `mirrorfs resync`: asks the daemon to catch a side up; with `wait`,
/// returns once it has ended.
pub fn resync(mountpoint: &Path, manual: Manual, wait: bool) -> Result<u8, Failure> {
    let mnt = mountpoint_of(mountpoint);
    let reply = request_resync(&mnt, manual, wait)?;
    if wait {
        println!("{}", reply.message.unwrap_or_default());
    } else {
        println!(
            "resync requested for {}; follow it with `mirrorfs status`",
            mnt.display()
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(side: Side, state: &str) -> SideStatus {
        SideStatus {
            side,
            path: PathBuf::from("/x"),
            state: state.into(),
            since: None,
            op: None,
            errno: None,
            reason: None,
            errors: Counters::default(),
            probe: None,
        }
    }

    fn status(state: &str, p: &str, m: &str) -> Status {
        Status {
            mountpoint: PathBuf::from("/mnt"),
            state: state.into(),
            pid: 1,
            options: String::new(),
            sides: vec![side(Side::Primary, p), side(Side::Mirror, m)],
            pending_paths: 0,
            events_dropped: 0,
            resync: None,
            last_resync: None,
            last_events: Vec::new(),
            resync_bytes_copied: 0,
            uptime_seconds: 0.0,
            transport: String::new(),
            mode: "sync".to_string(),
            lag_seconds: 0.0,
            lag_bytes: 0,
            lag_ops: 0,
            shipped_ops: 0,
            lost_ops: 0,
            mirror_as_of: None,
        }
    }

    #[test]
    fn exit_codes_follow_the_monitoring_convention() {
        assert_eq!(status("HEALTHY", "UP", "UP").exit_code(), 0);
        assert_eq!(status("RESYNCING", "UP", "RESYNCING").exit_code(), 1);
        assert_eq!(status("DEGRADED", "UP", "OFF").exit_code(), 1);
        assert_eq!(status("DEGRADED", "UP", "DOWN").exit_code(), 2);
        assert_eq!(status("SPLIT", "UP", "UP").exit_code(), 2);
    }

    #[test]
    fn text_names_the_down_side_its_operation_and_errno() {
        let mut st = status("DEGRADED", "UP", "DOWN");
        st.sides[1].op = Some("write".into());
        st.sides[1].errno = Some("EIO".into());
        st.sides[1].reason = Some("write failed with EIO".into());
        st.sides[1].errors.write = 3;
        let t = st.to_text();
        assert!(t.contains("state: DEGRADED"), "{t}");
        let row = t.lines().find(|l| l.trim_start().starts_with("mirror")).unwrap();
        assert!(
            row.contains("DOWN") && row.contains("write EIO") && row.contains(" 3 "),
            "{row}"
        );
        assert!(t.contains("The mirror is out of service: write failed with EIO"), "{t}");
    }

    #[test]
    fn requests_round_trip_as_json() {
        let r = Request::Fail { side: Side::Mirror };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"fail","side":"mirror"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
    }
}
