//! The durable records of paths: the missed-change journal and the
//! write-intent record.
//!
//! Owns: `PathLog`, an append-only file of relative paths with an in-memory
//! set in front of it, so that recording a path costs one durable append
//! the first time and nothing after; and `Intent`, the write-intent record
//! built from two `PathLog` epochs. Knows nothing of FUSE or of the engine.
//!
//! File format: one path per line; `\` and newline in a name are escaped as
//! `\\` and `\n`, every other byte is written as is.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The missed-change journal of a side, kept on the side that is up.
pub const JOURNAL: &str = "journal";
/// The write-intent record, kept on the primary: `intent.0` and `intent.1`.
pub const INTENT: &str = "intent";

/// The first component of a path recorded for a whole-tree catch-up (a
/// directory renamed while its side was being resynced, or everything).
const TREE: &str = "\0tree";

/// The first component of a directory recorded for a catch-up of its set
/// of entries and of the contents of its regular files (sorts after `TREE`).
const WRITES: &str = "\0writes";

/// `p` marked for a catch-up of its whole tree ("" is everything).
pub fn tree(p: &Path) -> PathBuf {
    Path::new(TREE).join(p)
}

/// Directory `p` marked for a catch-up of its entries and of its regular
/// files' contents, but not of its subdirectories' (a write to a file
/// created in the current write-intent epoch: see `Intent::born`).
pub fn writes_in(p: &Path) -> PathBuf {
    Path::new(WRITES).join(p)
}

/// How much of a recorded path is to be caught up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// The entry itself (for a directory, its set of entries).
    Entry,
    /// A directory's entries and its regular files' contents (`writes_in`).
    Writes,
    /// Everything below it (`tree`).
    Tree,
}

/// A recorded path without its mark, and the mark.
pub fn unmark(p: &Path) -> (&Path, Mark) {
    if let Ok(rest) = p.strip_prefix(TREE) {
        (rest, Mark::Tree)
    } else if let Ok(rest) = p.strip_prefix(WRITES) {
        (rest, Mark::Writes)
    } else {
        (p, Mark::Entry)
    }
}

fn encode(p: &Path, out: &mut Vec<u8>) {
    for &b in p.as_os_str().as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            _ => out.push(b),
        }
    }
    out.push(b'\n');
}

