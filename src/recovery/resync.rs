//! The copier: makes one side's entry (and, for a tree, everything below it)
//! match the other side's.
//!
//! Owns: the copy rules. Content is compared in `CHUNK` pieces and only the
//! pieces that differ are written; hard links are kept as links; mode, owner,
//! xattrs and times are made equal, times last; entries the source lacks are
//! removed, deepest first. Every change is one short step, so the daemon can
//! gate each step against writes through the mount, and the destination is
//! reached only through `Access::dst`, so a hung destination becomes an error
//! on its worker lane instead of a hang here.
//!
//! Must not know: which side is which, health, journals or FUSE. It never
//! reads, lists, copies or removes the metadata directory at the root of
//! either side.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use xxhash_rust::xxh3::xxh3_64;

use crate::volume::{self, META_DIR, Owner, SetTime, Stat, Volume};

/// The size of one content step.
pub const CHUNK: usize = 1 << 20;

/// Files smaller than this have their two chunks read one after the other:
/// a thread per small file would cost more than the overlap saves.
const PARALLEL_READ_MIN: i64 = 256 << 10;

/// How far a reconcile of a directory goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// The entry itself; for a directory also its set of children: children
    /// missing on the destination are copied whole, extra ones removed, but
    /// children present on both sides are not descended into.
    Entry,
    /// For a directory, `Entry`, and the contents of every regular file in
    /// it too (not of its subdirectories).
    Writes,
    /// The entry and everything below it.
    Tree,
}

/// Counters, shared with a status reader.
#[derive(Debug, Default)]
pub struct Stats {
    /// Entries examined.
    pub entries: AtomicU64,
    /// Entries created, removed or modified on the destination.
    pub entries_changed: AtomicU64,
    /// Bytes of file content read from the source for comparison or copy.
    pub bytes_compared: AtomicU64,
    /// Bytes written to the destination.
    pub bytes_copied: AtomicU64,
}

/// How the copier reaches the two sides. Offline (verify --repair) both are
/// plain; online the daemon's implementation runs every `step` while holding
/// a gate that keeps writes through the mount out, and runs `dst` calls on the
/// destination side's worker lane with a deadline (a hung destination turns
/// into an error instead of a hang).
pub trait Access {
    fn src(&self) -> &Volume;
    /// Runs one atomic step (one chunk compare+copy, one entry create/remove/
    /// metadata fix). Steps must be short: never a whole large file.
    fn step<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T>;
    /// Runs `f` against the destination volume.
    fn dst<T: Send + 'static>(&self, f: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static) -> io::Result<T>;
    /// Called within the step that opens, creates or links the regular file
    /// `rel` on the destination, so that the daemon can give the file's open
    /// handles their destination fd before any write falls between.
    fn attach(&self, _rel: &Path) -> io::Result<()> {
        Ok(())
    }
}

/// Plain access to two volumes: for offline repair and tests.
pub struct Direct {
    pub src: Volume,
    pub dst: Arc<Volume>,
}

impl Access for Direct {
    fn src(&self) -> &Volume {
        &self.src
    }

    fn step<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        f()
    }

    fn dst<T: Send + 'static>(&self, f: impl FnOnce(&Volume) -> io::Result<T> + Send + 'static) -> io::Result<T> {
        f(&self.dst)
    }
}

/// Shared state across the reconcile calls of one resync.
pub struct Copier<'a, A: Access> {
    access: &'a A,
    stats: &'a Stats,
    /// Source (dev, ino) of a file with several links -> the destination path
    /// it was reconciled at in this run; its other names become links to it.
    links: HashMap<(u64, u64), PathBuf>,
    /// Entries changed by this copier (`stats` may be shared).
    changed: u64,
}

/// What removing one destination entry found.
enum Removal {
    Absent,
    Removed,
    Directory,
}

impl<'a, A: Access> Copier<'a, A> {
    pub fn new(access: &'a A, stats: &'a Stats) -> Self {
        Copier {
            access,
            stats,
            links: HashMap::new(),
            changed: 0,
        }
    }

    /// Makes dst's entry at `rel` match src's; `rel` = "" is the root. A path
    /// inside the metadata directory is left alone. When src has `rel` but
    /// dst lacks one of its ancestors, the topmost such ancestor is
    /// reconciled instead (with `Depth::Entry`, which copies its missing
    /// children whole, `rel` among them).
    pub fn reconcile(&mut self, rel: &Path, depth: Depth) -> io::Result<()> {
        if is_meta(rel) {
            return Ok(());
        }
        let before = self.changed;
        let (target, depth) = match self.missing_ancestor(rel)? {
            Some(a) => (a, Depth::Entry),
            None => (rel.to_path_buf(), depth),
        };
        self.entry(&target, depth)?;
        // Creating or removing an entry changed its parent's times on dst.
        if self.changed != before
            && let Some(p) = target.parent()
            && self.meta(p)? == Some(true)
        {
            self.note_change(p);
        }
        Ok(())
    }

