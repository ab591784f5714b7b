//! The change log of asynchronous mode: every change made on the primary,
//! in the order it was made there, kept until the mirror has it.
//!
//! Owns: the record (`Change` and its encoding), the segment files under
//! `.mirrorfs/changelog/` on the primary, appending with shared syncs
//! (group commit), reading from a sequence number on, and removing the
//! segments the mirror no longer needs. `Change::apply` replays one record
//! on a side. Knows nothing of FUSE, of health or of the shipper's policy.
//!
//! Format: a segment is named by the sequence number of its first record,
//! 20 decimal digits and `.log`. A record is
//!
//! ```text
//! len      u32 LE   bytes that follow, checksum included
//! seq      u64 LE   1, 2, 3, ... with no gap, across segments
//! time     u64 LE   wall clock when it was appended, ns since the epoch
//! kind     u8       then the kind's fields: integers LE; byte strings
//!                   (paths, names, data) as a u32 LE length and the bytes
//! xxh3     u64 LE   of everything from seq to the last field
//! ```
//!
//! A record that fails its length or checksum ends the log: it can only be
//! the tail of an append that a crash cut short, which was never made
//! durable, and so never promised.
//!
//! Replaying: every kind but `Rename` and `Link` sets what it touches to a
//! value that does not depend on what was there (data at an offset, a size,
//! a mode, an empty new file, an absent name). Replaying, in order, a run
//! of such records that the mirror already partly has therefore ends in the
//! same state as applying them once. `Rename` and `Link` move or share
//! what is there: the shipper records its position right after each, so
//! that at most one of them is ever replayed, and that one is recognised
//! by its effect (`Change::apply` with `again`).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use xxhash_rust::xxh3::xxh3_64;

use crate::volume::{self, Owner, SetTime, Volume};

/// The change log's directory, inside the primary's metadata directory.
pub const DIR: &str = "changelog";

/// The file holding the log's identity, in its directory.
const ID: &str = "id";

/// A segment is closed and a new one started past this size, so that what
/// the mirror has applied can be removed a segment at a time.
const SEGMENT: u64 = 64 << 20;

/// A segment is preallocated only where the disk has this much free.
const ROOM_TO_PREALLOCATE: u64 = 16 * SEGMENT;

/// The next segment, made and preallocated ahead (`Log::prepare_spare`).
const SPARE: &str = "spare";

/// States of the spare segment. One thread at most makes it: a new one
/// starts only from `SPARE_NONE`.
const SPARE_NONE: u8 = 0;
const SPARE_MAKING: u8 = 1;
const SPARE_READY: u8 = 2;
/// It could not be made (no room): not tried again for this segment.
const SPARE_FAILED: u8 = 3;

/// Bytes of a record around its fields: len, seq, time, kind, checksum.
const FRAME: usize = 4 + 8 + 8 + 1 + 8;

/// The lag is known to this resolution: appends closer together than this
/// share one entry of the time index.
const TICK_NS: u64 = 10_000_000;

/// One change, as made on the primary. Paths are relative to a side's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Write {
        path: PathBuf,
        offset: u64,
        data: Vec<u8>,
    },
    Truncate {
        path: PathBuf,
        size: u64,
    },
    /// A new, empty regular file.
    Create {
        path: PathBuf,
        mode: u32,
        owner: Owner,
    },
    Mkdir {
        path: PathBuf,
        mode: u32,
        owner: Owner,
    },
    Mknod {
        path: PathBuf,
        mode: u32,
        rdev: u64,
        owner: Owner,
    },
    Symlink {
        target: OsString,
        path: PathBuf,
        owner: Owner,
    },
    Link {
        old: PathBuf,
        new: PathBuf,
    },
    Unlink {
        path: PathBuf,
    },
    Rmdir {
        path: PathBuf,
    },
    Rename {
        old: PathBuf,
        new: PathBuf,
        flags: u32,
    },
    Chmod {
        path: PathBuf,
        mode: u32,
    },
    /// `u32::MAX` leaves an id as it is.
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
    },
    Times {
        path: PathBuf,
        atime: SetTime,
        mtime: SetTime,
    },
    SetXattr {
        path: PathBuf,
        name: OsString,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: PathBuf,
        name: OsString,
    },
    /// Allocation, hole punching and zeroing (the modes whose effect does
    /// not depend on what is there).
    Fallocate {
        path: PathBuf,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// A barrier: the primary made `path` durable here.
    Fsync {
        path: PathBuf,
        datasync: bool,
    },
}

impl Change {
    fn kind(&self) -> u8 {
        match self {
            Change::Write { .. } => 1,
            Change::Truncate { .. } => 2,
            Change::Create { .. } => 3,
            Change::Mkdir { .. } => 4,
            Change::Mknod { .. } => 5,
            Change::Symlink { .. } => 6,
            Change::Link { .. } => 7,
            Change::Unlink { .. } => 8,
            Change::Rmdir { .. } => 9,
            Change::Rename { .. } => 10,
            Change::Chmod { .. } => 11,
            Change::Chown { .. } => 12,
            Change::Times { .. } => 13,
            Change::SetXattr { .. } => 14,
            Change::RemoveXattr { .. } => 15,
            Change::Fallocate { .. } => 16,
            Change::Fsync { .. } => 17,
        }
    }

    /// False for the kinds that are not safe to replay over a state that
    /// already has them (see the module header).
    pub fn replays_safely(&self) -> bool {
        !matches!(self, Change::Rename { .. } | Change::Link { .. })
    }

    /// True for the kinds that change which entries exist, or where: any
    /// open file a replayer keeps by path may name something else after it.
    pub fn moves_names(&self) -> bool {
        matches!(
            self,
            Change::Rename { .. } | Change::Unlink { .. } | Change::Rmdir { .. } | Change::Create { .. }
        )
    }

    /// True for the kinds that leave every name where it was, and every
    /// file open through it the same file.
    fn keeps_names(&self) -> bool {
        matches!(
            self,
            Change::Write { .. }
                | Change::Truncate { .. }
                | Change::Fallocate { .. }
                | Change::Fsync { .. }
                | Change::Chmod { .. }
                | Change::Chown { .. }
                | Change::Times { .. }
                | Change::SetXattr { .. }
                | Change::RemoveXattr { .. }
        )
    }

    /// True for a change of a file's data or times, or a barrier: a
    /// replayer applies it through the file it keeps open, with no walk of
    /// the path once the file is kept, and a run of them is one call (the
    /// shipper's `Run`). The others change names or metadata by path, each
    /// a round trip or more on a network mirror (`KeptModel`).
    pub fn is_data(&self) -> bool {
        matches!(
            self,
            Change::Write { .. }
                | Change::Truncate { .. }
                | Change::Fallocate { .. }
                | Change::Fsync { .. }
                | Change::Times { .. }
        )
    }

