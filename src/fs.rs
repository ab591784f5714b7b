//! The operations of mirrorfs, for either transport: `impl
//! fuser::Filesystem` (`/dev/fuse`) and `ring` (FUSE over io_uring).
//!
//! Owns: the translation between FUSE requests and the engine. Each
//! operation (`<op>_op`) is written once, generic over the kind of answer
//! (`reply`), hands `serve` a `do_<op>` returning `io::Result`, and replies
//! exactly once; the trait methods only unpack fuser's arguments. Which
//! side answers and what a side failure does are the engine's business
//! (`engine::resolve`).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use crate::changelog::Change;
use crate::engine::bufpool::PooledBuf;
use crate::engine::follow::Follow;
use crate::engine::gate::Pass;
use crate::engine::inline::{Flight, Rescue};
use crate::engine::{Effect, Engine, Pace, Subject};
use crate::nodes::{Handles, Key, Nodes, OpenDir, OpenFile, OpenFiles, ROOT};
use crate::reply;
use crate::spec::Side;
use crate::volume::{self, META_DIR, Owner, SetTime, Stat, Volume};

/// How long statfs waits for the side that does not answer it.
const STATFS_PEEK: Duration = Duration::from_secs(1);

/// The largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;

/// A write at least this large runs on the mirror's lane at the same time
/// as the primary's (`Pace::Concurrent`); a smaller one after it, in the
/// FUSE thread. (1 GiB written with dd, 1 MiB blocks, writeback cache: 197,
/// 209 and 203 MB/s so; 121, 197 and 188 MB/s with every write in the FUSE
/// thread.)
const CONCURRENT_WRITE: usize = 64 << 10;

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn dtype_kind(dtype: u8) -> FileType {
    match dtype {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// A time given as seconds and nanoseconds since the epoch (before it: a
/// negative second and a positive nanosecond, as `struct timespec`).
pub fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

/// `system_time`'s inverse: seconds and nanoseconds since the epoch.
pub fn since_epoch(t: SystemTime) -> (i64, i64) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
        Err(e) => {
            let d = e.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut nanos = -(d.subsec_nanos() as i64);
            if nanos < 0 {
                secs -= 1;
                nanos += 1_000_000_000;
            }
            (secs, nanos)
        }
    }
}

fn attr(ino: u64, st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>, now: SystemTime) -> SetTime {
    let t = match t {
        None => return SetTime::Omit,
        Some(TimeOrNow::Now) => now,
        Some(TimeOrNow::SpecificTime(t)) => t,
    };
    let (secs, nanos) = since_epoch(t);
    SetTime::At { secs, nanos }
}

/// Flags for opening the backing files. O_APPEND is dropped because the
/// kernel sends each write with its offset, and both sides must write at the
/// same one; O_DIRECT is dropped because the page cache sits above us;
/// write-only becomes read-write so the kernel can read pages it caches.
fn backing_flags(flags: i32) -> i32 {
    let acc = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => libc::O_RDONLY,
        _ => libc::O_RDWR,
    };
    acc | (flags & (libc::O_SYNC | libc::O_DSYNC)) | libc::O_NOFOLLOW
}

fn key(side: Side, st: &Stat) -> Key {
    Key {
        side,
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

/// What a setattr or xattr call acts on: an open file, or a path.
enum Target {
    File(Arc<OpenFile>),
    Path(PathBuf),
}

/// Writes `data` at `offset` through `file`'s fd on `side`, then clears the
/// set-ID bits if asked.
fn write_on(file: &OpenFile, side: Side, data: &[u8], offset: u64, kill_setid: bool) -> io::Result<usize> {
    let fd = file.fd(side)?;
    let n = volume::pwrite_all(fd.as_fd(), data, offset)?;
    if kill_setid {
        volume::kill_setid(fd.as_fd())?;
    }
    Ok(n)
}

/// CAP_FSETID's bit in a capability set.
const CAP_FSETID: u32 = 4;

/// Who made a request, as far as clearing set-ID bits needs: whether the
/// caller lacks CAP_FSETID is looked up (in `/proc`) only when a file's
/// set-ID bits make it matter, and at most once per request.
struct Caller {
    pid: u32,
    uid: u32,
    lacks: OnceLock<bool>,
}

impl Caller {
    fn of(who: Who) -> Caller {
        Caller {
            pid: who.pid,
            uid: who.uid,
            lacks: OnceLock::new(),
        }
    }

    fn lacks_fsetid(&self) -> bool {
        *self.lacks.get_or_init(|| {
            // The pid FUSE gives is the calling thread's; /proc has it too.
            let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
            let eff = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok());
            match eff {
                Some(caps) => caps & (1 << CAP_FSETID) == 0,
                // The caller is gone: judge by its uid, as most systems run.
                None => self.uid != 0,
            }
        })
    }
}

/// At most this many entries are looked at per READDIRPLUS: more than fit
/// in the kernel's usual 4 KiB reply, so that no call stats a whole large
/// directory only to send its first entries.
const PLUS_BATCH: usize = 64;

/// One READDIRPLUS's worth of a directory.
struct Plus {
    dir: u64,
    dattr: FileAttr,
    items: Vec<(u64, std::ffi::OsString, Side, Stat)>,
}

/// Sends a directory listing from `offset` on ("." and ".." first).
fn fill_readdir(reply: &mut impl reply::Dir, dir: u64, entries: &[volume::DirEntry], offset: u64) {
    let dots = [
        (OsStr::new("."), FileType::Directory),
        (OsStr::new(".."), FileType::Directory),
    ];
    let all = dots
        .iter()
        .map(|(n, k)| (dir, *k, *n))
        .chain(entries.iter().map(|e| (e.ino, dtype_kind(e.dtype), e.name.as_os_str())));
    for (i, (ino, k, name)) in all.enumerate().skip(offset as usize) {
        if reply.add(ino, i as u64 + 1, k, name) {
            break;
        }
    }
}

/// Mount-time settings the filesystem needs.
#[derive(Clone, Copy, Debug)]
pub struct FsConfig {
    pub read_only: bool,
    /// Ask the kernel for FUSE over io_uring (`ring`).
    pub uring: bool,
}

#[derive(Clone)]
pub struct MirrorFs {
    core: Arc<Core>,
}

/// What serves requests; shared with a rescuer that answers a request
/// again when its call on the primary hung (`engine::inline`).
struct Core {
    engine: Arc<Engine>,
    nodes: Arc<Nodes>,
    files: Arc<Handles<OpenFile>>,
    dirs: Handles<OpenDir>,
    config: FsConfig,
    /// The kernel took FUSE_OVER_IO_URING at INIT.
    uring: AtomicBool,
}

impl MirrorFs {
    pub fn new(engine: Arc<Engine>, config: FsConfig) -> io::Result<MirrorFs> {
        let side = engine.reader();
        let st = engine.volume(side)?.lstat(Path::new(""))?;
        let nodes = Arc::new(Nodes::new(key(side, &st)));
        let n = nodes.clone();
        engine.set_resolver(Box::new(move |ino| n.path(ino).ok()));
        Ok(MirrorFs {
            core: Arc::new(Core {
                nodes,
                engine,
                files: Arc::new(Handles::default()),
                dirs: Handles::default(),
                config,
                uring: AtomicBool::new(false),
            }),
        })
    }

    /// True once INIT agreed on FUSE over io_uring: the ring must then be
    /// started, or the kernel holds every request.
    pub fn uring_negotiated(&self) -> bool {
        self.core.uring.load(Ordering::Acquire)
    }

    /// The open files, for the resyncer.
    pub fn open_files(&self) -> OpenFiles {
        OpenFiles::new(self.core.files.clone(), self.core.nodes.clone())
    }

    /// Serves one request: `handler` computes the answer, `finish` sends
    /// it. The handler may run a second time, in a rescuer, if a call on
    /// the primary hangs (it then finds the primary down and is served by
    /// the mirror); it owns its arguments for that reason. `finish` runs
    /// exactly once, with whichever answer comes first.
    fn serve<R: Send + 'static, T: 'static>(
        &self,
        reply: R,
        handler: impl Fn(&Core) -> io::Result<T> + Send + Sync + 'static,
        finish: impl FnOnce(R, io::Result<T>) + Send + 'static,
    ) -> bool {
        let handler = Arc::new(handler);
        let answer = Arc::new(Mutex::new(Some((reply, finish))));
        let (core, h, a) = (self.core.clone(), handler.clone(), answer.clone());
        let flight = Flight::new(Box::new(move |how| {
            let r = match how {
                Rescue::Rerun => h(&core),
                Rescue::Fail(e) => Err(err(e)),
            };
            let taken = a.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some((reply, finish)) = taken {
                finish(reply, r);
            }
        }));
        let r = self.core.engine.serve(flight, || handler(&self.core));
        let taken = answer.lock().unwrap_or_else(|e| e.into_inner()).take();
        match taken {
            Some((reply, finish)) => {
                finish(reply, r);
                true
            }
            None => false,
        }
    }
}

/// How a change holds the names lock in async mode (`engine::follow`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Names {
    /// It names paths (or an open file's path) without moving any.
    Shared,
    /// It makes, removes or moves names.
    Exclusive,
}

