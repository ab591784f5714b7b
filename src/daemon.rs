//! Mounting and unmounting: validation, the fork into the background, signal
//! handling, and the runtime files under `/run/mirrorfs`.
//!
//! Owns: the daemon's life. `mount` returns only once the kernel has
//! answered the FUSE handshake, so the mount is live when the command exits.
//! Signals are blocked before any thread starts, and one thread waits for
//! SIGTERM/SIGINT/SIGHUP and unmounts.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{SigSet, Signal};

use crate::control::{self, Control};
use crate::engine::handoff::{self, RecvTimeoutError};
use crate::engine::{Engine, EngineConfig, Policy};
use crate::events::{Event, Events, Kind};
use crate::fs::{FsConfig, MirrorFs};
use crate::health::{Health, Probe, SideState, errno_label, errno_name};
use crate::journal::{Intent, SYNC_BY_NAME};
use crate::meta;
use crate::recovery::catchup::Catchup;
use crate::ring;
use crate::runtime::{EXIT_WAIT, Failure, Liveness, RUN_DIR, liveness, mirrorfs_mounts, runtime_file};
use crate::spec::{MountSpec, Options, Side};
use crate::volume::Volume;

/// FUSE threads serving requests; each has its own /dev/fuse fd.
pub const FUSE_THREADS: usize = 8;
/// FUSE threads that may be inside a call on the primary at once; the
/// others go on serving (through the lanes) while these are stuck in a
/// hung primary, until the watchdog takes it down.
pub const INLINE_BUDGET: usize = FUSE_THREADS - 2;

/// Worker threads of each side's lane.
pub const SIDE_THREADS: usize = 8;

/// Why a side is out of service from the start of a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Absent {
    /// Missing or unusable, with this errno (`mirror_skip`, or `ro`).
    Unusable(i32),
    /// Its peer records it as stale: it missed changes. It is opened, and
    /// caught up once the mount is live (unless `noautoresync` or `ro`).
    Stale,
    /// Both sides took changes the other lacks: this side waits for the
    /// operator (`mirrorfs resync --from`).
    Split,
    /// `mirrors=off`.
    Off,
}

/// Everything checked and opened before the daemon starts serving.
struct Prepared {
    spec: MountSpec,
    opts: Options,
    vols: [Option<Volume>; 2],
    absent: [Option<Absent>; 2],
    _locks: Vec<meta::SideLock>,
}

/// True if the side's tree holds anything besides mirrorfs's own directory.
fn holds_data(root: &Path) -> bool {
    fs::read_dir(root)
        .map(|mut d| d.any(|e| e.map(|e| e.file_name() != crate::volume::META_DIR).unwrap_or(true)))
        .unwrap_or(true)
}