    /// The bytes of data it carries (for the lag in bytes).
    pub fn data_len(&self) -> usize {
        match self {
            Change::Write { data, .. } => data.len(),
            Change::SetXattr { value, .. } => value.len(),
            _ => 0,
        }
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        let path = |out: &mut Vec<u8>, p: &Path| bytes(out, p.as_os_str().as_bytes());
        let owner = |out: &mut Vec<u8>, o: &Owner| {
            out.extend_from_slice(&o.uid.to_le_bytes());
            out.extend_from_slice(&o.gid.to_le_bytes());
        };
        match self {
            Change::Write { path: p, offset, data } => {
                path(out, p);
                out.extend_from_slice(&offset.to_le_bytes());
                bytes(out, data);
            }
            Change::Truncate { path: p, size } => {
                path(out, p);
                out.extend_from_slice(&size.to_le_bytes());
            }
            Change::Create {
                path: p,
                mode,
                owner: o,
            }
            | Change::Mkdir {
                path: p,
                mode,
                owner: o,
            } => {
                path(out, p);
                out.extend_from_slice(&mode.to_le_bytes());
                owner(out, o);
            }
            Change::Mknod {
                path: p,
                mode,
                rdev,
                owner: o,
            } => {
                path(out, p);
                out.extend_from_slice(&mode.to_le_bytes());
                out.extend_from_slice(&rdev.to_le_bytes());
                owner(out, o);
            }
            Change::Symlink {
                target,
                path: p,
                owner: o,
            } => {
                bytes(out, target.as_bytes());
                path(out, p);
                owner(out, o);
            }
            Change::Link { old, new } => {
                path(out, old);
                path(out, new);
            }
            Change::Unlink { path: p } | Change::Rmdir { path: p } => path(out, p),
            Change::Rename { old, new, flags } => {
                path(out, old);
                path(out, new);
                out.extend_from_slice(&flags.to_le_bytes());
            }
            Change::Chmod { path: p, mode } => {
                path(out, p);
                out.extend_from_slice(&mode.to_le_bytes());
            }
            Change::Chown { path: p, uid, gid } => {
                path(out, p);
                out.extend_from_slice(&uid.to_le_bytes());
                out.extend_from_slice(&gid.to_le_bytes());
            }
            Change::Times { path: p, atime, mtime } => {
                path(out, p);
                time(out, *atime);
                time(out, *mtime);
            }
            Change::SetXattr {
                path: p,
                name,
                value,
                flags,
            } => {
                path(out, p);
                bytes(out, name.as_bytes());
                bytes(out, value);
                out.extend_from_slice(&flags.to_le_bytes());
            }
            Change::RemoveXattr { path: p, name } => {
                path(out, p);
                bytes(out, name.as_bytes());
            }
            Change::Fallocate {
                path: p,
                mode,
                offset,
                len,
            } => {
                path(out, p);
                out.extend_from_slice(&mode.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Change::Fsync { path: p, datasync } => {
                path(out, p);
                out.push(u8::from(*datasync));
            }
        }
    }

    fn decode_fields(kind: u8, f: &mut Fields<'_>) -> Option<Change> {
        let path = |f: &mut Fields<'_>| f.bytes().map(|b| PathBuf::from(OsStr::from_bytes(b)));
        let owner = |f: &mut Fields<'_>| {
            Some(Owner {
                uid: f.u32()?,
                gid: f.u32()?,
            })
        };
        Some(match kind {
            1 => Change::Write {
                path: path(f)?,
                offset: f.u64()?,
                data: f.bytes()?.to_vec(),
            },
            2 => Change::Truncate {
                path: path(f)?,
                size: f.u64()?,
            },
            3 => Change::Create {
                path: path(f)?,
                mode: f.u32()?,
                owner: owner(f)?,
            },
            4 => Change::Mkdir {
                path: path(f)?,
                mode: f.u32()?,
                owner: owner(f)?,
            },
            5 => Change::Mknod {
                path: path(f)?,
                mode: f.u32()?,
                rdev: f.u64()?,
                owner: owner(f)?,
            },
            6 => Change::Symlink {
                target: OsString::from_vec(f.bytes()?.to_vec()),
                path: path(f)?,
                owner: owner(f)?,
            },
            7 => Change::Link {
                old: path(f)?,
                new: path(f)?,
            },
            8 => Change::Unlink { path: path(f)? },
            9 => Change::Rmdir { path: path(f)? },
            10 => Change::Rename {
                old: path(f)?,
                new: path(f)?,
                flags: f.u32()?,
            },
            11 => Change::Chmod {
                path: path(f)?,
                mode: f.u32()?,
            },
            12 => Change::Chown {
                path: path(f)?,
                uid: f.u32()?,
                gid: f.u32()?,
            },
            13 => Change::Times {
                path: path(f)?,
                atime: f.time()?,
                mtime: f.time()?,
            },
            14 => Change::SetXattr {
                path: path(f)?,
                name: OsString::from_vec(f.bytes()?.to_vec()),
                value: f.bytes()?.to_vec(),
                flags: f.u32()? as i32,
            },
            15 => Change::RemoveXattr {
                path: path(f)?,
                name: OsString::from_vec(f.bytes()?.to_vec()),
            },
            16 => Change::Fallocate {
                path: path(f)?,
                mode: f.u32()? as i32,
                offset: f.u64()?,
                len: f.u64()?,
            },
            17 => Change::Fsync {
                path: path(f)?,
                datasync: f.u8()? != 0,
            },
            _ => return None,
        })
    }

    /// Applies the change to `v`. `again`: the record may already be on
    /// `v` (the first record replayed after a restart); a `Rename` or
    /// `Link` whose effect is there already is then not made twice.
    pub fn apply(&self, v: &Volume, again: bool) -> io::Result<()> {
        let mut files = KeptFiles::default();
        self.apply_with(v, again, &mut files)?;
        files.sync_owed()
    }

    /// `apply`, with the regular files that data records reach kept open
    /// in `files` from one record to the next (on a network mirror an open
    /// and a close are two round trips per write otherwise). A barrier
    /// (`Fsync`) and the data written are not synced here: they are owed
    /// in `files` until its `sync_owed`, so that a replayer can make many
    /// barriers durable in one round trip.
    pub fn apply_with(&self, v: &Volume, again: bool, files: &mut KeptFiles) -> io::Result<()> {
        if files.owed.len() >= OWED_FDS {
            // Synced early rather than hold more fds (a sync made sooner
            // than owed is never wrong).
            files.sync_owed()?;
        }
        if self.moves_names() || !self.keeps_names() {
            files.clear();
        }
        match self {
            Change::Write { path, offset, data } => volume::pwrite_all(files.get(v, path)?, data, *offset).map(drop),
            Change::Truncate { path, size } => volume::ftruncate(files.get(v, path)?, *size),
            Change::Create { path, mode, owner } => {
                match v.create(path, libc::O_WRONLY | libc::O_EXCL, *mode, *owner) {
                    Ok(_) => Ok(()),
                    // Replayed: it is made new and empty again, as the
                    // records after it expect.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        v.truncate(path, 0)?;
                        v.chown(path, owner.uid, owner.gid)?;
                        v.chmod(path, *mode & 0o7777)
                    }
                    Err(e) => Err(e),
                }
            }
            Change::Mkdir { path, mode, owner } => match v.mkdir(path, *mode, *owner) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => v.chmod(path, *mode & 0o7777),
                r => r,
            },
            Change::Mknod {
                path,
                mode,
                rdev,
                owner,
            } => match v.mknod(path, *mode, *rdev, *owner) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    v.unlink(path)?;
                    v.mknod(path, *mode, *rdev, *owner)
                }
                r => r,
            },
            Change::Symlink { target, path, owner } => match v.symlink(target, path, *owner) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    v.unlink(path)?;
                    v.symlink(target, path, *owner)
                }
                r => r,
            },
            Change::Link { old, new } => match v.link(old, new) {
                // Only this record can have made `new` (the primary had no
                // such name before it), so it is there already.
                Err(e) if again && e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                r => r,
            },
            Change::Unlink { path } => absent_ok(v.unlink(path)),
            Change::Rmdir { path } => absent_ok(v.rmdir(path)),
            Change::Rename { old, new, flags } => match v.rename(old, new, *flags) {
                // The source is gone: this record moved it (nothing after
                // it has been applied that could have made it again).
                Err(e) if again && e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                r => r,
            },
            // On a file kept open, through its fd: no walk of the path (a
            // round trip per name on a network mirror).
            Change::Chmod { path, mode } => match files.kept(path) {
                Some(fd) => volume::fchmod(fd, *mode),
                None => v.chmod(path, *mode),
            },
            Change::Chown { path, uid, gid } => match files.kept(path) {
                Some(fd) => volume::fchown(fd, *uid, *gid),
                None => v.chown(path, *uid, *gid),
            },
            Change::Times { path, atime, mtime } => match files.set_times(path, *atime, *mtime) {
                true => Ok(()),
                false => {
                    files.by_path += 1;
                    v.utimens(path, *atime, *mtime)
                }
            },
            Change::SetXattr {
                path,
                name,
                value,
                flags: _,
            } => {
                // XATTR_CREATE or XATTR_REPLACE held on the primary; here
                // the value is simply set, which replays safely.
                v.setxattr(path, name, value, 0)
            }
            Change::RemoveXattr { path, name } => match v.removexattr(path, name) {
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
                r => r,
            },
            Change::Fallocate {
                path,
                mode,
                offset,
                len,
            } => volume::fallocate(files.get(v, path)?, *mode, *offset, *len),
            // Owed, made by the replayer's next `KeptFiles::sync_owed`.
            Change::Fsync { path, datasync } => files.barrier(v, path, *datasync),
        }
    }
}

/// How many files a replayer keeps open.
const KEPT_FILES: usize = 16;

/// How many closed files a replayer holds open while they owe a sync.
const OWED_FDS: usize = 64;

/// How many syncs `KeptFiles::sync_owed` has in flight at once (on a
/// network mirror each is a round trip; in parallel they cost about one).
const SYNCS_IN_FLIGHT: usize = 8;

/// Regular files kept open by a replayer between records, by path, and
/// the syncs the records applied so far owe. Any record that may move or
/// replace a name closes the kept files (`Change::apply_with`); one that
/// owes a sync is held by its fd until `sync_owed`, since an fd syncs its
/// file wherever its name has gone.
#[derive(Default)]
pub struct KeptFiles {
    files: VecDeque<Kept>,
    /// Files closed by name, and barriers' directories, that owe a sync
    /// (`true`: fdatasync is enough).
    owed: Vec<(OwnedFd, bool)>,
    /// Calls made by path for data records (an open, or times set by
    /// path) since it was made: each a round trip or more on a network
    /// mirror, where a call through a kept file is streamed (`trips`).
    by_path: u64,
    /// Times that could not be set, with their paths (`failed_times`).
    failed: Vec<FailedTime>,
}

struct Kept {
    path: PathBuf,
    fd: OwnedFd,
    /// The sync the data written through it since `sync_owed` owes.
    owes: Option<bool>,
    /// Times set since `sync_owed`, not yet made (`Change::apply_with`).
    times: Option<(SetTime, SetTime)>,
}

/// The stronger of two owed syncs (`false`, a full fsync, wins).
fn stronger(owes: Option<bool>, datasync: bool) -> Option<bool> {
    Some(owes.unwrap_or(true) && datasync)
}

impl KeptFiles {
    /// How many calls by path data records have made (see `by_path`):
    /// the kinds of call `KeptModel` foresees.
    pub fn trips(&self) -> u64 {
        self.by_path
    }

