//! One backing side: a directory tree reached only through its root fd.
//!
//! Owns: every syscall made on a backing tree. Paths are relative to the
//! side's root ("" is the root itself) and are resolved with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, then the last component is used
//! with an `*at()` call and `AT_SYMLINK_NOFOLLOW` / `O_NOFOLLOW`, so nothing
//! the daemon does can follow a symlink or `..` out of the root.
//!
//! Every error is an `io::Error` built from the raw errno, never re-wrapped,
//! so the FUSE layer can answer with the exact errno. This module knows
//! nothing of the other side, of health or of FUSE.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::spec::Side;

/// The name of the metadata directory at the root of each side. It is never
/// visible through the mount.
pub const META_DIR: &str = ".mirrorfs";

pub type Stat = libc::stat;

/// Converts a `-1` return into the thread's errno.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: isize) -> io::Result<usize> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The owner a new entry is given: the calling user and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// A timestamp to set: an explicit time, or "leave as is".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Omit,
    At { secs: i64, nanos: i64 },
}

impl SetTime {
    /// Times `(atime, mtime)` set after `earlier` ones, as the two leave
    /// the file: each of `earlier`'s where the later one leaves it as is.
    pub fn over(earlier: Option<(SetTime, SetTime)>, atime: SetTime, mtime: SetTime) -> (SetTime, SetTime) {
        let (a, m) = earlier.unwrap_or((SetTime::Omit, SetTime::Omit));
        let or = |new: SetTime, old: SetTime| if new == SetTime::Omit { old } else { new };
        (or(atime, a), or(mtime, m))
    }

    fn timespec(self) -> libc::timespec {
        match self {
            SetTime::Omit => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            SetTime::At { secs, nanos } => libc::timespec {
                tv_sec: secs,
                tv_nsec: nanos,
            },
        }
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    /// `libc::DT_*`
    pub dtype: u8,
}

/// A directory fd used as the base of an `*at()` call: the root, borrowed,
/// or a directory's `O_PATH` fd shared with the cache of parents.
enum Base<'a> {
    Root(BorrowedFd<'a>),
    Shared(Arc<OwnedFd>),
}

impl Base<'_> {
    fn raw(&self) -> RawFd {
        match self {
            Base::Root(fd) => fd.as_raw_fd(),
            Base::Shared(fd) => fd.as_raw_fd(),
        }
    }
}

/// How long a cached directory fd is used before its path is walked
/// again: the bound on how long a directory renamed or removed behind the
/// mount's back (on the backing tree itself) is still reached through its
/// old fd.
const DIR_FRESH: Duration = Duration::from_secs(1);
/// Cached directories per side; past it the cache starts over.
const DIR_CACHE: usize = 64;

/// The `O_PATH` fds of directories recently used as parents, by path
/// beneath the root: a name operation (stat, create, rename, unlink, open)
/// then costs one `*at()` call instead of an `openat2` walk, the call and a
/// `close`. Every rename and rmdir made through this volume forgets the
/// directories at and beneath the names it touches, before it returns, so
/// the mount's own changes never leave a stale fd; `forgets` (bumped by
/// each) keeps an fd opened before such a change out of the cache.
#[derive(Debug, Default)]
struct DirCache {
    inner: Mutex<Dirs>,
}

#[derive(Debug, Default)]
struct Dirs {
    fds: HashMap<PathBuf, (Arc<OwnedFd>, Instant)>,
    forgets: u64,
}

impl DirCache {
    fn lock(&self) -> MutexGuard<'_, Dirs> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fd of directory `rel`, cached or opened by `open`.
    fn get(&self, rel: &Path, open: impl FnOnce() -> io::Result<OwnedFd>) -> io::Result<Arc<OwnedFd>> {
        let forgets = {
            let d = self.lock();
            if let Some((fd, at)) = d.fds.get(rel)
                && at.elapsed() < DIR_FRESH
            {
                return Ok(fd.clone());
            }
            d.forgets
        };
        let fd = Arc::new(open()?);
        let mut d = self.lock();
        if d.forgets == forgets {
            let old = if d.fds.len() >= DIR_CACHE {
                std::mem::take(&mut d.fds)
            } else {
                HashMap::new()
            };
            d.fds.insert(rel.to_path_buf(), (fd.clone(), Instant::now()));
            drop(d);
            drop(old);
        }
        Ok(fd)
    }