fn prepare(spec: &str, mountpoint: &Path, mut opts: Options) -> Result<Prepared, Failure> {
    let cwd =
        std::env::current_dir().map_err(|e| Failure::Runtime(format!("cannot read the current directory: {e}")))?;
    if let Some(hook) = &opts.hook {
        opts.hook = Some(crate::spec::resolve_hook(hook, &cwd).map_err(Failure::Usage)?);
    }
    clear_dead_mount(mountpoint)?;
    let spec = crate::spec::validate(spec, mountpoint, &opts, &cwd).map_err(Failure::Usage)?;
    if mirrorfs_mounts().iter().any(|m| m.mountpoint == spec.mountpoint) {
        return Err(Failure::Runtime(format!(
            "{} is already a mirrorfs mount",
            spec.mountpoint.display()
        )));
    }
    // A side may be left out when the options allow it; `skip` says whether.
    let skip = opts.read_only || opts.mirror_skip;
    let mut vols = [None, None];
    let mut absent = [None, None];
    for side in Side::BOTH {
        let path = spec.side(side);
        if side == Side::Mirror && opts.mirrors_off {
            absent[side.index()] = Some(Absent::Off);
            continue;
        }
        match Volume::open(side, path) {
            Ok(v) => vols[side.index()] = Some(v),
            Err(e) if skip => {
                log::warn!("side={side} path={} unusable, starting without it: {e}", path.display());
                absent[side.index()] = Some(Absent::Unusable(e.raw_os_error().unwrap_or(libc::EIO)));
            }
            Err(e) => {
                return Err(Failure::Runtime(format!(
                    "{side} {}: {e}: use -o mirror_skip to start without it",
                    path.display()
                )));
            }
        }
    }
    let roots = |vols: &[Option<Volume>; 2]| [0, 1].map(|i| vols[i].as_ref().map(|v: &Volume| v.path.clone()));
    let r = roots(&vols);
    let staleness = meta::staleness([r[0].as_deref(), r[1].as_deref()]).map_err(Failure::Runtime)?;
    match staleness {
        meta::Staleness::Stale(stale, rec) if vols[stale.index()].is_some() => {
            log::warn!(
                "side={stale} is stale (out of service since {} op={} {}): it is caught up from the {}",
                rec.since,
                rec.op,
                rec.errno,
                stale.other()
            );
            absent[stale.index()] = Some(Absent::Stale);
            // A read-only mount cannot catch it up: it serves the good side alone.
            if opts.read_only {
                vols[stale.index()] = None;
            }
        }
        meta::Staleness::Split if vols.iter().all(Option::is_some) => {
            log::warn!("split brain: both sides took changes the other lacks");
            absent[Side::Mirror.index()] = Some(Absent::Split);
        }
        meta::Staleness::Split => {
            return Err(Failure::Runtime(
                "split brain: both sides took changes the other lacks; mount both sides together \
                 and name the winner with `mirrorfs resync --from primary|mirror`"
                    .into(),
            ));
        }
        _ => {}
    }
    if vols.iter().all(Option::is_none) {
        return Err(Failure::Runtime("no side can be served".into()));
    }
    let r = roots(&vols);
    let r = [r[0].as_deref(), r[1].as_deref()];
    let mut locks = Vec::new();
    if opts.read_only {
        for side in Side::BOTH {
            if let Some(root) = r[side.index()] {
                meta::read_identity(root).map_err(|e| Failure::Runtime(format!("{side} {}: {e}", root.display())))?;
            }
        }
    } else {
        let had = r.map(|root| root.is_some_and(|root| matches!(meta::read_identity(root), Ok(Some(_)))));
        meta::ensure_identities(r).map_err(Failure::Runtime)?;
        // A side new to a pair whose other side holds data has missed all
        // of it: it is stale until it is caught up.
        for side in Side::BOTH {
            let (me, peer) = (r[side.index()], r[side.other().index()]);
            if let (Some(_), Some(peer)) = (me, peer)
                && !had[side.index()]
                && had[side.other().index()]
                && holds_data(peer)
            {
                let full = crate::journal::tree(Path::new(""));
                meta::record_stale(peer, side, "join", "ENODATA")
                    .and_then(|_| crate::journal::PathLog::open(meta::journal_path(peer))?.record(&[&full]))
                    .map_err(|e| Failure::Runtime(format!("recording the new {side} as stale: {e}")))?;
                log::warn!("side={side} is new to the pair: everything is copied to it");
                absent[side.index()] = Some(Absent::Stale);
            }
        }
        for side in Side::BOTH {
            if let Some(v) = &vols[side.index()] {
                locks.push(meta::lock_side(side, &v.path).map_err(Failure::Runtime)?);
            }
        }
    }
    Ok(Prepared {
        spec,
        opts,
        vols,
        absent,
        _locks: locks,
    })
}

/// `mirrorfs mount`. Without `foreground`, returns in the parent once the
/// mount is live, while a child serves it.
pub fn mount(spec: &str, mountpoint: &Path, opts: Options, foreground: bool) -> Result<(), Failure> {
    let prepared = prepare(spec, mountpoint, opts)?;
    if foreground {
        return serve(prepared, &mut None);
    }
    let (rd, wr) = nix::unistd::pipe().map_err(|e| Failure::Runtime(format!("pipe: {e}")))?;
    // SAFETY: no thread has been started yet, so the child is a plain copy.
    match unsafe { nix::unistd::fork() }.map_err(|e| Failure::Runtime(format!("fork: {e}")))? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(wr);
            let mut msg = String::new();
            let _ = File::from(rd).read_to_string(&mut msg);
            match msg.strip_prefix("ok") {
                Some(_) => Ok(()),
                None if msg.is_empty() => Err(Failure::Runtime("the daemon exited before the mount was live".into())),
                None => Err(Failure::Runtime(msg.trim().to_string())),
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let mut pipe = Some(File::from(wr));
            let r = detach(&prepared.spec.mountpoint).and_then(|_| serve(prepared, &mut pipe));
            if let (Err(e), Some(p)) = (&r, pipe.as_mut()) {
                let _ = p.write_all(e.message().as_bytes());
            }
            std::process::exit(if r.is_ok() { 0 } else { 1 });
        }
    }
}

/// The largest readahead given to the mount, in KiB.
const MAX_READAHEAD_KB: u64 = 16 << 10;