impl Core {
    /// Runs `change` (through the engine). In async mode it runs on the
    /// primary alone, and what `records` makes of its result is appended
    /// to the change log before it is answered, under the names lock; a
    /// writer first waits while the mirror is more than `max_lag` behind.
    fn logged<T>(
        &self,
        names: Names,
        change: impl FnOnce() -> io::Result<T>,
        records: impl FnOnce(&T) -> Vec<Change>,
    ) -> io::Result<T> {
        let Some(f) = self.engine.following().cloned() else {
            return change();
        };
        let engine = &self.engine;
        f.throttle(|| engine.mirror_following(), |over, lag| engine.lag_event(over, lag));
        let deadline = Instant::now() + engine.side_timeout();
        let Some(_names) = f.names_for_change(names == Names::Exclusive, deadline) else {
            log::warn!("side=primary a change waited side_timeout for the names lock");
            return Err(err(libc::EIO));
        };
        let r = change()?;
        for c in records(&r) {
            if let Err(e) = f.log.append(c) {
                // The change is on the primary: the mirror is resynced.
                return match engine.abandon_log(&e) {
                    Ok(()) => Ok(r),
                    Err(j) => {
                        log::error!("side=mirror cannot record the change the log lacks: {j}");
                        Err(err(libc::EIO))
                    }
                };
            }
        }
        engine.check_overflow();
        Ok(r)
    }

    /// The primary's path of an open file (None once it has no name).
    /// Called under the names lock: in async mode it is read once per
    /// names generation (no name moves while the lock is held shared).
    fn primary_path(&self, file: &OpenFile) -> Option<PathBuf> {
        let read = || {
            let fd = file.fd(Side::Primary).ok()?;
            let root = self.engine.volume(Side::Primary).ok()?.path.clone();
            Follow::path_of_fd(fd.as_raw_fd(), &root)
        };
        match self.engine.following() {
            Some(f) => file.path_in(f.generation(), read),
            None => read(),
        }
    }

    /// Runs `sync`, an fsync on the primary (of `file`, if it is one); in
    /// async mode, also makes every record appended so far durable (an
    /// fsync's promise covers the log before it). Where the log's records
    /// can ride on the file's flush (`Log::write_out`), they are written
    /// out first and `sync` is the one flush; otherwise the log is synced
    /// after it. (Flushing the log beside `sync`, on another thread, was
    /// measured slower on ext4: the two flushes wait on each other's
    /// journal commit.)
    fn with_log_synced(&self, file: Option<&OpenFile>, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let Some(f) = self.engine.following() else {
            return sync();
        };
        let failed = |e: io::Error| {
            log::error!("side=primary cannot sync the change log: {e}");
            err(libc::EIO)
        };
        let last = f.log.last();
        let fd = file.and_then(|file| file.fd(Side::Primary).ok());
        if let Some(fd) = fd
            && let Some(upto) = f.log.write_out(last, fd.as_fd()).map_err(failed)?
        {
            sync()?;
            f.log.flushed(upto);
            return Ok(());
        }
        sync()?;
        f.log.sync(last).map_err(failed)
    }