    /// The topmost ancestor of `rel` that is not a directory on dst, if src
    /// has `rel`.
    fn missing_ancestor(&self, rel: &Path) -> io::Result<Option<PathBuf>> {
        let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(None);
        };
        if self.dst_is_dir(parent)? || self.access.step(|| absent_ok(self.access.src().lstat(rel)))?.is_none() {
            return Ok(None);
        }
        let mut chain: Vec<&Path> = parent.ancestors().filter(|a| !a.as_os_str().is_empty()).collect();
        chain.reverse();
        for a in chain {
            if !self.dst_is_dir(a)? {
                return Ok(Some(a.to_path_buf()));
            }
        }
        Ok(None)
    }

    fn dst_is_dir(&self, rel: &Path) -> io::Result<bool> {
        let st = self.access.step(|| self.dst_lstat(rel))?;
        Ok(st.is_some_and(|st| file_type(&st) == libc::S_IFDIR))
    }

    fn dst_lstat(&self, rel: &Path) -> io::Result<Option<Stat>> {
        let p = rel.to_path_buf();
        absent_ok(self.access.dst(move |v| v.lstat(&p)))
    }

    fn note_change(&mut self, rel: &Path) {
        self.changed += 1;
        self.stats.entries_changed.fetch_add(1, Relaxed);
        log::debug!("resync op=changed path={}", rel.display());
    }

    /// Reconciles one entry that exists on src, or removes it from dst.
    fn entry(&mut self, rel: &Path, depth: Depth) -> io::Result<()> {
        self.stats.entries.fetch_add(1, Relaxed);
        let (s, mut d) = self.access.step(|| {
            let Some(s) = absent_ok(self.access.src().lstat(rel))? else {
                return Ok((None, None));
            };
            Ok((Some(s), self.dst_lstat(rel)?))
        })?;
        let Some(s) = s else {
            return self.remove(rel);
        };
        if d.is_some_and(|d| file_type(&d) != file_type(&s)) {
            self.remove(rel)?;
            d = None;
        }
        let made = match file_type(&s) {
            libc::S_IFDIR => self.dir(rel, &s, d.is_some(), depth)?,
            libc::S_IFREG => self.file(rel, &s, d)?,
            libc::S_IFLNK => self.symlink(rel, &s, d.is_some())?,
            _ => self.special(rel, &s, d)?,
        };
        // None: the entry vanished from src on the way.
        let Some(made) = made else {
            return self.remove(rel);
        };
        let Some(fixed) = self.meta(rel)? else {
            return self.remove(rel);
        };
        if made || fixed {
            self.note_change(rel);
        }
        Ok(())
    }

    /// Returns whether the directory was created; None if src lost it.
    fn dir(&mut self, rel: &Path, s: &Stat, exists: bool, depth: Depth) -> io::Result<Option<bool>> {
        if !exists {
            let (p, mode, owner) = (rel.to_path_buf(), s.st_mode & 0o7777, owner_of(s));
            self.access
                .step(|| self.access.dst(move |v| v.mkdir(&p, mode, owner)))?;
        }
        let Some(src_kids) = self
            .access
            .step(|| absent_ok(self.access.src().read_dir_noatime(rel)))?
        else {
            return Ok(None);
        };
        let dst_kids = if exists {
            let p = rel.to_path_buf();
            self.access.step(|| self.access.dst(move |v| v.read_dir_noatime(&p)))?
        } else {
            Vec::new()
        };
        let root = rel.as_os_str().is_empty();
        let names = |kids: Vec<volume::DirEntry>| -> BTreeSet<OsString> {
            kids.into_iter()
                .map(|e| e.name)
                .filter(|n| !(root && n == META_DIR))
                .collect()
        };
        // DT_UNKNOWN may be a file: compared too (one lstat more).
        let files: BTreeSet<OsString> = src_kids
            .iter()
            .filter(|k| depth == Depth::Writes && matches!(k.dtype, libc::DT_REG | libc::DT_UNKNOWN))
            .map(|k| k.name.clone())
            .collect();
        let (src_names, dst_names) = (names(src_kids), names(dst_kids));
        for n in dst_names.difference(&src_names) {
            self.remove(&volume::child(rel, n))?;
        }
        for n in &src_names {
            if depth == Depth::Tree || !dst_names.contains(n) {
                self.entry(&volume::child(rel, n), Depth::Tree)?;
            } else if files.contains(n) {
                self.entry(&volume::child(rel, n), Depth::Entry)?;
            }
        }
        Ok(Some(!exists))
    }

    /// Returns whether anything was written; None if src lost the file.
    fn file(&mut self, rel: &Path, s: &Stat, mut d: Option<Stat>) -> io::Result<Option<bool>> {
        let key = (s.st_dev, s.st_ino);
        let mut changed = false;
        if s.st_nlink > 1 {
            if let Some(leader) = self.links.get(&key).filter(|l| l.as_path() != rel).cloned() {
                match self.link_to(rel, leader, d)? {
                    Some(made) => return Ok(Some(made)),
                    None => {
                        self.links.remove(&key);
                    }
                }
            }
        } else if d.is_some_and(|d| d.st_nlink > 1) {
            // dst shares this inode with another name that src keeps apart.
            let p = rel.to_path_buf();
            self.access.step(|| self.access.dst(move |v| absent_ok(v.unlink(&p))))?;
            d = None;
            changed = true;
        }
        let src = self.access.src();
        let Some(src_fd) = self.access.step(|| absent_ok(open_noatime(src, rel, libc::O_RDONLY)))? else {
            return Ok(None);
        };
        let (p, exists, mode, owner) = (rel.to_path_buf(), d.is_some(), s.st_mode & 0o7777, owner_of(s));
        let dst_fd = self.access.step(|| {
            let fd = self.access.dst(move |v| {
                if exists {
                    open_noatime(v, &p, libc::O_RDWR)
                } else {
                    v.create(&p, libc::O_WRONLY | libc::O_EXCL, mode, owner)
                        .map(|(fd, _)| fd)
                }
            })?;
            let fd = DstFd {
                access: self.access,
                fd: Some(Arc::new(fd)),
            };
            self.access.attach(rel)?;
            Ok(fd)
        })?;
        if let Some(fd) = &dst_fd.fd {
            changed |= self.copy(src_fd.as_fd(), fd, !exists)? || !exists;
        }
        drop(dst_fd);
        if s.st_nlink > 1 {
            self.links.entry(key).or_insert_with(|| rel.to_path_buf());
        }
        Ok(Some(changed))
    }

    /// Makes dst's `rel` a hard link to `leader`, already reconciled in this
    /// run. Returns whether a link was made; None if dst lost the leader.
    fn link_to(&self, rel: &Path, leader: PathBuf, d: Option<Stat>) -> io::Result<Option<bool>> {
        let p = rel.to_path_buf();
        self.access.step(|| {
            let linked = self.access.dst(move |v| {
                let Some(l) = absent_ok(v.lstat(&leader))?.filter(|l| file_type(l) == libc::S_IFREG) else {
                    return Ok(None);
                };
                if d.is_some_and(|d| (d.st_dev, d.st_ino) == (l.st_dev, l.st_ino)) {
                    return Ok(Some(false));
                }
                if d.is_some() {
                    absent_ok(v.unlink(&p))?;
                }
                v.link(&leader, &p)?;
                Ok(Some(true))
            })?;
            if linked.is_some() {
                self.access.attach(rel)?;
            }
            Ok(linked)
        })
    }

    /// Copies src's content over dst's, one chunk per step, writing only the
    /// chunks that differ (for a new file: that are not all zeros, leaving
    /// holes), then sets dst's size. Returns whether anything was written.
    fn copy(&self, src: BorrowedFd<'_>, dst: &Arc<OwnedFd>, created: bool) -> io::Result<bool> {
        let parallel = !created && volume::fstat(src)?.st_size >= PARALLEL_READ_MIN;
        let mut off = 0u64;
        let mut changed = false;
        loop {
            let (n, wrote) = self.access.step(|| {
                let (s, d) = self.read_pair(src, dst, off, created, parallel)?;
                let n = s.len();
                self.stats.bytes_compared.fetch_add(n as u64, Relaxed);
                let last = n < CHUNK;
                // Chunks are compared by xxh3; a chunk that differs is
                // compared page by page, and only the differing pages are
                // written (on a new file: the pages that are not zeros).
                let runs = if created {
                    differing(&s, None)
                } else if xxh3_64(&s) == xxh3_64(d.get(..n).unwrap_or(&d)) && d.len() >= n {
                    Vec::new()
                } else {
                    differing(&s, Some(&d))
                };
                if runs.is_empty() && !last {
                    return Ok((n, false));
                }
                let (fd, end) = (Arc::clone(dst), off + n as u64);
                let (wrote, cut) = self.access.dst(move |_| {
                    let mut wrote = 0;
                    for (a, b) in runs {
                        wrote += volume::pwrite_all(fd.as_fd(), &s[a..b], off + a as u64)?;
                    }
                    let cut = last && volume::fstat(fd.as_fd())?.st_size as u64 != end;
                    if cut {
                        volume::ftruncate(fd.as_fd(), end)?;
                    }
                    Ok((wrote, cut))
                })?;
                self.stats.bytes_copied.fetch_add(wrote as u64, Relaxed);
                Ok((n, wrote > 0 || cut))
            })?;
            changed |= wrote;
            off += n as u64;
            if n < CHUNK {
                return Ok(changed);
            }
        }
    }

    /// The chunk at `off` of src and (unless dst was just created) of dst.
    fn read_pair(
        &self,
        src: BorrowedFd<'_>,
        dst: &Arc<OwnedFd>,
        off: u64,
        created: bool,
        parallel: bool,
    ) -> io::Result<(Vec<u8>, Vec<u8>)> {
        if created {
            return Ok((read_chunk(src, off)?, Vec::new()));
        }
        let fd = Arc::clone(dst);
        let read_dst = move |_: &Volume| read_chunk(fd.as_fd(), off);
        if !parallel {
            let s = read_chunk(src, off)?;
            return Ok((s, self.access.dst(read_dst)?));
        }
        std::thread::scope(|scope| {
            let h = scope.spawn(|| read_chunk(src, off));
            let d = self.access.dst(read_dst);
            let s = h
                .join()
                .unwrap_or_else(|_| Err(io::Error::from_raw_os_error(libc::EIO)));
            Ok((s?, d?))
        })
    }

    /// Returns whether the link was (re)made; None if src lost it.
    fn symlink(&self, rel: &Path, s: &Stat, exists: bool) -> io::Result<Option<bool>> {
        self.access.step(|| {
            let Some(target) = absent_ok(self.access.src().readlink(rel))? else {
                return Ok(None);
            };
            let (p, owner) = (rel.to_path_buf(), owner_of(s));
            self.access.dst(move |v| {
                if exists {
                    if v.readlink(&p)? == target {
                        return Ok(Some(false));
                    }
                    v.unlink(&p)?;
                }
                v.symlink(OsStr::from_bytes(&target), &p, owner)?;
                Ok(Some(true))
            })
        })
    }

    /// A fifo, socket or device node: made again if its device differs.
    fn special(&self, rel: &Path, s: &Stat, d: Option<Stat>) -> io::Result<Option<bool>> {
        if d.is_some_and(|d| d.st_rdev == s.st_rdev) {
            return Ok(Some(false));
        }
        let (p, mode, rdev, owner) = (rel.to_path_buf(), s.st_mode, s.st_rdev, owner_of(s));
        self.access.step(|| {
            self.access.dst(move |v| {
                if d.is_some() {
                    v.unlink(&p)?;
                }
                v.mknod(&p, mode, rdev, owner).map(|_| Some(true))
            })
        })
    }

    /// Makes dst's owner, mode, xattrs and times of `rel` those of src, in
    /// one step, reading src afresh. Returns whether anything changed; None
    /// if src lost the entry.
    fn meta(&self, rel: &Path) -> io::Result<Option<bool>> {
        self.access.step(|| {
            let src = self.access.src();
            let Some(s) = absent_ok(src.lstat(rel))? else {
                return Ok(None);
            };
            let Some(sx) = absent_ok(xattrs(src, rel))? else {
                return Ok(None);
            };
            let p = rel.to_path_buf();
            self.access.dst(move |v| apply_meta(v, &p, &s, &sx)).map(Some)
        })
    }

    /// Removes dst's `rel`, a directory deepest first; each removal is one
    /// step. Absent is fine.
    fn remove(&mut self, rel: &Path) -> io::Result<()> {
        if rel.as_os_str().is_empty() || is_meta(rel) {
            return Ok(());
        }
        let p = rel.to_path_buf();
        let found = self.access.step(|| {
            self.access.dst(move |v| {
                let Some(st) = absent_ok(v.lstat(&p))? else {
                    return Ok(Removal::Absent);
                };
                if file_type(&st) == libc::S_IFDIR {
                    return Ok(Removal::Directory);
                }
                Ok(absent_ok(v.unlink(&p))?.map_or(Removal::Absent, |_| Removal::Removed))
            })
        })?;
        match found {
            Removal::Absent => return Ok(()),
            Removal::Removed => {}
            Removal::Directory => {
                let p = rel.to_path_buf();
                let kids = self
                    .access
                    .step(|| absent_ok(self.access.dst(move |v| v.read_dir_noatime(&p))))?;
                for k in kids.unwrap_or_default() {
                    self.remove(&volume::child(rel, &k.name))?;
                }
                let p = rel.to_path_buf();
                if self
                    .access
                    .step(|| absent_ok(self.access.dst(move |v| v.rmdir(&p))))?
                    .is_none()
                {
                    return Ok(());
                }
            }
        }
        self.note_change(rel);
        Ok(())
    }
}