    /// Forgets `rel` and every directory beneath it.
    fn forget(&self, rel: &Path) {
        let mut d = self.lock();
        d.forgets += 1;
        let gone: Vec<_> = d.fds.extract_if(|p, _| p.starts_with(rel)).collect();
        drop(d);
        drop(gone);
    }
}

/// One backing side.
#[derive(Debug)]
pub struct Volume {
    pub side: Side,
    pub path: PathBuf,
    root: OwnedFd,
    dirs: DirCache,
}

impl Volume {
    /// Opens the side's root directory.
    pub fn open(side: Side, path: &Path) -> io::Result<Volume> {
        let c = cstr(path.as_os_str())?;
        // SAFETY: c is a valid NUL-terminated string.
        let fd = cvt(unsafe { libc::open(c.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC) })?;
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Volume {
            side,
            path: path.to_path_buf(),
            root,
            dirs: DirCache::default(),
        })
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Opens `rel` beneath the root, never following a symlink on the way.
    fn openat2(&self, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        let c = cstr(rel.as_os_str())?;
        let mut how: libc::open_how = unsafe { MaybeUninit::zeroed().assume_init() };
        how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
        how.mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            mode as u64
        } else {
            0
        };
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        loop {
            // SAFETY: all pointers are valid for the call; the size is that of `how`.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.root.as_raw_fd(),
                    c.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if ret >= 0 {
                // SAFETY: the kernel returned a fresh fd that we now own.
                return Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) });
            }
            let err = io::Error::last_os_error();
            // openat2 returns EAGAIN when a concurrent rename raced the lookup.
            if err.raw_os_error() != Some(libc::EAGAIN) {
                return Err(err);
            }
        }
    }

    /// The directory holding `rel` and the last component's name.
    fn parent(&self, rel: &Path) -> io::Result<(Base<'_>, CString)> {
        let name = rel
            .file_name()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let name = cstr(name)?;
        match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() => {
                let fd = self
                    .dirs
                    .get(p, || self.openat2(p, libc::O_PATH | libc::O_DIRECTORY, 0))?;
                Ok((Base::Shared(fd), name))
            }
            _ => Ok((Base::Root(self.root.as_fd()), name)),
        }
    }

    /// `lstat` of `rel`; the root itself for "".
    pub fn lstat(&self, rel: &Path) -> io::Result<Stat> {
        if rel.as_os_str().is_empty() {
            return fstat(self.root.as_fd());
        }
        let (base, name) = self.parent(rel)?;
        fstatat(base.raw(), &name)
    }

    /// Opens an existing entry for I/O (a symlink is not followed: ELOOP).
    pub fn open_file(&self, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
        if rel.as_os_str().is_empty() {
            return self.openat2(Path::new("."), flags, 0);
        }
        let (base, name) = self.parent(rel)?;
        let f = (flags & !libc::O_CREAT) | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid dirfd and C string.
        let fd = cvt(unsafe { libc::openat(base.raw(), name.as_ptr(), f) })?;
        // SAFETY: fresh fd owned by us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// An `O_PATH` fd on the entry itself (a symlink is not followed).
    fn open_path(&self, rel: &Path) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        self.openat2(rel, libc::O_PATH, 0)
    }

    /// Creates and opens a regular file owned by `owner`. Returns the fd and
    /// whether this call created the file (an existing file is opened as is
    /// unless `O_EXCL` was asked for).
    pub fn create(&self, rel: &Path, flags: i32, mode: u32, owner: Owner) -> io::Result<(OwnedFd, bool)> {
        let (base, name) = self.parent(rel)?;
        let excl = flags & libc::O_EXCL != 0;
        let f = flags | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid dirfd and C string.
        let ret = unsafe { libc::openat(base.raw(), name.as_ptr(), f, mode as libc::c_uint) };
        if ret >= 0 {
            // SAFETY: fresh fd owned by us.
            let fd = unsafe { OwnedFd::from_raw_fd(ret) };
            self.give_to(base.raw(), &name, Some(fd.as_fd()), mode, owner)?;
            return Ok((fd, true));
        }
        let err = io::Error::last_os_error();
        if excl || err.raw_os_error() != Some(libc::EEXIST) {
            return Err(err);
        }
        let f = (flags & !(libc::O_CREAT | libc::O_EXCL)) | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: as above.
        let fd = cvt(unsafe { libc::openat(base.raw(), name.as_ptr(), f) })?;
        // SAFETY: fresh fd owned by us.
        Ok((unsafe { OwnedFd::from_raw_fd(fd) }, false))
    }

    /// Hands a freshly created entry to its owner. The group is inherited from
    /// a set-group-ID parent, as the kernel would do for the caller. chown by
    /// root clears the set-ID bits of a regular file, so they are put back.
    fn give_to(&self, dir: RawFd, name: &CStr, fd: Option<BorrowedFd<'_>>, mode: u32, owner: Owner) -> io::Result<()> {
        // SAFETY: geteuid has no failure mode.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(());
        }
        let parent = fstat_raw(dir)?;
        let gid = if parent.st_mode & libc::S_ISGID != 0 {
            parent.st_gid
        } else {
            owner.gid
        };
        // SAFETY: valid dirfd and C string.
        cvt(unsafe { libc::fchownat(dir, name.as_ptr(), owner.uid, gid, libc::AT_SYMLINK_NOFOLLOW) })?;
        if mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
            if let Some(fd) = fd {
                // SAFETY: valid fd.
                cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode & 0o7777) })?;
            } else {
                chmod_at(dir, name, mode & 0o7777)?;
            }
        }
        Ok(())
    }

    pub fn mkdir(&self, rel: &Path, mode: u32, owner: Owner) -> io::Result<()> {
        let (base, name) = self.parent(rel)?;
        // SAFETY: valid dirfd and C string.
        cvt(unsafe { libc::mkdirat(base.raw(), name.as_ptr(), mode) })?;
        self.give_to(base.raw(), &name, None, mode, owner)
    }

    pub fn mknod(&self, rel: &Path, mode: u32, rdev: u64, owner: Owner) -> io::Result<()> {
        let (base, name) = self.parent(rel)?;
        // SAFETY: valid dirfd and C string.
        cvt(unsafe { libc::mknodat(base.raw(), name.as_ptr(), mode, rdev) })?;
        self.give_to(base.raw(), &name, None, mode & 0o7777, owner)
    }

    pub fn symlink(&self, target: &OsStr, rel: &Path, owner: Owner) -> io::Result<()> {
        let (base, name) = self.parent(rel)?;
        let t = cstr(target)?;
        // SAFETY: valid dirfd and C strings.
        cvt(unsafe { libc::symlinkat(t.as_ptr(), base.raw(), name.as_ptr()) })?;
        self.give_to(base.raw(), &name, None, 0, owner)
    }

    pub fn link(&self, old: &Path, new: &Path) -> io::Result<()> {
        let (ob, on) = self.parent(old)?;
        let (nb, nn) = self.parent(new)?;
        // SAFETY: valid dirfds and C strings; flags 0 does not follow symlinks.
        cvt(unsafe { libc::linkat(ob.raw(), on.as_ptr(), nb.raw(), nn.as_ptr(), 0) }).map(drop)
    }

    pub fn unlink(&self, rel: &Path) -> io::Result<()> {
        let (base, name) = self.parent(rel)?;
        // SAFETY: valid dirfd and C string.
        cvt(unsafe { libc::unlinkat(base.raw(), name.as_ptr(), 0) }).map(drop)
    }

    pub fn rmdir(&self, rel: &Path) -> io::Result<()> {
        let (base, name) = self.parent(rel)?;
        // SAFETY: valid dirfd and C string.
        let r = cvt(unsafe { libc::unlinkat(base.raw(), name.as_ptr(), libc::AT_REMOVEDIR) }).map(drop);
        self.dirs.forget(rel);
        r
    }

    pub fn rename(&self, old: &Path, new: &Path, flags: u32) -> io::Result<()> {
        let (ob, on) = self.parent(old)?;
        // Within one directory (the common rename), its fd serves both.
        let (nb, nn) = if old.parent() == new.parent() {
            let name = new
                .file_name()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            (None, cstr(name)?)
        } else {
            let (b, n) = self.parent(new)?;
            (Some(b), n)
        };
        let nraw = nb.as_ref().map_or(ob.raw(), |b| b.raw());
        // SAFETY: valid dirfds and C strings.
        let r = cvt(unsafe { libc::renameat2(ob.raw(), on.as_ptr(), nraw, nn.as_ptr(), flags) }).map(drop);
        // Either name may have been a directory (moved, replaced or swapped).
        self.dirs.forget(old);
        self.dirs.forget(new);
        r
    }

    pub fn readlink(&self, rel: &Path) -> io::Result<Vec<u8>> {
        let (base, name) = self.parent(rel)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: buf is valid for buf.len() bytes.
        let n = cvt_size(unsafe { libc::readlinkat(base.raw(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn chmod(&self, rel: &Path, mode: u32) -> io::Result<()> {
        if rel.as_os_str().is_empty() {
            // SAFETY: valid fd.
            return cvt(unsafe { libc::fchmod(self.root.as_raw_fd(), mode) }).map(drop);
        }
        let (base, name) = self.parent(rel)?;
        chmod_at(base.raw(), &name, mode)
    }

    /// `u32::MAX` leaves the id unchanged, as chown(2) does with -1.
    pub fn chown(&self, rel: &Path, uid: u32, gid: u32) -> io::Result<()> {
        if rel.as_os_str().is_empty() {
            // SAFETY: valid fd.
            return cvt(unsafe { libc::fchown(self.root.as_raw_fd(), uid, gid) }).map(drop);
        }
        let (base, name) = self.parent(rel)?;
        // SAFETY: valid dirfd and C string.
        cvt(unsafe { libc::fchownat(base.raw(), name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
    }

    pub fn truncate(&self, rel: &Path, size: u64) -> io::Result<()> {
        let fd = self.openat2(rel, libc::O_WRONLY | libc::O_NONBLOCK, 0)?;
        ftruncate(fd.as_fd(), size)
    }

    /// `kill_setid` by path.
    pub fn kill_setid(&self, rel: &Path) -> io::Result<Stat> {
        let st = self.lstat(rel)?;
        match without_setid(st.st_mode) {
            Some(m) => {
                self.chmod(rel, m)?;
                self.lstat(rel)
            }
            None => Ok(st),
        }
    }

    pub fn utimens(&self, rel: &Path, atime: SetTime, mtime: SetTime) -> io::Result<()> {
        let ts = [atime.timespec(), mtime.timespec()];
        if rel.as_os_str().is_empty() {
            // SAFETY: ts is a valid array of two timespecs.
            return cvt(unsafe { libc::futimens(self.root.as_raw_fd(), ts.as_ptr()) }).map(drop);
        }
        let (base, name) = self.parent(rel)?;
        // SAFETY: valid dirfd, C string and timespec array.
        cvt(unsafe { libc::utimensat(base.raw(), name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
    }

    /// `utimens`, then `lstat`, through one open of the parent: the
    /// writeback cache's flush of times (on every fsync, rename and unlink
    /// of a written file) costs one path walk per side.
    pub fn utimens_lstat(&self, rel: &Path, atime: SetTime, mtime: SetTime) -> io::Result<Stat> {
        if rel.as_os_str().is_empty() {
            self.utimens(rel, atime, mtime)?;
            return self.lstat(rel);
        }
        let ts = [atime.timespec(), mtime.timespec()];
        let (base, name) = self.parent(rel)?;
        // SAFETY: valid dirfd, C string and timespec array.
        cvt(unsafe { libc::utimensat(base.raw(), name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })?;
        fstatat(base.raw(), &name)
    }

    /// Runs `f` with a path naming exactly the entry `rel` (via its `O_PATH`
    /// fd in /proc), for the xattr calls, which have no `*at()` form.
    fn with_proc_path<T>(&self, rel: &Path, f: impl FnOnce(&CStr) -> io::Result<T>) -> io::Result<T> {
        let fd = self.open_path(rel)?;
        let p = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        f(&p)
    }

    pub fn setxattr(&self, rel: &Path, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        let n = cstr(name)?;
        self.with_proc_path(rel, |p| {
            // SAFETY: valid C strings and value buffer.
            cvt(unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) }).map(drop)
        })
    }

    /// With `size == 0`, returns an empty vector and the value's size.
    pub fn getxattr(&self, rel: &Path, name: &OsStr, size: usize) -> io::Result<(Vec<u8>, usize)> {
        let n = cstr(name)?;
        self.with_proc_path(rel, |p| {
            // SAFETY: valid C strings; `sized` passes a buffer valid for `len` bytes.
            sized(size, |buf, len| unsafe {
                libc::getxattr(p.as_ptr(), n.as_ptr(), buf, len)
            })
        })
    }

    pub fn listxattr(&self, rel: &Path, size: usize) -> io::Result<(Vec<u8>, usize)> {
        self.with_proc_path(rel, |p| {
            // SAFETY: as for getxattr.
            sized(size, |buf, len| unsafe { libc::listxattr(p.as_ptr(), buf.cast(), len) })
        })
    }

    pub fn removexattr(&self, rel: &Path, name: &OsStr) -> io::Result<()> {
        let n = cstr(name)?;
        self.with_proc_path(rel, |p| {
            // SAFETY: valid C strings.
            cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
        })
    }

    pub fn statvfs(&self) -> io::Result<libc::statvfs> {
        let mut st = MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: st is valid for writing one statvfs.
        cvt(unsafe { libc::fstatvfs(self.root.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: initialised by the successful call.
        Ok(unsafe { st.assume_init() })
    }

    /// Lists a directory, without `.` and `..`.
    pub fn read_dir(&self, rel: &Path) -> io::Result<Vec<DirEntry>> {
        let fd = self.open_file(rel, libc::O_RDONLY | libc::O_DIRECTORY)?;
        read_dir_fd(fd)
    }

    /// fsync of a directory (or file) by path, for `fsyncdir`.
    pub fn fsync_path(&self, rel: &Path, datasync: bool) -> io::Result<()> {
        let fd = self.open_file(rel, libc::O_RDONLY | libc::O_NONBLOCK)?;
        fsync(fd.as_fd(), datasync)
    }

    /// Makes everything written to the side's filesystem durable.
    pub fn syncfs(&self) -> io::Result<()> {
        // SAFETY: syncfs on an fd we own.
        cvt(unsafe { libc::syncfs(self.root.as_raw_fd()) }).map(drop)
    }

    /// Makes the entries at `paths` durable: the data of each regular file
    /// (`fdatasync`: size and contents, not timestamps) and each directory
    /// that holds one of them (its entries: a create, unlink or rename).
    /// An entry that is gone is covered by its directory's sync; a symlink
    /// or special file by its directory alone (it is never opened: a FIFO
    /// would block, a device could act).
    pub fn sync_paths<'a>(&self, paths: impl IntoIterator<Item = &'a Path>) -> io::Result<()> {
        let mut dirs = std::collections::BTreeSet::new();
        for rel in paths {
            dirs.insert(rel.parent().unwrap_or(Path::new("")).to_path_buf());
            match self.lstat(rel) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => self.fsync_path(rel, true)?,
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                    dirs.insert(rel.to_path_buf());
                }
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)) => {}
                Err(e) => return Err(e),
            }
        }
        for d in dirs {
            match self.fsync_path(&d, false) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)) => {}
                r => r?,
            }
        }
        Ok(())
    }

    /// Checks that the side takes a durable change: a directory in its
    /// metadata directory is made and removed, and the filesystem synced. A
    /// side whose metadata directory is gone (an empty mountpoint left by an
    /// unmounted disk) fails with ENOENT. No regular file is opened: closing
    /// one on a hung FUSE side would block beyond any signal.
    pub fn probe(&self) -> io::Result<()> {
        self.statvfs()?;
        let rel = Path::new(META_DIR).join("probe");
        match self.rmdir(&rel) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            _ => {}
        }
        self.mkdir(&rel, 0o700, Owner { uid: 0, gid: 0 })?;
        self.rmdir(&rel)?;
        // SAFETY: syncfs on an fd we own.
        cvt(unsafe { libc::syncfs(self.root.as_raw_fd()) }).map(drop)
    }

    /// Lists a directory without updating its access time (`O_NOATIME`, which
    /// needs ownership or CAP_FOWNER; without them, a plain listing), so that
    /// a copier's reads leave the times it compares alone.
    pub fn read_dir_noatime(&self, rel: &Path) -> io::Result<Vec<DirEntry>> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        let fd = match self.open_file(rel, flags | libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => self.open_file(rel, flags)?,
            r => r?,
        };
        read_dir_fd(fd)
    }
}

/// Runs an xattr-style call that fills a buffer of `size` bytes, or with a
/// null buffer and size 0 only reports the size. Returns the bytes and the
/// size the call reported.
fn sized(size: usize, call: impl FnOnce(*mut libc::c_void, usize) -> isize) -> io::Result<(Vec<u8>, usize)> {
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    let got = cvt_size(call(ptr, size))?;
    buf.truncate(got.min(size));
    Ok((buf, got))
}

fn chmod_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // fchmodat2 with AT_SYMLINK_NOFOLLOW never follows a symlink planted on
    // the backing tree; plain fchmodat would.
    // SAFETY: valid dirfd and C string.
    let ret = unsafe { libc::syscall(libc::SYS_fchmodat2, dir, name.as_ptr(), mode, libc::AT_SYMLINK_NOFOLLOW) };
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fstat_raw(fd: RawFd) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::zeroed();
    // SAFETY: st is valid for writing one stat.
    cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: initialised by the successful call.
    Ok(unsafe { st.assume_init() })
}

fn fstatat(dir: RawFd, name: &CStr) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::zeroed();
    // SAFETY: valid dirfd, C string and stat buffer.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) })?;
    // SAFETY: initialised by the successful call.
    Ok(unsafe { st.assume_init() })
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    fstat_raw(fd.as_raw_fd())
}