    /// Write records of `n` bytes at `offset` of `file`, read back from
    /// the primary (what a copy_file_range put there).
    fn copied(&self, file: &OpenFile, offset: u64, n: usize) -> Vec<Change> {
        let (Some(path), Ok(fd)) = (self.primary_path(file), file.fd(Side::Primary)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut done = 0;
        while done < n {
            let mut data = vec![0u8; (n - done).min(MAX_WRITE as usize)];
            match volume::pread(fd.as_fd(), &mut data, offset + done as u64) {
                Ok(0) => break,
                Ok(got) => {
                    data.truncate(got);
                    out.push(Change::Write {
                        path: path.clone(),
                        offset: offset + done as u64,
                        data,
                    });
                    done += got;
                }
                Err(e) => {
                    log::error!("side=primary cannot read back a copy for the change log: {e}");
                    break;
                }
            }
        }
        out
    }

    /// A target's path on the primary, for a record.
    fn target_path(&self, target: &Target) -> Option<PathBuf> {
        match target {
            Target::Path(p) => Some(p.clone()),
            Target::File(f) => self.primary_path(f),
        }
    }

    fn hidden(parent: u64, name: &OsStr) -> bool {
        parent == ROOT && name.as_bytes() == META_DIR.as_bytes()
    }

    fn writable(&self) -> io::Result<()> {
        if self.config.read_only {
            Err(err(libc::EROFS))
        } else if self.engine.stopped() {
            // Nothing is served while split, changes included.
            Err(err(libc::EIO))
        } else if self.engine.changes_refused() {
            Err(err(libc::EIO))
        } else {
            Ok(())
        }
    }

    /// The path of a new entry `name` under `parent`; the metadata directory
    /// cannot be created, replaced or removed through the mount.
    fn new_path(&self, parent: u64, name: &OsStr) -> io::Result<PathBuf> {
        self.writable()?;
        if Self::hidden(parent, name) {
            return Err(err(libc::EPERM));
        }
        self.nodes.child_path(parent, name)
    }

    fn existing_path(&self, parent: u64, name: &OsStr) -> io::Result<PathBuf> {
        if Self::hidden(parent, name) {
            return Err(err(libc::ENOENT));
        }
        self.nodes.child_path(parent, name)
    }

    /// Registers the entry a create-like call made and answers with it.
    fn entry(&self, parent: u64, name: &OsStr, side: Side, st: &Stat) -> FileAttr {
        let ino = self.nodes.remember(parent, name, key(side, st));
        attr(ino, st)
    }

    fn target(&self, ino: u64, fh: Option<FileHandle>) -> io::Result<Target> {
        if let Some(f) = fh.and_then(|fh| self.files.get(fh.0).ok()) {
            return Ok(Target::File(f));
        }
        match self.nodes.path(ino) {
            Ok(p) => Ok(Target::Path(p)),
            // An unlinked file that is still open keeps working through its handle.
            Err(e) => self.files.find(|f| f.ino == ino).map(Target::File).ok_or(e),
        }
    }

    fn do_lookup(&self, parent: u64, name: &OsStr) -> io::Result<FileAttr> {
        let path = self.existing_path(parent, name)?;
        let p = path.clone();
        let (side, st) = self.engine.read("lookup", Subject::Path(&path), move |side, v| {
            v.lstat(&p).map(|st| (side, st))
        })?;
        Ok(self.entry(parent, name, side, &st))
    }

    fn do_getattr(&self, ino: u64, fh: Option<FileHandle>) -> io::Result<FileAttr> {
        let st = match self.target(ino, fh)? {
            Target::File(f) => self.engine.read("getattr", Subject::Inode(ino), move |side, _| {
                volume::fstat(f.fd(side)?.as_fd())
            })?,
            Target::Path(p) => {
                let q = p.clone();
                self.engine
                    .read("getattr", Subject::Path(&p), move |_, v| v.lstat(&q))?
            }
        };
        Ok(attr(ino, &st))
    }

    fn do_setattr(&self, caller: &Arc<Caller>, ino: u64, c: Changes, now: SystemTime) -> io::Result<FileAttr> {
        self.writable()?;
        let Changes {
            mode, uid, gid, size, ..
        } = c;
        let target = Arc::new(self.target(ino, c.fh.map(FileHandle))?);
        let (at, mt) = (set_time(c.atime, now), set_time(c.mtime, now));
        let path = match &*target {
            Target::Path(p) => Some(p.clone()),
            Target::File(_) => None,
        };
        let of = path.as_deref().map_or(Subject::Inode(ino), Subject::Path);
        // The writeback cache's flush of mtime and ctime, on every fsync,
        // changes times alone.
        let times_only = mode.is_none() && uid.is_none() && gid.is_none() && size.is_none();
        let subject = if times_only { Subject::Times(&of) } else { of };
        // A truncate by a caller without CAP_FSETID clears the set-ID bits
        // (KILLPRIV_V2 leaves it to us); an explicit mode wins.
        let truncates = size.is_some() && mode.is_none();
        let caller = caller.clone();
        let recorded = target.clone();
        let apply = || {
            self.engine.apply("setattr", Pace::Sequential, subject, move |side, v| {
                // Owner first: chown clears set-ID bits, and an explicit mode in
                // the same request must win. Times last, after the size change
                // has touched mtime.
                match &*target {
                    Target::File(f) => {
                        let fd = f.fd(side)?;
                        let fd = fd.as_fd();
                        if uid.is_some() || gid.is_some() {
                            volume::fchown(fd, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
                        }
                        if let Some(m) = mode {
                            volume::fchmod(fd, m & 0o7777)?;
                        }
                        if let Some(s) = size {
                            volume::ftruncate(fd, s)?;
                        }
                        if at != SetTime::Omit || mt != SetTime::Omit {
                            volume::futimens(fd, at, mt)?;
                        }
                        let st = volume::fstat(fd)?;
                        if truncates && volume::without_setid(st.st_mode).is_some() && caller.lacks_fsetid() {
                            return volume::kill_setid(fd);
                        }
                        Ok(st)
                    }
                    Target::Path(p) => {
                        if uid.is_some() || gid.is_some() {
                            v.chown(p, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
                        }
                        if let Some(m) = mode {
                            v.chmod(p, m & 0o7777)?;
                        }
                        if let Some(s) = size {
                            v.truncate(p, s)?;
                        }
                        let st = if at != SetTime::Omit || mt != SetTime::Omit {
                            v.utimens_lstat(p, at, mt)?
                        } else {
                            v.lstat(p)?
                        };
                        if truncates && volume::without_setid(st.st_mode).is_some() && caller.lacks_fsetid() {
                            return v.kill_setid(p);
                        }
                        Ok(st)
                    }
                }
            })
        };
        let st = self.logged(Names::Shared, apply, |st: &Stat| {
            let Some(path) = self.target_path(&recorded) else {
                return Vec::new();
            };
            let mut out = Vec::new();
            if uid.is_some() || gid.is_some() {
                out.push(Change::Chown {
                    path: path.clone(),
                    uid: uid.unwrap_or(u32::MAX),
                    gid: gid.unwrap_or(u32::MAX),
                });
            }
            if let Some(m) = mode {
                out.push(Change::Chmod {
                    path: path.clone(),
                    mode: m & 0o7777,
                });
            }
            if let Some(size) = size {
                out.push(Change::Truncate {
                    path: path.clone(),
                    size,
                });
            }
            if uid.is_some() || gid.is_some() || size.is_some() {
                // A chown or truncate may have cleared set-ID bits.
                out.push(Change::Chmod {
                    path: path.clone(),
                    mode: st.st_mode & 0o7777,
                });
            }
            if at != SetTime::Omit || mt != SetTime::Omit {
                out.push(Change::Times {
                    path,
                    atime: at,
                    mtime: mt,
                });
            }
            out
        })?;
        Ok(attr(ino, &st))
    }

    fn do_readlink(&self, ino: u64) -> io::Result<Vec<u8>> {
        let p = self.nodes.path(ino)?;
        let q = p.clone();
        self.engine
            .read("readlink", Subject::Path(&p), move |_, v| v.readlink(&q))
    }

    /// Runs a create-like change on both sides and answers with the new entry.
    fn make(
        &self,
        op: &str,
        parent: u64,
        name: &OsStr,
        f: impl Fn(&Volume, &Path) -> io::Result<()> + Send + Sync + 'static,
        record: impl FnOnce(PathBuf) -> Change,
    ) -> io::Result<FileAttr> {
        let path = self.new_path(parent, name)?;
        let p = path.clone();
        let made = || {
            let mut pair = self
                .engine
                .change(Pace::Sequential, Subject::Entry(&path), move |_, v| {
                    f(v, &p)?;
                    v.lstat(&p)
                });
            let side = self.engine.settle(op, Subject::Entry(&path), &pair)?;
            let st = pair.take_ok(side).ok_or_else(|| err(libc::EIO))?;
            Ok((side, st))
        };
        let (side, st) = self.logged(Names::Exclusive, made, |_| vec![record(path.clone())])?;
        Ok(self.entry(parent, name, side, &st))
    }

    fn do_unlink(&self, parent: u64, name: &OsStr, dir: bool) -> io::Result<()> {
        self.writable()?;
        let path = self.existing_path(parent, name)?;
        let p = path.clone();
        let op = if dir { "rmdir" } else { "unlink" };
        let remove = || {
            self.engine
                .apply(op, Pace::Sequential, Subject::Entry(&path), move |_, v| {
                    if dir { v.rmdir(&p) } else { v.unlink(&p) }
                })
        };
        self.logged(Names::Exclusive, remove, |_| {
            let path = path.clone();
            vec![if dir {
                Change::Rmdir { path }
            } else {
                Change::Unlink { path }
            }]
        })?;
        self.nodes.unlinked(parent, name);
        Ok(())
    }

    fn do_rename(&self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: u32) -> io::Result<()> {
        self.writable()?;
        if Self::hidden(parent, name) || Self::hidden(newparent, newname) {
            return Err(err(libc::EPERM));
        }
        let from = self.nodes.child_path(parent, name)?;
        let to = self.nodes.child_path(newparent, newname)?;
        let (f, t) = (from.clone(), to.clone());
        // The kernel has looked the destination up: it is in the table if
        // it exists.
        let subject = if flags & libc::RENAME_EXCHANGE == 0 && !self.nodes.has_child(newparent, newname) {
            Subject::Moved(&from, &to)
        } else {
            Subject::Two(&from, &to)
        };
        let rename = || {
            self.engine
                .apply("rename", Pace::Sequential, subject, move |_, v| v.rename(&f, &t, flags))
        };
        self.logged(Names::Exclusive, rename, |_| {
            vec![Change::Rename {
                old: from.clone(),
                new: to.clone(),
                flags,
            }]
        })?;
        self.nodes
            .renamed(parent, name, newparent, newname, flags & libc::RENAME_EXCHANGE != 0);
        Ok(())
    }

    fn do_link(&self, ino: u64, newparent: u64, newname: &OsStr) -> io::Result<FileAttr> {
        let old = self.nodes.path(ino)?;
        let o = old.clone();
        self.make(
            "link",
            newparent,
            newname,
            move |v, new| v.link(&o, new),
            |new| Change::Link { old, new },
        )
    }

    /// Opens on every side that is up and keeps one fd per side. The pass
    /// returned must be held until the handle is registered, so that a
    /// resync re-attaching open files to a returning side sees it.
    #[allow(clippy::type_complexity)]
    fn open_both(
        &self,
        op: &str,
        subject: Subject,
        effect: Effect,
        f: impl Fn(&Volume) -> io::Result<(std::os::fd::OwnedFd, Stat)> + Send + Sync + 'static,
    ) -> io::Result<(Side, Stat, [Option<std::os::fd::OwnedFd>; 2], Option<Pass>)> {
        let mut pair = self.engine.each(effect, Pace::Sequential, subject, move |_, v| f(v));
        let side = self.engine.settle(op, subject, &pair)?;
        let pass = pair.take_pass();
        let mut fds = [None, None];
        let mut stat = None;
        for s in Side::BOTH {
            if let Some((fd, st)) = pair.take_ok(s) {
                fds[s.index()] = Some(fd);
                if s == side {
                    stat = Some(st);
                }
            }
        }
        Ok((side, stat.ok_or_else(|| err(libc::EIO))?, fds, pass))
    }

    fn do_open(&self, ino: u64, flags: i32) -> io::Result<u64> {
        let effect = if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            self.writable()?;
            Effect::Changes
        } else {
            Effect::Opens
        };
        let path = self.nodes.path(ino)?;
        let p = path.clone();
        let fl = backing_flags(flags);
        let open = || {
            self.open_both("open", Subject::Path(&path), effect, move |v| {
                let fd = v.open_file(&p, fl)?;
                let st = volume::fstat(std::os::fd::AsFd::as_fd(&fd))?;
                Ok((fd, st))
            })
        };
        // Only a truncating open changes anything: the others neither wait
        // for the mirror's lag nor take the names lock.
        let (_, _, fds, _pass) = if flags & libc::O_TRUNC != 0 && effect == Effect::Changes {
            self.logged(Names::Shared, open, |_| {
                vec![Change::Truncate {
                    path: path.clone(),
                    size: 0,
                }]
            })?
        } else {
            open()?
        };
        Ok(self.files.insert(OpenFile::new(ino, fl & !libc::O_TRUNC, fds)))
    }

    #[allow(clippy::too_many_arguments)]
    fn do_create(
        &self,
        owner: Owner,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> io::Result<(FileAttr, u64)> {
        let path = self.new_path(parent, name)?;
        let p = path.clone();
        let fl = backing_flags(flags) | (flags & (libc::O_EXCL | libc::O_TRUNC));
        let mode = mode & !umask & 0o7777;
        let created = Arc::new(AtomicBool::new(false));
        let made = created.clone();
        let create = || {
            self.open_both("create", Subject::Entry(&path), Effect::Changes, move |v| {
                let (fd, new) = v.create(&p, fl, mode, owner)?;
                if new {
                    made.store(true, Ordering::Release);
                }
                let st = volume::fstat(std::os::fd::AsFd::as_fd(&fd))?;
                Ok((fd, st))
            })
        };
        let (side, st, fds, _pass) = self.logged(Names::Exclusive, create, |_| {
            let path = path.clone();
            if created.load(Ordering::Acquire) {
                vec![Change::Create { path, mode, owner }]
            } else if flags & libc::O_TRUNC != 0 {
                vec![Change::Truncate { path, size: 0 }]
            } else {
                Vec::new()
            }
        })?;
        let a = self.entry(parent, name, side, &st);
        if let Some(intent) = self.engine.intent() {
            intent.born(a.ino.0);
        }
        let fh = self.files.insert(OpenFile::new(a.ino.0, backing_flags(flags), fds));
        Ok((a, fh))
    }

    fn do_read(&self, fh: u64, offset: u64, size: u32) -> io::Result<PooledBuf> {
        let file = self.files.get(fh)?;
        let ino = file.ino;
        self.engine.read("read", Subject::Inode(ino), move |side, _| {
            let mut buf = PooledBuf::zeroed(size as usize);
            let n = volume::pread(file.fd(side)?.as_fd(), &mut buf, offset)?;
            buf.truncate(n);
            Ok(buf)
        })
    }

    /// `kill_setid`: the kernel says the caller lacks CAP_FSETID and the
    /// file has set-ID bits (FUSE_WRITE_KILL_SUIDGID): they are cleared on
    /// each side after its write.
    fn do_write(&self, fh: u64, offset: u64, data: &Arc<PooledBuf>, kill_setid: bool) -> io::Result<u32> {
        self.writable()?;
        let file = self.files.get(fh)?;
        let ino = file.ino;
        let mirror_file = file.clone();
        let (copy, mirror_copy) = (data.clone(), data.clone());
        // Copying a large write into two page caches one after the other
        // costs more than the hop to the mirror's lane.
        let pace = if data.len() >= CONCURRENT_WRITE {
            Pace::Concurrent
        } else {
            Pace::Sequential
        };
        let recorded = file.clone();
        let write = || {
            let mut pair = self.engine.change2(
                pace,
                Subject::Inode(ino),
                move |_| write_on(&file, Side::Primary, &copy, offset, kill_setid),
                move |_| write_on(&mirror_file, Side::Mirror, &mirror_copy, offset, kill_setid),
            );
            let side = self.engine.settle("write", Subject::Inode(ino), &pair)?;
            pair.take_ok(side).ok_or_else(|| err(libc::EIO))
        };
        let n = self.logged(Names::Shared, write, |n: &usize| {
            let Some(path) = self.primary_path(&recorded) else {
                return Vec::new();
            };
            let mut out = vec![Change::Write {
                path: path.clone(),
                offset,
                data: data[..*n].to_vec(),
            }];
            if kill_setid && let Ok(st) = recorded.fd(Side::Primary).and_then(|fd| volume::fstat(fd.as_fd())) {
                out.push(Change::Chmod {
                    path,
                    mode: st.st_mode & 0o7777,
                });
            }
            out
        })?;
        Ok(n as u32)
    }

    /// A change made through an open handle, on both sides.
    fn on_handle<T: Send + 'static>(
        &self,
        op: &str,
        pace: Pace,
        fh: u64,
        f: impl Fn(&OpenFile, Side) -> io::Result<T> + Send + Sync + 'static,
    ) -> io::Result<T> {
        let file = self.files.get(fh)?;
        let ino = file.ino;
        self.engine
            .apply(op, pace, Subject::Inode(ino), move |side, _| f(&file, side))
    }

    fn do_opendir(&self, ino: u64) -> io::Result<u64> {
        self.nodes.path(ino)?;
        Ok(self.dirs.insert(OpenDir {
            ino,
            entries: Mutex::new(Vec::new()),
        }))
    }

    /// The listing of an open directory, read afresh at offset 0.
    fn listing(&self, dir: &OpenDir, offset: u64) -> io::Result<Vec<volume::DirEntry>> {
        let mut entries = dir.entries.lock().unwrap_or_else(|e| e.into_inner());
        if offset == 0 {
            let p = self.nodes.path(dir.ino)?;
            let q = p.clone();
            let mut list = self
                .engine
                .read("readdir", Subject::Path(&p), move |_, v| v.read_dir(&q))?;
            if dir.ino == ROOT {
                list.retain(|e| e.name.as_bytes() != META_DIR.as_bytes());
            }
            *entries = list;
        }
        Ok(entries.clone())
    }

    /// The open directory's inode and its listing (read afresh at offset 0).
    fn do_readdir(&self, fh: u64, offset: u64) -> io::Result<(u64, Vec<volume::DirEntry>)> {
        let dir = self.dirs.get(fh)?;
        Ok((dir.ino, self.listing(&dir, offset)?))
    }

    /// The entries from `offset` on with their attributes, at most
    /// `PLUS_BATCH` of them (the kernel asks again for the rest).
    fn do_readdirplus(&self, fh: u64, offset: u64) -> io::Result<Plus> {
        let dir = self.dirs.get(fh)?;
        let entries = self.listing(&dir, offset)?;
        let dpath = self.nodes.path(dir.ino)?;
        let q = dpath.clone();
        let dst = self
            .engine
            .read("readdirplus", Subject::Path(&dpath), move |_, v| v.lstat(&q))?;
        let mut items = Vec::new();
        for i in (offset as usize).max(2)..entries.len() + 2 {
            if items.len() == PLUS_BATCH {
                break;
            }
            let e = &entries[i - 2];
            let p = volume::child(&dpath, &e.name);
            let q = p.clone();
            // An entry removed since the listing was taken is skipped.
            let Ok((side, st)) = self.engine.read("readdirplus", Subject::Path(&p), move |side, v| {
                v.lstat(&q).map(|st| (side, st))
            }) else {
                continue;
            };
            items.push((i as u64 + 1, e.name.clone(), side, st));
        }
        Ok(Plus {
            dir: dir.ino,
            dattr: attr(dir.ino, &dst),
            items,
        })
    }

    /// Sends what `do_readdirplus` found; each entry sent takes a lookup
    /// reference, as a lookup does.
    fn fill_plus(&self, reply: &mut impl reply::DirPlus, offset: u64, plus: &Plus) {
        for i in offset..2 {
            // The kernel takes no lookup reference for "." and "..".
            let name = if i == 0 { "." } else { ".." };
            if reply.add(i + 1, OsStr::new(name), &plus.dattr) {
                return;
            }
        }
        for (off, name, side, st) in &plus.items {
            let a = self.entry(plus.dir, name, *side, st);
            if reply.add(*off, name, &a) {
                // Not sent: give back the lookup reference `entry` took.
                self.nodes.forget(a.ino.0, 1);
                return;
            }
        }
    }

    fn do_statfs(&self) -> io::Result<(libc::statvfs, u64, u64, u64)> {
        let root = Path::new("");
        let (r, st) = self.engine.read("statfs", Subject::Path(root), |side, v| {
            v.statvfs().map(|st| (side, st))
        })?;
        let (mut bfree, mut bavail, mut ffree) = (st.f_bfree, st.f_bavail, st.f_ffree);
        // Writes fail when either side fills up, so report the smaller free
        // space; the other side's figure is advisory and not waited for long.
        if let Some(o) = self.engine.peek(r.other(), STATFS_PEEK, |v| v.statvfs()) {
            let scale = |x: u64| x.saturating_mul(o.f_frsize) / st.f_frsize.max(1);
            bfree = bfree.min(scale(o.f_bfree));
            bavail = bavail.min(scale(o.f_bavail));
            ffree = ffree.min(o.f_ffree);
        }
        Ok((st, bfree, bavail, ffree))
    }

    fn xattr_target(&self, ino: u64) -> io::Result<PathBuf> {
        self.nodes.path(ino)
    }
}

fn errno_of<R: reply::Fail>(reply: R, e: &io::Error) {
    reply.error(errno(e))
}

fn finish_xattr<R: reply::Xattr>(reply: R, size: u32, r: io::Result<(Vec<u8>, usize)>) {
    match r {
        Ok((_, len)) if size == 0 => reply.size(len as u32),
        Ok((data, _)) => reply.value(&data),
        Err(e) => errno_of(reply, &e),
    }
}

fn finish_empty<R: reply::Empty>(reply: R, r: io::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => errno_of(reply, &e),
    }
}

fn finish_attr<R: reply::Attr>(reply: R, r: io::Result<FileAttr>) {
    match r {
        Ok(a) => reply.attr(&a),
        Err(e) => errno_of(reply, &e),
    }
}

fn finish_entry<R: reply::Entry>(reply: R, r: io::Result<FileAttr>) {
    match r {
        Ok(a) => reply.entry(&a),
        Err(e) => errno_of(reply, &e),
    }
}

fn finish_data<R: reply::Data, D: AsRef<[u8]>>(reply: R, r: io::Result<D>) {
    match r {
        Ok(d) => reply.data(d.as_ref()),
        Err(e) => errno_of(reply, &e),
    }
}

fn finish_written<R: reply::Written>(reply: R, r: io::Result<u32>) {
    match r {
        Ok(n) => reply.written(n),
        Err(e) => errno_of(reply, &e),
    }
}

/// Who made a request.
#[derive(Clone, Copy, Debug)]
pub struct Who {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Who {
    fn of(req: &Request) -> Who {
        Who {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        }
    }