    fn kept(&self, path: &Path) -> Option<BorrowedFd<'_>> {
        self.files.iter().find(|k| k.path == path).map(|k| k.fd.as_fd())
    }

    /// The kept file at `path`, opened for writing if it is not kept yet,
    /// for a record that writes its data: it owes a sync from now on.
    fn get(&mut self, v: &Volume, path: &Path) -> io::Result<BorrowedFd<'_>> {
        let i = match self.files.iter().position(|k| k.path == path) {
            Some(i) => i,
            None => {
                self.by_path += 1;
                let fd = v.open_file(path, libc::O_WRONLY)?;
                if self.files.len() >= KEPT_FILES
                    && let Some(k) = self.files.pop_front()
                {
                    self.release(k);
                }
                self.files.push_back(Kept {
                    path: path.to_path_buf(),
                    fd,
                    owes: None,
                    times: None,
                });
                self.files.len() - 1
            }
        };
        let k = &mut self.files[i];
        k.owes = stronger(k.owes, true);
        Ok(k.fd.as_fd())
    }

    /// A barrier at `path`: the file (or directory) owes a sync, made by
    /// the next `sync_owed`. One that is gone owes nothing.
    fn barrier(&mut self, v: &Volume, path: &Path, datasync: bool) -> io::Result<()> {
        if let Some(k) = self.files.iter_mut().find(|k| k.path == path) {
            k.owes = stronger(k.owes, datasync);
            return Ok(());
        }
        self.by_path += 1;
        match v.open_file(path, libc::O_RDONLY | libc::O_NONBLOCK) {
            Ok(fd) => {
                self.owed.push((fd, datasync));
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Times set on a kept file wait for `sync_owed`: on a network mirror a
    /// futimens is two round trips, and a database's log has its times set
    /// after each write (by the writeback cache), so that setting each one
    /// made a call cost as much as a run of writes. Only the file's own
    /// data changes lie between the times and the moment they are made,
    /// and those set the mirror's times to its own clock anyway: the
    /// primary's times are the mirror's where a `Times` record is the last
    /// of the file's, at every group's end, as when each was made at once.
    /// A record that reaches the file some other way (by path) finds them
    /// made, since the file is released first.
    fn set_times(&mut self, path: &Path, atime: SetTime, mtime: SetTime) -> bool {
        let Some(k) = self.files.iter_mut().find(|k| k.path == path) else {
            return false;
        };
        k.times = Some(SetTime::over(k.times, atime, mtime));
        true
    }

    /// Closes a kept file: its times are made now (whatever reaches the
    /// file next does so by path, after them); its sync stays owed.
    fn release(&mut self, k: Kept) {
        if let Some((atime, mtime)) = k.times
            && let Err(e) = volume::futimens(k.fd.as_fd(), atime, mtime)
        {
            self.failed.push((k.path.clone(), e));
        }
        if let Some(datasync) = k.owes {
            self.owed.push((k.fd, datasync));
        }
    }

    /// Closes the kept files; those that owe a sync still owe it.
    pub fn clear(&mut self) {
        while let Some(k) = self.files.pop_front() {
            self.release(k);
        }
    }

    /// The times of kept files that could not be set since the last call,
    /// with their paths: they fail no record and no sync (they are made
    /// later than their record), and are the replayer's to report.
    pub fn failed_times(&mut self) -> Vec<FailedTime> {
        std::mem::take(&mut self.failed)
    }

    /// Closes every file and forgets what is owed (the volume is gone or
    /// replaced; the caller starts again from what was last made durable).
    pub fn forget(&mut self) {
        self.files.clear();
        self.owed.clear();
        self.failed.clear();
    }

    /// Makes every owed sync, and the kept files' times before their
    /// syncs, several files at a time; on success nothing is owed any more.
    pub fn sync_owed(&mut self) -> io::Result<()> {
        let fds: Vec<Owed<'_>> = self
            .owed
            .iter()
            .map(|(fd, d)| Owed {
                fd: fd.as_fd(),
                sync: Some(*d),
                times: None,
            })
            .chain(
                self.files
                    .iter()
                    .filter(|k| k.owes.is_some() || k.times.is_some())
                    .map(|k| Owed {
                        fd: k.fd.as_fd(),
                        sync: k.owes,
                        times: k.times.map(|(atime, mtime)| (k.path.as_path(), atime, mtime)),
                    }),
            )
            .collect();
        let mut failed = Vec::new();
        let synced = fds
            .chunks(SYNCS_IN_FLIGHT)
            .try_for_each(|chunk| sync_all(chunk, &mut failed));
        drop(fds);
        self.failed.append(&mut failed);
        synced?;
        self.owed.clear();
        for k in &mut self.files {
            k.owes = None;
            k.times = None;
        }
        Ok(())
    }
}

/// The paths a replayer's `KeptFiles` keeps open, followed record by
/// record as the log appends them, to tell which records will cost the
/// replayer a round trip or more on a network mirror (`trip`): the ones
/// that are not data, and the data ones that reach a file by its path.
/// The rest are streamed through a kept file, many to a call. It follows
/// `apply_with` exactly, except where a replayer starts again (then its
/// files are forgotten, and the model counts too few trips until they
/// are kept again).
#[derive(Default)]
struct KeptModel {
    paths: VecDeque<PathBuf>,
}

impl KeptModel {
    /// True if `c`, applied after the records seen so far, makes a call by
    /// path: a record that is not data (`Change::is_data`), a write, size
    /// or allocation change to a file not kept (opened and kept), a
    /// barrier or times on one (opened or set by path).
    fn trip(&mut self, c: &Change) -> bool {
        if c.moves_names() || !c.keeps_names() {
            self.paths.clear();
        }
        let kept = |paths: &VecDeque<PathBuf>, path: &Path| paths.iter().any(|p| p == path);
        match c {
            Change::Write { path, .. } | Change::Truncate { path, .. } | Change::Fallocate { path, .. } => {
                if kept(&self.paths, path) {
                    return false;
                }
                if self.paths.len() >= KEPT_FILES {
                    self.paths.pop_front();
                }
                self.paths.push_back(path.clone());
                true
            }
            Change::Fsync { path, .. } | Change::Times { path, .. } => !kept(&self.paths, path),
            _ => true,
        }
    }
}

/// A file that owes something at a group's end: its sync (`true`:
/// fdatasync is enough), and times to set before it, with the path they
/// are reported under if they cannot be set.
#[derive(Clone, Copy)]
struct Owed<'a> {
    fd: BorrowedFd<'a>,
    sync: Option<bool>,
    times: Option<(&'a Path, SetTime, SetTime)>,
}

/// A time that could not be set: its path and the error.
type FailedTime = (PathBuf, io::Error);

/// Sets `o`'s owed times, then syncs it if it owes a sync. Times that
/// cannot be set do not fail the sync: they are returned beside it.
fn settle(o: Owed<'_>) -> (io::Result<()>, Option<FailedTime>) {
    let times = o.times.and_then(|(path, atime, mtime)| {
        volume::futimens(o.fd, atime, mtime)
            .err()
            .map(|e| (path.to_path_buf(), e))
    });
    let sync = match o.sync {
        Some(datasync) => volume::fsync(o.fd, datasync),
        None => Ok(()),
    };
    (sync, times)
}

/// Settles `fds` at once, one thread each beyond the first; the times
/// that could not be set go to `failed`.
fn sync_all(fds: &[Owed<'_>], failed: &mut Vec<FailedTime>) -> io::Result<()> {
    let Some((first, rest)) = fds.split_first() else {
        return Ok(());
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = rest.iter().map(|&o| scope.spawn(move || settle(o))).collect();
        let panicked = || (Err(io::Error::other("a sync thread panicked")), None);
        // Every thread is heard, for its failed times, whatever came first.
        let mut r = Ok(());
        for (sync, time) in
            std::iter::once(settle(*first)).chain(others.into_iter().map(|t| t.join().unwrap_or_else(|_| panicked())))
        {
            failed.extend(time);
            r = r.and(sync);
        }
        r
    })
}

/// A name already gone is what the change wanted.
fn absent_ok(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn time(out: &mut Vec<u8>, t: SetTime) {
    match t {
        SetTime::Omit => out.push(0),
        SetTime::At { secs, nanos } => {
            out.push(1);
            out.extend_from_slice(&secs.to_le_bytes());
            out.extend_from_slice(&nanos.to_le_bytes());
        }
    }
}

/// A cursor over a record's fields; every read is checked against the end.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Some(a)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn time(&mut self) -> Option<SetTime> {
        match self.u8()? {
            0 => Some(SetTime::Omit),
            1 => Some(SetTime::At {
                secs: self.u64()? as i64,
                nanos: self.u64()? as i64,
            }),
            _ => None,
        }
    }
}

/// One record as stored: its number, when it was appended, and the change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub time_ns: u64,
    pub change: Change,
}