/// Closes a destination fd on the destination's lane: closing a file on a
/// hung FUSE side can block beyond any signal.
struct DstFd<'a, A: Access> {
    access: &'a A,
    fd: Option<Arc<OwnedFd>>,
}

impl<A: Access> Drop for DstFd<'_, A> {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            let _ = self.access.dst(move |_| {
                drop(fd);
                Ok(())
            });
        }
    }
}

/// Files and bytes under `rel` on `v`, for progress totals: every entry
/// counts as one, bytes are regular files' sizes. For `Depth::Entry`, the
/// entry and, for a directory, its direct children. Unreadable parts count
/// as nothing.
pub fn measure(v: &Volume, rel: &Path, depth: Depth) -> (u64, u64) {
    let (mut entries, mut bytes) = (0, 0);
    if is_meta(rel) {
        return (0, 0);
    }
    let mut stack = vec![(rel.to_path_buf(), 0u32)];
    while let Some((p, level)) = stack.pop() {
        let Ok(st) = v.lstat(&p) else { continue };
        entries += 1;
        match file_type(&st) {
            libc::S_IFREG => bytes += st.st_size as u64,
            libc::S_IFDIR if depth == Depth::Tree || level == 0 => {
                let root = p.as_os_str().is_empty();
                for k in v.read_dir_noatime(&p).unwrap_or_default() {
                    if !(root && k.name == META_DIR) {
                        stack.push((volume::child(&p, &k.name), level + 1));
                    }
                }
            }
            _ => {}
        }
    }
    (entries, bytes)
}