/// Whether an fsync of any regular file on the filesystem of `path` ends
/// with a flush of the one device's write cache, one that makes every
/// write the disk has completed durable. ext4: `ext4_sync_file` flushes
/// through the journal commit's preflush, or explicitly when no commit is
/// needed. Not assumed of any other filesystem (XFS flushes the realtime
/// device alone for a realtime file, which has the same `st_dev`).
pub fn flushes_whole_device(path: &Path) -> bool {
    use nix::sys::statfs::{EXT4_SUPER_MAGIC, statfs};
    statfs(path).is_ok_and(|s| s.filesystem_type() == EXT4_SUPER_MAGIC)
}

/// Starts writing `fd`'s dirty pages to the disk; with `wait`, returns
/// once every one is written (not flushed: see `flushes_whole_device`).
pub fn write_out(fd: BorrowedFd<'_>, wait: bool) -> io::Result<()> {
    let flags = match wait {
        true => libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        false => libc::SYNC_FILE_RANGE_WRITE,
    };
    // SAFETY: a valid fd; offset 0 and length 0 cover the whole file.
    cvt(unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, flags) }).map(drop)
}

/// Whether `path` is on a tmpfs (memory: nothing there is flushed).
pub fn is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

fn read_dir_fd(fd: OwnedFd) -> io::Result<Vec<DirEntry>> {
    let mut dir = nix::dir::Dir::from_fd(fd).map_err(io::Error::from)?;
    let mut out = Vec::new();
    for ent in dir.iter() {
        let ent = ent.map_err(io::Error::from)?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let dtype = match ent.file_type() {
            Some(nix::dir::Type::Directory) => libc::DT_DIR,
            Some(nix::dir::Type::File) => libc::DT_REG,
            Some(nix::dir::Type::Symlink) => libc::DT_LNK,
            Some(nix::dir::Type::Fifo) => libc::DT_FIFO,
            Some(nix::dir::Type::Socket) => libc::DT_SOCK,
            Some(nix::dir::Type::CharacterDevice) => libc::DT_CHR,
            Some(nix::dir::Type::BlockDevice) => libc::DT_BLK,
            None => libc::DT_UNKNOWN,
        };
        out.push(DirEntry {
            name: OsString::from_vec(name.to_vec()),
            ino: ent.ino(),
            dtype,
        });
    }
    Ok(out)
}