impl Record {
    /// The record's bytes, frame included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FRAME + 64 + self.change.data_len());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.time_ns.to_le_bytes());
        out.push(self.change.kind());
        self.change.encode_fields(&mut out);
        let sum = xxh3_64(&out[4..]);
        out.extend_from_slice(&sum.to_le_bytes());
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_le_bytes());
        out
    }

    /// Decodes the body of a record (what follows its length); None if it
    /// is torn or corrupt.
    fn decode(body: &[u8]) -> Option<Record> {
        if body.len() < FRAME - 4 {
            return None;
        }
        let (fields, sum) = body.split_at(body.len() - 8);
        if xxh3_64(fields).to_le_bytes() != sum {
            return None;
        }
        let mut f = Fields { rest: fields };
        let seq = f.u64()?;
        let time_ns = f.u64()?;
        let kind = f.u8()?;
        let change = Change::decode_fields(kind, &mut f)?;
        if !f.rest.is_empty() {
            return None;
        }
        Some(Record { seq, time_ns, change })
    }
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

/// The first sequence numbers of the segments in `dir`, in order.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut firsts = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        if stem.len() == 20
            && let Ok(first) = stem.parse::<u64>()
        {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Reads the records of one segment file, up to the first torn one.
/// Returns them, the length of the good prefix, and whether everything
/// after it is zero (a preallocated tail, nothing torn).
fn read_segment(path: &Path) -> io::Result<(Vec<Record>, u64, bool)> {
    let mut buf = Vec::new();
    File::open(path)?.read_to_end(&mut buf)?;
    let mut records = Vec::new();
    let mut at = 0usize;
    while let Some((r, n)) = next_record(&buf[at..]) {
        records.push(r);
        at += n;
    }
    let clean = buf[at..].iter().all(|&b| b == 0);
    Ok((records, at as u64, clean))
}

/// Fills a new segment with zeros up to `SEGMENT` and makes that durable,
/// so that appending to it overwrites blocks the filesystem already has:
/// its `fdatasync` then flushes data alone, where an append that grows
/// the file also commits the filesystem's journal (measured on ext4 under
/// pgbench: 0.9 ms a log flush, against 0.45 ms for PostgreSQL's own
/// flush of its preallocated WAL). Not on tmpfs (no flush to save, and
/// the zeros would take memory), nor where the disk has less than
/// `ROOM_TO_PREALLOCATE` free (filling the last of a disk with zeros, even
/// for a moment, could refuse the primary's own writes); given up (the
/// segment left empty, to be appended to) if the zeros do not fit.
fn preallocate(f: &File, dir: &Path) -> u64 {
    if volume::is_tmpfs(dir) {
        return 0;
    }
    let free = nix::sys::statvfs::fstatvfs(f).map_or(0, |s| s.blocks_available().saturating_mul(s.fragment_size()));
    if free < ROOM_TO_PREALLOCATE {
        log::info!("side=primary the change log's segment is not preallocated: {free} bytes free");
        return 0;
    }
    let zeros = vec![0u8; 1 << 20];
    let filled = (|| {
        let mut at = 0;
        while at < SEGMENT {
            f.write_all_at(&zeros, at)?;
            at += zeros.len() as u64;
        }
        f.sync_all()
    })();
    match filled {
        Ok(()) => SEGMENT,
        Err(e) => {
            log::info!("side=primary the change log's segment is not preallocated: {e}");
            let _ = f.set_len(0);
            0
        }
    }
}

/// The record at the start of `buf` and its length, if it is whole.
fn next_record(buf: &[u8]) -> Option<(Record, usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let body = buf.get(4..4 + len)?;
    Record::decode(body).map(|r| (r, 4 + len))
}

/// What the appender and the time index share under one lock.
struct Tail {
    file: Arc<File>,
    /// First record of the current segment, and the segment's length.
    segment: u64,
    length: u64,
    /// Bytes of the current segment written with zeros and synced when it
    /// was made: appends there change no metadata (see `write_out`).
    prealloc: u64,
    /// The last record appended, and the last one known durable.
    last: u64,
    synced: u64,
    /// A caller is in `fdatasync` for everyone.
    syncing: bool,
    /// Bytes appended since the log was opened, and the bytes appended up
    /// to each entry of `times`.
    bytes: u64,
    /// Records appended since the log was opened that will cost the
    /// replayer a call by path (`KeptModel`), and the model.
    trips: u64,
    kept: KeptModel,
    /// One entry per `TICK_NS` of appends, for the age, size and kinds of
    /// what is not yet applied.
    times: VecDeque<Tick>,
    /// The last record the mirror has, as told by `applied`.
    applied: u64,
    /// Readers waiting in `wait_after` (an append wakes them only if
    /// there are some: a wake is a syscall even with no one to wake).
    waiters: usize,
    /// Callers of `sync` waiting for the one in `fdatasync`.
    sync_waiters: usize,
}

/// An entry of the log's time index: its first record, that record's
/// time, and the bytes and the trips (`Tail::trips`) appended before it.
#[derive(Clone, Copy)]
struct Tick {
    first: u64,
    at: u64,
    bytes: u64,
    trips: u64,
}

/// How far the mirror is behind.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Lag {
    pub seconds: f64,
    pub bytes: u64,
    pub ops: u64,
    /// Of `ops`, those that will cost the shipper a call by path, a round
    /// trip or more on a network mirror (`KeptModel`), counted from the
    /// start of the tick the first of them is in; a backlog found when the
    /// log is opened counts as streamed.
    pub trips: u64,
}

/// The change log of a primary.
pub struct Log {
    dir: PathBuf,
    /// Chosen at random when the log is made: a position on the mirror
    /// counts in one log only.
    id: u64,
    /// The device of the log's filesystem, and whether a file's flush on
    /// it flushes the whole device (`write_out`).
    device: u64,
    shares_flush: bool,
    tail: Mutex<Tail>,
    /// The current segment's first record (`Tail::segment`), for readers:
    /// one at the end of this segment knows no next one has started.
    current: Arc<AtomicU64>,
    /// The first segment held, as far as `drop_through` knows.
    oldest: AtomicU64,
    /// Whether the next segment is made yet (`SPARE_*`).
    spare: Arc<AtomicU8>,
    synced: Condvar,
    /// Notified on each append, for a reader waiting at the end.
    appended: Condvar,
}

