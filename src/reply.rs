//! The answer to one request, whichever transport carries it.
//!
//! Owns: one small trait per kind of answer, implemented for fuser's reply
//! types (the classic `/dev/fuse` transport) and for a ring entry's reply
//! (`ring`, FUSE over io_uring). `fs` writes each operation once, generic
//! over these traits. Knows nothing of what a request does.

use std::ffi::OsStr;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr,
};

/// How long the kernel may cache entries and attributes. mirrorfs is the
/// only writer of its backing trees and every change passes through it, so
/// the kernel's cache never goes stale behind its back; a long timeout
/// saves a round trip per stat.
pub const TTL: Duration = Duration::from_secs(60);

/// Every answer can be an error.
pub trait Fail: Send + 'static {
    fn error(self, e: Errno);
}

pub trait Entry: Fail {
    fn entry(self, a: &FileAttr);
    /// No such entry, for `TTL` (node id 0).
    fn negative(self);
}

/// The attributes of a negative entry: node id 0 is what says it.
pub fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: std::time::UNIX_EPOCH,
        mtime: std::time::UNIX_EPOCH,
        ctime: std::time::UNIX_EPOCH,
        crtime: std::time::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

pub trait Attr: Fail {
    fn attr(self, a: &FileAttr);
}

pub trait Data: Fail {
    fn data(self, d: &[u8]);
}

pub trait Empty: Fail {
    fn ok(self);
}

pub trait Open: Fail {
    fn opened(self, fh: u64, flags: FopenFlags);
}

pub trait Written: Fail {
    fn written(self, n: u32);
}

pub trait Create: Fail {
    fn created(self, a: &FileAttr, fh: u64, flags: FopenFlags);
}

pub trait Lseek: Fail {
    fn offset(self, o: i64);
}

/// statfs's figures, in `fuse_kstatfs` order.
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

pub trait StatfsReply: Fail {
    fn statfs(self, s: &Statfs);
}

pub trait Xattr: Fail {
    /// The size a zero-sized getxattr or listxattr asked for.
    fn size(self, n: u32);
    fn value(self, d: &[u8]);
}

/// A READDIR answer, filled entry by entry.
pub trait Dir: Fail {
    /// Adds an entry; true when it did not fit (it is not sent).
    fn add(&mut self, ino: u64, offset: u64, kind: FileType, name: &OsStr) -> bool;
    fn done(self);
}

/// A READDIRPLUS answer, filled entry by entry.
pub trait DirPlus: Fail {
    /// Adds an entry; true when it did not fit (it is not sent).
    fn add(&mut self, offset: u64, name: &OsStr, a: &FileAttr) -> bool;
    fn done(self);
}

macro_rules! fail {
    ($($t:ty),*) => {$(
        impl Fail for $t {
            fn error(self, e: Errno) {
                <$t>::error(self, e)
            }
        }
    )*};
}

fail!(
    ReplyEntry,
    ReplyAttr,
    ReplyData,
    ReplyEmpty,
    ReplyOpen,
    ReplyWrite,
    ReplyCreate,
    ReplyLseek,
    ReplyStatfs,
    ReplyXattr,
    ReplyDirectory,
    ReplyDirectoryPlus
);

impl Entry for ReplyEntry {
    fn entry(self, a: &FileAttr) {
        ReplyEntry::entry(self, &TTL, a, Generation(0))
    }

    fn negative(self) {
        ReplyEntry::entry(self, &TTL, &negative_attr(), Generation(0))
    }
}

impl Attr for ReplyAttr {
    fn attr(self, a: &FileAttr) {
        ReplyAttr::attr(self, &TTL, a)
    }
}

impl Data for ReplyData {
    fn data(self, d: &[u8]) {
        ReplyData::data(self, d)
    }
}

impl Empty for ReplyEmpty {
    fn ok(self) {
        ReplyEmpty::ok(self)
    }
}

impl Open for ReplyOpen {
    fn opened(self, fh: u64, flags: FopenFlags) {
        ReplyOpen::opened(self, FileHandle(fh), flags)
    }
}

impl Written for ReplyWrite {
    fn written(self, n: u32) {
        ReplyWrite::written(self, n)
    }
}

impl Create for ReplyCreate {
    fn created(self, a: &FileAttr, fh: u64, flags: FopenFlags) {
        ReplyCreate::created(self, &TTL, a, Generation(0), FileHandle(fh), flags)
    }
}

impl Lseek for ReplyLseek {
    fn offset(self, o: i64) {
        ReplyLseek::offset(self, o)
    }
}

impl StatfsReply for ReplyStatfs {
    fn statfs(self, s: &Statfs) {
        ReplyStatfs::statfs(
            self, s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        )
    }
}

impl Xattr for ReplyXattr {
    fn size(self, n: u32) {
        ReplyXattr::size(self, n)
    }

    fn value(self, d: &[u8]) {
        ReplyXattr::data(self, d)
    }
}

impl Dir for ReplyDirectory {
    fn add(&mut self, ino: u64, offset: u64, kind: FileType, name: &OsStr) -> bool {
        ReplyDirectory::add(self, INodeNo(ino), offset, kind, name)
    }

    fn done(self) {
        ReplyDirectory::ok(self)
    }
}

impl DirPlus for ReplyDirectoryPlus {
    fn add(&mut self, offset: u64, name: &OsStr, a: &FileAttr) -> bool {
        ReplyDirectoryPlus::add(self, a.ino, offset, name, &TTL, a, Generation(0))
    }

    fn done(self) {
        ReplyDirectoryPlus::ok(self)
    }
}