/// Sets the mount's readahead, which the kernel starts at 128 KiB for a
/// FUSE mount, to the largest of the sides' devices' (at least one full
/// request, `MAX_WRITE`; at most `MAX_READAHEAD_KB`). A cold sequential
/// read then arrives as 1 MiB requests, several in flight, instead of
/// 128 KiB ones: on this project's test machine, context switches per GiB
/// read went from 9,500 to 2,500. Needs root (sysfs); otherwise the
/// kernel's default stays. The handshake has run, so the kernel will not
/// lower it again.
fn widen_readahead(mnt: &Path, roots: &[&Path]) {
    let Some(dev) = mirrorfs_mounts()
        .into_iter()
        .find(|m| m.mountpoint == mnt)
        .map(|m| m.dev)
    else {
        return;
    };
    let want = roots
        .iter()
        .filter_map(|root| fs::metadata(root).ok())
        .filter_map(|md| device_readahead_kb(std::os::unix::fs::MetadataExt::dev(&md)))
        .max()
        .unwrap_or(0)
        .clamp(u64::from(crate::fs::MAX_WRITE) >> 10, MAX_READAHEAD_KB);
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match fs::write(&knob, format!("{want}\n")) {
        Ok(()) => log::info!("readahead of {} set to {want} KiB", mnt.display()),
        Err(e) => log::info!("readahead of {} left as it is ({knob}: {e})", mnt.display()),
    }
}

/// The readahead of the block device (or other bdi) that holds `dev`.
fn device_readahead_kb(dev: u64) -> Option<u64> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let block = format!("/sys/dev/block/{major}:{minor}");
    // A partition's queue is its disk's, one directory up.
    [
        format!("{block}/queue/read_ahead_kb"),
        format!("{block}/../queue/read_ahead_kb"),
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
    ]
    .iter()
    .find_map(|p| fs::read_to_string(p).ok()?.trim().parse().ok())
}

/// Tells systemd (`Type=notify`) that the mount is live, so that units
/// ordered after this one (a database) start only once it serves. Does
/// nothing outside systemd.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let msg = format!("READY=1\nMAINPID={}\n", std::process::id());
    let bytes = path.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket: its name follows a NUL byte.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
        }
        None => sock.send_to(msg.as_bytes(), Path::new(&path)),
    };
    if let Err(e) = sent {
        log::warn!(
            "cannot tell systemd the mount is ready ({}): {e}",
            path.to_string_lossy()
        );
    }
}

/// Leaves the terminal: new session, stdin from /dev/null, output to the
/// mount's log file.
fn detach(mountpoint: &Path) -> Result<(), Failure> {
    nix::unistd::setsid().map_err(|e| Failure::Runtime(format!("setsid: {e}")))?;
    let _ = fs::create_dir_all(RUN_DIR);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(runtime_file(mountpoint, "log"))
        .or_else(|_| OpenOptions::new().write(true).open("/dev/null"))
        .map_err(|e| Failure::Runtime(format!("log file: {e}")))?;
    let null = File::open("/dev/null").map_err(|e| Failure::Runtime(format!("/dev/null: {e}")))?;
    // SAFETY: dup2 onto the standard fds, which we own.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    let _ = std::env::set_current_dir("/");
    Ok(())
}

/// Starts FUSE over io_uring if INIT agreed on it (the kernel holds every
/// request until the ring is up). If the ring cannot be set up, the
/// kernel falls back to `/dev/fuse`, which fuser's threads serve.
fn start_ring(fs: MirrorFs, dev: OwnedFd) -> &'static str {
    const DEV: &str = "/dev/fuse";
    if !fs.uring_negotiated() {
        log::info!("transport={DEV}");
        return DEV;
    }
    match ring::start(fs, dev, FUSE_THREADS, crate::fs::MAX_WRITE as usize) {
        Ok(n) => {
            log::info!("transport=io_uring entries={n}");
            "io_uring"
        }
        Err(e) => {
            log::warn!("transport={DEV}: FUSE over io_uring could not start: {e}");
            DEV
        }
    }
}

fn fuser_config() -> fuser::Config {
    let mut cfg = fuser::Config::default();
    cfg.n_threads = Some(FUSE_THREADS);
    cfg.clone_fd = true;
    cfg
}