// ---- fd-level operations on open files -------------------------------------

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the slice past `done` is valid for writing.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match cvt_size(n) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `data` at `offset`, retrying short writes.
pub fn pwrite_all(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: the slice past `done` is valid for reading.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match cvt_size(n) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: valid fd.
    let ret = unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    };
    cvt(ret).map(drop)
}

/// `close(dup(fd))`: reports the errors a backing filesystem gives at close
/// (NFS, sshfs) while keeping the handle open.
pub fn flush(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid fd.
    let dup = cvt(unsafe { libc::dup(fd.as_raw_fd()) })?;
    // SAFETY: dup is a fresh fd that we close exactly once here.
    cvt(unsafe { libc::close(dup) }).map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }).map(drop)
}

/// `mode` less what the kernel clears on a write or truncate by a caller
/// without CAP_FSETID: set-user-ID, and set-group-ID on a group-executable
/// file (FUSE_HANDLE_KILLPRIV_V2's rule); None when there is nothing to clear.
pub fn without_setid(mode: u32) -> Option<u32> {
    let mut m = mode & 0o7777;
    if m & libc::S_ISUID != 0 {
        m &= !libc::S_ISUID;
    }
    if m & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        m &= !libc::S_ISGID;
    }
    (m != mode & 0o7777).then_some(m)
}