/// Whether `rel` is, or is inside, the metadata directory.
fn is_meta(rel: &Path) -> bool {
    rel.components().next() == Some(Component::Normal(OsStr::new(META_DIR)))
}

fn file_type(st: &Stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

fn owner_of(st: &Stat) -> Owner {
    Owner {
        uid: st.st_uid,
        gid: st.st_gid,
    }
}

/// `Ok(None)` for an entry that is not there (ENOENT, or ENOTDIR for a path
/// through a non-directory).
fn absent_ok<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens a file without updating its access time where allowed, so that a
/// compare leaves alone the times it compares. `O_NONBLOCK` keeps a fifo
/// swapped in meanwhile from blocking the open.
fn open_noatime(v: &Volume, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_NONBLOCK;
    match v.open_file(rel, flags | libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => v.open_file(rel, flags),
        r => r,
    }
}

/// Up to `CHUNK` bytes at `off`; fewer only at the end of the file.
/// The unit a differing chunk is compared and written in.
const PAGE: usize = 4096;

/// The byte ranges of `s` whose pages differ from `d` (None: from zeros,
/// for a new file), adjacent ranges merged.
fn differing(s: &[u8], d: Option<&[u8]>) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for a in (0..s.len()).step_by(PAGE) {
        let b = (a + PAGE).min(s.len());
        let differs = match d {
            Some(d) => d.get(a..b) != Some(&s[a..b]),
            None => s[a..b].iter().any(|x| *x != 0),
        };
        if differs {
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => out.push((a, b)),
            }
        }
    }
    out
}