/// Opens /dev/fuse and mounts it with mount(2) as type `fuse.mirrorfs`, so
/// the mount table names the filesystem (fuser's own mount drops the subtype).
fn kernel_mount(spec: &MountSpec, opts: &Options) -> io::Result<OwnedFd> {
    let dev = OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
    let fd = OwnedFd::from(dev);
    let root_mode = fs::metadata(&spec.mountpoint)?.permissions().mode() & libc::S_IFMT;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions",
        fd.as_raw_fd(),
        root_mode | libc::S_IFDIR,
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if opts.read_only {
        flags |= libc::MS_RDONLY;
    }
    // Commas would split the option string; the source is only a label.
    let source = opts.fsname.clone().unwrap_or_else(|| spec.spec_string());
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let (src, target, fstype, data) = (
        c(source.as_bytes())?,
        c(spec.mountpoint.as_os_str().as_bytes())?,
        c(b"fuse.mirrorfs")?,
        c(data.as_bytes())?,
    );
    // SAFETY: all pointers are valid NUL-terminated strings.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The options as given, for status and the `mounted` event.
fn describe(opts: &Options) -> String {
    let mut v = Vec::new();
    for (name, on) in [
        ("ro", opts.read_only),
        ("allow_other", opts.allow_other),
        ("mirror_skip", opts.mirror_skip),
        ("noswitch", opts.noswitch),
        ("mirrors=off", opts.mirrors_off),
        ("async", opts.asynchronous),
    ] {
        if on {
            v.push(name.to_string());
        }
    }
    v.push(format!("side_timeout={}", opts.side_timeout.as_secs_f64()));
    v.push(format!("probe_interval={}", opts.probe_interval.as_secs_f64()));
    if opts.asynchronous {
        v.push(format!("max_lag={}", opts.max_lag.as_secs_f64()));
        v.push(format!("max_log={}", opts.max_log));
    }
    if let Some(h) = &opts.hook {
        v.push(format!("hook={}", h.display()));
    }
    v.join(",")
}

fn serve(p: Prepared, ready: &mut Option<File>) -> Result<(), Failure> {
    let Prepared {
        spec,
        opts,
        vols,
        absent,
        _locks,
    } = p;
    let rt = |what: &str, e: &dyn std::fmt::Display| Failure::Runtime(format!("{what}: {e}"));
    // Blocked here, before any thread exists, so every thread inherits the
    // mask and only the signal thread's sigwait receives them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| rt("blocking signals", &e))?;
    // SAFETY: umask has no failure mode. Modes come from the caller's request.
    unsafe { libc::umask(0) };

    let health = Arc::new(Health::default());
    for side in Side::BOTH {
        let (state, errno, op) = match absent[side.index()] {
            None => continue,
            Some(Absent::Off) => (SideState::Off, None, "mirrors=off"),
            Some(Absent::Unusable(e)) => (SideState::Down, Some(e), "mount"),
            Some(Absent::Stale) => (SideState::Down, Some(libc::ESTALE), "mount"),
            Some(Absent::Split) => {
                health.make_winner(side.other());
                continue;
            }
        };
        health.start_out_of_service(side, state, errno);
        // The survivor records, before anything is served, that this side
        // misses what follows; an older record is kept.
        if !opts.read_only
            && let Some(survivor) = &vols[side.other().index()]
            && matches!(meta::read_stale(&survivor.path), Ok(None))
        {
            let errno = errno_label(errno);
            meta::record_stale(&survivor.path, side, op, &errno).map_err(|e| rt("recording the absent side", &e))?;
        }
    }
    // A read-only mount writes nothing to the sides, not even events.
    let log_roots = [0, 1].map(|i| vols[i].as_ref().filter(|_| !opts.read_only).map(|v| v.path.clone()));
    let events =
        Arc::new(Events::start(log_roots, health.clone(), opts.hook.clone()).map_err(|e| rt("starting events", &e))?);
    let [pv, mv] = vols;
    let config = EngineConfig {
        side_timeout: opts.side_timeout,
        policy: if opts.noswitch {
            Policy::NoSwitch
        } else {
            Policy::Switch
        },
        threads: SIDE_THREADS,
        // fuser's threads, the ring's, and the ring threads that take an
        // entry over from one stuck in a hung side.
        inline_threads: FUSE_THREADS * 3,
        inline_budget: INLINE_BUDGET,
    };
    let mut engine = Engine::new(pv, mv, health, events.clone(), config).map_err(|e| rt("starting workers", &e))?;
    // The survivor records the failed side as stale before the failing
    // operation is answered, so a restart never serves the stale side.
    let roots = [spec.primary.clone(), spec.mirror.clone()];
    engine.set_on_down(Box::new(move |side, op, errno| {
        let survivor = &roots[side.other().index()];
        let errno = errno_label(errno);
        if let Err(e) = meta::record_stale(survivor, side, op, &errno) {
            log::error!(
                "side={side} cannot record the side as stale on {}: {e}",
                survivor.display()
            );
        }
    }));
    let engine = Arc::new(engine);
    engine.start_watchdog().map_err(|e| rt("watchdog thread", &e))?;
    if absent.contains(&Some(Absent::Split)) {
        engine.set_split();
    }
    if !opts.read_only {
        start_journals(&engine, &absent).map_err(|e| rt("the journals", &e))?;
        if opts.asynchronous {
            engine
                .start_follow(opts.max_lag, opts.max_log)
                .map_err(|e| rt("the change log", &e))?;
        } else {
            engine
                .drain_log()
                .map_err(|e| rt("the change log of an async mount", &e))?;
        }
    }
    let fs = MirrorFs::new(
        engine.clone(),
        FsConfig {
            read_only: opts.read_only,
            uring: ring::wanted(),
        },
    )
    .map_err(|e| rt("reading the root", &e))?;
    let ring_fs = fs.clone();
    let open_files = fs.open_files();
    let fuse_fd = kernel_mount(&spec, &opts).map_err(|e| rt(&format!("mounting {}", spec.mountpoint.display()), &e))?;
    let acl = if opts.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    let ring_fd = fuse_fd.try_clone().map_err(|e| rt("/dev/fuse", &e))?;
    let session = match fuser::Session::from_fd(fs, fuse_fd, acl, fuser_config()) {
        Ok(s) => s,
        Err(e) => {
            let _ = unmount_now(&spec.mountpoint);
            return Err(rt("FUSE handshake", &e));
        }
    };
    let transport = start_ring(ring_fs, ring_fd);

    let in_service: Vec<&Path> = Side::BOTH
        .iter()
        .filter(|side| absent[side.index()].is_none())
        .map(|&side| spec.side(side))
        .collect();
    widen_readahead(&spec.mountpoint, &in_service);
    let _ = fs::create_dir_all(RUN_DIR);
    let _ = fs::set_permissions(RUN_DIR, fs::Permissions::from_mode(0o755));
    let pid_file = runtime_file(&spec.mountpoint, "pid");
    let _ = fs::write(&pid_file, format!("{}\n", std::process::id()));
    let catchup = Arc::new(Catchup::new(
        engine.clone(),
        open_files,
        spec.clone(),
        !opts.noautoresync && !opts.read_only,
    ));
    let ctl = Arc::new(Control {
        catchup: (!opts.read_only).then(|| catchup.clone()),
        engine: engine.clone(),
        spec: spec.clone(),
        options: describe(&opts),
        owner: nix::unistd::getuid().as_raw(),
        started: Instant::now(),
        transport,
    });
    let socket = match control::start(ctl) {
        Ok(p) => Some(p),
        Err(e) => {
            log::error!("control socket: {e}: status will not answer for this mount");
            None
        }
    };
    log::info!(
        "mounted mountpoint={} primary={} mirror={}",
        spec.mountpoint.display(),
        spec.primary.display(),
        spec.mirror.display()
    );
    events.emit(Event::new(Kind::Mounted).detail(format!(
        "{} on {} ({})",
        spec.spec_string(),
        spec.mountpoint.display(),
        describe(&opts)
    )));
    for side in Side::BOTH {
        let errno = match absent[side.index()] {
            Some(Absent::Unusable(e)) => Some(e),
            Some(Absent::Stale) => Some(libc::ESTALE),
            _ => continue,
        };
        let why = if errno == Some(libc::ESTALE) {
            "stale: it missed changes"
        } else {
            "missing or unusable"
        };
        events.emit(
            Event::new(Kind::MirrorSkip)
                .side(side)
                .errno(errno)
                .detail(format!("the {side} is {why}; the mount starts without it")),
        );
    }
    // Closing the pipe after "ok" lets the parent exit.
    if let Some(mut pipe) = ready.take() {
        let _ = pipe.write_all(b"ok");
    }
    notify_ready();

    let mnt = spec.mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                match signals.wait() {
                    Ok(sig) => {
                        log::info!("signal={sig:?} unmounting mountpoint={}", mnt.display());
                        if let Err(e) = unmount_now(&mnt) {
                            log::warn!("unmount of {} failed: {e}", mnt.display());
                        }
                    }
                    Err(e) => {
                        log::warn!("sigwait failed: {e}");
                        return;
                    }
                }
            }
        })
        .map_err(|e| rt("signal thread", &e))?;
    if absent.contains(&Some(Absent::Split)) {
        events.emit(Event::new(Kind::SplitBrain).detail(
            "both sides took changes the other lacks: nothing is served until \
             `mirrorfs resync --from primary|mirror` names the winner",
        ));
    }
    let prober = Prober {
        engine: engine.clone(),
        spec: spec.clone(),
        timeout: opts.side_timeout,
    };
    let interval = opts.probe_interval;
    std::thread::Builder::new()
        .name("prober".into())
        .spawn(move || prober.run(interval))
        .map_err(|e| rt("prober thread", &e))?;
    if !opts.read_only {
        std::thread::Builder::new()
            .name("resync".into())
            .spawn(move || catchup.run())
            .map_err(|e| rt("resync thread", &e))?;
        let e = engine.clone();
        let period = intent_period();
        std::thread::Builder::new()
            .name("intent".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(period);
                    clear_intent(&e);
                }
            })
            .map_err(|e| rt("intent thread", &e))?;
        // Catches up a stale side, or files a crash left unequal, now.
        engine.want_resync();
    }

    let r = serve_until_unmounted(session, &spec.mountpoint);
    clear_intent(&engine);
    // Closing a file on a hung side would wait for it (FLUSH): the locks
    // are released without closing, so a new mount can take the sides as
    // soon as this one is gone.
    for l in &_locks {
        l.unlock();
    }
    std::mem::forget(_locks);
    events.emit(Event::new(Kind::Unmounted).detail(format!("divergences={}", engine.divergences())));
    events.flush(Duration::from_secs(5));
    let _ = fs::remove_file(&pid_file);
    if let Some(s) = socket {
        let _ = fs::remove_file(s);
    }
    log::info!(
        "unmounted mountpoint={} divergences={}",
        spec.mountpoint.display(),
        engine.divergences()
    );
    r.map_err(|e| rt("serving", &e))
}