fn decode(line: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(line.len());
    let mut it = line.iter();
    while let Some(&b) = it.next() {
        if b == b'\\' {
            match it.next() {
                Some(b'n') => out.push(b'\n'),
                Some(&c) => out.push(c),
                None => {}
            }
        } else {
            out.push(b);
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Reads the paths recorded in `file`; a missing file holds none. A torn
/// last line (a crash mid-append) is read as far as it goes, which can only
/// name an ancestor-free prefix of a path: harmless, it is reconciled too.
pub fn read_paths(file: &Path) -> io::Result<BTreeSet<PathBuf>> {
    match fs::read(file) {
        Ok(bytes) => Ok(bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(decode)
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

struct Inner {
    file: Option<Arc<File>>,
    /// Paths on disk.
    seen: BTreeSet<PathBuf>,
    /// Paths appended but not yet synced, with their append's number.
    pending: BTreeMap<PathBuf, u64>,
    /// Appends made, and appends known durable.
    written: u64,
    synced: u64,
    /// A caller is in `fdatasync` for everyone.
    syncing: bool,
}

/// A durable, deduplicated set of paths in one file.
///
/// Concurrent callers share their `fdatasync`s (group commit): each
/// appends under the lock, then one of them syncs for all that appended
/// before it, while the next ones append behind it.
pub struct PathLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    synced: Condvar,
}

impl PathLog {
    /// Opens the log at `path`, loading what it already records.
    pub fn open(path: PathBuf) -> io::Result<PathLog> {
        let seen = read_paths(&path)?;
        Ok(PathLog {
            path,
            inner: Mutex::new(Inner {
                file: None,
                seen,
                pending: BTreeMap::new(),
                written: 0,
                synced: 0,
                syncing: false,
            }),
            synced: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `paths` durably; returns once they are on disk. Paths already
    /// recorded cost nothing; a path another caller has appended and not
    /// yet synced waits for that sync, so nobody answers before its path is
    /// durable.
    pub fn record(&self, paths: &[&Path]) -> io::Result<()> {
        let mut inner = self.lock();
        let mut buf = Vec::new();
        let mut need = 0;
        let mut new = Vec::new();
        for p in paths {
            if inner.seen.contains(*p) {
                continue;
            }
            match inner.pending.get(*p) {
                Some(seq) => need = need.max(*seq),
                None if !new.contains(p) => {
                    encode(p, &mut buf);
                    new.push(*p);
                }
                None => {}
            }
        }
        if !buf.is_empty() {
            if inner.file.is_none() {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&self.path)?;
                // A new file must survive a crash: its directory entry too.
                if let Some(dir) = self.path.parent() {
                    File::open(dir)?.sync_all()?;
                }
                inner.file = Some(Arc::new(f));
            }
            let f = inner
                .file
                .clone()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
            (&*f).write_all(&buf)?;
            inner.written += 1;
            let seq = inner.written;
            for p in new {
                inner.pending.insert(p.to_path_buf(), seq);
            }
            need = seq;
        }
        while need > inner.synced {
            if inner.syncing {
                inner = self.synced.wait(inner).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let Some(f) = inner.file.clone() else {
                // Cleared meanwhile: nothing left to make durable.
                return Ok(());
            };
            inner.syncing = true;
            let upto = inner.written;
            drop(inner);
            let r = f.sync_data();
            inner = self.lock();
            inner.syncing = false;
            if r.is_ok() {
                inner.synced = inner.synced.max(upto);
                let durable: Vec<PathBuf> = inner
                    .pending
                    .iter()
                    .filter(|(_, s)| **s <= upto)
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in durable {
                    inner.pending.remove(&p);
                    inner.seen.insert(p);
                }
            }
            self.synced.notify_all();
            r?;
        }
        Ok(())
    }

    /// The first path recorded, in path order.
    pub fn first(&self) -> Option<PathBuf> {
        self.lock().seen.first().cloned()
    }

    /// Forgets `p` in memory, while it is being caught up: a change to it
    /// from now on is recorded (appended) again. The file keeps it until
    /// `clear`, so a crash meanwhile repeats the work rather than losing it.
    pub fn forget(&self, p: &Path) {
        self.lock().seen.remove(p);
    }

    pub fn contains(&self, p: &Path) -> bool {
        self.lock().seen.contains(p)
    }

    pub fn len(&self) -> usize {
        self.lock().seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().seen.is_empty()
    }

    /// Every path recorded.
    pub fn paths(&self) -> BTreeSet<PathBuf> {
        self.lock().seen.clone()
    }

    /// Forgets everything: removes the file durably.
    pub fn clear(&self) -> io::Result<()> {
        let mut inner = self.lock();
        inner.file = None;
        inner.seen.clear();
        inner.pending.clear();
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Past this many paths in an epoch, clearing it syncs the sides' whole
/// filesystems (`syncfs`) instead of each path: the names of files written
/// under a `writes_in` mark are then no longer kept.
pub const SYNC_BY_NAME: usize = 256;

/// The write-intent record: every path with a change in flight is in it
/// before the change reaches either side. It has two epochs; paths go into
/// the current one. Clearing (lazily, in the background) moves to the other
/// epoch once no change of the old one is in flight, makes the old epoch's
/// paths durable on both sides, and only then removes the old epoch's file.
pub struct Intent {
    dir: PathBuf,
    epochs: [PathLog; 2],
    current: Mutex<Epoch>,
}

/// The current epoch and what it knows in memory only.
#[derive(Default)]
struct Epoch {
    index: usize,
    /// Inodes created in this epoch (see `born`).
    born: HashSet<u64>,
    /// Per epoch: files written under a `writes_in` record of their
    /// directory rather than under their own, to be synced when the epoch
    /// is cleared; no more than `SYNC_BY_NAME` and one (past that, the
    /// epoch is cleared by `syncfs`, and 100,000 new files would keep
    /// 100,000 names in memory for nothing).
    written: [BTreeSet<PathBuf>; 2],
}

impl Intent {
    pub fn file(dir: &Path, epoch: usize) -> PathBuf {
        dir.join(format!("{INTENT}.{epoch}"))
    }

    /// Paths left by a run that did not end cleanly.
    pub fn leftover(dir: &Path) -> io::Result<BTreeSet<PathBuf>> {
        let mut all = read_paths(&Self::file(dir, 0))?;
        all.extend(read_paths(&Self::file(dir, 1))?);
        Ok(all)
    }

    /// Starts empty: leftovers must have been reconciled and removed first.
    pub fn open(dir: &Path) -> io::Result<Intent> {
        for e in 0..2 {
            match fs::remove_file(Self::file(dir, e)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Intent {
            dir: dir.to_path_buf(),
            epochs: [PathLog::open(Self::file(dir, 0))?, PathLog::open(Self::file(dir, 1))?],
            current: Mutex::new(Epoch::default()),
        })
    }

    fn current(&self) -> MutexGuard<'_, Epoch> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `paths` in the current epoch before a change is made.
    pub fn record(&self, paths: &[&Path]) -> io::Result<()> {
        let e = self.current().index;
        self.epochs[e].record(paths)
    }

    /// Records a write to `file`, created in the current epoch, by a
    /// `writes_in` mark of its directory: a run of new files in one
    /// directory then costs one durable record per epoch instead of one
    /// each (a crash recovery compares the contents of every regular file
    /// in that directory). `file` is kept in memory to be synced when the
    /// epoch is cleared.
    pub fn record_new_file(&self, file: &Path) -> io::Result<()> {
        let e = self.current().index;
        let dir = file.parent().unwrap_or(Path::new(""));
        self.epochs[e].record(&[&writes_in(dir)])?;
        let mut cur = self.current();
        if cur.written[e].len() <= SYNC_BY_NAME {
            cur.written[e].insert(file.to_path_buf());
        }
        Ok(())
    }

    /// Notes that inode `ino` was created in the current epoch.
    pub fn born(&self, ino: u64) {
        self.current().born.insert(ino);
    }

    /// True if inode `ino` was created in the current epoch: writes to it
    /// are recorded by `record_new_file`. (Only the cost of a crash
    /// recovery depends on it, not what it repairs: a directory whose
    /// files are all compared covers a write to any of them.)
    pub fn is_new(&self, ino: u64) -> bool {
        self.current().born.contains(&ino)
    }

    /// True when the current epoch records nothing.
    pub fn idle(&self) -> bool {
        let e = self.current().index;
        self.epochs[e].is_empty()
    }

    /// Switches to the other epoch. The caller must hold off changes while
    /// it does (the engine's gate), so that no change of the old epoch is in
    /// flight afterwards. Returns the old epoch.
    pub fn switch(&self) -> usize {
        let mut cur = self.current();
        let old = cur.index;
        cur.index = 1 - old;
        cur.born.clear();
        old
    }

    /// The paths epoch `e` records, and the files written under its
    /// `writes_in` marks.
    pub fn paths(&self, e: usize) -> BTreeSet<PathBuf> {
        let mut all = self.epochs[e].paths();
        all.extend(self.current().written[e].iter().cloned());
        all
    }

    /// Forgets epoch `e` once its changes are durable on both sides.
    pub fn clear(&self, e: usize) -> io::Result<()> {
        self.epochs[e].clear()?;
        self.current().written[e].clear();
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_records_share_syncs_and_all_land() {
        let t = tempfile::tempdir().unwrap();
        let log = Arc::new(PathLog::open(t.path().join("j")).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for k in 0..50 {
                        let own = PathBuf::from(format!("t{i}/f{k}"));
                        // Every thread also records one shared path, often
                        // while another has it appended but not yet synced.
                        log.record(&[&own, Path::new("shared")]).unwrap();
                        assert!(log.contains(&own) && log.contains(Path::new("shared")));
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(log.len(), 8 * 50 + 1);
        let on_disk = read_paths(&t.path().join("j")).unwrap();
        assert_eq!(on_disk, log.paths());
        let text = fs::read(t.path().join("j")).unwrap();
        let shared = text.split(|b| *b == b'\n').filter(|l| *l == b"shared").count();
        assert_eq!(shared, 1, "a path is appended once");
    }

    #[test]
    fn paths_round_trip_with_odd_bytes() {
        let t = tempfile::tempdir().unwrap();
        let log = PathLog::open(t.path().join("j")).unwrap();
        let odd = PathBuf::from(OsStr::from_bytes(b"a\\b\nc/\xff"));
        log.record(&[Path::new("x/y"), &odd]).unwrap();
        log.record(&[Path::new("x/y")]).unwrap();
        let again = PathLog::open(t.path().join("j")).unwrap();
        assert_eq!(again.paths(), BTreeSet::from([PathBuf::from("x/y"), odd]));
        // A path recorded twice is appended once.
        assert_eq!(
            fs::read(t.path().join("j"))
                .unwrap()
                .iter()
                .filter(|b| **b == b'\n')
                .count(),
            2
        );
        again.record(&[&tree(Path::new(""))]).unwrap();
        let first = PathLog::open(t.path().join("j")).unwrap().first().unwrap();
        assert_eq!(
            unmark(&first),
            (Path::new(""), Mark::Tree),
            "a whole-tree mark sorts first"
        );
        again.record(&[&writes_in(Path::new(""))]).unwrap();
        let first = PathLog::open(t.path().join("j")).unwrap().first().unwrap();
        assert_eq!(
            unmark(&first),
            (Path::new(""), Mark::Tree),
            "a whole-tree mark sorts first"
        );
        assert_eq!(unmark(&writes_in(Path::new("d"))), (Path::new("d"), Mark::Writes));
        assert_eq!(unmark(Path::new("d/e")), (Path::new("d/e"), Mark::Entry));
        again.clear().unwrap();
        assert!(PathLog::open(t.path().join("j")).unwrap().is_empty());
    }

    #[test]
    fn intent_epochs_clear_only_the_old_one() {
        let t = tempfile::tempdir().unwrap();
        let i = Intent::open(t.path()).unwrap();
        assert!(i.idle());
        i.record(&[Path::new("a")]).unwrap();
        let old = i.switch();
        i.record(&[Path::new("b")]).unwrap();
        assert_eq!(Intent::leftover(t.path()).unwrap().len(), 2);
        i.clear(old).unwrap();
        assert_eq!(
            Intent::leftover(t.path()).unwrap(),
            BTreeSet::from([PathBuf::from("b")])
        );
    }

    #[test]
    fn a_new_file_is_recorded_by_its_directory_and_synced_by_name_until_the_epoch_ends() {
        let t = tempfile::tempdir().unwrap();
        let i = Intent::open(t.path()).unwrap();
        i.born(7);
        assert!(i.is_new(7) && !i.is_new(8));
        i.record_new_file(Path::new("d/f")).unwrap();
        i.record_new_file(Path::new("d/g")).unwrap();
        // Durably: the directory's mark, once.
        assert_eq!(
            Intent::leftover(t.path()).unwrap(),
            BTreeSet::from([writes_in(Path::new("d"))])
        );
        let old = i.switch();
        assert!(!i.is_new(7), "an inode is new only in the epoch it was created in");
        assert_eq!(
            i.paths(old),
            BTreeSet::from([writes_in(Path::new("d")), PathBuf::from("d/f"), PathBuf::from("d/g")])
        );
        i.clear(old).unwrap();
        assert!(i.paths(old).is_empty());
        assert!(Intent::leftover(t.path()).unwrap().is_empty());
        // Past what is synced by name, names are not kept, but the epoch
        // still has more paths than that (so it is synced whole).
        for n in 0..2 * SYNC_BY_NAME {
            i.record_new_file(&PathBuf::from(format!("d/{n}"))).unwrap();
        }
        let old = i.switch();
        assert_eq!(
            i.paths(old).len(),
            SYNC_BY_NAME + 2,
            "the mark and SYNC_BY_NAME + 1 names"
        );
    }
}