fn read_chunk(fd: BorrowedFd<'_>, off: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; CHUNK];
    let n = volume::pread(fd, &mut buf, off)?;
    buf.truncate(n);
    Ok(buf)
}

/// The xattrs of `rel` itself (a symlink's own).
fn xattrs(v: &Volume, rel: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let names = match sized(|size| v.listxattr(rel, size)) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        r => r?,
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        match sized(|size| v.getxattr(rel, OsStr::from_bytes(name), size)) {
            Ok(value) => {
                out.insert(name.to_vec(), value);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Asks an xattr call for the size, then the bytes; again if they grew in
/// between (ERANGE).
fn sized(mut call: impl FnMut(usize) -> io::Result<(Vec<u8>, usize)>) -> io::Result<Vec<u8>> {
    loop {
        let (_, n) = call(0)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        match call(n) {
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {}
            r => return r.map(|(buf, _)| buf),
        }
    }
}

/// Makes dst's metadata of `rel` equal `s` and `sx`; calls that would change
/// nothing are skipped. Owner first (root's chown clears set-ID bits and
/// file capabilities), then mode, xattrs, and times last, since every other
/// change moves them.
fn apply_meta(v: &Volume, rel: &Path, s: &Stat, sx: &BTreeMap<Vec<u8>, Vec<u8>>) -> io::Result<bool> {
    let mut d = v.lstat(rel)?;
    if file_type(&d) != file_type(s) {
        // Replaced meanwhile; the next pass over it copies it again.
        return Ok(false);
    }
    let symlink = file_type(s) == libc::S_IFLNK;
    let mut changed = false;
    if (s.st_uid, s.st_gid) != (d.st_uid, d.st_gid) {
        v.chown(rel, s.st_uid, s.st_gid)?;
        d = v.lstat(rel)?;
        changed = true;
    }
    if !symlink && s.st_mode & 0o7777 != d.st_mode & 0o7777 {
        v.chmod(rel, s.st_mode & 0o7777)?;
        changed = true;
    }
    let dx = xattrs(v, rel)?;
    for (name, value) in sx {
        if dx.get(name) != Some(value) {
            v.setxattr(rel, OsStr::from_bytes(name), value, 0)?;
            changed = true;
        }
    }
    for name in dx.keys().filter(|n| !sx.contains_key(*n)) {
        match v.removexattr(rel, OsStr::from_bytes(name)) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            r => r?,
        }
        changed = true;
    }
    // Reading a symlink's target updates its atime (relatime), on both sides
    // and with no way around it, so for a symlink only mtime tells.
    let atime_differs = (s.st_atime, s.st_atime_nsec) != (d.st_atime, d.st_atime_nsec);
    let mtime_differs = (s.st_mtime, s.st_mtime_nsec) != (d.st_mtime, d.st_mtime_nsec);
    if changed || mtime_differs || (atime_differs && !symlink) {
        let at = |secs, nanos| SetTime::At { secs, nanos };
        v.utimens(rel, at(s.st_atime, s.st_atime_nsec), at(s.st_mtime, s.st_mtime_nsec))?;
        changed |= mtime_differs || atime_differs;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Side;
    use std::ffi::CString;
    use std::fs;
    use std::os::unix::fs::{FileExt, PermissionsExt};

    struct Pair {
        _t: tempfile::TempDir,
        a: PathBuf,
        b: PathBuf,
    }

    fn pair() -> Pair {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        Pair { _t: t, a, b }
    }

    impl Pair {
        fn direct(&self) -> Direct {
            Direct {
                src: Volume::open(Side::Primary, &self.a).unwrap(),
                dst: Arc::new(Volume::open(Side::Mirror, &self.b).unwrap()),
            }
        }

        /// Reconciles `rel` with a fresh copier and returns its counters.
        fn run(&self, rel: &str, depth: Depth) -> Stats {
            let (access, stats) = (self.direct(), Stats::default());
            Copier::new(&access, &stats).reconcile(Path::new(rel), depth).unwrap();
            stats
        }

        fn assert_same(&self) {
            assert_eq!(
                crate::recovery::verify::compare_trees(&self.a, &self.b).unwrap(),
                vec![]
            );
        }
    }

    fn c(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    fn set_times(p: &Path, atime: i64, mtime: i64) {
        let ts = [
            libc::timespec {
                tv_sec: atime,
                tv_nsec: 123,
            },
            libc::timespec {
                tv_sec: mtime,
                tv_nsec: 456_789,
            },
        ];
        // SAFETY: valid C string and timespec array.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, c(p).as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
    }

    fn set_xattr(p: &Path, name: &str, value: &[u8]) {
        let n = CString::new(name).unwrap();
        // SAFETY: valid C strings and value buffer.
        let r = unsafe { libc::lsetxattr(c(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        assert_eq!(r, 0, "setxattr {}: {}", p.display(), io::Error::last_os_error());
    }

    fn changed(s: &Stats) -> (u64, u64) {
        (s.entries_changed.load(Relaxed), s.bytes_copied.load(Relaxed))
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no failure mode.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("NOT ROOT: owners are not checked");
        }
        root
    }

    const BIG: usize = 3 * CHUNK + 12_345;

    /// Files (one large), dirs, symlinks, a fifo, hard links, xattrs, modes,
    /// owners and times.
    fn populate(a: &Path) {
        fs::create_dir_all(a.join("d/e")).unwrap();
        fs::create_dir_all(a.join(META_DIR)).unwrap();
        fs::write(a.join(META_DIR).join("secret"), b"never copied").unwrap();
        let big: Vec<u8> = (0..BIG).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(a.join("big"), &big).unwrap();
        fs::write(a.join("d/small"), b"hello").unwrap();
        fs::write(a.join("d/e/empty"), b"").unwrap();
        fs::write(a.join("h1"), b"linked").unwrap();
        fs::hard_link(a.join("h1"), a.join("d/h2")).unwrap();
        fs::hard_link(a.join("h1"), a.join("d/e/h3")).unwrap();
        std::os::unix::fs::symlink("../big", a.join("d/link")).unwrap();
        std::os::unix::fs::symlink("/nowhere", a.join("dangling")).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(c(&a.join("d/fifo")).as_ptr(), 0o640) }, 0);
        fs::set_permissions(a.join("d/small"), fs::Permissions::from_mode(0o4751)).unwrap();
        fs::set_permissions(a.join("d/e"), fs::Permissions::from_mode(0o3711)).unwrap();
        set_xattr(&a.join("big"), "user.one", b"1");
        set_xattr(&a.join("d"), "user.dir", b"");
        set_xattr(&a.join("d/e/h3"), "user.shared", b"x");
        if is_root() {
            std::os::unix::fs::lchown(a.join("d/small"), Some(1234), Some(1234)).unwrap();
            std::os::unix::fs::lchown(a.join("d/link"), Some(1234), Some(1234)).unwrap();
            std::os::unix::fs::lchown(a.join("d/e"), Some(1234), Some(1234)).unwrap();
            // chown cleared the set-ID bits.
            fs::set_permissions(a.join("d/small"), fs::Permissions::from_mode(0o4751)).unwrap();
            fs::set_permissions(a.join("d/e"), fs::Permissions::from_mode(0o3711)).unwrap();
        }
        for (i, p) in ["big", "d/small", "d/link", "d/fifo", "h1", "d/e", "d", "dangling"]
            .iter()
            .enumerate()
        {
            set_times(&a.join(p), 1_600_000_000 + i as i64, 1_500_000_000 + i as i64);
        }
    }

    #[test]
    fn copies_a_tree_then_changes_nothing_then_only_the_changed_chunk() {
        let p = pair();
        populate(&p.a);
        fs::create_dir(p.b.join(META_DIR)).unwrap();
        fs::write(p.b.join(META_DIR).join("keep"), b"dst's own").unwrap();

        let s = p.run("", Depth::Tree);
        assert!(s.entries_changed.load(Relaxed) >= 12);
        assert_eq!(s.bytes_copied.load(Relaxed), (BIG + 5 + 6) as u64);
        // Before compare_trees, whose reads move atimes.
        assert_eq!(changed(&p.run("", Depth::Tree)), (0, 0));
        let st = |path: &Path| fs::symlink_metadata(path).unwrap();
        use std::os::unix::fs::MetadataExt;
        for rel in ["big", "d/small", "d/fifo", "d/e", "d"] {
            let (x, y) = (st(&p.a.join(rel)), st(&p.b.join(rel)));
            assert_eq!((x.atime(), x.atime_nsec()), (y.atime(), y.atime_nsec()), "{rel}");
            assert_eq!((x.mtime(), x.mtime_nsec()), (y.mtime(), y.mtime_nsec()), "{rel}");
        }
        assert_eq!(st(&p.b.join("d/link")).mtime(), st(&p.a.join("d/link")).mtime());
        assert_eq!(st(&p.b.join("h1")).ino(), st(&p.b.join("d/e/h3")).ino());
        p.assert_same();
        assert_eq!(fs::read(p.b.join(META_DIR).join("keep")).unwrap(), b"dst's own");
        assert!(!p.b.join(META_DIR).join("secret").exists());

        let f = fs::OpenOptions::new().write(true).open(p.a.join("big")).unwrap();
        f.write_at(b"!", (CHUNK + CHUNK / 2) as u64).unwrap();
        let s = p.run("big", Depth::Entry);
        assert_eq!(
            s.bytes_copied.load(Relaxed),
            PAGE as u64,
            "only the page that differs is written"
        );
        assert_eq!(s.bytes_compared.load(Relaxed), BIG as u64);
        p.assert_same();

        // Shrinking is a truncate, with nothing written.
        f.set_len(10).unwrap();
        // (The root's atime, moved by compare_trees, may be fixed too.)
        assert_eq!(changed(&p.run("big", Depth::Entry)).1, 0);
        p.assert_same();
    }

    #[test]
    fn removes_what_src_lacks_and_replaces_a_changed_type() {
        let p = pair();
        fs::create_dir_all(p.a.join("x/sub")).unwrap();
        fs::write(p.a.join("x/sub/f"), b"f").unwrap();
        fs::write(p.a.join("l"), b"now a file").unwrap();
        fs::write(p.b.join("x"), b"a file where src has a dir").unwrap();
        std::os::unix::fs::symlink("t", p.b.join("l")).unwrap();
        fs::create_dir_all(p.b.join("gone/deep/er")).unwrap();
        fs::write(p.b.join("gone/deep/er/f"), b"").unwrap();
        fs::write(p.b.join("gone2"), b"").unwrap();

        p.run("gone", Depth::Entry);
        assert!(!p.b.join("gone").exists());
        p.run("x", Depth::Entry);
        assert_eq!(fs::read(p.b.join("x/sub/f")).unwrap(), b"f");
        p.run("", Depth::Tree);
        p.assert_same();
    }

    #[test]
    fn entry_depth_copies_missing_children_whole_but_does_not_descend() {
        let p = pair();
        for d in [&p.a, &p.b] {
            fs::create_dir_all(d.join("d/both")).unwrap();
        }
        fs::write(p.a.join("d/both/f"), b"src").unwrap();
        fs::write(p.b.join("d/both/f"), b"dst").unwrap();
        fs::create_dir_all(p.a.join("d/new/deeper")).unwrap();
        fs::write(p.a.join("d/new/deeper/f"), b"whole").unwrap();
        fs::write(p.b.join("d/extra"), b"").unwrap();

        p.run("d", Depth::Entry);
        assert_eq!(fs::read(p.b.join("d/new/deeper/f")).unwrap(), b"whole");
        assert!(!p.b.join("d/extra").exists());
        assert_eq!(fs::read(p.b.join("d/both/f")).unwrap(), b"dst");
        p.run("d", Depth::Tree);
        p.assert_same();
    }

    #[test]
    fn writes_depth_also_compares_the_files_in_the_directory_but_not_below() {
        let p = pair();
        for d in [&p.a, &p.b] {
            fs::create_dir_all(d.join("d/sub")).unwrap();
        }
        // The same size on both sides: only the contents differ.
        fs::write(p.a.join("d/f"), b"src").unwrap();
        fs::write(p.b.join("d/f"), b"dst").unwrap();
        fs::write(p.a.join("d/sub/g"), b"src").unwrap();
        fs::write(p.b.join("d/sub/g"), b"dst").unwrap();
        fs::write(p.a.join("d/new"), b"new").unwrap();

        p.run("d", Depth::Writes);
        assert_eq!(fs::read(p.b.join("d/f")).unwrap(), b"src");
        assert_eq!(fs::read(p.b.join("d/new")).unwrap(), b"new");
        assert_eq!(
            fs::read(p.b.join("d/sub/g")).unwrap(),
            b"dst",
            "subdirectories are not descended into"
        );
        p.run("d", Depth::Tree);
        p.assert_same();
    }

    #[test]
    fn a_missing_parent_chain_is_made_first() {
        let p = pair();
        fs::create_dir_all(p.a.join("p/q/r")).unwrap();
        fs::write(p.a.join("p/q/r/f"), b"f").unwrap();
        fs::write(p.a.join("p/sibling"), b"s").unwrap();
        fs::set_permissions(p.a.join("p/q"), fs::Permissions::from_mode(0o750)).unwrap();
        set_times(&p.a.join("p/q"), 1_000, 2_000);
        p.run("p/q/r/f", Depth::Entry);
        p.assert_same();
        assert_eq!(
            fs::symlink_metadata(p.b.join("p/q")).unwrap().permissions().mode() & 0o7777,
            0o750
        );
    }

    #[test]
    fn hard_links_are_fixed_both_ways() {
        let p = pair();
        fs::write(p.a.join("a1"), b"same").unwrap();
        fs::hard_link(p.a.join("a1"), p.a.join("a2")).unwrap();
        fs::write(p.a.join("b1"), b"same").unwrap();
        fs::write(p.a.join("b2"), b"same").unwrap();
        // dst: a1/a2 apart, b1/b2 linked: the opposite of src.
        fs::write(p.b.join("a1"), b"same").unwrap();
        fs::write(p.b.join("a2"), b"same").unwrap();
        fs::write(p.b.join("b1"), b"same").unwrap();
        fs::hard_link(p.b.join("b1"), p.b.join("b2")).unwrap();
        p.run("", Depth::Tree);
        p.assert_same();
    }

    #[test]
    fn measures_entries_and_bytes() {
        let p = pair();
        fs::create_dir_all(p.a.join("d/e")).unwrap();
        fs::create_dir_all(p.a.join(META_DIR)).unwrap();
        fs::write(p.a.join(META_DIR).join("x"), b"123").unwrap();
        fs::write(p.a.join("d/f"), b"12345").unwrap();
        fs::write(p.a.join("d/e/g"), b"12").unwrap();
        let v = Volume::open(Side::Primary, &p.a).unwrap();
        assert_eq!(measure(&v, Path::new(""), Depth::Tree), (5, 7));
        assert_eq!(measure(&v, Path::new("d"), Depth::Entry), (3, 5));
        assert_eq!(measure(&v, Path::new(META_DIR), Depth::Tree), (0, 0));
    }
}