/// How often the write-intent record is cleared, when changes were made:
/// as often as the kernel writes dirty data out by age
/// (`vm.dirty_expire_centisecs`, 30 s by default), within these bounds.
/// Clearing syncs the epoch's files on both sides; done sooner than the
/// kernel would write them, it forces out data that would not have
/// reached the disk yet, or ever: a file created and removed within 30 s
/// costs no disk write natively, and on ext4 with `discard` its unlink
/// then waits for a synchronous discard (measured: 2 s epochs made an
/// unlink of a just-written file cost about 0.6 ms, most of it that
/// wait). A longer epoch costs only a crash recovery that compares more.
const INTENT_CLEAR: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(60)];

fn intent_period() -> Duration {
    let centis = fs::read_to_string("/proc/sys/vm/dirty_expire_centisecs")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(3000);
    Duration::from_millis(centis * 10).clamp(INTENT_CLEAR[0], INTENT_CLEAR[1])
}

/// Opens each served side's journal and the write-intent record. A
/// write-intent record left by a run that did not end cleanly names the
/// files whose writes were in flight: they go into the journal of the side
/// that serves, and are caught up from it as soon as the mount is live
/// (`crash_recovery`).
fn start_journals(engine: &Engine, absent: &[Option<Absent>; 2]) -> io::Result<()> {
    for side in Side::BOTH {
        if let Ok(v) = engine.volume(side) {
            engine.set_journal(side, crate::journal::PathLog::open(meta::journal_path(&v.path))?);
        }
    }
    let Ok(primary) = engine.volume(Side::Primary) else {
        return Ok(());
    };
    let dir = meta::meta_dir(&primary.path);
    let leftover = Intent::leftover(&dir)?;
    if !leftover.is_empty() {
        let source = if engine.health.is_up(Side::Primary) {
            Side::Primary
        } else {
            Side::Mirror
        };
        if let Some(j) = engine.journal(source) {
            let refs: Vec<&Path> = leftover.iter().map(PathBuf::as_path).collect();
            j.record(&refs)?;
        }
        if absent.iter().all(Option::is_none) {
            log::warn!(
                "crash recovery: {} path(s) had writes in flight; they are caught up from the primary",
                leftover.len()
            );
            engine.events.emit(Event::new(Kind::CrashRecovery).detail(format!(
                "{} path(s) had writes in flight when the last run ended; caught up from the primary",
                leftover.len()
            )));
        }
    }
    engine.set_intent(Intent::open(&dir)?);
    Ok(())
}