impl Log {
    /// Opens the log in `dir` (made if missing). A torn record at the end
    /// of the last segment is cut off; appends go on after the last whole
    /// record. `applied`: the last record the mirror is known to have; one
    /// before the log's first (`first_held`) counts as that record's
    /// predecessor (the caller checks whether the mirror lacks any).
    pub fn open(dir: &Path, applied: u64) -> io::Result<Log> {
        std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700).create(dir)?;
        let firsts = segments(dir)?;
        let applied = applied.max(firsts.first().map_or(0, |f| f.saturating_sub(1)));
        let (segment, last, length) = match firsts.last() {
            Some(&first) => {
                let path = dir.join(segment_name(first));
                let (records, good, clean) = read_segment(&path)?;
                if !clean {
                    // A torn record (or records a crash wrote out of order
                    // after it): cut off, so that nothing after the last
                    // whole record can be read as one.
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.set_len(good)?;
                    f.sync_all()?;
                }
                let last = records.last().map_or(first.saturating_sub(1), |r| r.seq);
                (first, last, good)
            }
            None => (applied + 1, applied, 0),
        };
        // A spare left by an earlier mount may be half made.
        let _ = fs::remove_file(dir.join(SPARE));
        let (file, prealloc) = Self::open_segment(dir, segment)?;
        let id = Self::identity(dir)?;
        let device = fs::metadata(dir)?.dev();
        let shares_flush = volume::flushes_whole_device(dir);
        // What the mirror lacks from before: its age (the first record's
        // time) and size (from that record to the end).
        let mut times = VecDeque::new();
        let mut bytes = 0;
        if last > applied {
            let mut r = Reader::new(dir, applied, None);
            if let Some(first) = r.read_next()? {
                let sizes: u64 = segments(dir)?
                    .into_iter()
                    .filter(|f| *f >= r.segment)
                    .map(|f| match f == segment {
                        true => length,
                        false => fs::metadata(dir.join(segment_name(f))).map_or(0, |m| m.len()),
                    })
                    .sum();
                bytes = sizes.saturating_sub(r.started);
                times.push_back(Tick {
                    first: first.seq,
                    at: first.time_ns,
                    bytes: 0,
                    trips: 0,
                });
            }
        }
        let oldest = firsts.first().copied().unwrap_or(segment);
        Ok(Log {
            dir: dir.to_path_buf(),
            id,
            current: Arc::new(AtomicU64::new(segment)),
            oldest: AtomicU64::new(oldest),
            spare: Arc::new(AtomicU8::new(SPARE_NONE)),
            device,
            shares_flush,
            tail: Mutex::new(Tail {
                file: Arc::new(file),
                segment,
                length,
                prealloc,
                last,
                synced: last,
                syncing: false,
                bytes,
                trips: 0,
                kept: KeptModel::default(),
                times,
                applied: applied.min(last),
                waiters: 0,
                sync_waiters: 0,
            }),
            synced: Condvar::new(),
            appended: Condvar::new(),
        })
    }

    /// The first record the log still holds (the one after its last if it
    /// holds none): those before it were applied to the mirror and dropped.
    pub fn first_held(&self) -> io::Result<u64> {
        Ok(match segments(&self.dir)?.first() {
            Some(&f) => f,
            None => self.last() + 1,
        })
    }

    /// The log's identity, made (durably) the first time.
    fn identity(dir: &Path) -> io::Result<u64> {
        let path = dir.join(ID);
        match fs::read_to_string(&path) {
            Ok(s) => u64::from_str_radix(s.trim(), 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a log id", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut b = [0u8; 8];
                File::open("/dev/urandom")?.read_exact(&mut b)?;
                let id = u64::from_le_bytes(b).max(1);
                crate::meta::write_durably_mode(&path, format!("{id:016x}\n").as_bytes(), 0o600)?;
                Ok(id)
            }
            Err(e) => Err(e),
        }
    }

    /// The log's identity.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Opens segment `first` for appending (at the writer's own offset),
    /// made if missing; returns it and how much of it is preallocated (a
    /// new one is; an old one's zeros past its records were written and
    /// synced when it was made, or are synced now).
    fn open_segment(dir: &Path, first: u64) -> io::Result<(File, u64)> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(dir.join(segment_name(first)))?;
        let prealloc = match f.metadata()?.len() {
            0 => preallocate(&f, dir),
            len => {
                f.sync_all()?;
                len
            }
        };
        // A new segment must survive a crash: its directory entry too.
        File::open(dir)?.sync_all()?;
        Ok((f, prealloc))
    }

    fn lock(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `change` (not yet durable: see `sync`) and returns its
    /// sequence number. The caller holds whatever orders its change on the
    /// primary against others, so that the log's order is the primary's.
    pub fn append(&self, change: Change) -> io::Result<u64> {
        let mut t = self.lock();
        if t.length >= SEGMENT {
            // The old segment is made durable first, so that `sync` only
            // ever has the current one to sync.
            t.file.sync_data()?;
            t.synced = t.last;
            let first = t.last + 1;
            // The spare, made ahead, becomes the segment; else it is made
            // here, appends held meanwhile. (One still being made is left
            // to its thread, and serves the segment after.)
            match self.spare.load(Ordering::Acquire) {
                SPARE_READY => {
                    fs::rename(self.dir.join(SPARE), self.dir.join(segment_name(first)))?;
                    self.spare.store(SPARE_NONE, Ordering::Release);
                }
                SPARE_FAILED => self.spare.store(SPARE_NONE, Ordering::Release),
                _ => {}
            }
            let (file, prealloc) = Self::open_segment(&self.dir, first)?;
            t.file = Arc::new(file);
            t.prealloc = prealloc;
            t.segment = first;
            self.current.store(first, Ordering::Release);
            t.length = 0;
        }
        let record = Record {
            seq: t.last + 1,
            time_ns: now_ns(),
            change,
        };
        let buf = record.encode();
        t.file.write_all_at(&buf, t.length)?;
        t.last = record.seq;
        t.length += buf.len() as u64;
        let tick = Tick {
            first: record.seq,
            at: record.time_ns,
            bytes: t.bytes,
            trips: t.trips,
        };
        t.bytes += buf.len() as u64;
        let trip = t.kept.trip(&record.change);
        t.trips += u64::from(trip);
        match t.times.back() {
            Some(last) if record.time_ns < last.at + TICK_NS => {}
            _ => t.times.push_back(tick),
        }
        let waiters = t.waiters;
        let half_full = t.prealloc > 0 && t.length > SEGMENT / 2;
        drop(t);
        if waiters > 0 {
            self.appended.notify_all();
        }
        if half_full {
            self.prepare_spare();
        }
        Ok(record.seq)
    }

    /// Returns once every record up to `seq` is durable. Concurrent
    /// callers share one `fdatasync` (group commit).
    pub fn sync(&self, seq: u64) -> io::Result<()> {
        let mut t = self.lock();
        while seq > t.synced {
            if t.syncing {
                t.sync_waiters += 1;
                t = self.synced.wait(t).unwrap_or_else(|e| e.into_inner());
                t.sync_waiters -= 1;
                continue;
            }
            t.syncing = true;
            let upto = t.last;
            let f = t.file.clone();
            drop(t);
            // Earlier segments were synced before the one after them was
            // started: only the current one can hold records not durable.
            let r = f.sync_data();
            t = self.lock();
            t.syncing = false;
            if r.is_ok() {
                t.synced = t.synced.max(upto);
            }
            if t.sync_waiters > 0 {
                self.synced.notify_all();
            }
            r?;
        }
        Ok(())
    }

    /// Starts making the next segment, preallocated, on a thread of its
    /// own (once per segment), so that starting a segment does not hold
    /// appends while 64 MiB of zeros are written and synced (0.18 s here).
    fn prepare_spare(&self) {
        if self
            .spare
            .compare_exchange(SPARE_NONE, SPARE_MAKING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let (dir, state) = (self.dir.clone(), self.spare.clone());
        let make = move || {
            let ready = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(dir.join(SPARE))
                .is_ok_and(|f| preallocate(&f, &dir) > 0);
            state.store(if ready { SPARE_READY } else { SPARE_FAILED }, Ordering::Release);
        };
        if std::thread::Builder::new()
            .name("log-spare".into())
            .spawn(make)
            .is_err()
        {
            self.spare.store(SPARE_FAILED, Ordering::Release);
        }
    }

    /// Makes the log's part of an fsync of `beside` cost no flush of its
    /// own, where that is safe: writes every record up to `seq` out to the
    /// disk (`sync_file_range`, waited for) and returns the last record
    /// written, which is durable once the caller has flushed `beside` and
    /// told `flushed`. Safe when the records overwrite the preallocated
    /// zeros (no metadata to commit: the data on the disk is all there is)
    /// and `beside` is a regular file of the log's own filesystem, one
    /// whose fsync ends with a flush of the whole device's cache (ext4,
    /// `volume::flushes_whole_device`). None otherwise: the caller
    /// syncs the log itself. Measured (raw, ext4 on this machine): a 4 KiB
    /// write and its flush 0.18 ms, with a log record and a second flush
    /// 0.35 ms, with the record written out this way 0.23 ms.
    pub fn write_out(&self, seq: u64, beside: BorrowedFd<'_>) -> io::Result<Option<u64>> {
        if !self.shares_flush {
            return Ok(None);
        }
        let st = volume::fstat(beside)?;
        if st.st_dev != self.device || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(None);
        }
        let t = self.lock();
        if seq <= t.synced {
            return Ok(Some(t.synced));
        }
        if t.length > t.prealloc {
            return Ok(None);
        }
        let (upto, file) = (t.last, t.file.clone());
        drop(t);
        // The log's pages and the file's go to the disk together; the
        // file's flush must come after the log's have landed.
        volume::write_out(file.as_fd(), false)?;
        // Only started: its errors are the caller's fsync's to report,
        // through the engine (a wait here would take them from it).
        let _ = volume::write_out(beside, false);
        volume::write_out(file.as_fd(), true)?;
        Ok(Some(upto))
    }

    /// Notes that every record up to `seq`, written out by `write_out`, was
    /// made durable by the flush that followed it.
    pub fn flushed(&self, seq: u64) {
        let mut t = self.lock();
        t.synced = t.synced.max(seq);
    }

    /// The last record appended.
    pub fn last(&self) -> u64 {
        self.lock().last
    }

    /// Waits at most `timeout` for a record after `seq` to be appended;
    /// returns the last record appended.
    pub fn wait_after(&self, seq: u64, timeout: Duration) -> u64 {
        let mut t = self.lock();
        if t.last > seq {
            return t.last;
        }
        t.waiters += 1;
        let mut t = self
            .appended
            .wait_timeout(t, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        t.waiters -= 1;
        t.last
    }

    /// Notes that the mirror has every record up to `seq`, for the lag.
    pub fn applied(&self, seq: u64) {
        let mut t = self.lock();
        t.applied = t.applied.max(seq);
        while t.times.len() > 1 && t.times[1].first <= t.applied + 1 {
            t.times.pop_front();
        }
        if t.applied >= t.last {
            t.times.clear();
        }
    }

    /// How far the mirror is behind, now.
    pub fn lag(&self) -> Lag {
        let t = self.lock();
        let ops = t.last.saturating_sub(t.applied);
        match t.times.front() {
            Some(tick) if ops > 0 => Lag {
                seconds: now_ns().saturating_sub(tick.at) as f64 / 1e9,
                bytes: t.bytes.saturating_sub(tick.bytes),
                ops,
                trips: t.trips.saturating_sub(tick.trips).min(ops),
            },
            _ => Lag::default(),
        }
    }

    /// Removes the segments whose every record is at or before `seq`
    /// (applied durably on the mirror). The current segment stays.
    pub fn drop_through(&self, seq: u64) -> io::Result<()> {
        let current = self.current.load(Ordering::Acquire);
        if self.oldest.load(Ordering::Acquire) >= current {
            // One segment, the current one: nothing to list.
            return Ok(());
        }
        let firsts = segments(&self.dir)?;
        let mut oldest = current;
        for pair in firsts.windows(2) {
            let (first, next) = (pair[0], pair[1]);
            if next <= seq + 1 && first < current {
                fs::remove_file(self.dir.join(segment_name(first)))?;
            } else {
                oldest = oldest.min(first);
            }
        }
        self.oldest.store(oldest, Ordering::Release);
        Ok(())
    }

    /// A reader of the records after `seq`.
    pub fn reader(&self, seq: u64) -> Reader {
        Reader::new(&self.dir, seq, Some(self.current.clone()))
    }
}

/// Reads records in order from a given point, across segments, as they
/// are appended. Reading never blocks: at the end it returns None.
pub struct Reader {
    dir: PathBuf,
    /// The last record returned (or the point to start after).
    after: u64,
    /// The segment being read (its first record), from `offset`.
    file: Option<File>,
    segment: u64,
    offset: u64,
    /// Where the record after the starting point begins in `segment`.
    started: u64,
    /// Bytes of `segment` read ahead, from `chunk_at`.
    chunk: Vec<u8>,
    chunk_at: u64,
    /// The log's current segment (`Log::current`); None: unknown, look
    /// for a next segment at every end.
    current: Option<Arc<AtomicU64>>,
}

/// How much a reader reads at once.
const CHUNK: usize = 64 << 10;

impl Reader {
    fn new(dir: &Path, after: u64, current: Option<Arc<AtomicU64>>) -> Reader {
        Reader {
            dir: dir.to_path_buf(),
            after,
            file: None,
            segment: 0,
            offset: 0,
            started: 0,
            chunk: Vec::new(),
            chunk_at: 0,
            current,
        }
    }

    /// The `n` bytes of the segment at `offset`, from the chunk read ahead
    /// (read again if it does not hold them); None if the segment does not
    /// have them yet.
    fn bytes_at(&mut self, offset: u64, n: usize) -> io::Result<Option<&[u8]>> {
        let held = offset >= self.chunk_at && offset + n as u64 <= self.chunk_at + self.chunk.len() as u64;
        if !held {
            let Some(f) = &self.file else {
                return Ok(None);
            };
            self.chunk.resize(CHUNK.max(n), 0);
            let mut got = 0;
            while got < self.chunk.len() {
                match f.read_at(&mut self.chunk[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.chunk.truncate(got);
            self.chunk_at = offset;
            if got < n {
                return Ok(None);
            }
        }
        let at = (offset - self.chunk_at) as usize;
        Ok(Some(&self.chunk[at..at + n]))
    }

    /// The last record returned.
    pub fn position(&self) -> u64 {
        self.after
    }

    /// Finds the segment holding record `after + 1`, or the last one
    /// before it, and the offset of that record in it (or its end).
    fn seek(&mut self) -> io::Result<()> {
        let want = self.after + 1;
        let firsts = segments(&self.dir)?;
        let Some(&first) = firsts.iter().rev().find(|&&f| f <= want) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the change log no longer holds record {want}"),
            ));
        };
        let f = File::open(self.dir.join(segment_name(first)))?;
        let mut offset = 0u64;
        let mut head = [0u8; 12];
        loop {
            // Skips records before `want` by their length and number alone.
            match f.read_exact_at(&mut head, offset) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64;
            let seq = u64::from_le_bytes(head[4..12].try_into().unwrap_or_default());
            // A zero length: the preallocated end of what was appended.
            if len == 0 || seq >= want {
                break;
            }
            offset += 4 + len;
        }
        self.file = Some(f);
        self.segment = first;
        self.offset = offset;
        self.started = offset;
        self.chunk.clear();
        self.chunk_at = 0;
        Ok(())
    }

    /// The next record, or None at the current end of the log.
    pub fn read_next(&mut self) -> io::Result<Option<Record>> {
        if self.file.is_none() {
            self.seek()?;
        }
        loop {
            if self.file.is_none() {
                return Ok(None);
            }
            let offset = self.offset;
            let len = self
                .bytes_at(offset, 4)?
                .map(|l| u32::from_le_bytes(l.try_into().unwrap_or_default()));
            if len == Some(0) {
                // The preallocated end of what was appended: read again
                // from the file next time.
                self.chunk.clear();
            }
            let Some(n) = len.filter(|&n| n > 0) else {
                // At the end of this segment: go on in the next one if it
                // has been started (never while this one is the log's
                // current segment).
                let next = self.after + 1;
                let current = self.current.as_ref().map(|c| c.load(Ordering::Acquire));
                if current != Some(self.segment) && self.dir.join(segment_name(next)).exists() {
                    self.file = None;
                    self.seek()?;
                    continue;
                }
                return Ok(None);
            };
            let n = n as usize;
            // Being appended: read it next time, from the file again.
            let Some(body) = self.bytes_at(offset + 4, n)? else {
                return Ok(None);
            };
            let Some(r) = Record::decode(body) else {
                self.chunk.clear();
                return Ok(None);
            };
            if r.seq != self.after + 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the change log has record {} where {} belongs", r.seq, self.after + 1),
                ));
            }
            self.offset += 4 + n as u64;
            self.after = r.seq;
            return Ok(Some(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    /// A write of one byte at the start of `path`.
    fn write_x(path: &str) -> Change {
        Change::Write {
            path: p(path),
            offset: 0,
            data: b"x".to_vec(),
        }
    }

    /// Times that set `path`'s mtime to `secs` and leave its atime.
    fn mtime_at(path: &str, secs: i64) -> Change {
        Change::Times {
            path: p(path),
            atime: SetTime::Omit,
            mtime: SetTime::At { secs, nanos: 0 },
        }
    }

    /// This process's owner, as a record names it.
    fn me() -> Owner {
        // SAFETY: geteuid and getegid have no failure mode.
        Owner {
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
        }
    }

    fn every_kind() -> Vec<Change> {
        let o = Owner { uid: 7, gid: 8 };
        vec![
            Change::Write {
                path: p("d/f"),
                offset: 4096,
                data: b"hello\n\\".to_vec(),
            },
            Change::Truncate {
                path: p("d/f"),
                size: 3,
            },
            Change::Create {
                path: p("d/new"),
                mode: 0o100644,
                owner: o,
            },
            Change::Mkdir {
                path: p("d/e"),
                mode: 0o2755,
                owner: o,
            },
            Change::Mknod {
                path: p("d/fifo"),
                mode: libc::S_IFIFO | 0o600,
                rdev: 0,
                owner: o,
            },
            Change::Symlink {
                target: OsString::from("../x y"),
                path: p("d/l"),
                owner: o,
            },
            Change::Link {
                old: p("d/f"),
                new: p("d/g"),
            },
            Change::Unlink { path: p("d/g") },
            Change::Rmdir { path: p("d/e") },
            Change::Rename {
                old: p("d/new"),
                new: p("d/renamed"),
                flags: 0,
            },
            Change::Chmod {
                path: p("d/f"),
                mode: 0o600,
            },
            Change::Chown {
                path: p("d/f"),
                uid: u32::MAX,
                gid: 8,
            },
            Change::Times {
                path: p("d/f"),
                atime: SetTime::Omit,
                mtime: SetTime::At {
                    secs: 1_700_000_000,
                    nanos: 5,
                },
            },
            Change::SetXattr {
                path: p("d/f"),
                name: OsString::from("user.k"),
                value: vec![0, 1, 2],
                flags: libc::XATTR_CREATE,
            },
            Change::RemoveXattr {
                path: p("d/f"),
                name: OsString::from("user.k"),
            },
            Change::Fallocate {
                path: p("d/f"),
                mode: 0,
                offset: 0,
                len: 8192,
            },
            Change::Fsync {
                path: p("d/f"),
                datasync: true,
            },
        ]
    }

    #[test]
    fn every_kind_round_trips_and_a_flipped_byte_is_refused() {
        for (i, c) in every_kind().into_iter().enumerate() {
            let r = Record {
                seq: i as u64 + 1,
                time_ns: 42,
                change: c,
            };
            let buf = r.encode();
            let (back, n) = next_record(&buf).expect("whole record");
            assert_eq!(n, buf.len());
            assert_eq!(back, r);
            for at in [4, buf.len() / 2, buf.len() - 1] {
                let mut bad = buf.clone();
                bad[at] ^= 0x40;
                assert!(next_record(&bad).is_none(), "corrupt byte {at} of {r:?} accepted");
            }
            assert!(next_record(&buf[..buf.len() - 1]).is_none());
        }
    }

    #[test]
    fn appends_are_read_back_in_order_across_segments_and_after_reopening() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join(DIR);
        let log = Log::open(&dir, 0).unwrap();
        let big = vec![7u8; 1 << 20];
        // 70 MiB: more than one segment.
        for i in 0..70u64 {
            let seq = log
                .append(Change::Write {
                    path: p("f"),
                    offset: i << 20,
                    data: big.clone(),
                })
                .unwrap();
            assert_eq!(seq, i + 1);
        }
        log.sync(70).unwrap();
        assert!(segments(&dir).unwrap().len() >= 2);
        let mut r = log.reader(0);
        for i in 0..70u64 {
            let rec = r.read_next().unwrap().expect("a record");
            assert_eq!(rec.seq, i + 1);
        }
        assert!(r.read_next().unwrap().is_none());
        log.append(Change::Unlink { path: p("f") }).unwrap();
        assert_eq!(r.read_next().unwrap().map(|r| r.seq), Some(71));
        // Reopened: appends go on after the last record; a reader can
        // start in the middle.
        let id = log.id();
        drop(log);
        let log = Log::open(&dir, 69).unwrap();
        assert_eq!(log.id(), id, "a log keeps its identity");
        assert_eq!(log.last(), 71);
        let lag = log.lag();
        assert_eq!(lag.ops, 2);
        // Record 70 (1 MiB of data) and 71, from before the reopening.
        assert!(lag.bytes > 1 << 20 && lag.bytes < (1 << 20) + 4096, "{lag:?}");
        assert_eq!(log.append(Change::Rmdir { path: p("d") }).unwrap(), 72);
        let mut r = log.reader(69);
        let seqs: Vec<u64> = std::iter::from_fn(|| r.read_next().unwrap()).map(|r| r.seq).collect();
        assert_eq!(seqs, [70, 71, 72]);
        // Segments wholly applied go; the one holding record 70 stays.
        log.drop_through(69).unwrap();
        let mut r = log.reader(69);
        assert_eq!(r.read_next().unwrap().map(|r| r.seq), Some(70));
        assert!(log.reader(0).read_next().is_err(), "record 1 was dropped");
        // Reopened without a position (a mount that looks at the log
        // before it knows the mirror's): it opens, and says what it holds.
        let held = log.first_held().unwrap();
        assert!(held > 1 && held <= 70, "first held {held}");
        drop(log);
        let log = Log::open(&dir, 0).unwrap();
        assert_eq!(log.first_held().unwrap(), held);
        assert_eq!(log.last(), 72);
    }

    #[test]
    fn a_torn_tail_is_cut_off_at_open() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join(DIR);
        let log = Log::open(&dir, 0).unwrap();
        for _ in 0..3 {
            log.append(Change::Unlink { path: p("x") }).unwrap();
        }
        let len = log.lock().length;
        drop(log);
        // The third record torn (its last bytes never written), and bytes
        // further on written (a crash's writeback out of order).
        let seg = OpenOptions::new().write(true).open(dir.join(segment_name(1))).unwrap();
        seg.write_all_at(&[0; 5], len - 5).unwrap();
        seg.write_all_at(&[0xa5; 100], len + 1000).unwrap();
        drop(seg);
        let log = Log::open(&dir, 0).unwrap();
        assert_eq!(log.last(), 2);
        assert_eq!(log.append(Change::Unlink { path: p("y") }).unwrap(), 3);
        let mut r = log.reader(0);
        let got: Vec<Record> = std::iter::from_fn(|| r.read_next().unwrap()).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].change, Change::Unlink { path: p("y") });
    }

    #[test]
    fn records_ride_on_a_files_flush_only_inside_the_preallocated_segment() {
        let t = tempfile::tempdir().unwrap();
        if !volume::flushes_whole_device(t.path()) || volume::is_tmpfs(t.path()) {
            // A filesystem whose flush is not known to cover the device.
            let log = Log::open(&t.path().join(DIR), 0).unwrap();
            let f = File::create(t.path().join("f")).unwrap();
            log.append(Change::Unlink { path: p("x") }).unwrap();
            assert_eq!(log.write_out(1, f.as_fd()).unwrap(), None);
            return;
        }
        let dir = t.path().join(DIR);
        let log = Log::open(&dir, 0).unwrap();
        let seg = dir.join(segment_name(1));
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            SEGMENT,
            "a new segment is preallocated"
        );
        let f = File::create(t.path().join("f")).unwrap();
        let seq = log.append(Change::Unlink { path: p("x") }).unwrap();
        assert_eq!(log.write_out(seq, f.as_fd()).unwrap(), Some(seq));
        // Written out (not dirty in the page cache any more), not yet durable.
        assert!(log.lock().synced < seq);
        log.flushed(seq);
        assert_eq!(log.lock().synced, seq);
        // Not beside a directory, nor a file of another filesystem.
        let seq = log.append(Change::Unlink { path: p("y") }).unwrap();
        assert_eq!(log.write_out(seq, File::open(t.path()).unwrap().as_fd()).unwrap(), None);
        let shm = tempfile::tempfile_in("/dev/shm").unwrap();
        assert_eq!(log.write_out(seq, shm.as_fd()).unwrap(), None);
        // Past the preallocated end, an append grows the file: its own sync.
        let data = vec![7u8; 1 << 20];
        let mut last = seq;
        while log.lock().length <= SEGMENT {
            last = log
                .append(Change::Write {
                    path: p("big"),
                    offset: 0,
                    data: data.clone(),
                })
                .unwrap();
        }
        assert_eq!(log.write_out(last, f.as_fd()).unwrap(), None);
        // The next segment was made ahead, from half way, and is used.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while log.spare.load(Ordering::Acquire) != SPARE_READY {
            assert!(std::time::Instant::now() < deadline, "no spare segment made");
            std::thread::sleep(Duration::from_millis(10));
        }
        let last = log.append(Change::Unlink { path: p("z") }).unwrap();
        assert_eq!(fs::metadata(dir.join(segment_name(last))).unwrap().len(), SEGMENT);
        assert!(!dir.join(SPARE).exists());
        assert_eq!(log.write_out(last, f.as_fd()).unwrap(), Some(last));
        drop(log);
        // Reopened: the records are all there, the zeros are not records.
        let log = Log::open(&dir, 0).unwrap();
        assert_eq!(log.last(), last);
        let mut r = log.reader(0);
        assert_eq!(std::iter::from_fn(|| r.read_next().unwrap()).count() as u64, last);
    }

    #[test]
    fn a_reader_waits_at_the_preallocated_end_and_reads_what_comes_after() {
        let t = tempfile::tempdir().unwrap();
        let log = Log::open(&t.path().join(DIR), 0).unwrap();
        let mut r = log.reader(0);
        assert!(r.read_next().unwrap().is_none());
        log.append(Change::Unlink { path: p("a") }).unwrap();
        assert_eq!(r.read_next().unwrap().unwrap().seq, 1);
        assert!(r.read_next().unwrap().is_none());
        log.append(Change::Unlink { path: p("b") }).unwrap();
        assert_eq!(r.read_next().unwrap().unwrap().change, Change::Unlink { path: p("b") });
        // A reader started after the end finds its place by the zeros.
        assert!(log.reader(2).read_next().unwrap().is_none());
        log.append(Change::Unlink { path: p("c") }).unwrap();
        assert_eq!(log.reader(2).read_next().unwrap().unwrap().seq, 3);
    }

    #[test]
    fn concurrent_syncs_are_shared_and_each_waits_for_its_own_record() {
        let t = tempfile::tempdir().unwrap();
        let log = Arc::new(Log::open(&t.path().join(DIR), 0).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let seq = log.append(Change::Unlink { path: p("x") }).unwrap();
                        log.sync(seq).unwrap();
                        assert!(log.lock().synced >= seq);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(log.last(), 400);
    }

    #[test]
    fn the_lag_counts_what_is_not_applied() {
        let t = tempfile::tempdir().unwrap();
        let log = Log::open(&t.path().join(DIR), 0).unwrap();
        assert_eq!(log.lag(), Lag::default());
        log.append(Change::Unlink { path: p("x") }).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        log.append(Change::Unlink { path: p("y") }).unwrap();
        log.append(Change::Fsync {
            path: p("z"),
            datasync: true,
        })
        .unwrap();
        log.append(Change::Write {
            path: p("z"),
            offset: 0,
            data: b"z".to_vec(),
        })
        .unwrap();
        log.append(Change::Fsync {
            path: p("z"),
            datasync: true,
        })
        .unwrap();
        let lag = log.lag();
        // The first barrier opens z by path, so does the write; the second
        // barrier goes through the file the write keeps open.
        assert_eq!((lag.ops, lag.trips), (5, 4), "two unlinks, a barrier, a write");
        assert!(lag.seconds >= 0.03, "{lag:?}");
        assert!(lag.bytes > 0);
        log.applied(1);
        let lag = log.lag();
        assert_eq!((lag.ops, lag.trips), (4, 3));
        assert!(lag.seconds < 0.03, "{lag:?}");
        log.applied(5);
        assert_eq!(log.lag(), Lag::default());
    }

    fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(root).sort_by_file_name() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let body = if e.file_type().is_file() {
                fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            out.push((rel, body));
        }
        out
    }

    #[test]
    fn replaying_from_any_point_after_a_rename_ends_in_the_same_tree() {
        let me = me();
        let changes = vec![
            Change::Mkdir {
                path: p("d"),
                mode: 0o755,
                owner: me,
            },
            Change::Create {
                path: p("d/f"),
                mode: 0o644,
                owner: me,
            },
            Change::Write {
                path: p("d/f"),
                offset: 0,
                data: b"AAAA".to_vec(),
            },
            Change::Rename {
                old: p("d/f"),
                new: p("d/g"),
                flags: 0,
            },
            Change::Create {
                path: p("d/f"),
                mode: 0o600,
                owner: me,
            },
            Change::Write {
                path: p("d/f"),
                offset: 2,
                data: b"BB".to_vec(),
            },
            Change::Truncate {
                path: p("d/g"),
                size: 2,
            },
            Change::Write {
                path: p("d/g"),
                offset: 4,
                data: b"C".to_vec(),
            },
            Change::Fsync {
                path: p("d/f"),
                datasync: false,
            },
            Change::Create {
                path: p("d/h"),
                mode: 0o644,
                owner: me,
            },
            Change::Write {
                path: p("d/h"),
                offset: 0,
                data: b"Z".to_vec(),
            },
            Change::Unlink { path: p("d/h") },
            Change::Create {
                path: p("d/h"),
                mode: 0o644,
                owner: me,
            },
        ];
        let once = tempfile::tempdir().unwrap();
        let v = Volume::open(crate::spec::Side::Mirror, once.path()).unwrap();
        let mut files = KeptFiles::default();
        for c in &changes {
            c.apply_with(&v, false, &mut files).unwrap();
        }
        let want = tree(once.path());
        // A crash after record `done`: the position says `from` (the last
        // rename, or the start), and everything after it is replayed.
        let rename = 3;
        for done in 0..changes.len() {
            let from = if done > rename { rename + 1 } else { 0 };
            let t = tempfile::tempdir().unwrap();
            let v = Volume::open(crate::spec::Side::Mirror, t.path()).unwrap();
            let mut files = KeptFiles::default();
            for c in &changes[..=done] {
                c.apply_with(&v, false, &mut files).unwrap();
            }
            // Restarted: nothing is kept open.
            let mut files = KeptFiles::default();
            for (i, c) in changes.iter().enumerate().skip(from) {
                c.apply_with(&v, i == from, &mut files).unwrap();
            }
            assert_eq!(tree(t.path()), want, "crash after record {done}, replay from {from}");
        }
        // The rename itself replayed once more.
        let t = tempfile::tempdir().unwrap();
        let v = Volume::open(crate::spec::Side::Mirror, t.path()).unwrap();
        for c in &changes[..=rename] {
            c.apply(&v, false).unwrap();
        }
        for (i, c) in changes.iter().enumerate().skip(rename) {
            c.apply(&v, i == rename).unwrap();
        }
        assert_eq!(tree(t.path()), want);
    }

    #[test]
    fn the_log_foresees_which_records_a_replayer_applies_by_path() {
        let me = me();
        let t = tempfile::tempdir().unwrap();
        let v = Volume::open(crate::spec::Side::Mirror, t.path()).unwrap();
        let create = |path: &str| Change::Create {
            path: p(path),
            mode: 0o644,
            owner: me,
        };
        let fsync = |path: &str| Change::Fsync {
            path: p(path),
            datasync: true,
        };
        let others: Vec<String> = (0..KEPT_FILES).map(|i| format!("d/g{i}")).collect();
        // (record, streamed through a kept file)
        let mut changes = vec![
            (
                Change::Mkdir {
                    path: p("d"),
                    mode: 0o755,
                    owner: me,
                },
                false,
            ),
            (create("d/f"), false),
            (create("d/x"), false),
        ];
        changes.extend(others.iter().map(|g| (create(g), false)));
        changes.extend([
            (write_x("d/f"), false),
            (write_x("d/f"), true),
            (mtime_at("d/f", 2), true),
            (fsync("d/f"), true),
            (mtime_at("d/x", 2), false),
            (fsync("d/x"), false),
            (
                Change::Chmod {
                    path: p("d/f"),
                    mode: 0o600,
                },
                false,
            ),
            (write_x("d/f"), true),
        ]);
        // As many other files written: d/f is no longer kept.
        changes.extend(others.iter().map(|g| (write_x(g), false)));
        changes.extend([
            (write_x("d/f"), false),
            (
                Change::Truncate {
                    path: p("d/f"),
                    size: 0,
                },
                true,
            ),
            (
                Change::Rename {
                    old: p("d/x"),
                    new: p("d/y"),
                    flags: 0,
                },
                false,
            ),
            (fsync("d/f"), false),
            (write_x("d/f"), false),
            (Change::Unlink { path: p("d/y") }, false),
            (fsync("d"), false),
            (mtime_at("d/f", 2), false),
        ]);
        let mut model = KeptModel::default();
        let mut files = KeptFiles::default();
        for (i, (c, streamed)) in changes.iter().enumerate() {
            let before = files.trips();
            c.apply_with(&v, false, &mut files).unwrap();
            let by_path = !c.is_data() || files.trips() != before;
            assert_eq!(by_path, !streamed, "record {i}, {c:?}: applied");
            assert_eq!(model.trip(c), !streamed, "record {i}, {c:?}: foreseen");
        }
    }

    #[test]
    fn times_on_a_kept_file_wait_for_sync_owed_and_come_before_any_call_by_path() {
        let me = me();
        let t = tempfile::tempdir().unwrap();
        let v = Volume::open(crate::spec::Side::Mirror, t.path()).unwrap();
        let mut files = KeptFiles::default();
        let mtime = |name: &str| fs::metadata(t.path().join(name)).unwrap().mtime();
        let apply = |files: &mut KeptFiles, c: Change| c.apply_with(&v, false, files).unwrap();
        let others: Vec<String> = (0..KEPT_FILES).map(|i| format!("g{i}")).collect();
        for name in std::iter::once("f").chain(others.iter().map(String::as_str)) {
            apply(
                &mut files,
                Change::Create {
                    path: p(name),
                    mode: 0o644,
                    owner: me,
                },
            );
        }
        apply(&mut files, write_x("f"));
        apply(&mut files, mtime_at("f", 100));
        assert_ne!(mtime("f"), 100, "waits");
        files.sync_owed().unwrap();
        assert_eq!(mtime("f"), 100, "made with the syncs");
        // A kept file let go for others: its times are made then, and
        // times set by path after them stand.
        apply(&mut files, write_x("f"));
        apply(&mut files, mtime_at("f", 200));
        for g in &others {
            apply(&mut files, write_x(g));
        }
        assert_eq!(mtime("f"), 200, "made as the file was let go");
        apply(&mut files, mtime_at("f", 300));
        files.sync_owed().unwrap();
        assert_eq!(mtime("f"), 300);
        // A name that moves lets every file go first.
        apply(&mut files, write_x("f"));
        apply(&mut files, mtime_at("f", 400));
        apply(
            &mut files,
            Change::Rename {
                old: p("f"),
                new: p("h"),
                flags: 0,
            },
        );
        apply(&mut files, mtime_at("h", 500));
        files.sync_owed().unwrap();
        assert_eq!(mtime("h"), 500);
    }

    #[test]
    fn syncs_are_owed_until_sync_owed_and_follow_a_file_whose_name_moved() {
        let me = me();
        let t = tempfile::tempdir().unwrap();
        let v = Volume::open(crate::spec::Side::Mirror, t.path()).unwrap();
        let mut files = KeptFiles::default();
        let owing = |files: &KeptFiles| files.files.iter().filter(|k| k.owes.is_some()).count() + files.owed.len();
        for c in [
            Change::Mkdir {
                path: p("d"),
                mode: 0o755,
                owner: me,
            },
            Change::Create {
                path: p("d/f"),
                mode: 0o644,
                owner: me,
            },
            Change::Write {
                path: p("d/f"),
                offset: 0,
                data: b"data".to_vec(),
            },
        ] {
            c.apply_with(&v, false, &mut files).unwrap();
        }
        assert_eq!(files.files[0].owes, Some(true), "written: an fdatasync is owed");
        Change::Fsync {
            path: p("d/f"),
            datasync: false,
        }
        .apply_with(&v, false, &mut files)
        .unwrap();
        assert_eq!(
            files.files[0].owes,
            Some(false),
            "a full fsync asked for: it is what is owed"
        );
        // The name moves: the file is closed by name, its fd still owes.
        Change::Rename {
            old: p("d/f"),
            new: p("d/g"),
            flags: 0,
        }
        .apply_with(&v, false, &mut files)
        .unwrap();
        assert!(files.files.is_empty());
        assert_eq!(files.owed.len(), 1);
        assert!(!files.owed[0].1, "still a full fsync");
        // A directory's barrier is owed through an fd of its own; a name
        // that is gone owes nothing.
        for path in ["d", "gone"] {
            Change::Fsync {
                path: p(path),
                datasync: false,
            }
            .apply_with(&v, false, &mut files)
            .unwrap();
        }
        assert_eq!(owing(&files), 2);
        files.sync_owed().unwrap();
        assert_eq!(owing(&files), 0);
        assert_eq!(fs::read(t.path().join("d/g")).unwrap(), b"data");
    }

    #[test]
    fn a_replayer_holds_a_bounded_number_of_files_that_owe_a_sync() {
        let me = me();
        let t = tempfile::tempdir().unwrap();
        let v = Volume::open(crate::spec::Side::Mirror, t.path()).unwrap();
        let mut files = KeptFiles::default();
        for i in 0..200 {
            let path = p(&format!("f{i}"));
            Change::Create {
                path: path.clone(),
                mode: 0o644,
                owner: me,
            }
            .apply_with(&v, false, &mut files)
            .unwrap();
            Change::Write {
                path,
                offset: 0,
                data: vec![1],
            }
            .apply_with(&v, false, &mut files)
            .unwrap();
            assert!(
                files.owed.len() <= OWED_FDS,
                "{} fds held at file {i}",
                files.owed.len()
            );
            assert!(files.files.len() <= KEPT_FILES);
        }
        files.sync_owed().unwrap();
        assert!(files.owed.is_empty());
    }
}