/// Clears the set-ID bits of an open file as `without_setid` says; returns
/// its attributes afterwards. (`security.capability` needs nothing: the
/// backing filesystem drops it itself on every write or truncate.)
pub fn kill_setid(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let st = fstat(fd)?;
    match without_setid(st.st_mode) {
        Some(m) => {
            fchmod(fd, m)?;
            fstat(fd)
        }
        None => Ok(st),
    }
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub fn futimens(fd: BorrowedFd<'_>, atime: SetTime, mtime: SetTime) -> io::Result<()> {
    let ts = [atime.timespec(), mtime.timespec()];
    // SAFETY: valid fd and timespec array.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) }).map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) }).map(drop)
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: valid fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: u64,
    flags: u32,
) -> io::Result<usize> {
    let mut oi = off_in as libc::loff_t;
    let mut oo = off_out as libc::loff_t;
    // SAFETY: valid fds and offset pointers.
    cvt_size(unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut oi,
            fd_out.as_raw_fd(),
            &mut oo,
            len as usize,
            flags,
        )
    })
}

/// A relative path built from a parent's path and a name.
pub fn child(parent: &Path, name: &OsStr) -> PathBuf {
    if parent.as_os_str().is_empty() {
        PathBuf::from(name)
    } else {
        parent.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn sync_paths_syncs_files_and_directories_and_never_opens_a_fifo() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        fs::write(t.path().join("d/f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", t.path().join("d/l")).unwrap();
        nix::unistd::mkfifo(&t.path().join("d/p"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let v = Volume::open(Side::Primary, t.path()).unwrap();
        let paths = ["d/f", "d/l", "d/p", "d", "gone", "d/gone/deeper", "d/f/notdir"].map(Path::new);
        // A FIFO opened for reading without O_NONBLOCK would hang here.
        v.sync_paths(paths).unwrap();
    }

    fn names(v: &Volume, dir: &str) -> Vec<String> {
        let mut n: Vec<String> = v
            .read_dir(Path::new(dir))
            .unwrap()
            .into_iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn a_cached_parent_never_outlives_a_rename_or_rmdir_made_through_the_volume() {
        let t = tempfile::tempdir().unwrap();
        let v = Volume::open(Side::Primary, t.path()).unwrap();
        let me = Owner { uid: 0, gid: 0 };
        v.mkdir(Path::new("a"), 0o755, me).unwrap();
        v.mkdir(Path::new("a/b"), 0o755, me).unwrap();
        v.create(Path::new("a/b/f"), libc::O_WRONLY, 0o644, me).unwrap();
        // "a" and "a/b" are cached now. Move "a" away and make a new one.
        v.rename(Path::new("a"), Path::new("moved"), 0).unwrap();
        v.mkdir(Path::new("a"), 0o755, me).unwrap();
        v.mkdir(Path::new("a/b"), 0o755, me).unwrap();
        v.create(Path::new("a/b/g"), libc::O_WRONLY, 0o644, me).unwrap();
        assert_eq!(names(&v, "a/b"), ["g"]);
        assert_eq!(names(&v, "moved/b"), ["f"]);
        // A directory removed and made again under the same name.
        v.unlink(Path::new("a/b/g")).unwrap();
        v.rmdir(Path::new("a/b")).unwrap();
        v.mkdir(Path::new("a/b"), 0o755, me).unwrap();
        v.create(Path::new("a/b/h"), libc::O_WRONLY, 0o644, me).unwrap();
        assert_eq!(names(&v, "a/b"), ["h"]);
        assert!(v.lstat(Path::new("a/b/h")).is_ok());
        // Swapped directories: each name reaches what it now names.
        v.rename(Path::new("a"), Path::new("moved"), libc::RENAME_EXCHANGE)
            .unwrap();
        assert!(v.lstat(Path::new("a/b/f")).is_ok());
        assert!(v.lstat(Path::new("moved/b/h")).is_ok());
        // A sibling that merely shares a prefix stays cached and correct.
        v.mkdir(Path::new("ab"), 0o755, me).unwrap();
        v.create(Path::new("ab/x"), libc::O_WRONLY, 0o644, me).unwrap();
        v.rename(Path::new("a/b/f"), Path::new("a/b/f2"), 0).unwrap();
        assert!(v.lstat(Path::new("ab/x")).is_ok());
        assert_eq!(names(&v, "a/b"), ["f2"]);
    }

    #[test]
    fn a_directory_moved_behind_the_volume_is_walked_again_within_dir_fresh() {
        let t = tempfile::tempdir().unwrap();
        let v = Volume::open(Side::Primary, t.path()).unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        fs::write(t.path().join("d/f"), b"x").unwrap();
        assert!(v.lstat(Path::new("d/f")).is_ok());
        fs::rename(t.path().join("d"), t.path().join("e")).unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        std::thread::sleep(DIR_FRESH + Duration::from_millis(50));
        assert_eq!(
            v.lstat(Path::new("d/f")).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
    }

    #[test]
    fn setid_bits_cleared_as_the_kernel_clears_them() {
        assert_eq!(without_setid(0o104755), Some(0o755));
        // Set-group-ID goes only with group execute (it marks mandatory
        // locking without it).
        assert_eq!(without_setid(0o102755), Some(0o755));
        assert_eq!(without_setid(0o102745), None);
        assert_eq!(without_setid(0o106745), Some(0o2745));
        assert_eq!(without_setid(0o100644), None);
        assert_eq!(without_setid(0o41777), None);
    }

    #[test]
    fn refuses_to_follow_symlinks_out_of_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(t.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(t.path(), root.join("escape")).unwrap();
        let v = Volume::open(Side::Primary, &root).unwrap();
        // The symlink is reached as itself, which is not a directory.
        let err = v.lstat(Path::new("escape/secret")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
        let err = v.open_file(Path::new("../secret"), libc::O_RDONLY).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
        // The symlink itself can be read, not followed.
        assert_eq!(
            v.readlink(Path::new("escape")).unwrap(),
            t.path().as_os_str().as_bytes()
        );
        let err = v.open_file(Path::new("escape"), libc::O_RDONLY).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn keeps_the_errno() {
        let t = tempfile::tempdir().unwrap();
        let v = Volume::open(Side::Mirror, t.path()).unwrap();
        assert_eq!(
            v.lstat(Path::new("nope")).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        v.mkdir(Path::new("d"), 0o755, Owner { uid: 0, gid: 0 }).unwrap();
        assert_eq!(
            v.mkdir(Path::new("d"), 0o755, Owner { uid: 0, gid: 0 })
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST)
        );
        fs::write(t.path().join("d/f"), b"x").unwrap();
        assert_eq!(
            v.rmdir(Path::new("d")).unwrap_err().raw_os_error(),
            Some(libc::ENOTEMPTY)
        );
    }

    #[test]
    fn lists_a_directory_without_dots() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("a"), b"").unwrap();
        fs::create_dir(t.path().join("b")).unwrap();
        let v = Volume::open(Side::Primary, t.path()).unwrap();
        let mut names: Vec<_> = v.read_dir(Path::new("")).unwrap().into_iter().map(|e| e.name).collect();
        names.sort();
        assert_eq!(names, vec![OsString::from("a"), OsString::from("b")]);
    }
}