/// Clears the write-intent record once its changes are durable on both
/// sides: switch epochs with changes held off (so none of the old epoch is
/// in flight), sync both sides, then forget the old epoch.
///
/// The record is on the primary, so nothing is done while the primary is
/// out of service (the record then stays, and a later mount compares its
/// paths once more); and its file is removed on the primary's lane, with
/// `side_timeout`, never in this thread: a primary that hangs must not hold
/// the unmount, which clears the record last.
fn clear_intent(engine: &Arc<Engine>) {
    let Some(intent) = engine.intent() else { return };
    if intent.idle() || !engine.health.takes_changes(Side::Primary) {
        return;
    }
    let old = {
        let _x = engine.exclusive();
        intent.switch()
    };
    // A marked directory (`writes_in`) is synced as a directory; the files
    // written under its mark are in the set by name.
    let paths: BTreeSet<PathBuf> = intent
        .paths(old)
        .iter()
        .map(|p| crate::journal::unmark(p).0.to_path_buf())
        .collect();
    let paths = Arc::new(paths);
    for side in Side::BOTH {
        if !engine.health.takes_changes(side) {
            continue;
        }
        let p = paths.clone();
        // A few files are synced one by one, so that other data on the
        // sides' filesystems is not forced out with ours; past a few
        // hundred, one syncfs costs less than their fsyncs.
        let r = if p.len() > SYNC_BY_NAME {
            engine.on_side(side, "syncfs", |v| v.syncfs())
        } else {
            engine.on_side(side, "fsync", move |v| v.sync_paths(p.iter().map(PathBuf::as_path)))
        };
        if let Err(e) = r {
            log::warn!("side={side} syncing the write-intent record's files failed: {e}; the record is kept");
            return;
        }
    }
    let e = engine.clone();
    let cleared = engine.on_side(Side::Primary, "intent", move |_| match e.intent() {
        Some(intent) => intent.clear(old),
        None => Ok(()),
    });
    if let Err(e) = cleared {
        log::warn!("clearing the write-intent record: {e}");
    }
}
/// Watches each side's root and the directory that holds it, so that a
/// side whose volume is mounted again is probed at once rather than at the
/// next `probe_interval`. Without the watch, probing goes on by the clock.
///
/// Only while a side is down: a watch on a root sees every change to the
/// entries in it, and would wake two threads for each write to a file at
/// the top of the mount.
fn watch_roots(spec: &MountSpec, tx: crossbeam_channel::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let watcher = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
        let _ = tx.send(());
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            log::info!("no watch on the sides' parents ({e}): probing by the clock alone");
            return None;
        }
    };
    for side in Side::BOTH {
        let root = spec.side(side);
        for dir in [Some(root), root.parent()].into_iter().flatten() {
            if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                log::debug!("watch {}: {e}", dir.display());
            }
        }
    }
    Some(watcher)
}