    fn owner(self) -> Owner {
        Owner {
            uid: self.uid,
            gid: self.gid,
        }
    }
}

/// What a SETATTR asks to change.
#[derive(Clone, Copy, Debug, Default)]
pub struct Changes {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    pub fh: Option<u64>,
}

/// The FUSE init flags mirrorfs asks for, on either transport.
pub fn wanted_capabilities() -> InitFlags {
    // The writeback cache lets small writes collect in the kernel's page
    // cache and reach us as larger ones; fsync still writes every dirty
    // page through us and then fsyncs both sides, and the kernel keeps
    // O_APPEND offsets itself (we are the only writer).
    InitFlags::FUSE_DO_READDIRPLUS
        | InitFlags::FUSE_READDIRPLUS_AUTO
        | InitFlags::FUSE_PARALLEL_DIROPS
        | InitFlags::FUSE_CACHE_SYMLINKS
        | InitFlags::FUSE_ASYNC_DIO
        | InitFlags::FUSE_WRITEBACK_CACHE
        // We clear set-ID bits ourselves (write, truncate; the backing
        // chown does it for chown), so the kernel stops asking for
        // `security.capability` before every write: a GETXATTR round
        // trip, and a disk lookup per side, per write.
        | InitFlags::FUSE_HANDLE_KILLPRIV_V2
}

/// The operations, each written once for either transport: the classic
/// one (`impl Filesystem` below) and FUSE over io_uring (`ring`). Each
/// hands `serve` a handler that owns its arguments and a finish that
/// answers; the result says whether this thread answered (false: a
/// rescuer has or will).
impl MirrorFs {
    /// A name that does not exist is answered as a negative entry the
    /// kernel may cache for `TTL`, as it caches a positive one: every
    /// change comes through the mount, which drops it when the name is
    /// made. (SQLite looks for its hot journal before each transaction.)
    pub fn lookup_op(&self, parent: u64, name: OsString, reply: impl reply::Entry) -> bool {
        self.serve(
            reply,
            move |fs| fs.do_lookup(parent, &name),
            |reply, r| match r {
                Ok(a) => reply.entry(&a),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => reply.negative(),
                Err(e) => errno_of(reply, &e),
            },
        )
    }