/// Probes every side that is down, every `probe_interval`, to see whether
/// it answers again: its root opens, and a file in its `.mirrorfs` can be
/// written, synced and removed. A probe that hangs holds only its own
/// thread, and no second probe of that side starts until it returns.
struct Prober {
    engine: Arc<Engine>,
    spec: MountSpec,
    timeout: Duration,
}

impl Prober {
    fn run(self, interval: Duration) {
        let (tx, wake) = crossbeam_channel::unbounded();
        let mut watcher = None;
        let busy = [Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false))];
        loop {
            let any_down = Side::BOTH
                .iter()
                .any(|s| self.engine.health.state(*s) == SideState::Down);
            match (any_down, watcher.is_some()) {
                (true, false) => watcher = watch_roots(&self.spec, tx.clone()),
                (false, true) => watcher = None,
                _ => {}
            }
            if wake.recv_timeout(interval).is_ok() {
                // A burst of changes around a root is one reason to look.
                std::thread::sleep(Duration::from_millis(200));
                while wake.try_recv().is_ok() {}
            }
            for side in Side::BOTH {
                if self.engine.health.state(side) != SideState::Down || busy[side.index()].swap(true, Ordering::AcqRel)
                {
                    continue;
                }
                let (tx, rx) = crossbeam_channel::bounded(1);
                let path = self.spec.side(side).to_path_buf();
                let flag = busy[side.index()].clone();
                let started = std::thread::Builder::new()
                    .name(format!("probe-{side}"))
                    .spawn(move || {
                        let r = Volume::open(side, &path).and_then(|v| v.probe());
                        let _ = tx.send(r);
                        flag.store(false, Ordering::Release);
                    });
                if started.is_err() {
                    busy[side.index()].store(false, Ordering::Release);
                    continue;
                }
                let errno = match rx.recv_timeout(self.timeout) {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.raw_os_error().unwrap_or(libc::EIO)),
                    Err(_) => Some(libc::ETIMEDOUT),
                };
                let prev = self.engine.health.set_probe(
                    side,
                    Probe {
                        at: SystemTime::now(),
                        errno,
                    },
                );
                if prev.map(|p| p.errno.is_none()) != Some(errno.is_none()) {
                    match errno {
                        None => log::info!("side={side} answers its probe again"),
                        Some(e) => log::info!("side={side} probe failed errno={}", errno_name(e)),
                    }
                }
                if errno.is_none() {
                    self.engine.want_resync();
                }
            }
        }
    }
}

/// How long the end of the session waits for its threads once the kernel
/// has ended the connection.
const SESSION_JOIN: Duration = Duration::from_secs(2);

/// Serves until the kernel ends the connection (unmount). The session's
/// threads are then waited for only a moment: one stuck in a hung primary
/// (its request was answered by a rescuer) may never return, and must not
/// hold up the unmount or the release of the sides.
///
/// The end of the mount is seen in the mount table, looked at once a
/// second while the session runs. (Polling /dev/fuse instead would wake
/// this thread on every request the kernel queues.)
fn serve_until_unmounted<FS: fuser::Filesystem + Send + 'static>(
    session: fuser::Session<FS>,
    mountpoint: &Path,
) -> io::Result<()> {
    // The handoff channel sleeps at once; crossbeam's receiver would spin
    // and yield on each of these once-a-second waits.
    let (tx, rx) = handoff::channel();
    std::thread::Builder::new().name("fuse-session".into()).spawn(move || {
        tx.send(session.run());
    })?;
    // Only a mount once seen in the table and then gone counts as ended: a
    // mountpoint the table spells differently must not end a live session.
    let mut seen = false;
    loop {
        let mounted = mirrorfs_mounts().iter().any(|m| m.mountpoint == mountpoint);
        if seen && !mounted {
            break;
        }
        seen |= mounted;
        match rx.recv_deadline(Instant::now() + Duration::from_secs(1)) {
            Ok(r) => return r,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    match rx.recv_deadline(Instant::now() + SESSION_JOIN) {
        Ok(r) => r,
        Err(_) => {
            log::warn!("a FUSE thread is still inside a call on a hung side; not waiting for it");
            Ok(())
        }
    }
}

/// Unmounts; a busy mount is detached so it ends when its last user leaves.
fn unmount_now(mnt: &Path) -> io::Result<()> {
    let c = CString::new(mnt.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EBUSY) {
        return Err(e);
    }
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A mirrorfs mount already at `mnt` is refused while its daemon runs. One
/// left by a daemon that was killed is detached, once that daemon has
/// finished exiting (waiting up to `EXIT_WAIT`), so that a restart right
/// after a crash (systemd's `Restart=on-failure`) finds the mountpoint free.
fn clear_dead_mount(mountpoint: &Path) -> Result<(), Failure> {
    // As the mount table spells it, without touching the mount itself (a
    // dead mount's own path cannot be resolved: ENOTCONN).
    let mnt = control::mountpoint_of(mountpoint);
    if !mirrorfs_mounts().iter().any(|m| m.mountpoint == mnt) {
        return Ok(());
    }
    let pid = daemon_pid(&mnt);
    let answering = || std::os::unix::net::UnixStream::connect(control::socket_path(&mnt)).is_ok();
    let busy = Failure::Runtime(format!("{} is already a mirrorfs mount", mnt.display()));
    match pid.map(liveness) {
        Some(Liveness::Running) => return Err(busy),
        None if answering() => return Err(busy),
        _ => {}
    }
    if let Some(pid) = pid
        && liveness(pid) == Liveness::Exiting
    {
        log::warn!(
            "the daemon of the mount at {} (pid {pid}) is exiting: waiting up to {} s for it",
            mnt.display(),
            EXIT_WAIT.as_secs()
        );
        let deadline = Instant::now() + EXIT_WAIT;
        while liveness(pid) == Liveness::Exiting && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let c = CString::new(mnt.as_os_str().as_bytes()).map_err(|_| Failure::Usage("bad path".into()))?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        return Err(Failure::Runtime(format!(
            "cannot detach the mount at {} left by a daemon that is gone: {e}",
            mnt.display()
        )));
    }
    log::warn!(
        "detached the mount at {} left by a daemon that is gone{}",
        mnt.display(),
        pid.map_or(String::new(), |p| format!(" (pid {p})"))
    );
    Ok(())
}

/// The pid the daemon of the mount at `mnt` wrote, if any.
fn daemon_pid(mnt: &Path) -> Option<i32> {
    fs::read_to_string(runtime_file(mnt, "pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// `mirrorfs unmount`: unmounts and waits for the daemon to finish.
pub fn unmount(mountpoint: &Path) -> Result<(), Failure> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let mnt = crate::spec::absolutize(mountpoint, &cwd);
    let mnt = fs::canonicalize(&mnt).unwrap_or(mnt);
    if !mirrorfs_mounts().iter().any(|m| m.mountpoint == mnt) {
        return Err(Failure::Usage(format!("{} is not a mirrorfs mount", mnt.display())));
    }
    let pid = daemon_pid(&mnt);
    let c = CString::new(mnt.as_os_str().as_bytes()).map_err(|_| Failure::Usage("bad path".into()))?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        return Err(Failure::Runtime(format!("cannot unmount {}: {e}", mnt.display())));
    }
    if let Some(pid) = pid {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Until its main thread has ended: threads stuck on a hung side may
        // outlive it, but the daemon released its side locks before that.
        while liveness(pid) == Liveness::Running && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}