    pub fn getattr_op(&self, ino: u64, fh: Option<u64>, reply: impl reply::Attr) -> bool {
        self.serve(reply, move |fs| fs.do_getattr(ino, fh.map(FileHandle)), finish_attr)
    }

    pub fn setattr_op(&self, who: Who, ino: u64, c: Changes, reply: impl reply::Attr) -> bool {
        let caller = Arc::new(Caller::of(who));
        // "Now" is read once, so that both sides, and a rescuer, set the same time.
        let now = SystemTime::now();
        self.serve(reply, move |fs| fs.do_setattr(&caller, ino, c, now), finish_attr)
    }

    pub fn readlink_op(&self, ino: u64, reply: impl reply::Data) -> bool {
        self.serve(reply, move |fs| fs.do_readlink(ino), finish_data)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn mknod_op(
        &self,
        who: Who,
        parent: u64,
        name: OsString,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: impl reply::Entry,
    ) -> bool {
        let owner = who.owner();
        let mode = (mode & libc::S_IFMT) | (mode & !umask & 0o7777);
        let make = move |fs: &Core| {
            let rdev = rdev as u64;
            let record = move |path| Change::Mknod {
                path,
                mode,
                rdev,
                owner,
            };
            fs.make(
                "mknod",
                parent,
                &name,
                move |v, p| v.mknod(p, mode, rdev, owner),
                record,
            )
        };
        self.serve(reply, make, finish_entry)
    }

    pub fn mkdir_op(
        &self,
        who: Who,
        parent: u64,
        name: OsString,
        mode: u32,
        umask: u32,
        reply: impl reply::Entry,
    ) -> bool {
        let owner = who.owner();
        let mode = mode & !umask & 0o7777;
        let make = move |fs: &Core| {
            let record = move |path| Change::Mkdir { path, mode, owner };
            fs.make("mkdir", parent, &name, move |v, p| v.mkdir(p, mode, owner), record)
        };
        self.serve(reply, make, finish_entry)
    }

    pub fn unlink_op(&self, parent: u64, name: OsString, dir: bool, reply: impl reply::Empty) -> bool {
        self.serve(reply, move |fs| fs.do_unlink(parent, &name, dir), finish_empty)
    }

    pub fn symlink_op(
        &self,
        who: Who,
        parent: u64,
        name: OsString,
        target: OsString,
        reply: impl reply::Entry,
    ) -> bool {
        let owner = who.owner();
        let make = move |fs: &Core| {
            let (t, target) = (target.clone(), target.clone());
            let record = move |path| Change::Symlink { target, path, owner };
            fs.make("symlink", parent, &name, move |v, p| v.symlink(&t, p, owner), record)
        };
        self.serve(reply, make, finish_entry)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rename_op(
        &self,
        parent: u64,
        name: OsString,
        newparent: u64,
        newname: OsString,
        flags: u32,
        reply: impl reply::Empty,
    ) -> bool {
        let rename = move |fs: &Core| fs.do_rename(parent, &name, newparent, &newname, flags);
        self.serve(reply, rename, finish_empty)
    }

    pub fn link_op(&self, ino: u64, newparent: u64, newname: OsString, reply: impl reply::Entry) -> bool {
        let link = move |fs: &Core| fs.writable().and_then(|_| fs.do_link(ino, newparent, &newname));
        self.serve(reply, link, finish_entry)
    }

    pub fn open_op(&self, ino: u64, flags: i32, reply: impl reply::Open) -> bool {
        self.serve(
            reply,
            move |fs| fs.do_open(ino, flags),
            |reply, r| match r {
                Ok(fh) => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE),
                Err(e) => errno_of(reply, &e),
            },
        )
    }

    pub fn read_op(&self, fh: u64, offset: u64, size: u32, reply: impl reply::Data) -> bool {
        self.serve(reply, move |fs| fs.do_read(fh, offset, size), finish_data)
    }

    /// `data` is the request's one copy of the write: the mirror's half may
    /// outlive the request if the mirror hangs, and a rescuer may need the
    /// data again.
    pub fn write_op(
        &self,
        fh: u64,
        offset: u64,
        data: PooledBuf,
        kill_setid: bool,
        reply: impl reply::Written,
    ) -> bool {
        let data = Arc::new(data);
        self.serve(
            reply,
            move |fs| fs.do_write(fh, offset, &data, kill_setid),
            finish_written,
        )
    }

    pub fn flush_op(&self, fh: u64, reply: impl reply::Empty) -> bool {
        let flush = move |fs: &Core| {
            fs.on_handle("flush", Pace::Sequential, fh, |f, side| {
                volume::flush(f.fd(side)?.as_fd())
            })
        };
        self.serve(reply, flush, finish_empty)
    }

    pub fn release_op(&self, fh: u64, reply: impl reply::Empty) -> bool {
        let core = &self.core;
        if let Some(f) = core.files.remove(fh) {
            // Each side's fd is closed on that side's lane: a close on a hung
            // side blocks, and must not block this thread.
            match Arc::try_unwrap(f) {
                Ok(file) => {
                    for side in Side::BOTH {
                        if let Some(fd) = file.take_fd(side) {
                            core.engine.close_on(side, fd);
                        }
                    }
                }
                Err(shared) => core.engine.retire(shared),
            }
        }
        reply.ok();
        true
    }

    pub fn fsync_op(&self, fh: u64, datasync: bool, reply: impl reply::Empty) -> bool {
        let fsync = move |fs: &Core| {
            let file = fs.files.get(fh)?;
            let sync = || {
                fs.with_log_synced(Some(&file), || {
                    fs.on_handle("fsync", Pace::Concurrent, fh, move |f, side| {
                        volume::fsync(f.fd(side)?.as_fd(), datasync)
                    })
                })
            };
            // The barrier: the shipper makes the file durable on the
            // mirror at this point of the log.
            fs.logged(Names::Shared, sync, |_| {
                fs.primary_path(&file)
                    .map(|path| Change::Fsync { path, datasync })
                    .into_iter()
                    .collect()
            })
        };
        self.serve(reply, fsync, finish_empty)
    }

    pub fn opendir_op(&self, ino: u64, reply: impl reply::Open) -> bool {
        match self.core.do_opendir(ino) {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => errno_of(reply, &e),
        }
        true
    }

    pub fn readdir_op(&self, fh: u64, offset: u64, reply: impl reply::Dir) -> bool {
        self.serve(
            reply,
            move |fs| fs.do_readdir(fh, offset),
            move |mut reply, r| match r {
                Ok((dir, entries)) => {
                    fill_readdir(&mut reply, dir, &entries, offset);
                    reply.done()
                }
                Err(e) => errno_of(reply, &e),
            },
        )
    }

    pub fn readdirplus_op(&self, fh: u64, offset: u64, reply: impl reply::DirPlus) -> bool {
        let core = self.core.clone();
        self.serve(
            reply,
            move |fs| fs.do_readdirplus(fh, offset),
            move |mut reply, r| match r {
                Ok(plus) => {
                    core.fill_plus(&mut reply, offset, &plus);
                    reply.done()
                }
                Err(e) => errno_of(reply, &e),
            },
        )
    }

    pub fn releasedir_op(&self, fh: u64, reply: impl reply::Empty) -> bool {
        self.core.dirs.remove(fh);
        reply.ok();
        true
    }

    pub fn fsyncdir_op(&self, ino: u64, datasync: bool, reply: impl reply::Empty) -> bool {
        let fsyncdir = move |fs: &Core| {
            let p = fs.nodes.path(ino)?;
            let q = p.clone();
            let sync = || {
                fs.with_log_synced(None, || {
                    fs.engine
                        .apply("fsyncdir", Pace::Concurrent, Subject::Path(&p), move |_, v| {
                            v.fsync_path(&q, datasync)
                        })
                })
            };
            fs.logged(Names::Shared, sync, |_| {
                vec![Change::Fsync {
                    path: p.clone(),
                    datasync,
                }]
            })
        };
        self.serve(reply, fsyncdir, finish_empty)
    }

    pub fn statfs_op(&self, reply: impl reply::StatfsReply) -> bool {
        self.serve(
            reply,
            |fs| fs.do_statfs(),
            |reply, r| match r {
                Ok((st, bfree, bavail, ffree)) => reply.statfs(&reply::Statfs {
                    blocks: st.f_blocks,
                    bfree,
                    bavail,
                    files: st.f_files,
                    ffree,
                    bsize: st.f_bsize as u32,
                    namelen: st.f_namemax as u32,
                    frsize: st.f_frsize as u32,
                }),
                Err(e) => errno_of(reply, &e),
            },
        )
    }

    pub fn setxattr_op(&self, ino: u64, name: OsString, value: Vec<u8>, flags: i32, reply: impl reply::Empty) -> bool {
        let (name, value) = (Arc::new(name), Arc::new(value));
        let set = move |fs: &Core| {
            fs.writable()?;
            let p = fs.xattr_target(ino)?;
            let (q, n, v2) = (p.clone(), name.clone(), value.clone());
            let set = || {
                fs.engine
                    .apply("setxattr", Pace::Sequential, Subject::Path(&p), move |_, v| {
                        v.setxattr(&q, &n, &v2, flags)
                    })
            };
            fs.logged(Names::Shared, set, |_| {
                vec![Change::SetXattr {
                    path: p.clone(),
                    name: (*name).clone(),
                    value: (*value).clone(),
                    flags,
                }]
            })
        };
        self.serve(reply, set, finish_empty)
    }

    pub fn getxattr_op(&self, ino: u64, name: OsString, size: u32, reply: impl reply::Xattr) -> bool {
        let name = Arc::new(name);
        let get = move |fs: &Core| {
            let p = fs.xattr_target(ino)?;
            let (q, name) = (p.clone(), name.clone());
            fs.engine.read("getxattr", Subject::Path(&p), move |_, v| {
                v.getxattr(&q, &name, size as usize)
            })
        };
        self.serve(reply, get, move |reply, r| finish_xattr(reply, size, r))
    }

    pub fn listxattr_op(&self, ino: u64, size: u32, reply: impl reply::Xattr) -> bool {
        let list = move |fs: &Core| {
            let p = fs.xattr_target(ino)?;
            let q = p.clone();
            fs.engine.read("listxattr", Subject::Path(&p), move |_, v| {
                v.listxattr(&q, size as usize)
            })
        };
        self.serve(reply, list, move |reply, r| finish_xattr(reply, size, r))
    }

    pub fn removexattr_op(&self, ino: u64, name: OsString, reply: impl reply::Empty) -> bool {
        let name = Arc::new(name);
        let remove = move |fs: &Core| {
            fs.writable()?;
            let p = fs.xattr_target(ino)?;
            let (q, n) = (p.clone(), name.clone());
            let remove = || {
                fs.engine
                    .apply("removexattr", Pace::Sequential, Subject::Path(&p), move |_, v| {
                        v.removexattr(&q, &n)
                    })
            };
            fs.logged(Names::Shared, remove, |_| {
                vec![Change::RemoveXattr {
                    path: p.clone(),
                    name: (*name).clone(),
                }]
            })
        };
        self.serve(reply, remove, finish_empty)
    }

    pub fn access_op(&self, ino: u64, reply: impl reply::Empty) -> bool {
        // The mount always uses default_permissions, so the kernel checks
        // permissions; this only confirms the entry still exists.
        self.serve(reply, move |fs| fs.do_getattr(ino, None).map(drop), finish_empty)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create_op(
        &self,
        who: Who,
        parent: u64,
        name: OsString,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: impl reply::Create,
    ) -> bool {
        let owner = who.owner();
        let create = move |fs: &Core| fs.do_create(owner, parent, &name, mode, umask, flags);
        self.serve(reply, create, |reply, r| match r {
            Ok((a, fh)) => reply.created(&a, fh, FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => errno_of(reply, &e),
        })
    }

    pub fn fallocate_op(&self, fh: u64, offset: u64, length: u64, mode: i32, reply: impl reply::Empty) -> bool {
        let fallocate = move |fs: &Core| {
            fs.writable()?;
            if fs.engine.following().is_some()
                && mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0
            {
                // They shift data: a replay over a mirror that has them
                // already would shift it twice.
                return Err(err(libc::EOPNOTSUPP));
            }
            let file = fs.files.get(fh)?;
            let allocate = || {
                fs.on_handle("fallocate", Pace::Concurrent, fh, move |f, side| {
                    volume::fallocate(f.fd(side)?.as_fd(), mode, offset, length)
                })
            };
            fs.logged(Names::Shared, allocate, |_| {
                fs.primary_path(&file)
                    .map(|path| Change::Fallocate {
                        path,
                        mode,
                        offset,
                        len: length,
                    })
                    .into_iter()
                    .collect()
            })
        };
        self.serve(reply, fallocate, finish_empty)
    }

    pub fn lseek_op(&self, fh: u64, offset: i64, whence: i32, reply: impl reply::Lseek) -> bool {
        let seek = move |fs: &Core| {
            let f = fs.files.get(fh)?;
            let ino = f.ino;
            fs.engine.read("lseek", Subject::Inode(ino), move |side, _| {
                volume::lseek(f.fd(side)?.as_fd(), offset, whence)
            })
        };
        self.serve(reply, seek, |reply, r| match r {
            Ok(o) => reply.offset(o),
            Err(e) => errno_of(reply, &e),
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range_op(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        flags: u32,
        reply: impl reply::Written,
    ) -> bool {
        let copy = move |fs: &Core| {
            fs.writable()?;
            let fin = fs.files.get(fh_in)?;
            let out = fs.files.get(fh_out)?;
            let copy = || {
                fs.on_handle("copy_file_range", Pace::Concurrent, fh_out, move |fout, side| {
                    volume::copy_file_range(
                        fin.fd(side)?.as_fd(),
                        offset_in,
                        fout.fd(side)?.as_fd(),
                        offset_out,
                        len,
                        flags,
                    )
                    .map(|n| n as u32)
                })
            };
            // The mirror gets the bytes copied, read back from the primary.
            fs.logged(Names::Shared, copy, |n: &u32| fs.copied(&out, offset_out, *n as usize))
        };
        self.serve(reply, copy, finish_written)
    }

    pub fn forget_op(&self, ino: u64, nlookup: u64) {
        self.core.nodes.forget(ino, nlookup);
    }
}

/// The classic transport: fuser reads `/dev/fuse` and calls these.
impl Filesystem for MirrorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let mut wanted = wanted_capabilities();
        if self.core.config.uring {
            wanted |= InitFlags::FUSE_OVER_IO_URING;
        }
        for flag in wanted.iter() {
            if config.add_capabilities(flag).is_err() {
                log::info!("kernel lacks capability {flag:?}");
            }
        }
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let uring = self.core.config.uring && config.capabilities().contains(InitFlags::FUSE_OVER_IO_URING);
        self.core.uring.store(uring, Ordering::Release);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.lookup_op(parent.0, name.to_os_string(), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.forget_op(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.getattr_op(ino.0, fh.map(|f| f.0), reply);
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let c = Changes {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh: fh.map(|f| f.0),
        };
        self.setattr_op(Who::of(req), ino.0, c, reply);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.readlink_op(ino.0, reply);
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        self.mknod_op(Who::of(req), parent.0, name.to_os_string(), mode, umask, rdev, reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.mkdir_op(Who::of(req), parent.0, name.to_os_string(), mode, umask, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.unlink_op(parent.0, name.to_os_string(), false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.unlink_op(parent.0, name.to_os_string(), true, reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let target = target.as_os_str().to_os_string();
        self.symlink_op(Who::of(req), parent.0, link_name.to_os_string(), target, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = (name.to_os_string(), newname.to_os_string());
        self.rename_op(parent.0, name, newparent.0, newname, flags.bits(), reply);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.link_op(ino.0, newparent.0, newname.to_os_string(), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.open_op(ino.0, flags.0, reply);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.read_op(fh.0, offset, size, reply);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill_setid = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        self.write_op(fh.0, offset, PooledBuf::copy_of(data), kill_setid, reply);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        self.flush_op(fh.0, reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_op(fh.0, reply);
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.fsync_op(fh.0, datasync, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.opendir_op(ino.0, reply);
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.readdir_op(fh.0, offset, reply);
    }

    fn readdirplus(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectoryPlus) {
        self.readdirplus_op(fh.0, offset, reply);
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.releasedir_op(fh.0, reply);
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.fsyncdir_op(ino.0, datasync, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.statfs_op(reply);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.setxattr_op(ino.0, name.to_os_string(), value.to_vec(), flags, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.getxattr_op(ino.0, name.to_os_string(), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.listxattr_op(ino.0, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.removexattr_op(ino.0, name.to_os_string(), reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.access_op(ino.0, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.create_op(Who::of(req), parent.0, name.to_os_string(), mode, umask, flags, reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.fallocate_op(fh.0, offset, length, mode, reply);
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        self.lseek_op(fh.0, offset, whence, reply);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let flags = flags.bits() as u32;
        self.copy_file_range_op(fh_in.0, offset_in, fh_out.0, offset_out, len, flags, reply);
    }
}
